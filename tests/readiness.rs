//! Readiness: a cluster that fails its probes, or does not list an app, gets no traffic for it;
//! its share goes to the shard's ready clusters.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;

/// A cluster going unready mid-load gets no new requests, no client request fails, and it is back in
/// the split once healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_cluster_mid_load_gets_no_new_requests() {
    let (_blue, green, gw) = old_and_new("shard-0", ("blue", 50), ("green", 50), "").await;
    let load = Load::start(gw.url("/echo"), 8, true);
    load.wait_for_more(500).await;
    assert!(green.requests() > 0);

    // Serve reports draining: /-/healthz 503. Still serving requests already sent, as Serve does.
    green.set_healthy(false);
    gw.wait_cluster_ready("green", false).await;
    // Requests routed before the table swap may still be arriving; after that, none.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = green.requests();
    load.wait_for_more(1_000).await;
    assert_eq!(
        green.requests(),
        before,
        "an unready cluster received new requests"
    );
    let state = gw.cluster_state("green").await;
    assert!(
        state["detail"]
            .as_str()
            .unwrap()
            .contains("/-/healthz answered 503"),
        "{state}"
    );

    green.set_healthy(true);
    gw.wait_cluster_ready("green", true).await;
    load.wait_for_more(500).await;
    let report = load.stop().await;
    assert!(green.requests() > before, "green never came back");
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    println!("{} requests, 0 failed", report.ok);
}

/// A ready cluster whose probes fail stays ready, in its split and taking requests, until
/// `probe.failure_threshold` rounds in a row have failed (one slow round or a blip does not take a
/// cluster out); meanwhile its `detail` says its probes are failing and `rayshift_probes_total`
/// counts the failed rounds. Then it is not ready; one passing round makes it ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_leaves_its_split_only_after_failure_threshold_failed_probes() {
    let blue = stub("ft-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("ft-green", "v2", &[("echo", "/echo")]).await;
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(50)),
            cluster(&green, "shard-0", "v2", Some(50)),
        ],
        "",
    )
    // 30 rounds of 100 ms: time to see the cluster failing its probes but still serving.
    .replace("probe:\n", "probe:\n  failure_threshold: 30\n");
    let gw = TestGateway::start(&yaml).await;
    gw.wait_cluster_ready("ft-green", true).await;
    let load = Load::start(gw.url("/echo"), 4, true);
    load.wait_for_more(200).await;

    // The counter is the process's (tests share it): counted from here.
    let failed_rounds = || async {
        let series = r#"rayshift_probes_total{cluster="ft-green",result="not_ready"}"#;
        metric(&gw, series).await.unwrap_or(0.0)
    };
    let base = failed_rounds().await;
    green.set_healthy(false);
    eventually(
        "green's probes reported failing while it stays ready",
        || async {
            let state = gw.cluster_state("ft-green").await;
            state["detail"]
                .as_str()
                .is_some_and(|d| d.starts_with("still ready, but its probes are failing"))
        },
    )
    .await;
    let state = gw.cluster_state("ft-green").await;
    let rounds = failed_rounds().await - base;
    assert!(
        rounds < 30.0,
        "{rounds} failed rounds already: the machine stalled for seconds"
    );
    assert_eq!(
        state["ready"], true,
        "after {rounds} failed rounds: {state}"
    );
    assert!(
        state["detail"].as_str().unwrap().ends_with(
            "(not ready after 30 failed rounds in a row): /-/healthz answered 503 Service Unavailable: This node is being drained."
        ),
        "{state}"
    );
    let before = green.requests();
    load.wait_for_more(100).await;
    assert!(
        green.requests() > before,
        "a cluster still counted ready got no requests"
    );

    gw.wait_cluster_ready("ft-green", false).await;
    let rounds = failed_rounds().await - base;
    assert!(rounds >= 30.0, "not ready after {rounds} failed rounds");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = green.requests();
    load.wait_for_more(500).await;
    assert_eq!(green.requests(), before, "a cluster not ready got requests");
    let state = gw.cluster_state("ft-green").await;
    assert!(
        state["detail"]
            .as_str()
            .unwrap()
            .starts_with("/-/healthz answered 503"),
        "{state}"
    );

    green.set_healthy(true);
    gw.wait_cluster_ready("ft-green", true).await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
}

/// Healthy but with no routes yet (Serve starting up), or routes without the app: no traffic for it.
/// When the only weighted cluster is unready, its share goes to the ready one even at weight 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_gate_traffic_per_application() {
    let blue = stub("blue", "v1", &[("echo", "/echo"), ("other", "/other")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(0)),
            cluster(&green, "shard-0", "v2", Some(100)),
        ],
        "",
    ))
    .await;
    // `other` is only on blue: it goes there although blue's weight is 0.
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/other")).await.cluster(), Some("blue"));
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
    // Green's route table empties (as while Serve starts): echo fails over to blue.
    green.set_routes_populated(false);
    gw.wait_cluster_ready("green", false).await;
    for _ in 0..20 {
        let r = get(&gw.url("/echo")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.cluster(), Some("blue"));
    }
    // Nothing ready for `other` any more: 503 naming the app and shard.
    blue.set_healthy(false);
    gw.wait_cluster_ready("blue", false).await;
    let r = get(&gw.url("/other")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.body.contains("'other'") && r.body.contains("'shard-0'"),
        "{}",
        r.body
    );
}

