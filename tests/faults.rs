//! Faults and misbehaving clients: dead and silent backends, passive health, retries, limits,
//! slow clients, a read-only state directory, graceful shutdown.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// One stub cluster `name` serving `echo` in `shard-0`, behind a gateway configured with `extra`.
async fn one_cluster(name: &str, extra: &str) -> (ServeStub, TestGateway) {
    let stub = stub(name, "v1", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[cluster(&stub, "shard-0", "v1", None)],
        extra,
    ))
    .await;
    (stub, gw)
}

/// A backend killed mid-load (connections reset, port closed): with retries, GETs see no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_with_retries_loses_no_get() {
    // Until its probe fails or passive health ejects it, every request the split sends to the
    // killed cluster is retried. Probes are 2 s apart here, so requests do reach it after the kill
    // even on a loaded machine (with 100 ms, a slow load could send none, and no retry be
    // counted). The retry budget that caps retry storms (src/proxy/retry.rs) is not what this
    // test is about, so it is set wide.
    let blue = stub("rt-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("rt-green", "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(
        &config_yaml(
            &["shard-0"],
            &[
                cluster(&blue, "shard-0", "v1", Some(50)),
                cluster(&green, "shard-0", "v2", Some(50)),
            ],
            "upstream:\n  retry_min_per_second: 100000\n",
        )
        .replace("  interval: 100ms\n", "  interval: 2s\n"),
    )
    .await;
    let load = Load::start(gw.url("/echo"), 8, false);
    load.wait_for_more(500).await;
    green.kill();
    load.wait_for_more(2_000).await;
    let report = load.stop().await;
    println!(
        "killed backend: {} GETs, {} failed",
        report.ok + report.failed,
        report.failed
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert_eq!(report.failed, 0, "{:?}\n{metrics}", report.failures);
    assert!(report.by_cluster["rt-blue"] > 1_000);
    assert!(
        metrics.contains(r#"rayshift_retries_total{cluster="rt-green""#),
        "no retry was counted"
    );
    // rayshift_requests_total counts responses sent to clients: a retried attempt's failure is
    // not one (it shows in rayshift_upstream_errors_total).
    let counted: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("rayshift_requests_total{") && l.contains("cluster=\"rt-"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, report.ok + report.failed, "{metrics}");
    assert!(metrics.contains(r#"rayshift_upstream_errors_total{cluster="rt-green""#));
}

/// Clusters `blue_name` and `green_name` at 50/50 in `shard-0` serving `echo`, retries on, passive
/// health off, on the direct path or hyper's; both ready, then blue's stub stopped and its port
/// taken by the returned listener, for the test to make blue misbehave. Probes are 10 s apart, so
/// blue stays in the split. Keep the green stub alive.
async fn split_with_blue_to_break(
    blue_name: &str,
    green_name: &str,
    direct: bool,
) -> (TestGateway, ServeStub, tokio::net::TcpListener) {
    let blue = stub(blue_name, "v1", &[("echo", "/echo")]).await;
    let green = stub(green_name, "v1", &[("echo", "/echo")]).await;
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(50)),
            cluster(&green, "shard-0", "v1", Some(50)),
        ],
        &format!(
            "upstream:\n  retry_min_per_second: 1000\n  direct_http1: {direct}\n\
             passive_health:\n  consecutive_failures: 0\n"
        ),
    );
    let gw = TestGateway::start(&yaml.replace("interval: 100ms", "interval: 10s")).await;
    gw.wait_cluster_ready(green_name, true).await;
    gw.wait_cluster_ready(blue_name, true).await;
    let addr = blue.addr();
    blue.kill();
    let listener = tokio::net::TcpListener::bind(addr).await.expect("rebind");
    (gw, green, listener)
}

/// A request retried on another cluster is timed there from the retry: the time it spent on the
/// failed cluster is not the answering cluster's (shift analysis judges a target by it). On both
/// paths: the direct HTTP/1.1 one and hyper's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_is_timed_from_its_retry() {
    for direct in [true, false] {
        let (blue_name, green_name) = if direct {
            ("rd-blue", "rd-green")
        } else {
            ("rg-blue", "rg-green")
        };
        let (gw, _green, listener) = split_with_blue_to_break(blue_name, green_name, direct).await;
        // Blue now takes each request and closes without an answer after 300 ms.
        let broken = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(300)).await;
                });
            }
        });
        let mut retried = 0;
        for _ in 0..12 {
            let started = Instant::now();
            let r = get(&gw.url("/echo")).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            assert_eq!(r.cluster(), Some(green_name));
            retried += u32::from(started.elapsed() >= Duration::from_millis(300));
        }
        broken.abort();
        assert!(retried > 0, "no request went to the broken cluster first");
        let metrics = get(&gw.admin("/metrics")).await.body;
        let series = |suffix: &str, extra: &str| -> f64 {
            metrics
                .lines()
                .find(|l| {
                    l.starts_with(&format!("rayshift_request_duration_seconds_{suffix}{{"))
                        && l.contains(&format!("cluster=\"{green_name}\""))
                        && l.contains(extra)
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {suffix} series for {green_name}: {metrics}"))
        };
        let all = series("count", "");
        let fast = series("bucket", "le=\"0.25\"");
        assert_eq!(all, 12.0, "{metrics}");
        assert_eq!(
            fast, all,
            "green was charged for blue's 300 ms (direct: {direct})"
        );
    }
}

