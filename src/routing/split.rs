//! Weighted split of an app's traffic over the clusters of its shard.
//!
//! A pick maps a 64-bit value onto cumulative weight intervals, like Envoy's weighted_clusters,
//! older revisions first. Fed a random value ([`Split::pick`]) it splits by weight.
//!
//! Fed the hash of a stable key ([`Split::pick_key`]) it is sticky. Every key has a **home**: a
//! cluster picked from the weights alone, whether or not the cluster can take requests now, in
//! two levels:
//!
//! 1. the key's point on the intervals picks a **revision**: the clusters of one revision share
//!    one interval, the sum of their weights. As a shift grows the newest revision's weight (the
//!    others shrinking, the total fixed) a key moves to it at most once and never back, however
//!    the weights are spread inside each revision (a cluster joining the target revision, rounding);
//! 2. inside a revision of several clusters, weighted rendezvous hashing of the key over their
//!    names picks the cluster: each scores `-weight / ln(u)`, `u` a hash of the key and the
//!    cluster's name, the best wins. A key stays on a cluster whose weight grows while the others'
//!    do not (the shift machine's rounding never raises them).
//!
//! A key whose home cannot take requests (not ready, ejected) goes to the cluster its scores rank
//! first among those of its home's revision that can and have weight: the pick it would get were
//! its home at weight 0, so a home's keys spread over its revision by weight and follow the
//! weights as they change. When none of them can, the key goes to the cluster its scores rank
//! first among all that can take requests. So a cluster leaving moves no key whose home can take
//! requests, however many revisions share the shard, and its keys come back with it; the revision
//! intervals do not move, so while an old cluster is out a key in a shift's target revision stays
//! there.
//!
//! Members of weight 0 are nobody's home, except when every member has weight 0: then each counts
//! as weight 1, for homes as for random picks.
//!
//! When no member can take requests, those that can only as a **last resort** (ready but
//! draining: the old clusters of a promoted shift, still up) take them, by the same rules, rather
//! than the app failing: a shift's target that goes unready while its old clusters drain leaves
//! the app served by them ([`Split::is_last_resort`]).

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::hash::{unit_interval, FIXED_SEED};
use super::ClusterId;

/// The clusters an app's requests go to, with their weights, in the control plane's order
/// (revisions in their natural order, oldest first, a revision's clusters next to each other).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Split {
    /// The members that can take requests. Cumulative weights strictly increase, so no entry
    /// has weight 0.
    entries: Box<[Entry]>,
    /// Every member with a weight above 0, laid out like `entries`, when one of them cannot take
    /// requests: the sticky keys' homes. Empty when they are `entries`.
    homes: Box<[Entry]>,
    /// Whether `entries` are last-resort members: no member is available.
    last_resort: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    /// Weight up to and including this entry.
    end: u32,
    cluster: ClusterId,
    /// A hash of the cluster's name: its rendezvous seed, whatever its id.
    seed: u64,
    /// Indices of the first and last entry of its revision (next to each other).
    group: (u32, u32),
}

/// One cluster of a split, for [`Split::from_members`].
#[derive(Debug, Clone, Copy)]
pub struct Member<'a> {
    /// The cluster.
    pub cluster: ClusterId,
    /// Its name: sticky keys follow names, not ids (which shift as clusters come and go).
    pub name: &'a str,
    /// Its revision: members of one revision next to each other share one sticky interval.
    pub group: &'a str,
    /// Its weight.
    pub weight: u32,
    /// Whether it can take requests now (ready, not draining). One that cannot keeps its sticky
    /// keys' homes: they come back to it when it can again.
    pub available: bool,
    /// Whether it can take requests as a last resort (ready but draining): it does when no member
    /// is available.
    pub last_resort: bool,
}

// === impl Split ===

impl Split {
    /// Builds a split from `(cluster, weight)` pairs, in order, each cluster a revision of its own
    /// (so [`pick_key`](Self::pick_key) is [`pick`](Self::pick)).
    pub fn from_weights(entries: impl IntoIterator<Item = (ClusterId, u32)>) -> Split {
        let given: Vec<(ClusterId, u32, String)> = entries
            .into_iter()
            .map(|(c, w)| (c, w, c.to_string()))
            .collect();
        Split::from_members(given.iter().map(|(c, w, name)| Member {
            cluster: *c,
            name,
            group: name,
            weight: *w,
            available: true,
            last_resort: false,
        }))
    }

