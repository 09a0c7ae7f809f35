//! Clusters joining, changing and leaving while traffic flows (static config, Kubernetes watcher).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::gauges::ClusterGauges;
use super::{natural_cmp, upstream_address, ClusterEntry, Desired, StartError};
use crate::cluster::Cluster;
use crate::config::ClusterConfig;
use crate::discovery::probe::ProbeTarget;
use crate::proxy::pool::ClusterPool;

/// Where a cluster came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSource {
    /// The config file's `clusters:`.
    Static,
    /// A RayCluster object.
    Kubernetes {
        /// Its namespace.
        namespace: String,
        /// Its object name.
        name: String,
    },
}

/// A cluster as a discovery source sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredCluster {
    /// Name, shard, revision and URLs.
    pub config: ClusterConfig,
    /// The source's own readiness (probes must pass too).
    pub ready: bool,
    /// Where it came from.
    pub source: ClusterSource,
    /// When the source object was created (Unix seconds; Kubernetes' `creationTimestamp`), when
    /// known: a RayCluster created after a shift was promoted is not the old cluster that shift
    /// drained, even under the same name.
    pub created: Option<u64>,
}

/// A change of cluster membership.
#[derive(Debug, Clone)]
pub enum DiscoveryEvent {
    /// The complete set of clusters of one Kubernetes namespace (`None`: of all namespaces) after
    /// a (re)list: applied at once. Static clusters and other namespaces' clusters are kept.
    Replace {
        /// The namespace the list covers.
        namespace: Option<String>,
        /// Every cluster in it.
        clusters: Vec<DiscoveredCluster>,
    },
    /// A cluster appeared or changed.
    Upsert(Box<DiscoveredCluster>),
    /// A cluster disappeared (by cluster name), whatever its source.
    Remove(String),
    /// A discovery source no longer sees a cluster it reported (deleted, or no longer routable):
    /// it goes unless the cluster of that name is a static one, which discovery never removes.
    RemoveDiscovered(String),
}

impl Desired {
    /// Adds a cluster and starts probing it, keeping the split order (shard, revision, name).
    pub(super) fn add_cluster(&mut self, d: DiscoveredCluster) -> Result<(), StartError> {
        let c = d.config;
        let bad_url = |url: &url::Url| StartError::BadUrl {
            cluster: c.name.clone(),
            url: url.to_string(),
        };
        let (scheme, authority) =
            upstream_address(&c.serve_url).ok_or_else(|| bad_url(&c.serve_url))?;
        let dashboard = match &c.dashboard_url {
            Some(url) => Some(upstream_address(url).ok_or_else(|| bad_url(url))?),
            None => None,
        };
        let cluster = Arc::new(Cluster::new(
            &c.name,
            &c.shard,
            &c.revision,
            scheme.clone(),
            authority.clone(),
            ClusterPool::new(
                self.config.upstream.max_idle_per_cluster,
                self.config.upstream.idle_timeout,
                self.config.proxy_workers,
            ),
        ));
        let target = ProbeTarget {
            scheme,
            authority,
            dashboard,
        };
        let prober = self
            .prober
            .spawn(Arc::clone(&cluster.name), target, self.probe_tx.clone());
        let gauges = ClusterGauges::new(&c.shard, &c.name);
        self.clusters.push(ClusterEntry {
            gauges,
            config: c,
            cluster,
            probe: None,
            probe_ready: false,
            last_routes: BTreeMap::new(),
            prober,
            source: d.source,
            created: d.created,
            external_ready: d.ready,
            ejected_until: None,
            ejections: 0,
            returned_at: None,
        });
        self.sort_clusters();
        Ok(())
    }

