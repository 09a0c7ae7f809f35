//! The control plane's single owner task: it holds the desired state and publishes routing snapshots.
//!
//! Only this task writes the [`Snapshot`] behind the `ArcSwap`. Everything else talks to it through a
//! [`ControlHandle`]: the admin API sends commands (and waits for the reply), probes send reports.
//! Every change that must survive a restart is written to the state store *before* it is
//! published, except a clock tick's failed checks and rollbacks, which apply first (see
//! `Desired::tick`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::cluster::Cluster;
use crate::config::{ClusterConfig, Config};
use crate::discovery::probe::{ProbeReport, Prober};
use crate::kube_state::{ConfigMapStore, Standing};
use crate::routing::Placement;
use crate::shift::machine::InvalidTransition;
use crate::shift::policy::PolicyError;
use crate::shift::{Rollout, Shift, ShiftPolicy, Target};
use crate::snapshot::Snapshot;
use crate::state::{State, StateError, StateStore, StateWriter};

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
    /// The shard has a shift in progress (its weights belong to the shift).
    #[error("shard \"{0}\" has a shift in progress that owns its weights; abort it, or wait until it completes (promote finishes it sooner)")]
    ShiftRunning(String),
    /// The shard's shift was promoted and its old clusters are draining (nothing can be changed
    /// until the drain ends, at the latest after the shift's `drain_timeout`).
    #[error("shard \"{0}\" has a shift in progress that is draining its old clusters; wait until it completes (at most its drain_timeout), or abort it to give the old clusters their weights back")]
    ShiftDraining(String),
    /// The shard is waiting or shifting in a running or paused rollout.
    #[error("shard \"{shard}\" is part of rollout {rollout}, which has yet to finish with it (whether running or paused); abort the rollout, or wait until it is done with the shard")]
    InRollout {
        /// The shard.
        shard: String,
        /// The rollout id.
        rollout: u64,
    },
    /// The shard has no shift to control.
    #[error("shard \"{0}\" has no shift")]
    NoShift(String),
    /// The control does not apply in the shift's (or rollout's) current phase.
    #[error(transparent)]
    Transition(#[from] InvalidTransition),
    /// A shift or rollout request that makes no sense (no target, nothing to move, ...).
    #[error("{0}")]
    BadRequest(String),
    /// A policy key with a bad value.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The rollout control does not apply in the rollout's phase.
    #[error("cannot {action} a rollout that is {phase}")]
    RolloutState {
        /// The control asked for.
        action: &'static str,
        /// The rollout's phase.
        phase: &'static str,
    },
    /// A rollout is already running.
    #[error("rollout {0} is still active; pause, abort or let it finish first")]
    RolloutRunning(u64),
    /// There is no rollout to control.
    #[error("no rollout {0}")]
    NoRollout(String),
    /// The change could not be written to the state file, so it was not applied.
    #[error("state not changed: {0}")]
    Persist(#[from] StateError),
    /// The control task is gone (the gateway is shutting down).
    #[error("the gateway is shutting down")]
    Stopped,
    /// The first list of RayClusters has not arrived for these scopes: the gateway does not know
    /// every cluster of its shards yet, so a split set or started now could leave some out.
    #[error(
        "the first list of RayClusters has not arrived yet ({0}); weights, shifts and rollouts \
         can be changed once it has (GET /ready answers 200)"
    )]
    DiscoveryPending(String),
}

