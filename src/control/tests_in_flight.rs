//! The control task while a state write is in flight: shifts are judged meanwhile, and what that
//! decides must not be lost or undone when the write lands. Driven on tokio's paused clock, over a
//! store whose writes the test holds, lands or fails ([`super::test_store`]), with probe reports
//! and request outcomes fed in by the test.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::test_store::{self, Calls};
use super::{Action, Command, Desired, ShiftRequest, Store, WeightChange};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::discovery::probe::{ProbeReport, Prober};
use crate::kube_state::Standing;
use crate::shift::{Phase, Shift, ShiftPolicy, Target};
use crate::state::State;

/// Two shards, each with an old (`blue`) and a new (`green`) cluster.
const TWO_SHARDS: &str = r#"
shards: [shard-0, shard-1]
clusters:
  - {name: blue-0, shard: shard-0, revision: v1, serve_url: "http://127.0.0.1:9", weight: 100}
  - {name: green-0, shard: shard-0, revision: v2, serve_url: "http://127.0.0.1:9", weight: 0}
  - {name: blue-1, shard: shard-1, revision: v1, serve_url: "http://127.0.0.1:9", weight: 100}
  - {name: green-1, shard: shard-1, revision: v2, serve_url: "http://127.0.0.1:9", weight: 0}
apps:
  - {name: a0, route_prefix: /a0, shard: shard-0}
  - {name: a1, route_prefix: /a1, shard: shard-1}
probe: {interval: 1h}
"#;

/// One shard upgraded from v1 to v2, whose new revision has two clusters.
const TWO_TARGETS: &str = r#"
shards: [shard-0]
clusters:
  - {name: blue, shard: shard-0, revision: v1, serve_url: "http://127.0.0.1:9", weight: 100}
  - {name: green-a, shard: shard-0, revision: v2, serve_url: "http://127.0.0.1:9", weight: 0}
  - {name: green-b, shard: shard-0, revision: v2, serve_url: "http://127.0.0.1:9", weight: 0}
apps:
  - {name: a0, route_prefix: /a0, shard: shard-0}
probe: {interval: 1h}
"#;

/// The shifts' analysis window.
const INTERVAL: Duration = Duration::from_secs(10);

/// 10% steps every [`INTERVAL`], judged on a single request, rolled back at the first failed check
/// (or at the second with `failure_threshold: 2`).
fn policy(failure_threshold: u32) -> ShiftPolicy {
    ShiftPolicy {
        step_percent: 10,
        step_interval: INTERVAL,
        min_requests: 1,
        failure_threshold,
        ..ShiftPolicy::default()
    }
}

/// The control task's state, its store's calls, and where its probe reports come from.
struct Harness {
    desired: Desired,
    calls: Calls,
    probes: mpsc::UnboundedSender<ProbeReport>,
}

impl Harness {
    /// The control task over `config`, its store shared with other replicas or not, its standing
    /// in the Lease election from `leader` (`None`: a single replica).
    fn new(config: &str, shared: bool, leader: Option<watch::Receiver<Standing>>) -> Harness {
        let config = Arc::new(Config::from_yaml(config, Path::new("/")).expect("valid config"));
        let (store, calls) = test_store::pair(shared);
        let prober = Prober::new(Duration::from_secs(3600), Duration::from_secs(1));
        let mut desired = Desired::new(
            config,
            Store::Test(Arc::new(store)),
            State::new(),
            leader,
            prober,
        )
        .expect("the control task starts");
        // Probe reports come from the test only (the probers' first reports go nowhere).
        let (probes, reports) = mpsc::unbounded_channel();
        desired.probes = reports;
        desired.probe_tx = probes.clone();
        Harness {
            desired,
            calls,
            probes,
        }
    }

    fn cluster(&self, name: &str) -> Arc<Cluster> {
        let entry = self.desired.clusters.iter().find(|c| c.config.name == name);
        Arc::clone(&entry.expect("a configured cluster").cluster)
    }

    /// A probe report saying `name` is ready and serves its shard's apps.
    fn ready_report(&self, name: &str) -> ProbeReport {
        let cluster = self.cluster(name);
        let routes = self
            .desired
            .config
            .apps
            .iter()
            .filter(|a| a.shard.as_deref() == Some(&*cluster.shard))
            .map(|a| (a.route_prefix.clone(), a.name.clone()))
            .collect::<BTreeMap<_, _>>();
        ProbeReport {
            cluster: Arc::clone(&cluster.name),
            healthy: true,
            routes: Some(routes),
            app_status: None,
            detail: String::new(),
            failed_rounds: 0,
        }
    }

