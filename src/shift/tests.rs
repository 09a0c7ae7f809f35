//! State-machine tests with paused tokio time: every transition, every control in every phase.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::{advance, Instant};

use super::machine::{CheckResult, Event, Observation, Phase, Shift, Target};
use super::policy::ShiftPolicy;
use crate::stats::ClusterStats;

fn policy() -> ShiftPolicy {
    ShiftPolicy {
        step_percent: 25,
        step_interval: Duration::from_secs(10),
        max_error_rate: 0.05,
        max_p99_latency: Duration::from_millis(500),
        min_requests: 20,
        failure_threshold: 2,
        ready_timeout: Duration::from_secs(60),
        drain_timeout: Duration::from_secs(30),
    }
}

fn shift() -> Shift {
    Shift::new(
        Target::Cluster("green".into()),
        vec!["green".into()],
        policy(),
        BTreeMap::from([("blue".into(), 100), ("green".into(), 0)]),
    )
}

/// The target's live counters, fed to the machine as a cumulative snapshot.
struct TargetStats {
    stats: ClusterStats,
}

impl TargetStats {
    fn new() -> Self {
        Self {
            stats: ClusterStats::default(),
        }
    }
    fn serve(&self, ok: u64, errors: u64, latency: Duration) {
        for _ in 0..ok {
            self.stats.record_response(200, latency);
        }
        for _ in 0..errors {
            self.stats.record_response(500, latency);
        }
    }
    fn obs(&self, ready: bool) -> Observation {
        Observation {
            target_ready: ready,
            gate_detail: if ready {
                String::new()
            } else {
                "/-/healthz answered 503".into()
            },
            target_ejected: None,
            target_stats: self.stats.snapshot(),
            draining_in_flight: 0,
            in_flight_elsewhere: false,
            draining_serve: false,
        }
    }
    /// Ready by its probes, but ejected by passive health.
    fn ejected(&self) -> Observation {
        Observation {
            target_ejected: Some("green ejected by passive health (1 ejection(s) in a row)".into()),
            ..self.obs(true)
        }
    }
}

fn weights(s: &Shift) -> (u32, u32) {
    let w = s.weights();
    (w["blue"], w["green"])
}

/// An ejected target gets no requests, so its window would never reach `min_requests`: its check
/// fails at once, the shift does not step onto it, and `failure_threshold` such checks roll back.
#[tokio::test(start_paused = true)]
async fn an_ejected_target_fails_its_checks_without_min_requests() {
    let mut s = shift();
    let t = TargetStats::new();
    // Not even the first step onto an ejected target.
    assert!(s.tick(Instant::now(), &t.ejected()).is_empty());
    assert_eq!(weights(&s), (100, 0));
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    // Five failures in a row (far fewer than min_requests), then ejected.
    t.serve(0, 5, Duration::from_millis(20));
    advance(Duration::from_secs(10)).await;
    let events = s.tick(Instant::now(), &t.ejected());
    assert!(
        matches!(&events[..], [Event::CheckFailed { check: "error_rate", detail }] if detail.contains("ejected by passive health") && detail.contains("over 5 requests")),
        "{events:?}"
    );
    assert_eq!(s.last_check.as_ref().unwrap().result, CheckResult::Failed);
    assert_eq!(weights(&s), (75, 25), "stepped onto an ejected target");
    // Still ejected a window later, no requests at all: the second failed check rolls back.
    advance(Duration::from_secs(10)).await;
    let events = s.tick(Instant::now(), &t.ejected());
    assert!(
        matches!(
            events.last(),
            Some(Event::RolledBack {
                reason: "error_rate",
                ..
            })
        ),
        "{events:?}"
    );
    assert_eq!(s.phase, Phase::RolledBack);
    assert_eq!(weights(&s), (100, 0));
}

