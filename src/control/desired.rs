//! The desired state: weights, probe results and publication of routing snapshots.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tokio::sync::oneshot;

use super::{ClusterEntry, Command, ControlError, Desired, Store, WeightChange};
use crate::discovery::probe::ProbeReport;
use crate::kube_state::Standing;
use crate::routing::{AppId, AppSpec, ClusterSpec, Placement, RoutingTable, TableSpec};
use crate::shift::{Phase, Shift};
use crate::snapshot::{AppPlacement, ClusterView, Drain, Snapshot};
use crate::state::{State, StateError};

/// Adds the clusters that joined `ours` (this shard's shift in memory) while a write was in flight
/// to the target of the same shift as that write holds it (`entry`), where it takes them
/// ([`Shift::join_target`]): true when any did.
fn rejoin(entry: &mut crate::state::ShardState, ours: Option<&Shift>) -> bool {
    let (Some(written), Some(ours)) = (entry.shift.as_mut(), ours) else {
        return false;
    };
    if written.target != ours.target || written.started_at != ours.started_at {
        return false;
    }
    let before = written.clone();
    let mut joined = false;
    for cluster in &ours.target_clusters {
        joined |= written.join_target(cluster).is_some();
    }
    if joined {
        // A decision after the write's, as the join applied in flight was.
        stamp_if_changed(written, Some(&before), crate::shift::machine::unix_ms());
        entry.weights = written.weights();
    }
    joined
}

/// Writes a graceful stop makes at most for step backs applied but not written.
const STOP_WRITES: usize = 3;

/// The outcome of a state write ([`Desired::persist`]).
struct Saved {
    result: Result<(), StateError>,
    /// The state another replica wrote first (a ConfigMap conflict).
    theirs: Option<State>,
}

impl Desired {
    /// Handles queued commands in order; consecutive weight changes are committed together. At a
    /// [`Command::Stop`] step backs not yet written are written, the state journal is folded, and
    /// the stop's reply is returned: the control task stops, and commands queued after it are
    /// dropped (their callers see it stopped).
    pub(super) async fn handle_batch(
        &mut self,
        batch: Vec<Command>,
    ) -> Option<oneshot::Sender<()>> {
        let mut group = Vec::new();
        for cmd in batch {
            match cmd {
                Command::Stop(reply) => {
                    if !group.is_empty() {
                        self.set_weights_group(std::mem::take(&mut group)).await;
                    }
                    self.write_unsaved_before_stop().await;
                    self.fold_state().await;
                    return Some(reply);
                }
                Command::SetWeights {
                    shard,
                    weights,
                    reply,
                } => group.push(WeightChange {
                    shard,
                    weights,
                    reply,
                }),
                other => {
                    if !group.is_empty() {
                        self.set_weights_group(std::mem::take(&mut group)).await;
                    }
                    self.handle(other).await;
                }
            }
        }
        if !group.is_empty() {
            self.set_weights_group(group).await;
        }
        None
    }

    /// Before a graceful stop, a leader writes the step backs it applied but has not written (a
    /// rollback, failed check, wait or target join whose write failed). Shifts are judged while
    /// that write is in flight, so another may apply meanwhile, and a shared state's write may
    /// conflict with another replica's: it writes again, up to [`STOP_WRITES`] writes in all.
    async fn write_unsaved_before_stop(&mut self) {
        for _ in 0..STOP_WRITES {
            if self.unsaved.is_empty() || super::standing(&self.leader) != Standing::Leader {
                return;
            }
            let mut current = self.state.clone();
            match self.persist(&mut current).await {
                Ok(()) => {}
                // The other replica's state is taken (`settle`); what stays over it is written next.
                Err(StateError::Conflict(_)) => {}
                Err(e) => {
                    tracing::error!(error = %e, shards = ?self.unsaved, "shift transitions applied in memory (a rollback, a failed check) could not be written before stopping");
                    return;
                }
            }
        }
        if !self.unsaved.is_empty() && super::standing(&self.leader) == Standing::Leader {
            tracing::error!(shards = ?self.unsaved, "shift transitions applied in memory (a rollback, a failed check) were not all written before stopping: more kept applying, or writes kept conflicting");
        }
    }