/// A `101 Switching Protocols` to a request that asked for no upgrade is a failed attempt on both
/// paths alike: a GET is retried on the other cluster (the client never sees the 101), a POST gets
/// a 502 naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unasked_upgrade_is_retried_like_any_failure_on_both_paths() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    for direct in [true, false] {
        let (blue_name, green_name) = if direct {
            ("u1-blue", "u1-green")
        } else {
            ("u2-blue", "u2-green")
        };
        let (gw, _green, listener) = split_with_blue_to_break(blue_name, green_name, direct).await;
        // Blue now answers every request with a 101 nobody asked for.
        let switched = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&switched);
        let broken = tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let count = Arc::clone(&count);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    // Requests only: a probe (`/-/healthz`, `/-/routes`) gets its 101 uncounted.
                    let head = &buf[..n];
                    if n > 0 {
                        if head.starts_with(b"GET /echo") || head.starts_with(b"POST /echo") {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        let _ = conn
                            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n")
                            .await;
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                });
            }
        });
        for _ in 0..16 {
            let r = get(&gw.url("/echo")).await;
            assert_eq!(r.status, StatusCode::OK, "direct {direct}: {}", r.body);
            assert_eq!(r.cluster(), Some(green_name), "direct {direct}");
        }
        let after_gets = switched.load(Ordering::SeqCst);
        assert!(
            after_gets > 0,
            "direct {direct}: no GET went to the broken cluster first"
        );
        let retries = |metrics: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| {
                    l.starts_with(&format!("rayshift_retries_total{{cluster=\"{blue_name}\""))
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum()
        };
        // Every GET blue took was sent again, once.
        let metrics = get(&gw.admin("/metrics")).await.body;
        assert_eq!(
            retries(&metrics),
            after_gets as f64,
            "direct {direct}: {metrics}"
        );
        let mut refused = 0;
        for _ in 0..16 {
            let r = send(Method::POST, &gw.url("/echo"), &[], "").await;
            if r.status == StatusCode::BAD_GATEWAY {
                assert!(
                    r.body.contains("unexpected 101 Switching Protocols"),
                    "direct {direct}: {}",
                    r.body
                );
                refused += 1;
            } else {
                assert_eq!(r.status, StatusCode::OK, "direct {direct}: {}", r.body);
                assert_eq!(r.cluster(), Some(green_name), "direct {direct}");
            }
        }
        broken.abort();
        // Every POST blue took was answered with the 502: none was sent again.
        assert_eq!(
            refused,
            switched.load(Ordering::SeqCst) - after_gets,
            "direct {direct}"
        );
        assert!(refused > 0, "direct {direct}: no POST went to blue");
        // ... and no POST was.
        let metrics = get(&gw.admin("/metrics")).await.body;
        assert_eq!(
            retries(&metrics),
            after_gets as f64,
            "direct {direct}: {metrics}"
        );
    }
}