#[tokio::test(start_paused = true)]
async fn steps_to_100_then_drains_and_completes() {
    let mut s = shift();
    let t = TargetStats::new();
    // First step at once: nothing to analyse at 0%.
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    assert_eq!(weights(&s), (75, 25));
    for expected in [50, 75] {
        t.serve(30, 0, Duration::from_millis(20));
        advance(Duration::from_secs(5)).await;
        assert!(
            s.tick(Instant::now(), &t.obs(true)).is_empty(),
            "stepped before the interval"
        );
        advance(Duration::from_secs(5)).await;
        assert_eq!(
            s.tick(Instant::now(), &t.obs(true)),
            vec![Event::Stepped { weight: expected }]
        );
        assert_eq!(s.last_check.as_ref().unwrap().result, CheckResult::Passed);
    }
    t.serve(30, 0, Duration::from_millis(20));
    advance(Duration::from_secs(10)).await;
    let events = s.tick(Instant::now(), &t.obs(true));
    assert_eq!(
        events,
        vec![Event::Stepped { weight: 100 }, Event::Promoted]
    );
    assert_eq!(s.phase, Phase::Draining);
    assert_eq!(weights(&s), (0, 100));
    assert_eq!(s.draining_clusters(), ["blue".to_string()]);
    // Old cluster still busy: stays draining; idle: completed.
    let mut busy = t.obs(true);
    busy.draining_in_flight = 2;
    assert!(s.tick(Instant::now(), &busy).is_empty());
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Drained { timed_out: false }]
    );
    assert_eq!(s.phase, Phase::Completed);
    assert_eq!(s.step, 4);
    assert!(s.tick(Instant::now(), &t.obs(true)).is_empty());
}

#[tokio::test(start_paused = true)]
async fn drain_timeout_completes_with_requests_still_running() {
    let mut s = shift();
    s.promote(Instant::now()).unwrap();
    let mut busy = TargetStats::new().obs(true);
    busy.draining_in_flight = 1;
    assert!(s.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(29)).await;
    assert!(s.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        s.tick(Instant::now(), &busy),
        vec![Event::Drained { timed_out: true }]
    );
}

