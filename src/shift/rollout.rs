//! A fleet rollout: the N+1 upgrade of every shard to a revision, a few shards at a time.
//!
//! A thin sequencer above shard shifts. It owns no weights: it starts shifts (at most
//! `max_concurrent` at once), marks a shard done when its shift is promoted, and halts at the
//! first shard whose shift rolls back or is aborted.

use serde::{Deserialize, Serialize};

use crate::shift::machine::Phase;
use crate::shift::policy::ShiftPolicy;

/// Phase of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutPhase {
    /// Starting and watching shard shifts.
    Running,
    /// Held by an operator (its shard shifts are paused too).
    Paused,
    /// Every shard promoted.
    Completed,
    /// A shard's shift rolled back or was aborted; no new shard starts.
    Halted,
    /// Aborted by an operator; running shard shifts were aborted.
    Aborted,
}

impl RolloutPhase {
    /// Lowercase name for the API.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutPhase::Running => "running",
            RolloutPhase::Paused => "paused",
            RolloutPhase::Completed => "completed",
            RolloutPhase::Halted => "halted",
            RolloutPhase::Aborted => "aborted",
        }
    }

    /// Running or paused.
    pub fn is_active(self) -> bool {
        matches!(self, RolloutPhase::Running | RolloutPhase::Paused)
    }
}

/// Where one shard is in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShardProgress {
    /// Not started yet.
    Waiting,
    /// Its shift is running.
    Shifting,
    /// Its shift was promoted.
    Done,
    /// Its shift rolled back, was aborted, or could not start.
    Failed,
}

impl ShardProgress {
    /// Every state, for the `rayshift_rollout_shards{state}` metric.
    pub const ALL: [ShardProgress; 4] = [
        ShardProgress::Waiting,
        ShardProgress::Shifting,
        ShardProgress::Done,
        ShardProgress::Failed,
    ];

    /// Lowercase name for the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ShardProgress::Waiting => "waiting",
            ShardProgress::Shifting => "shifting",
            ShardProgress::Done => "done",
            ShardProgress::Failed => "failed",
        }
    }
}

/// One shard of a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutShard {
    /// Shard name.
    pub shard: String,
    /// Progress.
    pub state: ShardProgress,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The `started_at` of the shift the rollout started on the shard: once the shard is done, a
    /// later shift there (an operator's, an automatic one) is not the rollout's, and its end does
    /// not fail the rollout. `None` in rollouts stored by older versions: the shift the shard has
    /// when it is done is taken as the rollout's (and recorded then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift_started_at: Option<u64>,
}

impl RolloutShard {
    /// Whether a shift started at `started_at` is the one the rollout started on this shard.
    fn owns(&self, started_at: Option<u64>) -> bool {
        self.shift_started_at.is_none() || self.shift_started_at == started_at
    }
}

/// What a rollout sees of a shard's current shift: its phase, why it ended (rolled back or
/// aborted) and its `started_at`.
pub type ShardShift = (Phase, Option<String>, Option<u64>);

/// A fleet rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Increasing id.
    pub id: u64,
    /// The revision every shard moves to.
    pub revision: String,
    /// Most shards shifting at once.
    pub max_concurrent: usize,
    /// Policy of every shard shift.
    pub policy: ShiftPolicy,
    /// Current phase.
    pub phase: RolloutPhase,
    /// The shards, in the order they are upgraded.
    pub shards: Vec<RolloutShard>,
    /// Why it halted or was aborted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Shards whose shifts the rollout's own `pause` paused: its `resume` resumes these only, not
    /// a shift an operator had paused by itself. `None` (a rollout paused by an older version):
    /// resume resumes every shifting shard's shift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_shifts: Option<Vec<String>>,
}

/// What the rollout wants the control plane to do after looking at the shards' shifts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RolloutActions {
    /// Shards whose shift should start now.
    pub start: Vec<String>,
    /// The rollout changed (persist and publish).
    pub changed: bool,
}

impl Rollout {
    /// A running rollout of `shards` (in order).
    pub fn new(
        id: u64,
        revision: String,
        max_concurrent: usize,
        policy: ShiftPolicy,
        shards: Vec<String>,
    ) -> Self {
        Rollout {
            id,
            revision,
            max_concurrent: max_concurrent.max(1),
            policy,
            phase: RolloutPhase::Running,
            shards: shards
                .into_iter()
                .map(|shard| RolloutShard {
                    shard,
                    state: ShardProgress::Waiting,
                    reason: None,
                    shift_started_at: None,
                })
                .collect(),
            reason: None,
            paused_shifts: None,
        }
    }