/// Only requests routed to a cluster fund the retry budget: the gateway's own answers (404 here)
/// buy no retries for later requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answered_by_the_gateway_fund_no_retries() {
    // 0.04 of a retry per routed request: the 20 GETs below fund none (0.8), the 500 404s before
    // them would fund 20. Slow probes and no passive health keep the killed cluster in the split.
    let blue = stub("rb-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("rb-green", "v1", &[("echo", "/echo")]).await;
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(50)),
            cluster(&green, "shard-0", "v1", Some(50)),
        ],
        "upstream:\n  retry_budget: 0.04\n  retry_min_per_second: 0\n\
         passive_health:\n  consecutive_failures: 0\n",
    );
    let gw = TestGateway::start(&yaml.replace("interval: 100ms", "interval: 10s")).await;
    gw.wait_cluster_ready("rb-green", true).await;
    let series = "rayshift_retry_budget_exhausted_total";
    let before = metric(&gw, series).await.unwrap_or(0.0);
    for _ in 0..500 {
        assert_eq!(get(&gw.url("/nowhere")).await.status, StatusCode::NOT_FOUND);
    }
    green.kill();
    let mut failed = 0;
    for _ in 0..20 {
        let r = get(&gw.url("/echo")).await;
        if r.status != StatusCode::OK {
            assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
            failed += 1;
        }
    }
    // Half the GETs go to the killed cluster (all 20 missing it: about one run in a million).
    assert!(failed > 0, "every GET was retried: the 404s funded retries");
    // The counter is the process's (gateways of parallel tests share it): at least these.
    let after = metric(&gw, series).await.unwrap_or(0.0);
    assert!(
        after - before >= failed as f64,
        "{before} -> {after}, {failed} failed"
    );
}

/// Makes `cluster` (served by `stub`) answer 500 to everything under load on `/echo` until passive
/// health ejects it; the load goes on.
async fn fail_until_ejected(gw: &TestGateway, stub: &ServeStub, cluster: &str) -> Load {
    stub.set_error_rate(1.0);
    let load = Load::start(gw.url("/echo"), 4, false);
    eventually(&format!("{cluster} ejected"), || async {
        gw.cluster_state(cluster).await["ejected"] == true
    })
    .await;
    load
}

/// A cluster answering 500 to everything is ejected by passive health; its share goes to the
/// other cluster; it comes back once it is well and its ejection time is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_cluster_is_ejected_and_comes_back() {
    let extra =
        "passive_health:\n  consecutive_failures: 3\n  base_ejection: 1s\n  max_ejection: 4s\n";
    let (_blue, green, gw) = old_and_new("shard-0", ("ph-blue", 50), ("ph-green", 50), extra).await;
    let load = fail_until_ejected(&gw, &green, "ph-green").await;
    let state = gw.cluster_state("ph-green").await;
    assert!(
        state["detail"].as_str().unwrap().contains("passive health"),
        "{state}"
    );
    let during = green.requests();
    load.wait_for_more(300).await;
    assert_eq!(green.requests(), during, "an ejected cluster got requests");
    green.set_error_rate(0.0);
    eventually("green back", || async {
        gw.cluster_state("ph-green").await["ejected"] == false
    })
    .await;
    load.wait_for_more(300).await;
    let report = load.stop().await;
    assert!(green.requests() > during, "green never came back");
    // Only the requests green answered before its ejection failed; none after it came back.
    assert!(
        report.failed <= during,
        "{} failed, green answered {during} before its ejection",
        report.failed
    );
    assert!(
        report.failures.iter().all(|f| f.contains("ph-green")),
        "{:?}",
        report.failures
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(metrics.contains(r#"rayshift_cluster_ejections_total{cluster="ph-green"}"#));
}

/// An ejected cluster comes back before its time when the shard's other cluster stops being
/// ready: the last cluster left serving an application is never kept out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_cluster_returns_early_when_no_other_is_left() {
    let extra =
        "passive_health:\n  consecutive_failures: 3\n  base_ejection: 5m\n  max_ejection: 5m\n";
    let (blue, green, gw) = old_and_new("shard-0", ("pe-blue", 50), ("pe-green", 50), extra).await;
    fail_until_ejected(&gw, &green, "pe-green")
        .await
        .stop()
        .await;
    green.set_error_rate(0.0);
    blue.set_healthy(false);
    gw.wait_cluster_ready("pe-blue", false).await;
    eventually("green back before its 5 minutes", || async {
        gw.cluster_state("pe-green").await["ejected"] == false
    })
    .await;
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cluster(), Some("pe-green"));
}