/// The target down after promotion, its apps served by the draining cluster: the drain waits
/// while they are, and ends once the target serves them again; still down at the drain's
/// timeout, the shift rolls back (the old clusters get their weights back).
#[tokio::test(start_paused = true)]
async fn draining_clusters_serving_the_shard_hold_the_drain() {
    let mut s = shift();
    s.promote(Instant::now()).unwrap();
    let mut covering = TargetStats::new().obs(false);
    covering.draining_serve = true;
    assert!(s.tick(Instant::now(), &covering).is_empty());
    advance(Duration::from_secs(10)).await;
    assert!(s.tick(Instant::now(), &covering).is_empty());
    assert_eq!(s.phase, Phase::Draining);
    assert_eq!(
        s.tick(Instant::now(), &TargetStats::new().obs(true)),
        vec![Event::Drained { timed_out: false }]
    );

    let mut s = shift();
    s.promote(Instant::now()).unwrap();
    advance(Duration::from_secs(30)).await;
    let events = s.tick(Instant::now(), &covering);
    assert!(
        matches!(&events[..], [Event::RolledBack { reason: "not_ready", detail }]
            if detail.contains("end of the drain") && detail.contains("/-/healthz answered 503")),
        "{events:?}"
    );
    assert_eq!(s.phase, Phase::RolledBack);
    assert_eq!(weights(&s), (100, 0));
    assert!(s.draining_clusters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn not_ready_target_holds_then_rolls_back_at_ready_timeout() {
    let mut s = shift();
    let t = TargetStats::new();
    assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
    assert_eq!(weights(&s), (100, 0));
    advance(Duration::from_secs(30)).await;
    assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
    // Ready for a moment resets the clock.
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    advance(Duration::from_secs(10)).await;
    assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
    advance(Duration::from_secs(59)).await;
    assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
    advance(Duration::from_secs(1)).await;
    let events = s.tick(Instant::now(), &t.obs(false));
    assert!(
        matches!(
            &events[..],
            [Event::RolledBack {
                reason: "not_ready",
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(s.phase, Phase::RolledBack);
    assert_eq!(weights(&s), (100, 0));
    assert!(s
        .reason
        .as_deref()
        .unwrap()
        .contains("/-/healthz answered 503"));
}

#[tokio::test(start_paused = true)]
async fn failed_checks_in_a_row_roll_back_and_a_pass_resets_the_count() {
    let mut s = shift();
    let t = TargetStats::new();
    s.tick(Instant::now(), &t.obs(true));
    // Window 1: 10% errors -> failed check 1, weight held.
    t.serve(27, 3, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    let events = s.tick(Instant::now(), &t.obs(true));
    assert!(
        matches!(
            &events[..],
            [Event::CheckFailed {
                check: "error_rate",
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(weights(&s), (75, 25));
    assert_eq!(s.consecutive_failures, 1);
    // Window 2: clean -> passes, steps, count reset.
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 50 }]
    );
    assert_eq!(s.consecutive_failures, 0);
    // Windows 3 and 4: slow -> two latency failures -> rollback.
    for round in 0..2 {
        t.serve(30, 0, Duration::from_secs(2));
        advance(Duration::from_secs(10)).await;
        let events = s.tick(Instant::now(), &t.obs(true));
        assert!(
            matches!(
                events[0],
                Event::CheckFailed {
                    check: "latency",
                    ..
                }
            ),
            "{events:?}"
        );
        if round == 1 {
            assert!(
                matches!(
                    events[1],
                    Event::RolledBack {
                        reason: "latency",
                        ..
                    }
                ),
                "{events:?}"
            );
        }
    }
    assert_eq!(s.phase, Phase::RolledBack);
    assert_eq!(weights(&s), (100, 0));
    assert!(
        s.reason
            .as_deref()
            .unwrap()
            .contains("2 failed checks in a row"),
        "{:?}",
        s.reason
    );
}

#[tokio::test(start_paused = true)]
async fn too_few_requests_hold_the_step_until_there_are_enough() {
    let mut s = shift();
    let t = TargetStats::new();
    s.tick(Instant::now(), &t.obs(true));
    t.serve(5, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    assert_eq!(s.tick(Instant::now(), &t.obs(true)), vec![Event::Waiting]);
    assert_eq!(s.last_check.as_ref().unwrap().result, CheckResult::Waiting);
    advance(Duration::from_secs(10)).await;
    assert!(
        s.tick(Instant::now(), &t.obs(true)).is_empty(),
        "still waiting, nothing new to publish"
    );
    assert_eq!(weights(&s), (75, 25));
    // The window stays open: 15 more make 20 in total.
    t.serve(15, 0, Duration::from_millis(5));
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 50 }]
    );
}

#[tokio::test(start_paused = true)]
async fn controls_in_every_phase() {
    let now = Instant::now();
    // Progressing: pause ok, resume refused, promote and abort ok.
    let mut s = shift();
    assert!(s.resume().is_err());
    s.pause().unwrap();
    assert_eq!(s.phase, Phase::Paused);
    // Paused: pause refused, ticks do nothing, resume ok.
    assert_eq!(
        s.pause().unwrap_err().to_string(),
        "cannot pause a shift that is paused"
    );
    assert!(s.tick(now, &TargetStats::new().obs(true)).is_empty());
    assert_eq!(weights(&s), (100, 0));
    s.resume().unwrap();
    assert_eq!(
        s.tick(now, &TargetStats::new().obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    // Paused -> abort: weights back.
    s.pause().unwrap();
    s.abort("operator".into()).unwrap();
    assert_eq!((s.phase, weights(&s)), (Phase::Aborted, (100, 0)));
    // Terminal phases refuse every control.
    for action in ["pause", "resume", "promote", "abort"] {
        let r = match action {
            "pause" => s.pause(),
            "resume" => s.resume(),
            "promote" => s.promote(now).map(|_| ()),
            _ => s.abort("again".into()),
        };
        assert_eq!(
            r.unwrap_err().to_string(),
            format!("cannot {action} a shift that is aborted")
        );
    }
    // Paused -> promote: straight to 100 and draining; draining refuses pause, promote, resume.
    let mut s = shift();
    s.pause().unwrap();
    assert_eq!(s.promote(now).unwrap(), Event::Promoted);
    assert_eq!((s.phase, weights(&s)), (Phase::Draining, (0, 100)));
    assert!(s.pause().is_err() && s.promote(now).is_err() && s.resume().is_err());
    assert_eq!(s.draining_clusters(), ["blue".to_string()]);
    // Draining -> abort (the target failed after promotion): the old clusters get their weights
    // back and are no longer draining.
    s.abort("target lost".into()).unwrap();
    assert_eq!((s.phase, weights(&s)), (Phase::Aborted, (100, 0)));
    assert!(s.draining_clusters().is_empty());
}

#[tokio::test(start_paused = true)]
async fn restart_resumes_at_the_same_step_and_waits_a_window() {
    let mut s = shift();
    let t = TargetStats::new();
    s.tick(Instant::now(), &t.obs(true));
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    s.tick(Instant::now(), &t.obs(true));
    assert_eq!(weights(&s), (50, 50));
    // Persist and load: as after kill -9.
    let text = serde_json::to_string(&s).unwrap();
    let mut back: Shift = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (back.step, back.target_weight, back.phase),
        (2, 50, Phase::Progressing)
    );
    assert!(
        back.tick(Instant::now(), &t.obs(true)).is_empty(),
        "no step right after a restart"
    );
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    assert_eq!(
        back.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 75 }]
    );
}

#[test]
fn weights_of_revision_targets_and_several_old_clusters_sum_to_100() {
    let mut s = Shift::new(
        Target::Revision("v2".into()),
        vec!["v2-a".into(), "v2-b".into(), "v2-c".into()],
        policy(),
        BTreeMap::from([
            ("v1-a".into(), 70),
            ("v1-b".into(), 30),
            ("v2-a".into(), 0),
            ("v2-b".into(), 0),
            ("v2-c".into(), 0),
        ]),
    );
    for tw in [0, 10, 25, 50, 99, 100] {
        s.target_weight = tw;
        let w = s.weights();
        assert_eq!(w.values().sum::<u32>(), 100, "{tw}: {w:?}");
        assert_eq!(w["v2-a"] + w["v2-b"] + w["v2-c"], tw);
        let (a, b) = (w["v2-a"], w["v2-c"]);
        assert!(a.abs_diff(b) <= 1, "{w:?}");
        // Old clusters keep their 70:30 proportion.
        let old = 100 - tw;
        assert!(
            (w["v1-a"] as i64 - (old as i64 * 7 / 10)).abs() <= 1,
            "{w:?}"
        );
    }
    assert_eq!(s.old_clusters, ["v1-a", "v1-b"]);
}

/// A target that was not ready for a while is judged afresh once ready again: no step on the
/// window from before, and a full interval of new traffic first.
#[tokio::test(start_paused = true)]
async fn after_a_not_ready_spell_the_next_step_waits_a_fresh_window() {
    let mut s = shift();
    let t = TargetStats::new();
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    t.serve(30, 0, Duration::from_millis(10));
    advance(Duration::from_secs(5)).await;
    assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
    advance(Duration::from_secs(30)).await;
    // Ready again, the step overdue by the old clock: it waits.
    assert!(s.tick(Instant::now(), &t.obs(true)).is_empty());
    assert_eq!(weights(&s), (75, 25));
    advance(Duration::from_secs(5)).await;
    t.serve(30, 0, Duration::from_millis(10));
    assert!(s.tick(Instant::now(), &t.obs(true)).is_empty());
    // A full interval after it came back, on the new traffic only.
    advance(Duration::from_secs(5)).await;
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 50 }]
    );
}

/// With several replicas sharing the state, the leader cannot see the others' requests: the drain
/// lasts the whole drain_timeout even when its own view of the old cluster is idle.
#[tokio::test(start_paused = true)]
async fn a_shared_drain_lasts_its_timeout() {
    let mut s = shift();
    s.promote(Instant::now()).unwrap();
    let mut shared = TargetStats::new().obs(true);
    shared.in_flight_elsewhere = true;
    assert!(s.tick(Instant::now(), &shared).is_empty());
    advance(Duration::from_secs(29)).await;
    assert!(s.tick(Instant::now(), &shared).is_empty());
    assert_eq!(s.phase, Phase::Draining);
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        s.tick(Instant::now(), &shared),
        vec![Event::Drained { timed_out: false }]
    );
    assert_eq!(s.phase, Phase::Completed);
}

/// A target that keeps flapping (briefly not ready every few seconds) never gets a clean window to
/// step on, and its spells add up: at ready_timeout in total the shift rolls back.
#[tokio::test(start_paused = true)]
async fn a_flapping_target_rolls_back_when_its_spells_add_up() {
    let mut s = shift();
    s.policy.ready_timeout = Duration::from_secs(20);
    let t = TargetStats::new();
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    let mut rolled_back = None;
    for round in 0..20 {
        // 4 s not ready, then 4 s ready (with traffic): never a full 10 s interval of health.
        assert!(s.tick(Instant::now(), &t.obs(false)).is_empty());
        advance(Duration::from_secs(4)).await;
        let events = s.tick(Instant::now(), &t.obs(false));
        if !events.is_empty() {
            rolled_back = Some((round, events));
            break;
        }
        t.serve(30, 0, Duration::from_millis(10));
        assert!(
            s.tick(Instant::now(), &t.obs(true)).is_empty(),
            "stepped on a flapping target"
        );
        advance(Duration::from_secs(4)).await;
    }
    let (round, events) = rolled_back.expect("rolled back");
    assert_eq!(round, 4, "20 s of not-ready spells of 4 s: the fifth");
    assert!(
        matches!(
            &events[..],
            [Event::RolledBack {
                reason: "not_ready",
                ..
            }]
        ),
        "{events:?}"
    );
    assert_eq!(weights(&s), (100, 0));
}

#[test]
fn a_late_cluster_joins_a_revision_target_before_promotion_only() {
    let mut s = Shift::new(
        Target::Revision("v2".into()),
        vec!["g1".into()],
        policy(),
        BTreeMap::from([("blue".into(), 100), ("g1".into(), 0), ("g2".into(), 0)]),
    );
    s.target_weight = 50;
    assert!(matches!(
        s.join_target("g2"),
        Some(Event::TargetJoined { cluster }) if cluster == "g2"
    ));
    assert_eq!(s.join_target("g2"), None, "joins once");
    let w = s.weights();
    assert_eq!((w["blue"], w["g1"], w["g2"]), (50, 25, 25));
    assert_eq!(s.old_clusters, ["blue"]);
    // Rolled back: the start weights, the joined cluster at none.
    let mut rolled = s.clone();
    rolled.abort("test".into()).unwrap();
    assert_eq!(rolled.weights().get("g2").copied().unwrap_or(0), 0);
    // A cluster target never grows; nor does a promoted shift.
    assert_eq!(shift().join_target("g2"), None);
    s.promote(Instant::now()).unwrap();
    assert_eq!(s.join_target("g3"), None);
}

/// A cluster that joins a revision target brings its counters from before: they do not count in
/// the window that was open, a fresh one starts with the join.
#[tokio::test(start_paused = true)]
async fn a_joined_cluster_starts_a_fresh_window() {
    let mut s = Shift::new(
        Target::Revision("v2".into()),
        vec!["green".into()],
        policy(),
        BTreeMap::from([("blue".into(), 100), ("green".into(), 0), ("g2".into(), 0)]),
    );
    let t = TargetStats::new();
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 25 }]
    );
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(5)).await;
    assert!(s.join_target("g2").is_some());
    // The target's counters now include g2's errors from before the shift reached it.
    t.serve(0, 100, Duration::from_millis(5));
    advance(Duration::from_secs(5)).await;
    assert!(s.tick(Instant::now(), &t.obs(true)).is_empty());
    assert_eq!(s.consecutive_failures, 0, "{:?}", s.last_check);
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    assert_eq!(
        s.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 50 }]
    );
}