impl ControlError {
    /// True when the request was at fault (answer 4xx), false for the gateway's own failures (5xx).
    pub fn is_client_error(&self) -> bool {
        self.status().is_client_error()
    }

    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode;
        match self {
            ControlError::UnknownShard(_)
            | ControlError::NoShift(_)
            | ControlError::NoRollout(_) => StatusCode::NOT_FOUND,
            ControlError::ShiftRunning(_)
            | ControlError::ShiftDraining(_)
            | ControlError::InRollout { .. }
            | ControlError::Transition(_)
            | ControlError::RolloutState { .. }
            | ControlError::RolloutRunning(_) => StatusCode::CONFLICT,
            ControlError::Persist(StateError::Conflict(_)) => StatusCode::CONFLICT,
            ControlError::Persist(StateError::KubeUncertain { .. }) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ControlError::Persist(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ControlError::Stopped | ControlError::DiscoveryPending(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// What a shift request asks for.
#[derive(Debug, Clone)]
pub struct ShiftRequest {
    /// The target: one cluster or a revision.
    pub target: Target,
    /// The policy (defaults already applied).
    pub policy: ShiftPolicy,
}

/// An operator control of a shift or rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Hold at the current weights.
    Pause,
    /// Go on.
    Resume,
    /// Go to 100% now (shifts only).
    Promote,
    /// Put the weights back.
    Abort,
}

impl Action {
    /// Parses `pause`, `resume`, `promote`, `abort`.
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "pause" => Action::Pause,
            "resume" => Action::Resume,
            "promote" => Action::Promote,
            "abort" => Action::Abort,
            _ => return None,
        })
    }
}

/// Requests to the control task.
#[derive(Debug)]
enum Command {
    /// Replace a shard's weights.
    SetWeights {
        shard: String,
        weights: BTreeMap<String, u64>,
        reply: oneshot::Sender<Result<BTreeMap<String, u32>, ControlError>>,
    },
    /// Start a shift of a shard.
    StartShift {
        shard: String,
        request: ShiftRequest,
        reply: oneshot::Sender<Result<Shift, ControlError>>,
    },
    /// Pause, resume, promote or abort a shard's shift.
    ControlShift {
        shard: String,
        action: Action,
        reply: oneshot::Sender<Result<Shift, ControlError>>,
    },
    /// Start a fleet rollout.
    StartRollout {
        revision: String,
        max_concurrent: usize,
        policy: ShiftPolicy,
        reply: oneshot::Sender<Result<Rollout, ControlError>>,
    },
    /// Clusters appeared, changed or disappeared.
    Discovery(DiscoveryEvent),
    /// Pause, resume or abort the active rollout (`id` None: the current one).
    ControlRollout {
        id: Option<u64>,
        action: Action,
        reply: oneshot::Sender<Result<Rollout, ControlError>>,
    },
    /// Fold the state journal into the state file and stop: nothing is written after it.
    Stop(oneshot::Sender<()>),
}

/// One weight change waiting for its answer.
#[derive(Debug)]
pub(crate) struct WeightChange {
    shard: String,
    weights: BTreeMap<String, u64>,
    reply: oneshot::Sender<Result<BTreeMap<String, u32>, ControlError>>,
}

/// A cheap, cloneable handle to the control plane.
#[derive(Clone, Debug)]
pub struct ControlHandle {
    commands: mpsc::Sender<Command>,
    table: Arc<ArcSwap<Snapshot>>,
    ready: watch::Receiver<bool>,
    leader: Option<watch::Receiver<Standing>>,
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

    /// True when this replica advances shifts: always with a local state file, else while it
    /// holds the Lease.
    pub fn is_leader(&self) -> bool {
        standing(&self.leader) == Standing::Leader
    }

    /// This replica's standing in the Lease election, read once ([`Standing::Leader`] when it
    /// runs alone).
    pub fn standing(&self) -> Standing {
        standing(&self.leader)
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

    /// Stops the control task after the commands queued before this one: the state journal is
    /// folded into the state file and nothing is written after that, so once the gateway has
    /// stopped the state file alone is current (see [`crate::state`]). Shifts stop advancing,
    /// and later commands answer [`ControlError::Stopped`]. A failed fold is logged (the journal
    /// still holds every change and is folded at the next start).
    pub async fn stop(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Stop(reply)).await.is_ok() {
            let _ = done.await;
        }
    }