/// An ejected cluster also comes back early for an application that lost its cluster because
/// of the ejection itself: with the ejected cluster out, an unready older cluster's pair for the
/// same app (another prefix) won the table, and the app had no cluster at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_cluster_returns_early_for_an_app_its_ejection_left_without_a_cluster() {
    let old = stub("pw-old", "v1", &[("x", "/q")]).await;
    let blue = stub("pw-blue", "v2", &[("x", "/p")]).await;
    let green = stub("pw-green", "v2", &[("x", "/p")]).await;
    let other = stub("pw-other", "v2", &[("y", "/y")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&old, "shard-0", "v1", Some(0)),
            cluster(&blue, "shard-0", "v2", Some(50)),
            cluster(&green, "shard-0", "v2", Some(50)),
            cluster(&other, "shard-0", "v2", Some(0)),
        ],
        "passive_health:\n  consecutive_failures: 3\n  base_ejection: 5m\n  max_ejection: 5m\n",
    ))
    .await;
    old.set_healthy(false);
    gw.wait_cluster_ready("pw-old", false).await;
    for name in ["pw-blue", "pw-green", "pw-other"] {
        gw.wait_cluster_ready(name, true).await;
    }
    blue.set_error_rate(1.0);
    let load = Load::start(gw.url("/p"), 4, false);
    eventually("pw-blue ejected", || async {
        gw.cluster_state("pw-blue").await["ejected"] == true
    })
    .await;
    load.stop().await;
    blue.set_error_rate(0.0);
    // Green goes: x's only ready cluster is blue, out for 5 minutes; old's `/q` wins the table.
    green.set_healthy(false);
    gw.wait_cluster_ready("pw-green", false).await;
    eventually("pw-blue back before its 5 minutes", || async {
        gw.cluster_state("pw-blue").await["ejected"] == false
    })
    .await;
    let r = get(&gw.url("/p")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cluster(), Some("pw-blue"));
}