/// Apps found in a cluster's /-/routes join the table while traffic flows; removed ones leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovered_apps_follow_the_clusters_routes() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[cluster(&blue, "shard-0", "v1", None)],
        "",
    ))
    .await;
    assert_eq!(get(&gw.url("/late")).await.status, StatusCode::NOT_FOUND);
    blue.set_apps(vec![
        ("echo".into(), "/echo".into()),
        ("late".into(), "/late".into()),
    ]);
    eventually("late app routed", || async {
        get(&gw.url("/late/x")).await.status == StatusCode::OK
    })
    .await;
    let state = gw.state().await;
    let apps: Vec<&str> = state["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert!(apps.contains(&"late") && apps.contains(&"echo"), "{apps:?}");
    blue.set_apps(vec![("echo".into(), "/echo".into())]);
    eventually("late app gone", || async {
        get(&gw.url("/late/x")).await.status == StatusCode::NOT_FOUND
    })
    .await;
    assert_eq!(get(&gw.url("/echo")).await.status, StatusCode::OK);
}

/// Two revisions serve an application under one name at different route prefixes: the table has
/// it at the first prefix, and only the cluster that lists that very (prefix, name) pair gets its
/// requests (the other would answer them 404, whatever its weight).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_serving_an_app_at_another_prefix_gets_none_of_its_traffic() {
    let blue = stub("pb-blue", "v1", &[("a", "/a")]).await;
    let green = stub("pb-green", "v2", &[("a", "/v2/a")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(50)),
            cluster(&green, "shard-0", "v2", Some(50)),
        ],
        "",
    ))
    .await;
    for _ in 0..40 {
        let r = get(&gw.url("/a/x")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cluster(), Some("pb-blue"));
    }
    // A shift to green holds at its gate, and rolls back naming the mismatch.
    let r = send(
        http::Method::POST,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[],
        r#"{"to": "pb-green", "step_interval": "1h", "ready_timeout": "300ms"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("the shift rolls back naming the other prefix", || async {
        let shift = get(&gw.admin("/v1/shards/shard-0/shift")).await.body;
        shift.contains("rolled_back")
            && shift.contains("does not list a at /a (it lists it at /v2/a)")
    })
    .await;
}

/// Two revisions serve one route prefix under different application names (an upgrade that
/// renamed the app): the prefix belongs to a cluster that can take traffic, so when the old one
/// goes unready the new one serves it instead of a 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_follows_the_cluster_that_can_serve_it() {
    let blue = stub("rn-blue", "v1", &[("api-v1", "/api")]).await;
    let green = stub("rn-green", "v2", &[("api-v2", "/api")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v2", Some(0)),
        ],
        "",
    ))
    .await;
    assert_eq!(get(&gw.url("/api/x")).await.cluster(), Some("rn-blue"));
    blue.set_healthy(false);
    gw.wait_cluster_ready("rn-blue", false).await;
    for _ in 0..10 {
        let r = get(&gw.url("/api/x")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cluster(), Some("rn-green"));
    }
}

/// An application declared in the config is served by the clusters listing its name at the
/// declared prefix, also when written with a trailing `/` (`/echo/` for Serve's `/echo`), and a
/// shift's gate accepts such a cluster; a cluster that moved the app elsewhere gets none of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_app_is_served_by_the_clusters_listing_its_name() {
    let blue = stub("cf-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("cf-green", "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v2", Some(0)),
        ],
        "apps:\n  - {name: echo, route_prefix: /echo/, shard: shard-0}\n",
    ))
    .await;
    let r = get(&gw.url("/echo/x")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cluster(), Some("cf-blue"));
    let r = send(
        http::Method::POST,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[],
        r#"{"to": "cf-green", "step_percent": 100, "step_interval": "100ms", "min_requests": 0, "drain_timeout": "1s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("the shift completes", || async {
        get(&gw.admin("/v1/shards/shard-0/shift"))
            .await
            .body
            .contains("\"state\": \"completed\"")
    })
    .await;
    assert_eq!(get(&gw.url("/echo/x")).await.cluster(), Some("cf-green"));
}

/// A configured application that a new revision serves at another prefix: that revision gets
/// none of the app's requests (it would answer them 404), whatever its weight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_app_moved_to_another_prefix_gets_no_traffic_there() {
    let blue = stub("mv-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("mv-green", "v2", &[("echo", "/v2/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(50)),
            cluster(&green, "shard-0", "v2", Some(50)),
        ],
        "apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n",
    ))
    .await;
    for _ in 0..40 {
        let r = get(&gw.url("/echo/x")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cluster(), Some("mv-blue"));
    }
}