    fn sort_clusters(&mut self) {
        let config = Arc::clone(&self.config);
        let shard_pos = |s: &str| config.shard_index(s).unwrap_or(usize::MAX);
        self.clusters.sort_by(|a, b| {
            shard_pos(&a.config.shard)
                .cmp(&shard_pos(&b.config.shard))
                .then_with(|| natural_cmp(&a.config.revision, &b.config.revision))
                .then_with(|| a.config.name.cmp(&b.config.name))
        });
    }

    /// Applies a membership change and republishes.
    pub(super) fn apply_discovery(&mut self, event: DiscoveryEvent) {
        match event {
            DiscoveryEvent::Replace {
                namespace,
                clusters: all,
            } => {
                let keep: Vec<&str> = all.iter().map(|d| d.config.name.as_str()).collect();
                let in_scope = |source: &ClusterSource| match source {
                    ClusterSource::Static => false,
                    ClusterSource::Kubernetes { namespace: ns, .. } => {
                        namespace.as_ref().is_none_or(|n| n == ns)
                    }
                };
                let gone: Vec<String> = self
                    .clusters
                    .iter()
                    .filter(|e| in_scope(&e.source) && !keep.contains(&e.config.name.as_str()))
                    .map(|e| e.config.name.clone())
                    .collect();
                self.discovery_pending.remove(&namespace);
                for name in gone {
                    self.remove_cluster(&name);
                }
                for d in all {
                    self.upsert_cluster(d);
                }
            }
            DiscoveryEvent::Upsert(d) => self.upsert_cluster(*d),
            DiscoveryEvent::Remove(name) => self.remove_cluster(&name),
            DiscoveryEvent::RemoveDiscovered(name) => {
                if self
                    .clusters
                    .iter()
                    .any(|e| e.config.name == name && e.source != ClusterSource::Static)
                {
                    self.remove_cluster(&name);
                }
            }
        }
        self.publish();
    }

    fn upsert_cluster(&mut self, d: DiscoveredCluster) {
        if self.config.shard_index(&d.config.shard).is_none() {
            let key = format!("undeclared-shard\0{}\0{}", d.config.name, d.config.shard);
            if self.warned.insert(key) {
                tracing::warn!(
                    cluster = %d.config.name, shard = %d.config.shard,
                    "cluster names a shard that is not declared in the config; ignoring it"
                );
            }
            // Only a cluster from the same source goes (never a static one of the same name).
            if self
                .clusters
                .iter()
                .any(|e| e.config.name == d.config.name && e.source == d.source)
            {
                self.remove_cluster(&d.config.name);
            }
            return;
        }
        if let Some(entry) = self
            .clusters
            .iter_mut()
            .find(|e| e.config.name == d.config.name)
        {
            if entry.source == ClusterSource::Static && d.source != ClusterSource::Static {
                tracing::warn!(cluster = %d.config.name, "a discovered cluster has the name of a static one; keeping the static one");
                return;
            }
            let same_endpoint = entry.config.serve_url == d.config.serve_url
                && entry.config.dashboard_url == d.config.dashboard_url
                && entry.config.shard == d.config.shard
                && entry.config.revision == d.config.revision;
            if same_endpoint {
                if entry.external_ready != d.ready {
                    tracing::info!(cluster = %d.config.name, ready = d.ready, "discovery readiness changed");
                }
                entry.external_ready = d.ready;
                entry.source = d.source;
                entry.created = d.created;
                return;
            }
            tracing::info!(cluster = %d.config.name, "cluster changed (address, shard or revision)");
            self.remove_cluster(&d.config.name);
        } else {
            tracing::info!(cluster = %d.config.name, shard = %d.config.shard, revision = %d.config.revision, "cluster discovered");
        }
        if let Err(e) = self.add_cluster(d) {
            tracing::warn!(error = %e, "discovered cluster not added");
        }
    }

    fn remove_cluster(&mut self, name: &str) {
        let before = self.clusters.len();
        self.clusters.retain(|e| e.config.name != name);
        if self.clusters.len() != before {
            tracing::info!(cluster = %name, "cluster removed");
        }
    }
}