    /// Builds a split from its members, in order.
    ///
    /// Requests go to the available members. Zero-weight members are dropped, except when every
    /// available member has weight 0: then each gets weight 1, so an app stays available when the
    /// clusters holding its weight are not. Weights adding past `u32::MAX` are cut there (entries
    /// beyond get nothing). Consecutive members of one `group` form one revision. Members that are
    /// not available keep the homes of their sticky keys (see the module docs). When no member is
    /// available, the last-resort ones take the requests, by the same rules.
    pub fn from_members<'a>(members: impl IntoIterator<Item = Member<'a>>) -> Split {
        let mut given: Vec<Member<'a>> = members.into_iter().collect();
        if given.iter().all(|m| m.weight == 0) {
            given.iter_mut().for_each(|m| m.weight = 1);
        }
        let mut available: Vec<Member<'a>> =
            given.iter().filter(|m| m.available).copied().collect();
        let last_resort = available.is_empty() && given.iter().any(|m| m.last_resort);
        if last_resort {
            available = given.iter().filter(|m| m.last_resort).copied().collect();
        }
        if available.iter().all(|m| m.weight == 0) {
            available.iter_mut().for_each(|m| m.weight = 1);
        }
        let entries = layout(available);
        let homes = if given.iter().any(|m| !m.available && m.weight > 0) {
            layout(given)
        } else {
            Box::default()
        };
        Split {
            entries,
            homes,
            last_resort,
        }
    }

    /// Whether the split's requests go to last-resort members (ready but draining), no member
    /// being available.
    pub fn is_last_resort(&self) -> bool {
        self.last_resort
    }

    /// The cluster for a random value `x`: `x` scales to a point in `[0, total)` and the first
    /// entry whose cumulative weight exceeds it is chosen. `None` when the split is empty.
    #[inline]
    pub fn pick(&self, x: u64) -> Option<ClusterId> {
        entry_at(&self.entries, x).map(|i| self.entries[i].cluster)
    }

    /// The cluster for a split key's [`key_hash`](super::key_hash): its home (the revision whose
    /// interval holds the key's point, then the cluster of that revision by weighted
    /// rendezvous) when the home can take requests, else one of its revision that can, else any
    /// that can, by weighted rendezvous (see the module docs). `None` when the split is empty.
    #[inline]
    pub fn pick_key(&self, key: u64) -> Option<ClusterId> {
        if self.homes.is_empty() {
            let i = home(&self.entries, key)?;
            return Some(self.entries[i].cluster);
        }
        let home = &self.homes[home(&self.homes, key)?];
        if self.entries.iter().any(|e| e.cluster == home.cluster) {
            return Some(home.cluster);
        }
        // The same scores, over the clusters of its revision that can take requests: the one the
        // key would have picked with its home left out, so the home's keys spread over them by
        // weight and follow their weights as they change, as if the home had weight 0.
        let (first, last) = home.group;
        let mates = &self.homes[first as usize..=last as usize];
        let of_revision = |i: &usize| mates.iter().any(|m| m.cluster == self.entries[*i].cluster);
        let i = match rendezvous(
            &self.entries,
            key,
            (0..self.entries.len()).filter(of_revision),
        ) {
            Some(i) => i,
            None => rendezvous(&self.entries, key, 0..self.entries.len())?,
        };
        Some(self.entries[i].cluster)
    }

    /// Like [`pick`](Self::pick) over the split without `exclude` (a cluster that just failed), for
    /// a retry: `None` when no other cluster is in the split.
    pub fn pick_excluding(&self, x: u64, exclude: ClusterId) -> Option<ClusterId> {
        let others: u32 = self
            .entries()
            .filter(|&(c, _)| c != exclude)
            .map(|(_, w)| w)
            .sum();
        if others == 0 {
            return None;
        }
        let point = ((x as u128 * others as u128) >> 64) as u32;
        let mut seen = 0u32;
        self.entries()
            .filter(|&(c, _)| c != exclude)
            .find(|&(_, w)| {
                seen += w;
                seen > point
            })
            .map(|(c, _)| c)
    }

    /// Whether no cluster can take the app's requests.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of clusters in the split.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The sum of the weights.
    #[inline]
    pub fn total(&self) -> u32 {
        self.entries.last().map_or(0, |e| e.end)
    }

    /// The `(cluster, weight)` pairs, in order; every weight is above 0.
    pub fn entries(&self) -> impl Iterator<Item = (ClusterId, u32)> + '_ {
        let starts = std::iter::once(0).chain(self.entries.iter().map(|e| e.end));
        self.entries
            .iter()
            .zip(starts)
            .map(|(e, start)| (e.cluster, e.end - start))
    }
}

