//! Property tests of the routing invariants, through the public API only (`rayshift::routing`).
//!
//! The routing module's unit tests check its parts from the inside; these check what the rest of the
//! gateway relies on, on whole routing tables where possible: the longest matching route prefix
//! wins; an app's shard depends only on its name and the shard set, and a new shard takes only apps
//! onto itself; a split divides traffic by weight; a sticky key that reached the shift target stays
//! there while the target's weight grows; a retry never goes back to the excluded cluster.
//!
//! Case counts are modest so each property stays well under a second in a debug build.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use proptest::prelude::*;
use rayshift::routing::{
    key_hash, prefix_matches, AppId, AppSpec, ClusterId, ClusterSpec, Placement, PrefixMatcher,
    RoutingTable, ShardSpec, Split, TableSpec,
};
use rayshift::shift::machine::{Shift, Target};
use rayshift::shift::ShiftPolicy;

// --- generators ---

/// A path segment as Serve apps use them, with the odd non-ASCII or empty one.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-c]{1,3}",
        1 => "(team|model)-[0-9]",
        1 => Just("é".to_string()),
        1 => Just(String::new()),
    ]
}

/// A path: `/` followed by segments joined with `/`, sometimes with a trailing `/`.
fn path() -> impl Strategy<Value = String> {
    (prop::collection::vec(segment(), 0..4), any::<bool>()).prop_map(|(segments, trailing)| {
        let mut p = format!("/{}", segments.join("/"));
        if trailing && !p.ends_with('/') {
            p.push('/');
        }
        p
    })
}

/// Distinct shard names with weights.
fn shards(max: usize) -> impl Strategy<Value = Vec<ShardSpec>> {
    prop::collection::btree_set("[a-z]{1,6}", 1..=max).prop_flat_map(|names| {
        let n = names.len();
        prop::collection::vec(prop::sample::select(vec![0.5, 1.0, 1.0, 2.0, 3.0]), n).prop_map(
            move |weights| {
                names
                    .iter()
                    .zip(weights)
                    .map(|(name, weight)| ShardSpec {
                        name: name.clone(),
                        weight,
                    })
                    .collect()
            },
        )
    })
}

/// Weights of `2..=max` clusters summing to 100.
fn weights_summing_to_100(max: usize) -> impl Strategy<Value = Vec<u32>> {
    prop::collection::vec(0u32..=100, 1..max).prop_map(|mut cuts| {
        cuts.sort_unstable();
        let mut weights = Vec::with_capacity(cuts.len() + 1);
        let mut previous = 0;
        for cut in cuts.into_iter().chain([100]) {
            weights.push(cut - previous);
            previous = cut;
        }
        weights
    })
}

// --- helpers ---

/// The longest prefix matching `path` by Serve's rule (the reference `prefix_matches`).
fn brute_force(prefixes: &[String], path: &str) -> Option<AppId> {
    let mut best: Option<(usize, AppId)> = None;
    for (i, p) in prefixes.iter().enumerate() {
        if prefix_matches(p, path) && best.is_none_or(|(len, _)| p.len() > len) {
            best = Some((p.len(), i as AppId));
        }
    }
    best.map(|(_, app)| app)
}

/// `n` values spread evenly over the whole `u64` range.
fn spread(n: u64) -> impl Iterator<Item = u64> {
    let step = u64::MAX / n + 1;
    (0..n).map(move |i| i * step)
}

/// A one-shard table with one app `app` at `/app`, served by ready clusters `c0..` with `weights`,
/// each of its own revision.
fn one_app_table(weights: &[u32]) -> RoutingTable {
    one_app_table_of(weights, |i| format!("v{i}"))
}

