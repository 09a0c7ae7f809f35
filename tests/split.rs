//! Weighted and sticky splits between a shard's clusters, and weight changes under load.

mod common;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};

async fn two_clusters(blue_weight: u32, extra: &str) -> (ServeStub, ServeStub, TestGateway) {
    old_and_new(
        "shard-0",
        ("blue", blue_weight),
        ("green", 100 - blue_weight),
        extra,
    )
    .await
}

/// 10,000 requests at 70/30 land within 2 points of the weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_accuracy_within_two_points() {
    let (blue, green, gw) = two_clusters(70, "").await;
    let load = Load::start(gw.url("/echo"), 16, false);
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while load.sent() < 10_000 {
        assert!(tokio::time::Instant::now() < deadline, "load too slow");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let total = report.ok as f64;
    let blue_share = report.by_cluster["blue"] as f64 / total * 100.0;
    println!("{} requests: blue {blue_share:.2}% (want 70)", report.ok);
    assert!(report.ok >= 10_000);
    assert!(
        (blue_share - 70.0).abs() <= 2.0,
        "blue got {blue_share:.2}%"
    );
    assert_eq!(blue.requests() + green.requests(), report.ok);
}

/// With a sticky key, each key sticks to one cluster, and as green's weight only grows a key that
/// moved to green never moves back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_split_moves_keys_once_and_never_back() {
    let (_blue, _green, gw) = two_clusters(100, "split_key: header:x-user\n").await;
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let mut on_green: Vec<bool> = vec![false; users.len()];
    for green_weight in [0u32, 10, 25, 50, 75, 90, 100] {
        let r = gw
            .set_weights(
                "shard-0",
                &[("blue", 100 - green_weight), ("green", green_weight)],
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let mut count = 0;
        for (i, user) in users.iter().enumerate() {
            // Two requests per key: the pick is stable for a key.
            let a = send(Method::GET, &gw.url("/echo"), &[("x-user", user)], "").await;
            let b = send(Method::GET, &gw.url("/echo"), &[("x-user", user)], "").await;
            assert_eq!(
                a.cluster(),
                b.cluster(),
                "{user} bounced at green={green_weight}"
            );
            let green_now = a.cluster() == Some("green");
            assert!(
                !on_green[i] || green_now,
                "{user} moved back to blue at green={green_weight}"
            );
            on_green[i] = green_now;
            count += usize::from(green_now);
        }
        let share = count as f64 / users.len() as f64 * 100.0;
        assert!(
            (share - green_weight as f64).abs() <= 12.0,
            "green={green_weight}: {share}% of keys"
        );
    }
    assert!(on_green.iter().all(|g| *g));
}

/// Weights changed 100 times a second under load: zero failed requests, both clusters used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_changes_under_load_lose_nothing() {
    let (blue, green, gw) = two_clusters(50, "").await;
    let load = Load::start(gw.url("/echo"), 8, true);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let changes = 300u32;
    for changes in 0..changes {
        tick.tick().await;
        let w = (changes * 7) % 101;
        let r = gw
            .set_weights("shard-0", &[("blue", w), ("green", 100 - w)])
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    let elapsed = start.elapsed();
    let report = load.stop().await;
    println!(
        "{changes} weight changes in {elapsed:?}; {} requests, {} failed",
        report.ok, report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(report.ok > 500);
    assert!(blue.requests() > 0 && green.requests() > 0);
    let state = gw.state().await;
    assert!(state["version"].as_u64().unwrap() as u32 >= changes);
}

/// In a shard of one revision (many small clusters, between upgrades), a cluster that goes unready
/// takes only its own sticky keys with it, spread over the others: every other key stays on its
/// cluster, and its keys come back with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unready_cluster_moves_only_its_own_sticky_keys() {
    unready_cluster_moves_only_its_own_keys(["v1", "v1", "v1"], &["sticky-b", "sticky-c"]).await;
}

/// The same while two revisions share the shard (mid-shift): an old cluster going unready moves
/// none of the other old cluster's keys to the new revision, nor any of the new one's, and its own
/// keys stay in the old revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unready_cluster_moves_only_its_own_sticky_keys_mid_shift() {
    unready_cluster_moves_only_its_own_keys(["v1", "v1", "v2"], &["sticky-b"]).await;
}

/// Clusters `sticky-a` (40), `sticky-b` (30), `sticky-c` (30) of `revisions`; `sticky-a` goes
/// unready, its keys go to `went_to`, and it comes back.
async fn unready_cluster_moves_only_its_own_keys(revisions: [&str; 3], went_to: &[&str]) {
    let apps = [("echo", "/echo")];
    let a = stub("sticky-a", revisions[0], &apps).await;
    let b = stub("sticky-b", revisions[1], &apps).await;
    let c = stub("sticky-c", revisions[2], &apps).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&a, "shard-0", revisions[0], Some(40)),
            cluster(&b, "shard-0", revisions[1], Some(30)),
            cluster(&c, "shard-0", revisions[2], Some(30)),
        ],
        "split_key: header:x-user\n",
    ))
    .await;
    let users: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let picks = |gw: &TestGateway| {
        let url = gw.url("/echo");
        let users = users.clone();
        async move {
            let mut out = Vec::new();
            for user in &users {
                let r = send(Method::GET, &url, &[("x-user", user)], "").await;
                assert_eq!(r.status, StatusCode::OK, "{}", r.body);
                out.push(r.cluster().expect("answered by a cluster").to_string());
            }
            out
        }
    };
    let before = picks(&gw).await;
    // The first cluster: with an interval per cluster, the others' keys would slide from one to
    // the other.
    a.set_healthy(false);
    gw.wait_cluster_ready("sticky-a", false).await;
    let during = picks(&gw).await;
    let mut moved = 0;
    for (i, user) in users.iter().enumerate() {
        if before[i] == "sticky-a" {
            assert_ne!(during[i], "sticky-a", "{user}");
            moved += 1;
        } else {
            assert_eq!(during[i], before[i], "{user} moved off a ready cluster");
        }
    }
    assert!(moved > 40, "only {moved} keys were on sticky-a");
    let spread: std::collections::BTreeSet<&str> = (0..users.len())
        .filter(|&i| before[i] == "sticky-a")
        .map(|i| during[i].as_str())
        .collect();
    assert_eq!(
        spread.into_iter().collect::<Vec<_>>(),
        went_to,
        "where sticky-a's keys went"
    );
    a.set_healthy(true);
    gw.wait_cluster_ready("sticky-a", true).await;
    assert_eq!(picks(&gw).await, before, "keys back where they were");
}
