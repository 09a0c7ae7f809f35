//! App -> shard placement by weighted rendezvous (highest random weight) hashing.
//!
//! Each shard scores every app; the app goes to the highest score. Adding a shard moves only the
//! apps it now wins (about `w_new / W` of them), removing one moves only its own apps, and no
//! table has to be rebuilt or agreed on: every replica computes the same answer from the names.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::hash::{unit_interval, FIXED_SEED};
use super::ShardId;

/// The shards apps are placed on, with each shard's seed precomputed.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// One candidate per shard, in declaration order (a [`ShardId`] indexes it).
    candidates: Vec<Candidate>,
    /// Shard names, by [`ShardId`].
    names: Vec<Box<str>>,
}

/// One shard as seen by the scoring loop.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    /// `xxh3_64_with_seed(shard name, FIXED_SEED)`: the seed the shard hashes app names with.
    seed: u64,
    /// The shard's weight; 0 when the declared weight was not a finite number above 0.
    weight: f64,
}

/// `1 + 2^-40`: how far a shard's score bound must stay under the best score to skip its logarithm.
const PRUNE_MARGIN: f64 = 1.0 + 1.0 / (1u64 << 40) as f64;

// === impl Placement ===

impl Placement {
    /// Declares the shards as `(name, weight)` pairs, in [`ShardId`] order.
    ///
    /// A weight that is not a finite number above 0 takes the shard out of placement (the table
    /// builder rejects such weights before they get here).
    pub fn new<'a>(shards: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        let (candidates, names) = shards
            .into_iter()
            .map(|(name, weight)| {
                let weight = if weight.is_finite() && weight > 0.0 {
                    weight
                } else {
                    0.0
                };
                let seed = xxh3_64_with_seed(name.as_bytes(), FIXED_SEED);
                (Candidate { seed, weight }, Box::from(name))
            })
            .unzip();
        Placement { candidates, names }
    }

    /// The shard `app` is placed on; `None` when no shard can take apps.
    ///
    /// Shard `s` scores `-weight_s / ln(u)`, where `h = xxh3_64_with_seed(app, seed_s)` and
    /// `u = ((h >> 12) + 0.5) / 2^52`, exactly, strictly inside (0, 1); the highest score wins, the
    /// lower index on a tie. Everything but `f64::ln` is exact integer or IEEE arithmetic, so the result is
    /// the same on every machine; a libm that rounds `ln` differently in the last bit could only
    /// flip apps whose two best scores are within one ulp of each other (odds about 2^-50 per app).
    pub fn place(&self, app: &str) -> Option<ShardId> {
        let mut best: Option<(usize, f64)> = None;
        for (i, candidate) in self.candidates.iter().enumerate() {
            if candidate.weight == 0.0 {
                continue;
            }
            let u = unit_interval(xxh3_64_with_seed(app.as_bytes(), candidate.seed));
            if let Some((_, top)) = best {
                // ln(u) <= u - 1, so the score is at most weight / (1 - u). When even that cannot
                // beat the best score, skip the logarithm: after the first few shards, most of
                // them. The 2^-40 margin dwarfs the rounding of `ln`, the division and this test,
                // so a skipped shard could never have won: the result is the plain formula's.
                if candidate.weight * PRUNE_MARGIN <= top * (1.0 - u) {
                    continue;
                }
            }
            let score = -candidate.weight / u.ln();
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i as ShardId)
    }

    /// The number of shards declared.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// Whether no shard is declared.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// The name of shard `id`. Panics if `id` is not a declared shard.
    pub fn name(&self, id: ShardId) -> &str {
        &self.names[id as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn equal(names: &[&str]) -> Placement {
        Placement::new(names.iter().map(|n| (*n, 1.0)))
    }

    fn app_names(n: usize, tag: u64) -> Vec<String> {
        (0..n).map(|i| format!("app-{tag}-{i}")).collect()
    }

    fn counts(placement: &Placement, apps: &[String]) -> Vec<usize> {
        let mut counts = vec![0; placement.len()];
        for app in apps {
            counts[placement.place(app).expect("shards declared") as usize] += 1;
        }
        counts
    }

    #[test]
    fn golden_placements_are_stable() {
        // Stability guard: these shards were computed once. If this test fails, the hash, the
        // seed or the scoring changed, and every gateway replica on another build would route
        // these apps to other shards than this build does.
        let placement = equal(&["shard-a", "shard-b", "shard-c", "shard-d"]);
        for (app, shard) in GOLDEN {
            assert_eq!(placement.place(app), Some(shard), "app {app}");
        }
        let weighted = Placement::new([("shard-a", 1.0), ("shard-b", 3.0), ("shard-c", 0.5)]);
        for (app, shard) in GOLDEN_WEIGHTED {
            assert_eq!(weighted.place(app), Some(shard), "app {app}");
        }
    }

    /// Computed once with this code and cross-checked against the C xxHash library (Python
    /// `xxhash` 4.1) evaluating the same formula.
    const GOLDEN: [(&str, ShardId); 8] = [
        ("fraud-detector", 1),
        ("llm-chat", 3),
        ("/team-17/model-423", 0),
        ("summarizer", 0),
        ("embeddings", 0),
        ("image-classifier", 2),
        ("ranker-v2", 0),
        ("", 3),
    ];

    /// As [`GOLDEN`], over shards weighted 1, 3 and 0.5.
    const GOLDEN_WEIGHTED: [(&str, ShardId); 6] = [
        ("fraud-detector", 1),
        ("llm-chat", 1),
        ("summarizer", 1),
        ("ranker-v2", 1),
        ("embeddings", 1),
        ("image-classifier", 2),
    ];

    /// The scoring loop without the bound that skips logarithms.
    fn place_plainly(placement: &Placement, app: &str) -> Option<ShardId> {
        let mut best: Option<(usize, f64)> = None;
        for (i, candidate) in placement.candidates.iter().enumerate() {
            if candidate.weight == 0.0 {
                continue;
            }
            let u = unit_interval(xxh3_64_with_seed(app.as_bytes(), candidate.seed));
            let score = -candidate.weight / u.ln();
            if best.is_none_or(|(_, top)| score > top) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i as ShardId)
    }

    #[test]
    fn skipping_logarithms_changes_nothing() {
        let mut rng = fastrand::Rng::with_seed(7);
        let names: Vec<String> = (0..64).map(|i| format!("shard-{i}")).collect();
        for round in 0..8 {
            let placement = Placement::new(names.iter().map(|n| {
                let weight = match round {
                    0 => 1.0,
                    _ => (rng.f64() * 12.0 - 6.0).exp(),
                };
                (n.as_str(), weight)
            }));
            for app in app_names(5_000, round) {
                assert_eq!(
                    placement.place(&app),
                    place_plainly(&placement, &app),
                    "app {app}"
                );
            }
        }
    }

    #[test]
    fn no_shards_places_nothing() {
        let placement = Placement::new([]);
        assert!(placement.is_empty());
        assert_eq!(placement.place("app"), None);
    }

    #[test]
    fn one_shard_takes_everything() {
        let placement = equal(&["only"]);
        for app in app_names(100, 0) {
            assert_eq!(placement.place(&app), Some(0));
        }
        assert_eq!(placement.name(0), "only");
    }

    #[test]
    fn invalid_weights_take_a_shard_out() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let placement = Placement::new([("bad", bad), ("good", 1.0)]);
            for app in app_names(200, 1) {
                assert_eq!(placement.place(&app), Some(1), "weight {bad}");
            }
            assert_eq!(Placement::new([("bad", bad)]).place("app"), None);
        }
    }

    #[test]
    fn equal_shards_balance() {
        let placement = equal(&["s0", "s1", "s2", "s3"]);
        let counts = counts(&placement, &app_names(10_000, 2));
        for (shard, count) in counts.iter().enumerate() {
            assert!(
                (2250..=2750).contains(count),
                "shard {shard}: {count} apps, {counts:?}"
            );
        }
    }

    #[test]
    fn weight_two_gets_twice_the_apps() {
        let placement = Placement::new([("light-0", 1.0), ("heavy", 2.0), ("light-1", 1.0)]);
        let counts = counts(&placement, &app_names(10_000, 3));
        // Expected 2,500 / 5,000 / 2,500.
        assert!((4500..=5500).contains(&counts[1]), "{counts:?}");
        for light in [counts[0], counts[2]] {
            assert!((2250..=2750).contains(&light), "{counts:?}");
            let ratio = counts[1] as f64 / light as f64;
            assert!((1.7..=2.3).contains(&ratio), "ratio {ratio}, {counts:?}");
        }
    }

    /// Distinct shard names with weights.
    fn shards() -> impl Strategy<Value = Vec<(String, f64)>> {
        prop::collection::hash_set("[a-z]{1,8}", 1..8).prop_flat_map(|names| {
            let n = names.len();
            (
                Just(names.into_iter().collect::<Vec<_>>()),
                prop::collection::vec(prop::sample::select(vec![0.5, 1.0, 2.0, 3.0]), n),
            )
                .prop_map(|(names, weights)| names.into_iter().zip(weights).collect())
        })
    }

    fn placement_of(shards: &[(String, f64)]) -> Placement {
        Placement::new(shards.iter().map(|(n, w)| (n.as_str(), *w)))
    }

    fn place_name<'a>(placement: &'a Placement, app: &str) -> &'a str {
        placement.name(placement.place(app).expect("shards declared"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn adding_a_shard_moves_only_its_share_onto_it(
            shards in shards(),
            new_name in "new-[a-z]{1,6}",
            new_weight in prop::sample::select(vec![0.5, 1.0, 2.0]),
            tag in any::<u64>(),
        ) {
            let apps = app_names(3000, tag);
            let before = placement_of(&shards);
            let mut grown = shards.clone();
            grown.push((new_name.clone(), new_weight));
            let after = placement_of(&grown);

            let mut moved = 0usize;
            for app in &apps {
                let (was, now) = (place_name(&before, app), place_name(&after, app));
                if was != now {
                    prop_assert_eq!(now, new_name.as_str(), "app {} moved between old shards", app);
                    moved += 1;
                }
            }
            // Every app the new shard wins moves; it wins about w_new / W of them.
            let total: f64 = grown.iter().map(|(_, w)| w).sum();
            let p = new_weight / total;
            let observed = moved as f64 / apps.len() as f64;
            let tolerance = 5.0 * (p * (1.0 - p) / apps.len() as f64).sqrt() + 0.005;
            prop_assert!((observed - p).abs() <= tolerance, "moved {observed}, expected {p}");
        }

        #[test]
        fn removing_a_shard_moves_only_its_apps(
            shards in shards().prop_filter("need two shards", |s| s.len() >= 2),
            removed in any::<prop::sample::Index>(),
            tag in any::<u64>(),
        ) {
            let apps = app_names(2000, tag);
            let removed = removed.index(shards.len());
            let before = placement_of(&shards);
            let mut shrunk = shards.clone();
            let (gone, _) = shrunk.remove(removed);
            let after = placement_of(&shrunk);
            for app in &apps {
                let was = place_name(&before, app);
                if was != gone {
                    prop_assert_eq!(place_name(&after, app), was, "app {} moved", app);
                }
            }
        }
    }
}
