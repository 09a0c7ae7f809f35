//! The shift state machine of one shard: pure logic, driven by a clock and observations.
//!
//! ```text
//!             gates + analysis pass, interval passed: step
//!            +-------------------+
//!            v                   |
//! start -> Progressing ----------+--- reaches 100% / promote ---> Draining --> Completed
//!            |   ^                                                 (old clusters drained)
//!      pause |   | resume
//!            v   |
//!           Paused
//! Progressing | Paused --abort--> Aborted          (weights back to where the shift started)
//! Progressing --failed checks / not ready too long--> RolledBack   (weights back, reason kept)
//! ```
//! The machine never does I/O: the control plane feeds it [`Observation`]s and the time, persists it
//! after every change, and applies [`Shift::weights`].

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::shift::policy::ShiftPolicy;
use crate::stats::StatsSnapshot;

/// Where a shift moves traffic to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// One cluster.
    Cluster(String),
    /// Every (ready) cluster of a revision in the shard, sharing the weight equally.
    Revision(String),
}

/// The phase of a shift.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Stepping towards 100%.
    Progressing,
    /// Held by an operator; weights unchanged.
    Paused,
    /// At 100%; old clusters take no new requests and finish what they have.
    Draining,
    /// Old clusters drained: safe to delete.
    Completed,
    /// Rolled back automatically; weights are back where the shift started.
    RolledBack,
    /// Aborted by an operator; weights are back where the shift started.
    Aborted,
}

impl Phase {
    /// Every phase, for metrics.
    pub const ALL: [Phase; 6] = [
        Phase::Progressing,
        Phase::Paused,
        Phase::Draining,
        Phase::Completed,
        Phase::RolledBack,
        Phase::Aborted,
    ];

    /// Lowercase name used in the API, state file and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Draining => "draining",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
        }
    }

    /// Still moving traffic (weights are the shift's, not the operator's).
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused | Phase::Draining)
    }
}

/// The outcome of one analysis check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// Step (0-based count of steps taken) the check ran at.
    pub step: u32,
    /// Target requests in the window.
    pub requests: u64,
    /// Target error rate in the window.
    pub error_rate: f64,
    /// Target p99 time to response headers in the window, in milliseconds.
    pub p99_ms: Option<f64>,
    /// `passed`, `failed` or `waiting` (fewer than `min_requests`).
    pub result: CheckResult,
    /// What failed, or what is awaited.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// Result of a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckResult {
    /// Within thresholds.
    Passed,
    /// Over a threshold.
    Failed,
    /// Not enough requests yet.
    Waiting,
}

/// What the control plane observed for this tick.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    /// Every target cluster passes its gates (healthz, routes list the shard's apps, dashboard).
    pub target_ready: bool,
    /// Why not, when not.
    pub gate_detail: String,
    /// A target cluster is ejected by passive health (it passes its probes but failed request
    /// after request), and why. Evidence enough to fail a check without `min_requests`.
    pub target_ejected: Option<String>,
    /// Cumulative outcome counters of the target clusters, summed.
    pub target_stats: StatsSnapshot,
    /// Requests still in flight on the draining clusters.
    pub draining_in_flight: u64,
    /// Other gateway replicas (sharing the state) may have requests in flight on the draining
    /// clusters, which this one cannot see: the drain then lasts its whole `drain_timeout`.
    pub in_flight_elsewhere: bool,
    /// Apps of the shard are served by the draining clusters, no other cluster of theirs (the
    /// target) able to take requests: the drain lasts while they are, so the old clusters are not
    /// declared safe to delete while they carry the shard; still so at `drain_timeout`, the shift
    /// rolls back.
    pub draining_serve: bool,
}