    pub(super) async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::SetWeights {
                shard,
                weights,
                reply,
            } => {
                self.set_weights_group(vec![WeightChange {
                    shard,
                    weights,
                    reply,
                }])
                .await
            }
            Command::StartShift {
                shard,
                request,
                reply,
            } => {
                let result = self.start_shift(&shard, request).await;
                let _ = reply.send(result);
            }
            Command::ControlShift {
                shard,
                action,
                reply,
            } => {
                let result = self.control_shift(&shard, action).await;
                let _ = reply.send(result);
            }
            Command::StartRollout {
                revision,
                max_concurrent,
                policy,
                reply,
            } => {
                let result = self.start_rollout(revision, max_concurrent, policy).await;
                let _ = reply.send(result);
            }
            Command::Discovery(event) => self.apply_discovery(event),
            Command::Stop(reply) => {
                // The control loop stops at a Stop it gets through `handle_batch`; here it only folds.
                self.fold_state().await;
                let _ = reply.send(());
            }
            Command::ControlRollout { id, action, reply } => {
                let result = self.control_rollout(id, action).await;
                let _ = reply.send(result);
            }
        }
    }

    /// Takes a cluster's probe report. A passing round makes it ready at once; a ready cluster
    /// stays ready until `probe.failure_threshold` rounds in a row have failed, so one slow or
    /// failed round does not take it out of its splits.
    pub(super) fn apply_probe(&mut self, report: ProbeReport) {
        let threshold = self.config.probe.failure_threshold;
        if let Some(entry) = self
            .clusters
            .iter_mut()
            .find(|c| Arc::ptr_eq(&c.cluster.name, &report.cluster))
        {
            if let Some(routes) = &report.routes {
                entry.last_routes.clone_from(routes);
            }
            if report.ready() {
                entry.probe_ready = true;
            } else if report.failed_rounds >= threshold {
                entry.probe_ready = false;
            }
            entry.probe = Some(report);
        }
    }

    /// Checks a weight change for `shard` against the current clusters and shifts.
    fn check_weights(
        &self,
        shard: &str,
        weights: &BTreeMap<String, u64>,
    ) -> Result<(), ControlError> {
        if self.config.shard_index(shard).is_none() {
            return Err(ControlError::UnknownShard(shard.to_string()));
        }
        self.ensure_listed()?;
        self.ensure_no_shift(shard)?;
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
        for (name, &weight) in weights {
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
        Ok(())
    }

    /// Validates, persists, then publishes weight changes. Changes that arrived together are
    /// written with one state-file write (group commit): under a burst of changes the gateway
    /// pays one fsync per burst, not one per change. Each change is answered on its own.
    pub(super) async fn set_weights_group(&mut self, group: Vec<WeightChange>) {
        // Judged on the state this replica holds first: a change refused there is refused
        // without the read `follow_before_writing` makes (whose failure would answer 5xx).
        let valid = || {
            group
                .iter()
                .any(|c| self.check_weights(&c.shard, &c.weights).is_ok())
        };
        if self.must_follow() && valid() {
            if let Err(e) = self.follow_before_writing().await {
                let message = e.to_string();
                for change in group {
                    let error = match self.check_weights(&change.shard, &change.weights) {
                        Err(refused) => refused,
                        Ok(()) => ControlError::Persist(e.same_kind(&message)),
                    };
                    let _ = change.reply.send(Err(error));
                }
                return;
            }
        }
        let mut next = self.state.clone();
        let mut accepted = Vec::new();
        for change in group {
            match self.check_weights(&change.shard, &change.weights) {
                Ok(()) => {
                    tracing::debug!(shard = %change.shard, weights = ?change.weights, "weights set");
                    next.shards.entry(change.shard.clone()).or_default().weights = change
                        .weights
                        .iter()
                        .map(|(name, w)| (name.clone(), *w as u32))
                        .collect();
                    // The whole split this change sets: the shard's clusters it leaves out get 0.
                    let split: BTreeMap<String, u32> = self
                        .shard_weights_in(&next, &change.shard)
                        .into_iter()
                        .map(|(name, w)| (name.to_string(), w))
                        .collect();
                    accepted.push((change.reply, split));
                }
                Err(e) => {
                    let _ = change.reply.send(Err(e));
                }
            }
        }
        if accepted.is_empty() {
            return;
        }
        match self.persist(&mut next).await {
            Ok(()) => {
                self.take_written(next);
                for (reply, split) in accepted {
                    let _ = reply.send(Ok(split));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (reply, _) in accepted {
                    let _ = reply.send(Err(ControlError::Persist(e.same_kind(&message))));
                }
            }
        }
    }

    /// Before an operator's change through a replica that follows: what it applied but did not
    /// write while it judged shifts (stranded, or leading until another replica took the Lease) is
    /// the leader's to decide, so the shared state is read again first, as its next tick would
    /// read it (`adopt_state`: a rollback stays, the rest is dropped), and the change is made on
    /// that; its write would otherwise carry those transitions. True when it read; a read that
    /// fails fails the change. Callers judge the change on the state they hold first, so that a
    /// change refused anyway is refused as such, and again after a read.
    pub(super) async fn follow_before_writing(&mut self) -> Result<bool, StateError> {
        if !self.must_follow() {
            return Ok(false);
        }
        self.leading = false;
        self.reload_shared = true;
        self.reload_shared_state().await?;
        Ok(true)
    }

    /// Whether [`follow_before_writing`](Self::follow_before_writing) reads: the replica follows,
    /// and holds transitions it applied but did not write while it judged shifts.
    fn must_follow(&self) -> bool {
        super::standing(&self.leader) == Standing::Follower
            && !self.unsaved.is_empty()
            && (self.leading || self.reload_shared)
    }

    /// Writes `next` to the state store, off the async runtime.
    ///
    /// Probe reports and passive health go on applying while the write is in flight (a ConfigMap
    /// write may wait up to 10 s for an API server that stopped answering): a cluster that goes
    /// down leaves the table meanwhile. The caller's `next` is not yet current, so what is
    /// published meanwhile is the current state with the new health.
    ///
    /// Every shift that differs from the current state's is stamped with this replica's clock
    /// first ([`Shift::decided_at`]).
    ///
    /// Shifts go on being judged meanwhile too: a failed check or a rollback applies at once
    /// (the write may hang while the target goes bad), and [`take_written`](Self::take_written)
    /// keeps it over what the write held.
    pub(super) async fn persist(&mut self, next: &mut State) -> Result<(), StateError> {
        let now = crate::shift::machine::unix_ms();
        self.changed_in_flight.clear();
        self.ending_in_flight.clear();
        self.stepped_back_in_flight.clear();
        for (shard, entry) in &mut next.shards {
            let before = self.state.shards.get(shard).and_then(|e| e.shift.as_ref());
            let changed = match entry.shift.as_mut() {
                Some(shift) => stamp_if_changed(shift, before, now),
                None => before.is_some(),
            };
            if changed {
                self.changed_in_flight.insert(shard.clone());
                if entry
                    .shift
                    .as_ref()
                    .is_none_or(|s| s.phase != Phase::Progressing)
                {
                    self.ending_in_flight.insert(shard.clone());
                }
            }
        }
        let carried = self.unsaved.clone();
        let saved = self.while_waiting(self.save(next.clone())).await;
        if saved.result.is_ok() {
            // What the write carried is written; a step back applied meanwhile is not.
            let in_flight = &self.stepped_back_in_flight;
            self.unsaved
                .retain(|s| !carried.contains(s) || in_flight.contains(s));
        }
        self.settle(saved)
    }

    /// Makes `next`, just written by [`persist`](Self::persist), the current state and publishes
    /// it. A shard a tick stepped back while the write was in flight keeps its step back where the
    /// write did not change its shift, and its rollback where it did (an operator's command, the
    /// tick's own step forward: decided before it); a failed check gives way to such a change,
    /// and clusters that joined the target meanwhile join the written shift's target too.
    ///
    /// The shifts the write did not change keep the timers and windows they advanced meanwhile.
    pub(super) fn take_written(&mut self, mut next: State) {
        let stepped_back = std::mem::take(&mut self.stepped_back_in_flight);
        for (shard, entry) in &mut next.shards {
            let Some(ours) = self.state.shards.get(shard) else {
                continue;
            };
            let changed = self.changed_in_flight.contains(shard);
            if stepped_back.contains(shard) {
                let rolled_back = ours
                    .shift
                    .as_ref()
                    .is_some_and(|s| s.phase == Phase::RolledBack);
                if !changed || rolled_back {
                    entry.weights.clone_from(&ours.weights);
                    entry.shift.clone_from(&ours.shift);
                } else if rejoin(entry, ours.shift.as_ref()) {
                    // Clusters that joined the target meanwhile stay in it, over the write's
                    // shift; the next write holds them.
                } else {
                    self.unsaved.remove(shard);
                }
            } else if !changed {
                if let (Some(theirs), Some(ours)) = (entry.shift.as_mut(), ours.shift.as_ref()) {
                    theirs.keep_timers_of(ours);
                }
            }
        }
        self.changed_in_flight.clear();
        self.ending_in_flight.clear();
        self.state = next;
        self.publish();
    }

    /// Awaits `call` (a call to the state store, which may wait up to 10 s for an API server),
    /// applying probe reports, passive health and shift checks meanwhile.
    async fn while_waiting<T>(&mut self, call: impl std::future::Future<Output = T>) -> T {
        let mut call = std::pin::pin!(call);
        let mut passive = tokio::time::interval(super::SHIFT_TICK);
        passive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        passive.reset();
        loop {
            tokio::select! {
                done = &mut call => return done,
                Some(report) = self.probes.recv() => self.apply_probes(report),
                _ = passive.tick() => self.judge_in_flight(),
            }
        }
    }

    /// Applies `report` and any others queued behind it, then publishes once.
    pub(super) fn apply_probes(&mut self, report: ProbeReport) {
        self.apply_probe(report);
        // Coalesce a burst of reports into one publication.
        while let Ok(report) = self.probes.try_recv() {
            self.apply_probe(report);
        }
        self.publish();
    }

    /// The write of `next`, owning what it needs (so that probe reports can apply while it is
    /// in flight). A ConfigMap write that another replica's came before also reads that
    /// replica's state, for [`settle`](Self::settle) to take.
    fn save(&self, next: State) -> impl std::future::Future<Output = Saved> + Send + 'static {
        let store = self.store.clone();
        async move {
            match store {
                Store::File(writer) => Saved {
                    result: writer.save(next).await,
                    theirs: None,
                },
                Store::ConfigMap(store) => {
                    let result = store.save(&next).await;
                    let mut theirs = None;
                    if matches!(result, Err(StateError::Conflict(_))) {
                        match store.load().await {
                            Ok(state) => theirs = state,
                            Err(e) => {
                                tracing::warn!(error = %e, "reloading the shared state failed")
                            }
                        }
                    }
                    Saved { result, theirs }
                }
                #[cfg(test)]
                Store::Test(store) => Saved {
                    result: store.write(next).await,
                    theirs: None,
                },
            }
        }
    }

    /// Takes the shared state as the ConfigMap holds it now (a replica that stepped down with
    /// changes it could not write: failed checks are dropped this way, unless it leads again
    /// before the read returns; a rollback stays over a shift decided before it, see
    /// `adopt_state`).
    pub(super) async fn reload_shared_state(&mut self) -> Result<(), StateError> {
        type Load = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Option<State>, StateError>> + Send>,
        >;
        let load: Load = match &self.store {
            Store::ConfigMap(store) => {
                let store = Arc::clone(store);
                Box::pin(async move { store.load().await })
            }
            #[cfg(test)]
            Store::Test(store) if store.shared => {
                let store = Arc::clone(store);
                Box::pin(async move { store.read().await })
            }
            _ => {
                self.reload_shared = false;
                return Ok(());
            }
        };
        if let Some(state) = self.while_waiting(load).await? {
            self.adopt_state(state);
        }
        self.reload_shared = false;
        Ok(())
    }

    /// Takes the outcome of a write: after a conflict the other replica's state is taken, so the
    /// next attempt starts from it.
    fn settle(&mut self, saved: Saved) -> Result<(), StateError> {
        if let Some(state) = saved.theirs {
            self.adopt_state(state);
        }
        saved.result
    }

    /// Folds the state journal into the state file (nothing to do for a ConfigMap).
    pub(super) async fn fold_state(&self) {
        let Store::File(writer) = &self.store else {
            return;
        };
        match writer.fold().await {
            Ok(()) => {
                tracing::debug!(state_file = %writer.path().display(), "state journal folded")
            }
            Err(e) => {
                tracing::warn!(error = %e, "folding the state journal failed; it is folded at the next start")
            }
        }
    }

    /// A state another replica wrote (seen through the ConfigMap watch).
    pub(super) fn adopt_shared_state(&mut self, state: State, version: Option<String>) {
        if let Store::ConfigMap(store) = &self.store {
            // Not its own write, nor older than what it holds (see `ConfigMapStore::is_news`):
            // adopting those could step back behind a write or read made since.
            if !store.is_news(version.as_deref()) {
                return;
            }
            // Our next write builds on this version.
            store.remember(version);
        }
        tracing::debug!("state changed by another replica");
        self.adopt_state(state);
    }

    /// Replaces the state (keeping this replica's shift timers where the shift is the same) and
    /// republishes.
    fn adopt_state(&mut self, mut state: State) {
        // A rollback this replica applied but has not written stays over the same shift in the
        // state taken while nothing in it has taken the target to be good since
        // (`Shift::rollback_over`: a write of this replica's that timed out and landed
        // later, the leader's failed check, the shared state read when the API server answers
        // again before the leader has written its own rollback): traffic must not go back to a
        // target judged bad. A leader writes it at its next tick; any replica with its next write.
        // A replica that leads and judges shifts (also one that led again and judged while it
        // read the shared state after stepping down) keeps its other unwritten transitions (a
        // failed check, a wait, a cluster joining the target) over the shift they were made on
        // (`Shift::unwritten_over`), and writes them; a follower or a stranded replica drops
        // them: they are the leader's to decide.
        let leads = self.leading && super::standing(&self.leader) == Standing::Leader;
        let mut kept = std::collections::BTreeSet::new();
        for shard in &self.unsaved {
            let Some(ours) = self.state.shards.get(shard) else {
                continue;
            };
            let Some(ours) = ours.shift.as_ref() else {
                continue;
            };
            let Some(entry) = state.shards.get_mut(shard) else {
                continue;
            };
            let over = entry.shift.as_ref().and_then(|theirs| {
                if ours.phase == Phase::RolledBack {
                    ours.rollback_over(theirs)
                } else if leads {
                    ours.unwritten_over(theirs)
                } else {
                    None
                }
            });
            if let Some(over) = over {
                entry.weights = over.weights();
                entry.shift = Some(over);
                kept.insert(shard.clone());
            }
        }
        for (shard, entry) in &mut state.shards {
            let ours = self.state.shards.get(shard).and_then(|s| s.shift.as_ref());
            if let (Some(theirs), Some(ours)) = (entry.shift.as_mut(), ours) {
                theirs.keep_timers_of(ours);
            }
        }
        self.state = state;
        self.unsaved = kept;
        self.publish();
    }

    /// Effective weights of a shard's clusters: stored weights, else the config's, else an equal split.
    pub(super) fn shard_weights(&self, shard: &str) -> BTreeMap<&str, u32> {
        self.shard_weights_in(&self.state, shard)
    }

    /// [`shard_weights`](Self::shard_weights) with the stored weights read from `state`: the state
    /// a clock tick is building, whose transitions (a rollback's restored split) are not yet
    /// persisted and so not yet in `self.state`.
    pub(super) fn shard_weights_in(&self, state: &State, shard: &str) -> BTreeMap<&str, u32> {
        let members: Vec<&ClusterEntry> = self
            .clusters
            .iter()
            .filter(|c| c.config.shard == shard)
            .collect();
        if let Some(stored) = state.shards.get(shard) {
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
        // No weights anywhere: the oldest revision's clusters share the traffic evenly; newer
        // revisions start at 0 and get traffic through a shift (the N+1 upgrade).
        let Some(oldest) = members.first().map(|c| c.config.revision.as_str()) else {
            return BTreeMap::new();
        };
        let n = members
            .iter()
            .filter(|c| c.config.revision == oldest)
            .count() as u32;
        let mut i = 0;
        members
            .iter()
            .map(|c| {
                let share = if c.config.revision == oldest {
                    i += 1;
                    100 / n + u32::from(i - 1 < 100 % n)
                } else {
                    0
                };
                (c.config.name.as_str(), share)
            })
            .collect()
    }

    /// Builds a snapshot from the desired state and swaps it in.
    pub(super) fn publish(&mut self) {
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
                drain: self.drain_of(&entry.config.shard, &entry.config.name, spec.weight),
                detail: match (&entry.probe, entry.ejected_until) {
                    (_, Some(_)) => format!(
                        "ejected by passive health (ejection {} in a row) after consecutive failures",
                        entry.ejections
                    ),
                    // The probe's own reason first; a cluster Kubernetes holds back (its
                    // RayCluster or head pod not ready, or the RayCluster being deleted) whose
                    // probes pass gets that reason.
                    (Some(p), None) if !p.ready() && entry.probe_ready => format!(
                        "still ready, but its probes are failing (not ready after {} failed rounds in a row): {}",
                        self.config.probe.failure_threshold, p.detail
                    ),
                    (Some(p), None) if !p.ready() => p.detail.clone(),
                    _ if !entry.external_ready => {
                        "not ready in Kubernetes (head pod not ready, or the RayCluster suspended or being deleted)".to_string()
                    }
                    (None, None) => "not probed yet".to_string(),
                    (Some(p), None) => p.detail.clone(),
                },
                ejected: entry.ejected_until.is_some(),
                source: entry.source.clone(),
                apps: spec.apps.clone(),
            })
            .collect();
        for (entry, view) in self.clusters.iter().zip(&views) {
            entry.gauges.set(view);
        }
        // Per shard: apps, and of them those served by draining clusters (none other can).
        let mut apps_per_shard = vec![(0usize, 0usize); self.config.shards.len()];
        let mut on_draining = Vec::new();
        for (id, app) in table.apps().iter().enumerate() {
            let last_resort = table.split_of(id as AppId).is_last_resort();
            if let Some(n) = apps_per_shard.get_mut(app.shard as usize) {
                n.0 += 1;
                n.1 += usize::from(last_resort);
            }
            if last_resort {
                on_draining.push(&*app.name);
            }
        }
        self.warn_on_draining(&on_draining);
        self.apps_on_draining_per_shard = apps_per_shard.iter().map(|n| n.1).collect();
        self.shift_metrics(&apps_per_shard);
        self.table_updates.increment(1);
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
            // Only declared shards': a shard removed from the config keeps its entry in the
            // state (should the config change back), but it has no shift one can see or control.
            shifts: self
                .state
                .shards
                .iter()
                .filter(|(name, _)| self.config.shard_index(name).is_some())
                .filter_map(|(name, s)| Some((name.clone(), s.shift.clone()?)))
                .collect(),
            rollout: self.state.rollout.clone(),
        }));
    }

    /// The routing spec: declared shards, clusters in split order, config apps then discovered ones.
    ///
    /// An application is known by its name, at one route prefix. A cluster serves a discovered
    /// application only where its `/-/routes` lists that very pair: a cluster that has the app at
    /// another prefix would answer the app's requests 404. When clusters disagree (a prefix under
    /// two names, a name under two prefixes), the pair of a ready, non-draining cluster wins over
    /// that of a cluster that cannot take traffic, then the older revision's; the others are
    /// ignored (warned once). An application declared in the config is served by the clusters
    /// that list its name at the declared prefix, a trailing `/` aside.
    fn table_spec(&mut self) -> (TableSpec, Vec<AppPlacement>) {
        let shards = self.config.shard_specs();
        let mut clusters = Vec::with_capacity(self.clusters.len());
        for entry in &self.clusters {
            let weights = self.shard_weights(&entry.config.shard);
            let weight = weights
                .get(entry.config.name.as_str())
                .copied()
                .unwrap_or(0);
            let ready = entry.serving_ready();
            let draining = self
                .drain_of(&entry.config.shard, &entry.config.name, weight)
                .is_some();
            clusters.push(ClusterSpec {
                name: entry.config.name.clone(),
                shard: self.config.shard_index(&entry.config.shard).unwrap_or(0) as u32,
                weight,
                revision: entry.config.revision.clone(),
                ready,
                draining,
                apps: Vec::new(),
            });
        }
        let mut apps: Vec<AppSpec> = self.config.app_specs();
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
        // Declared in the config: served by a cluster listing the name at the declared prefix,
        // a trailing `/` aside (`/echo/` declared, `/echo` in Serve).
        let configured: BTreeMap<String, String> = apps
            .iter()
            .map(|a| (a.name.clone(), a.route_prefix.clone()))
            .collect();
        let mut names: HashSet<String> = configured.keys().cloned().collect();
        let mut prefixes: BTreeMap<String, String> = apps
            .iter()
            .map(|a| (a.route_prefix.clone(), a.name.clone()))
            .collect();
        // Clusters that can take traffic first (stable: split order otherwise).
        let mut order: Vec<usize> = (0..self.clusters.len()).collect();
        order.sort_by_key(|&i| !clusters[i].ready || clusters[i].draining);
        let discovered: Vec<(String, String, String)> = order
            .iter()
            .flat_map(|&i| {
                let e = &self.clusters[i];
                e.last_routes
                    .iter()
                    .map(|(prefix, app)| (e.config.name.clone(), prefix.clone(), app.clone()))
            })
            .collect();
        let serving: Vec<(u32, &BTreeMap<String, String>)> = self
            .clusters
            .iter()
            .zip(&clusters)
            .map(|(e, c)| (c.shard, &e.last_routes))
            .collect();
        let mut placements = Vec::new();
        for (cluster, prefix, app) in &discovered {
            if names.contains(app) {
                let elsewhere = match configured.get(app) {
                    Some(declared) => !same_prefix(declared, prefix),
                    None => prefixes.get(prefix) != Some(app),
                };
                if elsewhere {
                    let key = format!("{cluster}\0{prefix}\0{app}\0other-prefix");
                    if self.warned.insert(key) {
                        tracing::warn!(
                            %cluster, %prefix, %app,
                            "application is served at another route prefix elsewhere; this cluster gets none of its traffic"
                        );
                    }
                }
                continue;
            }
            if !prefix.starts_with('/') {
                // Serve's route prefixes are paths; one that is not would make the whole table
                // unbuildable, so no later change could be published.
                if self
                    .warned
                    .insert(format!("{cluster}\0{prefix}\0{app}\0not-a-path"))
                {
                    tracing::warn!(
                        %cluster, %prefix, %app,
                        "route prefix from /-/routes does not start with '/'; ignoring this application"
                    );
                }
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
            placements.push((prefix.clone(), app.clone()));
        }
        for (prefix, app) in placements {
            let (pinned_shard, source) =
                discovered_placement(&self.placement, &mut self.warned, &prefix, &app, &serving);
            apps.push(AppSpec {
                name: app,
                route_prefix: prefix,
                pinned_shard,
            });
            sources.push(source);
        }
        // Each cluster serves the apps whose (prefix, name) it lists (a configured one's prefix
        // compared without a trailing `/`).
        for (spec, entry) in clusters.iter_mut().zip(&self.clusters) {
            spec.apps = entry
                .last_routes
                .iter()
                .filter(|(prefix, app)| match configured.get(*app) {
                    Some(declared) => same_prefix(declared, prefix),
                    None => prefixes.get(*prefix) == Some(*app),
                })
                .map(|(_, app)| app.clone())
                .collect();
            spec.apps.sort_unstable();
            spec.apps.dedup();
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
}

/// Whether two route prefixes name the same route, a trailing `/` aside (`/echo/` and `/echo`;
/// `/` is itself).
pub(super) fn same_prefix(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Where a discovered (not configured) app goes: its hash shard, unless no cluster of that shard
/// serves it (at `prefix`) while a cluster of another shard does. Then traffic follows the
/// deployment (the app is reachable) and the mismatch is reported once, so the operator can
/// move the app. `serving`: each cluster's shard and `/-/routes`.
fn discovered_placement(
    placement: &Placement,
    warned: &mut HashSet<String>,
    prefix: &str,
    app: &str,
    serving: &[(u32, &BTreeMap<String, String>)],
) -> (Option<u32>, AppPlacement) {
    let Some(hashed) = placement.place(app) else {
        return (None, AppPlacement::Hash);
    };
    let lists = |routes: &BTreeMap<String, String>| routes.get(prefix).is_some_and(|a| a == app);
    if serving
        .iter()
        .any(|&(shard, routes)| shard == hashed && lists(routes))
    {
        return (None, AppPlacement::Hash);
    }
    let Some(found) = serving
        .iter()
        .find(|&&(_, routes)| lists(routes))
        .map(|&(shard, _)| shard)
    else {
        return (None, AppPlacement::Hash);
    };
    let hashed_name = placement.name(hashed).to_string();
    let found_name = placement.name(found).to_string();
    if warned.insert(format!("placement\0{app}\0{found_name}")) {
        tracing::warn!(
            %app, deployed_on = %found_name, hashes_to = %hashed_name,
            "application is deployed on another shard than its placement; routing to where it is deployed"
        );
    }
    (Some(found), AppPlacement::Deployed)
}

impl Desired {
    /// Whether a cluster is draining or drained: it was an old cluster of its shard's promoted
    /// shift and nobody gave it weight since. A cluster whose source object was created after the
    /// promotion (a RayCluster deleted once drained and created again under its name) is a new
    /// cluster, not the drained one.
    pub(super) fn drain_of(&self, shard: &str, cluster: &str, weight: u32) -> Option<Drain> {
        let shift = self.state.shards.get(shard)?.shift.as_ref()?;
        if weight > 0 || !shift.draining_clusters().iter().any(|c| c == cluster) {
            return None;
        }
        if self
            .clusters
            .iter()
            .find(|c| c.config.name == cluster)
            .is_some_and(|c| !c.predates(shift))
        {
            return None;
        }
        Some(match shift.phase {
            Phase::Draining => Drain::Draining,
            _ => Drain::Drained,
        })
    }

    /// Logs when apps start or stop being served by draining clusters only (`apps`: those that
    /// are now; before `apps_on_draining_per_shard` is updated): a shift's target, or every other
    /// cluster of theirs, cannot take requests.
    fn warn_on_draining(&self, apps: &[&str]) {
        if apps.len() == self.apps_on_draining_per_shard.iter().sum::<usize>() {
            return;
        }
        if apps.is_empty() {
            tracing::info!("no app is served by draining clusters any more");
        } else {
            const SHOWN: usize = 10;
            tracing::warn!(
                count = apps.len(),
                apps = %apps[..apps.len().min(SHOWN)].join(", "),
                "no cluster that can take requests serves these apps (the shift's target, or every other cluster, is not ready): their requests go to draining clusters that are still ready rather than failing (first {SHOWN} named)"
            );
        }
    }

    /// Sets the shard gauges (apps, shift state, target weight) and the rollout gauges.
    fn shift_metrics(&self, apps_per_shard: &[(usize, usize)]) {
        for ((shard, gauges), apps) in self
            .config
            .shards
            .iter()
            .zip(&self.shard_gauges)
            .zip(apps_per_shard)
        {
            let shift = self
                .state
                .shards
                .get(&shard.name)
                .and_then(|s| s.shift.as_ref());
            gauges.set(
                *apps,
                shift.map_or("idle", |s| s.phase.as_str()),
                shift.map_or(0, |s| s.target_weight),
            );
        }
        let rollout = self.state.rollout.as_ref();
        self.rollout_gauges
            .set(|state| rollout.map_or(0, |r| r.count(state)));
    }
}

/// Stamps `shift` as decided at `now` when it differs from `before` (the same shard's shift in the
/// current state), keeping the stamp it had otherwise; true when it differs. A decision is
/// stamped after the one it came from even when another replica's clock ran ahead of this one's.
pub(super) fn stamp_if_changed(shift: &mut Shift, before: Option<&Shift>, now: u64) -> bool {
    let changed = before.is_none_or(|b| !b.same_decision(shift));
    if changed {
        let after = before.and_then(|b| b.decided_at).map_or(0, |t| t + 1);
        shift.decided_at = Some(now.max(after));
    }
    changed
}