    /// Sends a command and waits for its reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, ControlError>>) -> Command,
    ) -> Result<T, ControlError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(command(reply))
            .await
            .map_err(|_| ControlError::Stopped)?;
        rx.await.map_err(|_| ControlError::Stopped)?
    }

    /// Sets a shard's weights; on success they are in the state file and published.
    pub async fn set_weights(
        &self,
        shard: &str,
        weights: BTreeMap<String, u64>,
    ) -> Result<BTreeMap<String, u32>, ControlError> {
        let shard = shard.to_string();
        self.ask(|reply| Command::SetWeights {
            shard,
            weights,
            reply,
        })
        .await
    }

    /// Starts a shift; on success it is in the state file and returned.
    pub async fn start_shift(
        &self,
        shard: &str,
        request: ShiftRequest,
    ) -> Result<Shift, ControlError> {
        let shard = shard.to_string();
        self.ask(|reply| Command::StartShift {
            shard,
            request,
            reply,
        })
        .await
    }

    /// Pauses, resumes, promotes or aborts a shard's shift.
    pub async fn control_shift(&self, shard: &str, action: Action) -> Result<Shift, ControlError> {
        let shard = shard.to_string();
        self.ask(|reply| Command::ControlShift {
            shard,
            action,
            reply,
        })
        .await
    }

    /// Starts a fleet rollout of `revision`.
    pub async fn start_rollout(
        &self,
        revision: String,
        max_concurrent: usize,
        policy: ShiftPolicy,
    ) -> Result<Rollout, ControlError> {
        self.ask(|reply| Command::StartRollout {
            revision,
            max_concurrent,
            policy,
            reply,
        })
        .await
    }

    /// Hands a discovery event (clusters appeared, changed, disappeared) to the control task.
    pub async fn discovery(&self, event: DiscoveryEvent) -> Result<(), ControlError> {
        self.commands
            .send(Command::Discovery(event))
            .await
            .map_err(|_| ControlError::Stopped)
    }

    /// Pauses, resumes or aborts a rollout.
    pub async fn control_rollout(
        &self,
        id: Option<u64>,
        action: Action,
    ) -> Result<Rollout, ControlError> {
        self.ask(|reply| Command::ControlRollout { id, action, reply })
            .await
    }
}

/// How often shifts are advanced (gates, analysis windows, drains are checked).
const SHIFT_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// A cluster the control plane manages.
struct ClusterEntry {
    config: ClusterConfig,
    cluster: Arc<Cluster>,
    /// Latest probe result (None before the first). Shift gates and passive health's readmission
    /// read it as it is.
    probe: Option<ProbeReport>,
    /// Ready by its probes, for the splits: since it last passed, fewer than
    /// `probe.failure_threshold` rounds in a row failed.
    probe_ready: bool,
    /// Routes of the last probe that had them, kept while the cluster is down so its apps stay known.
    last_routes: BTreeMap<String, String>,
    prober: JoinHandle<()>,
    /// Where the cluster came from.
    source: ClusterSource,
    /// When its source object was created (Unix seconds), when known.
    created: Option<u64>,
    /// The discovery source's own readiness (Kubernetes: head pod ready, not suspended or being
    /// deleted).
    external_ready: bool,
    /// Passive health: ejected from the split until this time (and a successful probe after it).
    ejected_until: Option<tokio::time::Instant>,
    /// Ejections in a row (the ejection time doubles with each).
    ejections: u32,
    /// When the last ejection ended.
    returned_at: Option<tokio::time::Instant>,
    /// The cluster's gauges (weight, ready, draining, drained, ejected).
    gauges: gauges::ClusterGauges,
}

impl ClusterEntry {
    /// Whether this cluster's source object existed when `shift` was promoted, so that it is the
    /// old cluster the shift drains and not a new one created since under the same name. Whole
    /// seconds: one created in the promotion's second counts as the old one, as
    /// `discovery.kubernetes.delete_drained` judges it; unknown times count as the old one.
    fn predates(&self, shift: &crate::shift::Shift) -> bool {
        match (self.created, shift.promoted_at) {
            (Some(created), Some(promoted)) => created <= promoted,
            _ => true,
        }
    }