/// Something that happened, for logs and metrics.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The target weight went up.
    Stepped {
        /// New target weight.
        weight: u32,
    },
    /// A check failed (`check` is `error_rate` or `latency`).
    CheckFailed {
        /// Which threshold.
        check: &'static str,
        /// Details.
        detail: String,
    },
    /// Rolled back (`reason` is `error_rate`, `latency` or `not_ready`).
    RolledBack {
        /// Short reason label.
        reason: &'static str,
        /// Full explanation.
        detail: String,
    },
    /// Reached 100%: old clusters draining.
    Promoted,
    /// The window has too few requests to judge; the shift holds until it has enough.
    Waiting,
    /// Old clusters drained (or the drain timed out).
    Drained {
        /// True when the drain timeout cut it short.
        timed_out: bool,
    },
    /// A cluster of the target revision that became ready after the shift started joined the
    /// target: it shares the target weight from now.
    TargetJoined {
        /// The cluster.
        cluster: String,
    },
}

/// A refused control (pause, resume, promote, abort) in the current phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a shift that is {phase}")]
pub struct InvalidTransition {
    /// The control asked for.
    pub action: &'static str,
    /// The phase it was in.
    pub phase: &'static str,
}

/// Added to what is left of a drain resumed after a restart or by another replica, whose clock
/// may differ from the promoting one's (and `promoted_at` is in whole seconds).
const CLOCK_ALLOWANCE: Duration = Duration::from_secs(2);

/// Timers and the analysis window: in memory only. After a restart they start afresh (the next
/// step waits one more interval), which errs on the side of caution.
#[derive(Debug, Clone, Default)]
struct Runtime {
    step_due: Option<Instant>,
    window_base: Option<StatsSnapshot>,
    not_ready_since: Option<Instant>,
    /// Time the target was not ready since the last step, in spells that have ended.
    not_ready_before: Duration,
    drain_deadline: Option<Instant>,
}

/// Milliseconds since the Unix epoch, by this replica's clock (`started_at`, `decided_at`).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One shard's shift. Everything but the timers is persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Shift {
    /// What was asked for.
    pub target: Target,
    /// The clusters that receive the target weight.
    pub target_clusters: Vec<String>,
    /// The policy in force.
    pub policy: ShiftPolicy,
    /// The shard's weights when the shift started (restored by rollback and abort).
    pub start_weights: BTreeMap<String, u32>,
    /// Current total weight of the target clusters (0-100).
    pub target_weight: u32,
    /// Steps taken.
    pub step: u32,
    /// Current phase.
    pub phase: Phase,
    /// Failed checks in a row.
    pub consecutive_failures: u32,
    /// The latest analysis check.
    pub last_check: Option<Check>,
    /// Why it was rolled back or aborted.
    pub reason: Option<String>,
    /// Clusters that had weight before and are drained at promotion.
    pub old_clusters: Vec<String>,
    /// When the shift was promoted (began draining), in seconds since the Unix epoch. A RayCluster
    /// created after it is not one of `old_clusters`, even under the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at: Option<u64>,
    /// When the shift was started, in milliseconds since the Unix epoch: tells a shift started
    /// again with the same target and start weights from the one before. Unknown for shifts
    /// stored by older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// When the shift last changed (a step, a judged check, a phase, an operator's command), in
    /// milliseconds since the Unix epoch, by the clock of the replica that changed it: of two
    /// states of one shift, the later decision. Unknown for shifts stored by older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<u64>,
    #[serde(skip)]
    runtime: Runtime,
}

impl Shift {
    /// A new shift in `Progressing` at 0%; its first step comes as soon as the gates pass.
    pub fn new(
        target: Target,
        target_clusters: Vec<String>,
        policy: ShiftPolicy,
        start_weights: BTreeMap<String, u32>,
    ) -> Shift {
        let old_clusters = start_weights
            .iter()
            .filter(|(name, w)| **w > 0 && !target_clusters.contains(name))
            .map(|(name, _)| name.clone())
            .collect();
        let target_weight = target_clusters
            .iter()
            .map(|c| start_weights.get(c).copied().unwrap_or(0))
            .sum::<u32>()
            .min(100);
        Shift {
            target,
            target_clusters,
            policy,
            start_weights,
            target_weight,
            step: 0,
            phase: Phase::Progressing,
            consecutive_failures: 0,
            last_check: None,
            reason: None,
            old_clusters,
            promoted_at: None,
            started_at: Some(unix_ms()),
            decided_at: None,
            runtime: Runtime::default(),
        }
    }