    /// Marks clusters ready, as their probes would.
    fn ready(&mut self, names: &[&str]) {
        for name in names {
            let report = self.ready_report(name);
            self.desired.apply_probe(report);
        }
        self.desired.publish();
    }

    /// Starts a shift of `shard` to `target`; its write lands.
    async fn start_shift(&mut self, shard: &str, target: Target, failure_threshold: u32) {
        let request = ShiftRequest {
            target,
            policy: policy(failure_threshold),
        };
        let (started, _) =
            tokio::join!(self.desired.start_shift(shard, request), self.calls.land());
        started.expect("the shift starts");
    }

    /// A clock tick whose write lands: what it wrote.
    async fn tick_landed(&mut self) -> State {
        let ((), written) = tokio::join!(self.desired.tick(), self.calls.land());
        written
    }

    /// The current shift of `shard`.
    fn shift(&self, shard: &str) -> &Shift {
        shift_in(&self.desired.state, shard)
    }

    /// `n` answers with `status` from cluster `name`.
    fn answers(&self, name: &str, status: u16, n: usize) {
        let cluster = self.cluster(name);
        for _ in 0..n {
            cluster
                .stats
                .record_response(status, Duration::from_millis(1));
        }
    }
}

/// A replica whose state is shared, leading (its standing set through the sender returned), every
/// cluster of [`TWO_SHARDS`] ready, shard-0 shifting to green-0 (rolled back at the
/// `failure_threshold`-th failed check) and stepped to 10%: and the state that step wrote.
async fn shifting_replica(failure_threshold: u32) -> (Harness, watch::Sender<Standing>, State) {
    let (standing, leader) = watch::channel(Standing::Leader);
    let mut h = Harness::new(TWO_SHARDS, true, Some(leader));
    h.ready(&["blue-0", "green-0", "blue-1", "green-1"]);
    h.start_shift(
        "shard-0",
        Target::Cluster("green-0".into()),
        failure_threshold,
    )
    .await;
    let first = h.tick_landed().await;
    assert_eq!(shift_in(&first, "shard-0").target_weight, 10);
    (h, standing, first)
}

impl Harness {
    /// green-0 fails shard-0's next check, which applies at once; its write (a replica that may
    /// write makes one) fails.
    async fn failed_check(&mut self) {
        self.answers("green-0", 503, 10);
        tokio::time::advance(INTERVAL).await;
        let stranded =
            *self.desired.leader.as_ref().expect("a replica").borrow() == Standing::Stranded;
        if stranded {
            self.desired.tick().await;
        } else {
            tokio::join!(self.desired.tick(), async {
                self.calls.write().await.fail()
            });
        }
    }
}

fn shift_in<'a>(state: &'a State, shard: &str) -> &'a Shift {
    let entry = state.shards.get(shard).expect("the shard has state");
    entry.shift.as_ref().expect("the shard has a shift")
}