/// A cluster is not ejected while the shard's other ready cluster does not serve its
/// application (a new revision still deploying): its app would have no cluster at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ejection_when_no_other_cluster_serves_the_app() {
    let extra = "passive_health:\n  consecutive_failures: 3\n  base_ejection: 5m\n";
    let (blue, green, gw) = old_and_new("shard-0", ("pa-blue", 100), ("pa-green", 0), extra).await;
    // Green is up, its applications not deployed yet.
    green.set_apps(Vec::new());
    eventually("green lists no applications", || async {
        gw.cluster_state("pa-green").await["apps"]
            .as_array()
            .is_some_and(|a| a.is_empty())
    })
    .await;
    assert_eq!(gw.cluster_state("pa-green").await["ready"], true);
    blue.set_error_rate(1.0);
    let load = Load::start(gw.url("/echo"), 4, false);
    // Far more failures in a row than the threshold, over several control ticks.
    load.wait_for_more(200).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = load.stop().await;
    assert!(report.failed >= 100, "blue did not fail: {}", report.failed);
    // Never ejected, not even for a moment: every failure is blue's own 500, and no ejection
    // was counted.
    assert!(
        report.failures.iter().all(|f| f.contains("pa-blue")),
        "{:?}",
        report.failures
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        !metrics.lines().any(|l| l
            .starts_with(r#"rayshift_cluster_ejections_total{cluster="pa-blue"}"#)
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert_eq!(gw.cluster_state("pa-blue").await["ejected"], false);
    blue.set_error_rate(0.0);
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cluster(), Some("pa-blue"));
}

/// An application a cluster lists but the routing table gives it none of (served at another
/// prefix by the older cluster) needs no substitute: the cluster is still ejected when its
/// shard's other cluster serves everything the table sends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_the_table_does_not_route_to_a_cluster_does_not_block_its_ejection() {
    let extra =
        "passive_health:\n  consecutive_failures: 3\n  base_ejection: 5m\n  max_ejection: 5m\n";
    let (blue, green, gw) = old_and_new("shard-0", ("px-blue", 50), ("px-green", 50), extra).await;
    blue.set_apps(vec![
        ("echo".into(), "/echo".into()),
        ("stray".into(), "/stray-blue".into()),
    ]);
    green.set_apps(vec![
        ("echo".into(), "/echo".into()),
        ("stray".into(), "/stray".into()),
    ]);
    // Two probe rounds of each (health and routes) after the change.
    let (b0, g0) = (blue.probe_requests(), green.probe_requests());
    eventually("both probed again", || async {
        blue.probe_requests() >= b0 + 4 && green.probe_requests() >= g0 + 4
    })
    .await;
    // Stray is blue's (the older revision's pair wins); green gets only echo from the table.
    let r = get(&gw.url("/stray-blue")).await;
    assert_eq!(r.cluster(), Some("px-blue"), "{}", r.body);
    assert_eq!(get(&gw.url("/stray")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        gw.cluster_state("px-green").await["apps"],
        serde_json::json!(["echo"])
    );
    let load = fail_until_ejected(&gw, &green, "px-green").await;
    let during = green.requests();
    load.wait_for_more(200).await;
    let report = load.stop().await;
    assert_eq!(green.requests(), during, "an ejected cluster got requests");
    assert!(
        report.failures.iter().all(|f| f.contains("px-green")),
        "{:?}",
        report.failures
    );
}

/// A backend that accepts and never answers: 504 within the response timeout, naming the cluster;
/// another shard's cluster is unaffected meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_backend_times_out_with_504() {
    let good = stub("good", "v1", &[("good", "/good")]).await;
    let slow = stub("slow", "v1", &[("slow", "/slow")]).await;
    let extra = "apps:\n  - {name: good, route_prefix: /good, shard: a}\n  - {name: slow, route_prefix: /slow, shard: b}\nupstream:\n  response_timeout: 500ms\n";
    let gw = TestGateway::start(&config_yaml(
        &["a", "b"],
        &[
            cluster(&good, "a", "v1", None),
            cluster(&slow, "b", "v1", None),
        ],
        extra,
    ))
    .await;
    slow.set_latency(Duration::from_secs(30));
    let started = Instant::now();
    let slow_req = tokio::spawn({
        let url = gw.url("/slow/x");
        async move { get(&url).await }
    });
    // Meanwhile the other cluster answers at once.
    for _ in 0..20 {
        let r = get(&gw.url("/good/x")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = slow_req.await.unwrap();
    let took = started.elapsed();
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        r.body
            .contains("upstream cluster 'slow' did not answer in time"),
        "{}",
        r.body
    );
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "{took:?}"
    );
}

/// 1,000 clients that send headers byte by byte do not stop normal clients from being served, and
/// they are cut off at the header read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_do_not_starve_others() {
    let extra = "limits:\n  header_read_timeout: 2s\n";
    let (_blue, gw) = one_cluster("blue", extra).await;
    let addr = gw.gateway.proxy_addr();
    let mut slow = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    for _ in 0..50 {
        let r = get(&gw.url("/echo")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "normal clients starved: {:?}",
        started.elapsed()
    );
    // After the header read timeout the slow ones are closed by the gateway.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut closed = 0;
    for s in slow.iter_mut().take(50) {
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await {
            Ok(Ok(_)) | Ok(Err(_)) => closed += 1,
            Err(_) => {}
        }
    }
    assert_eq!(closed, 50, "slow clients were not cut off");
}

/// Clients that connect and send nothing, or half of the HTTP/2 preface, are closed after
/// `limits.header_read_timeout`: they cannot hold every `limits.max_connections` permit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_hold_the_connection_limit() {
    let extra = "limits:\n  header_read_timeout: 1s\n  max_connections: 2\n";
    let (_blue, gw) = one_cluster("blue", extra).await;
    let addr = gw.gateway.proxy_addr();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut half_preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    half_preface.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // Both accepted (each worker accepts on its own socket, so a later client could otherwise be
    // accepted first) and holding both permits: the next client waits until one is freed.
    eventually("both silent clients hold a permit", || async {
        gw.gateway.client_connections() == 2
    })
    .await;
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), get(&gw.url("/echo")))
        .await
        .expect("a third client is served once the silent ones are closed");
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    for s in [&mut silent, &mut half_preface] {
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the silent connection is closed");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    // Both counted (the direct path closed the silent one, hyper's watch the half preface); the
    // recorder is shared by this binary's gateways: at least these two.
    let closed = r#"rayshift_client_connections_closed_total{reason="header_timeout"}"#;
    assert!(metric(&gw, closed).await.is_some_and(|n| n >= 2.0));
}