    /// Whether `other` is this shift with the same persisted state, [`decided_at`](Self::decided_at)
    /// aside (timers and windows are not persisted).
    pub fn same_decision(&self, other: &Shift) -> bool {
        self.target == other.target
            && self.target_clusters == other.target_clusters
            && self.policy == other.policy
            && self.start_weights == other.start_weights
            && self.target_weight == other.target_weight
            && self.step == other.step
            && self.phase == other.phase
            && self.consecutive_failures == other.consecutive_failures
            && self.last_check == other.last_check
            && self.reason == other.reason
            && self.old_clusters == other.old_clusters
            && self.promoted_at == other.promoted_at
            && self.started_at == other.started_at
    }

    /// This shift, rolled back by this replica and not yet written, over `theirs` (the same
    /// shard's shift in a state read from shared storage), when the rollback stays in force:
    /// `theirs` is the same shift (started at the same time, to the same target, from the same
    /// weights), still progressing or paused, and either decided before this rollback (an older
    /// write that landed late, a state read before the leader wrote its own decision) or still
    /// progressing at this rollback's step or an earlier one (the leader's failed check, its wait
    /// for requests, a cluster joining the target: nothing that takes the target to be good). A
    /// step further decided later, a pause decided later, a promotion, an end, or another shift
    /// is theirs to keep: `None`.
    ///
    /// The rollback returned is of `theirs` (its step, its clusters), decided after both: so a
    /// rollback that stood over a later step is compared with that step from then on.
    pub fn rollback_over(&self, theirs: &Shift) -> Option<Shift> {
        // A shift written by an older version carries no start: the same if all else is.
        let same_shift = theirs.started_at.is_none_or(|t| Some(t) == self.started_at)
            && theirs.target == self.target
            && theirs.start_weights == self.start_weights;
        // A shift written by an older version carries no stamp: no order to go by.
        let older = theirs
            .decided_at
            .is_some_and(|t| t < self.decided_at.unwrap_or(0));
        let no_further = theirs.phase == Phase::Progressing && theirs.step <= self.step;
        let stands = self.phase == Phase::RolledBack
            && same_shift
            && matches!(theirs.phase, Phase::Progressing | Phase::Paused)
            && (older || no_further);
        if !stands {
            return None;
        }
        let mut over = theirs.clone();
        over.phase = Phase::RolledBack;
        over.reason.clone_from(&self.reason);
        over.consecutive_failures = self.consecutive_failures;
        over.last_check.clone_from(&self.last_check);
        over.decided_at = match (self.decided_at, theirs.decided_at) {
            (Some(ours), Some(t)) => Some(ours.max(t + 1)),
            (ours, t) => ours.or(t),
        };
        over.runtime = Runtime::default();
        Some(over)
    }

    /// This shift, changed by this replica and not yet written (a failed check, a wait for
    /// requests, a cluster joining the target), over `theirs` (the same shard's shift in a state
    /// read from shared storage), for a replica that leads: `theirs` is what this change was made
    /// on, the same shift at the same step and phase, decided before it, and holding nothing this
    /// one lacks (no more failed checks in a row, no target cluster it does not have). A shift
    /// decided later, moved on, changed by another judge, or another shift is theirs to keep:
    /// `None`. (A rollback: [`rollback_over`](Self::rollback_over).)
    pub fn unwritten_over(&self, theirs: &Shift) -> Option<Shift> {
        let same_shift = theirs.started_at == self.started_at
            && theirs.target == self.target
            && theirs.start_weights == self.start_weights;
        let older = theirs
            .decided_at
            .is_some_and(|t| t < self.decided_at.unwrap_or(0));
        let within = theirs.consecutive_failures <= self.consecutive_failures
            && theirs
                .target_clusters
                .iter()
                .all(|c| self.target_clusters.contains(c));
        (same_shift && older && within && theirs.step == self.step && theirs.phase == self.phase)
            .then(|| self.clone())
    }

