//! Passive health: clusters failing request after request leave the split between probes.
//!
//! The request path only counts failures in a row (an atomic per cluster); the control task looks
//! at the counts on its clock. A cluster with `passive_health.consecutive_failures` failures in a
//! row is ejected for `base_ejection`, doubling with each ejection in a row up to `max_ejection`,
//! and comes back once that time is over and its probes succeed. A cluster is ejected only while
//! every application it serves has another cluster of its shard the routing table would use
//! (ready, not ejected, not draining after a promoted shift), and comes back early as soon as one
//! of them has none left: a struggling cluster beats none. Shift analysis still sees every error.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::time::Instant;

use super::{ClusterEntry, Desired};
use crate::discovery::probe::ProbeReport;
use crate::routing::AppId;
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
                    if probe_ready && (now >= until || !self.has_substitute(i, true)) {
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
                    if !self.has_substitute(i, false) {
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

    /// Whether cluster `i` may leave the split (`returning`: stay out of it): every application
    /// the routing table sends to it has another cluster of its shard that the table would use
    /// instead (ready, not ejected, not draining after a promoted shift). Without such
    /// applications, any such cluster will do.
    ///
    /// The applications are the published table's, not the raw `/-/routes`: a pair the table
    /// gives the cluster none of (the app served at another prefix, or placed on another shard)
    /// needs no substitute. An ejected cluster loses the conflicts its pairs would win if it
    /// were back (ready clusters' pairs win), so for it an app of its shard that it lists and
    /// that no cluster serves counts too: it comes back for it. The table is republished on every
    /// change of routes or membership, so it is current; a cluster not in it yet is not ejected.
    fn has_substitute(&self, i: usize, returning: bool) -> bool {
        let snapshot = self.table.load();
        let served = |c: &ClusterEntry| {
            snapshot
                .clusters
                .iter()
                .position(|s| Arc::ptr_eq(s, &c.cluster))
                .and_then(|k| snapshot.views.get(k))
                .map(|view| view.apps.as_slice())
        };
        let entry = &self.clusters[i];
        let (Some(own), Some(shard_id)) =
            (served(entry), self.config.shard_index(&entry.config.shard))
        else {
            return !returning;
        };
        // Each app of the table: on this cluster's shard, and without any cluster to go to.
        let table = &snapshot.table;
        let apps: HashMap<&str, (bool, bool)> = (0..table.apps().len() as AppId)
            .map(|id| {
                let app = table.app(id);
                let here = app.shard as usize == shard_id;
                (&*app.name, (here, table.split_of(id).is_empty()))
            })
            .collect();
        if returning
            && entry
                .last_routes
                .values()
                .any(|app| apps.get(app.as_str()) == Some(&(true, true)))
        {
            return false;
        }
        let shard = &entry.config.shard;
        let weights = self.shard_weights(shard);
        let others: Vec<&[String]> = self
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
            .filter_map(|(_, c)| served(c))
            .collect();
        !others.is_empty()
            && own
                .iter()
                .filter(|app| apps.get(app.as_str()).is_some_and(|&(here, _)| here))
                .all(|app| others.iter().any(|apps| apps.contains(app)))
    }
}
