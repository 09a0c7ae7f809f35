//! Shifts end to end: a real gateway, real stub clusters, a load client running throughout.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Blue (v1, 100) and green (v2, 0) serving `echo` in one shard.
async fn blue_green(extra: &str) -> (ServeStub, ServeStub, TestGateway) {
    named_blue_green("shard-0", "blue", "green", extra).await
}

/// Like [`blue_green`] with names of the test's own, for tests that read metrics: the tests of one
/// binary share the process-wide metrics recorder.
async fn named_blue_green(
    shard: &str,
    old: &str,
    new: &str,
    extra: &str,
) -> (ServeStub, ServeStub, TestGateway) {
    old_and_new(shard, (old, 100), (new, 0), extra).await
}

/// Opens a streamed response of `chunks` chunks 100 ms apart through the gateway and checks that
/// `cluster` answers it: a request in flight there until the stream ends or is dropped.
async fn stream_from(
    gw: &TestGateway,
    cluster: &str,
    chunks: u32,
) -> http::Response<hyper::body::Incoming> {
    let req = http::Request::get(gw.url(&format!("/echo/stream?n={chunks}&interval_ms=100")))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.headers()["x-stub-cluster"], cluster);
    resp
}

/// Sends `n` requests for `/echo`: each answered 200 by `cluster`.
async fn answered_by(gw: &TestGateway, cluster: &str, n: usize) {
    for _ in 0..n {
        let r = get(&gw.url("/echo")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cluster(), Some(cluster));
    }
}

