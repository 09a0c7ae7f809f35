//! JSON shapes of the admin API's answers.

use serde::Serialize;

use crate::shift::{Rollout, Shift};
use crate::snapshot::Snapshot;

/// `GET /v1/state`.
#[derive(Debug, Serialize)]
pub struct StateView<'a> {
    /// Snapshot version (increases with every routing-table update).
    pub version: u64,
    /// The first table is published.
    pub ready: bool,
    /// This replica advances shifts (it holds the Lease, or runs alone).
    pub leader: bool,
    /// This replica gets no answer from the API server (it held the Lease and cannot renew it,
    /// or it follows and has heard nothing for as long): it judges its shifts for rollbacks only
    /// and writes nothing.
    pub stranded: bool,
    /// The configured split key (`none`, `header:x`, `cookie:x`, `client_ip`).
    pub split_key: String,
    /// Declared shards with their clusters.
    pub shards: Vec<ShardView<'a>>,
    /// Known applications.
    pub apps: Vec<AppView>,
    /// The current or last fleet rollout.
    pub rollout: Option<&'a Rollout>,
}

/// A shift as the API shows it: the persisted shift plus its state name and current weights.
#[derive(Debug, Serialize)]
pub struct ShiftView<'a> {
    /// `progressing`, `paused`, `draining`, `completed`, `rolled_back` or `aborted`.
    pub state: &'static str,
    /// Current weights of the shard's clusters under this shift.
    pub weights: std::collections::BTreeMap<String, u32>,
    /// Everything else about the shift.
    #[serde(flatten)]
    pub shift: &'a Shift,
}

impl<'a> ShiftView<'a> {
    /// The view of a shift, with the weights it sets.
    pub fn of(shift: &'a Shift) -> Self {
        Self {
            state: shift.phase.as_str(),
            weights: shift.weights(),
            shift,
        }
    }

    /// The view of `shard`'s shift in `snap`. A finished shift no longer owns the weights (an
    /// operator may have changed them since): the shard's weights now are shown.
    pub fn current(shift: &'a Shift, shard: &str, snap: &Snapshot) -> Self {
        let mut view = Self::of(shift);
        if !shift.phase.is_active() {
            view.weights = snap
                .clusters
                .iter()
                .zip(&snap.views)
                .filter(|(c, _)| &*c.shard == shard)
                .map(|(c, v)| (c.name.to_string(), v.weight))
                .collect();
        }
        view
    }
}

/// One shard.
#[derive(Debug, Serialize)]
pub struct ShardView<'a> {
    /// Shard name.
    pub name: String,
    /// The shard's clusters, in split order.
    pub clusters: Vec<ClusterStateView>,
    /// The shard's current or last shift.
    pub shift: Option<ShiftView<'a>>,
}

/// One cluster.
#[derive(Debug, Serialize)]
pub struct ClusterStateView {
    /// Cluster name.
    pub name: String,
    /// Revision label.
    pub revision: String,
    /// Configured weight (0-100).
    pub weight: u32,
    /// Passes readiness probes.
    pub ready: bool,
    /// Takes no new requests.
    pub draining: bool,
    /// Ejected by passive health after failures in a row.
    pub ejected: bool,
    /// `draining` or `drained` after a promoted shift (drained: safe to delete).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<&'static str>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Applications its `/-/routes` lists.
    pub apps: Vec<String>,
    /// Why it is not ready; for a ready cluster whose latest probe rounds failed (fewer than
    /// `probe.failure_threshold` in a row), that it is failing and why.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// One application.
#[derive(Debug, Serialize)]
pub struct AppView {
    /// Application name.
    pub name: String,
    /// Serve route prefix.
    pub route_prefix: String,
    /// Shard it is placed on.
    pub shard: String,
    /// Why it is on that shard: `pinned` (config), `hash` (consistent hash of its name) or
    /// `deployed` (found only on another shard's clusters than its hash; move it to fix).
    pub placement: &'static str,
    /// Clusters it is currently split across, with effective weights.
    pub split: Vec<SplitView>,
}

/// One cluster of an application's effective split.
#[derive(Debug, Serialize)]
pub struct SplitView {
    /// Cluster name.
    pub cluster: String,
    /// Effective weight (after unready clusters were left out).
    pub weight: u32,
}

impl<'a> StateView<'a> {
    /// The view of a snapshot (in-flight counts read live).
    pub fn of(
        snap: &'a Snapshot,
        ready: bool,
        (leader, stranded): (bool, bool),
        split_key: String,
    ) -> Self {
        let table = &snap.table;
        let shard_count = table.placement().len();
        let mut shards: Vec<ShardView> = (0..shard_count)
            .map(|i| {
                let name = table.shard_name(i as u32).to_string();
                ShardView {
                    shift: snap
                        .shifts
                        .get(&name)
                        .map(|s| ShiftView::current(s, &name, snap)),
                    name,
                    clusters: Vec::new(),
                }
            })
            .collect();
        for (cluster, view) in snap.clusters.iter().zip(&snap.views) {
            let Some(shard) = shards.iter_mut().find(|s| *s.name == *cluster.shard) else {
                continue;
            };
            shard.clusters.push(ClusterStateView {
                name: cluster.name.to_string(),
                revision: cluster.revision.to_string(),
                weight: view.weight,
                ready: view.ready,
                draining: view.draining,
                drain: view.drain.map(|d| d.as_str()),
                ejected: view.ejected,
                in_flight: cluster.stats.in_flight(),
                apps: view.apps.clone(),
                detail: view.detail.clone(),
            });
        }
        let apps = table
            .apps()
            .iter()
            .enumerate()
            .map(|(i, app)| AppView {
                name: app.name.to_string(),
                route_prefix: app.route_prefix.to_string(),
                shard: table.shard_name(app.shard).to_string(),
                placement: snap.placements.get(i).map_or("hash", |p| p.as_str()),
                split: table
                    .split_of(i as u32)
                    .entries()
                    .map(|(id, weight)| SplitView {
                        cluster: snap.cluster(id).name.to_string(),
                        weight,
                    })
                    .collect(),
            })
            .collect();
        Self {
            version: snap.version,
            ready,
            leader,
            stranded,
            split_key,
            shards,
            apps,
            rollout: snap.rollout.as_ref(),
        }
    }
}
