//! The control plane's single owner task: it holds the desired state and publishes routing snapshots.
//!
//! Only this task writes the [`Snapshot`] behind the `ArcSwap`. Everything else talks to it through a
//! [`ControlHandle`]: the admin API sends commands (and waits for the reply), probes send reports.
//! Every change that must survive a restart is written to the state file *before* it is published.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::config::{ClusterConfig, Config};
use crate::discovery::probe::{ProbeReport, Prober};
use crate::routing::{AppSpec, ClusterSpec, Placement, RoutingTable, ShardSpec, TableSpec};
use crate::snapshot::{AppPlacement, ClusterView, Snapshot};
use crate::state::{State, StateError, StateStore};
use crate::telemetry;

/// Why the control plane refused or failed a change. Client mistakes map to 4xx, the rest to 5xx.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The shard is not declared in the config.
    #[error("unknown shard \"{0}\"")]
    UnknownShard(String),
    /// The cluster is not known to the gateway.
    #[error("unknown cluster \"{cluster}\" (clusters of shard \"{shard}\": {known})")]
    UnknownCluster {
        /// The cluster named in the request.
        cluster: String,
        /// The shard the request was for.
        shard: String,
        /// The shard's clusters, comma separated.
        known: String,
    },
    /// The cluster exists but serves another shard.
    #[error("cluster \"{cluster}\" belongs to shard \"{actual}\", not \"{shard}\"")]
    WrongShard {
        /// The cluster named in the request.
        cluster: String,
        /// The shard the request was for.
        shard: String,
        /// The shard the cluster belongs to.
        actual: String,
    },
    /// A weight outside 0-100.
    #[error("weight of cluster \"{cluster}\" is {weight}, expected an integer 0-100")]
    WeightRange {
        /// The cluster.
        cluster: String,
        /// The offending weight.
        weight: u64,
    },
    /// Weights that do not add up to 100.
    #[error("weights sum to {0}, expected 100")]
    WeightSum(u64),
    /// No weights given.
    #[error("no weights given")]
    NoWeights,
    /// The change could not be written to the state file, so it was not applied.
    #[error("state not changed: {0}")]
    Persist(#[from] StateError),
    /// The control task is gone (the gateway is shutting down).
    #[error("the gateway is shutting down")]
    Stopped,
}

impl ControlError {
    /// True when the request was at fault (answer 4xx), false for the gateway's own failures (5xx).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, ControlError::Persist(_) | ControlError::Stopped)
    }
}

/// Requests to the control task.
#[derive(Debug)]
enum Command {
    /// Replace a shard's weights.
    SetWeights {
        shard: String,
        weights: BTreeMap<String, u64>,
        reply: oneshot::Sender<Result<(), ControlError>>,
    },
}

/// A cheap, cloneable handle to the control plane.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    commands: mpsc::Sender<Command>,
    table: Arc<ArcSwap<Snapshot>>,
    ready: watch::Receiver<bool>,
}

impl ControlHandle {
    /// The shared snapshot cell the request path loads from.
    pub fn table(&self) -> &Arc<ArcSwap<Snapshot>> {
        &self.table
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.table.load_full()
    }

    /// True once the first snapshot with probe results has been published.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`is_ready`](Self::is_ready).
    pub async fn wait_ready(&self) {
        let mut ready = self.ready.clone();
        let _ = ready.wait_for(|r| *r).await;
    }

    /// Sets a shard's weights; on success they are in the state file and published.
    pub async fn set_weights(
        &self,
        shard: &str,
        weights: BTreeMap<String, u64>,
    ) -> Result<(), ControlError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::SetWeights {
                shard: shard.to_string(),
                weights,
                reply,
            })
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }
}

/// A cluster the control plane manages.
struct ClusterEntry {
    config: ClusterConfig,
    cluster: Arc<Cluster>,
    /// Latest probe result (None before the first).
    probe: Option<ProbeReport>,
    /// Routes of the last probe that had them, kept while the cluster is down so its apps stay known.
    last_routes: BTreeMap<String, String>,
    prober: JoinHandle<()>,
}