    /// Takes the passed check of `stepped` (this shift after a tick that stepped forward) without
    /// the step, for a replica that judges but cannot write (a step needs its write): failures in
    /// a row start again from zero and the next window from now, as they do for a leader, so
    /// failures with passed checks in between do not add up to a rollback.
    pub fn hold_at_step(&mut self, stepped: &Shift) {
        if self.phase != Phase::Progressing || stepped.step != self.step + 1 {
            return;
        }
        self.consecutive_failures = stepped.consecutive_failures;
        self.last_check.clone_from(&stepped.last_check);
        self.runtime
            .window_base
            .clone_from(&stepped.runtime.window_base);
        self.runtime.step_due = stepped.runtime.step_due;
    }

    /// Weights of the shard's clusters for the current phase: the target weight split equally over
    /// the target clusters, the rest over the other clusters in proportion to their start weights.
    pub fn weights(&self) -> BTreeMap<String, u32> {
        if matches!(self.phase, Phase::RolledBack | Phase::Aborted) {
            return self.start_weights.clone();
        }
        let mut out: BTreeMap<String, u32> =
            self.start_weights.keys().map(|k| (k.clone(), 0)).collect();
        let targets: Vec<(&str, u64)> = self
            .target_clusters
            .iter()
            .map(|c| (c.as_str(), 1))
            .collect();
        for (name, w) in apportion(self.target_weight.min(100), &targets) {
            out.insert(name.to_string(), w);
        }
        let others: Vec<(&str, u64)> = self
            .start_weights
            .iter()
            .filter(|(name, _)| !self.target_clusters.contains(name))
            .map(|(name, w)| (name.as_str(), u64::from(*w)))
            .collect();
        // A hand-edited state file may hold nonsense: never underflow.
        for (name, w) in apportion(100u32.saturating_sub(self.target_weight), &others) {
            out.insert(name.to_string(), w);
        }
        out
    }

    /// Adds `cluster`, of the target revision, to the target of a revision shift that is not
    /// promoted yet (a shard served by several small clusters is upgraded as a whole, also when its
    /// new clusters become ready one after another). The caller passes a cluster that is ready;
    /// from now it shares the target weight equally with the other target clusters, and it is not
    /// drained at promotion. The share it had in the split (a cluster of the revision that was not
    /// ready when the shift started) moves into the target weight with it, so no traffic moves
    /// back to the old clusters. `None`: nothing to do.
    pub fn join_target(&mut self, cluster: &str) -> Option<Event> {
        let joins = matches!(self.target, Target::Revision(_))
            && matches!(self.phase, Phase::Progressing | Phase::Paused)
            && !self.target_clusters.iter().any(|c| c == cluster);
        if !joins {
            return None;
        }
        let share = self.weights().get(cluster).copied().unwrap_or(0);
        self.target_weight = (self.target_weight + share).min(100);
        self.old_clusters.retain(|c| c != cluster);
        self.target_clusters.push(cluster.to_string());
        // The window so far covered the other target clusters only: the joined one's requests
        // from before would count in it. A fresh window (a full interval) from now.
        self.runtime.window_base = None;
        Some(Event::TargetJoined {
            cluster: cluster.to_string(),
        })
    }

    /// Forgets the in-memory timers and analysis window, as after a restart: a replica that did
    /// not advance the shift for a while (another one led) starts a fresh window, counts a
    /// not-ready spell from now, and drains until `drain_timeout` after the promotion.
    pub fn reset_timers(&mut self) {
        self.runtime = Runtime::default();
    }