/// A drain resumed after a restart (or by a new leader) ends `drain_timeout` after the promotion,
/// not after the resumption.
#[tokio::test(start_paused = true)]
async fn a_resumed_drain_ends_its_timeout_after_the_promotion() {
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut busy = TargetStats::new().obs(true);
    busy.draining_in_flight = 1;
    let resumed = |promoted_secs_ago: u64| {
        let mut s = shift();
        s.promote(Instant::now()).unwrap();
        let mut back: Shift = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        back.promoted_at = Some(wall - promoted_secs_ago);
        back
    };
    // Over long ago: what is left is the 2 s allowance for the clocks' difference.
    let mut late = resumed(40);
    assert!(late.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(2)).await;
    assert_eq!(
        late.tick(Instant::now(), &busy),
        vec![Event::Drained { timed_out: true }]
    );
    let mut early = resumed(10);
    assert!(early.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(20)).await;
    assert!(early.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(3)).await;
    assert_eq!(
        early.tick(Instant::now(), &busy),
        vec![Event::Drained { timed_out: true }]
    );
    // A leader that takes over resets its timers: the same.
    let mut s = shift();
    s.promote(Instant::now()).unwrap();
    s.promoted_at = Some(wall - 40);
    s.reset_timers();
    assert!(s.tick(Instant::now(), &busy).is_empty());
    advance(Duration::from_secs(2)).await;
    assert_eq!(
        s.tick(Instant::now(), &busy),
        vec![Event::Drained { timed_out: true }]
    );
}