/// A graceful stop writes what was applied but not written (here a rollback whose write failed);
/// a shift that fails its check while that last write is in flight rolls back at once, and its
/// rollback is written too before the control task stops, instead of being lost with it.
#[tokio::test(start_paused = true)]
async fn a_rollback_judged_during_the_last_write_before_a_stop_is_written() {
    let mut h = Harness::new(TWO_SHARDS, false, None);
    h.ready(&["blue-0", "green-0", "blue-1", "green-1"]);
    h.start_shift("shard-0", Target::Cluster("green-0".into()), 1)
        .await;
    h.start_shift("shard-1", Target::Cluster("green-1".into()), 1)
        .await;
    let first = h.tick_landed().await;
    assert_eq!(shift_in(&first, "shard-0").target_weight, 10);
    assert_eq!(shift_in(&first, "shard-1").target_weight, 10);

    // shard-0's target fails its check and rolls back at once; shard-1's passes. The tick's write
    // fails: the rollback stays applied, unwritten.
    h.answers("green-0", 503, 10);
    h.answers("green-1", 200, 10);
    tokio::time::advance(INTERVAL).await;
    tokio::join!(h.desired.tick(), async { h.calls.write().await.fail() });
    assert_eq!(h.shift("shard-0").phase, Phase::RolledBack);
    assert_eq!(h.shift("shard-1").phase, Phase::Progressing);
    assert!(h.desired.unsaved.contains("shard-0"));

    // Stop. Its write of shard-0's rollback is held while shard-1's target goes bad and its
    // check fails.
    h.answers("green-1", 503, 10);
    let (stop, _stopped) = oneshot::channel();
    let (stopped, (held, last)) =
        tokio::join!(h.desired.handle_batch(vec![Command::Stop(stop)]), async {
            let write = h.calls.write().await;
            let held = write.state.clone();
            tokio::time::sleep(INTERVAL).await;
            write.land();
            (held, h.calls.land().await)
        });
    assert!(stopped.is_some(), "the control task stops");
    assert_eq!(shift_in(&held, "shard-0").phase, Phase::RolledBack);
    assert_eq!(shift_in(&held, "shard-1").phase, Phase::Progressing);
    assert_eq!(
        h.shift("shard-1").phase,
        Phase::RolledBack,
        "judged meanwhile"
    );
    assert_eq!(shift_in(&last, "shard-1").phase, Phase::RolledBack);
    assert_eq!(shift_in(&last, "shard-0").phase, Phase::RolledBack);
    assert!(h.desired.unsaved.is_empty());
    assert!(
        !h.calls.has_write(),
        "nothing written after the stop's writes"
    );
}

/// A cluster of the target revision that becomes ready while a step's write is in flight joins the
/// target at once; when the step lands, the join stays (written by the next tick), instead of
/// being undone until a later tick finds and logs it again.
#[tokio::test(start_paused = true)]
async fn a_cluster_joining_during_a_steps_write_stays_in_the_target() {
    let mut h = Harness::new(TWO_TARGETS, false, None);
    h.ready(&["blue", "green-a"]);
    h.start_shift("shard-0", Target::Revision("v2".into()), 2)
        .await;
    assert_eq!(h.shift("shard-0").target_clusters, ["green-a"]);
    let first = h.tick_landed().await;
    assert_eq!(shift_in(&first, "shard-0").target_weight, 10);

    // The check passes and the tick steps to 20%; while that write is held, green-b becomes ready.
    h.answers("green-a", 200, 10);
    tokio::time::advance(INTERVAL).await;
    let report = h.ready_report("green-b");
    let ((), stepped) = tokio::join!(h.desired.tick(), async {
        let write = h.calls.write().await;
        h.probes.send(report).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stepped = write.state.clone();
        write.land();
        stepped
    });
    assert_eq!(shift_in(&stepped, "shard-0").target_weight, 20);
    assert_eq!(shift_in(&stepped, "shard-0").target_clusters, ["green-a"]);

    let shift = h.shift("shard-0");
    assert_eq!(shift.step, 2, "the step landed");
    assert_eq!(
        shift.target_clusters,
        ["green-a", "green-b"],
        "the join stayed"
    );
    assert!(
        shift.decided_at > shift_in(&stepped, "shard-0").decided_at,
        "the join is a decision after the step's"
    );
    let weights = h.desired.shard_weights("shard-0");
    assert_eq!(
        weights,
        BTreeMap::from([("blue", 80), ("green-a", 10), ("green-b", 10)])
    );
    assert!(h.desired.unsaved.contains("shard-0"), "to be written");

    let next = h.tick_landed().await;
    assert_eq!(
        shift_in(&next, "shard-0").target_clusters,
        ["green-a", "green-b"]
    );
    assert_eq!(shift_in(&next, "shard-0").step, 2);
    assert!(h.desired.unsaved.is_empty());
}