    /// Keeps `other`'s in-memory timers and analysis window when it is the same shift at the same
    /// step and phase (a state reloaded from shared storage), so reloading does not restart a window.
    pub fn keep_timers_of(&mut self, other: &Shift) {
        if self.target == other.target
            && self.started_at == other.started_at
            && self.step == other.step
            && self.phase == other.phase
        {
            self.runtime = other.runtime.clone();
        }
    }

    /// Clusters that take no new requests: the old ones, once promoted.
    pub fn draining_clusters(&self) -> &[String] {
        match self.phase {
            Phase::Draining | Phase::Completed => &self.old_clusters,
            _ => &[],
        }
    }

    /// Advances the machine. Returns what happened; an empty list means nothing changed that
    /// needs persisting (timers and windows are not persisted).
    pub fn tick(&mut self, now: Instant, obs: &Observation) -> Vec<Event> {
        match self.phase {
            Phase::Progressing => self.tick_progressing(now, obs),
            Phase::Draining => {
                let (promoted_at, drain_timeout) = (self.promoted_at, self.policy.drain_timeout);
                let deadline = *self.runtime.drain_deadline.get_or_insert_with(|| {
                    // After a restart or a change of leader: the drain began at the promotion,
                    // by the promoting replica's clock (whole seconds); what is left of it gets
                    // an allowance for the clocks' difference.
                    let since = promoted_at.map_or(Duration::ZERO, |at| {
                        let wall = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        Duration::from_secs(wall.saturating_sub(at))
                    });
                    let left = drain_timeout.saturating_sub(since) + CLOCK_ALLOWANCE;
                    now + left.min(drain_timeout)
                });
                let idle =
                    obs.draining_in_flight == 0 && !obs.in_flight_elsewhere && !obs.draining_serve;
                if now >= deadline && obs.draining_serve {
                    // The drain's time is up while the old clusters still carry the shard for a
                    // target that cannot take requests: they get their weights back rather than
                    // being declared safe to delete.
                    let detail = format!(
                        "target not ready at the end of the drain ({} after the promotion), the old clusters serving the shard: {}",
                        humantime::format_duration(drain_timeout),
                        obs.gate_detail
                    );
                    return self.roll_back("not_ready", detail);
                }
                if idle || now >= deadline {
                    self.phase = Phase::Completed;
                    vec![Event::Drained {
                        timed_out: obs.draining_in_flight > 0,
                    }]
                } else {
                    Vec::new()
                }
            }
            Phase::Paused | Phase::Completed | Phase::RolledBack | Phase::Aborted => Vec::new(),
        }
    }