/// A client that stops sending its request body gets 408 after `limits.body_read_timeout` (and
/// the cluster is not blamed); a client that keeps sending, however slowly, is not cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408() {
    let extra = "limits:\n  body_read_timeout: 1s\n";
    let (_blue, gw) = one_cluster("body-blue", extra).await;
    let addr = gw.gateway.proxy_addr();
    let mut stalled = tokio::net::TcpStream::connect(addr).await.unwrap();
    stalled
        .write_all(
            b"POST /echo/upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stalled.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("limits.body_read_timeout"), "{answer}");

    // 15 bytes, one every 200 ms: slower in total than the timeout, never paused as long.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(
        b"POST /echo/upload HTTP/1.1\r\nhost: x\r\ncontent-length: 15\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..15 {
        slow.write_all(b"x").await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("{\"bytes\": 15}") || answer.contains("\"bytes\":15"),
        "{answer}"
    );
    let state = gw.cluster_state("body-blue").await;
    assert_eq!(state["ejected"], false, "{state}");
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        !metrics.contains(r#"rayshift_upstream_errors_total{cluster="body-blue""#),
        "the cluster was blamed for the client's pause"
    );
}

/// Oversized headers get 431, an oversized body 413, garbage 400; the gateway stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_the_right_4xx() {
    let extra = "limits:\n  max_header_bytes: 16384\n  max_body_bytes: 1000\n";
    let (blue, gw) = one_cluster("blue", extra).await;
    let addr = gw.gateway.proxy_addr();
    let raw = |bytes: Vec<u8>| async move {
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = s.write_all(&bytes);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .await
        .unwrap()
    };
    let big = format!(
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let resp = raw(big.into_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.200}");
    let resp = raw(b"\x16\x03\x01\x02\x00garbage\r\n\r\n".to_vec()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:.200}");
    let resp = raw(b"GET /echo HTTP/9.9\r\n\r\n".to_vec()).await;
    assert!(
        resp.starts_with("HTTP/1.1 4") || resp.starts_with("HTTP/1.1 505"),
        "{resp:.200}"
    );
    // Two Host fields (RFC 9112 section 3.2): the gateway and Serve could read different hosts.
    let before = blue.requests();
    let resp = raw(b"GET /echo HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n".to_vec()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:.200}");
    assert!(resp.contains("more than one Host header"), "{resp:.300}");
    assert_eq!(blue.requests(), before, "forwarded all the same");
    // No Host, or one that is no host[:port]: 400 as well (RFC 9112 section 3.2).
    let resp = raw(b"GET /echo HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:.200}");
    assert!(resp.contains("needs a Host header"), "{resp:.300}");
    let resp = raw(b"GET /echo HTTP/1.1\r\nHost: a b\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp:.200}");
    assert!(resp.contains("not a host"), "{resp:.300}");
    // A transfer coding the gateway cannot forward (its name would be lost): 501.
    let resp = raw(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            .to_vec(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 501"), "{resp:.200}");
    assert_eq!(blue.requests(), before, "none of them forwarded");
    // After a request served, the HTTP/2 preface is a bad request, not a switch to h2c.
    let resp =
        raw(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec())
            .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:.200}");
    assert!(
        resp.contains("echo 0\nHTTP/1.1 400 Bad Request\r\n"),
        "{resp:.600}"
    );
    assert!(resp.contains("only valid at the start"), "{resp:.600}");

    // Declared too large: refused before anything is sent upstream.
    let before = blue.requests();
    let r = send(Method::POST, &gw.url("/echo"), &[], &"x".repeat(5000)).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", r.body);
    assert_eq!(blue.requests(), before);
    // Chunked and too large: cut off while streaming.
    let chunked = format!(
        "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{}\r\n0\r\n\r\n",
        3000,
        "y".repeat(3000)
    );
    let resp = raw(chunked.into_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp:.300}");
    // Within limits: fine, and the gateway is still up.
    let r = send(Method::POST, &gw.url("/echo"), &[], &"x".repeat(500)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "blue v1 echo 500\n");
}

/// Clients that abandon their uploads mid-body (bodies over 64 KiB stream through the general
/// path): not the cluster's failures. Passive health does not eject it, and no upstream error is
/// counted against it (a shift's analysis would count them too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_uploads_are_not_the_clusters_failures() {
    let blue = stub("ab-blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("ab-green", "v1", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v1", Some(0)),
        ],
        "passive_health:\n  consecutive_failures: 2\n",
    ))
    .await;
    for _ in 0..3 {
        let mut client = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
            .await
            .unwrap();
        client
            .write_all(b"POST /echo/upload HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000\r\n\r\n")
            .await
            .unwrap();
        client.write_all(&[b'x'; 1000]).await.unwrap();
        eventually("the upload reaches blue", || async {
            gw.cluster_state("ab-blue").await["in_flight"] == 1
        })
        .await;
        drop(client);
        eventually("the upload ends", || async {
            gw.cluster_state("ab-blue").await["in_flight"] == 0
        })
        .await;
    }
    let blue_state = gw.cluster_state("ab-blue").await;
    assert_eq!(blue_state["ejected"], false, "{blue_state}");
    let metrics = get(&gw.admin("/metrics")).await.body;
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("rayshift_upstream_errors_total{") && l.contains("ab-blue"))
        .collect();
    assert!(errors.is_empty(), "counted against the cluster: {errors:?}");
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("ab-blue"));
}

