//! Shared state for several gateway replicas in Kubernetes: a ConfigMap holds the state document
//! (weights, shifts, rollout) and a `coordination.k8s.io/v1` Lease elects the one replica that
//! advances shifts.
//!
//! Every replica watches the ConfigMap and routes by it. Every write is a compare-and-swap on the
//! ConfigMap's `resourceVersion`: a replica that lost a race gets a conflict, reloads and retries,
//! so no update is lost. Only the Lease holder advances shifts, rollouts and automatic shifts; when
//! it dies, another replica takes the Lease once it expires and continues from the stored step. A
//! replica that gets no answer from the API server is stranded ([`Standing::Stranded`]): it judges
//! its shifts for rollbacks, in memory.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::Client;
use tokio::sync::{mpsc, watch};

use crate::state::{self, State, StateError};

/// Key of the state document in the ConfigMap.
pub const STATE_KEY: &str = "state.json";

/// Longest wait for one answer of the Kubernetes API on the state and Lease paths. The client has
/// no read timeout of its own, so an API server that stopped answering on an open connection
/// (hung, or a half-open connection) would otherwise hold the control loop (every change, probe
/// report and discovery event queues behind the write) until TCP gives up, minutes later.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

/// `call` bounded by `limit`.
async fn bounded<T>(
    limit: Duration,
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<Result<T, kube::Error>, ApiTimeout> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| ApiTimeout(limit))
}

/// The Kubernetes API did not answer within the time given.
#[derive(Debug, thiserror::Error)]
#[error("the Kubernetes API did not answer within {}", humantime::format_duration(*.0))]
pub struct ApiTimeout(pub Duration);

/// The state document in a ConfigMap, written with optimistic concurrency.
#[derive(Debug)]
pub struct ConfigMapStore {
    api: Api<ConfigMap>,
    name: String,
    origin: PathBuf,
    /// The newest `resourceVersion` this replica holds, and the ones it wrote.
    versions: Mutex<Versions>,
}

/// How many of its own writes' `resourceVersions` a replica remembers. The watch delivers events
/// in order, so the event of a replica's own write can only trail its newest by the writes it
/// made since: a handful, unless thousands of writes outrun one watch event.
const KNOWN_VERSIONS: usize = 256;

/// The `resourceVersion` a replica holds (read or written), and the ones it wrote. Versions are
/// opaque strings to clients (only equality is defined), so a watch event is recognised as the
/// replica's own write by membership. The control loop also skips an event older than the version
/// it holds, comparing versions as numbers where they are (etcd revisions).
#[derive(Debug, Default)]
struct Versions {
    newest: Option<String>,
    written: VecDeque<String>,
}

impl Versions {
    /// A version this replica now holds; `wrote`: its own write.
    fn record(&mut self, version: Option<String>, wrote: bool) {
        if let (Some(version), true) = (&version, wrote) {
            if !self.wrote(version) {
                if self.written.len() == KNOWN_VERSIONS {
                    self.written.pop_front();
                }
                self.written.push_back(version.clone());
            }
        }
        self.newest = version;
    }

    fn wrote(&self, version: &str) -> bool {
        self.written.iter().any(|k| k == version)
    }

    /// Whether a watched `version` may be newer than the one held: not this replica's own write,
    /// and, where both are numbers (etcd revisions, which only increase), greater.
    fn is_news(&self, version: Option<&str>) -> bool {
        let Some(version) = version else {
            return true;
        };
        if self.wrote(version) {
            return false;
        }
        let number = |v: &str| v.parse::<u64>().ok();
        match (number(version), self.newest.as_deref().and_then(number)) {
            (Some(event), Some(held)) => event > held,
            _ => true,
        }
    }
}