/// A paused revision shift holds every weight: a cluster of the revision that becomes ready then
/// does not join its target at the next tick. Promoted, the shift takes it into its target (it is
/// not left at no weight, or drained with the old clusters).
#[tokio::test(start_paused = true)]
async fn a_paused_shift_holds_its_weights_and_takes_a_late_cluster_at_promotion() {
    let mut h = Harness::new(TWO_TARGETS, false, None);
    h.ready(&["blue", "green-a"]);
    h.start_shift("shard-0", Target::Revision("v2".into()), 2)
        .await;
    let first = h.tick_landed().await;
    assert_eq!(shift_in(&first, "shard-0").target_weight, 10);
    let (paused, _) = tokio::join!(
        h.desired.control_shift("shard-0", Action::Pause),
        h.calls.land()
    );
    assert_eq!(paused.unwrap().phase, Phase::Paused);

    h.ready(&["green-b"]);
    tokio::time::advance(INTERVAL).await;
    h.desired.tick().await;
    assert_eq!(h.shift("shard-0").target_clusters, ["green-a"]);
    assert_eq!(
        h.desired.shard_weights("shard-0"),
        BTreeMap::from([("blue", 90), ("green-a", 10), ("green-b", 0)])
    );

    let (promoted, _) = tokio::join!(
        h.desired.control_shift("shard-0", Action::Promote),
        h.calls.land()
    );
    let promoted = promoted.unwrap();
    assert_eq!(promoted.phase, Phase::Draining);
    assert_eq!(promoted.target_clusters, ["green-a", "green-b"]);
    assert_eq!(promoted.draining_clusters(), ["blue"]);
    assert_eq!(
        h.desired.shard_weights("shard-0"),
        BTreeMap::from([("blue", 0), ("green-a", 50), ("green-b", 50)])
    );
}

/// A replica that stepped down with a failed check it could not write reads the shared state
/// again; when it leads again before that read returns, it keeps the failed check over the older
/// state read (and writes it), instead of dropping it and judging the target afresh.
#[tokio::test(start_paused = true)]
async fn a_replica_leading_again_during_its_reread_keeps_its_failed_check() {
    let (mut h, standing, first) = shifting_replica(2).await;
    // A failed check (the first of two), applied at once; its write fails.
    h.failed_check().await;
    assert_eq!(h.shift("shard-0").consecutive_failures, 1);

    // It steps down: the next tick reads the shared state again. It leads again while that read
    // is in flight, and the read returns the state as last written (before the failed check).
    standing.send_replace(Standing::Follower);
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::join!(h.desired.tick(), async {
        let read = h.calls.read().await;
        standing.send_replace(Standing::Leader);
        tokio::time::sleep(Duration::from_millis(300)).await;
        read.answer(first.clone());
    });
    assert_eq!(h.shift("shard-0").consecutive_failures, 1, "kept");
    assert!(h.desired.unsaved.contains("shard-0"));
    let written = h.tick_landed().await;
    assert_eq!(shift_in(&written, "shard-0").consecutive_failures, 1);
}

/// A follower that steps down with a failed check it could not write, and does not lead again,
/// takes the shared state as read: the failed check was the leader's to decide.
#[tokio::test(start_paused = true)]
async fn a_follower_drops_its_unwritten_failed_check_at_its_reread() {
    let (mut h, standing, first) = shifting_replica(2).await;
    h.failed_check().await;
    assert_eq!(h.shift("shard-0").consecutive_failures, 1);

    standing.send_replace(Standing::Follower);
    tokio::time::advance(Duration::from_secs(2)).await;
    tokio::join!(h.desired.tick(), async {
        h.calls.read().await.answer(first.clone())
    });
    assert_eq!(h.shift("shard-0").consecutive_failures, 0, "dropped");
    assert!(h.desired.unsaved.is_empty());
    assert!(!h.desired.reload_shared);
}

/// A replica stranded with a failed check it applied in memory, then a follower again: an
/// operator's change through it before its next tick is made on the shared state read again, so
/// its write does not carry the failed check (the leader's to decide).
#[tokio::test(start_paused = true)]
async fn an_operators_change_through_a_follower_does_not_write_its_unwritten_failed_check() {
    let (mut h, standing, first) = shifting_replica(2).await;

    // Stranded, it judges on its own traffic: a failed check, in memory.
    standing.send_replace(Standing::Stranded);
    h.failed_check().await;
    assert!(!h.calls.has_write(), "a stranded replica writes nothing");
    assert_eq!(h.shift("shard-0").consecutive_failures, 1);

    // It follows again; an operator changes shard-1's weights through it before its next tick.
    standing.send_replace(Standing::Follower);
    let weights = BTreeMap::from([("blue-1".to_string(), 60), ("green-1".to_string(), 40)]);
    let (reply, answer) = oneshot::channel();
    let change = WeightChange {
        shard: "shard-1".into(),
        weights,
        reply,
    };
    let ((), written) = tokio::join!(h.desired.set_weights_group(vec![change]), async {
        h.calls.read().await.answer(first.clone());
        h.calls.land().await
    });
    answer.await.unwrap().expect("the change is made");
    assert_eq!(written.shards["shard-1"].weights["green-1"], 40);
    assert_eq!(shift_in(&written, "shard-0").consecutive_failures, 0);
    assert_eq!(h.shift("shard-0").consecutive_failures, 0);
    assert!(h.desired.unsaved.is_empty());
}