/// Lays members out as entries, in order: cumulative weights, rendezvous seeds, revisions.
/// Zero-weight members are dropped; weights adding past `u32::MAX` are cut there.
fn layout<'a>(members: impl IntoIterator<Item = Member<'a>>) -> Box<[Entry]> {
    let mut cumulative = 0u32;
    let mut out: Vec<Entry> = Vec::new();
    let mut last_group: Option<&str> = None;
    for m in members {
        let next = cumulative.saturating_add(m.weight);
        if next <= cumulative {
            continue;
        }
        cumulative = next;
        let index = out.len() as u32;
        let first = match (last_group, out.last()) {
            (Some(g), Some(prev)) if g == m.group => prev.group.0,
            _ => index,
        };
        out.push(Entry {
            end: cumulative,
            cluster: m.cluster,
            seed: xxh3_64_with_seed(m.name.as_bytes(), FIXED_SEED),
            group: (first, index),
        });
        last_group = Some(m.group);
    }
    // Every member of a revision knows where the revision ends.
    for i in (1..out.len()).rev() {
        if out[i - 1].group.0 == out[i].group.0 {
            out[i - 1].group.1 = out[i].group.1;
        }
    }
    out.into_boxed_slice()
}

/// The entry whose interval holds `x` scaled to `[0, total)`.
#[inline]
fn entry_at(entries: &[Entry], x: u64) -> Option<usize> {
    let total = entries.last().map_or(0, |e| e.end);
    let point = ((x as u128 * total as u128) >> 64) as u32;
    entries.iter().position(|e| e.end > point)
}

/// The index of a key's home among `entries`: the revision whose interval holds its point, then
/// the cluster of that revision by weighted rendezvous.
#[inline]
fn home(entries: &[Entry], key: u64) -> Option<usize> {
    let i = entry_at(entries, key)?;
    let (first, last) = entries[i].group;
    if first == last {
        return Some(i);
    }
    rendezvous(entries, key, first as usize..=last as usize)
}