impl ConfigMapStore {
    /// The store `namespace/name`.
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            origin: PathBuf::from(format!("configmap {namespace}/{name}")),
            versions: Mutex::new(Versions::default()),
        }
    }

    /// Where the state lives, for messages.
    pub fn origin(&self) -> &std::path::Path {
        &self.origin
    }

    fn kube_error(&self, e: impl std::fmt::Display) -> StateError {
        StateError::Kube {
            path: self.origin.clone(),
            message: e.to_string(),
        }
    }

    /// Records the `resourceVersion` of the state this replica now holds (read, or adopted from
    /// the watch).
    pub(crate) fn remember(&self, version: Option<String>) {
        if let Ok(mut v) = self.versions.lock() {
            v.record(version, false);
        }
    }

    /// Records the `resourceVersion` of this replica's own write.
    fn remember_write(&self, version: Option<String>) {
        if let Ok(mut v) = self.versions.lock() {
            v.record(version, true);
        }
    }

    /// The last `resourceVersion` seen.
    pub fn seen_version(&self) -> Option<String> {
        self.versions.lock().ok().and_then(|v| v.newest.clone())
    }

    /// Whether `version` is one of this replica's own writes: its watch event (possibly arriving
    /// after the replica wrote again) carries nothing the replica does not hold.
    pub fn wrote(&self, version: Option<&str>) -> bool {
        version.is_some_and(|version| self.versions.lock().is_ok_and(|v| v.wrote(version)))
    }

    /// Whether a watch event of `version` is to be adopted: not this replica's own write, and not
    /// older than the version it holds (an event queued while the replica read a newer version on
    /// a conflict, or wrote one). Versions are compared as numbers where both are (etcd
    /// revisions); otherwise only own writes are skipped.
    pub fn is_news(&self, version: Option<&str>) -> bool {
        self.versions.lock().map_or(true, |v| v.is_news(version))
    }

    /// Reads the state (`None`: no ConfigMap or no state in it yet).
    pub async fn load(&self) -> Result<Option<State>, StateError> {
        let cm = match bounded(API_TIMEOUT, self.api.get_opt(&self.name)).await {
            Ok(Ok(cm)) => cm,
            Ok(Err(e)) => return Err(self.kube_error(e)),
            Err(e) => return Err(self.kube_error(e)),
        };
        let Some(cm) = cm else {
            self.remember(None);
            return Ok(None);
        };
        // The version is held only with a state this replica could read: holding a version whose
        // state it cannot (a newer format, a hand edit) would let its next write replace that
        // state with its own, older one.
        let parsed = self.parse(&cm)?;
        self.remember(cm.metadata.resource_version.clone());
        Ok(parsed.map(|(state, _)| state))
    }

    /// The state in a ConfigMap and its `resourceVersion`.
    pub fn parse(&self, cm: &ConfigMap) -> Result<Option<(State, Option<String>)>, StateError> {
        let Some(text) = cm.data.as_ref().and_then(|d| d.get(STATE_KEY)) else {
            return Ok(None);
        };
        let state = state::parse(text.as_bytes(), &self.origin)?;
        Ok(Some((state, cm.metadata.resource_version.clone())))
    }

    /// Writes `state` if nobody wrote since this replica's last read or write; otherwise
    /// [`StateError::Conflict`] and nothing changes.
    ///
    /// An existing ConfigMap gets a merge patch of the state key alone, carrying the held
    /// `resourceVersion` (the API server refuses it with a conflict when the object changed): its
    /// other keys, labels, annotations and owners (a ConfigMap created by Helm, say) stay. A
    /// ConfigMap deleted meanwhile is a conflict too: the reload finds none, and the next write
    /// creates it.
    pub async fn save(&self, next: &State) -> Result<(), StateError> {
        let text = serde_json::to_string_pretty(next).map_err(|e| self.kube_error(e))?;
        let result = match self.seen_version() {
            Some(version) => {
                let patch = serde_json::json!({
                    "metadata": { "resourceVersion": version },
                    "data": { STATE_KEY: text },
                });
                bounded(
                    API_TIMEOUT,
                    self.api
                        .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await
            }
            None => {
                let cm = ConfigMap {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/name".into(),
                            "rayshift".into(),
                        )])),
                        ..ObjectMeta::default()
                    },
                    data: Some(BTreeMap::from([(STATE_KEY.to_string(), text)])),
                    ..ConfigMap::default()
                };
                bounded(API_TIMEOUT, self.api.create(&PostParams::default(), &cm)).await
            }
        };
        let result = match result {
            Ok(result) => result,
            // The write may still be applied: the next one then conflicts on the resourceVersion,
            // reloads and retries, so nothing is applied twice; and the watch brings it here.
            Err(timeout) => {
                return Err(StateError::KubeUncertain {
                    path: self.origin.clone(),
                    message: timeout.to_string(),
                })
            }
        };
        match result {
            Ok(written) => {
                self.remember_write(written.metadata.resource_version);
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Err(StateError::Conflict(self.origin.clone()))
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                self.remember(None);
                Err(StateError::Conflict(self.origin.clone()))
            }
            Err(e) => Err(self.kube_error(e)),
        }
    }

    /// Watches the ConfigMap and sends every state another replica wrote.
    pub fn watch(
        self: std::sync::Arc<Self>,
        updates: mpsc::Sender<(State, Option<String>)>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
            let mut stream = kube::runtime::WatchStreamExt::default_backoff(watcher::watcher(
                self.api.clone(),
                cfg,
            ))
            .boxed();
            while let Some(event) = stream.next().await {
                let cm = match event {
                    Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm)) => cm,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "state ConfigMap watch error; retrying");
                        continue;
                    }
                };
                if self.wrote(cm.metadata.resource_version.as_deref()) {
                    // Our own write: possibly older than the version this replica holds now
                    // (two writes in a row, the first's event late).
                    continue;
                }
                match self.parse(&cm) {
                    Ok(Some(update)) => {
                        if updates.send(update).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "state ConfigMap unreadable; keeping the current state")
                    }
                }
            }
        })
    }
}

