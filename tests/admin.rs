//! The admin API: bad requests get a 4xx with a message and change nothing; tokens; metrics.

mod common;

use common::*;
use http::{Method, StatusCode};

async fn gateway(extra: &str) -> (ServeStub, ServeStub, ServeStub, TestGateway) {
    gateway_probing_every("100ms", extra).await
}

async fn gateway_probing_every(
    interval: &str,
    extra: &str,
) -> (ServeStub, ServeStub, ServeStub, TestGateway) {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let red = stub("red", "v1", &[("other", "/other")]).await;
    let gw = TestGateway::start(
        &config_yaml(
            &["shard-0", "shard-1"],
            &[
                cluster(&blue, "shard-0", "v1", Some(100)),
                cluster(&green, "shard-0", "v2", Some(0)),
                cluster(&red, "shard-1", "v1", None),
            ],
            extra,
        )
        .replace("interval: 100ms", &format!("interval: {interval}")),
    )
    .await;
    (blue, green, red, gw)
}

/// Blue (all traffic) and green in `shard-0`, and the config with `admin_keys` (lines indented two
/// spaces) added to its `admin:` section.
async fn blue_green_with_admin(admin_keys: &str) -> (ServeStub, ServeStub, String) {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let yaml = blue_green_yaml(&blue, &green, admin_keys);
    (blue, green, yaml)
}