/// The index, among `indices` of `entries`, of the entry with the highest `-weight / ln(u)`,
/// `u = unit_interval(xxh3(key, seed))`; the earlier one on a tie. Only `f64::ln` is not exact
/// IEEE arithmetic: a libm rounding it differently in the last bit could flip only keys whose two
/// best scores are within one ulp (odds about 2^-50 per key).
fn rendezvous(
    entries: &[Entry],
    key: u64,
    indices: impl IntoIterator<Item = usize>,
) -> Option<usize> {
    let bytes = key.to_le_bytes();
    let mut best: Option<(f64, usize)> = None;
    for i in indices {
        let entry = &entries[i];
        let start = if i == 0 { 0 } else { entries[i - 1].end };
        let weight = f64::from(entry.end - start);
        let u = unit_interval(xxh3_64_with_seed(&bytes, entry.seed));
        let score = -weight / u.ln();
        if best.is_none_or(|(top, _)| score > top) {
            best = Some((score, i));
        }
    }
    best.map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::super::key_hash;
    use super::*;

    #[test]
    fn pick_excluding_skips_the_failed_cluster_by_weight() {
        let split = Split::from_weights([(0, 50), (1, 30), (2, 20)]);
        let mut counts = [0u32; 3];
        for i in 0..10_000u64 {
            let x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let c = split.pick_excluding(x, 0).unwrap();
            counts[c as usize] += 1;
        }
        assert_eq!(counts[0], 0);
        // 30:20 of the rest.
        assert!(
            (counts[1] as f64 / 10_000.0 - 0.6).abs() < 0.02,
            "{counts:?}"
        );
        assert_eq!(Split::from_weights([(4, 100)]).pick_excluding(7, 4), None);
        assert_eq!(
            Split::from_weights([(4, 100)]).pick_excluding(7, 5),
            Some(4)
        );
    }
    use proptest::prelude::*;

    fn counts(split: &Split, xs: impl Iterator<Item = u64>) -> Vec<usize> {
        let mut counts = vec![0; 16];
        for x in xs {
            counts[split.pick(x).expect("non-empty split") as usize] += 1;
        }
        counts
    }

    #[test]
    fn empty_split() {
        let split = Split::from_weights([]);
        assert!(split.is_empty());
        assert_eq!(split.total(), 0);
        assert_eq!(split.pick(0), None);
        assert_eq!(split.pick(u64::MAX), None);
        assert_eq!(split.entries().count(), 0);
    }

    #[test]
    fn zero_weights_are_dropped() {
        let split = Split::from_weights([(0, 0), (1, 70), (2, 0), (3, 30)]);
        assert_eq!(split.entries().collect::<Vec<_>>(), [(1, 70), (3, 30)]);
        assert_eq!(split.total(), 100);
        assert_eq!(split.len(), 2);
    }

    #[test]
    fn all_zero_weights_share_equally() {
        let split = Split::from_weights([(4, 0), (2, 0), (9, 0)]);
        assert_eq!(
            split.entries().collect::<Vec<_>>(),
            [(4, 1), (2, 1), (9, 1)]
        );
        assert_eq!(split.total(), 3);
        let step = u64::MAX / 3000 + 1;
        let counts = counts(&split, (0..3000u64).map(|i| i * step));
        assert_eq!((counts[4], counts[2], counts[9]), (1000, 1000, 1000));
    }

    #[test]
    fn pick_ends() {
        let split = Split::from_weights([(0, 70), (1, 30)]);
        assert_eq!(split.pick(0), Some(0));
        assert_eq!(split.pick(u64::MAX), Some(1));
        // The point 70 is the first of cluster 1's interval [70, 100).
        let first_of_one = (70u128 << 64).div_ceil(100) as u64;
        assert_eq!(split.pick(first_of_one - 1), Some(0));
        assert_eq!(split.pick(first_of_one), Some(1));
    }

    #[test]
    fn single_cluster_takes_everything() {
        let split = Split::from_weights([(5, 100)]);
        for x in [0, 1, u64::MAX / 2, u64::MAX] {
            assert_eq!(split.pick(x), Some(5));
        }
    }

    #[test]
    fn overflowing_weights_saturate() {
        let split = Split::from_weights([(0, u32::MAX - 1), (1, 5), (2, 5)]);
        assert_eq!(split.total(), u32::MAX);
        assert_eq!(
            split.entries().collect::<Vec<_>>(),
            [(0, u32::MAX - 1), (1, 1)]
        );
    }

    #[test]
    fn evenly_spaced_values_split_exactly() {
        let split = Split::from_weights([(0, 70), (1, 30)]);
        let step = u64::MAX / 10_000 + 1;
        let counts = counts(&split, (0..10_000u64).map(|i| i * step));
        assert_eq!((counts[0], counts[1]), (7000, 3000));
    }

    #[test]
    fn hashed_keys_split_within_one_point() {
        let split = Split::from_weights([(0, 70), (1, 30)]);
        let n = 100_000u64;
        let counts = counts(&split, (0..n).map(|i| key_hash(&i.to_le_bytes())));
        let share = counts[0] as f64 * 100.0 / n as f64;
        assert!((69.0..=71.0).contains(&share), "cluster 0 got {share}%");
    }

    /// Weights of a shift of `clusters` clusters where the last one reaches each weight of
    /// `last_steps`; the others give up weight first-to-last starting at `rotate`, never growing.
    fn shift_weights(
        clusters: usize,
        start: &[u32],
        last_steps: &[u32],
        rotate: usize,
    ) -> Vec<Vec<u32>> {
        let mut weights: Vec<u32> = start.to_vec();
        weights.push(100 - start.iter().sum::<u32>());
        let mut out = vec![weights.clone()];
        for &last in last_steps {
            let mut deficit = last.saturating_sub(weights[clusters - 1]);
            weights[clusters - 1] += deficit;
            for k in 0..clusters - 1 {
                let i = (rotate + k) % (clusters - 1);
                let take = deficit.min(weights[i]);
                weights[i] -= take;
                deficit -= take;
            }
            out.push(weights.clone());
        }
        out
    }

    proptest! {
        #[test]
        fn sticky_keys_never_leave_the_last_cluster(
            others in prop::collection::vec(0u32..=40, 1..4),
            mut last_steps in prop::collection::vec(0u32..=100, 1..12),
            rotate in 0usize..4,
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            // Shrink the others so the starting weights total at most 100.
            let mut start = others;
            while start.iter().sum::<u32>() > 100 {
                let i = start.iter().position(|&w| w > 0).expect("sum above 0");
                start[i] -= 1;
            }
            last_steps.sort_unstable();
            let clusters = start.len() + 1;
            let last = (clusters - 1) as ClusterId;
            let mut on_last = vec![false; keys.len()];
            for weights in shift_weights(clusters, &start, &last_steps, rotate) {
                prop_assert_eq!(weights.iter().sum::<u32>(), 100);
                let split = Split::from_weights(weights.iter().enumerate().map(|(i, &w)| (i as ClusterId, w)));
                // The old clusters as one revision: rendezvous among them, whatever their weights.
                let grouped = grouped(&weights, weights.len() - 1);
                for (k, &key) in keys.iter().enumerate() {
                    let picked = split.pick(key).expect("total is 100");
                    prop_assert_eq!(split.pick_key(key), Some(picked), "each cluster its own revision");
                    let keyed = grouped.pick_key(key).expect("total is 100");
                    prop_assert_eq!(keyed == last, picked == last, "the last revision's interval is the same");
                    if on_last[k] {
                        prop_assert_eq!(picked, last, "key {:#x} left the last cluster at {:?}", key, weights);
                    }
                    on_last[k] = picked == last;
                }
            }
        }

        /// An old cluster out (unready, ejected) for a whole shift: a key that reached the
        /// target never leaves it, and no key goes to the missing cluster; whether the target is
        /// a revision of its own or one cluster of the old clusters' revision (`"to": "green"`),
        /// the old clusters shrinking in proportion with the shift machine's rounding.
        #[test]
        fn sticky_keys_never_leave_the_target_while_an_old_cluster_is_out(
            old in prop::collection::vec(0u32..=60, 1..5),
            mut target_steps in prop::collection::vec(0u32..=100, 1..12),
            missing in 0usize..5,
            same_revision in any::<bool>(),
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            target_steps.sort_unstable();
            let target = old.len() as ClusterId;
            let missing = missing % old.len();
            let split_at = if same_revision { old.len() + 1 } else { old.len() };
            let mut on_target = vec![false; keys.len()];
            for &t in &target_steps {
                let mut weights = sainte_lague(100 - t, &old);
                weights.push(if old.iter().all(|&w| w == 0) { 100 } else { t });
                let split = grouped_without(&weights, split_at, &[missing]);
                for (k, &key) in keys.iter().enumerate() {
                    let picked = split.pick_key(key).expect("the target is available");
                    prop_assert_ne!(picked, missing as ClusterId);
                    if on_target[k] {
                        prop_assert_eq!(picked, target, "key {:#x} left the target at {:?}", key, weights);
                    }
                    on_target[k] = picked == target;
                }
            }
        }

        /// A target revision of several clusters: however its weight is spread over them (a
        /// cluster joining it takes an equal share), a key that reached it stays in it.
        #[test]
        fn sticky_keys_never_leave_a_growing_target_revision(
            steps in prop::collection::vec((0u32..=100, 0u32..=100), 1..10),
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            let mut target = 0u32;
            let mut in_target = vec![false; keys.len()];
            for (grow, spread) in steps {
                target = (target + grow % 20).min(100);
                let first = target * spread / 100;
                let weights = [100 - target, first, target - first];
                let split = grouped(&weights, 1);
                for (k, &key) in keys.iter().enumerate() {
                    let now = split.pick_key(key).map(|c| c >= 1);
                    if in_target[k] {
                        prop_assert_eq!(now, Some(true), "key {:#x} left the target at {:?}", key, weights);
                    }
                    in_target[k] = now == Some(true);
                }
            }
        }

        /// A cluster leaving (unready, ejected) moves only its own keys, whether the shard has
        /// one revision (`split_at` = all) or two; they come back when it returns.
        #[test]
        fn a_cluster_leaving_moves_only_its_own_keys(
            weights in prop::collection::vec(1u32..=100, 2..6),
            split_at in 1usize..6,
            leaving in 0usize..6,
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            let split_at = split_at.min(weights.len());
            let leaving = leaving % weights.len();
            let all = grouped(&weights, split_at);
            let rest = grouped_without(&weights, split_at, &[leaving]);
            for &key in &keys {
                let (was, now) = (all.pick_key(key), rest.pick_key(key));
                prop_assert_ne!(now, Some(leaving as ClusterId));
                if was != Some(leaving as ClusterId) {
                    prop_assert_eq!(was, now, "key {:#x} moved: {:?} without {}", key, weights, leaving);
                }
            }
        }
    }

    /// `seats` shared in proportion to `votes` by Sainte-Laguë's highest averages, as the shift
    /// machine shares the old clusters' weight (ties to the first).
    fn sainte_lague(seats: u32, votes: &[u32]) -> Vec<u32> {
        let mut out = vec![0u32; votes.len()];
        if votes.iter().all(|&v| v == 0) {
            return out;
        }
        for _ in 0..seats {
            let best = (0..votes.len())
                .max_by(|&a, &b| {
                    let q = |i: usize| f64::from(votes[i]) / f64::from(2 * out[i] + 1);
                    q(a).total_cmp(&q(b)).then(b.cmp(&a))
                })
                .expect("votes");
            out[best] += 1;
        }
        out
    }

    /// A split of clusters `0..weights.len()` named `c<i>`: those before `split_at` of revision
    /// `v1`, the others of `v2`.
    fn grouped(weights: &[u32], split_at: usize) -> Split {
        grouped_without(weights, split_at, &[])
    }

    /// [`grouped`], the clusters of `unavailable` not taking requests.
    fn grouped_without(weights: &[u32], split_at: usize, unavailable: &[usize]) -> Split {
        let names: Vec<String> = (0..weights.len()).map(|i| format!("c{i}")).collect();
        Split::from_members(weights.iter().enumerate().map(|(i, &weight)| Member {
            cluster: i as ClusterId,
            name: &names[i],
            group: if i < split_at { "v1" } else { "v2" },
            weight,
            available: !unavailable.contains(&i),
            last_resort: false,
        }))
    }

    /// Shares of 100,000 keys per cluster, in percent, against `want`: within a point.
    fn assert_key_shares(split: &Split, want: &[f64]) {
        let n = 100_000u64;
        let mut counts = vec![0usize; want.len()];
        for i in 0..n {
            counts[split.pick_key(key_hash(&i.to_le_bytes())).unwrap() as usize] += 1;
        }
        let got: Vec<f64> = counts
            .iter()
            .map(|&c| c as f64 * 100.0 / n as f64)
            .collect();
        for (c, want) in want.iter().enumerate() {
            assert!(
                (got[c] - want).abs() < 1.0,
                "cluster {c}: {got:?}, want {want:?}"
            );
        }
    }

    /// The keys of a cluster that cannot take requests stay in its revision, spread over the
    /// clusters of it that can by weight; when none can, they go to the other revision.
    #[test]
    fn a_missing_clusters_keys_stay_in_its_revision() {
        // v1: c0 30, c1 20, c2 10; v2: c3 40. c1's 20 go to c0 and c2 as 30 : 10.
        let weights = [30, 20, 10, 40];
        assert_key_shares(
            &grouped_without(&weights, 3, &[1]),
            &[45.0, 0.0, 15.0, 40.0],
        );
        // The whole of v1 out: all its keys to v2.
        assert_key_shares(
            &grouped_without(&weights, 3, &[0, 1, 2]),
            &[0.0, 0.0, 0.0, 100.0],
        );
        // v2 out: its keys over v1 by weight.
        assert_key_shares(
            &grouped_without(&weights, 3, &[3]),
            &[50.0, 33.3, 16.7, 0.0],
        );
        // Random picks spread c1's share over all that can take requests, v2 included.
        let split = grouped_without(&weights, 3, &[1]);
        assert_eq!(
            split.entries().collect::<Vec<_>>(),
            [(0, 30), (2, 10), (3, 40)]
        );
    }

    /// Members all at weight 0 count as 1 each, for homes too: one going out moves only its keys.
    /// Unavailable members with weight and available ones all at 0: requests share the available
    /// ones equally (the app stays up) and so do the keys; nothing available: nothing picked.
    #[test]
    fn zero_weights_and_missing_members() {
        let all = grouped(&[0, 0, 0], 1);
        let rest = grouped_without(&[0, 0, 0], 1, &[0]);
        let mut kept = 0;
        for i in 0..2000u64 {
            let key = key_hash(&i.to_le_bytes());
            let was = all.pick_key(key).unwrap();
            if was != 0 {
                assert_eq!(rest.pick_key(key), Some(was), "key {key:#x}");
                kept += 1;
            }
        }
        assert!(kept > 1000, "{kept}");
        let split = grouped_without(&[0, 100], 1, &[1]);
        assert_eq!(split.entries().collect::<Vec<_>>(), [(0, 1)]);
        assert_eq!(split.pick_key(7), Some(0));
        assert_eq!(split.pick_key(u64::MAX), Some(0));
        let none = grouped_without(&[100], 1, &[0]);
        assert!(none.is_empty());
        assert_eq!((none.pick(3), none.pick_key(3)), (None, None));
    }

    #[test]
    fn sticky_keys_spread_over_a_revision_by_weight() {
        let split = grouped(&[50, 30, 20], 3);
        let n = 100_000u64;
        let mut counts = [0usize; 3];
        for i in 0..n {
            counts[split.pick_key(key_hash(&i.to_le_bytes())).unwrap() as usize] += 1;
        }
        for (c, want) in [50.0, 30.0, 20.0].into_iter().enumerate() {
            let share = counts[c] as f64 * 100.0 / n as f64;
            assert!((share - want).abs() < 1.0, "cluster {c} got {share}%");
        }
    }

    /// Sticky keys follow cluster names, not ids (which shift as clusters come and go).
    #[test]
    fn sticky_keys_follow_names() {
        let member = |cluster, name| Member {
            cluster,
            name,
            group: "v1",
            weight: 50,
            available: true,
            last_resort: false,
        };
        let a = Split::from_members([member(0, "blue"), member(1, "green")]);
        let b = Split::from_members([member(7, "blue"), member(3, "green")]);
        for i in 0..1000u64 {
            let key = key_hash(&i.to_le_bytes());
            let on_blue = |s: &Split, blue| s.pick_key(key) == Some(blue);
            assert_eq!(on_blue(&a, 0), on_blue(&b, 7), "key {key:#x}");
        }
    }

    /// Stability guard, computed once with this implementation: replicas of different versions
    /// behind one load balancer must send a key to the same cluster.
    #[test]
    fn sticky_picks_are_stable() {
        let split = grouped(&[40, 30, 30], 3);
        let picks: String = (0..32u64)
            .map(|i| {
                let key = key_hash(format!("session-{i}").as_bytes());
                char::from(b'0' + split.pick_key(key).unwrap() as u8)
            })
            .collect();
        assert_eq!(picks, GOLDEN_PICKS);
    }

    const GOLDEN_PICKS: &str = "21200202220000010020120212212201";

    /// The same for keys whose home cannot take requests: c1 out, its keys over c0 and c2 of its
    /// revision; v1 out, its keys over v2's c3 and c4.
    #[test]
    fn homeless_picks_are_stable() {
        let weights = [30, 20, 10, 25, 15];
        let picks = |out: &[usize]| -> String {
            let split = grouped_without(&weights, 3, out);
            (0..32u64)
                .map(|i| {
                    let key = key_hash(format!("session-{i}").as_bytes());
                    char::from(b'0' + split.pick_key(key).unwrap() as u8)
                })
                .collect()
        };
        assert_eq!(picks(&[1]), GOLDEN_HOMELESS[0]);
        assert_eq!(picks(&[0, 1, 2]), GOLDEN_HOMELESS[1]);
    }

    const GOLDEN_HOMELESS: [&str; 2] = [
        "30233434420030303020030333343303",
        "33433434433433333433434333343333",
    ];
}