    /// Ready to serve by every account: its discovery source says so, its probes pass, and passive
    /// health has not ejected it.
    fn serving_ready(&self) -> bool {
        self.external_ready && self.probe_ready && self.ejected_until.is_none()
    }
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
    store: Store,
    /// This replica's standing in the Lease election (`None`: a single replica, always leading).
    leader: Option<watch::Receiver<Standing>>,
    /// Whether the last tick judged shifts (held the Lease, or was stranded): on starting to
    /// judge, the shifts' timers start afresh.
    leading: bool,
    table: Arc<ArcSwap<Snapshot>>,
    version: u64,
    /// Route conflicts already logged, so a rebuild does not repeat them.
    warned: HashSet<String>,
    /// App name -> shard by the consistent hash over the declared shards.
    placement: Placement,
    /// Probes new clusters.
    prober: Prober,
    /// Where probes report.
    probe_tx: mpsc::UnboundedSender<ProbeReport>,
    /// Probe reports, applied by the control loop, and while a state write is in flight
    /// ([`Desired::persist`]).
    probes: mpsc::UnboundedReceiver<ProbeReport>,
    /// Discovery scopes (Kubernetes namespaces; `None`: all) whose first list has not arrived:
    /// the gateway is not ready before they have.
    discovery_pending: std::collections::BTreeSet<Option<String>>,
    /// Gauges of the declared shards, in declaration order.
    shard_gauges: Vec<gauges::ShardGauges>,
    /// Gauges of the current rollout.
    rollout_gauges: gauges::RolloutGauges,
    /// Routing tables published.
    table_updates: metrics::Counter,
    /// Apps served by draining clusters in the last table published, per declared shard in
    /// declaration order: such a shard's drain waits (see `warn_on_draining`).
    apps_on_draining_per_shard: Vec<usize>,
    /// Shards whose tick transitions (a failed check, a rollback) were applied before their write,
    /// and no write holding them has succeeded yet.
    unsaved: std::collections::BTreeSet<String>,
    /// Shards a clock tick stepped back (a failed check, a rollback) while a state write was in
    /// flight: newer than what that write holds for them.
    stepped_back_in_flight: std::collections::BTreeSet<String>,
    /// Shards whose shift the write in flight changes.
    changed_in_flight: std::collections::BTreeSet<String>,
    /// Shards whose shift the write in flight takes out of progress (a promotion, a pause, an
    /// abort): not judged until it lands.
    ending_in_flight: std::collections::BTreeSet<String>,
    /// Stepped down with changes it could not write: the shared state is to be read again.
    reload_shared: bool,
    /// After a clock tick's write failed: no tick writes before then.
    write_retry_at: Option<tokio::time::Instant>,
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

/// Where the state lives: a local file (one replica) or a ConfigMap shared by replicas.
#[derive(Debug, Clone)]
pub enum Store {
    /// `state_file`, written by its own thread.
    File(StateWriter),
    /// `discovery.kubernetes.state`.
    ConfigMap(Arc<ConfigMapStore>),
    /// Tests: writes and reads the test answers when it chooses.
    #[cfg(test)]
    Test(Arc<test_store::TestStore>),
}

impl Store {
    /// Whether the state is shared with other replicas.
    fn is_shared(&self) -> bool {
        match self {
            Store::File(_) => false,
            Store::ConfigMap(_) => true,
            #[cfg(test)]
            Store::Test(store) => store.shared,
        }
    }
}

/// Loads the state, starts probes of every configured cluster and the owner task.
///
/// `probe_tls` is the TLS client configuration probes of `https://` clusters use (the one requests
/// use, so both trust the same certificates). `kube` is the Kubernetes client when
/// `discovery.kubernetes` is configured; with `discovery.kubernetes.state` the state lives in a
/// ConfigMap and a Lease elects the replica that advances shifts.
pub async fn start(
    config: Arc<Config>,
    probe_tls: rustls::ClientConfig,
    kube: Option<kube::Client>,
) -> Result<ControlHandle, StartError> {
    let (state_tx, state_rx) = mpsc::channel(16);
    let (ready_tx, ready) = watch::channel(false);
    let shared = kube.zip(config.kubernetes.as_ref().and_then(|k| k.state.clone()));
    let (store, state, election) = match shared {
        Some((client, st)) => {
            let store = Arc::new(ConfigMapStore::new(
                client.clone(),
                &st.namespace,
                &st.configmap,
            ));
            let state = store.load().await?.unwrap_or_else(State::new);
            Arc::clone(&store).watch(state_tx);
            let identity = st.identity.clone().unwrap_or_else(default_identity);
            tracing::info!(configmap = %store.origin().display(), lease = %st.lease, %identity, "state shared through Kubernetes");
            // Campaigns only once ready (the first lists of RayClusters are in): a replica that
            // cannot list would hold the Lease and advance nothing.
            let election = crate::kube_state::elect(
                client,
                &st.namespace,
                &st.lease,
                identity,
                st.lease_duration,
                ready.clone(),
            );
            (Store::ConfigMap(store), state, Some(election))
        }
        None => {
            let (writer, state) = StateWriter::open(StateStore::new(&config.state_file))?;
            (Store::File(writer), state.unwrap_or_else(State::new), None)
        }
    };
    let (commands, command_rx) = mpsc::channel(64);
    let prober = Prober::with_tls(config.probe.interval, config.probe.timeout, probe_tls)
        .with_failure_threshold(config.probe.failure_threshold);
    let desired = Desired::new(config, store, state, election.clone(), prober)?;
    let table = Arc::clone(&desired.table);
    tokio::spawn(run(desired, command_rx, state_rx, ready_tx));
    Ok(ControlHandle {
        commands,
        table,
        ready,
        leader: election,
    })
}

impl Desired {
    /// The desired state over `state`, with probes of every configured cluster started and a first
    /// table published; the control loop is not started.
    fn new(
        config: Arc<Config>,
        store: Store,
        state: State,
        leader: Option<watch::Receiver<Standing>>,
        prober: Prober,
    ) -> Result<Desired, StartError> {
        let (probe_tx, probe_rx) = mpsc::unbounded_channel();
        let placement = Placement::new(config.shards.iter().map(|s| (s.name.as_str(), s.weight)));
        let mut desired = Desired {
            prober,
            probe_tx,
            probes: probe_rx,
            clusters: Vec::with_capacity(config.clusters.len()),
            config: Arc::clone(&config),
            state,
            store,
            leader,
            leading: false,
            table: Arc::new(ArcSwap::from_pointee(Snapshot::empty())),
            version: 0,
            warned: HashSet::new(),
            placement,
            shard_gauges: config
                .shards
                .iter()
                .map(|s| gauges::ShardGauges::new(&s.name))
                .collect(),
            rollout_gauges: gauges::RolloutGauges::new(),
            table_updates: metrics::counter!(crate::telemetry::ROUTING_TABLE_UPDATES_TOTAL),
            apps_on_draining_per_shard: Vec::new(),
            unsaved: Default::default(),
            stepped_back_in_flight: Default::default(),
            changed_in_flight: Default::default(),
            ending_in_flight: Default::default(),
            reload_shared: false,
            write_retry_at: None,
            discovery_pending: match &config.kubernetes {
                None => Default::default(),
                Some(k) if k.namespaces.is_empty() => [None].into(),
                Some(k) => k.namespaces.iter().cloned().map(Some).collect(),
            },
        };
        for c in &config.clusters {
            desired.add_cluster(DiscoveredCluster {
                config: c.clone(),
                ready: true,
                source: ClusterSource::Static,
                created: None,
            })?;
        }
        // The first table before anything can read it: the admin API, started after this returns,
        // never answers from the empty placeholder (a shift's shard would be "unknown").
        desired.publish();
        Ok(desired)
    }
}

/// A replica's standing: its election's, or [`Standing::Leader`] when it runs alone.
fn standing(election: &Option<watch::Receiver<Standing>>) -> Standing {
    election.as_ref().map_or(Standing::Leader, |e| *e.borrow())
}

/// This replica's Lease identity: `POD_NAME` (set it from the downward API), else host and pid.
fn default_identity() -> String {
    std::env::var("POD_NAME").unwrap_or_else(|_| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
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
    mut shared_state: mpsc::Receiver<(State, Option<String>)>,
    ready: watch::Sender<bool>,
) {
    // Ready once discovery has listed its clusters and every cluster has been probed once, or
    // after a bounded wait for slow probes. The wait starts again when discovery's first lists
    // arrive: clusters discovered late get their first probe round too.
    // A round is up to three requests (healthz, routes, the dashboard), each bounded by the timeout.
    let first_round = desired.config.probe.timeout * 3 + std::time::Duration::from_millis(200);
    let deadline = tokio::time::sleep(first_round);
    tokio::pin!(deadline);
    let mut waited = false;
    let mut announced = false;
    let mut listing = !desired.discovery_pending.is_empty();
    // Shifts, rollouts and automatic shifts advance on this clock.
    let mut tick = tokio::time::interval(SHIFT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if listing && desired.discovery_pending.is_empty() {
            listing = false;
            waited = false;
            deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + first_round);
        }
        if !announced
            && desired.discovery_pending.is_empty()
            && (waited || desired.clusters.iter().all(|c| c.probe.is_some()))
        {
            announced = true;
            let _ = ready.send(true);
        }
        tokio::select! {
            _ = tick.tick() => desired.tick().await,
            cmd = commands.recv() => match cmd {
                Some(cmd) => {
                    // Take what else is queued, so weight changes that arrived together share one
                    // state-file write.
                    let mut batch = vec![cmd];
                    while batch.len() < 256 {
                        match commands.try_recv() {
                            Ok(cmd) => batch.push(cmd),
                            Err(_) => break,
                        }
                    }
                    if let Some(stopped) = desired.handle_batch(batch).await {
                        let _ = stopped.send(());
                        return;
                    }
                }
                None => return,
            },
            report = desired.probes.recv() => {
                let Some(report) = report else { return };
                desired.apply_probes(report);
            }
            Some((state, version)) = shared_state.recv() => desired.adopt_shared_state(state, version),
            () = &mut deadline, if !waited => {
                waited = true;
                if desired.clusters.iter().any(|c| c.probe.is_none()) {
                    tracing::warn!("not every cluster answered its first probe in time; serving with what is known");
                }
            }
        }
    }
}

mod desired;
mod gauges;
mod health;
mod membership;

pub use membership::{ClusterSource, DiscoveredCluster, DiscoveryEvent};
mod revision;
mod shifts;
#[cfg(test)]
mod test_store;
#[cfg(test)]
mod tests_in_flight;

pub use revision::natural_cmp;

#[cfg(test)]
mod tests {
    use super::*;

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

#[cfg(test)]
mod stamp_tests {
    use std::collections::BTreeMap;