/// Every malformed weight change is refused with a message naming the problem; state is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_weight_requests_change_nothing() {
    let (_b, _g, _r, gw) = gateway("").await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let before = gw.state().await["shards"].clone();
    let stored_before = gw.stored_state();
    let cases: &[(&str, &str, StatusCode, &str)] = &[
        (
            "sum",
            r#"{"weights": {"blue": 60, "green": 30}}"#,
            StatusCode::BAD_REQUEST,
            "sum to 90",
        ),
        (
            "range",
            r#"{"weights": {"blue": 150, "green": 0}}"#,
            StatusCode::BAD_REQUEST,
            "expected an integer 0-100",
        ),
        (
            "negative",
            r#"{"weights": {"blue": -10, "green": 110}}"#,
            StatusCode::BAD_REQUEST,
            "weights",
        ),
        (
            "fraction",
            r#"{"weights": {"blue": 50.5, "green": 49.5}}"#,
            StatusCode::BAD_REQUEST,
            "weights",
        ),
        (
            "unknown cluster",
            r#"{"weights": {"blue": 50, "purple": 50}}"#,
            StatusCode::BAD_REQUEST,
            "unknown cluster \"purple\"",
        ),
        (
            "other shard",
            r#"{"weights": {"blue": 50, "red": 50}}"#,
            StatusCode::BAD_REQUEST,
            "belongs to shard \"shard-1\"",
        ),
        (
            "empty",
            r#"{"weights": {}}"#,
            StatusCode::BAD_REQUEST,
            "no weights",
        ),
        (
            "not json",
            "weights: blue=100",
            StatusCode::BAD_REQUEST,
            "body must be",
        ),
        (
            "unknown field",
            r#"{"weights": {"blue": 100}, "force": true}"#,
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        (
            "named twice",
            r#"{"weights": {"blue": 100, "blue": 0, "green": 100}}"#,
            StatusCode::BAD_REQUEST,
            "named twice",
        ),
    ];
    for (what, body, status, needle) in cases {
        let r = put(&url, body, None).await;
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        let err: serde_json::Value =
            serde_json::from_str(&r.body).unwrap_or_else(|_| panic!("{what}: {}", r.body));
        let msg = err["error"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: {msg:?} lacks {needle:?}");
    }
    let r = put(
        &gw.admin("/v1/shards/shard-9/weights"),
        r#"{"weights": {"blue": 100}}"#,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);
    assert!(
        r.body.contains("unknown shard \\\"shard-9\\\""),
        "{}",
        r.body
    );
    let r = send(Method::POST, &url, &[], r#"{"weights": {"blue": 100}}"#).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "PUT");
    let r = send(
        Method::DELETE,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.headers["allow"], "GET, HEAD, POST");
    assert_eq!(
        get(&gw.admin("/v1/nothing")).await.status,
        StatusCode::NOT_FOUND
    );
    // HEAD is GET without a body (health checkers, `curl -I`).
    let r = send(Method::HEAD, &gw.admin("/ready"), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());

    assert_eq!(
        gw.state().await["shards"],
        before,
        "a refused request changed the state"
    );
    assert_eq!(gw.stored_state(), stored_before);
    // And traffic still follows the original weights.
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("blue"));
    }
}

/// A valid change is durable (in the state journal) before the 200, and routes traffic right away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_is_persisted_before_it_is_acknowledged() {
    let (_b, _g, _r, gw) = gateway("").await;
    let r = gw
        .set_weights("shard-0", &[("blue", 0), ("green", 100)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let file = gw.stored_state().expect("state stored");
    assert_eq!(file["version"], 1);
    assert_eq!(file["shards"]["shard-0"]["weights"]["green"], 100);
    assert_eq!(file["shards"]["shard-0"]["weights"]["blue"], 0);
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
    assert_eq!(gw.cluster_state("green").await["weight"], 100);
}

/// A client that stops sending mid-body gets 408 and loses the connection after
/// `admin.request_timeout`; one that stops mid-head is disconnected. Nothing changes, and the
/// admin API keeps answering others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_admin_request_times_out_and_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (_blue, _green, yaml) = blue_green_with_admin("  request_timeout: 400ms\n").await;
    let gw = TestGateway::start(&yaml).await;
    let addr = gw.gateway.admin_addr();
    let body = r#"{"weights": {"blue": 0, "green": 100}}"#;

    // Half the body, then silence.
    let mut slow_body = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "PUT /v1/shards/shard-0/weights HTTP/1.1\r\nhost: admin\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    slow_body
        .write_all(&body.as_bytes()[..body.len() / 2])
        .await
        .unwrap();
    // Half a head, then silence.
    let mut slow_head = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow_head
        .write_all(b"PUT /v1/shards/shard-0/weights HTTP/1.1\r\nhost: adm")
        .await
        .unwrap();

    // Meanwhile the admin API answers everyone else.
    assert_eq!(get(&gw.admin("/v1/state")).await.status, StatusCode::OK);

    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, slow_body.read_to_end(&mut answer))
        .await
        .expect("the connection is closed after the 408")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("admin.request_timeout"), "{answer}");

    let mut rest = Vec::new();
    let read = tokio::time::timeout(WAIT, slow_head.read_to_end(&mut rest))
        .await
        .expect("the connection with a half head is closed");
    // Closed without an answer, or with a 408 from hyper; never anything else.
    if let Ok(n) = read {
        let rest = String::from_utf8_lossy(&rest[..n]);
        assert!(
            rest.is_empty() || rest.starts_with("HTTP/1.1 408"),
            "{rest}"
        );
    }

    assert_eq!(gw.cluster_state("green").await["weight"], 0);
    assert!(gw.stored_state().is_none(), "nothing was persisted");
    let r = put(&gw.admin("/v1/shards/shard-0/weights"), body, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// A weight change that names only some clusters answers with the shard's whole split: the
/// clusters it left out are shown at 0, as they now are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weight_change_answers_with_the_whole_split() {
    let (_b, _g, _r, gw) = gateway("").await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let r = put(&url, r#"{"weights": {"blue": 70, "green": 30}}"#, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = put(&url, r#"{"weights": {"blue": 100}}"#, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let answer: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(answer["shard"], "shard-0");
    assert_eq!(answer["weights"]["blue"], 100, "{answer}");
    assert_eq!(answer["weights"]["green"], 0, "{answer}");
    assert_eq!(gw.cluster_state("green").await["weight"], 0);
}

/// With a token file, mutating calls need the bearer token; reads do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_protects_mutating_calls() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
    let (_blue, _green, yaml) = blue_green_with_admin("  token_file: token\n").await;
    let gw = TestGateway::start_in(&yaml, dir).await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let body = r#"{"weights": {"blue": 0, "green": 100}}"#;
    for token in [None, Some("wrong"), Some("s3cret-token-but-longer")] {
        let r = put(&url, body, token).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{token:?}");
        assert!(r.body.contains("bearer token"), "{}", r.body);
    }
    assert_eq!(gw.cluster_state("green").await["weight"], 0);
    // Every POST too, whatever its path names (an id that is no rollout's included).
    for path in [
        "/v1/shards/shard-0/shift",
        "/v1/shards/shard-0/shift/abort",
        "/v1/rollouts",
        "/v1/rollouts/abort",
        "/v1/rollouts/7/pause",
        "/v1/rollouts/abc/pause",
    ] {
        let r = send(http::Method::POST, &gw.admin(path), &[], "{}").await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.body);
    }
    assert_eq!(get(&gw.admin("/v1/state")).await.status, StatusCode::OK);
    let r = put(&url, body, Some("s3cret-token")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(gw.cluster_state("green").await["weight"], 100);
    // The secret is never shown.
    assert!(!get(&gw.admin("/v1/state")).await.body.contains("s3cret"));
}