/// A GET with a chunked body (or an HTTP/2 one with DATA frames and no content-length) reaches
/// the cluster with its body: without framing, the upstream HTTP/1.1 request would carry none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_chunked_body_keeps_its_body() {
    let (_blue, gw) = one_cluster("ck-blue", "").await;
    let mut client = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    client
        .write_all(b"GET /echo/upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut client).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("{\"bytes\": 5}"), "{answer}");
}

/// The state file's directory made read-only: a weight change is refused with a 5xx naming the
/// problem, and the weights in memory stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_state_directory_refuses_weight_changes() {
    use std::os::unix::fs::PermissionsExt;
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v2", Some(0)),
        ],
        "",
    )
    .replace("state_file: state.json", "state_file: state/state.json");
    let gw = TestGateway::start_in(&yaml, dir).await;
    // Root ignores permission bits; a file where the directory should be fails for everyone.
    std::fs::set_permissions(&state_dir, std::fs::Permissions::from_mode(0o500)).unwrap();
    std::fs::remove_dir_all(&state_dir).unwrap();
    std::fs::write(&state_dir, b"not a directory").unwrap();
    let r = gw
        .set_weights("shard-0", &[("blue", 0), ("green", 100)])
        .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert!(
        r.body.contains("state not changed") && r.body.contains("writing state file"),
        "{}",
        r.body
    );
    assert_eq!(gw.cluster_state("blue").await["weight"], 100);
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("blue"));
    }
    // A shift cannot start either.
    let r = send(
        Method::POST,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[],
        r#"{"to": "green"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.body);
    assert_eq!(
        get(&gw.admin("/v1/shards/shard-0/shift")).await.status,
        StatusCode::NOT_FOUND
    );
}

