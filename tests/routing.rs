//! Requests reach the right application and shard through a real gateway and real stub clusters.

mod common;

use common::*;
use http::StatusCode;

/// Serve's prefix rule through the gateway: longest prefix first, `/route` is not `/routesuffix`,
/// `/` catches the rest; the path reaches the cluster unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_rule_selects_the_application() {
    let apps = [
        ("root", "/"),
        ("route", "/route"),
        ("routesuffix", "/routesuffix"),
        ("deep", "/route/deep/"),
    ];
    let blue = stub("blue", "v1", &apps).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[cluster(&blue, "shard-0", "v1", None)],
        "",
    ))
    .await;

    let cases = [
        ("/route", "route"),
        ("/route/x/y", "route"),
        ("/routesuffix", "routesuffix"),
        ("/routesuffix/a", "routesuffix"),
        ("/routes", "root"),
        ("/route/deep/", "deep"),
        ("/route/deep/more", "deep"),
        ("/route/deep", "route"),
        ("/", "root"),
        ("/anything/else", "root"),
    ];
    for (path, app) in cases {
        let r = get(&gw.url(path)).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert_eq!(r.headers["x-stub-app"], app, "{path}");
    }
    // The path and query arrive unchanged (Serve does not strip the prefix).
    let r = get(&gw.url("/route/x/headers?q=1&b=%20")).await;
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(seen["_uri"], "/route/x/headers?q=1&b=%20");
}

/// Serve matches route prefixes against the percent-decoded path, and so does the gateway, on both
/// of its request paths; the path reaches the cluster as it came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percent_encoded_paths_match_as_serve_matches_them() {
    for (name, extra) in [
        ("pe-direct", ""),
        ("pe-hyper", "upstream:\n  direct_http1: false\n"),
    ] {
        // The catch-all app on one cluster, the others on another: the gateway's match decides
        // which cluster a request reaches.
        let named = stub(name, "v1", &[("api", "/api"), ("cafe", "/café")]).await;
        let root = stub(&format!("{name}-root"), "v1", &[("root", "/")]).await;
        let gw = TestGateway::start(&config_yaml(
            &["shard-0"],
            &[
                cluster(&named, "shard-0", "v1", Some(50)),
                cluster(&root, "shard-0", "v1", Some(50)),
            ],
            extra,
        ))
        .await;
        for (path, app, by) in [
            ("/api%2Fv1", "api", name),
            ("/%61pi/x", "api", name),
            ("/caf%C3%A9", "cafe", name),
            ("/caf%C3%A9/menu", "cafe", name),
            ("/cafe", "root", &format!("{name}-root")),
            ("/%FF", "root", &format!("{name}-root")),
        ] {
            let r = get(&gw.url(path)).await;
            assert_eq!(r.status, StatusCode::OK, "{name} {path}: {}", r.body);
            assert_eq!(r.headers["x-stub-app"], app, "{name} {path}");
            assert_eq!(r.cluster(), Some(by), "{name} {path}");
        }
        let r = get(&gw.url("/caf%C3%A9/headers?q=%20")).await;
        let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(seen["_uri"], "/caf%C3%A9/headers?q=%20", "{name}");
    }
}

