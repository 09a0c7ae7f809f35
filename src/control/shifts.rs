//! Shifts, rollouts and automatic shifts, as the control task drives them.
//!
//! Every change goes the same way: compute the next [`State`], write it to the state store, and
//! only then make it current and publish the routing snapshot it implies. The one exception is a
//! clock tick's transitions that move no traffic towards a target (a failed check, a rollback, a
//! wait for requests, a target join), which apply before their write ([`Desired::tick`]).

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::desired::same_prefix;
use super::{natural_cmp, Action, ClusterEntry, ControlError, Desired, ShiftRequest};
use crate::discovery::probe::ProbeReport;
use crate::kube_state::Standing;
use crate::shift::machine::{Event, Observation};
use crate::shift::{Phase, Rollout, RolloutPhase, ShardProgress, Shift, ShiftPolicy, Target};
use crate::state::State;
use crate::stats::StatsSnapshot;
use crate::telemetry;

impl Desired {
    /// Refuses a change to a shard whose weights a shift or rollout owns.
    pub(super) fn ensure_no_shift(&self, shard: &str) -> Result<(), ControlError> {
        shard_lock(&self.state, shard).map_or(Ok(()), Err)
    }

    /// Writes `next`, then makes it current and publishes it.
    async fn commit(&mut self, mut next: State) -> Result<(), ControlError> {
        self.persist(&mut next).await?;
        self.take_written(next);
        Ok(())
    }

    /// Refuses changes that need every cluster of the shards while a first list of RayClusters
    /// is still missing.
    pub(super) fn ensure_listed(&self) -> Result<(), ControlError> {
        if self.discovery_pending.is_empty() {
            return Ok(());
        }
        let scopes: Vec<&str> = self
            .discovery_pending
            .iter()
            .map(|ns| ns.as_deref().unwrap_or("all namespaces"))
            .collect();
        Err(ControlError::DiscoveryPending(format!(
            "waiting for: {}",
            scopes.join(", ")
        )))
    }

    /// The revision a shift moves traffic to: its target revision, or its target cluster's.
    fn target_revision(&self, shift: &Shift) -> Option<String> {
        match &shift.target {
            Target::Revision(revision) => Some(revision.clone()),
            Target::Cluster(name) => self
                .clusters
                .iter()
                .find(|c| &c.config.name == name)
                .map(|c| c.config.revision.clone()),
        }
    }