/// Like [`one_app_table`], cluster `c<i>` of revision `revision(i)`.
fn one_app_table_of(weights: &[u32], revision: impl Fn(usize) -> String) -> RoutingTable {
    let spec = TableSpec {
        shards: vec![ShardSpec::new("shard-0")],
        clusters: weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| ClusterSpec {
                name: format!("c{i}"),
                shard: 0,
                weight,
                revision: revision(i),
                ready: true,
                draining: false,
                apps: vec!["app".into()],
            })
            .collect(),
        apps: vec![AppSpec {
            name: "app".into(),
            route_prefix: "/app".into(),
            pinned_shard: None,
        }],
    };
    RoutingTable::build(&spec).expect("valid spec")
}

/// Apps `app-{tag}-{i}` at `/p{i}`, unpinned.
fn unpinned_apps(n: usize, tag: u64) -> Vec<AppSpec> {
    (0..n)
        .map(|i| AppSpec {
            name: format!("app-{tag}-{i}"),
            route_prefix: format!("/p{i}"),
            pinned_shard: None,
        })
        .collect()
}

fn table(shards: Vec<ShardSpec>, apps: Vec<AppSpec>) -> RoutingTable {
    RoutingTable::build(&TableSpec {
        shards,
        clusters: vec![],
        apps,
    })
    .expect("valid spec")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A table routes every path to the app with the longest matching route prefix, and the app it
    /// names has a prefix that matches the path.
    #[test]
    fn table_lookup_is_the_longest_matching_prefix(
        prefixes in prop::collection::btree_set(path(), 1..10),
        paths in prop::collection::vec(path(), 1..10),
    ) {
        let prefixes: Vec<String> = prefixes.into_iter().collect();
        let spec = TableSpec {
            shards: vec![ShardSpec::new("shard-0")],
            clusters: vec![],
            apps: prefixes
                .iter()
                .enumerate()
                .map(|(i, p)| AppSpec { name: format!("app-{i}"), route_prefix: p.clone(), pinned_shard: None })
                .collect(),
        };
        let table = RoutingTable::build(&spec).expect("distinct prefixes starting with /");
        let probes = paths
            .iter()
            .cloned()
            .chain(prefixes.iter().flat_map(|p| paths.iter().map(move |q| format!("{p}{q}"))))
            .chain(prefixes.iter().cloned());
        for path in probes {
            let hit = table.lookup(&path);
            prop_assert_eq!(hit.map(|h| h.app_id), brute_force(&prefixes, &path), "path {:?}", path);
            if let Some(hit) = hit {
                prop_assert!(prefix_matches(&hit.app.route_prefix, &path));
            }
        }
    }

    /// `PrefixMatcher` on its own, with repeated prefixes (the first holder keeps one) and paths
    /// that are not URL paths at all.
    #[test]
    fn matcher_agrees_with_brute_force_on_any_text(
        prefixes in prop::collection::vec(prop_oneof![path(), "[/a.é]{0,4}"], 0..10),
        paths in prop::collection::vec(prop_oneof![path(), "[/a.é]{0,6}"], 0..10),
    ) {
        let matcher = PrefixMatcher::new(prefixes.iter().enumerate().map(|(i, p)| (p.as_str(), i as AppId)));
        prop_assert_eq!(matcher.len(), prefixes.iter().collect::<HashSet<_>>().len());
        for path in paths.iter().chain(&prefixes) {
            prop_assert_eq!(matcher.lookup(path), brute_force(&prefixes, path), "path {:?}", path);
        }
    }

    /// An app's shard is a function of its name and the shard set: the same in every table built,
    /// whatever the order the shards are declared in, and equal to `Placement::place`.
    #[test]
    fn placement_is_stable(shards in shards(6), tag in any::<u64>(), rotate in any::<prop::sample::Index>()) {
        let apps = unpinned_apps(100, tag);
        let first = table(shards.clone(), apps.clone());
        let again = table(shards.clone(), apps.clone());
        let mut reordered = shards.clone();
        reordered.rotate_left(rotate.index(shards.len()));
        reordered.reverse();
        let other_order = table(reordered, apps.clone());
        let placement = Placement::new(shards.iter().map(|s| (s.name.as_str(), s.weight)));
        for (id, app) in apps.iter().enumerate() {
            let id = id as AppId;
            let shard = first.shard_name(first.app(id).shard);
            prop_assert_eq!(shard, again.shard_name(again.app(id).shard));
            prop_assert_eq!(shard, other_order.shard_name(other_order.app(id).shard), "app {}", &app.name);
            prop_assert_eq!(Some(first.app(id).shard), placement.place(&app.name));
        }
    }

    /// Adding a shard moves only apps onto the new shard, about its share of them.
    #[test]
    fn adding_a_shard_moves_apps_only_onto_it(
        shards in shards(6),
        new_weight in prop::sample::select(vec![0.5, 1.0, 2.0]),
        tag in any::<u64>(),
    ) {
        let apps = unpinned_apps(400, tag);
        let before = table(shards.clone(), apps.clone());
        let mut grown = shards.clone();
        grown.push(ShardSpec { name: "new-shard".into(), weight: new_weight });
        let after = table(grown.clone(), apps.clone());
        let mut moved = 0;
        for id in 0..apps.len() as AppId {
            let (was, now) = (before.shard_name(before.app(id).shard), after.shard_name(after.app(id).shard));
            if was != now {
                prop_assert_eq!(now, "new-shard", "app {} moved between old shards", &apps[id as usize].name);
                moved += 1;
            }
        }
        let total: f64 = grown.iter().map(|s| s.weight).sum();
        let p = new_weight / total;
        let n = apps.len() as f64;
        let tolerance = 5.0 * (p * (1.0 - p) / n).sqrt() + 0.01;
        prop_assert!((moved as f64 / n - p).abs() <= tolerance, "moved {} of {}, expected share {}", moved, n, p);
    }

    /// Pinned apps stay on their pin; the others are where placement puts them, and a lookup under
    /// their prefix reports that shard.
    #[test]
    fn lookup_shard_is_the_pin_or_the_placement(
        shards in shards(5),
        pins in prop::collection::vec(prop::option::weighted(0.3, any::<prop::sample::Index>()), 1..30),
        tag in any::<u64>(),
    ) {
        let apps: Vec<AppSpec> = pins
            .iter()
            .enumerate()
            .map(|(i, pin)| AppSpec {
                name: format!("app-{tag}-{i}"),
                route_prefix: format!("/team/{i}"),
                pinned_shard: pin.map(|p| p.index(shards.len()) as u32),
            })
            .collect();
        let placement = Placement::new(shards.iter().map(|s| (s.name.as_str(), s.weight)));
        let table = table(shards.clone(), apps.clone());
        for (id, app) in apps.iter().enumerate() {
            let want = app.pinned_shard.or_else(|| placement.place(&app.name));
            prop_assert_eq!(Some(table.app(id as AppId).shard), want);
            let hit = table.lookup(&format!("{}/predict", app.route_prefix)).expect("routable");
            prop_assert_eq!(hit.app_id, id as AppId);
            prop_assert_eq!(Some(hit.shard), want);
        }
    }

    /// Evenly spread values split by weight to within one request per cluster; hashed keys to within
    /// a few standard deviations.
    #[test]
    fn split_follows_the_weights(weights in weights_summing_to_100(6), salt in any::<u64>()) {
        let table = one_app_table(&weights);
        let split = table.lookup("/app/x").expect("routable").split;
        let n = 10_000u64;
        let mut even = vec![0u64; weights.len()];
        let mut hashed = vec![0u64; weights.len()];
        for (i, x) in spread(n).enumerate() {
            even[split.pick(x).expect("total is 100") as usize] += 1;
            let key = key_hash(format!("session-{salt}-{i}").as_bytes());
            hashed[split.pick_key(key).expect("total is 100") as usize] += 1;
        }
        for (c, &w) in weights.iter().enumerate() {
            let expected = n as f64 * f64::from(w) / 100.0;
            prop_assert!((even[c] as f64 - expected).abs() <= 1.0 + 1e-6, "cluster {} weight {}: {} of {}", c, w, even[c], n);
            let p = f64::from(w) / 100.0;
            let sigma = (n as f64 * p * (1.0 - p)).sqrt();
            prop_assert!((hashed[c] as f64 - expected).abs() <= 5.0 * sigma + 1.0, "cluster {} weight {}: {} hashed of {}", c, w, hashed[c], n);
            if w == 0 {
                prop_assert_eq!(even[c] + hashed[c], 0, "a zero-weight cluster got traffic");
            }
        }
    }

    /// As the shift target (the last cluster, of a newer revision) gains weight step by step,
    /// however the remaining weight is spread over the other clusters (one older revision, or one
    /// revision each), a key that picked the target keeps picking it.
    #[test]
    fn sticky_keys_stay_on_a_growing_target(
        mut target_steps in prop::collection::vec(0u32..=100, 1..10),
        n_others in 1usize..=3,
        shares in prop::collection::vec(prop::collection::vec(1u32..=10, 3), 10),
        salt in any::<u64>(),
        one_old_revision in any::<bool>(),
    ) {
        target_steps.sort_unstable();
        let keys: Vec<u64> = (0..300).map(|i| key_hash(format!("user-{salt}-{i}").as_bytes())).collect();
        let target = n_others as ClusterId;
        let mut on_target = vec![false; keys.len()];
        for (step, &target_weight) in target_steps.iter().enumerate() {
            // Spread 100 - target_weight over the others in proportion to this step's shares.
            let shares = &shares[step][..n_others];
            let rest = 100 - target_weight;
            let share_total: u32 = shares.iter().sum();
            let mut weights: Vec<u32> = shares.iter().map(|s| rest * s / share_total).collect();
            weights[0] += rest - weights.iter().sum::<u32>();
            weights.push(target_weight);
            prop_assert_eq!(weights.iter().sum::<u32>(), 100);
            let table = one_app_table_of(&weights, |i| match i {
                i if i == n_others => "v9".into(),
                _ if one_old_revision => "v1".into(),
                i => format!("v{i}"),
            });
            let split = table.lookup("/app").expect("routable").split;
            for (k, &key) in keys.iter().enumerate() {
                let picked = split.pick_key(key).expect("total is 100");
                if on_target[k] {
                    prop_assert_eq!(picked, target, "key {} left the target at weights {:?}", k, weights);
                }
                on_target[k] = picked == target;
            }
        }
    }

    /// A shift to one cluster of the revision the old clusters have (`to: green`): the shift
    /// machine's own weights, step by step, with every cluster in one revision (so the key picks
    /// by rendezvous among all of them): a key that reached the target stays on it.
    #[test]
    fn sticky_keys_stay_on_a_growing_target_of_their_revision(
        old in prop::collection::vec(1u32..=60, 1..5),
        target_at in 0usize..5,
        mut steps in prop::collection::vec(0u32..=100, 5..25),
        salt in any::<u64>(),
    ) {
        let mut names: Vec<String> = (0..old.len()).map(|i| format!("old-{i}")).collect();
        let target_at = target_at.min(names.len());
        names.insert(target_at, "target".into());
        let mut start: BTreeMap<String, u32> = names
            .iter()
            .filter(|n| *n != "target")
            .zip(&old)
            .map(|(n, &w)| (n.clone(), w))
            .collect();
        start.insert("target".into(), 0);
        let mut shift = Shift::new(
            Target::Cluster("target".into()),
            vec!["target".into()],
            ShiftPolicy::default(),
            start,
        );
        steps.sort_unstable();
        let keys: Vec<u64> = (0..2000).map(|i| key_hash(format!("user-{salt}-{i}").as_bytes())).collect();
        let mut on_target = vec![false; keys.len()];
        for t in steps {
            shift.target_weight = t;
            let weights = shift.weights();
            let in_order: Vec<u32> = names.iter().map(|n| weights[n]).collect();
            let table = one_app_table_of(&in_order, |_| "v1".into());
            let split = table.lookup("/app").expect("routable").split;
            for (k, &key) in keys.iter().enumerate() {
                let picked = split.pick_key(key).map(|c| c as usize);
                if on_target[k] {
                    prop_assert_eq!(picked, Some(target_at), "key {} left the target at {:?}", k, weights);
                }
                on_target[k] = picked == Some(target_at);
            }
        }
    }

    /// A retry never goes to the cluster that failed, splits the rest by their weights, and finds
    /// nothing only when no other cluster is left.
    #[test]
    fn pick_excluding_skips_the_failed_cluster(
        weights in prop::collection::vec(0u32..=100, 1..6),
        exclude in 0u32..7,
    ) {
        let split = Split::from_weights(weights.iter().enumerate().map(|(i, &w)| (i as ClusterId, w)));
        let entries: BTreeMap<ClusterId, u32> = split.entries().collect();
        let others: u64 = entries.iter().filter(|(&c, _)| c != exclude).map(|(_, &w)| u64::from(w)).sum();
        let n = 5_000u64;
        let mut counts: BTreeMap<ClusterId, u64> = BTreeMap::new();
        for x in spread(n) {
            match split.pick_excluding(x, exclude) {
                Some(c) => {
                    prop_assert_ne!(c, exclude);
                    prop_assert!(entries.contains_key(&c), "{} is not in the split", c);
                    *counts.entry(c).or_default() += 1;
                }
                None => prop_assert_eq!(others, 0, "None while other clusters have weight"),
            }
        }
        if others > 0 {
            for (&c, &w) in entries.iter().filter(|(&c, _)| c != exclude) {
                let expected = n as f64 * f64::from(w) / others as f64;
                let got = counts.get(&c).copied().unwrap_or(0) as f64;
                prop_assert!((got - expected).abs() <= 1.0 + 1e-6, "cluster {} weight {}: {} of {}, expected {}", c, w, got, n, expected);
            }
        }
        let picked: BTreeSet<ClusterId> = counts.keys().copied().collect();
        prop_assert!(!picked.contains(&exclude));
    }
}

