//! Weighted split of an app's traffic over the clusters of its shard.
//!
//! A pick maps a 64-bit value onto cumulative weight intervals, like Envoy's weighted_clusters.
//! Fed a random value it splits by weight; fed the hash of a stable key it is sticky, and as a
//! shift grows the last cluster's weight (the others shrinking, the total fixed) a key moves to
//! the last cluster at most once and never back.

use super::ClusterId;

/// The clusters an app's requests go to, with their weights, in the control plane's order
/// (older revision first, shift target last).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Split {
    /// `(cumulative weight up to and including this entry, cluster)`; cumulative weights strictly
    /// increase, so no entry has weight 0.
    entries: Box<[(u32, ClusterId)]>,
}

// === impl Split ===

impl Split {
    /// Builds a split from `(cluster, weight)` pairs, in order.
    ///
    /// Zero-weight clusters are dropped, except when every cluster given has weight 0: then each
    /// gets weight 1, so an app stays available when the clusters holding its weight are not
    /// eligible. Weights adding past `u32::MAX` are cut there (entries beyond get nothing).
    pub fn from_weights(entries: impl IntoIterator<Item = (ClusterId, u32)>) -> Split {
        let given: Vec<(ClusterId, u32)> = entries.into_iter().collect();
        let all_zero = given.iter().all(|&(_, weight)| weight == 0);
        let mut cumulative = 0u32;
        let mut out = Vec::with_capacity(given.len());
        for (cluster, weight) in given {
            let weight = if all_zero { 1 } else { weight };
            let next = cumulative.saturating_add(weight);
            if next > cumulative {
                cumulative = next;
                out.push((cumulative, cluster));
            }
        }
        Split {
            entries: out.into_boxed_slice(),
        }
    }

    /// The cluster for `x`: a random value for a weighted split, or a key's [`key_hash`] for a
    /// sticky one. `None` when the split is empty.
    ///
    /// `x` scales to a point in `[0, total)` and the first entry whose cumulative weight exceeds
    /// it is chosen.
    ///
    /// [`key_hash`]: super::key_hash
    #[inline]
    pub fn pick(&self, x: u64) -> Option<ClusterId> {
        let point = ((x as u128 * self.total() as u128) >> 64) as u32;
        self.entries
            .iter()
            .find(|&&(end, _)| end > point)
            .map(|&(_, cluster)| cluster)
    }

    /// Like [`pick`](Self::pick) over the split without `exclude` (a cluster that just failed), for
    /// a retry: `None` when no other cluster is in the split.
    pub fn pick_excluding(&self, x: u64, exclude: ClusterId) -> Option<ClusterId> {
        let mut start = 0;
        let mut others = 0u32;
        for &(end, cluster) in &self.entries {
            if cluster != exclude {
                others += end - start;
            }
            start = end;
        }
        if others == 0 {
            return None;
        }
        let point = ((x as u128 * others as u128) >> 64) as u32;
        let (mut start, mut seen) = (0, 0u32);
        for &(end, cluster) in &self.entries {
            let weight = end - start;
            start = end;
            if cluster == exclude {
                continue;
            }
            seen += weight;
            if seen > point {
                return Some(cluster);
            }
        }
        None
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
        self.entries.last().map_or(0, |&(end, _)| end)
    }

    /// The `(cluster, weight)` pairs, in order; every weight is above 0.
    pub fn entries(&self) -> impl Iterator<Item = (ClusterId, u32)> + '_ {
        let starts = std::iter::once(0).chain(self.entries.iter().map(|&(end, _)| end));
        self.entries
            .iter()
            .zip(starts)
            .map(|(&(end, cluster), start)| (cluster, end - start))
    }
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
                for (k, &key) in keys.iter().enumerate() {
                    let picked = split.pick(key).expect("total is 100");
                    if on_last[k] {
                        prop_assert_eq!(picked, last, "key {:#x} left the last cluster at {:?}", key, weights);
                    }
                    on_last[k] = picked == last;
                }
            }
        }
    }
}