    use super::desired::stamp_if_changed;
    use crate::shift::{Shift, ShiftPolicy, Target};

    fn shift() -> Shift {
        Shift::new(
            Target::Cluster("green".into()),
            vec!["green".into()],
            ShiftPolicy::default(),
            BTreeMap::from([("blue".into(), 100), ("green".into(), 0)]),
        )
    }

    /// A changed shift is stamped now, and never before the decision it came from (another
    /// replica's clock ahead of this one's); an unchanged one keeps its stamp.
    #[test]
    fn a_decision_is_stamped_after_the_one_it_came_from() {
        let mut before = shift();
        before.decided_at = Some(5_000);
        let mut same = before.clone();
        assert!(!stamp_if_changed(&mut same, Some(&before), 9_000));
        assert_eq!(same.decided_at, Some(5_000));
        let mut stepped = before.clone();
        stepped.step = 1;
        assert!(stamp_if_changed(&mut stepped, Some(&before), 9_000));
        assert_eq!(stepped.decided_at, Some(9_000));
        let mut behind = before.clone();
        behind.step = 1;
        assert!(stamp_if_changed(&mut behind, Some(&before), 4_000));
        assert_eq!(behind.decided_at, Some(5_001));
        let mut new = shift();
        assert!(stamp_if_changed(&mut new, None, 7_000));
        assert_eq!(new.decided_at, Some(7_000));
    }
}