    /// Number of shards in each state.
    pub fn count(&self, state: ShardProgress) -> usize {
        self.shards.iter().filter(|s| s.state == state).count()
    }

    /// Updates shard progress from their shifts (`None`: the shard has no shift), and decides
    /// which waiting shards start now.
    pub fn advance(&mut self, shift_phase: impl Fn(&str) -> Option<ShardShift>) -> RolloutActions {
        let mut actions = RolloutActions::default();
        let active = self.phase.is_active();
        // Shards' shifts go on after a halt or an abort: their progress is still followed.
        for s in &mut self.shards {
            if s.state == ShardProgress::Done && active {
                // A shard is done once its shift promoted; aborted while draining (its target
                // failed after promotion), it went back to the old revision: the rollout halts.
                // A later shift of the shard is not the rollout's.
                if let Some((Phase::Aborted | Phase::RolledBack, reason, started_at)) =
                    shift_phase(&s.shard)
                {
                    if s.owns(started_at) {
                        s.state = ShardProgress::Failed;
                        s.reason = reason;
                        actions.changed = true;
                    }
                }
                continue;
            }
            if s.state != ShardProgress::Shifting {
                continue;
            }
            match shift_phase(&s.shard) {
                Some((Phase::Draining | Phase::Completed, _, started_at)) => {
                    s.state = ShardProgress::Done;
                    // A rollout stored by an older version: the shift seen now is its own (no
                    // other can start on a shifting shard).
                    s.shift_started_at = s.shift_started_at.or(started_at);
                    actions.changed = true;
                }
                Some((Phase::RolledBack | Phase::Aborted, reason, _)) => {
                    s.state = ShardProgress::Failed;
                    s.reason = reason;
                    actions.changed = true;
                }
                Some((Phase::Progressing | Phase::Paused, _, _)) => {}
                None => {
                    s.state = ShardProgress::Failed;
                    s.reason = Some("the shard's shift disappeared".into());
                    actions.changed = true;
                }
            }
        }
        if !self.phase.is_active() {
            return actions;
        }
        if let Some(failed) = self
            .shards
            .iter()
            .find(|s| s.state == ShardProgress::Failed)
        {
            if self.phase != RolloutPhase::Halted {
                self.phase = RolloutPhase::Halted;
                self.reason = Some(format!(
                    "shard {} failed: {}",
                    failed.shard,
                    failed.reason.as_deref().unwrap_or("unknown reason")
                ));
                actions.changed = true;
            }
            return actions;
        }
        if self.shards.iter().all(|s| s.state == ShardProgress::Done) {
            self.phase = RolloutPhase::Completed;
            actions.changed = true;
            return actions;
        }
        if self.phase == RolloutPhase::Running {
            let mut shifting = self.count(ShardProgress::Shifting);
            for s in &mut self.shards {
                if shifting >= self.max_concurrent {
                    break;
                }
                if s.state == ShardProgress::Waiting {
                    s.state = ShardProgress::Shifting;
                    actions.start.push(s.shard.clone());
                    actions.changed = true;
                    shifting += 1;
                }
            }
        }
        actions
    }

    /// Records the shift the rollout started on `shard` (its `started_at`).
    pub fn started(&mut self, shard: &str, started_at: Option<u64>) {
        if let Some(s) = self.shards.iter_mut().find(|s| s.shard == shard) {
            s.shift_started_at = started_at;
        }
    }

    /// Marks a shard whose shift could not start as failed (the next `advance` halts the rollout).
    pub fn start_failed(&mut self, shard: &str, reason: String) {
        if let Some(s) = self.shards.iter_mut().find(|s| s.shard == shard) {
            s.state = ShardProgress::Failed;
            s.reason = Some(reason);
        }
    }

