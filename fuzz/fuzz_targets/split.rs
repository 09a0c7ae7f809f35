//! `Split::from_weights`, `from_members`, `pick`, `pick_key` and `pick_excluding` on generated
//! weights.
//!
//! Asserts: the entries are the given ones without zero weights (all 1 when every weight is 0),
//! cut at `u32::MAX`; `pick(x)` is the entry whose cumulative interval holds `x * total / 2^64`, so
//! it is an entry of the split with weight above 0 and is monotone in `x`; `pick_excluding` never
//! returns the excluded cluster, is `None` exactly when nothing else is left, and picks like the
//! split without that cluster; `pick_key` equals `pick` when each cluster is a revision of its own,
//! and with all of them one revision picks a cluster of the split (`None` only for an empty one);
//! with some members out (not ready), in two revisions, picks go only to the others and a key whose
//! cluster is not out stays on it; and a sticky key on the last cluster stays there when the last
//! cluster's weight grows at the expense of the others (the total unchanged), and on the last
//! revision when the others are one older revision.

#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rayshift::routing::{ClusterId, Member, Split};

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured) -> Result<()> {
    let given: Vec<(ClusterId, u32)> = (0..u.int_in_range(0..=8)?)
        .map(|_| {
            let cluster = u.int_in_range(0..=9)?;
            let weight = match u.int_in_range(0..=9u8)? {
                0 => 0,
                1 => u32::MAX,
                2 => u.arbitrary()?,
                _ => u.int_in_range(0..=100)?,
            };
            Ok((cluster, weight))
        })
        .collect::<Result<_>>()?;
    let mut xs: Vec<u64> = vec![0, 1, u64::MAX, u64::MAX / 2];
    for _ in 0..u.int_in_range(0..=8)? {
        xs.push(u.arbitrary()?);
    }
    xs.sort_unstable();
    let exclude: ClusterId = u.int_in_range(0..=10)?;

    let split = Split::from_weights(given.iter().copied());
    let entries: Vec<(ClusterId, u32)> = split.entries().collect();
    assert_eq!(entries, normalized(&given), "given {given:?}");
    assert_eq!(split.len(), entries.len());
    assert_eq!(split.is_empty(), entries.is_empty());
    let total: u64 = entries.iter().map(|&(_, w)| u64::from(w)).sum();
    assert_eq!(u64::from(split.total()), total);
    assert!(entries.iter().all(|&(_, w)| w > 0));

    let names: Vec<String> = given.iter().map(|(c, _)| format!("c{c}")).collect();
    let one_revision = Split::from_members(given.iter().zip(&names).map(
        |(&(cluster, weight), name)| Member {
            cluster,
            name,
            group: "v1",
            weight,
            available: true,
            last_resort: false,
        },
    ));
    assert_eq!(one_revision.entries().collect::<Vec<_>>(), entries);

    // Some members out (not ready): requests and keys go only to the others, and a key whose
    // cluster is still available stays on it. Two revisions: the first `split_at` members, the rest.
    let out: Vec<bool> = (0..given.len())
        .map(|_| u.arbitrary())
        .collect::<Result<_>>()?;
    let split_at = u.int_in_range(0..=given.len())?;
    let members = |all_available: bool| {
        Split::from_members(given.iter().zip(&names).enumerate().map(
            |(i, (&(cluster, weight), name))| Member {
                cluster,
                name,
                group: if i < split_at { "v1" } else { "v2" },
                weight,
                available: all_available || !out[i],
                last_resort: false,
            },
        ))
    };
    let (all, some_out) = (members(true), members(false));
    let available: Vec<ClusterId> = some_out.entries().map(|(c, _)| c).collect();
    let unique = {
        let mut ids: Vec<ClusterId> = given.iter().map(|&(c, _)| c).collect();
        ids.sort_unstable();
        ids.windows(2).all(|w| w[0] != w[1])
    };
    for &x in &xs {
        let picked = some_out.pick_key(x);
        assert_eq!(
            picked.is_none(),
            available.is_empty(),
            "key {x:#x}, {given:?} {out:?}"
        );
        assert!(
            picked.is_none_or(|c| available.contains(&c)),
            "key {x:#x} to a cluster that is out: {given:?} {out:?}"
        );
        assert!(
            some_out.pick(x).is_none_or(|c| available.contains(&c)),
            "x {x:#x}, {given:?} {out:?}"
        );
        if let Some(home) = all.pick_key(x).filter(|c| unique && available.contains(c)) {
            assert_eq!(picked, Some(home), "key {x:#x} moved: {given:?} {out:?}");
        }
    }

    let mut last_index = 0;
    for &x in &xs {
        assert_eq!(split.pick_key(x), split.pick(x), "key {x:#x}, {given:?}");
        let keyed = one_revision.pick_key(x);
        assert_eq!(keyed.is_none(), entries.is_empty(), "key {x:#x}, {given:?}");
        assert!(
            keyed.is_none_or(|c| entries.iter().any(|&(e, _)| e == c)),
            "key {x:#x}, {given:?}"
        );
        let want = interval_of(&entries, x);
        assert_eq!(
            split.pick(x),
            want.map(|i| entries[i].0),
            "x {x:#x}, {given:?}"
        );
        if let Some(i) = want {
            assert!(i >= last_index, "pick went back as x grew: {given:?}");
            last_index = i;
        }

        let picked = split.pick_excluding(x, exclude);
        let others: Vec<(ClusterId, u32)> = entries
            .iter()
            .copied()
            .filter(|&(c, _)| c != exclude)
            .collect();
        assert_ne!(picked, Some(exclude), "x {x:#x}, {given:?}");
        assert_eq!(picked.is_none(), others.is_empty(), "x {x:#x}, {given:?}");
        assert_eq!(
            picked,
            Split::from_weights(others).pick(x),
            "x {x:#x}, {given:?}"
        );
    }

    // A shift step: the last cluster gains some weight, taken from the others starting at a fuzzed
    // one (as a shift does, the total unchanged).
    let Some(&(last, last_weight)) = entries.last() else {
        return Ok(());
    };
    if entries.iter().filter(|&&(c, _)| c == last).count() > 1 {
        return Ok(());
    }
    let mut weights: Vec<u32> = entries.iter().map(|&(_, w)| w).collect();
    let n = weights.len();
    let others = total - u64::from(last_weight);
    let mut deficit = u.int_in_range(0..=others)? as u32;
    weights[n - 1] += deficit;
    let rotate = u.int_in_range(0..=n)?;
    for k in 0..n - 1 {
        let i = (rotate + k) % (n - 1);
        let take = deficit.min(weights[i]);
        weights[i] -= take;
        deficit -= take;
    }
    assert_eq!(deficit, 0);
    let grown = Split::from_weights(entries.iter().zip(&weights).map(|(&(c, _), &w)| (c, w)));
    assert_eq!(grown.total(), split.total());
    // The same with the others as one older revision (rendezvous among them).
    let names: Vec<String> = entries.iter().map(|(c, _)| format!("c{c}")).collect();
    let revisions = |weights: &[u32]| {
        Split::from_members(entries.iter().zip(weights).zip(&names).enumerate().map(
            |(i, ((&(cluster, _), &weight), name))| Member {
                cluster,
                name,
                group: if i + 1 == n { "v2" } else { "v1" },
                weight,
                available: true,
                last_resort: false,
            },
        ))
    };
    let (before, after) = (
        revisions(&entries.iter().map(|&(_, w)| w).collect::<Vec<_>>()),
        revisions(&weights),
    );
    for &x in &xs {
        if split.pick(x) == Some(last) {
            assert_eq!(
                grown.pick(x),
                Some(last),
                "x {x:#x} left {last}: {entries:?} -> {weights:?}"
            );
        }
        if before.pick_key(x) == Some(last) {
            assert_eq!(
                after.pick_key(x),
                Some(last),
                "key {x:#x} left revision v2: {entries:?} -> {weights:?}"
            );
        }
    }
    Ok(())
}

/// What `from_weights` documents: zero weights dropped unless all are zero (then 1 each), the running
/// total cut at `u32::MAX`.
fn normalized(given: &[(ClusterId, u32)]) -> Vec<(ClusterId, u32)> {
    let all_zero = given.iter().all(|&(_, w)| w == 0);
    let mut room = u64::from(u32::MAX);
    let mut out = Vec::new();
    for &(c, w) in given {
        let w = if all_zero { 1 } else { u64::from(w) }.min(room);
        if w > 0 {
            out.push((c, w as u32));
            room -= w;
        }
    }
    out
}

/// Index of the entry whose interval `[start, end)` holds the point `x * total / 2^64`.
fn interval_of(entries: &[(ClusterId, u32)], x: u64) -> Option<usize> {
    let total: u128 = entries.iter().map(|&(_, w)| u128::from(w)).sum();
    let point = (u128::from(x) * total) >> 64;
    let mut start = 0u128;
    for (i, &(_, w)) in entries.iter().enumerate() {
        let end = start + u128::from(w);
        if start <= point && point < end {
            return Some(i);
        }
        start = end;
    }
    None
}