/// /live, /ready and /metrics with every metric family of the gateway core.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_endpoints_and_metrics() {
    // Names of this test's own: the tests of a binary share the process-wide metrics recorder.
    // Slow probes, so the killed cluster below is still in the table when the request comes.
    let blue = stub("m-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("m-green", "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(
        &config_yaml(
            &["m-shard"],
            &[
                cluster(&blue, "m-shard", "v1", Some(100)),
                cluster(&green, "m-shard", "v2", Some(0)),
            ],
            "",
        )
        .replace("interval: 100ms", "interval: 1h"),
    )
    .await;
    assert_eq!(get(&gw.admin("/live")).await.status, StatusCode::OK);
    assert_eq!(get(&gw.admin("/ready")).await.status, StatusCode::OK);
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/echo")).await.status, StatusCode::OK);
    }
    get(&gw.url("/missing")).await;
    gw.set_weights("m-shard", &[("m-blue", 0), ("m-green", 100)])
        .await;
    green.kill();
    // Until a probe notices, requests to the dead cluster fail with a 502 naming it.
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(
        r.body.contains("upstream cluster 'm-green' failed"),
        "{}",
        r.body
    );
    let r = get(&gw.admin("/metrics")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    for family in [
        "rayshift_requests_total{",
        "rayshift_request_duration_seconds_bucket{",
        "rayshift_cluster_weight{",
        "rayshift_cluster_ready{",
        "rayshift_cluster_in_flight{",
        "rayshift_routing_table_updates_total",
        "rayshift_probes_total{",
    ] {
        assert!(r.body.contains(family), "/metrics lacks {family}");
    }
    assert!(r.body.contains(r#"code="404""#));
    assert!(
        r.body
            .contains(r#"rayshift_cluster_weight{shard="m-shard",cluster="m-green"} 100"#),
        "weight gauge"
    );
    assert!(
        r.body
            .contains(r#"rayshift_upstream_errors_total{cluster="m-green",kind="connect"}"#),
        "upstream errors"
    );
    assert!(r.body.contains(r#"code="502""#));
}

/// A cluster that leaves the gateway keeps no stale gauge values: its `ready` and `weight` read 0,
/// so a deleted cluster cannot hide a shard that has no ready cluster left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_cluster_leaves_no_stale_gauges() {
    let keep = stub("gauge-keep", "v1", &[("echo", "/echo")]).await;
    let gone = stub("gauge-gone", "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["gauges"],
        &[
            cluster(&keep, "gauges", "v1", Some(0)),
            cluster(&gone, "gauges", "v2", Some(100)),
        ],
        "",
    ))
    .await;
    gw.wait_cluster_ready("gauge-gone", true).await;
    let value = |metrics: &str, name: &str| -> Option<f64> {
        let series = format!("{name}{{shard=\"gauges\",cluster=\"gauge-gone\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map(|v| v.trim().parse().unwrap())
    };
    let before = get(&gw.admin("/metrics")).await.body;
    assert_eq!(
        value(&before, "rayshift_cluster_ready"),
        Some(1.0),
        "{before}"
    );
    assert_eq!(value(&before, "rayshift_cluster_weight"), Some(100.0));
    gw.gateway
        .control()
        .discovery(rayshift::control::DiscoveryEvent::Remove(
            "gauge-gone".into(),
        ))
        .await
        .unwrap();
    eventually("gauge-gone removed", || async {
        find_cluster(&gw.state().await, "gauge-gone").is_none()
    })
    .await;
    let after = get(&gw.admin("/metrics")).await.body;
    for name in ["rayshift_cluster_ready", "rayshift_cluster_weight"] {
        assert!(
            value(&after, name).is_none_or(|v| v == 0.0),
            "{name} of a removed cluster: {after}"
        );
    }
}