/// Starts a shift of `shard` to `to` that takes no step by itself (1 h apart) and drains for up
/// to `drain`, and promotes it: `to` holds all the weight, the old clusters drain.
async fn promote_now(gw: &TestGateway, shard: &str, to: &str, drain: &str) {
    let r = post(
        &gw.admin(&format!("/v1/shards/{shard}/shift")),
        &format!(r#"{{"to": "{to}", "step_interval": "1h", "drain_timeout": "{drain}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = post(&gw.admin(&format!("/v1/shards/{shard}/shift/promote")), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// GET, POST and a streamed response, in rotation.
fn mixed_load(gw: &TestGateway, concurrency: usize) -> Load {
    Load::rotating(
        vec![
            (Method::GET, gw.url("/echo")),
            (Method::POST, gw.url("/echo/x")),
            (Method::GET, gw.url("/echo/stream?n=3&interval_ms=10")),
        ],
        concurrency,
    )
}

async fn post(url: &str, body: &str) -> Resp {
    send(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// The shard's shift, or `Null` while it has none.
async fn shift_of(gw: &TestGateway, shard: &str) -> Value {
    let r = get(&gw.admin(&format!("/v1/shards/{shard}/shift"))).await;
    if r.status == StatusCode::NOT_FOUND && r.body.contains("has no shift") {
        return Value::Null;
    }
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn wait_shift_state(gw: &TestGateway, shard: &str, states: &[&str]) -> Value {
    let mut last = Value::Null;
    for _ in 0..1500 {
        last = shift_of(gw, shard).await;
        if states.iter().any(|s| last["state"] == *s) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("shift of {shard} never reached {states:?}; last: {last}");
}

/// A full shift in steps under mixed load, then the old cluster drained and stopped: zero failed
/// requests out of all sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_shift_under_load_loses_no_request() {
    let (blue, green, gw) = named_blue_green("fs", "fs-blue", "fs-green", "").await;
    let load = mixed_load(&gw, 8);
    load.wait_for_more(200).await;
    let r = post(
        &gw.admin("/v1/shards/fs/shift"),
        r#"{"to": "fs-green", "step_percent": 25, "step_interval": "300ms", "min_requests": 20, "max_p99_latency": "2s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let started: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(started["state"], "progressing");

    // Watch the target weight only grow, in steps of 25.
    let mut seen = vec![];
    loop {
        let shift = shift_of(&gw, "fs").await;
        let w = shift["target_weight"].as_u64().unwrap();
        if seen.last() != Some(&w) {
            assert!(
                seen.last().is_none_or(|last| w > *last),
                "weight went back: {seen:?} then {w}"
            );
            assert_eq!(w % 25, 0, "{w}");
            seen.push(w);
        }
        if shift["state"] == "completed" {
            break;
        }
        assert_ne!(shift["state"], "rolled_back", "{shift}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(seen.len() >= 3, "steps seen: {seen:?}");
    let blue_state = gw.cluster_state("fs-blue").await;
    assert_eq!(blue_state["drain"], "drained");
    assert_eq!(blue_state["weight"], 0);
    assert_eq!(gw.cluster_state("fs-green").await["weight"], 100);

    // The old cluster can now go away without a single failed request.
    let blue_before_stop = blue.requests();
    blue.shutdown().await;
    load.wait_for_more(300).await;
    let report = load.stop().await;
    println!(
        "full shift: {} requests checked, {} failed (blue {}, green {})",
        report.ok + report.failed,
        report.failed,
        blue_before_stop,
        green.requests()
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(green.requests() > 0);
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(metrics.contains(r#"rayshift_shift_state{shard="fs",state="completed"} 1"#));
    assert!(metrics.contains(r#"rayshift_shift_target_weight{shard="fs"} 100"#));
    assert!(
        metrics.contains(r#"rayshift_cluster_drained{shard="fs",cluster="fs-blue"} 1"#),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("drain"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(metrics.contains("rayshift_shift_steps_total{shard=\"fs\"}"));
}

/// The target starts failing 20% of requests from step 2: the shift rolls back by itself within
/// `failure_threshold` windows, weights return to the start and the reason is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_target_rolls_back_automatically() {
    let (_blue, green, gw) = named_blue_green("rb", "rb-blue", "rb-green", "").await;
    let load = Load::start(gw.url("/echo"), 8, true);
    let r = post(
        &gw.admin("/v1/shards/rb/shift"),
        r#"{"to": "rb-green", "step_percent": 20, "step_interval": "400ms", "min_requests": 20, "max_error_rate": 0.05, "failure_threshold": 2}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("step 2", || async {
        shift_of(&gw, "rb").await["step"].as_u64().unwrap() >= 2
    })
    .await;
    green.set_error_rate(0.2);
    let shift = wait_shift_state(&gw, "rb", &["rolled_back", "completed"]).await;
    let report = load.stop().await;
    assert_eq!(shift["state"], "rolled_back", "{shift}");
    let reason = shift["reason"].as_str().unwrap();
    assert!(
        reason.contains("error rate") && reason.contains("2 failed checks in a row"),
        "{reason}"
    );
    assert_eq!(shift["last_check"]["result"], "failed");
    assert!(shift["target_weight"].as_u64().unwrap() < 100);
    assert_eq!(gw.cluster_state("rb-blue").await["weight"], 100);
    assert_eq!(gw.cluster_state("rb-green").await["weight"], 0);
    // Traffic is all back on blue.
    green.reset_requests();
    for _ in 0..20 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("rb-blue"));
    }
    assert_eq!(green.requests(), 0);
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains(r#"rayshift_shift_rollbacks_total{shard="rb",reason="error_rate"} 1"#),
        "rollback metric"
    );
    assert!(
        metrics.contains(r#"rayshift_shift_check_failures_total{shard="rb",check="error_rate"}"#)
    );
    println!(
        "rollback: {} requests, {} answered 5xx by the failing target before rollback",
        report.ok + report.failed,
        report.failed
    );
}

/// A target that is not ready holds the shift (weights unchanged), then rolls back at ready_timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unready_target_holds_then_rolls_back() {
    let (_blue, green, gw) = blue_green("").await;
    green.set_healthy(false);
    gw.wait_cluster_ready("green", false).await;
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_percent": 50, "step_interval": "100ms", "ready_timeout": "1500ms"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let held = shift_of(&gw, "shard-0").await;
    assert_eq!(held["state"], "progressing");
    assert_eq!(
        held["target_weight"], 0,
        "stepped although the target is not ready"
    );
    let shift = wait_shift_state(&gw, "shard-0", &["rolled_back"]).await;
    assert!(
        shift["reason"]
            .as_str()
            .unwrap()
            .contains("target not ready for 1s 500ms"),
        "{shift}"
    );
    assert_eq!(gw.cluster_state("blue").await["weight"], 100);
}

/// A target that passes its probes but answers every request with an error is ejected by passive
/// health, and then gets no requests: its checks fail at once instead of waiting, ejection after
/// ejection, for `min_requests` (here far more than it gets before it is ejected), and the shift
/// rolls back after `failure_threshold` of them, never stepping onto the ejected target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejected_target_fails_its_checks_without_min_requests() {
    let (_blue, green, gw) = named_blue_green("ej", "ej-blue", "ej-green", "").await;
    green.set_error_rate(1.0);
    let load = Load::start(gw.url("/echo"), 4, false);
    let r = post(
        &gw.admin("/v1/shards/ej/shift"),
        r#"{"to": "ej-green", "step_percent": 20, "step_interval": "300ms", "min_requests": 500, "failure_threshold": 2}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let shift = wait_shift_state(&gw, "ej", &["rolled_back", "completed"]).await;
    load.stop().await;
    assert_eq!(shift["state"], "rolled_back", "{shift}");
    assert_eq!(shift["step"], 1, "stepped onto an ejected target: {shift}");
    let reason = shift["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 failed checks in a row") && reason.contains("ejected by passive health"),
        "{reason}"
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains(r#"rayshift_shift_rollbacks_total{shard="ej",reason="error_rate"} 1"#),
        "rollback metric"
    );
    assert_eq!(gw.cluster_state("ej-blue").await["weight"], 100);
    assert_eq!(gw.cluster_state("ej-green").await["weight"], 0);
}

/// The routes and dashboard gates: a target whose dashboard shows the app DEPLOYING holds the
/// shift; once RUNNING, it proceeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_status_gates_the_shift() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    green.set_app_status("echo", "DEPLOYING");
    let yaml = blue_green_yaml(&blue, &green, "").replace(
        &format!("serve_url: {}\n", green.url()),
        &format!(
            "serve_url: {}\n    dashboard_url: {}\n",
            green.url(),
            green.url()
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_percent": 100, "step_interval": "100ms"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let held = shift_of(&gw, "shard-0").await;
    assert_eq!(held["target_weight"], 0, "{held}");
    green.set_app_status("echo", "RUNNING");
    let done = wait_shift_state(&gw, "shard-0", &["completed", "draining"]).await;
    assert_eq!(done["target_weight"], 100);
}

/// After a shift completed, the old cluster is drained and out of the split: passive health never
/// ejects the new cluster, the shard's only routable one, however it fails (a struggling cluster
/// beats a shard answering 503 to everything).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_health_never_ejects_the_only_cluster_left_after_a_shift() {
    let extra = "passive_health:\n  consecutive_failures: 3\n  base_ejection: 5s\n";
    let (blue, green, gw) = blue_green(extra).await;
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_percent": 100, "step_interval": "100ms", "min_requests": 0, "drain_timeout": "1s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    wait_shift_state(&gw, "shard-0", &["completed"]).await;
    assert_eq!(gw.cluster_state("blue").await["drain"], "drained");
    let blue_before = blue.requests();
    green.set_error_rate(1.0);
    for _ in 0..20 {
        let r = get(&gw.url("/echo")).await;
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
        assert_eq!(r.cluster(), Some("green"));
    }
    // Passive health runs on the control task's clock: give it a few rounds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.cluster_state("green").await["ejected"], false);
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    assert_eq!(
        blue.requests(),
        blue_before,
        "the drained cluster got traffic"
    );
}

/// The target fails right after promotion, while the old cluster still drains an open stream:
/// abort puts the weights back and the old cluster serves again (the only way back before the
/// drain ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_while_draining_gives_the_old_cluster_its_traffic_back() {
    let (_blue, green, gw) = named_blue_green("shard-0", "ad-blue", "ad-green", "").await;
    let resp = stream_from(&gw, "ad-blue", 50).await;
    promote_now(&gw, "shard-0", "ad-green", "1h").await;
    assert_eq!(shift_of(&gw, "shard-0").await["state"], "draining");
    green.set_error_rate(1.0);
    let r = gw
        .set_weights("shard-0", &[("ad-blue", 100), ("ad-green", 0)])
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.body.contains("abort it"), "{}", r.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/abort"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let shift: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(shift["state"], "aborted", "{shift}");
    for _ in 0..10 {
        let r = get(&gw.url("/echo")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.cluster(), Some("ad-blue"));
    }
    let blue = gw.cluster_state("ad-blue").await;
    assert_eq!(blue["weight"], 100, "{blue}");
    assert!(blue["drain"].is_null(), "{blue}");
    // A finished shift no longer owns the weights: its view shows the shard's weights now.
    let r = gw
        .set_weights("shard-0", &[("ad-blue", 70), ("ad-green", 30)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let shift = shift_of(&gw, "shard-0").await;
    assert_eq!(shift["state"], "aborted");
    assert_eq!(
        shift["weights"],
        serde_json::json!({"ad-blue": 70, "ad-green": 30}),
        "{shift}"
    );
    let state = gw.state().await;
    assert_eq!(
        state["shards"][0]["shift"]["weights"]["ad-green"], 30,
        "{state}"
    );
    drop(resp);
}

/// After promotion the target goes unready while the old cluster is still up: the old cluster
/// takes the shard's requests rather than them failing (`rayshift_apps_on_draining_clusters`
/// says so), and gives them back when the target is ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_down_after_promotion_is_covered_by_the_draining_cluster() {
    let (_blue, green, gw) = named_blue_green("lr", "lr-blue", "lr-green", "").await;
    let gauge = r#"rayshift_apps_on_draining_clusters{shard="lr"}"#;
    promote_now(&gw, "lr", "lr-green", "1h").await;
    answered_by(&gw, "lr-green", 5).await;
    assert_eq!(metric(&gw, gauge).await, Some(0.0));

    green.set_healthy(false);
    gw.wait_cluster_ready("lr-green", false).await;
    let blue = gw.cluster_state("lr-blue").await;
    assert_eq!(blue["weight"], 0, "{blue}");
    assert!(blue["drain"].is_string(), "{blue}");
    answered_by(&gw, "lr-blue", 10).await;
    assert_eq!(metric(&gw, gauge).await, Some(1.0));

    green.set_healthy(true);
    gw.wait_cluster_ready("lr-green", true).await;
    answered_by(&gw, "lr-green", 5).await;
    assert_eq!(metric(&gw, gauge).await, Some(0.0));
}

/// While the old cluster carries the shard for a target that went down, its drain does not end
/// even with nothing in flight on it; it ends once the target is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_while_the_old_cluster_covers_for_the_target() {
    let (_blue, green, gw) = named_blue_green("lw", "lw-blue", "lw-green", "").await;
    // A stream on blue keeps its drain open until the target is down.
    let stream = stream_from(&gw, "lw-blue", 100).await;
    promote_now(&gw, "lw", "lw-green", "1h").await;
    green.set_healthy(false);
    eventually("the shard on lw-blue", || async {
        metric(&gw, r#"rayshift_apps_on_draining_clusters{shard="lw"}"#).await == Some(1.0)
    })
    .await;
    drop(stream);
    eventually("nothing in flight on lw-blue", || async {
        gw.cluster_state("lw-blue").await["in_flight"] == 0
    })
    .await;
    // Several drain checks later (one per 100 ms tick), blue still drains.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(shift_of(&gw, "lw").await["state"], "draining");
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.cluster(), Some("lw-blue"), "{}", r.body);

    green.set_healthy(true);
    wait_shift_state(&gw, "lw", &["completed"]).await;
    assert_eq!(gw.cluster_state("lw-blue").await["drain"], "drained");
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.cluster(), Some("lw-green"), "{}", r.body);
}

/// The target still down when the drain's time is up, the old cluster carrying the shard: the
/// shift rolls back by itself (`not_ready`) and the old cluster gets its weight back instead of
/// being declared drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_still_down_at_the_end_of_the_drain_rolls_the_shift_back() {
    let (_blue, green, gw) = named_blue_green("lx", "lx-blue", "lx-green", "").await;
    // A stream on blue keeps the drain from ending before the target is down.
    let stream = stream_from(&gw, "lx-blue", 100).await;
    promote_now(&gw, "lx", "lx-green", "3s").await;
    green.set_healthy(false);
    eventually("the shard on lx-blue", || async {
        metric(&gw, r#"rayshift_apps_on_draining_clusters{shard="lx"}"#).await == Some(1.0)
    })
    .await;
    let shift = wait_shift_state(&gw, "lx", &["rolled_back"]).await;
    assert!(
        shift["reason"]
            .as_str()
            .is_some_and(|r| r.contains("end of the drain")),
        "{shift}"
    );
    let blue = gw.cluster_state("lx-blue").await;
    assert_eq!(blue["weight"], 100, "{blue}");
    assert!(blue["drain"].is_null(), "{blue}");
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.cluster(), Some("lx-blue"), "{}", r.body);
    assert_eq!(
        metric(&gw, r#"rayshift_apps_on_draining_clusters{shard="lx"}"#).await,
        Some(0.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"rayshift_shift_rollbacks_total{shard="lx",reason="not_ready"}"#
        )
        .await,
        Some(1.0)
    );
    drop(stream);
}

/// An upload under way on the old cluster at promotion (its head in, its body still coming) is a
/// request in flight: the drain waits for it, and the old cluster answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_under_way_at_promotion_holds_the_drain() {
    use tokio::io::AsyncWriteExt;
    let (_blue, _green, gw) = blue_green("").await;
    let mut client = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    client
        .write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\nconnection: close\r\n\r\n0123456789")
        .await
        .unwrap();
    // The head is in and routed to blue, which has all the weight.
    eventually("the upload counts on blue", || async {
        gw.cluster_state("blue").await["in_flight"] == 1
    })
    .await;
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_interval": "1h", "drain_timeout": "1m"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/promote"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    // Several drain checks later (one per 100 ms tick), blue still drains.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let blue = gw.cluster_state("blue").await;
    assert_eq!(blue["drain"], "draining", "{blue}");
    client.write_all(b"abcdefghij").await.unwrap();
    let answer = read_answer(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("blue v1 echo 20\n"), "{answer}");
    wait_shift_state(&gw, "shard-0", &["completed"]).await;
    assert_eq!(gw.cluster_state("blue").await["drain"], "drained");
}

/// A long streamed response and a WebSocket open on the old cluster at promotion finish intact;
/// the old cluster is draining while they run and drained after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_and_websockets_finish_after_promotion() {
    let (blue, _green, gw) = blue_green("").await;
    // A 2 s stream and a WebSocket, both on blue (it has all the weight).
    let resp = stream_from(&gw, "blue", 20).await;
    let stream =
        tokio::spawn(async move { resp.into_body().collect().await.map(|b| b.to_bytes()) });
    let tcp = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("ws://{}/echo/ws", gw.gateway.proxy_addr()), tcp)
            .await
            .unwrap();
    ws.send(Message::text("before")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "blue: before"
    );

    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_interval": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/promote"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let shift: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(shift["state"], "draining");
    // New requests go to green only; blue still has the open stream and WebSocket.
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let blue_state = gw.cluster_state("blue").await;
    assert_eq!(blue_state["drain"], "draining", "{blue_state}");
    assert_eq!(blue_state["in_flight"], 2);
    assert!(blue.in_flight() >= 2);
    // While it drains, the weights are the shift's, and the answer says what to wait for.
    let r = gw
        .set_weights("shard-0", &[("blue", 100), ("green", 0)])
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(
        r.body
            .contains("draining its old clusters; wait until it completes"),
        "{}",
        r.body
    );

    ws.send(Message::text("after")).await.unwrap();
    assert_eq!(
        ws.next()
            .await
            .unwrap()
            .unwrap()
            .into_text()
            .unwrap()
            .as_str(),
        "blue: after"
    );
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    let body = tokio::time::timeout(WAIT, stream)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    for i in 0..20 {
        assert!(
            text.contains(&format!("data: blue {i}\n\n")),
            "stream cut short: {text}"
        );
    }
    let shift = wait_shift_state(&gw, "shard-0", &["completed"]).await;
    assert_eq!(shift["state"], "completed");
    assert_eq!(gw.cluster_state("blue").await["drain"], "drained");
}

/// Bad shift requests get 4xx with a message and change nothing; controls outside their phase 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_shift_requests_change_nothing() {
    let red = stub("red", "v1", &[("other", "/other")]).await;
    let (_blue, _green, gw) = {
        let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
        let green = stub("green", "v2", &[("echo", "/echo")]).await;
        let gw = TestGateway::start(&config_yaml(
            &["shard-0", "shard-1"],
            &[
                cluster(&blue, "shard-0", "v1", Some(100)),
                cluster(&green, "shard-0", "v2", Some(0)),
                cluster(&red, "shard-1", "v1", None),
            ],
            "",
        ))
        .await;
        (blue, green, gw)
    };
    let url = gw.admin("/v1/shards/shard-0/shift");
    let cases: &[(&str, StatusCode, &str)] = &[
        (
            r#"{}"#,
            StatusCode::BAD_REQUEST,
            "to or to_revision is required",
        ),
        (
            r#"{"to": "purple"}"#,
            StatusCode::BAD_REQUEST,
            "unknown cluster \"purple\"",
        ),
        (
            r#"{"to": "red"}"#,
            StatusCode::BAD_REQUEST,
            "belongs to shard \"shard-1\"",
        ),
        (
            r#"{"to": "blue"}"#,
            StatusCode::BAD_REQUEST,
            "nothing to shift",
        ),
        (
            r#"{"to_revision": "v9"}"#,
            StatusCode::BAD_REQUEST,
            "no cluster of revision \"v9\"",
        ),
        (
            r#"{"to": "green", "to_revision": "v2"}"#,
            StatusCode::BAD_REQUEST,
            "not both",
        ),
        (
            r#"{"to": "green", "step_percent": 0}"#,
            StatusCode::BAD_REQUEST,
            "step_percent: expected an integer 1-100",
        ),
        (
            // A deadline this far out would overflow the clock at the first step.
            r#"{"to": "green", "step_interval": "10000000000000000000s"}"#,
            StatusCode::BAD_REQUEST,
            "step_interval: must be at most 365d",
        ),
        (
            r#"{"to": "green", "step_percent": 101}"#,
            StatusCode::BAD_REQUEST,
            "1-100",
        ),
        (
            r#"{"to": "green", "step_interval": "soon"}"#,
            StatusCode::BAD_REQUEST,
            "step_interval: expected a duration",
        ),
        (
            r#"{"to": "green", "drain_timeout": 5}"#,
            StatusCode::BAD_REQUEST,
            "drain_timeout",
        ),
        (
            r#"{"to": "green", "speed": 5}"#,
            StatusCode::BAD_REQUEST,
            "speed: unknown field",
        ),
        (r#"["green"]"#, StatusCode::BAD_REQUEST, "JSON object"),
        ("to=green", StatusCode::BAD_REQUEST, "not JSON"),
    ];
    for (body, status, needle) in cases {
        let r = post(&url, body).await;
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        let msg = serde_json::from_str::<Value>(&r.body).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains(needle), "{body}: {msg:?} lacks {needle:?}");
    }
    assert_eq!(
        get(&gw.admin("/v1/shards/shard-0/shift")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(&gw.admin("/v1/shards/shard-9/shift"), r#"{"to": "green"}"#)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(&gw.admin("/v1/shards/shard-0/shift/pause"), "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        post(&gw.admin("/v1/shards/shard-0/shift/jump"), "")
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(gw.cluster_state("blue").await["weight"], 100);

    // A running shift: a second one, manual weights and resume are refused with 409.
    let r = post(&url, r#"{"to": "green", "step_interval": "1h"}"#).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let again = post(&url, r#"{"to": "green"}"#).await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    assert!(
        again.body.contains("has a shift in progress"),
        "{}",
        again.body
    );
    let w = gw
        .set_weights("shard-0", &[("blue", 50), ("green", 50)])
        .await;
    assert_eq!(w.status, StatusCode::CONFLICT, "{}", w.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/resume"), "").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(
        r.body.contains("cannot resume a shift that is progressing"),
        "{}",
        r.body
    );
    // Pause -> resume -> abort round trip; abort puts the weights back.
    for (action, state) in [
        ("pause", "paused"),
        ("resume", "progressing"),
        ("abort", "aborted"),
    ] {
        let r = post(&gw.admin(&format!("/v1/shards/shard-0/shift/{action}")), "").await;
        assert_eq!(r.status, StatusCode::OK, "{action}: {}", r.body);
        assert_eq!(
            serde_json::from_str::<Value>(&r.body).unwrap()["state"],
            state
        );
    }
    assert_eq!(gw.cluster_state("blue").await["weight"], 100);
    assert_eq!(
        post(&gw.admin("/v1/shards/shard-0/shift/promote"), "")
            .await
            .status,
        StatusCode::CONFLICT
    );
}

/// kill -9 mid-shift: the gateway comes back at the same step with the same weights and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_survives_kill_and_restart() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    std::fs::write(
        &config,
        config_yaml(
            &["shard-0"],
            &[
                cluster(&blue, "shard-0", "v1", Some(100)),
                cluster(&green, "shard-0", "v2", Some(0)),
            ],
            "",
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    let load = Load::start(gw.url("/echo"), 4, false);
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to": "green", "step_percent": 20, "step_interval": "700ms", "min_requests": 10}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let shift_url = gw.admin("/v1/shards/shard-0/shift");
    let before: Value = loop {
        let s: Value = serde_json::from_str(&get(&shift_url).await.body).unwrap();
        if s["step"].as_u64().unwrap() >= 2 {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    gw.kill();
    let _ = load.stop().await; // requests in flight at the kill fail, as with any process crash

    let gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    let after: Value =
        serde_json::from_str(&get(&gw.admin("/v1/shards/shard-0/shift")).await.body).unwrap();
    assert_eq!(after["state"], "progressing", "{after}");
    assert_eq!(after["step"], before["step"], "resumed at another step");
    assert_eq!(after["weights"], before["weights"]);
    assert_eq!(after["start_weights"], before["start_weights"]);
    let load = Load::start(gw.url("/echo"), 4, false);
    let url = gw.admin("/v1/shards/shard-0/shift");
    eventually("shift completes after restart", || {
        let url = url.clone();
        async move {
            let s: Value = serde_json::from_str(&get(&url).await.body).unwrap();
            s["state"] == "completed"
        }
    })
    .await;
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let state: Value = serde_json::from_str(&get(&gw.admin("/v1/state")).await.body).unwrap();
    assert_eq!(state["shards"][0]["clusters"][1]["weight"], 100);
}

/// A shard removed from the config while its shift runs: after the restart its shift is neither
/// shown (404, as its controls answer) nor advanced; the state keeps it, and declaring the shard
/// again brings it back at the same step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_of_a_shard_no_longer_declared_is_left_alone() {
    let blue = stub("od-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("od-green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    let with_shard = config_yaml(
        &["old"],
        &[
            cluster(&blue, "old", "v1", Some(100)),
            cluster(&green, "old", "v2", Some(0)),
        ],
        "",
    );
    std::fs::write(&config, &with_shard).unwrap();
    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    let r = post(
        &gw.admin("/v1/shards/old/shift"),
        r#"{"to": "od-green", "step_percent": 20, "step_interval": "300ms", "min_requests": 1000000, "ready_timeout": "500ms"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    // Its first step comes at once; the next waits for a million requests.
    let shift_url = gw.admin("/v1/shards/old/shift");
    eventually("the first step", || {
        let url = shift_url.clone();
        async move { get(&url).await.body.contains("\"target_weight\": 20") }
    })
    .await;
    let before: Value = serde_json::from_str(&get(&shift_url).await.body).unwrap();
    assert_eq!(gw.terminate().code(), Some(0));

    // The shard renamed: the old name's shift is out of sight and out of reach. Were it still
    // ticked, its target (now in another shard) would count as not ready and the shift would
    // roll back after its ready_timeout of 500 ms.
    std::fs::write(&config, with_shard.replace("old", "new")).unwrap();
    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    let r = get(&gw.admin("/v1/shards/old/shift")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(r.body.contains("unknown shard"), "{}", r.body);
    let r = post(&gw.admin("/v1/shards/old/shift/abort"), "").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    let state = get(&gw.admin("/v1/state")).await.body;
    assert!(!state.contains("\"old\""), "{state}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(gw.terminate().code(), Some(0));

    // Declared again: the same shift, not advanced meanwhile, still under the operator's control.
    std::fs::write(&config, &with_shard).unwrap();
    let gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    let after: Value =
        serde_json::from_str(&get(&gw.admin("/v1/shards/old/shift")).await.body).unwrap();
    assert_eq!(after["state"], "progressing", "{after}");
    assert_eq!(after["target_weight"], before["target_weight"], "{after}");
    let r = post(&gw.admin("/v1/shards/old/shift/abort"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// N shards, each with a v1 and a v2 cluster serving the shard's app (pinned).
async fn fleet(n: usize, extra: &str) -> (Vec<(ServeStub, ServeStub)>, TestGateway) {
    let mut stubs = Vec::new();
    for i in 0..n {
        let app = format!("app-{i}");
        let prefix = format!("/app-{i}");
        let old = stub(&format!("s{i}-v1"), "v1", &[(&app, &prefix)]).await;
        let new = stub(&format!("s{i}-v2"), "v2", &[(&app, &prefix)]).await;
        stubs.push((old, new));
    }
    let shards: Vec<String> = (0..n).map(|i| format!("shard-{i}")).collect();
    let shard_refs: Vec<&str> = shards.iter().map(String::as_str).collect();
    let clusters: Vec<ClusterDecl<'_>> = stubs
        .iter()
        .enumerate()
        .flat_map(|(i, (old, new))| {
            [
                cluster(old, shard_refs[i], "v1", Some(100)),
                cluster(new, shard_refs[i], "v2", Some(0)),
            ]
        })
        .collect();
    let mut apps = String::from("apps:\n");
    for i in 0..n {
        apps.push_str(&format!(
            "  - name: app-{i}\n    route_prefix: /app-{i}\n    shard: shard-{i}\n"
        ));
    }
    apps.push_str(extra);
    let gw = TestGateway::start(&config_yaml(&shard_refs, &clusters, &apps)).await;
    (stubs, gw)
}

/// The N+1 upgrade of 4 shards, one at a time, under load: never two shards shifting at once,
/// all four finish, zero failed requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_rollout_one_shard_at_a_time() {
    let (stubs, gw) = fleet(4, "").await;
    let load = Load::rotating(
        (0..4)
            .map(|i| (Method::GET, gw.url(&format!("/app-{i}/x"))))
            .collect(),
        8,
    );
    let r = post(
        &gw.admin("/v1/rollouts"),
        r#"{"revision": "v2", "max_concurrent": 1, "step_percent": 50, "step_interval": "250ms", "min_requests": 5}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let again = post(&gw.admin("/v1/rollouts"), r#"{"revision": "v2"}"#).await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.body);
    let mut max_shifting = 0;
    let mut polls = 0;
    loop {
        let state = gw.state().await;
        let shifting = state["shards"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| matches!(s["shift"]["state"].as_str(), Some("progressing" | "paused")))
            .count();
        max_shifting = max_shifting.max(shifting);
        let rollout = &state["rollout"];
        assert_ne!(rollout["phase"], "halted", "{rollout}");
        if rollout["phase"] == "completed" {
            break;
        }
        polls += 1;
        assert!(polls < 3000, "rollout did not finish: {rollout}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = load.stop().await;
    println!(
        "rollout of 4 shards: {} requests, {} failed, at most {max_shifting} shifting at once",
        report.ok, report.failed
    );
    assert_eq!(max_shifting, 1);
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let rollouts: Value = serde_json::from_str(&get(&gw.admin("/v1/rollouts")).await.body).unwrap();
    let shards = rollouts["rollout"]["shards"].as_array().unwrap();
    assert!(shards.iter().all(|s| s["state"] == "done"), "{rollouts}");
    for (i, (_old, new)) in stubs.iter().enumerate() {
        assert_eq!(
            get(&gw.url(&format!("/app-{i}"))).await.cluster(),
            Some(new.name())
        );
    }
    // The gauge has no per-gateway label and the other rollout test in this process shares the
    // recorder, so only its presence is checked here (values: tests/observability.rs).
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains(r#"rayshift_rollout_shards{state="done"}"#),
        "rollout metric"
    );
}

/// Pausing and resuming a rollout carries to its shards' shifts, but resume leaves alone a shift
/// an operator had paused by itself before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_resume_keeps_a_shift_paused_by_hand() {
    let (_stubs, gw) = fleet(2, "").await;
    rollout_of_both_shards(&gw).await;
    let r = post(&gw.admin("/v1/shards/shard-0/shift/pause"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        post(&gw.admin("/v1/rollouts/pause"), "").await.status,
        StatusCode::OK
    );
    assert_eq!(shift_of(&gw, "shard-1").await["state"], "paused");
    assert_eq!(
        post(&gw.admin("/v1/rollouts/resume"), "").await.status,
        StatusCode::OK
    );
    assert_eq!(
        shift_of(&gw, "shard-0").await["state"],
        "paused",
        "paused by hand"
    );
    assert_eq!(shift_of(&gw, "shard-1").await["state"], "progressing");
}

/// A shard upgraded to a revision of two small clusters that become ready one after the other: the
/// one ready later joins the shift's target before promotion, and the traffic ends split over both.
/// A cluster of the revision that is up but does not serve all the shard's applications never
/// joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revision_cluster_ready_late_joins_the_shift() {
    let both = [("echo", "/echo"), ("other", "/other")];
    let blue = stub("late-blue", "v1", &both).await;
    let g1 = stub("late-g1", "v2", &both).await;
    let g2 = stub("late-g2", "v2", &both).await;
    // Up, but its echo deployment is missing: not ready as a target.
    let g3 = stub("late-g3", "v2", &[("other", "/other")]).await;
    g2.set_healthy(false);
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&g1, "shard-0", "v2", Some(0)),
            cluster(&g2, "shard-0", "v2", Some(0)),
            cluster(&g3, "shard-0", "v2", Some(0)),
        ],
        "",
    ))
    .await;
    gw.wait_cluster_ready("late-g2", false).await;
    let load = Load::start(gw.url("/echo"), 4, false);
    // The first step comes at once; the next would come in an hour.
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to_revision": "v2", "step_percent": 25, "step_interval": "1h", "min_requests": 0, "drain_timeout": "1s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let shift: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(shift["target_clusters"], serde_json::json!(["late-g1"]));
    eventually("the first step", || async {
        shift_of(&gw, "shard-0").await["target_weight"] == 25
    })
    .await;
    g2.set_healthy(true);
    eventually("late-g2 joins the target", || async {
        shift_of(&gw, "shard-0").await["target_clusters"]
            == serde_json::json!(["late-g1", "late-g2"])
    })
    .await;
    let shift = shift_of(&gw, "shard-0").await;
    assert_eq!(
        shift["old_clusters"],
        serde_json::json!(["late-blue"]),
        "{shift}"
    );
    let (w1, w2) = (
        shift["weights"]["late-g1"].as_u64().unwrap(),
        shift["weights"]["late-g2"].as_u64().unwrap(),
    );
    assert!(w1 > 0 && w2 > 0 && w1 + w2 == 25, "{shift}");
    let r = post(&gw.admin("/v1/shards/shard-0/shift/promote"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let done = wait_shift_state(&gw, "shard-0", &["completed"]).await;
    assert_eq!(done["weights"]["late-g1"], 50, "{done}");
    assert_eq!(done["weights"]["late-g2"], 50, "{done}");
    assert_eq!(
        done["target_clusters"],
        serde_json::json!(["late-g1", "late-g2"]),
        "{done}"
    );
    assert_eq!(gw.cluster_state("late-blue").await["drain"], "drained");
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(g2.requests() > 0, "late-g2 never got traffic");
}

/// A paused rollout that halts (an operator aborted one of its shards' shifts): a resume resumes
/// the other shifts its pause held, and the rollout stays halted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_paused_rollout_halted_lets_its_shifts_go_on() {
    let (_stubs, gw) = fleet(2, "").await;
    rollout_of_both_shards(&gw).await;
    let r = post(&gw.admin("/v1/rollouts/pause"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/abort"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    eventually("rollout halts", || async {
        gw.state().await["rollout"]["phase"] == "halted"
    })
    .await;
    assert_eq!(shift_of(&gw, "shard-1").await["state"], "paused");
    let r = post(&gw.admin("/v1/rollouts/resume"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(shift_of(&gw, "shard-1").await["state"], "progressing");
    assert_eq!(gw.state().await["rollout"]["phase"], "halted");
    // Its pause is spent: a second resume has nothing to resume.
    let r = post(&gw.admin("/v1/rollouts/resume"), "").await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
}

/// A shard whose shift an operator promoted is done even before the rollout notices: aborting the
/// rollout right after leaves it on the new revision, draining, and aborts only the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_abort_leaves_a_just_promoted_shard_on_its_new_revision() {
    let (_stubs, gw) = fleet(2, "").await;
    rollout_of_both_shards(&gw).await;
    let r = post(&gw.admin("/v1/shards/shard-0/shift/promote"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = post(&gw.admin("/v1/rollouts/abort"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let promoted = shift_of(&gw, "shard-0").await;
    assert!(
        promoted["state"] == "draining" || promoted["state"] == "completed",
        "{promoted}"
    );
    assert_eq!(promoted["weights"]["s0-v2"], 100, "{promoted}");
    assert_eq!(shift_of(&gw, "shard-1").await["state"], "aborted");
    // The abort's answer already counts it as done.
    let rollout: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(rollout["phase"], "aborted", "{rollout}");
    assert_eq!(rollout["shards"][0]["state"], "done", "{rollout}");
    assert_eq!(rollout["shards"][1]["state"], "failed", "{rollout}");
}

/// A shard still waiting in a paused rollout keeps its weights locked; the 409 says what frees
/// it (abort, or the rollout's end), not to pause what is paused already.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rollout_still_locks_its_waiting_shard() {
    let (_stubs, gw) = fleet(2, "").await;
    let r = post(
        &gw.admin("/v1/rollouts"),
        r#"{"revision": "v2", "max_concurrent": 1, "step_percent": 10, "step_interval": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = post(&gw.admin("/v1/rollouts/pause"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = put(
        &gw.admin("/v1/shards/shard-1/weights"),
        r#"{"weights": {"s1-v1": 50, "s1-v2": 50}}"#,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.body);
    assert!(r.body.contains("abort the rollout"), "{}", r.body);
    assert!(!r.body.contains("pause or abort"), "{}", r.body);
    let weights = &gw.state().await["shards"][1]["clusters"];
    assert_eq!(weights[0]["weight"], 100, "unchanged: {weights}");
}

/// Starts a rollout of v2 over both shards of a 2-shard fleet at once, held at its first step.
async fn rollout_of_both_shards(gw: &TestGateway) {
    let r = post(
        &gw.admin("/v1/rollouts"),
        r#"{"revision": "v2", "max_concurrent": 2, "step_percent": 10, "step_interval": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("both shards shifting", || async {
        let state = gw.state().await;
        state["shards"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["shift"]["state"] == "progressing")
    })
    .await;
}

/// A rollout halts at the first shard whose target fails: later shards never start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_rollout_halts_when_a_shard_rolls_back() {
    let (stubs, gw) = fleet(3, "").await;
    stubs[1].1.set_error_rate(1.0);
    let load = Load::rotating(
        (0..3)
            .map(|i| (Method::GET, gw.url(&format!("/app-{i}/x"))))
            .collect(),
        6,
    );
    let r = post(
        &gw.admin("/v1/rollouts"),
        r#"{"revision": "v2", "step_percent": 50, "step_interval": "250ms", "min_requests": 5, "failure_threshold": 1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("rollout halts", || async {
        gw.state().await["rollout"]["phase"] == "halted"
    })
    .await;
    let _ = load.stop().await;
    let rollouts: Value = serde_json::from_str(&get(&gw.admin("/v1/rollouts")).await.body).unwrap();
    let states: Vec<&str> = rollouts["rollout"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["done", "failed", "waiting"], "{rollouts}");
    assert!(rollouts["rollout"]["reason"]
        .as_str()
        .unwrap()
        .contains("shard-1"));
    assert_eq!(
        gw.cluster_state("s1-v1").await["weight"],
        100,
        "failed shard rolled back"
    );
    assert_eq!(
        gw.cluster_state("s2-v2").await["weight"],
        0,
        "a shard started after the halt"
    );
    assert_eq!(
        post(&gw.admin("/v1/rollouts/resume"), "").await.status,
        StatusCode::CONFLICT
    );
}

/// Blue (v1, all traffic) and green (v2, not healthy yet) in `shard-0`, which has `auto_shift`.
async fn auto_shift_blue_green() -> (ServeStub, ServeStub, TestGateway) {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    green.set_healthy(false);
    let yaml = config_yaml(
        &["shard-0"],
        &[cluster(&blue, "shard-0", "v1", Some(100)), cluster(&green, "shard-0", "v2", Some(0))],
        "",
    )
    .replace(
        "shards: [shard-0]\n",
        "shards:\n  - name: shard-0\n    auto_shift: {step_percent: 50, step_interval: 200ms, min_requests: 5}\n",
    );
    (blue, green, TestGateway::start(&yaml).await)
}

/// `auto_shift`: a newer revision that is (or becomes) ready starts a shift by itself; a rolled-back
/// revision is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_shift_starts_when_a_newer_revision_is_ready() {
    let (_blue, green, gw) = auto_shift_blue_green().await;
    let load = Load::start(gw.url("/echo"), 4, false);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(&gw.admin("/v1/shards/shard-0/shift")).await.status,
        StatusCode::NOT_FOUND,
        "shifted to an unready cluster"
    );
    green.set_healthy(true);
    let shift = wait_shift_state(&gw, "shard-0", &["completed"]).await;
    assert_eq!(shift["target"]["revision"], "v2");
    let report = load.stop().await;
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(gw.cluster_state("green").await["weight"], 100);
}

/// A shift that rolls back while a newer revision is already ready: `auto_shift` starts the shift
/// to the newer revision in the same clock tick, and it must start from the split the rollback
/// restored (everything on the old cluster), not from the failed revision's share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_shift_after_a_rollback_starts_from_the_restored_split() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let cyan = stub("cyan", "v3", &[("echo", "/echo")]).await;
    cyan.set_healthy(false);
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v2", Some(0)),
            cluster(&cyan, "shard-0", "v3", Some(0)),
        ],
        "",
    )
    .replace(
        "shards: [shard-0]\n",
        "shards:\n  - name: shard-0\n    auto_shift: {step_percent: 50, step_interval: 30s, ready_timeout: 1s}\n",
    );
    let gw = TestGateway::start(&yaml).await;
    // v2 is the newest ready revision: its shift takes the first step at once.
    eventually("the shift to v2 at 50%", || async {
        let shift = shift_of(&gw, "shard-0").await;
        shift["target"]["revision"] == "v2" && shift["target_weight"] == 50
    })
    .await;
    // v3 becomes ready while the shard is locked by the v2 shift; then v2 goes unready and its
    // shift rolls back at ready_timeout, which frees the shard in the same tick.
    cyan.set_healthy(true);
    gw.wait_cluster_ready("cyan", true).await;
    green.set_healthy(false);
    eventually("the automatic shift to v3", || async {
        shift_of(&gw, "shard-0").await["target"]["revision"] == "v3"
    })
    .await;
    let shift = shift_of(&gw, "shard-0").await;
    assert_eq!(
        shift["start_weights"],
        serde_json::json!({"blue": 100, "green": 0, "cyan": 0}),
        "{shift}"
    );
    assert_eq!(
        gw.cluster_state("green").await["weight"],
        0,
        "the rolled-back revision kept traffic"
    );
}

/// A revision an operator shifted to by hand and aborted is not picked up again by `auto_shift`
/// once it is ready: the abort sticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_shift_does_not_retry_a_revision_an_operator_aborted() {
    let (_blue, green, gw) = auto_shift_blue_green().await;
    let r = post(
        &gw.admin("/v1/shards/shard-0/shift"),
        r#"{"to_revision": "v2"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = post(&gw.admin("/v1/shards/shard-0/shift/abort"), "").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    green.set_healthy(true);
    gw.wait_cluster_ready("green", true).await;
    // Several control ticks with v2 ready and newer than what serves.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let shift = shift_of(&gw, "shard-0").await;
    assert_eq!(shift["state"], "aborted", "{shift}");
    assert_eq!(gw.cluster_state("green").await["weight"], 0);
}

/// A graceful stop in the middle of a shift folds the state journal and then writes nothing more,
/// although the shift would go on stepping: the state file alone holds its last step, and the
/// control plane answers that it has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_mid_shift_writes_nothing_after_the_fold() {
    let (_blue, _green, gw) = named_blue_green("gs", "gs-blue", "gs-green", "").await;
    let load = mixed_load(&gw, 2);
    let r = post(
        &gw.admin("/v1/shards/gs/shift"),
        r#"{"to": "gs-green", "step_percent": 5, "step_interval": "100ms", "min_requests": 5, "max_p99_latency": "2s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    eventually("the shift took two steps", || async {
        shift_of(&gw, "gs").await["target_weight"].as_u64() >= Some(10)
    })
    .await;

    let control = gw.gateway.control().clone();
    let journal_path = rayshift::state::StateStore::new(gw.state_file())
        .journal_path()
        .to_path_buf();
    let TestGateway { gateway, dir } = gw;
    gateway.shutdown().await;
    let at_stop = std::fs::read(dir.path().join("state.json")).unwrap();
    // Several step intervals later, with the load still running against the stopped proxy port:
    tokio::time::sleep(Duration::from_millis(500)).await;
    load.stop().await;
    assert_eq!(
        std::fs::read(dir.path().join("state.json")).unwrap(),
        at_stop,
        "state file written after the stop"
    );
    let journal = rayshift::state::journal::read(&journal_path).unwrap();
    assert!(
        journal.as_ref().is_none_or(|j| j.newest.is_none()),
        "journal records after the stop"
    );
    let stored: Value = serde_json::from_slice(&at_stop).unwrap();
    let weight = stored["shards"]["gs"]["shift"]["target_weight"]
        .as_u64()
        .unwrap();
    assert!((10..100).contains(&weight), "{stored}");
    let e = control
        .set_weights("gs", [("gs-blue".to_string(), 100u64)].into())
        .await
        .unwrap_err();
    assert!(matches!(e, rayshift::control::ControlError::Stopped), "{e}");
}
