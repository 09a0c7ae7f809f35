//! Gauge handles the control task sets on every publish, registered once.
//!
//! Resolving a gauge through `metrics::gauge!` formats its labels and looks the key up in the
//! registry under a lock. A publish sets five gauges per cluster and nine per shard, and an operator
//! (or a shift) may publish many times a second, so the handles are kept instead.

use crate::shift::{Phase, ShardProgress};
use crate::snapshot::{ClusterView, Drain};
use crate::telemetry;

/// The per-cluster gauges of one cluster.
#[derive(Debug)]
pub(super) struct ClusterGauges {
    weight: metrics::Gauge,
    ready: metrics::Gauge,
    draining: metrics::Gauge,
    drained: metrics::Gauge,
    ejected: metrics::Gauge,
    present: metrics::Gauge,
    /// Shard and cluster, to tell `/metrics` when the cluster leaves.
    labels: (String, String),
}

impl ClusterGauges {
    /// Registers the gauges of cluster `cluster` in shard `shard`.
    pub(super) fn new(shard: &str, cluster: &str) -> Self {
        let labels = [
            ("shard", shard.to_string()),
            ("cluster", cluster.to_string()),
        ];
        telemetry::cluster_joined(shard, cluster);
        ClusterGauges {
            weight: metrics::gauge!(telemetry::CLUSTER_WEIGHT, &labels),
            ready: metrics::gauge!(telemetry::CLUSTER_READY, &labels),
            draining: metrics::gauge!(telemetry::CLUSTER_DRAINING, &labels),
            drained: metrics::gauge!(telemetry::CLUSTER_DRAINED, &labels),
            ejected: metrics::gauge!(telemetry::CLUSTER_EJECTED, &labels),
            present: {
                let present = metrics::gauge!(telemetry::CLUSTER_PRESENT, &labels);
                present.set(1.0);
                present
            },
            labels: (shard.to_string(), cluster.to_string()),
        }
    }

    /// Sets them from the cluster's view in the published snapshot (`draining` and `drained`
    /// are the drain after a promoted shift).
    pub(super) fn set(&self, view: &ClusterView) {
        self.weight.set(f64::from(view.weight));
        self.ready.set(flag(view.ready));
        self.draining.set(flag(view.drain == Some(Drain::Draining)));
        self.drained.set(flag(view.drain == Some(Drain::Drained)));
        self.ejected.set(flag(view.ejected));
    }
}

/// A cluster that leaves the gateway (deleted RayCluster, moved shard) keeps no stale values:
/// its series read 0 (until they leave `/metrics`), so a deleted
/// cluster's last `ready` cannot hide a shard with no ready cluster, and a drained one removed as
/// asked stops showing as drained. `rayshift_cluster_present` turns 0 too, which tells dashboards
/// and alerts a cluster that left from one that is there but not ready. `admin.removed_series_ttl`
/// later, its series leave `/metrics`.
impl Drop for ClusterGauges {
    fn drop(&mut self) {
        for gauge in [
            &self.weight,
            &self.ready,
            &self.draining,
            &self.drained,
            &self.ejected,
            &self.present,
        ] {
            gauge.set(0.0);
        }
        telemetry::cluster_left(&self.labels.0, &self.labels.1);
    }
}

/// The per-shard gauges of one declared shard.
#[derive(Debug)]
pub(super) struct ShardGauges {
    apps: metrics::Gauge,
    apps_on_draining: metrics::Gauge,
    /// `idle`, then one per [`Phase::ALL`].
    shift_state: Vec<(&'static str, metrics::Gauge)>,
    shift_target_weight: metrics::Gauge,
}

impl ShardGauges {
    /// Registers the gauges of shard `shard`, and its shift counters at 0: a counter that first
    /// appears with the value 1 hides that first step, failed check or rollback from
    /// `increase()` and `rate()` (no earlier sample), so dashboards would miss it.
    pub(super) fn new(shard: &str) -> Self {
        metrics::counter!(telemetry::SHIFT_STEPS_TOTAL, "shard" => shard.to_string()).increment(0);
        for check in ["error_rate", "latency"] {
            metrics::counter!(telemetry::SHIFT_CHECK_FAILURES_TOTAL, "shard" => shard.to_string(), "check" => check)
                .increment(0);
        }
        for reason in ["error_rate", "latency", "not_ready"] {
            metrics::counter!(telemetry::SHIFT_ROLLBACKS_TOTAL, "shard" => shard.to_string(), "reason" => reason)
                .increment(0);
        }
        let shift_state = std::iter::once("idle")
            .chain(Phase::ALL.iter().map(|p| p.as_str()))
            .map(|state| {
                let gauge = metrics::gauge!(telemetry::SHIFT_STATE, "shard" => shard.to_string(), "state" => state);
                (state, gauge)
            })
            .collect();
        ShardGauges {
            apps: metrics::gauge!(telemetry::APPS, "shard" => shard.to_string()),
            apps_on_draining: metrics::gauge!(telemetry::APPS_ON_DRAINING_CLUSTERS, "shard" => shard.to_string()),
            shift_state,
            shift_target_weight: metrics::gauge!(telemetry::SHIFT_TARGET_WEIGHT, "shard" => shard.to_string()),
        }
    }

    /// Sets the shard's app count (`apps.0`; `apps.1` of them served by draining clusters), its
    /// shift state (`idle` without a shift) and target weight.
    pub(super) fn set(&self, apps: (usize, usize), shift_state: &str, target_weight: u32) {
        self.apps.set(apps.0 as f64);
        self.apps_on_draining.set(apps.1 as f64);
        for (state, gauge) in &self.shift_state {
            gauge.set(flag(*state == shift_state));
        }
        self.shift_target_weight.set(f64::from(target_weight));
    }
}

/// The rollout gauges: shards of the current rollout by state.
#[derive(Debug)]
pub(super) struct RolloutGauges(Vec<(ShardProgress, metrics::Gauge)>);

impl RolloutGauges {
    pub(super) fn new() -> Self {
        RolloutGauges(
            ShardProgress::ALL
                .iter()
                .map(|&p| {
                    (
                        p,
                        metrics::gauge!(telemetry::ROLLOUT_SHARDS, "state" => p.as_str()),
                    )
                })
                .collect(),
        )
    }

    /// Sets each state's count (`count(state)`; all 0 without a rollout).
    pub(super) fn set(&self, count: impl Fn(ShardProgress) -> usize) {
        for (state, gauge) in &self.0 {
            gauge.set(count(*state) as f64);
        }
    }
}

fn flag(on: bool) -> f64 {
    f64::from(u8::from(on))
}