    /// Shards whose shifts are running now.
    pub fn shifting(&self) -> impl Iterator<Item = &str> {
        self.shards
            .iter()
            .filter(|s| s.state == ShardProgress::Shifting)
            .map(|s| s.shard.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn rollout(max: usize) -> Rollout {
        let shards = (0..4).map(|i| format!("shard-{i}")).collect();
        Rollout::new(1, "v2".into(), max, ShiftPolicy::default(), shards)
    }

    #[test]
    fn starts_at_most_max_concurrent_and_moves_on_when_promoted() {
        let mut r = rollout(1);
        let mut phases: BTreeMap<String, Phase> = BTreeMap::new();
        let mut order = Vec::new();
        for _ in 0..20 {
            let actions = r.advance(|s| phases.get(s).map(|p| (*p, None, None)));
            assert!(r.count(ShardProgress::Shifting) <= 1);
            for shard in actions.start {
                phases.insert(shard.clone(), Phase::Progressing);
                order.push(shard);
            }
            // Promote whatever is shifting.
            for p in phases.values_mut() {
                if *p == Phase::Progressing {
                    *p = Phase::Draining;
                }
            }
        }
        assert_eq!(order, ["shard-0", "shard-1", "shard-2", "shard-3"]);
        assert_eq!(r.phase, RolloutPhase::Completed);
        assert_eq!(r.count(ShardProgress::Done), 4);
    }

    #[test]
    fn a_rollback_halts_and_nothing_new_starts() {
        let mut r = rollout(2);
        let started = r.advance(|_| None).start;
        assert_eq!(started, ["shard-0", "shard-1"]);
        let actions = r.advance(|s| {
            Some(if s == "shard-0" {
                (Phase::RolledBack, Some("error rate".into()), None)
            } else {
                (Phase::Progressing, None, None)
            })
        });
        assert!(actions.start.is_empty());
        assert_eq!(r.phase, RolloutPhase::Halted);
        assert!(r.reason.as_deref().unwrap().contains("shard-0"));
        assert_eq!(r.count(ShardProgress::Waiting), 2);
        let actions = r.advance(|_| Some((Phase::Draining, None, None)));
        assert!(actions.start.is_empty());
        // The halted rollout still follows its other shard, whose shift went on and promoted.
        assert!(actions.changed);
        assert_eq!(r.phase, RolloutPhase::Halted);
        assert_eq!(r.count(ShardProgress::Done), 1);
        assert_eq!(r.count(ShardProgress::Shifting), 0);
    }

    #[test]
    fn a_done_shard_aborted_while_draining_halts_the_rollout() {
        let mut r = rollout(1);
        assert_eq!(r.advance(|_| None).start, ["shard-0"]);
        r.advance(|_| Some((Phase::Draining, None, None)));
        assert_eq!(r.count(ShardProgress::Done), 1);
        let actions = r.advance(|s| {
            Some(if s == "shard-0" {
                (Phase::Aborted, Some("aborted by an operator".into()), None)
            } else {
                (Phase::Progressing, None, None)
            })
        });
        assert_eq!(r.phase, RolloutPhase::Halted);
        assert!(actions.start.is_empty(), "{:?}", actions.start);
        assert!(r.reason.as_deref().unwrap().contains("shard-0"));
    }

    /// A later shift of a shard the rollout is done with (an operator's, an automatic one to a
    /// newer revision) is not the rollout's: its rollback or abort does not halt the rollout.
    #[test]
    fn a_later_shift_of_a_done_shard_is_not_the_rollouts() {
        let mut r = rollout(1);
        assert_eq!(r.advance(|_| None).start, ["shard-0"]);
        r.started("shard-0", Some(1_000));
        r.advance(|_| Some((Phase::Completed, None, Some(1_000))));
        assert_eq!(r.count(ShardProgress::Done), 1);
        let later = |s: &str| {
            Some(if s == "shard-0" {
                (Phase::RolledBack, Some("error rate".into()), Some(2_000))
            } else {
                (Phase::Progressing, None, None)
            })
        };
        r.advance(later);
        assert_eq!(r.phase, RolloutPhase::Running);
        // A rollout of an older version, which did not record its shifts: the one the shard had
        // when it was done is recorded then.
        let mut old = rollout(1);
        assert_eq!(old.advance(|_| None).start, ["shard-0"]);
        old.advance(|_| Some((Phase::Draining, None, Some(1_000))));
        assert_eq!(old.shards[0].shift_started_at, Some(1_000));
        old.advance(later);
        assert_eq!(old.phase, RolloutPhase::Running);
        assert_eq!(r.count(ShardProgress::Done), 1);
        assert_eq!(r.count(ShardProgress::Failed), 0);
        // Its own shift, aborted while draining, still halts it.
        r.advance(|s| {
            Some(if s == "shard-0" {
                (
                    Phase::Aborted,
                    Some("aborted by an operator".into()),
                    Some(1_000),
                )
            } else {
                (Phase::Progressing, None, None)
            })
        });
        assert_eq!(r.phase, RolloutPhase::Halted);
    }

    #[test]
    fn paused_rollouts_start_nothing() {
        let mut r = rollout(1);
        r.phase = RolloutPhase::Paused;
        assert!(r.advance(|_| None).start.is_empty());
        r.phase = RolloutPhase::Running;
        assert_eq!(r.advance(|_| None).start, ["shard-0"]);
    }
}
