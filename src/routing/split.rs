//! Weighted split of an app's traffic over the clusters of its shard.
//!
//! Two picks, both by weight:
//!
//! - **Random** ([`Split::pick`]): a random value mapped onto cumulative weight intervals, like
//!   Envoy's weighted_clusters.
//! - **Sticky** ([`Split::pick_key`]): a split key's hash picks by weighted rendezvous hashing:
//!   cluster `i` scores `-weight_i / ln(u_i)`, `u_i` a hash of the key and the cluster's name,
//!   and the highest score wins. Cluster `i` wins for `weight_i / total` of the keys, and a key's
//!   scores move only with weights, never with which other clusters are there:
//!   - as a shift grows the target's weight (the others shrinking) only the target's score grows,
//!     so a key moves to the target at most once and never back; a key moves between two old
//!     clusters only if their weights shrink in different proportions (a shift's steps shrink
//!     them in proportion, up to rounding);
//!   - a cluster that leaves the split (unready, ejected, drained) takes only its own keys with
//!     it, spread over the others by weight, and they come back with it: every other key stays.

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::hash::{unit_interval, FIXED_SEED};
use super::ClusterId;

/// What a request's pick is a function of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Draw {
    /// A random value: requests spread by weight ([`Split::pick`]).
    Random(u64),
    /// A split key's [`key_hash`](super::key_hash): the same key, the same cluster
    /// ([`Split::pick_key`]).
    Key(u64),
}

/// The clusters an app's requests go to, with their weights, in the control plane's order
/// (older revision first, shift target last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Split {
    /// Cumulative weights strictly increase, so no entry has weight 0.
    entries: Box<[Entry]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Entry {
    /// Weight up to and including this entry.
    end: u32,
    cluster: ClusterId,
    /// The cluster's rendezvous seed: a hash of its name, so a key's score on a cluster does not
    /// depend on the cluster's id (which changes as clusters come and go).
    seed: u64,
}

// === impl Split ===

impl Split {
    /// Builds a split from `(cluster, weight)` pairs, in order; each cluster's rendezvous seed is
    /// a hash of its id (see [`from_named`](Self::from_named)).
    pub fn from_weights(entries: impl IntoIterator<Item = (ClusterId, u32)>) -> Split {
        Split::from_seeded(
            entries
                .into_iter()
                .map(|(c, w)| (c, seed_of(&c.to_le_bytes()), w)),
        )
    }

    /// Builds a split from `(cluster, name, weight)`, in order: the table's way, so sticky keys
    /// follow cluster names, not ids.
    pub fn from_named<'a>(entries: impl IntoIterator<Item = (ClusterId, &'a str, u32)>) -> Split {
        Split::from_seeded(
            entries
                .into_iter()
                .map(|(c, name, w)| (c, seed_of(name.as_bytes()), w)),
        )
    }

    /// Zero-weight clusters are dropped, except when every cluster given has weight 0: then each
    /// gets weight 1, so an app stays available when the clusters holding its weight are not
    /// eligible. Weights adding past `u32::MAX` are cut there (entries beyond get nothing).
    fn from_seeded(entries: impl IntoIterator<Item = (ClusterId, u64, u32)>) -> Split {
        let given: Vec<(ClusterId, u64, u32)> = entries.into_iter().collect();
        let all_zero = given.iter().all(|&(_, _, weight)| weight == 0);
        let mut cumulative = 0u32;
        let mut out = Vec::with_capacity(given.len());
        for (cluster, seed, weight) in given {
            let weight = if all_zero { 1 } else { weight };
            let next = cumulative.saturating_add(weight);
            if next > cumulative {
                cumulative = next;
                out.push(Entry {
                    end: cumulative,
                    cluster,
                    seed,
                });
            }
        }
        Split {
            entries: out.into_boxed_slice(),
        }
    }

    /// The cluster for a request: [`pick`](Self::pick) or [`pick_key`](Self::pick_key).
    #[inline]
    pub fn draw(&self, draw: Draw) -> Option<ClusterId> {
        match draw {
            Draw::Random(x) => self.pick(x),
            Draw::Key(key) => self.pick_key(key),
        }
    }

    /// Another cluster than `exclude` (one that just failed) for a retry of a request drawn with
    /// `draw`: `None` when no other cluster is in the split. A sticky key goes where it would if
    /// `exclude` were not in the split.
    pub fn retry(&self, draw: Draw, exclude: ClusterId) -> Option<ClusterId> {
        match draw {
            // The value's other half: independent of where its high bits sent the first try.
            Draw::Random(x) => self.pick_excluding(x.rotate_left(32), exclude),
            Draw::Key(key) => self.rendezvous(key, Some(exclude)),
        }
    }

    /// The cluster for a random value `x`: `x` scales to a point in `[0, total)` and the first
    /// entry whose cumulative weight exceeds it is chosen. `None` when the split is empty.
    #[inline]
    pub fn pick(&self, x: u64) -> Option<ClusterId> {
        let point = ((x as u128 * self.total() as u128) >> 64) as u32;
        self.entries
            .iter()
            .find(|e| e.end > point)
            .map(|e| e.cluster)
    }

    /// The cluster for a split key's [`key_hash`](super::key_hash), by weighted rendezvous (see
    /// the module docs). `None` when the split is empty.
    #[inline]
    pub fn pick_key(&self, key: u64) -> Option<ClusterId> {
        self.rendezvous(key, None)
    }

    /// Like [`pick`](Self::pick) over the split without `exclude`: `None` when no other cluster
    /// is in the split.
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

    /// The highest `-weight / ln(u)` over the clusters other than `exclude`, where
    /// `u = unit_interval(xxh3(key, seed))`; the earlier cluster on a tie. Only `f64::ln` is not
    /// exact IEEE arithmetic: a libm rounding it differently in the last bit could flip only keys
    /// whose two best scores are within one ulp (odds about 2^-50 per key).
    fn rendezvous(&self, key: u64, exclude: Option<ClusterId>) -> Option<ClusterId> {
        let bytes = key.to_le_bytes();
        let mut best: Option<(f64, ClusterId)> = None;
        for (entry, weight) in self.entries.iter().zip(self.weights()) {
            if Some(entry.cluster) == exclude {
                continue;
            }
            let u = unit_interval(xxh3_64_with_seed(&bytes, entry.seed));
            let score = -f64::from(weight) / u.ln();
            if best.is_none_or(|(top, _)| score > top) {
                best = Some((score, entry.cluster));
            }
        }
        best.map(|(_, cluster)| cluster)
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

    /// The weights, in order.
    fn weights(&self) -> impl Iterator<Item = u32> + '_ {
        let starts = std::iter::once(0).chain(self.entries.iter().map(|e| e.end));
        self.entries
            .iter()
            .zip(starts)
            .map(|(e, start)| e.end - start)
    }

    /// The `(cluster, weight)` pairs, in order; every weight is above 0.
    pub fn entries(&self) -> impl Iterator<Item = (ClusterId, u32)> + '_ {
        self.entries
            .iter()
            .zip(self.weights())
            .map(|(e, weight)| (e.cluster, weight))
    }
}