    /// Builds a shift of `shard` towards `target` (validated against the current clusters).
    fn new_shift(
        &self,
        state: &State,
        shard: &str,
        target: Target,
        policy: ShiftPolicy,
    ) -> Result<Shift, ControlError> {
        if self.config.shard_index(shard).is_none() {
            return Err(ControlError::UnknownShard(shard.to_string()));
        }
        let members: Vec<_> = self
            .clusters
            .iter()
            .filter(|c| c.config.shard == shard)
            .collect();
        let target_clusters: Vec<String> = match &target {
            Target::Cluster(name) => match self.clusters.iter().find(|c| &c.config.name == name) {
                None => {
                    return Err(ControlError::UnknownCluster {
                        cluster: name.clone(),
                        shard: shard.to_string(),
                        known: members
                            .iter()
                            .map(|c| c.config.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
                Some(c) if c.config.shard != shard => {
                    return Err(ControlError::WrongShard {
                        cluster: name.clone(),
                        shard: shard.to_string(),
                        actual: c.config.shard.clone(),
                    })
                }
                Some(_) => vec![name.clone()],
            },
            Target::Revision(revision) => {
                let of_revision: Vec<_> = members
                    .iter()
                    .filter(|c| &c.config.revision == revision)
                    .collect();
                if of_revision.is_empty() {
                    return Err(ControlError::BadRequest(format!(
                        "no cluster of revision \"{revision}\" in shard \"{shard}\""
                    )));
                }
                // The ones ready as targets (serving the shard's applications) share the weight;
                // if none is yet, the ones that are up (the shift waits for their applications
                // up to ready_timeout); if none is up, all of them. Others join as they become
                // ready.
                let apps = self.gate_apps(shard);
                let names = |keep: &dyn Fn(&ClusterEntry) -> bool| -> Vec<String> {
                    of_revision
                        .iter()
                        .filter(|c| keep(c))
                        .map(|c| c.config.name.clone())
                        .collect()
                };
                let gated = names(&|c| {
                    c.serving_ready()
                        && gate(c.probe.as_ref(), &apps, c.config.dashboard_url.is_some()).is_ok()
                });
                let up = names(&|c| c.serving_ready());
                if !gated.is_empty() {
                    gated
                } else if !up.is_empty() {
                    up
                } else {
                    names(&|_| true)
                }
            }
        };
        let start_weights: BTreeMap<String, u32> = self
            .shard_weights_in(state, shard)
            .into_iter()
            .map(|(name, w)| (name.to_string(), w))
            .collect();
        // Clusters of a target revision that are not among the targets yet (not ready) join as
        // they become ready: never drained as old ones, even when they hold weight now.
        let of_target_revision: Vec<String> = match &target {
            Target::Revision(revision) => members
                .iter()
                .filter(|c| &c.config.revision == revision)
                .map(|c| c.config.name.clone())
                .collect(),
            Target::Cluster(_) => Vec::new(),
        };
        let mut shift = Shift::new(target, target_clusters, policy, start_weights);
        shift
            .old_clusters
            .retain(|c| !of_target_revision.contains(c));
        if shift.old_clusters.is_empty() || shift.target_weight >= 100 {
            return Err(ControlError::BadRequest(format!(
                "nothing to shift: {} already has all of shard \"{shard}\"'s traffic",
                shift.target_clusters.join(", ")
            )));
        }
        Ok(shift)
    }

    /// `POST /v1/shards/{shard}/shift`.
    pub(super) async fn start_shift(
        &mut self,
        shard: &str,
        request: ShiftRequest,
    ) -> Result<Shift, ControlError> {
        let mut plan = self.shift_start(shard, &request)?;
        if self.follow_before_writing().await? {
            plan = self.shift_start(shard, &request)?;
        }
        let (next, shift) = plan;
        self.commit(next).await?;
        tracing::info!(
            %shard, target = ?shift.target, clusters = ?shift.target_clusters,
            step_percent = shift.policy.step_percent, "shift started"
        );
        Ok(self.written_shift(shard).unwrap_or(shift))
    }

    /// The state a shift start makes, and the shift, or why it cannot start.
    fn shift_start(
        &self,
        shard: &str,
        request: &ShiftRequest,
    ) -> Result<(State, Shift), ControlError> {
        if self.config.shard_index(shard).is_none() {
            return Err(ControlError::UnknownShard(shard.to_string()));
        }
        self.ensure_listed()?;
        self.ensure_no_shift(shard)?;
        let shift = self.new_shift(
            &self.state,
            shard,
            request.target.clone(),
            request.policy.clone(),
        )?;
        let mut next = self.state.clone();
        let revision = self.target_revision(&shift);
        let entry = next.shards.entry(shard.to_string()).or_default();
        entry.weights = shift.weights();
        entry.shift = Some(shift.clone());
        tried_revision(&mut entry.auto_shift_revision, revision);
        Ok((next, shift))
    }

    /// The shard's shift as written (stamped by the write).
    fn written_shift(&self, shard: &str) -> Option<Shift> {
        self.state.shards.get(shard)?.shift.clone()
    }

    /// Pause, resume, promote or abort a shard's shift.
    pub(super) async fn control_shift(
        &mut self,
        shard: &str,
        action: Action,
    ) -> Result<Shift, ControlError> {
        let mut plan = self.shift_control(shard, action)?;
        if self.follow_before_writing().await? {
            plan = self.shift_control(shard, action)?;
        }
        let (next, shift) = plan;
        self.commit(next).await?;
        tracing::info!(%shard, ?action, phase = shift.phase.as_str(), "shift control applied");
        Ok(self.written_shift(shard).unwrap_or(shift))
    }

    /// The state a shift control makes, and the shift, or why it does not apply.
    fn shift_control(&self, shard: &str, action: Action) -> Result<(State, Shift), ControlError> {
        if self.config.shard_index(shard).is_none() {
            return Err(ControlError::UnknownShard(shard.to_string()));
        }
        let mut next = self.state.clone();
        let entry = next.shards.entry(shard.to_string()).or_default();
        let shift = entry
            .shift
            .as_mut()
            .ok_or_else(|| ControlError::NoShift(shard.to_string()))?;
        match action {
            Action::Pause => shift.pause()?,
            Action::Resume => shift.resume()?,
            Action::Promote => {
                // Clusters of the revision that became ready while the shift was paused join
                // now: promoted, the shift drains every cluster outside its target.
                if matches!(shift.phase, Phase::Progressing | Phase::Paused) {
                    for cluster in self.joining(shard, shift) {
                        if shift.join_target(&cluster).is_some() {
                            tracing::info!(%shard, %cluster, "cluster joins the shift's target at its promotion");
                        }
                    }
                }
                shift.promote(Instant::now())?;
            }
            Action::Abort => shift.abort("aborted by an operator".into())?,
        }
        entry.weights = shift.weights();
        let shift = shift.clone();
        Ok((next, shift))
    }

    /// `POST /v1/rollouts`: every shard with a ready cluster of `revision` that does not yet have
    /// all its traffic there, in declared order.
    pub(super) async fn start_rollout(
        &mut self,
        revision: String,
        max_concurrent: usize,
        policy: ShiftPolicy,
    ) -> Result<Rollout, ControlError> {
        let mut plan = self.rollout_start(&revision, max_concurrent, &policy)?;
        if self.follow_before_writing().await? {
            plan = self.rollout_start(&revision, max_concurrent, &policy)?;
        }
        let (next, rollout) = plan;
        self.commit(next).await?;
        tracing::info!(id = rollout.id, revision = %rollout.revision, shards = rollout.shards.len(), "rollout started");
        // Start its first shards right away rather than at the next tick.
        self.tick().await;
        Ok(self.state.rollout.clone().unwrap_or(rollout))
    }

    /// The state a rollout start makes, and the rollout, or why it cannot start.
    fn rollout_start(
        &self,
        revision: &str,
        max_concurrent: usize,
        policy: &ShiftPolicy,
    ) -> Result<(State, Rollout), ControlError> {
        self.ensure_listed()?;
        if let Some(r) = self.state.rollout.as_ref().filter(|r| r.phase.is_active()) {
            return Err(ControlError::RolloutRunning(r.id));
        }
        if max_concurrent == 0 {
            return Err(ControlError::BadRequest(
                "max_concurrent must be at least 1".into(),
            ));
        }
        let mut shards = Vec::new();
        for shard in &self.config.shards {
            let has_ready = self.clusters.iter().any(|c| {
                c.config.shard == shard.name && c.config.revision == revision && c.serving_ready()
            });
            if !has_ready {
                continue;
            }
            // Already fully on the revision: nothing to do there.
            if self
                .new_shift(
                    &self.state,
                    &shard.name,
                    Target::Revision(revision.to_string()),
                    policy.clone(),
                )
                .is_err()
            {
                continue;
            }
            self.ensure_no_shift(&shard.name)?;
            shards.push(shard.name.clone());
        }
        if shards.is_empty() {
            return Err(ControlError::BadRequest(format!(
                "no shard has a ready cluster of revision \"{revision}\" that is not already serving all its traffic"
            )));
        }
        let mut next = self.state.clone();
        let id = next.next_rollout_id.max(1);
        next.next_rollout_id = id.saturating_add(1);
        let rollout = Rollout::new(
            id,
            revision.to_string(),
            max_concurrent,
            policy.clone(),
            shards,
        );
        next.rollout = Some(rollout.clone());
        Ok((next, rollout))
    }

    /// Pause, resume or abort the active rollout (and its running shard shifts).
    pub(super) async fn control_rollout(
        &mut self,
        id: Option<u64>,
        action: Action,
    ) -> Result<Rollout, ControlError> {
        let mut plan = self.rollout_control(id, action)?;
        if self.follow_before_writing().await? {
            plan = self.rollout_control(id, action)?;
        }
        let (next, rollout) = plan;
        self.commit(next).await?;
        Ok(rollout)
    }

    /// The state a rollout control makes, and the rollout, or why it does not apply.
    fn rollout_control(
        &self,
        id: Option<u64>,
        action: Action,
    ) -> Result<(State, Rollout), ControlError> {
        let mut next = self.state.clone();
        let Some(rollout) = next
            .rollout
            .as_mut()
            .filter(|r| id.is_none_or(|id| id == r.id))
        else {
            return Err(ControlError::NoRollout(
                id.map_or("is running".into(), |id| id.to_string()),
            ));
        };
        let invalid = |phase: RolloutPhase, action: &'static str| ControlError::RolloutState {
            action,
            phase: phase.as_str(),
        };
        let shifting: Vec<String> = rollout.shifting().map(str::to_string).collect();
        match action {
            Action::Pause if rollout.phase == RolloutPhase::Running => {
                rollout.phase = RolloutPhase::Paused
            }
            Action::Resume if rollout.phase == RolloutPhase::Paused => {
                rollout.phase = RolloutPhase::Running
            }
            // Halted while paused: it starts no more shards, but the shifts its pause held go on
            // when resumed (as the shards shifting when a running rollout halts do).
            Action::Resume
                if rollout.phase == RolloutPhase::Halted && rollout.paused_shifts.is_some() => {}
            Action::Abort if rollout.phase.is_active() => {
                rollout.phase = RolloutPhase::Aborted;
                rollout.reason = Some("aborted by an operator".into());
            }
            Action::Pause => return Err(invalid(rollout.phase, "pause")),
            Action::Resume => return Err(invalid(rollout.phase, "resume")),
            Action::Abort => return Err(invalid(rollout.phase, "abort")),
            Action::Promote => {
                return Err(ControlError::BadRequest(
                    "a rollout cannot be promoted; promote its shards' shifts".into(),
                ))
            }
        }
        // Carry the control to the rollout's running shard shifts (where it applies). A resume
        // resumes only what the rollout's pause paused.
        let shifting: Vec<String> = match action {
            Action::Resume => match rollout.paused_shifts.take() {
                Some(paused) => paused
                    .into_iter()
                    .filter(|s| shifting.contains(s))
                    .collect(),
                None => shifting,
            },
            _ => shifting,
        };
        // An aborted rollout's waiting shards stay where they are: no automatic shift starts
        // them on its revision either (no active rollout holds them any more).
        let untouched: Vec<String> = if action == Action::Abort {
            rollout
                .shards
                .iter()
                .filter(|p| p.state == ShardProgress::Waiting)
                .map(|p| p.shard.clone())
                .collect()
        } else {
            Vec::new()
        };
        let revision = rollout.revision.clone();
        for shard in untouched {
            let entry = next.shards.entry(shard).or_default();
            tried_revision(&mut entry.auto_shift_revision, Some(revision.clone()));
        }
        let mut paused = Vec::new();
        // Where the abort leaves the rollout's shifting shards (the next tick would find the same).
        let mut settled: Vec<(String, ShardProgress)> = Vec::new();
        for shard in shifting {
            let Some(entry) = next.shards.get_mut(&shard) else {
                continue;
            };
            let Some(shift) = entry.shift.as_mut() else {
                continue;
            };
            let applied = match action {
                Action::Pause => shift.pause().is_ok(),
                Action::Resume => shift.resume().is_ok(),
                // A shift promoted since the rollout last looked (it is draining the old
                // clusters) is done: the rollout's abort does not take the shard back.
                Action::Abort if shift.phase == Phase::Draining => {
                    settled.push((shard.clone(), ShardProgress::Done));
                    false
                }
                Action::Abort => shift.abort("rollout aborted by an operator".into()).is_ok(),
                Action::Promote => false,
            };
            if applied {
                entry.weights = shift.weights();
                if action == Action::Pause {
                    paused.push(shard);
                } else if action == Action::Abort {
                    settled.push((shard, ShardProgress::Failed));
                }
            }
        }
        if let Some(rollout) = next.rollout.as_mut() {
            if action == Action::Pause {
                rollout.paused_shifts = Some(paused);
            } else if action == Action::Abort {
                rollout.paused_shifts = None;
                for s in &mut rollout.shards {
                    if let Some((_, state)) = settled.iter().find(|(name, _)| *name == s.shard) {
                        s.state = *state;
                        if *state == ShardProgress::Failed {
                            s.reason = Some("rollout aborted by an operator".into());
                        }
                    }
                }
            }
        }
        let rollout = next
            .rollout
            .clone()
            .ok_or_else(|| ControlError::NoRollout("is running".into()))?;
        Ok((next, rollout))
    }

    /// Passive health's part of a clock tick: eject or readmit clusters by their recent answers.
    pub(super) fn passive_tick(&mut self) {
        if self.passive_health(Instant::now()) {
            self.publish();
        }
    }

    /// One clock tick: advance every active shift, the rollout and automatic shifts; write and
    /// publish if anything changed.
    ///
    /// Transitions that move no traffic forward (a failed check, a rollback to the old clusters,
    /// a cluster of the target revision joining the target) apply here, before their write: a
    /// state store that fails or hangs (an API server that stopped answering, a full disk) must
    /// not keep traffic on a target that went bad. Until a write that holds them succeeds they
    /// are only in memory (a restart before it starts again from the last written state), and
    /// the ticks write again, a second after each failed write. Steps forward (a higher target
    /// weight, a promotion, a drain's end, a rollout's next shards) apply only once written.
    pub(super) async fn tick(&mut self) {
        let Some(mut write) = self.tick_begin(false) else {
            if self.reload_shared
                && super::standing(&self.leader) != Standing::Stranded
                && self.write_retry_at.is_none_or(|at| Instant::now() >= at)
            {
                if let Err(e) = self.reload_shared_state().await {
                    tracing::warn!(error = %e, "reading the shared state again failed; will retry");
                    self.write_retry_at = Some(Instant::now() + WRITE_RETRY);
                }
            }
            return;
        };
        let persisted = self.persist(&mut write.next).await;
        self.write_retry_at = persisted.is_err().then(|| Instant::now() + WRITE_RETRY);
        match persisted {
            Ok(()) => {
                self.take_written(write.next);
                for (shard, event) in write.events {
                    record(&shard, &event);
                }
            }
            Err(e) => {
                let held = if !self.unsaved.is_empty() {
                    "; a rollback or failed check is applied but not yet written"
                } else {
                    ""
                };
                tracing::error!(error = %e, "could not persist a shift transition; will retry{held}")
            }
        }
    }

    /// A clock tick while a state write is in flight: passive health, and shifts judged for what
    /// moves no traffic forward (applied at once); nothing else until the write is done.
    pub(super) fn judge_in_flight(&mut self) {
        self.tick_begin(true);
    }

    /// A tick up to its write: the state to write, if anything changed. `in_flight`: a write is
    /// in flight, so only what moves no traffic forward is applied, and nothing is to be written.
    fn tick_begin(&mut self, in_flight: bool) -> Option<TickWrite> {
        let now = Instant::now();
        self.passive_tick();
        // With several replicas, only the Lease holder advances shifts and rollouts. A replica
        // that gets no answer from the API server (stranded: a holder that cannot renew, or a
        // follower that has heard nothing for as long) judges its shifts on its own traffic, as
        // the API server's outage may be when a target goes bad and no leader's rollback could
        // reach it: it applies what moves no traffic forward, in memory, and writes nothing (a
        // write could not land, and another replica may lead by now).
        let standing = super::standing(&self.leader);
        let stranded = standing == Standing::Stranded;
        if !stranded && standing != Standing::Leader {
            // What this replica applied but could not write is the leader's to decide: the
            // shared state is read again, once (the watch brings only what is newer than it
            // holds). A rollback stays over the same shift until that state shows a later
            // decision (`adopt_state`); a replica that leads again meanwhile writes it.
            if self.leading && !self.unsaved.is_empty() {
                self.reload_shared = true;
            }
            self.leading = false;
            return None;
        }
        if !self.leading {
            // Leading again (or stranded) before the shared state was read again: what it had
            // not written is kept, and written when it leads, instead of dropped.
            self.reload_shared = false;
            // Newly leading or judging: timers and windows kept from before (or adopted with
            // another leader's states) are stale; start afresh, as after a restart.
            for entry in self.state.shards.values_mut() {
                if let Some(shift) = entry.shift.as_mut() {
                    shift.reset_timers();
                }
            }
            self.leading = true;
        }
        // Before the first list of discovered clusters, a shift would find its clusters gone (and
        // roll back), a drain nothing in flight, a rollout no cluster of its revision.
        if !self.discovery_pending.is_empty() {
            return None;
        }
        let mut next = self.state.clone();
        // Transitions applied ahead of a write that then failed are written again.
        let mut changed = !self.unsaved.is_empty();
        let mut events: Vec<(String, Event)> = Vec::new();

        // Shards of the state that the config no longer declares are left as they are.
        let shards: Vec<String> = next
            .shards
            .keys()
            .filter(|name| self.config.shard_index(name).is_some())
            .cloned()
            .collect();
        for shard in &shards {
            // A write in flight takes this shift out of progress (a promotion, a pause, an
            // abort): not judged until it has landed.
            if in_flight && self.ending_in_flight.contains(shard) {
                continue;
            }
            let Some(entry) = next.shards.get_mut(shard) else {
                continue;
            };
            let Some(shift) = entry.shift.as_mut() else {
                continue;
            };
            // Clusters of a revision shift's revision that became ready since it started join
            // its target (they have no weight yet); not while the shift is paused, which holds
            // every weight: they join when it is resumed or promoted.
            if shift.phase == Phase::Progressing {
                for cluster in self.joining(shard, shift) {
                    if let Some(joined) = shift.join_target(&cluster) {
                        entry.weights = shift.weights();
                        changed = true;
                        events.push((shard.clone(), joined));
                    }
                }
            }
            if !matches!(shift.phase, Phase::Progressing | Phase::Draining) {
                continue;
            }
            let obs = self.observe(shard, shift);
            let happened = shift.tick(now, &obs);
            if !happened.is_empty() {
                entry.weights = shift.weights();
                changed = true;
                events.extend(happened.into_iter().map(|e| (shard.clone(), e)));
            }
        }
        // Keep the timers and windows the machines advanced where nothing is to be persisted; the
        // shards with events get their new shift only once it is written.
        for shard in &shards {
            if events.iter().any(|(s, _)| s == shard) {
                continue;
            }
            if let Some((cur, new)) = shifts_of(&mut self.state, &next, shard) {
                *cur = new.clone();
            }
        }

        // Shards whose every event moves no traffic forward take their new shift now.
        let at_once: Vec<&String> = shards
            .iter()
            .filter(|shard| {
                let mut mine = events.iter().filter(|(s, _)| s == *shard).peekable();
                mine.peek().is_some() && mine.all(|(_, e)| moves_nothing_forward(e))
            })
            .collect();
        let decided = crate::shift::machine::unix_ms();
        for shard in &at_once {
            if let (Some(cur), Some(new)) = (
                self.state.shards.get_mut(*shard),
                next.shards.get_mut(*shard),
            ) {
                if let Some(shift) = new.shift.as_mut() {
                    super::desired::stamp_if_changed(shift, cur.shift.as_ref(), decided);
                }
                *cur = new.clone();
            }
        }
        // A passed check that cannot step (a step needs its write) still counts: stranded, in
        // memory like a failed one (a replica that stops being stranded without leading reads the
        // shared state again, which drops it); otherwise ahead of the write that steps, so that
        // while it is in flight the step is judged on a window of its own, from the pass (if the
        // write fails, the step waits a full interval). With another write in flight a passed
        // check waits for it, untouched.
        let stepping = !stranded && !in_flight && self.write_retry_at.is_none_or(|at| now >= at);
        if stranded || stepping {
            for shard in shards.iter().filter(|s| !at_once.contains(s)) {
                if let Some((cur, new)) = shifts_of(&mut self.state, &next, shard) {
                    // At 0% nothing was analysed: a first step whose write fails is tried
                    // again a second later, not an interval.
                    if stepping && cur.target_weight == 0 {
                        continue;
                    }
                    let before = cur.clone();
                    cur.hold_at_step(new);
                    if stranded && super::desired::stamp_if_changed(cur, Some(&before), decided) {
                        self.unsaved.insert(shard.clone());
                        if in_flight {
                            // Kept over what the write in flight holds, as a step back is.
                            self.stepped_back_in_flight.insert(shard.clone());
                        }
                    }
                }
            }
        }
        let (now_events, forward): (Vec<_>, Vec<_>) =
            events.into_iter().partition(|(s, _)| at_once.contains(&s));
        if !now_events.is_empty() {
            self.unsaved.extend(at_once.iter().map(|s| s.to_string()));
            if in_flight {
                self.stepped_back_in_flight
                    .extend(at_once.iter().map(|s| s.to_string()));
            }
            self.publish();
            for (shard, event) in &now_events {
                record(shard, event);
            }
        }
        // Stranded, a write in flight, or a second after a failed write: nothing is written, and
        // steps forward wait.
        if stranded || in_flight || self.write_retry_at.is_some_and(|at| now < at) {
            return None;
        }

        changed |= self.advance_rollout(&mut next, now);
        changed |= self.auto_shifts(&mut next);
        changed.then_some(TickWrite {
            next,
            events: forward,
        })
    }

    /// The rollout's step: mark shards done or failed, start the next ones.
    fn advance_rollout(&self, next: &mut State, _now: Instant) -> bool {
        let Some(mut rollout) = next.rollout.clone() else {
            return false;
        };
        let actions = rollout.advance(|shard| {
            let shift = next.shards.get(shard)?.shift.as_ref()?;
            Some((shift.phase, shift.reason.clone(), shift.started_at))
        });
        for shard in &actions.start {
            match self.new_shift(
                next,
                shard,
                Target::Revision(rollout.revision.clone()),
                rollout.policy.clone(),
            ) {
                Ok(shift) => {
                    tracing::info!(rollout = rollout.id, %shard, "rollout starts shifting shard");
                    rollout.started(shard, shift.started_at);
                    let entry = next.shards.entry(shard.clone()).or_default();
                    entry.weights = shift.weights();
                    entry.shift = Some(shift);
                    tried_revision(
                        &mut entry.auto_shift_revision,
                        Some(rollout.revision.clone()),
                    );
                }
                Err(e) => {
                    tracing::warn!(rollout = rollout.id, %shard, error = %e, "rollout could not start shard");
                    rollout.start_failed(shard, e.to_string());
                }
            }
        }
        let changed = actions.changed || next.rollout.as_ref() != Some(&rollout);
        if changed && rollout.phase == RolloutPhase::Halted {
            tracing::warn!(rollout = rollout.id, reason = ?rollout.reason, "rollout halted");
            // The shards it had not started stay where they are: an automatic shift must not
            // start them on the halted revision (as one would once no active rollout holds them).
            for progress in &rollout.shards {
                if progress.state == ShardProgress::Waiting {
                    let entry = next.shards.entry(progress.shard.clone()).or_default();
                    tried_revision(
                        &mut entry.auto_shift_revision,
                        Some(rollout.revision.clone()),
                    );
                }
            }
        }
        next.rollout = Some(rollout);
        changed
    }

    /// Starts shifts for shards with `auto_shift` whose newest ready revision holds no weight yet.
    fn auto_shifts(&self, next: &mut State) -> bool {
        let mut changed = false;
        let mut active = next
            .shards
            .iter()
            .filter(|(name, _)| self.config.shard_index(name).is_some())
            .filter(|(_, s)| s.shift.as_ref().is_some_and(|s| s.phase.is_active()))
            .count();
        for shard in &self.config.shards {
            let kube_policy = self
                .config
                .kubernetes
                .as_ref()
                .and_then(|k| k.auto_shift.as_ref());
            let Some(policy) = shard.auto_shift.as_ref().or(kube_policy) else {
                continue;
            };
            if active >= self.config.max_concurrent_shifts {
                break;
            }
            if shard_lock(next, &shard.name).is_some() {
                continue;
            }
            // From the state this tick builds: a shift that rolled back in this very tick has
            // put its starting split back there, not yet in `self.state`.
            let weights = self.shard_weights_in(next, &shard.name);
            let newest_ready = self
                .clusters
                .iter()
                .filter(|c| c.config.shard == shard.name && c.serving_ready())
                .map(|c| c.config.revision.as_str())
                .max_by(|a, b| natural_cmp(a, b));
            let serving = self
                .clusters
                .iter()
                .filter(|c| {
                    c.config.shard == shard.name
                        && weights.get(c.config.name.as_str()).is_some_and(|w| *w > 0)
                })
                .map(|c| c.config.revision.as_str())
                .max_by(|a, b| natural_cmp(a, b));
            let (Some(newest), Some(serving)) = (newest_ready, serving) else {
                continue;
            };
            if natural_cmp(newest, serving).is_le() {
                continue;
            }
            if next
                .shards
                .get(&shard.name)
                .and_then(|e| e.auto_shift_revision.as_deref())
                .is_some_and(|tried| natural_cmp(newest, tried).is_le())
            {
                continue;
            }
            let started = self.new_shift(
                next,
                &shard.name,
                Target::Revision(newest.to_string()),
                policy.clone(),
            );
            let entry = next.shards.entry(shard.name.clone()).or_default();
            tried_revision(&mut entry.auto_shift_revision, Some(newest.to_string()));
            changed = true;
            match started {
                Ok(shift) => {
                    tracing::info!(shard = %shard.name, revision = %newest, "automatic shift started");
                    entry.weights = shift.weights();
                    entry.shift = Some(shift);
                    active += 1;
                }
                Err(e) => {
                    tracing::warn!(shard = %shard.name, error = %e, "automatic shift not started")
                }
            }
        }
        changed
    }

    /// The applications of `shard` as a target's gate checks them.
    fn gate_apps(&self, shard: &str) -> Vec<GateApp> {
        let snapshot = self.table.load();
        let shard_id = self.config.shard_index(shard).map(|i| i as u32);
        snapshot
            .table
            .apps()
            .iter()
            .filter(|a| Some(a.shard) == shard_id)
            .map(|a| GateApp {
                prefix: a.route_prefix.to_string(),
                name: a.name.to_string(),
                configured: self.config.apps.iter().any(|c| *c.name == *a.name),
            })
            .collect()
    }

    /// Clusters of a revision shift's revision, not in its target yet, that are ready as a target
    /// (serving and passing its gates: one that is not would hold the shift at once).
    fn joining(&self, shard: &str, shift: &Shift) -> Vec<String> {
        let Target::Revision(revision) = &shift.target else {
            return Vec::new();
        };
        let apps = self.gate_apps(shard);
        self.clusters
            .iter()
            .filter(|c| {
                c.config.shard == shard
                    && c.config.revision == *revision
                    && !shift.target_clusters.contains(&c.config.name)
                    && c.serving_ready()
                    && gate(c.probe.as_ref(), &apps, c.config.dashboard_url.is_some()).is_ok()
            })
            .map(|c| c.config.name.clone())
            .collect()
    }

    /// What the shift of `shard` needs to know now: gates of its targets, their counters, and the
    /// requests still on its draining clusters.
    fn observe(&self, shard: &str, shift: &Shift) -> Observation {
        let apps = self.gate_apps(shard);
        let mut obs = Observation {
            target_ready: true,
            ..Observation::default()
        };
        let mut stats = StatsSnapshot::default();
        for name in &shift.target_clusters {
            let Some(entry) = self.clusters.iter().find(|c| &c.config.name == name) else {
                obs.target_ready = false;
                obs.gate_detail = format!("cluster {name} is gone");
                continue;
            };
            let snap = entry.cluster.stats.snapshot();
            stats = if stats.latency.is_empty() {
                snap
            } else {
                add(&stats, &snap)
            };
            if obs.target_ready {
                let gated = if entry.external_ready {
                    gate(
                        entry.probe.as_ref(),
                        &apps,
                        entry.config.dashboard_url.is_some(),
                    )
                } else {
                    Err(
                        "not ready according to its RayCluster (head pod, suspension, deletion)"
                            .to_string(),
                    )
                };
                if let Err(detail) = gated {
                    obs.target_ready = false;
                    obs.gate_detail = format!("{name}: {detail}");
                }
            }
            if entry.ejected_until.is_some() && obs.target_ejected.is_none() {
                obs.target_ejected = Some(format!(
                    "{name} ejected by passive health ({} ejection(s) in a row)",
                    entry.ejections
                ));
            }
        }
        obs.target_stats = stats;
        obs.in_flight_elsewhere = self.store.is_shared();
        obs.draining_in_flight = shift
            .draining_clusters()
            .iter()
            .filter_map(|name| self.clusters.iter().find(|c| &c.config.name == name))
            .filter(|c| c.predates(shift))
            .map(|c| c.cluster.stats.in_flight())
            .sum();
        obs.draining_serve = self
            .config
            .shard_index(shard)
            .and_then(|i| self.apps_on_draining_per_shard.get(i))
            .is_some_and(|&n| n > 0);
        obs
    }
}

/// Why `shard`'s weights cannot be changed by hand or by a new shift now: an active shift owns them,
/// or an active rollout has yet to finish with the shard (waiting or shifting).
fn shard_lock(state: &State, shard: &str) -> Option<ControlError> {
    let shift = state.shards.get(shard).and_then(|s| s.shift.as_ref());
    match shift.map(|s| s.phase) {
        Some(Phase::Draining) => return Some(ControlError::ShiftDraining(shard.to_string())),
        Some(phase) if phase.is_active() => {
            return Some(ControlError::ShiftRunning(shard.to_string()))
        }
        _ => {}
    }
    let rollout = state.rollout.as_ref().filter(|r| r.phase.is_active())?;
    rollout
        .shards
        .iter()
        .any(|s| {
            s.shard == shard && matches!(s.state, ShardProgress::Waiting | ShardProgress::Shifting)
        })
        .then(|| ControlError::InRollout {
            shard: shard.to_string(),
            rollout: rollout.id,
        })
}

/// An application of a shard, as a target's gate checks it.
struct GateApp {
    prefix: String,
    name: String,
    /// Declared in the config's `apps:`: its declared prefix is compared without a trailing `/`
    /// (`/echo/` declared, `/echo` in Serve). A discovered one's exactly.
    configured: bool,
}

/// The readiness gates of one target cluster: healthz, routes listing every app of the shard (a
/// discovered app at its route prefix: a cluster with it at another prefix gets none of its
/// traffic), and (with a dashboard) those apps RUNNING.
fn gate(probe: Option<&ProbeReport>, apps: &[GateApp], has_dashboard: bool) -> Result<(), String> {
    let probe = probe.ok_or("not probed yet")?;
    if !probe.healthy {
        return Err(probe.detail.clone());
    }
    let routes = probe.routes.as_ref().ok_or_else(|| probe.detail.clone())?;
    let missing: Vec<String> = apps
        .iter()
        .filter(|app| {
            if app.configured {
                !routes
                    .iter()
                    .any(|(p, a)| *a == app.name && same_prefix(p, &app.prefix))
            } else {
                routes.get(&app.prefix).is_none_or(|a| *a != app.name)
            }
        })
        .map(|app| {
            let (prefix, name) = (&app.prefix, &app.name);
            match routes.iter().find(|(_, a)| **a == app.name) {
                Some((elsewhere, _)) => {
                    format!("{name} at {prefix} (it lists it at {elsewhere})")
                }
                None => format!("{name} at {prefix}"),
            }
        })
        .collect();
    if !missing.is_empty() {
        return Err(format!("/-/routes does not list {}", missing.join(", ")));
    }
    if has_dashboard {
        let statuses = probe
            .app_status
            .as_ref()
            .ok_or_else(|| format!("dashboard unavailable: {}", probe.detail))?;
        for GateApp { name: app, .. } in apps {
            match statuses.get(app).map(String::as_str) {
                Some("RUNNING") => {}
                Some(status) => return Err(format!("dashboard shows {app} {status}")),
                None => return Err(format!("dashboard does not list {app}")),
            }
        }
    }
    Ok(())
}

/// Element-wise sum of two counter snapshots.
fn add(a: &StatsSnapshot, b: &StatsSnapshot) -> StatsSnapshot {
    StatsSnapshot {
        requests: a.requests + b.requests,
        errors: a.errors + b.errors,
        latency: a
            .latency
            .iter()
            .zip(&b.latency)
            .map(|(x, y)| x + y)
            .collect(),
    }
}

/// How long a clock tick waits after a failed state write before writing again.
const WRITE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// A clock tick's next state, to be written, and the events it records once written.
#[derive(Debug)]
struct TickWrite {
    /// The state to write.
    next: State,
    /// Events of the transitions that apply once written.
    events: Vec<(String, Event)>,
}

/// A shard's shift in `state` (to change) and in `next`, when both have one.
fn shifts_of<'a>(
    state: &'a mut State,
    next: &'a State,
    shard: &str,
) -> Option<(&'a mut Shift, &'a Shift)> {
    let cur = state.shards.get_mut(shard)?.shift.as_mut()?;
    Some((cur, next.shards.get(shard)?.shift.as_ref()?))
}

/// Whether a shift's event moves no traffic towards its target: it leaves traffic where it was,
/// takes it back to the old clusters, or shares the target's weight with one more cluster of the
/// target revision. Such a transition may apply before it is written.
fn moves_nothing_forward(event: &Event) -> bool {
    matches!(
        event,
        Event::CheckFailed { .. }
            | Event::RolledBack { .. }
            | Event::Waiting
            | Event::TargetJoined { .. }
    )
}

/// Logs and counts a shift event.
fn record(shard: &str, event: &Event) {
    match event {
        Event::Stepped { weight } => {
            metrics::counter!(telemetry::SHIFT_STEPS_TOTAL, "shard" => shard.to_string())
                .increment(1);
            tracing::info!(%shard, weight, "shift stepped");
        }
        Event::CheckFailed { check, detail } => {
            metrics::counter!(telemetry::SHIFT_CHECK_FAILURES_TOTAL, "shard" => shard.to_string(), "check" => *check)
                .increment(1);
            tracing::warn!(%shard, check, %detail, "shift check failed");
        }
        Event::RolledBack { reason, detail } => {
            metrics::counter!(telemetry::SHIFT_ROLLBACKS_TOTAL, "shard" => shard.to_string(), "reason" => *reason)
                .increment(1);
            tracing::warn!(%shard, reason, %detail, "shift rolled back");
        }
        Event::Waiting => {
            tracing::info!(%shard, "shift waiting for enough requests to judge the target")
        }
        Event::Promoted => tracing::info!(%shard, "shift promoted; old clusters draining"),
        Event::Drained { timed_out } => tracing::info!(%shard, timed_out, "old clusters drained"),
        Event::TargetJoined { cluster } => {
            tracing::info!(%shard, %cluster, "cluster of the target revision joined the shift's target")
        }
    }
}

/// Records that a shift to `revision` was started on a shard, for `auto_shift`: it only starts
/// shifts to revisions newer than every one tried before (by any shift: automatic, manual or a
/// rollout), so a revision an operator aborted or that rolled back is not tried again by itself,
/// and a manual move back to an older revision is not undone.
fn tried_revision(recorded: &mut Option<String>, revision: Option<String>) {
    let Some(revision) = revision else { return };
    if recorded
        .as_deref()
        .is_none_or(|r| natural_cmp(&revision, r).is_gt())
    {
        *recorded = Some(revision);
    }
}