/// The case that broke largest-remainder rounding: from 40 to 50 on the target, an old cluster
/// of start weight 1 went from 0 back to 1 and took sticky keys off the target.
#[test]
fn a_tiny_old_cluster_never_takes_target_keys_back() {
    let names = ["old-0", "old-1", "old-2", "old-3", "target"];
    let start: BTreeMap<String, u32> = names
        .iter()
        .zip([36, 28, 1, 35, 0])
        .map(|(n, w)| (n.to_string(), w))
        .collect();
    let mut shift = Shift::new(
        Target::Cluster("target".into()),
        vec!["target".into()],
        ShiftPolicy::default(),
        start,
    );
    let keys: Vec<u64> = (0..20_000)
        .map(|i| key_hash(format!("user-{i}").as_bytes()))
        .collect();
    let picks = |shift: &Shift| {
        let weights = shift.weights();
        let in_order: Vec<u32> = names.iter().map(|n| weights[*n]).collect();
        let table = one_app_table_of(&in_order, |_| "v1".into());
        let split = table.lookup("/app").expect("routable").split.clone();
        keys.iter()
            .map(|&k| split.pick_key(k) == Some(4))
            .collect::<Vec<bool>>()
    };
    shift.target_weight = 40;
    let at_40 = picks(&shift);
    shift.target_weight = 50;
    let at_50 = picks(&shift);
    let left = at_40
        .iter()
        .zip(&at_50)
        .filter(|(a, b)| **a && !**b)
        .count();
    assert_eq!(left, 0, "{left} keys left the target between 40 and 50");
    assert!(at_40.iter().filter(|on| **on).count() > 7000);
}