impl Drop for ClusterEntry {
    fn drop(&mut self) {
        self.prober.abort();
    }
}

/// The desired state, owned by the control task.
struct Desired {
    config: Arc<Config>,
    /// Sorted by (shard, revision, name): the split order, oldest revision first.
    clusters: Vec<ClusterEntry>,
    state: State,
    store: StateStore,
    table: Arc<ArcSwap<Snapshot>>,
    version: u64,
    /// Route conflicts already logged, so a rebuild does not repeat them.
    warned: HashSet<String>,
    /// App name -> shard by the consistent hash over the declared shards.
    placement: Placement,
}

/// Errors starting the control plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state file could not be loaded.
    #[error(transparent)]
    State(#[from] StateError),
    /// A cluster's `serve_url` could not be turned into an upstream address.
    #[error("cluster \"{cluster}\": serve_url {url} has no usable host:port")]
    BadUrl {
        /// The cluster.
        cluster: String,
        /// Its URL.
        url: String,
    },
}

/// Loads the state file, starts probes of every configured cluster and the owner task.
pub fn start(config: Arc<Config>) -> Result<ControlHandle, StartError> {
    let store = StateStore::new(&config.state_file);
    let state = store.load()?.unwrap_or_else(State::new);
    let (probe_tx, probe_rx) = mpsc::unbounded_channel();
    let prober = Prober::new(config.probe.interval, config.probe.timeout);
    let mut clusters = Vec::with_capacity(config.clusters.len());
    for c in &config.clusters {
        let (scheme, authority) =
            upstream_address(&c.serve_url).ok_or_else(|| StartError::BadUrl {
                cluster: c.name.clone(),
                url: c.serve_url.to_string(),
            })?;
        let cluster = Arc::new(Cluster::new(
            &c.name,
            &c.shard,
            &c.revision,
            scheme.clone(),
            authority.clone(),
        ));
        let handle = prober.spawn(
            Arc::clone(&cluster.name),
            scheme,
            authority,
            probe_tx.clone(),
        );
        clusters.push(ClusterEntry {
            config: c.clone(),
            cluster,
            probe: None,
            last_routes: BTreeMap::new(),
            prober: handle,
        });
    }
    let shard_pos = |s: &str| config.shard_index(s).unwrap_or(usize::MAX);
    clusters.sort_by(|a, b| {
        shard_pos(&a.config.shard)
            .cmp(&shard_pos(&b.config.shard))
            .then_with(|| natural_cmp(&a.config.revision, &b.config.revision))
            .then_with(|| a.config.name.cmp(&b.config.name))
    });
    let table = Arc::new(ArcSwap::from_pointee(Snapshot::empty()));
    let (commands, command_rx) = mpsc::channel(64);
    let (ready_tx, ready) = watch::channel(false);
    let placement = Placement::new(config.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let desired = Desired {
        config,
        clusters,
        state,
        store,
        table: Arc::clone(&table),
        version: 0,
        warned: HashSet::new(),
        placement,
    };
    tokio::spawn(run(desired, command_rx, probe_rx, ready_tx));
    Ok(ControlHandle {
        commands,
        table,
        ready,
    })
}

/// Scheme and `host:port` of a Serve URL.
pub(crate) fn upstream_address(url: &url::Url) -> Option<(Scheme, Authority)> {
    let scheme = match url.scheme() {
        "http" => Scheme::HTTP,
        "https" => Scheme::HTTPS,
        _ => return None,
    };
    let host = url.host_str()?;
    let port = url.port_or_known_default()?;
    let authority = Authority::try_from(format!("{host}:{port}")).ok()?;
    Some((scheme, authority))
}

/// The owner loop: apply commands and probe reports, publish after each change.
async fn run(
    mut desired: Desired,
    mut commands: mpsc::Receiver<Command>,
    mut probes: mpsc::UnboundedReceiver<ProbeReport>,
    ready: watch::Sender<bool>,
) {
    desired.publish();
    // Ready once every cluster has been probed once, or after a bounded wait for slow ones.
    let first_round = desired.config.probe.timeout * 2 + std::time::Duration::from_millis(200);
    let deadline = tokio::time::sleep(first_round);
    tokio::pin!(deadline);
    let mut announced = desired.clusters.is_empty();
    if announced {
        let _ = ready.send(true);
    }
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some(cmd) => desired.handle(cmd).await,
                None => return,
            },
            report = probes.recv() => {
                let Some(report) = report else { return };
                desired.apply_probe(report);
                // Coalesce a burst of reports into one publication.
                while let Ok(report) = probes.try_recv() {
                    desired.apply_probe(report);
                }
                desired.publish();
                if !announced && desired.clusters.iter().all(|c| c.probe.is_some()) {
                    announced = true;
                    let _ = ready.send(true);
                }
            }
            () = &mut deadline, if !announced => {
                announced = true;
                tracing::warn!("not every cluster answered its first probe in time; serving with what is known");
                let _ = ready.send(true);
            }
        }
    }
}