/// A cluster of the target revision that held weight when the shift started (it was not ready
/// then) joins with its share: the old clusters' share does not grow, and it is not drained.
#[test]
fn a_weighted_cluster_of_the_revision_joins_with_its_share() {
    let mut s = Shift::new(
        Target::Revision("v2".into()),
        vec!["g1".into()],
        policy(),
        BTreeMap::from([("blue".into(), 80), ("g1".into(), 10), ("g2".into(), 10)]),
    );
    assert_eq!(s.target_weight, 10);
    let w = s.weights();
    assert_eq!((w["blue"], w["g1"], w["g2"]), (80, 10, 10));
    assert!(s.join_target("g2").is_some());
    assert_eq!(s.target_weight, 20);
    let w = s.weights();
    assert_eq!((w["blue"], w["g1"], w["g2"]), (80, 10, 10));
    assert_eq!(s.old_clusters, ["blue"]);
}

proptest::proptest! {
    /// As a shift's target weight grows, no other cluster's weight ever rises (the rest shrinks
    /// unit by unit), and the weights always add up to 100: sticky keys that reached the target
    /// have nowhere to go back to.
    #[test]
    fn old_weights_never_rise_as_the_target_grows(
        mut old in proptest::collection::vec(0u32..=60, 1..5),
        mut steps in proptest::collection::vec(0u32..=100, 1..15),
    ) {
        // A shard's weights add up to 100 at most.
        while old.iter().sum::<u32>() > 100 {
            let i = old.iter().position(|&w| w > 0).expect("sum above 0");
            old[i] -= 1;
        }
        let mut start: BTreeMap<String, u32> = old
            .iter()
            .enumerate()
            .map(|(i, &w)| (format!("old-{i}"), w))
            .collect();
        let sum: u32 = start.values().sum();
        start.insert("target".into(), 100u32.saturating_sub(sum));
        let mut s = Shift::new(
            Target::Cluster("target".into()),
            vec!["target".into()],
            policy(),
            start,
        );
        steps.sort_unstable();
        let mut before = s.weights();
        for t in steps {
            s.target_weight = t.max(s.target_weight);
            let now = s.weights();
            proptest::prop_assert_eq!(now.values().sum::<u32>(), 100, "{:?}", now);
            for (name, w) in &now {
                if name != "target" {
                    proptest::prop_assert!(*w <= before[name], "{} rose: {:?} -> {:?}", name, before, now);
                }
            }
            before = now;
        }
    }
}

