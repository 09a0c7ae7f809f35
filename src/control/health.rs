//! Passive health: clusters failing request after request leave the split between probes.
//!
//! The request path only counts failures in a row (an atomic per cluster); the control task looks
//! at the counts on its clock. A cluster with `passive_health.consecutive_failures` failures in a
//! row is ejected for `base_ejection`, doubling with each ejection in a row up to `max_ejection`,
//! and comes back once that time is over and its probes succeed. A cluster is ejected only while
//! every application it serves has another cluster of its shard the routing table would use
//! (ready, not ejected, not draining after a promoted shift), and comes back early as soon as one
//! of them has none left: a struggling cluster beats none. Shift analysis still sees every error.

use tokio::time::Instant;

use super::{ClusterEntry, Desired};
use crate::discovery::probe::ProbeReport;
use crate::telemetry;

impl Desired {
    /// Ejects and returns clusters; true when the routing table must be republished.
    pub(super) fn passive_health(&mut self, now: Instant) -> bool {
        let policy = self.config.passive_health.clone();
        if policy.consecutive_failures == 0 {
            return false;
        }
        let mut changed = false;
        for i in 0..self.clusters.len() {
            let entry = &self.clusters[i];
            let probe_ready = entry.probe.as_ref().is_some_and(ProbeReport::ready);
            match entry.ejected_until {
                Some(until) => {
                    // Back when its time is over, or at once when no other cluster serves its
                    // applications any more (the others went unready since): the last one left
                    // is never kept out.
                    if probe_ready && (now >= until || !self.has_substitute(i)) {
                        let early = now < until;
                        let entry = &mut self.clusters[i];
                        entry.ejected_until = None;
                        entry.returned_at = Some(now);
                        entry.cluster.stats.reset_consecutive_failures();
                        if early {
                            tracing::warn!(cluster = %entry.config.name, "cluster back from passive-health ejection early: no other cluster of its shard serves its applications");
                        } else {
                            tracing::info!(cluster = %entry.config.name, "cluster back from passive-health ejection");
                        }
                        changed = true;
                    }
                }
                None => {
                    // A cluster that stayed healthy for max_ejection starts its doubling afresh.
                    if entry
                        .returned_at
                        .is_some_and(|t| now.duration_since(t) >= policy.max_ejection)
                    {
                        let entry = &mut self.clusters[i];
                        entry.ejections = 0;
                        entry.returned_at = None;
                    }
                    let entry = &self.clusters[i];
                    let failures = entry.cluster.stats.consecutive_failures();
                    if failures < u64::from(policy.consecutive_failures) || !probe_ready {
                        continue;
                    }
                    if !self.has_substitute(i) {
                        continue;
                    }
                    let entry = &mut self.clusters[i];
                    let factor = 1u32 << entry.ejections.min(16);
                    let time = policy
                        .base_ejection
                        .saturating_mul(factor)
                        .min(policy.max_ejection);
                    entry.ejected_until = Some(now + time);
                    entry.ejections += 1;
                    entry.cluster.stats.reset_consecutive_failures();
                    metrics::counter!(telemetry::CLUSTER_EJECTIONS_TOTAL, "cluster" => entry.config.name.clone())
                        .increment(1);
                    tracing::warn!(
                        cluster = %entry.config.name, failures, ejection = ?time,
                        "cluster ejected by passive health"
                    );
                    changed = true;
                }
            }
        }
        changed
    }

    /// Whether cluster `i` may leave the split: every application it lists in `/-/routes` is
    /// listed, at the same prefix, by another cluster of its shard that the routing table would
    /// use (ready, not ejected, not draining after a promoted shift). Without applications, any
    /// such cluster will do.
    fn has_substitute(&self, i: usize) -> bool {
        let entry = &self.clusters[i];
        let shard = &entry.config.shard;
        let weights = self.shard_weights(shard);
        let others: Vec<&ClusterEntry> = self
            .clusters
            .iter()
            .enumerate()
            .filter(|&(j, c)| {
                j != i
                    && c.config.shard == *shard
                    && c.serving_ready()
                    && self
                        .drain_of(
                            shard,
                            &c.config.name,
                            weights.get(c.config.name.as_str()).copied().unwrap_or(0),
                        )
                        .is_none()
            })
            .map(|(_, c)| c)
            .collect();
        !others.is_empty()
            && entry.last_routes.iter().all(|(prefix, app)| {
                others
                    .iter()
                    .any(|c| c.last_routes.get(prefix) == Some(app))
            })
    }
}