impl Desired {
    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetWeights {
                shard,
                weights,
                reply,
            } => {
                let result = self.set_weights(&shard, weights).await;
                let _ = reply.send(result);
            }
        }
    }

    fn apply_probe(&mut self, report: ProbeReport) {
        if let Some(entry) = self
            .clusters
            .iter_mut()
            .find(|c| c.cluster.name == report.cluster)
        {
            if let Some(routes) = &report.routes {
                entry.last_routes.clone_from(routes);
            }
            entry.probe = Some(report);
        }
    }

    /// Validates, persists, then publishes new weights for `shard`.
    async fn set_weights(
        &mut self,
        shard: &str,
        weights: BTreeMap<String, u64>,
    ) -> Result<(), ControlError> {
        if self.config.shard_index(shard).is_none() {
            return Err(ControlError::UnknownShard(shard.to_string()));
        }
        if weights.is_empty() {
            return Err(ControlError::NoWeights);
        }
        let known = || {
            self.clusters
                .iter()
                .filter(|c| c.config.shard == shard)
                .map(|c| c.config.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut sum = 0u64;
        for (name, &weight) in &weights {
            match self.clusters.iter().find(|c| &c.config.name == name) {
                None => {
                    return Err(ControlError::UnknownCluster {
                        cluster: name.clone(),
                        shard: shard.to_string(),
                        known: known(),
                    })
                }
                Some(c) if c.config.shard != shard => {
                    return Err(ControlError::WrongShard {
                        cluster: name.clone(),
                        shard: shard.to_string(),
                        actual: c.config.shard.clone(),
                    })
                }
                Some(_) => {}
            }
            if weight > 100 {
                return Err(ControlError::WeightRange {
                    cluster: name.clone(),
                    weight,
                });
            }
            sum += weight;
        }
        if sum != 100 {
            return Err(ControlError::WeightSum(sum));
        }
        let mut next = self.state.clone();
        next.shards.entry(shard.to_string()).or_default().weights = weights
            .into_iter()
            .map(|(name, w)| (name, w as u32))
            .collect();
        self.persist(&next).await?;
        self.state = next;
        self.publish();
        Ok(())
    }

    /// Writes `next` to the state file off the async runtime.
    async fn persist(&self, next: &State) -> Result<(), StateError> {
        let store = self.store.clone();
        let next = next.clone();
        match tokio::task::spawn_blocking(move || store.save(&next)).await {
            Ok(result) => result,
            Err(e) => Err(StateError::Write {
                path: self.store.path().to_path_buf(),
                source: std::io::Error::other(e),
            }),
        }
    }

    /// Effective weights of a shard's clusters: stored weights, else the config's, else an equal split.
    fn shard_weights(&self, shard: &str) -> BTreeMap<&str, u32> {
        let members: Vec<&ClusterEntry> = self
            .clusters
            .iter()
            .filter(|c| c.config.shard == shard)
            .collect();
        if let Some(stored) = self.state.shards.get(shard) {
            let known: BTreeMap<&str, u32> = members
                .iter()
                .map(|c| {
                    let name = c.config.name.as_str();
                    (name, stored.weights.get(name).copied().unwrap_or(0))
                })
                .collect();
            if known.values().any(|w| *w > 0) {
                return known;
            }
        }
        if !members.is_empty() && members.iter().all(|c| c.config.weight.is_some()) {
            return members
                .iter()
                .map(|c| (c.config.name.as_str(), c.config.weight.unwrap_or(0)))
                .collect();
        }
        let n = members.len() as u32;
        members
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let share = 100 / n + u32::from((i as u32) < 100 % n);
                (c.config.name.as_str(), share)
            })
            .collect()
    }

    /// Builds a snapshot from the desired state and swaps it in.
    fn publish(&mut self) {
        let (spec, placements) = self.table_spec();
        let table = match RoutingTable::build(&spec) {
            Ok(table) => table,
            Err(e) => {
                // The spec is deduplicated above, so this is a bug; keep serving the last table.
                tracing::error!(error = %e, "routing table rejected; keeping the previous one");
                return;
            }
        };
        self.version += 1;
        let views: Vec<ClusterView> = self
            .clusters
            .iter()
            .zip(&spec.clusters)
            .map(|(entry, spec)| ClusterView {
                weight: spec.weight,
                ready: spec.ready,
                draining: spec.draining,
                detail: match &entry.probe {
                    None => "not probed yet".to_string(),
                    Some(p) => p.detail.clone(),
                },
                apps: spec.apps.clone(),
            })
            .collect();
        for (entry, view) in self.clusters.iter().zip(&views) {
            let labels = [
                ("shard", entry.config.shard.clone()),
                ("cluster", entry.config.name.clone()),
            ];
            metrics::gauge!(telemetry::CLUSTER_WEIGHT, &labels).set(f64::from(view.weight));
            metrics::gauge!(telemetry::CLUSTER_READY, &labels).set(if view.ready {
                1.0
            } else {
                0.0
            });
        }
        for (i, shard) in self.config.shards.iter().enumerate() {
            let n = table
                .apps()
                .iter()
                .filter(|a| a.shard as usize == i)
                .count();
            metrics::gauge!(telemetry::APPS, "shard" => shard.name.clone()).set(n as f64);
        }
        metrics::counter!(telemetry::ROUTING_TABLE_UPDATES_TOTAL).increment(1);
        self.table.store(Arc::new(Snapshot {
            version: self.version,
            table,
            clusters: self
                .clusters
                .iter()
                .map(|c| Arc::clone(&c.cluster))
                .collect(),
            views,
            placements,
        }));
    }

    /// The routing spec: declared shards, clusters in split order, config apps then discovered ones.
    fn table_spec(&mut self) -> (TableSpec, Vec<AppPlacement>) {
        let shards = self
            .config
            .shards
            .iter()
            .map(|s| ShardSpec {
                name: s.name.clone(),
                weight: s.weight,
            })
            .collect();
        let mut clusters = Vec::with_capacity(self.clusters.len());
        for entry in &self.clusters {
            let weights = self.shard_weights(&entry.config.shard);
            let weight = weights
                .get(entry.config.name.as_str())
                .copied()
                .unwrap_or(0);
            let ready = entry.probe.as_ref().is_some_and(ProbeReport::ready);
            clusters.push(ClusterSpec {
                name: entry.config.name.clone(),
                shard: self.config.shard_index(&entry.config.shard).unwrap_or(0) as u32,
                weight,
                ready,
                draining: false,
                apps: entry.last_routes.values().cloned().collect(),
            });
        }
        let mut apps: Vec<AppSpec> = self
            .config
            .apps
            .iter()
            .map(|a| AppSpec {
                name: a.name.clone(),
                route_prefix: a.route_prefix.clone(),
                pinned_shard: a
                    .shard
                    .as_deref()
                    .and_then(|s| self.config.shard_index(s))
                    .map(|i| i as u32),
            })
            .collect();
        let mut sources: Vec<AppPlacement> = apps
            .iter()
            .map(|a| {
                if a.pinned_shard.is_some() {
                    AppPlacement::Pinned
                } else {
                    AppPlacement::Hash
                }
            })
            .collect();
        let mut names: HashSet<String> = apps.iter().map(|a| a.name.clone()).collect();
        let mut prefixes: BTreeMap<String, String> = apps
            .iter()
            .map(|a| (a.route_prefix.clone(), a.name.clone()))
            .collect();
        let discovered: Vec<(String, String, String)> = self
            .clusters
            .iter()
            .flat_map(|e| {
                e.last_routes
                    .iter()
                    .map(|(prefix, app)| (e.config.name.clone(), prefix.clone(), app.clone()))
            })
            .collect();
        for (cluster, prefix, app) in &discovered {
            if names.contains(app) {
                continue;
            }
            if let Some(owner) = prefixes.get(prefix) {
                let key = format!("{prefix}\0{app}\0{owner}");
                if self.warned.insert(key) {
                    tracing::warn!(
                        %cluster, %prefix, %app, %owner,
                        "route prefix already belongs to another application; ignoring this one"
                    );
                }
                continue;
            }
            names.insert(app.clone());
            prefixes.insert(prefix.clone(), app.clone());
            let (pinned_shard, source) = self.discovered_placement(app, &clusters);
            apps.push(AppSpec {
                name: app.clone(),
                route_prefix: prefix.clone(),
                pinned_shard,
            });
            sources.push(source);
        }
        (
            TableSpec {
                shards,
                clusters,
                apps,
            },
            sources,
        )
    }

    /// Where a discovered (not configured) app goes: its hash shard, unless no cluster of that shard
    /// serves it while a cluster of another shard does. Then traffic follows the deployment (the app
    /// is reachable) and the mismatch is reported once, so the operator can move the app.
    fn discovered_placement(
        &mut self,
        app: &str,
        clusters: &[ClusterSpec],
    ) -> (Option<u32>, AppPlacement) {
        let Some(hashed) = self.placement.place(app) else {
            return (None, AppPlacement::Hash);
        };
        let serves = |shard: u32| {
            clusters
                .iter()
                .any(|c| c.shard == shard && c.apps.iter().any(|a| a == app))
        };
        if serves(hashed) {
            return (None, AppPlacement::Hash);
        }
        let Some(found) = clusters
            .iter()
            .find(|c| c.apps.iter().any(|a| a == app))
            .map(|c| c.shard)
        else {
            return (None, AppPlacement::Hash);
        };
        let hashed_name = self.placement.name(hashed).to_string();
        let found_name = self.placement.name(found).to_string();
        if self
            .warned
            .insert(format!("placement\0{app}\0{found_name}"))
        {
            tracing::warn!(
                %app, deployed_on = %found_name, hashes_to = %hashed_name,
                "application is deployed on another shard than its placement; routing to where it is deployed"
            );
        }
        (Some(found), AppPlacement::Deployed)
    }
}