/// No matching prefix: 404 naming the path; an app whose shard has no ready cluster: 503 naming both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_path_is_404_and_no_ready_cluster_is_503() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let extra = "apps:\n  - name: lonely\n    route_prefix: /lonely\n    shard: shard-1\n";
    let gw = TestGateway::start(&config_yaml(
        &["shard-0", "shard-1"],
        &[cluster(&blue, "shard-0", "v1", None)],
        extra,
    ))
    .await;
    let r = get(&gw.url("/nowhere/at/all")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert!(r.body.contains("/nowhere/at/all"), "{}", r.body);

    let r = get(&gw.url("/lonely/x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.body.contains("'lonely'") && r.body.contains("'shard-1'"),
        "{}",
        r.body
    );
}

/// Apps are placed on shards by the consistent hash (or their pin), traffic goes to that shard's
/// clusters only, and `/v1/placement` agrees with where traffic went.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_go_to_their_shard_and_placement_api_agrees() {
    let names: Vec<String> = (0..24).map(|i| format!("app-{i}")).collect();
    let apps: Vec<(&str, String)> = names
        .iter()
        .map(|n| (n.as_str(), format!("/{n}")))
        .collect();
    let app_refs: Vec<(&str, &str)> = apps.iter().map(|(n, p)| (*n, p.as_str())).collect();
    let a = stub("cluster-a", "v1", &app_refs).await;
    let b = stub("cluster-b", "v1", &app_refs).await;
    let extra = "apps:\n  - name: pinned\n    route_prefix: /pinned\n    shard: shard-b\n";
    let gw = TestGateway::start(&config_yaml(
        &["shard-a", "shard-b"],
        &[
            cluster(&a, "shard-a", "v1", None),
            cluster(&b, "shard-b", "v1", None),
        ],
        extra,
    ))
    .await;
    let mut per_shard = std::collections::BTreeMap::new();
    for name in &names {
        let p = get(&gw.admin(&format!("/v1/placement?app={name}"))).await;
        assert_eq!(p.status, StatusCode::OK, "{}", p.body);
        let placement: serde_json::Value = serde_json::from_str(&p.body).unwrap();
        let shard = placement["shard"].as_str().unwrap().to_string();
        let r = get(&gw.url(&format!("/{name}/x"))).await;
        assert_eq!(r.status, StatusCode::OK, "{name}: {}", r.body);
        let expected_cluster = if shard == "shard-a" {
            "cluster-a"
        } else {
            "cluster-b"
        };
        assert_eq!(
            r.cluster(),
            Some(expected_cluster),
            "{name} placed on {shard}"
        );
        *per_shard.entry(shard).or_insert(0) += 1;
    }
    // Both shards get a share of 24 apps (rendezvous hashing spreads them).
    assert_eq!(per_shard.len(), 2, "{per_shard:?}");
    let p: serde_json::Value =
        serde_json::from_str(&get(&gw.admin("/v1/placement?app=pinned")).await.body).unwrap();
    assert_eq!(p["shard"], "shard-b");
    assert_eq!(p["known"], true);
    let r = get(&gw.admin("/v1/placement")).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

/// An app found only on another shard's clusters than its hash is routed where it is deployed,
/// and `/v1/state` says so (`placement: deployed`), so an operator can move it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misplaced_app_is_served_where_deployed() {
    let probe_a = stub("cluster-a", "v1", &[]).await;
    let b = stub("cluster-b", "v1", &[]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-a", "shard-b"],
        &[
            cluster(&probe_a, "shard-a", "v1", None),
            cluster(&b, "shard-b", "v1", None),
        ],
        "",
    ))
    .await;
    // Find an app name that hashes to shard-a, then deploy it on shard-b's cluster only.
    let mut name = String::new();
    for i in 0.. {
        name = format!("model-{i}");
        let p: serde_json::Value = serde_json::from_str(
            &get(&gw.admin(&format!("/v1/placement?app={name}")))
                .await
                .body,
        )
        .unwrap();
        if p["shard"] == "shard-a" {
            break;
        }
    }
    b.set_apps(vec![(name.clone(), format!("/{name}"))]);
    eventually("misplaced app routed", || async {
        get(&gw.url(&format!("/{name}"))).await.status == StatusCode::OK
    })
    .await;
    assert_eq!(
        get(&gw.url(&format!("/{name}"))).await.cluster(),
        Some("cluster-b")
    );
    let state = gw.state().await;
    let app = state["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name.as_str())
        .unwrap()
        .clone();
    assert_eq!(app["shard"], "shard-b");
    assert_eq!(app["placement"], "deployed");
}

/// A cluster whose `/-/routes` lists a route prefix that is not a path (no leading `/`) gets that
/// application ignored; its other applications are routed, and later changes still take effect
/// (one bad entry must not stop the routing table from being rebuilt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_prefix_that_is_not_a_path_is_ignored() {
    let blue = stub("blue", "v1", &[("echo", "/echo"), ("bad", "nope")]).await;
    let green = stub("green", "v1", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[
            cluster(&blue, "shard-0", "v1", Some(100)),
            cluster(&green, "shard-0", "v1", Some(0)),
        ],
        "",
    ))
    .await;
    eventually("/echo is routed", || async {
        get(&gw.url("/echo")).await.status == StatusCode::OK
    })
    .await;
    let state = gw.state().await;
    let apps: Vec<&str> = state["apps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(apps, ["echo"], "{state}");
    let r = gw
        .set_weights("shard-0", &[("blue", 0), ("green", 100)])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
}