/// A cluster joining a revision target takes its share with it and changes no other cluster's
/// weight (the rounding is consistent): the old clusters' sticky keys stay where they are.
#[test]
fn a_joining_cluster_leaves_the_other_weights_as_they_were() {
    let start: BTreeMap<String, u32> = [("a", 33), ("b", 1), ("c", 21), ("g1", 0), ("g2", 45)]
        .into_iter()
        .map(|(n, w)| (n.to_string(), w))
        .collect();
    let mut s = Shift::new(
        Target::Revision("v2".into()),
        vec!["g1".into()],
        policy(),
        start,
    );
    for t in [10, 17, 23, 36] {
        s.target_weight = t;
        let before = s.weights();
        let mut joined = s.clone();
        assert!(joined.join_target("g2").is_some());
        let after = joined.weights();
        for name in ["a", "b", "c"] {
            assert_eq!(
                after[name], before[name],
                "{name} at {t}: {before:?} -> {after:?}"
            );
        }
        assert_eq!(
            after["g1"] + after["g2"],
            before["g1"] + before["g2"],
            "g2 brought its share: {before:?} -> {after:?}"
        );
    }
}

/// A replica that judges but cannot write (stranded) holds the step after a passed check: the
/// count of failures in a row starts again and the next window is a full interval from now, so a
/// failure, a pass and a failure do not roll back (as for a leader), and the step stays.
#[tokio::test(start_paused = true)]
async fn a_passed_check_that_cannot_step_still_resets_the_failures() {
    let mut s = shift();
    let t = TargetStats::new();
    s.tick(Instant::now(), &t.obs(true));
    assert_eq!(weights(&s), (75, 25));
    // Failed check 1.
    t.serve(27, 3, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    s.tick(Instant::now(), &t.obs(true));
    assert_eq!(s.consecutive_failures, 1);
    // A clean window: the machine steps; the step cannot be written, the check is kept.
    t.serve(30, 0, Duration::from_millis(5));
    advance(Duration::from_secs(10)).await;
    let mut stepped = s.clone();
    assert_eq!(
        stepped.tick(Instant::now(), &t.obs(true)),
        vec![Event::Stepped { weight: 50 }]
    );
    s.hold_at_step(&stepped);
    assert_eq!((s.step, weights(&s)), (1, (75, 25)));
    assert_eq!(s.consecutive_failures, 0);
    assert_eq!(
        s.last_check.as_ref().map(|c| c.result),
        Some(CheckResult::Passed)
    );
    // The next window is a full interval from the pass, not due at once.
    advance(Duration::from_secs(5)).await;
    assert!(s.tick(Instant::now(), &t.obs(true)).is_empty());
    // A failure after the pass is the first in a row again: no rollback.
    t.serve(27, 3, Duration::from_millis(5));
    advance(Duration::from_secs(5)).await;
    let events = s.tick(Instant::now(), &t.obs(true));
    assert!(
        matches!(&events[..], [Event::CheckFailed { .. }]),
        "{events:?}"
    );
    assert_eq!((s.phase, s.consecutive_failures), (Phase::Progressing, 1));
    // Holding is only for one step forward from a running shift.
    let mut rolled = s.clone();
    rolled.phase = Phase::RolledBack;
    let before = rolled.consecutive_failures;
    rolled.hold_at_step(&stepped);
    assert_eq!(rolled.consecutive_failures, before);
}

/// Two states of one shift differ as decisions by their persisted fields, never by the stamp.
#[test]
fn same_decision_ignores_the_stamp_and_sees_every_persisted_change() {
    let a = shift();
    let mut b = a.clone();
    b.decided_at = Some(42);
    assert!(a.same_decision(&b));
    let mut c = a.clone();
    c.consecutive_failures = 1;
    assert!(!a.same_decision(&c));
    let mut d = a.clone();
    d.phase = Phase::Paused;
    assert!(!a.same_decision(&d));
}

/// A rollback not yet written stays over an older decision of the same shift (a write that landed
/// late, even one further along) and over a later one that does not take the target to be good (a
/// failed check, a wait); it gives way to a later step, a pause, a promotion, the same shift started
/// again, a rollback or abort, and another shift.
#[test]
fn an_unwritten_rollback_stands_over_older_decisions_only() {
    let mut ours = shift();
    ours.step = 1;
    ours.phase = Phase::RolledBack;
    ours.reason = Some("2 failed checks in a row".into());
    ours.decided_at = Some(2_000);
    let stands = |theirs: &Shift| ours.rollback_over(theirs).is_some();
    let mut stale = shift();
    stale.started_at = ours.started_at;
    stale.step = 2;
    stale.target_weight = 50;
    stale.decided_at = Some(1_000);
    assert!(stands(&stale));
    let mut failed_later = stale.clone();
    failed_later.step = 1;
    failed_later.consecutive_failures = 1;
    failed_later.decided_at = Some(3_000);
    assert!(stands(&failed_later));
    let mut stepped_later = stale.clone();
    stepped_later.decided_at = Some(3_000);
    assert!(!stands(&stepped_later));
    let mut paused_later = failed_later.clone();
    paused_later.phase = Phase::Paused;
    assert!(!stands(&paused_later));
    let mut paused_before = stale.clone();
    paused_before.phase = Phase::Paused;
    assert!(stands(&paused_before));
    for phase in [
        Phase::Draining,
        Phase::Completed,
        Phase::RolledBack,
        Phase::Aborted,
    ] {
        let mut ended = stale.clone();
        ended.phase = phase;
        assert!(!stands(&ended), "{phase:?}");
    }
    let mut started_again = shift();
    started_again.started_at = ours.started_at.map(|t| t + 5_000);
    started_again.decided_at = Some(3_000);
    assert!(!stands(&started_again));
    let mut other = stale.clone();
    other.target = Target::Cluster("violet".into());
    assert!(!stands(&other));
    // Written by an older version (no stamps): no order, only "no further" stands.
    let mut unstamped = stale.clone();
    unstamped.started_at = None;
    unstamped.decided_at = None;
    assert!(!stands(&unstamped));
    unstamped.step = 1;
    assert!(stands(&unstamped));
    // Only a rollback stands.
    let mut failed_check = ours.clone();
    failed_check.phase = Phase::Progressing;
    assert!(failed_check.rollback_over(&stale).is_none());
}

/// A rollback that stood over a later step is that step's rollback from then on: the leader's
/// failed check at that step, decided after it, does not undo it; a step past it does.
#[test]
fn a_rollback_over_a_later_step_is_compared_with_that_step() {
    let mut ours = shift();
    ours.step = 1;
    ours.phase = Phase::RolledBack;
    ours.decided_at = Some(3_000);
    let mut at_three = shift();
    at_three.started_at = ours.started_at;
    at_three.step = 3;
    at_three.target_weight = 75;
    at_three.decided_at = Some(2_000);
    let over = ours
        .rollback_over(&at_three)
        .expect("stands over an older step 3");
    assert_eq!((over.phase, over.step), (Phase::RolledBack, 3));
    assert_eq!(weights(&over), (100, 0));
    assert_eq!(over.decided_at, Some(3_000));
    let mut failed_at_three = at_three.clone();
    failed_at_three.consecutive_failures = 1;
    failed_at_three.decided_at = Some(4_000);
    let again = over
        .rollback_over(&failed_at_three)
        .expect("the leader's failed check at step 3 does not undo it");
    assert_eq!(again.decided_at, Some(4_001));
    let mut at_four = at_three.clone();
    at_four.step = 4;
    at_four.decided_at = Some(5_000);
    assert!(again.rollback_over(&at_four).is_none());
}

/// A leader's unwritten failed check stays over the shift it was made on, as read back from shared
/// storage; not over a later decision, another step or phase, or another shift.
#[test]
fn an_unwritten_failed_check_stays_only_over_the_shift_it_was_made_on() {
    let mut ours = shift();
    ours.step = 1;
    ours.target_weight = 25;
    ours.consecutive_failures = 1;
    ours.decided_at = Some(2_000);
    let mut written = ours.clone();
    written.consecutive_failures = 0;
    written.decided_at = Some(1_000);
    let over = ours
        .unwritten_over(&written)
        .expect("over the shift it was made on");
    assert_eq!(over.consecutive_failures, 1);
    assert_eq!(over.decided_at, Some(2_000));
    let mut later = written.clone();
    later.decided_at = Some(3_000);
    assert!(ours.unwritten_over(&later).is_none(), "decided later");
    let mut stepped = written.clone();
    stepped.step = 2;
    assert!(ours.unwritten_over(&stepped).is_none(), "another step");
    let mut paused = written.clone();
    paused.phase = Phase::Paused;
    assert!(ours.unwritten_over(&paused).is_none(), "another phase");
    let mut unstamped = written.clone();
    unstamped.decided_at = None;
    assert!(
        ours.unwritten_over(&unstamped).is_none(),
        "no order to go by"
    );
    let mut other = written.clone();
    other.started_at = Some(ours.started_at.unwrap_or(0) + 1);
    assert!(ours.unwritten_over(&other).is_none(), "another shift");
    let mut judged_more = written.clone();
    judged_more.consecutive_failures = 2;
    assert!(
        ours.unwritten_over(&judged_more).is_none(),
        "more failed checks"
    );
    let mut joined = written.clone();
    joined.target_clusters.push("green-2".into());
    assert!(
        ours.unwritten_over(&joined).is_none(),
        "a target cluster ours lacks"
    );
}