/// A cluster's rendezvous seed from its name (or id bytes).
fn seed_of(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, FIXED_SEED)
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

    #[test]
    fn sticky_keys_split_by_weight_within_one_point() {
        let split = Split::from_weights([(0, 50), (1, 30), (2, 20)]);
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

    /// A sticky key's cluster depends on the clusters' names and weights, not on their ids (which
    /// shift as clusters come and go) nor on their order.
    #[test]
    fn sticky_keys_follow_names() {
        let a = Split::from_named([(0, "blue", 60), (1, "green", 40)]);
        let b = Split::from_named([(7, "green", 40), (3, "blue", 60)]);
        for i in 0..1000u64 {
            let key = key_hash(&i.to_le_bytes());
            let name = |s: &Split, id| match (s == &a, id) {
                (true, Some(0)) | (false, Some(3)) => "blue",
                _ => "green",
            };
            assert_eq!(name(&a, a.pick_key(key)), name(&b, b.pick_key(key)));
        }
    }

    /// Stability guard: computed once with this implementation. Replicas of different versions
    /// behind one load balancer must send a key to the same cluster; a change re-keys sessions.
    #[test]
    fn sticky_picks_are_stable() {
        let split = Split::from_named([(0, "blue", 70), (1, "green", 30)]);
        let picks: String = (0..32u64)
            .map(
                |i| match split.pick_key(key_hash(format!("session-{i}").as_bytes())) {
                    Some(0) => 'b',
                    Some(1) => 'g',
                    _ => '?',
                },
            )
            .collect();
        assert_eq!(picks, GOLDEN_PICKS);
    }

    const GOLDEN_PICKS: &str = "ggggbgbbgbbbbbgbgbbgbgggbggbgbgg";

    #[test]
    fn a_sticky_retry_goes_where_the_key_would_without_the_failed_cluster() {
        let split = Split::from_weights([(0, 40), (1, 30), (2, 30)]);
        for i in 0..2000u64 {
            let key = key_hash(&i.to_le_bytes());
            let first = split.pick_key(key).unwrap();
            let without = Split::from_weights(
                [(0, 40), (1, 30), (2, 30)]
                    .into_iter()
                    .filter(|&(c, _)| c != first),
            );
            assert_eq!(split.retry(Draw::Key(key), first), without.pick_key(key));
            assert_ne!(split.retry(Draw::Random(key), first), Some(first));
        }
        assert_eq!(Split::from_weights([(4, 100)]).retry(Draw::Key(9), 4), None);
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
        /// A cluster leaving the split (unready, ejected) moves only its own keys; the others'
        /// stay, and its keys come back when it returns.
        #[test]
        fn a_leaving_cluster_moves_only_its_own_keys(
            weights in prop::collection::vec(1u32..=100, 2..6),
            leaving in 0usize..6,
            keys in prop::collection::vec(any::<u64>(), 200),
        ) {
            let leaving = (leaving % weights.len()) as ClusterId;
            let all = Split::from_weights(weights.iter().enumerate().map(|(i, &w)| (i as ClusterId, w)));
            let rest = Split::from_weights(
                weights.iter().enumerate().map(|(i, &w)| (i as ClusterId, w)).filter(|&(i, _)| i != leaving),
            );
            for &key in &keys {
                let (was, now) = (all.pick_key(key), rest.pick_key(key));
                prop_assert_ne!(now, Some(leaving));
                if was != Some(leaving) {
                    prop_assert_eq!(was, now, "key {:#x} moved: {:?} without {}", key, weights, leaving);
                }
            }
        }

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
                for (k, &key) in keys.iter().enumerate() {
                    let picked = split.pick_key(key).expect("total is 100");
                    if on_last[k] {
                        prop_assert_eq!(picked, last, "key {:#x} left the last cluster at {:?}", key, weights);
                    }
                    on_last[k] = picked == last;
                }
            }
        }
    }
}