/// SIGTERM during load with a long streamed response and a WebSocket open: `/ready` turns 503,
/// new connections are refused, the stream and the WebSocket complete, the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_and_websockets_then_exits_0() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    let extra = "shutdown:\n  ready_delay: 300ms\n  drain_timeout: 10s\n";
    std::fs::write(
        &config,
        config_yaml(
            &["shard-0"],
            &[cluster(&blue, "shard-0", "v1", None)],
            extra,
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;

    let stream_req = http::Request::get(gw.url("/echo/stream?n=15&interval_ms=100"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let resp = client().request(stream_req).await.unwrap();
    let stream = tokio::spawn(async move {
        use http_body_util::BodyExt;
        resp.into_body().collect().await.map(|b| b.to_bytes())
    });
    let tcp = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/echo/ws", gw.proxy), tcp)
        .await
        .unwrap();
    let load = Load::start(gw.url("/echo"), 4, false);
    load.wait_for_more(100).await;

    let pid = gw.child.id() as i32;
    assert_eq!(unsafe_kill(pid), 0);
    // /ready reports the shutdown (as soon as the signal is handled), before the listener closes.
    let ready_url = gw.admin("/ready");
    eventually("/ready answers 503", || {
        let url = ready_url.clone();
        async move { get(&url).await.status == StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    let report = load.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        tokio::net::TcpStream::connect(gw.proxy).await.is_err(),
        "new connections still accepted"
    );

    // The WebSocket still works, and closes cleanly.
    ws.send(Message::text("during drain")).await.unwrap();
    let msg = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.into_text().unwrap().as_str(), "blue: during drain");
    ws.close(None).await.unwrap();
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    let body = tokio::time::timeout(WAIT, stream)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.contains("data: blue 14\n\n"),
        "stream truncated: {text}"
    );

    let status = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = gw.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    })
    .await
    .unwrap();
    let status = status.expect("gateway did not exit within the drain timeout");
    assert!(status.success(), "exit status {status:?}");
    // Requests that were refused after the listener closed are connection errors, not 5xx answers.
    assert!(report.ok > 0);
}

/// `admin.listen` on a non-loopback address without a token: refuses to start, and `check`
/// refuses the file too (a config that passes `check` starts).
#[test]
fn exposed_admin_without_token_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    std::fs::write(
        &config,
        "listen: 127.0.0.1:0\nadmin:\n  listen: 0.0.0.0:0\nshards: [s]\n",
    )
    .unwrap();
    for verb in ["run", "check"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rayshift"))
            .args([verb, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{verb}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("admin.listen")
                && stderr.contains("is not a loopback address: set admin.token_file"),
            "{verb}: {stderr}"
        );
    }
}

fn unsafe_kill(pid: i32) -> i32 {
    // SIGTERM through the kill(1) command: no libc binding needed in the tests.
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| if s.success() { 0 } else { 1 })
        .unwrap_or(1)
}

/// On shutdown an HTTP/2 client gets GOAWAY: the request in flight on its connection completes,
/// then the gateway closes the connection and no new stream is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_clients_get_goaway_on_shutdown() {
    use http_body_util::BodyExt;
    let (_blue, gw) = one_cluster("blue", "").await;
    let tcp = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let addr = gw.gateway.proxy_addr();
    let req = move |path: &str| {
        http::Request::get(format!("http://{addr}{path}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    // A slow request in flight on the connection when shutdown starts.
    let in_flight = sender.send_request(req("/echo/sleep/600"));
    let in_flight = tokio::spawn(async move {
        let resp = in_flight.await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let TestGateway { gateway, dir: _dir } = gw;
    let shutdown = tokio::spawn(gateway.shutdown());
    let (status, body) = tokio::time::timeout(WAIT, in_flight)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "blue v1 echo 0\n");
    // The gateway sent GOAWAY and closed the connection once the stream finished.
    let closed = tokio::time::timeout(WAIT, conn)
        .await
        .expect("connection not closed after GOAWAY");
    assert!(closed.is_ok(), "{closed:?}");
    assert!(
        sender.send_request(req("/echo")).await.is_err(),
        "a new stream was accepted after GOAWAY"
    );
    tokio::time::timeout(WAIT, shutdown).await.unwrap().unwrap();
}

/// An HTTP/2 connection is closed after `limits.http2_idle_timeout` with no request in flight,
/// never while a response is still streaming; with GOAWAY first, as on shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_are_closed() {
    use http_body_util::{BodyExt, Empty};
    let extra = "limits:\n  http2_idle_timeout: 1s\n";
    let (_blue, gw) = one_cluster("h2idle-blue", extra).await;
    let tcp = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // A 2 s stream: longer than the idle timeout, and not cut.
    let req = http::Request::get(gw.url("/echo/stream?n=20&interval_ms=100"))
        .body(Empty::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&body).matches("data: ").count(),
        20,
        "the stream was cut"
    );
    // Then idle: the gateway tells the client GOAWAY and closes the connection, which ends
    // cleanly for the client (a bare close would end it with an error).
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(ended.is_ok(), "closed without GOAWAY: {ended:?}");
    assert!(sender.is_closed());
    let closed = r#"rayshift_client_connections_closed_total{reason="http2_idle"}"#;
    assert!(metric(&gw, closed).await.is_some_and(|n| n >= 1.0));
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
}