/// A replica's standing in the Lease election ([`elect`]), one value so that a reader never sees
/// half of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    /// Another replica may hold the Lease (or none has been taken yet).
    Follower,
    /// This replica holds the Lease.
    Leader,
    /// This replica gets no answer from the API server (timeouts, failed connections, 429 and 5xx
    /// statuses): it held the Lease and cannot renew it, or it followed and has heard nothing for
    /// two thirds of the Lease's duration. It does not lead, and it cannot learn what the leader
    /// decides; it may still judge its shifts for rollbacks, which need no write.
    Stranded,
}

/// Runs leader election on a Lease, from when `start` is first true (the replica is ready: a
/// replica that cannot list its clusters must not hold the Lease, which would keep the others
/// from advancing shifts).
pub fn elect(
    client: Client,
    namespace: &str,
    name: &str,
    identity: String,
    duration: Duration,
    mut start: watch::Receiver<bool>,
) -> watch::Receiver<Standing> {
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let name = name.to_string();
    let (tx, rx) = watch::channel(Standing::Follower);
    tokio::spawn(async move {
        if start.wait_for(|ready| *ready).await.is_err() {
            return;
        }
        let mut last_renewal: Option<tokio::time::Instant> = None;
        // When the attempts that got no answer began (the first of them), since the last answer
        // (anything: the Lease, a conflict, a refusal).
        let mut silent_since: Option<tokio::time::Instant> = None;
        loop {
            // A renewal is valid from when it was sent (the Lease's renewTime), and one that hangs
            // gives up early enough for another attempt while the last renewal still holds.
            let started = tokio::time::Instant::now();
            let attempt = bounded(
                (duration / 6).min(API_TIMEOUT),
                try_acquire(&api, &name, &identity, duration),
            )
            .await;
            let no_answer = no_answer(&attempt);
            let attempt = attempt
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let failed = attempt.is_err();
            if no_answer {
                silent_since.get_or_insert(started);
            } else {
                silent_since = None;
            }
            // Led (or was already stranded) and gets no answer now; or followed and has had no
            // answer for as long as a leader keeps leading without one (the leader's decisions
            // cannot reach it either: with the API server away, every replica judges its shifts).
            let stranded = no_answer
                && (*tx.borrow() != Standing::Follower
                    || silent_since.is_some_and(|t| t.elapsed() >= duration * 2 / 3));
            let leader = match attempt {
                Ok(held) => {
                    // Not held: another replica leads; an old renewal must not make this one
                    // leader again when its next attempt fails.
                    last_renewal = held.then_some(started);
                    held
                }
                Err(e) => {
                    tracing::warn!(lease = %name, error = %e, "lease renewal failed");
                    // Keep leading only while the last renewal is still valid.
                    last_renewal.is_some_and(|t| t.elapsed() < duration * 2 / 3)
                }
            };
            let standing = match (leader, stranded) {
                (true, _) => Standing::Leader,
                (false, true) => Standing::Stranded,
                (false, false) => Standing::Follower,
            };
            let before = *tx.borrow();
            if (before == Standing::Leader) != leader {
                tracing::info!(lease = %name, %identity, leader, "leadership changed");
            }
            if before != standing && standing == Standing::Stranded {
                let led = before == Standing::Leader;
                tracing::warn!(lease = %name, %identity, led, "stranded: no answer from the API server; judging shifts for rollbacks only, writing nothing");
            }
            if before == Standing::Stranded && standing != Standing::Stranded {
                tracing::info!(lease = %name, %identity, leader, "no longer stranded: the API server answers");
            }
            if tx.send(standing).is_err() {
                return;
            }
            // After a failure, try again soon: leadership lasts only while a renewal is recent.
            tokio::time::sleep(if failed { duration / 12 } else { duration / 3 }).await;
        }
    });
    rx
}