/// A leader whose failed check's write failed takes a state another replica wrote (an operator's
/// change of another shard, seen through the watch): the failed check stays over its shift as the
/// leader last wrote it, but not over that shift with more failed checks (another judge's); a
/// stranded replica drops it.
#[tokio::test(start_paused = true)]
async fn a_state_from_another_replica_keeps_a_leaders_unwritten_failed_check_only() {
    let (mut h, standing, first) = shifting_replica(4).await;
    h.failed_check().await;
    assert_eq!(h.shift("shard-0").consecutive_failures, 1);

    let mut theirs = first.clone();
    theirs.shards.entry("shard-1".into()).or_default().weights =
        BTreeMap::from([("blue-1".into(), 70), ("green-1".into(), 30)]);
    h.desired.adopt_shared_state(theirs.clone(), None);
    assert_eq!(h.desired.shard_weights("shard-1")["green-1"], 30, "taken");
    assert_eq!(h.shift("shard-0").consecutive_failures, 1, "kept");
    assert!(h.desired.unsaved.contains("shard-0"));

    // Another judge's two failed checks at the same step, written before ours was decided: theirs.
    let mut two = theirs.clone();
    let shift = two
        .shards
        .get_mut("shard-0")
        .unwrap()
        .shift
        .as_mut()
        .unwrap();
    shift.consecutive_failures = 2;
    h.desired.adopt_shared_state(two, None);
    assert_eq!(h.shift("shard-0").consecutive_failures, 2, "theirs");
    assert!(h.desired.unsaved.is_empty());

    // Stranded, a failed check in memory; a state taken then drops it.
    let after_two = h.desired.state.clone();
    standing.send_replace(Standing::Stranded);
    h.failed_check().await;
    assert_eq!(h.shift("shard-0").consecutive_failures, 3);
    assert!(!h.calls.has_write());
    h.desired.adopt_shared_state(after_two, None);
    assert_eq!(h.shift("shard-0").consecutive_failures, 2, "dropped");
}

/// Through a follower with an unwritten failed check, a change refused anyway is refused as such
/// (no read of the shared state); a valid change whose read fails is refused with the read's error
/// and writes nothing.
#[tokio::test(start_paused = true)]
async fn a_followers_read_before_a_change_fails_only_valid_changes() {
    let (mut h, standing, _) = shifting_replica(2).await;
    standing.send_replace(Standing::Stranded);
    h.failed_check().await;
    standing.send_replace(Standing::Follower);

    let change = |blue: u64, green: u64| {
        let (reply, answer) = oneshot::channel();
        let weights =
            BTreeMap::from([("blue-1".to_string(), blue), ("green-1".to_string(), green)]);
        let change = WeightChange {
            shard: "shard-1".into(),
            weights,
            reply,
        };
        (change, answer)
    };
    let (bad, bad_answer) = change(60, 60);
    h.desired.set_weights_group(vec![bad]).await;
    let refused = bad_answer.await.unwrap().expect_err("refused");
    assert!(refused.is_client_error(), "{refused}");
    assert_eq!(h.shift("shard-0").consecutive_failures, 1, "no read made");

    let (good, good_answer) = change(60, 40);
    let (bad, bad_answer) = change(50, 40);
    let ((), ()) = tokio::join!(h.desired.set_weights_group(vec![good, bad]), async {
        let read = h.calls.read().await;
        drop(read);
    });
    let failed = good_answer.await.unwrap().expect_err("the read failed");
    assert!(!failed.is_client_error(), "{failed}");
    let refused = bad_answer.await.unwrap().expect_err("refused");
    assert!(refused.is_client_error(), "{refused}");
    assert!(!h.calls.has_write(), "nothing written");
    assert_eq!(h.desired.shard_weights("shard-1")["green-1"], 0);
}