    fn tick_progressing(&mut self, now: Instant, obs: &Observation) -> Vec<Event> {
        // Gates first: a target that is not ready holds the shift, and too long rolls it back.
        if !obs.target_ready {
            // What the target did before it went unready says nothing about it after: once ready
            // again it gets a fresh window (and a full interval, unless at 0%) before the next step.
            self.runtime.window_base = None;
            let since = *self.runtime.not_ready_since.get_or_insert(now);
            // Spells add up until the next step, so a target that flaps cannot hold the shift
            // forever without rolling it back.
            let not_ready = self.runtime.not_ready_before + now.duration_since(since);
            if not_ready >= self.policy.ready_timeout {
                let detail = format!(
                    "target not ready for {} since the last step: {}",
                    humantime::format_duration(self.policy.ready_timeout),
                    obs.gate_detail
                );
                return self.roll_back("not_ready", detail);
            }
            return Vec::new();
        }
        if let Some(since) = self.runtime.not_ready_since.take() {
            self.runtime.not_ready_before += now.duration_since(since);
        }

        let interval = self.policy.step_interval;
        let base = match &self.runtime.window_base {
            Some(base) => base.clone(),
            None => {
                // A fresh window (new shift, resume, restart). At 0% there is nothing to analyse:
                // step at once; otherwise give the target a full window first.
                self.runtime.window_base = Some(obs.target_stats.clone());
                let due = if self.target_weight == 0 {
                    now
                } else {
                    now + interval
                };
                self.runtime.step_due = Some(due);
                obs.target_stats.clone()
            }
        };
        if now < self.runtime.step_due.unwrap_or(now) {
            return Vec::new();
        }

        let mut events = Vec::new();
        if self.target_weight == 0 && obs.target_ejected.is_some() {
            // No first step onto a cluster passive health keeps out of the split.
            return events;
        }
        if self.target_weight > 0 {
            let window = obs.target_stats.since(&base);
            let p99 = window.quantile(0.99);
            let mut check = Check {
                step: self.step,
                requests: window.requests,
                error_rate: window.error_rate(),
                p99_ms: p99.map(|d| d.as_secs_f64() * 1000.0),
                result: CheckResult::Passed,
                detail: String::new(),
            };
            if window.requests < self.policy.min_requests && obs.target_ejected.is_none() {
                // Keep the window open until there is enough traffic to judge. An ejected target
                // is judged at once: while ejected it gets no requests, so its window would
                // never fill, ejection after ejection.
                check.result = CheckResult::Waiting;
                check.detail = format!(
                    "{} of {} requests needed",
                    window.requests, self.policy.min_requests
                );
                // Published once when the wait starts, not at every tick of the wait.
                let started_waiting = self
                    .last_check
                    .as_ref()
                    .is_none_or(|c| c.result != CheckResult::Waiting || c.step != self.step);
                self.last_check = Some(check);
                return if started_waiting {
                    vec![Event::Waiting]
                } else {
                    Vec::new()
                };
            }
            let error_rate = format!(
                "error rate {:.2}% over {} requests",
                check.error_rate * 100.0,
                window.requests
            );
            let ejected = obs
                .target_ejected
                .as_ref()
                .map(|e| format!("; {e}"))
                .unwrap_or_default();
            let failure = if check.error_rate > self.policy.max_error_rate {
                Some((
                    "error_rate",
                    format!(
                        "{error_rate} > max {:.2}%{ejected}",
                        self.policy.max_error_rate * 100.0
                    ),
                ))
            } else if p99.is_some_and(|p| p > self.policy.max_p99_latency) {
                Some((
                    "latency",
                    format!(
                        "p99 latency {} > max {}{ejected}",
                        humantime::format_duration(round_ms(p99.unwrap_or_default())),
                        humantime::format_duration(self.policy.max_p99_latency)
                    ),
                ))
            } else {
                // Within the thresholds, yet ejected (its failures were connections refused or
                // came in a row among many good answers): never a step onto it.
                obs.target_ejected
                    .is_some()
                    .then(|| ("error_rate", format!("{error_rate}{ejected}")))
            };
            self.runtime.window_base = Some(obs.target_stats.clone());
            self.runtime.step_due = Some(now + interval);
            if let Some((what, detail)) = failure {
                check.result = CheckResult::Failed;
                check.detail = detail.clone();
                self.last_check = Some(check);
                self.consecutive_failures += 1;
                events.push(Event::CheckFailed {
                    check: what,
                    detail: detail.clone(),
                });
                if self.consecutive_failures >= self.policy.failure_threshold {
                    let detail = format!(
                        "{} failed checks in a row, last: {detail}",
                        self.consecutive_failures
                    );
                    events.extend(self.roll_back(what, detail));
                }
                return events;
            }
            self.consecutive_failures = 0;
            self.last_check = Some(check);
        }

        self.target_weight = self
            .target_weight
            .saturating_add(self.policy.step_percent)
            .min(100);
        self.step += 1;
        self.runtime.window_base = Some(obs.target_stats.clone());
        self.runtime.step_due = Some(now + interval);
        self.runtime.not_ready_before = Duration::ZERO;
        events.push(Event::Stepped {
            weight: self.target_weight,
        });
        if self.target_weight == 100 {
            events.push(self.promote_now(now));
        }
        events
    }

