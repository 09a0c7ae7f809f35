//! The immutable snapshot the request path reads: the pure routing table plus the clusters it points at.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::cluster::Cluster;
use crate::routing::{ClusterId, RoutingTable};
use crate::shift::{Rollout, Shift};

/// One published version of everything the request path needs. Loaded once per request from an
/// `ArcSwap`; never mutated after publication (only the atomics inside [`Cluster`]s change).
#[derive(Debug)]
pub struct Snapshot {
    /// Increases by one with every publication.
    pub version: u64,
    /// Prefix match, shard placement and splits.
    pub table: RoutingTable,
    /// Clusters by [`ClusterId`] of `table`.
    pub clusters: Vec<Arc<Cluster>>,
    /// What the control plane knew about each cluster, by [`ClusterId`] (for `/v1/state`).
    pub views: Vec<ClusterView>,
    /// How each app of `table` got its shard, by app id.
    pub placements: Vec<AppPlacement>,
    /// Each shard's current or last shift, by shard name.
    pub shifts: BTreeMap<String, Shift>,
    /// The current or last fleet rollout.
    pub rollout: Option<Rollout>,
}

/// Where a cluster is in being retired after a promoted shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// No new requests; the ones in flight are finishing.
    Draining,
    /// Nothing in flight (or the drain timed out): safe to delete.
    Drained,
}

impl Drain {
    /// Lowercase name for the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Drain::Draining => "draining",
            Drain::Drained => "drained",
        }
    }
}

/// How an application's shard was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppPlacement {
    /// Pinned by `apps[].shard` in the config.
    Pinned,
    /// The consistent hash of its name.
    Hash,
    /// Discovered on a cluster of another shard than its hash: routed where it is deployed.
    Deployed,
}

impl AppPlacement {
    /// Lowercase name for the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            AppPlacement::Pinned => "pinned",
            AppPlacement::Hash => "hash",
            AppPlacement::Deployed => "deployed",
        }
    }
}

/// The control plane's view of one cluster at publication time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterView {
    /// Configured weight (0-100) in its shard.
    pub weight: u32,
    /// Healthy with a populated route table: may receive traffic for the apps it lists.
    pub ready: bool,
    /// Takes no new requests (its shard moved away from it).
    pub draining: bool,
    /// Draining or drained after a promoted shift.
    pub drain: Option<Drain>,
    /// Ejected by passive health (too many failures in a row) until a probe succeeds.
    pub ejected: bool,
    /// Where the cluster came from (config file or a RayCluster).
    pub source: crate::control::ClusterSource,
    /// Why it is not ready (empty when ready).
    pub detail: String,
    /// Applications its `/-/routes` listed last.
    pub apps: Vec<String>,
}

impl Snapshot {
    /// A snapshot that routes nothing (before the first publication).
    pub fn empty() -> Self {
        Self {
            version: 0,
            table: RoutingTable::empty(),
            clusters: Vec::new(),
            views: Vec::new(),
            placements: Vec::new(),
            shifts: BTreeMap::new(),
            rollout: None,
        }
    }

    /// The cluster with this id.
    pub fn cluster(&self, id: ClusterId) -> &Arc<Cluster> {
        &self.clusters[id as usize]
    }
}