/// Orders revisions so that `v2 < v10` (digit runs compare as numbers).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (trim_zeros(&a[..na]), trim_zeros(&b[..nb]));
                let ord = da.len().cmp(&db.len()).then_with(|| da.cmp(db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let start = digits
        .iter()
        .position(|&d| d != b'0')
        .unwrap_or(digits.len());
    &digits[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_order_naturally() {
        let mut revs = vec![
            "v10",
            "v2",
            "v1",
            "v2-rc1",
            "2026-01-03",
            "2026-01-10",
            "v02",
        ];
        revs.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            revs,
            [
                "2026-01-03",
                "2026-01-10",
                "v1",
                "v2",
                "v02",
                "v2-rc1",
                "v10"
            ]
        );
    }

    #[test]
    fn upstream_address_of_urls() {
        let (s, a) = upstream_address(&"http://127.0.0.1:8101".parse().unwrap()).unwrap();
        assert_eq!((s.as_str(), a.as_str()), ("http", "127.0.0.1:8101"));
        let (_, a) = upstream_address(&"http://[::1]:8000/".parse().unwrap()).unwrap();
        assert_eq!(a.as_str(), "[::1]:8000");
        let (s, a) = upstream_address(&"https://serve.example".parse().unwrap()).unwrap();
        assert_eq!((s.as_str(), a.as_str()), ("https", "serve.example:443"));
    }
}