    fn roll_back(&mut self, reason: &'static str, detail: String) -> Vec<Event> {
        self.phase = Phase::RolledBack;
        self.reason = Some(detail.clone());
        self.runtime = Runtime::default();
        vec![Event::RolledBack { reason, detail }]
    }

    fn promote_now(&mut self, now: Instant) -> Event {
        self.target_weight = 100;
        self.phase = Phase::Draining;
        self.promoted_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs());
        self.runtime = Runtime {
            drain_deadline: Some(now + self.policy.drain_timeout),
            ..Runtime::default()
        };
        Event::Promoted
    }

    fn invalid(&self, action: &'static str) -> InvalidTransition {
        InvalidTransition {
            action,
            phase: self.phase.as_str(),
        }
    }

    /// Holds the shift at its current weights.
    pub fn pause(&mut self) -> Result<(), InvalidTransition> {
        if self.phase != Phase::Progressing {
            return Err(self.invalid("pause"));
        }
        self.phase = Phase::Paused;
        Ok(())
    }

    /// Continues a paused shift; the next step waits a full interval (a fresh analysis window).
    pub fn resume(&mut self) -> Result<(), InvalidTransition> {
        if self.phase != Phase::Paused {
            return Err(self.invalid("resume"));
        }
        self.phase = Phase::Progressing;
        self.runtime = Runtime::default();
        Ok(())
    }

    /// Goes to 100% now and starts draining the old clusters.
    pub fn promote(&mut self, now: Instant) -> Result<Event, InvalidTransition> {
        if !matches!(self.phase, Phase::Progressing | Phase::Paused) {
            return Err(self.invalid("promote"));
        }
        self.step += 1;
        Ok(self.promote_now(now))
    }

    /// Puts the weights back where the shift started.
    ///
    /// Also while draining: the escape when the target fails after promotion (the old clusters
    /// are still up, and get their weights back).
    pub fn abort(&mut self, reason: String) -> Result<(), InvalidTransition> {
        if !matches!(
            self.phase,
            Phase::Progressing | Phase::Paused | Phase::Draining
        ) {
            return Err(self.invalid("abort"));
        }
        self.phase = Phase::Aborted;
        self.reason = Some(reason);
        self.runtime = Runtime::default();
        Ok(())
    }
}

fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// Splits `total` over `shares` in proportion, so the parts sum to `total` exactly; all-zero shares
/// split equally.
///
/// Sainte-Laguë: each unit of weight in turn goes to the share with the highest
/// `share / (2 * units so far + 1)`, the earlier one on a tie. Like every divisor method it is
/// house-monotone: a smaller `total` never gives any share more. So as a shift's target grows and
/// the rest shrinks, no old cluster's weight ever rises (largest-remainder rounding can raise one by
/// a unit, which would send sticky keys of the target back to it). It is consistent too: taking
/// one share and its units out (a cluster joining the target) leaves the others' parts as they
/// were. `total` is a weight (at most 100): the work is `total` times the number of shares.
fn apportion<'a>(total: u32, shares: &[(&'a str, u64)]) -> Vec<(&'a str, u32)> {
    if shares.is_empty() {
        return Vec::new();
    }
    let all_zero = shares.iter().all(|(_, s)| *s == 0);
    let mut parts: Vec<(&str, u64, u32)> = shares
        .iter()
        .map(|(n, s)| (*n, if all_zero { 1 } else { *s }, 0))
        .collect();
    for _ in 0..total {
        // a / (2x + 1) > b / (2y + 1), exactly, in u128.
        let mut best = 0;
        for i in 1..parts.len() {
            let (_, s, units) = parts[i];
            let (_, top, top_units) = parts[best];
            if u128::from(s) * (2 * u128::from(top_units) + 1)
                > u128::from(top) * (2 * u128::from(units) + 1)
            {
                best = i;
            }
        }
        parts[best].2 += 1;
    }
    parts.into_iter().map(|(n, _, w)| (n, w)).collect()
}