/// Whether a Lease call got no answer (a timeout, a connection that failed, a server or its load
/// balancer too busy or broken to answer: 429, 5xx), as opposed to an answer that another replica
/// may hold the Lease by now (the Lease itself, a conflict, a refusal).
fn no_answer(attempt: &Result<Result<bool, kube::Error>, ApiTimeout>) -> bool {
    match attempt {
        Err(_) => true,
        Ok(Err(kube::Error::Api(status))) => status.code == 429 || status.code >= 500,
        Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
    }
}

/// Acquires or renews the Lease; true when this replica holds it afterwards.
async fn try_acquire(
    api: &Api<Lease>,
    name: &str,
    identity: &str,
    duration: Duration,
) -> Result<bool, kube::Error> {
    let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
    // Whole seconds, rounded up: other replicas must not think the Lease expired while this one
    // still leads by its own clock.
    let whole = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    let seconds = i32::try_from(whole).unwrap_or(i32::MAX).max(1);
    let Some(mut lease) = api.get_opt(name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.to_string()),
                lease_duration_seconds: Some(seconds),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let ours = spec.holder_identity.as_deref() == Some(identity);
    let expired = spec.renew_time.as_ref().is_none_or(|t| {
        let age = k8s_openapi::jiff::Timestamp::now().duration_since(t.0);
        age.as_secs_f64() > f64::from(spec.lease_duration_seconds.unwrap_or(seconds))
    });
    if !ours && !expired {
        return Ok(false);
    }
    if !ours {
        spec.holder_identity = Some(identity.to_string());
        spec.acquire_time = Some(now.clone());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
    }
    spec.renew_time = Some(now);
    spec.lease_duration_seconds = Some(seconds);
    // The resourceVersion in `lease` makes this a compare-and-swap: two replicas racing for an
    // expired Lease cannot both win.
    match api.replace(name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_timeouts_failed_connections_429_and_5xx_are_no_answer() {
        let status = |code: u16| -> Result<Result<bool, kube::Error>, ApiTimeout> {
            Ok(Err(kube::Error::Api(
                kube::core::Status {
                    code,
                    ..Default::default()
                }
                .boxed(),
            )))
        };
        assert!(no_answer(&Err(ApiTimeout(Duration::from_secs(1)))));
        assert!(no_answer(&Ok(Err(
            kube::Error::LinesCodecMaxLineLengthExceeded
        ))));
        for code in [429, 500, 502, 503, 504] {
            assert!(no_answer(&status(code)), "{code}");
        }
        for code in [401, 403, 404, 409, 422] {
            assert!(!no_answer(&status(code)), "{code}");
        }
        assert!(!no_answer(&Ok(Ok(true))));
        assert!(!no_answer(&Ok(Ok(false))));
    }

    #[test]
    fn own_writes_are_known_after_the_next_write_and_reads_are_not() {
        let mut v = Versions::default();
        v.record(Some("3".into()), true);
        v.record(Some("4".into()), true);
        // The watch event of "3" arriving after the write of "4" is the replica's own.
        assert!(v.wrote("3") && v.wrote("4"));
        assert_eq!(v.newest.as_deref(), Some("4"));
        // A version read on a conflict: held, not skipped (the events of the writes before it
        // are adopted in order, ending on it).
        v.record(Some("8".into()), false);
        assert_eq!(v.newest.as_deref(), Some("8"));
        assert!(!v.wrote("7") && !v.wrote("8"));
        v.record(None, false);
        assert_eq!(v.newest, None);
        assert!(v.wrote("4"), "forgetting the newest keeps the writes");
    }

    #[test]
    fn only_newer_versions_of_other_writers_are_news() {
        let mut v = Versions::default();
        v.record(Some("6".into()), false);
        assert!(v.is_news(Some("7")));
        // Read 8 on a conflict, then wrote 9: the queued events of 7 and 8 are old, 9 is its own.
        v.record(Some("8".into()), false);
        v.record(Some("9".into()), true);
        for old in ["7", "8", "9"] {
            assert!(!v.is_news(Some(old)), "{old}");
        }
        assert!(v.is_news(Some("10")));
        // Not numbers: only own writes are skipped.
        v.record(Some("b".into()), true);
        assert!(!v.is_news(Some("b")));
        assert!(v.is_news(Some("a")));
    }

    #[test]
    fn remembered_writes_are_bounded() {
        let mut v = Versions::default();
        for i in 0..KNOWN_VERSIONS + 10 {
            v.record(Some(i.to_string()), true);
        }
        assert_eq!(v.written.len(), KNOWN_VERSIONS);
        assert!(!v.wrote("0"));
        assert!(v.wrote(&(KNOWN_VERSIONS + 9).to_string()));
    }
}
