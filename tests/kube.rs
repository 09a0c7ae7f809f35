//! Kubernetes discovery against a real kube-apiserver + etcd: RayClusters become clusters while
//! traffic flows; an auto shift on a new revision; the API server restarted mid-load.
//!
//! The API server is heavy (about 6 s to start, 350 MB): one per test binary, so the scenarios run
//! in order inside one test, each in its own namespace.

mod common;
#[path = "common/kube.rs"]
mod kube_env;

use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube_env::{create_raycluster, set_status, KubeEnv};

fn gateway_yaml(env: &KubeEnv, ns: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [shard-0, shard-1]\n\
         probe:\n  interval: 100ms\n  timeout: 500ms\n\
         discovery:\n  kubernetes:\n    namespaces: [{ns}]\n    endpoint: head_service_ip\n    kubeconfig: {}\n{extra}",
        env.kubeconfig().display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_discovery_end_to_end() {
    let env = KubeEnv::start().await;
    deploy_manifests_pass_server_dry_run(&env).await;
    traffic_follows_rayclusters(&env).await;
    auto_shift_on_a_new_revision(&env).await;
    api_server_restart_mid_load(&env).await;
    two_replicas_share_state_and_fail_over(&env).await;
    a_hung_api_server_fails_state_writes_in_bounded_time(&env).await;
    a_shift_rolls_back_while_the_api_server_hangs(&env).await;
    back_to_back_writes_keep_the_newest_shared_state(&env).await;
    a_state_configmap_keeps_what_others_put_in_it_and_comes_back(&env).await;
    ready_waits_for_the_first_probes_of_a_late_list(&env).await;
    changes_wait_for_the_first_list(&env).await;
    drained_raycluster_is_deleted_when_configured(&env).await;
    a_raycluster_never_removes_a_static_cluster(&env).await;
}

/// `deploy/kubernetes` passes `kubectl apply --dry-run=server`, and its embedded config passes
/// `rayshift check`. (The PodDisruptionBudget is policy/v1, which this 1.20 API server predates:
/// it is checked against the policy/v1 schema offline.)
async fn deploy_manifests_pass_server_dry_run(env: &KubeEnv) {
    let kubeconfig = env.kubeconfig();
    let kubectl = |args: &[&str], stdin: Option<&str>| {
        use std::io::Write;
        let mut child = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl (installed by scripts/kube/install.sh)");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rendered = kubectl(
        &[
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes"),
        ],
        None,
    );
    let docs: Vec<&str> = rendered.split("\n---\n").collect();
    assert!(docs.len() >= 9, "{} documents rendered", docs.len());
    let (pdb, rest): (Vec<&str>, Vec<&str>) = docs
        .into_iter()
        .partition(|d| d.contains("kind: PodDisruptionBudget"));
    // Namespaced objects need their namespace to exist for a server-side dry run.
    env.namespace("rayshift").await;
    let out = kubectl(
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&rest.join("\n---\n")),
    );
    for kind in [
        "serviceaccount/rayshift",
        "clusterrole.rbac.authorization.k8s.io/rayshift-rayclusters",
        "deployment.apps/rayshift",
        "service/rayshift",
        "configmap/rayshift-config",
        "role.rbac.authorization.k8s.io/rayshift-state",
    ] {
        assert!(out.contains(kind), "{kind} not applied: {out}");
    }
    // Checked against the policy/v1 schema offline (no server of this age knows it).
    let pdb: k8s_openapi::api::policy::v1::PodDisruptionBudget =
        serde_saphyr::from_str(pdb[0]).expect("policy/v1 PDB");
    let selector = pdb.spec.unwrap().selector.unwrap().match_labels.unwrap();
    assert_eq!(selector["app.kubernetes.io/name"], "rayshift");
    // The config the Deployment runs with is valid.
    let config_doc = rest
        .iter()
        .find(|d| d.contains("name: rayshift-config"))
        .unwrap();
    let embedded: serde_json::Value = serde_saphyr::from_str(config_doc).unwrap();
    let yaml = embedded["data"]["rayshift.yaml"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rayshift.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rayshift"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creation, readiness changes, label changes and deletion of RayClusters steer traffic.
async fn traffic_follows_rayclusters(env: &KubeEnv) {
    env.namespace("follow").await;
    let api = env.rayclusters("follow");
    let a = stub("a", "v1", &[("echo", "/echo")]).await;
    let b = stub("b", "v1", &[("echo", "/echo")]).await;
    create_raycluster(&api, "a", "shard-0", "v1", a.addr().port(), true).await;
    // The series of clusters that left stay on /metrics for 1 s.
    let yaml = gateway_yaml(
        env,
        "follow",
        "apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n",
    )
    .replace("admin:\n", "admin:\n  removed_series_ttl: 1s\n");
    let gw = TestGateway::start(&yaml).await;
    // The initial list is in the table when the gateway is ready.
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("a"));

    // Creation: b joins shard-0 at weight 0 (a newer cluster gets traffic through a shift), and
    // takes all traffic once a is not ready.
    create_raycluster(&api, "b", "shard-0", "v1", b.addr().port(), true).await;
    eventually("b discovered", || async {
        gw.state().await.to_string().contains("\"name\":\"b\"")
    })
    .await;
    gw.wait_cluster_ready("b", true).await;
    set_status(&api, "a", a.addr().port(), false).await;
    gw.wait_cluster_ready("a", false).await;
    // Its probes still pass: `detail` names Kubernetes as the reason.
    let detail = gw.cluster_state("a").await["detail"].clone();
    assert!(
        detail
            .as_str()
            .is_some_and(|d| d.starts_with("not ready in Kubernetes")),
        "{detail}"
    );
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("b"));
    }
    set_status(&api, "a", a.addr().port(), true).await;
    gw.wait_cluster_ready("a", true).await;

    // Label change: b moves to shard-1, where echo is not placed; a serves shard-0 alone.
    let patch = serde_json::json!({"metadata": {"labels": {"rayshift.io/shard": "shard-1"}}});
    api.patch("b", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    eventually("b moved to shard-1", || async {
        let state = gw.state().await;
        state["shards"][1]["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "b")
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("a"));
    }
    // Deletion: a goes away, nothing serves echo any more (503 naming the app). A finalizer holds
    // the object after the delete (as KubeRay's GCS fault-tolerance cleanup does) while its status
    // still says ready: from the moment it is marked for deletion it takes no traffic.
    let hold = serde_json::json!({"metadata": {"finalizers": ["rayshift.test/hold"]}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(&hold))
        .await
        .unwrap();
    api.delete("a", &DeleteParams::default()).await.unwrap();
    gw.wait_cluster_ready("a", false).await;
    assert_eq!(
        get(&gw.url("/echo")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(
        api.get_opt("a").await.unwrap().is_some(),
        "the finalizer holds the RayCluster"
    );
    let release = serde_json::json!({"metadata": {"finalizers": null}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(&release))
        .await
        .unwrap();
    eventually("a removed", || async {
        find_cluster(&gw.state().await, "a").is_none()
    })
    .await;
    assert_eq!(
        get(&gw.url("/echo")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains("rayshift_kube_watch_events_total{namespace=\"follow\",event=\"delete\"}")
    );
    // A second later the series of a, and of b in the shard it left, are gone from /metrics; b's
    // in its new shard stay.
    eventually("series of clusters that left are dropped", || async {
        let metrics = get(&gw.admin("/metrics")).await.body;
        !metrics.contains("cluster=\"a\"") && !metrics.contains("shard=\"shard-0\",cluster=\"b\"")
    })
    .await;
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains("rayshift_cluster_present{shard=\"shard-1\",cluster=\"b\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rayshift_probes_total{cluster=\"b\""),
        "{metrics}"
    );
    gw.gateway.shutdown().await;
}

/// A new-revision RayCluster becoming ready starts an automatic shift that completes under load
/// with zero failed requests; the old RayCluster ends annotated drained.
async fn auto_shift_on_a_new_revision(env: &KubeEnv) {
    env.namespace("upgrade").await;
    let api = env.rayclusters("upgrade");
    let v1 = stub("v1", "v1", &[("echo", "/echo")]).await;
    let v2 = stub("v2", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "serve-v1", "shard-0", "v1", v1.addr().port(), true).await;
    let extra = "    auto_shift: {step_percent: 25, step_interval: 300ms, min_requests: 10}\napps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "upgrade", extra)).await;
    let load = Load::start(gw.url("/echo"), 6, true);
    load.wait_for_more(200).await;
    // The new revision appears not ready (pods starting), then becomes ready.
    create_raycluster(&api, "serve-v2", "shard-0", "v2", v2.addr().port(), false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.cluster_state("serve-v2").await["weight"], 0);
    set_status(&api, "serve-v2", v2.addr().port(), true).await;
    eventually("auto shift completed", || async {
        let r = get(&gw.admin("/v1/shards/shard-0/shift")).await;
        r.status == StatusCode::OK && r.body.contains("\"state\": \"completed\"")
    })
    .await;
    let report = load.stop().await;
    println!(
        "kubernetes auto shift: {} requests, {} failed",
        report.ok + report.failed,
        report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert_eq!(gw.cluster_state("serve-v2").await["weight"], 100);
    eventually("old RayCluster annotated drained", || async {
        let obj = api.get("serve-v1").await.unwrap();
        obj.metadata
            .annotations
            .unwrap_or_default()
            .get("rayshift.io/drained")
            .map(String::as_str)
            == Some("true")
    })
    .await;
    gw.gateway.shutdown().await;
}

/// The API server restarted mid-load: no client request fails (the last table keeps serving),
/// and the watcher catches up with a change made after the restart.
async fn api_server_restart_mid_load(env: &KubeEnv) {
    env.namespace("restart").await;
    let api = env.rayclusters("restart");
    let one = stub("one", "v1", &[("echo", "/echo")]).await;
    let two = stub("two", "v1", &[("late", "/late")]).await;
    create_raycluster(&api, "one", "shard-0", "v1", one.addr().port(), true).await;
    let apps = "apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n  - {name: late, route_prefix: /late, shard: shard-1}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "restart", apps)).await;
    let load = Load::start(gw.url("/echo"), 4, false);
    load.wait_for_more(200).await;
    env.restart("apiserver", true);
    load.wait_for_more(500).await;
    // A change after the restart reaches the gateway through the resumed watch.
    let api = kube::Api::namespaced_with(
        env.connect().await,
        "restart",
        &rayshift::discovery::kube::raycluster_resource(),
    );
    create_raycluster(&api, "two", "shard-1", "v1", two.addr().port(), true).await;
    eventually("watch resumed after the restart", || async {
        get(&gw.url("/late")).await.status == StatusCode::OK
    })
    .await;
    let report = load.stop().await;
    println!(
        "api server restart: {} requests, {} failed",
        report.ok + report.failed,
        report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    gw.gateway.shutdown().await;
}

/// Two gateway processes share their state through a ConfigMap: both route by the same weights;
/// the Lease holder is killed mid-shift and the other replica takes over and finishes the shift.
async fn two_replicas_share_state_and_fail_over(env: &KubeEnv) {
    env.namespace("ha").await;
    let api = env.rayclusters("ha");
    let v1 = stub("ha-v1", "v1", &[("echo", "/echo")]).await;
    let v2 = stub("ha-v2", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "ha-v1", "shard-0", "v1", v1.addr().port(), true).await;
    create_raycluster(&api, "ha-v2", "shard-0", "v2", v2.addr().port(), true).await;
    let dir = tempfile::tempdir().unwrap();
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let extra = format!(
            "    state: {{namespace: ha, configmap: rayshift-state, lease: rayshift-leader, lease_duration: 3s, identity: {name}}}\n\
             apps:\n  - {{name: echo, route_prefix: /echo, shard: shard-0}}\n"
        );
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, gateway_yaml(env, "ha", &extra)).unwrap();
        let gw = GatewayProcess::spawn(&path).unwrap();
        gw.wait_ready().await;
        replicas.push(gw);
    }
    let state_of = |gw: &GatewayProcess| {
        let url = gw.admin("/v1/state");
        async move { serde_json::from_str::<serde_json::Value>(&get(&url).await.body).unwrap() }
    };
    // Exactly one leader.
    eventually("one leader", || async {
        let a = state_of(&replicas[0]).await["leader"] == true;
        let b = state_of(&replicas[1]).await["leader"] == true;
        a != b
    })
    .await;
    // A weight change through one replica reaches the other.
    let r = put(
        &replicas[1].admin("/v1/shards/shard-0/weights"),
        r#"{"weights": {"ha-v1": 80, "ha-v2": 20}}"#,
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for gw in &replicas {
        let url = gw.admin("/v1/state");
        eventually("weights replicated", || {
            let url = url.clone();
            async move { get(&url).await.body.contains("\"weight\": 20") }
        })
        .await;
    }
    // Start a shift through the follower: it lands in the ConfigMap; the leader advances it.
    let leader = if state_of(&replicas[0]).await["leader"] == true {
        0
    } else {
        1
    };
    let follower = 1 - leader;
    let r = send(
        http::Method::POST,
        &replicas[follower].admin("/v1/shards/shard-0/shift"),
        &[],
        r#"{"to": "ha-v2", "step_percent": 10, "step_interval": "700ms", "min_requests": 5, "drain_timeout": "5s"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    // Traffic reaches both replicas, as through a Service; the leader judges the shift on its share.
    let load = Load::start(replicas[follower].url("/echo"), 4, false);
    let leader_load = Load::start(replicas[leader].url("/echo"), 4, false);
    let shift_url = replicas[follower].admin("/v1/shards/shard-0/shift");
    let mut under_way = false;
    for _ in 0..600 {
        let s: serde_json::Value =
            serde_json::from_str(&get(&shift_url).await.body).unwrap_or_default();
        if s["target_weight"].as_u64().unwrap_or(0) >= 40 {
            under_way = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !under_way {
        let shift = get(&shift_url).await.body;
        panic!(
            "shift not under way; leader stderr:\n{}\nfollower stderr:\n{}\nshift: {shift}",
            replicas[leader].stderr.lock().unwrap(),
            replicas[follower].stderr.lock().unwrap(),
        );
    }
    let before_kill = leader_load.stop().await;
    assert_eq!(before_kill.failed, 0, "{:?}", before_kill.failures);
    replicas[leader].kill();
    // The survivor takes the Lease and completes the shift from the stored step.
    eventually("survivor leads", || async {
        state_of(&replicas[follower]).await["leader"] == true
    })
    .await;
    // The survivor promotes; it cannot see the other replica's requests, so the drain lasts its
    // whole drain_timeout, and the old RayCluster is marked drained only after it.
    let drained = || async {
        api.get("ha-v1")
            .await
            .unwrap()
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("rayshift.io/drained")
    };
    eventually("shift promoted by the survivor", || {
        let url = shift_url.clone();
        async move { get(&url).await.body.contains("\"state\": \"draining\"") }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        get(&shift_url)
            .await
            .body
            .contains("\"state\": \"draining\""),
        "the drain ended before drain_timeout"
    );
    assert!(!drained().await, "marked drained before drain_timeout");
    eventually("shift completed by the survivor", || {
        let url = shift_url.clone();
        async move { get(&url).await.body.contains("\"state\": \"completed\"") }
    })
    .await;
    eventually("old RayCluster marked drained", drained).await;
    let report = load.stop().await;
    println!(
        "failover: {} requests through the survivor, {} failed",
        report.ok + report.failed,
        report.failed
    );
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    let cm: k8s_openapi::api::core::v1::ConfigMap = kube::Api::namespaced(env.client.clone(), "ha")
        .get("rayshift-state")
        .await
        .unwrap();
    assert!(cm.data.unwrap()["state.json"].contains("\"phase\": \"completed\""));
}

/// With `delete_drained: true`, a drained RayCluster is annotated and then deleted.
async fn drained_raycluster_is_deleted_when_configured(env: &KubeEnv) {
    env.namespace("retire").await;
    let api = env.rayclusters("retire");
    let old = stub("old", "v1", &[("echo", "/echo")]).await;
    let new = stub("new", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "old", "shard-0", "v1", old.addr().port(), true).await;
    create_raycluster(&api, "new", "shard-0", "v2", new.addr().port(), true).await;
    let extra =
        "    delete_drained: true\napps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "retire", extra)).await;
    let r = send(
        http::Method::POST,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[],
        r#"{"to": "new", "step_interval": "1h"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let r = send(
        http::Method::POST,
        &gw.admin("/v1/shards/shard-0/shift/promote"),
        &[],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    eventually("drained RayCluster deleted", || async {
        api.get_opt("old").await.unwrap().is_none()
    })
    .await;
    // The gateway follows the deletion; traffic is on the new cluster.
    eventually("old cluster gone from the table", || async {
        find_cluster(&gw.state().await, "old").is_none()
    })
    .await;
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("new"));
    assert!(api.get_opt("new").await.unwrap().is_some());

    // A new RayCluster under the drained one's name (a later revision) is not the drained cluster,
    // also for a gateway that restarts and so remembers nothing of what it deleted.
    let yaml = gateway_yaml(env, "retire", extra);
    let TestGateway { gateway, dir } = gw;
    gateway.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1100)).await; // a later creation second
    create_raycluster(&api, "old", "shard-0", "v3", old.addr().port(), true).await;
    let gw = TestGateway::start_in(&yaml, dir).await;
    gw.wait_cluster_ready("old", true).await;
    // The annotator looks every second.
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let again = api
        .get_opt("old")
        .await
        .unwrap()
        .expect("the new RayCluster is kept");
    assert!(
        !again
            .metadata
            .annotations
            .unwrap_or_default()
            .contains_key("rayshift.io/drained"),
        "the new RayCluster was annotated drained"
    );
    // Nor is it draining in the gateway's eyes: no drained flag, and it is the shard's fallback
    // (weight 0, ready) when the cluster holding the traffic stops being ready.
    assert_eq!(
        gw.cluster_state("old").await["drain"],
        serde_json::Value::Null
    );
    assert_eq!(
        metric(
            &gw,
            r#"rayshift_cluster_drained{shard="shard-0",cluster="old"}"#
        )
        .await,
        Some(0.0)
    );
    set_status(&api, "new", new.addr().port(), false).await;
    gw.wait_cluster_ready("new", false).await;
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("old"));
    gw.gateway.shutdown().await;
}

/// With the state in a ConfigMap, an API server that stops answering (frozen: connections stay
/// open, nothing comes back) fails a weight change within the API timeout instead of hanging the
/// control loop; traffic flows meanwhile, and once the server is back changes succeed again.
async fn a_hung_api_server_fails_state_writes_in_bounded_time(env: &KubeEnv) {
    env.namespace("hung").await;
    let api = env.rayclusters("hung");
    let v1 = stub("hung-v1", "v1", &[("echo", "/echo")]).await;
    let v2 = stub("hung-v2", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "hung-v1", "shard-0", "v1", v1.addr().port(), true).await;
    create_raycluster(&api, "hung-v2", "shard-0", "v2", v2.addr().port(), true).await;
    let extra = "    state: {namespace: hung, configmap: rayshift-state, lease: rayshift-leader, identity: solo}\n\
                 apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "hung", extra)).await;
    gw.wait_cluster_ready("hung-v2", true).await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let r = put(&url, r#"{"weights": {"hung-v1": 50, "hung-v2": 50}}"#, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    env.freeze_apiserver(true);
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        put(&url, r#"{"weights": {"hung-v1": 0, "hung-v2": 100}}"#, None),
    )
    .await
    .expect("the change is answered while the API server hangs");
    let waited = started.elapsed();
    assert!(r.status.is_server_error(), "{} {}", r.status, r.body);
    assert!(r.body.contains("did not answer"), "{}", r.body);
    assert!(waited >= Duration::from_secs(5), "{waited:?}");
    // Traffic kept flowing on the last table meanwhile.
    assert_eq!(get(&gw.url("/echo")).await.status, StatusCode::OK);
    assert_eq!(gw.cluster_state("hung-v1").await["weight"], 50);
    env.freeze_apiserver(false);

    eventually("changes succeed once the API server answers", || async {
        put(&url, r#"{"weights": {"hung-v1": 0, "hung-v2": 100}}"#, None)
            .await
            .status
            == StatusCode::OK
    })
    .await;
    assert_eq!(gw.cluster_state("hung-v2").await["weight"], 100);
    gw.gateway.shutdown().await;
}

/// With the state in a ConfigMap and the API server frozen in the middle of a shift, a target
/// that goes bad is still rolled back by both replicas: failed checks and the rollback apply
/// before their writes (which hang, then fail); the leader judges while its first failed check's
/// write hangs, and so rolls back within seconds; the follower, stranded once it heard nothing
/// for two thirds of the Lease, judges on its own traffic; traffic is back on the old clusters
/// while nothing can be written. When the server answers again and neither
/// replica leads (an operator holds the Lease), the rollback stays over the shared state that
/// still runs the shift; when one leads, the ConfigMap gets the rolled-back shift. A cluster that
/// goes down while a write hangs leaves the table at once (the control loop applies probe
/// reports while a write hangs).
async fn a_shift_rolls_back_while_the_api_server_hangs(env: &KubeEnv) {
    env.namespace("hungshift").await;
    let api = env.rayclusters("hungshift");
    let old_a = stub("hs-old-a", "v1", &[("echo", "/echo")]).await;
    let old_b = stub("hs-old-b", "v1", &[("echo", "/echo")]).await;
    let new = stub("hs-new", "v2", &[("echo", "/echo")]).await;
    for (name, rev, s) in [
        ("hs-old-a", "v1", &old_a),
        ("hs-old-b", "v1", &old_b),
        ("hs-new", "v2", &new),
    ] {
        create_raycluster(&api, name, "shard-0", rev, s.addr().port(), true).await;
    }
    // A short Lease: the replicas are stranded (no answer from the API server) a few seconds
    // into the freeze, and judge their shifts on their own from then on.
    let extra = "    state: {namespace: hungshift, configmap: rayshift-state, lease: rayshift-leader, lease_duration: 6s, identity: solo}\n\
                 apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "hungshift", extra)).await;
    for name in ["hs-old-a", "hs-old-b", "hs-new"] {
        gw.wait_cluster_ready(name, true).await;
    }
    eventually("the first replica leads", || async {
        gw.state().await["leader"] == true
    })
    .await;
    // A second replica, following: the leader's rollback cannot reach it while the API server
    // hangs, so it judges the shift on its own traffic.
    let follower = TestGateway::start(&gateway_yaml(
        env,
        "hungshift",
        &extra.replace("identity: solo", "identity: solo-b"),
    ))
    .await;
    for name in ["hs-old-a", "hs-old-b", "hs-new"] {
        follower.wait_cluster_ready(name, true).await;
    }
    let load = Load::start(gw.url("/echo"), 6, false);
    let follower_load = Load::start(follower.url("/echo"), 6, false);
    load.wait_for_more(100).await;
    follower_load.wait_for_more(100).await;
    let r = send(
        Method::POST,
        &gw.admin("/v1/shards/shard-0/shift"),
        &[("content-type", "application/json")],
        r#"{"to": "hs-new", "step_percent": 20, "step_interval": "1s", "min_requests": 20, "max_error_rate": 0.05, "failure_threshold": 2}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    for replica in [&gw, &follower] {
        eventually("the shift's first step", || async {
            replica.cluster_state("hs-new").await["weight"].as_u64() >= Some(20)
        })
        .await;
    }
    assert_eq!(follower.state().await["leader"], false);

    // An operator holds the Lease from just before the freeze (10 min): once the API server answers
    // again neither replica leads, so neither can write its rollback, and each reads the shared
    // state again, where the shift still runs.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), "hungshift");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    );
    let hold = serde_json::json!({"spec": {
        "holderIdentity": "operator-hold", "leaseDurationSeconds": 600, "renewTime": now,
    }});
    leases
        .patch(
            "rayshift-leader",
            &PatchParams::default(),
            &Patch::Merge(&hold),
        )
        .await
        .unwrap();
    env.freeze_apiserver(true);
    new.set_error_rate(0.5);
    let frozen = std::time::Instant::now();
    let deadline = frozen + Duration::from_secs(60);
    let replicas = [("the former leader", &gw), ("the follower", &follower)];
    let mut rolled_back = [None, None];
    while rolled_back.iter().any(Option::is_none) {
        for (i, (who, replica)) in replicas.iter().enumerate() {
            let shift: serde_json::Value =
                serde_json::from_str(&get(&replica.admin("/v1/shards/shard-0/shift")).await.body)
                    .unwrap();
            if rolled_back[i].is_some() {
                continue;
            }
            if shift["state"] == "rolled_back" {
                let after = frozen.elapsed();
                println!("{who} rolled back {after:?} after the API server froze");
                rolled_back[i] = Some((shift, after));
            } else {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{who}: no rollback in 60 s with the API server frozen; last: {shift}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for ((who, replica), rolled_back) in replicas.into_iter().zip(rolled_back) {
        let (shift, after) = rolled_back.expect("rolled back");
        let standing = replica.state().await;
        assert_eq!(
            (&standing["leader"], &standing["stranded"]),
            (&serde_json::json!(false), &serde_json::json!(true)),
            "{who}: stranded once both rolled back"
        );
        if who == "the former leader" {
            // Its first failed check's write hangs (up to 10 s): the shift is judged meanwhile,
            // so the second failed check rolls back without waiting for that write.
            assert!(after < Duration::from_secs(8), "{who}: {after:?}");
        }
        assert!(
            shift["reason"].as_str().unwrap().contains("error rate"),
            "{who}: {shift}"
        );
        assert_eq!(replica.cluster_state("hs-new").await["weight"], 0, "{who}");
    }
    // Requests already on their way to hs-new when the tables changed are not counted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    new.reset_requests();
    for _ in 0..20 {
        assert_ne!(get(&gw.url("/echo")).await.cluster(), Some("hs-new"));
        assert_ne!(get(&follower.url("/echo")).await.cluster(), Some("hs-new"));
    }
    assert_eq!(new.requests(), 0, "requests reached the rolled-back target");

    env.freeze_apiserver(false);

    // Both hear the API server again and follow the operator's hold. The writes that timed out
    // may land now, older states among them, and each replica reads the shared state again, where
    // nobody has written the rollback: it stays on both.
    new.reset_requests();
    eventually("both replicas follow the hold", || async {
        let (a, b) = (gw.state().await, follower.state().await);
        [a, b]
            .iter()
            .all(|s| s["stranded"] == false && s["leader"] == false)
    })
    .await;
    let shared_shift = || async {
        let cm: k8s_openapi::api::core::v1::ConfigMap =
            kube::Api::namespaced(env.client.clone(), "hungshift")
                .get("rayshift-state")
                .await
                .unwrap();
        let stored: serde_json::Value =
            serde_json::from_str(&cm.data.unwrap()["state.json"]).unwrap();
        stored["shards"]["shard-0"].clone()
    };
    let back = std::time::Instant::now();
    while back.elapsed() < Duration::from_secs(3) {
        assert_eq!(gw.cluster_state("hs-new").await["weight"], 0);
        assert_eq!(follower.cluster_state("hs-new").await["weight"], 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(new.requests(), 0, "requests reached the rolled-back target");
    let shared = shared_shift().await;
    assert_eq!(
        (&shared["shift"]["phase"], &shared["shift"]["step"]),
        (&serde_json::json!("progressing"), &serde_json::json!(1)),
        "the shared state still runs the shift: {shared}"
    );

    // The hold ends: a replica takes the Lease and writes its rollback.
    leases
        .delete("rayshift-leader", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the ConfigMap holds the rolled-back shift", || async {
        let shared = shared_shift().await;
        shared["shift"]["phase"] == "rolled_back" && shared["weights"]["hs-new"] == 0
    })
    .await;

    eventually("no replica stranded, one leading", || async {
        let (a, b) = (gw.state().await, follower.state().await);
        a["stranded"] == false
            && b["stranded"] == false
            && (a["leader"] == true) != (b["leader"] == true)
    })
    .await;
    let report = follower_load.stop().await;
    println!(
        "through the follower: {} requests, {} failed",
        report.ok + report.failed,
        report.failed
    );
    follower.gateway.shutdown().await;

    // An operator's change while the API server hangs: its write waits up to 10 s, and a cluster
    // that goes down meanwhile leaves the table within a few probe rounds, not after the write.
    eventually("leading again", || async {
        let standing = gw.state().await;
        standing["leader"] == true && standing["stranded"] == false
    })
    .await;
    env.freeze_apiserver(true);
    let weights = gw.admin("/v1/shards/shard-0/weights");
    let change = tokio::spawn(async move {
        put(
            &weights,
            r#"{"weights": {"hs-old-a": 100, "hs-old-b": 0, "hs-new": 0}}"#,
            None,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = std::time::Instant::now();
    old_b.kill();
    gw.wait_cluster_ready("hs-old-b", false).await;
    let ejected = killed.elapsed();
    println!("a killed cluster left the table {ejected:?} after it went down, a write hanging");
    assert!(ejected < Duration::from_secs(4), "{ejected:?}");
    assert!(!change.is_finished(), "the write was still in flight");
    let answer = change.await.unwrap();
    assert!(
        answer.status.is_server_error(),
        "{} {}",
        answer.status,
        answer.body
    );
    env.freeze_apiserver(false);

    let report = load.stop().await;
    println!(
        "rollback with the API server frozen: {} requests, {} failed",
        report.ok + report.failed,
        report.failed
    );
    gw.gateway.shutdown().await;
}

/// Weight changes back to back through one replica with shared state (four clients at once, so
/// the replica writes the ConfigMap one version right after another): every change is answered
/// 200, and the replica ends on the state the ConfigMap holds. (The watch event of a replica's own
/// write can arrive after its next write; taken for another replica's, it would step the replica
/// back to the older state, and its next write would conflict.)
async fn back_to_back_writes_keep_the_newest_shared_state(env: &KubeEnv) {
    env.namespace("race").await;
    let api = env.rayclusters("race");
    let v1 = stub("race-v1", "v1", &[("echo", "/echo")]).await;
    let v2 = stub("race-v2", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "race-v1", "shard-0", "v1", v1.addr().port(), true).await;
    create_raycluster(&api, "race-v2", "shard-0", "v2", v2.addr().port(), true).await;
    let extra = "    state: {namespace: race, configmap: rayshift-state, lease: rayshift-leader, identity: solo}\n\
                 apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "race", extra)).await;
    gw.wait_cluster_ready("race-v2", true).await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let refused =
        change_weights_at_once(vec![url.clone(), url.clone(), url.clone(), url], 40).await;
    assert!(refused.is_empty(), "changes refused: {refused:#?}");
    // Late watch events have had time to arrive; none may have stepped the replica back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas_hold_the_configmaps_state(env, &[&gw]).await;

    // A second replica writing at the same time: conflicts (409) are the clients' to retry, but
    // each replica ends on the state the ConfigMap holds (a replica that read a version on a
    // conflict and then wrote must not step back to an event of the version it read).
    let extra_b = "    state: {namespace: race, configmap: rayshift-state, lease: rayshift-leader, identity: solo-b}\n\
                   apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw_b = TestGateway::start(&gateway_yaml(env, "race", extra_b)).await;
    gw_b.wait_cluster_ready("race-v2", true).await;
    let (a, b) = (
        gw.admin("/v1/shards/shard-0/weights"),
        gw_b.admin("/v1/shards/shard-0/weights"),
    );
    let refused = change_weights_at_once(vec![a.clone(), a, b.clone(), b], 30).await;
    assert!(
        refused.iter().all(|r| r.contains("409 Conflict")),
        "changes refused otherwise than by a conflict: {refused:#?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    replicas_hold_the_configmaps_state(env, &[&gw, &gw_b]).await;
    gw_b.gateway.shutdown().await;
    gw.gateway.shutdown().await;
}

/// A state ConfigMap created beforehand (by Helm, say) keeps its labels, annotations and other
/// keys when the gateway writes its state into it; deleted while the gateway runs, it is created
/// again by the next change (the first attempt may be answered 409 while the gateway reloads).
async fn a_state_configmap_keeps_what_others_put_in_it_and_comes_back(env: &KubeEnv) {
    use k8s_openapi::api::core::v1::ConfigMap;
    env.namespace("cmx").await;
    let api = env.rayclusters("cmx");
    let v1 = stub("cmx-v1", "v1", &[("echo", "/echo")]).await;
    let v2 = stub("cmx-v2", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "cmx-v1", "shard-0", "v1", v1.addr().port(), true).await;
    create_raycluster(&api, "cmx-v2", "shard-0", "v2", v2.addr().port(), true).await;
    let cms: kube::Api<ConfigMap> = kube::Api::namespaced(env.client.clone(), "cmx");
    let foreign: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": "rayshift-state",
            "labels": {"app.kubernetes.io/managed-by": "Helm"},
            "annotations": {"meta.helm.sh/release-name": "gw"}
        },
        "data": {"notes": "kept"}
    }))
    .unwrap();
    cms.create(&Default::default(), &foreign).await.unwrap();
    let extra = "    state: {namespace: cmx, configmap: rayshift-state, lease: rayshift-leader, identity: solo}\n\
                 apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n";
    let gw = TestGateway::start(&gateway_yaml(env, "cmx", extra)).await;
    gw.wait_cluster_ready("cmx-v2", true).await;
    let url = gw.admin("/v1/shards/shard-0/weights");
    let r = put(&url, r#"{"weights": {"cmx-v1": 30, "cmx-v2": 70}}"#, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let cm = cms.get("rayshift-state").await.unwrap();
    let labels = cm.metadata.labels.clone().unwrap_or_default();
    let annotations = cm.metadata.annotations.clone().unwrap_or_default();
    let data = cm.data.clone().unwrap_or_default();
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm", "{cm:?}");
    assert_eq!(annotations["meta.helm.sh/release-name"], "gw", "{cm:?}");
    assert_eq!(data["notes"], "kept", "{cm:?}");
    assert!(data["state.json"].contains("\"cmx-v2\": 70"), "{cm:?}");

    cms.delete("rayshift-state", &DeleteParams::default())
        .await
        .unwrap();
    eventually("a change creates the state ConfigMap again", || async {
        put(&url, r#"{"weights": {"cmx-v1": 10, "cmx-v2": 90}}"#, None)
            .await
            .status
            == StatusCode::OK
    })
    .await;
    let cm = cms.get("rayshift-state").await.unwrap();
    assert!(
        cm.data.unwrap_or_default()["state.json"].contains("\"cmx-v2\": 90"),
        "state not written again"
    );
    assert_eq!(gw.cluster_state("cmx-v2").await["weight"], 90);
    gw.gateway.shutdown().await;
}

/// One client per URL, each setting `per_client` different splits of race-v1 and race-v2 one after
/// another, all at once; the changes not answered 200, as `"<weight>: <status> <body>"`.
async fn change_weights_at_once(urls: Vec<String>, per_client: u32) -> Vec<String> {
    let clients: Vec<_> = urls
        .into_iter()
        .zip(0u32..)
        .map(|(url, c)| {
            tokio::spawn(async move {
                let mut refused = Vec::new();
                for i in 0..per_client {
                    let w = (c * per_client + i) % 101;
                    let body = format!(
                        r#"{{"weights": {{"race-v1": {}, "race-v2": {w}}}}}"#,
                        100 - w
                    );
                    let r = put(&url, &body, None).await;
                    if r.status != StatusCode::OK {
                        refused.push(format!("{w}: {} {}", r.status, r.body.trim()));
                    }
                }
                refused
            })
        })
        .collect();
    let mut refused = Vec::new();
    for client in clients {
        refused.extend(client.await.unwrap());
    }
    refused
}

/// Each replica routes with race-v2 at the weight the `race` ConfigMap holds.
async fn replicas_hold_the_configmaps_state(env: &KubeEnv, replicas: &[&TestGateway]) {
    let cm: k8s_openapi::api::core::v1::ConfigMap =
        kube::Api::namespaced(env.client.clone(), "race")
            .get("rayshift-state")
            .await
            .unwrap();
    let stored: serde_json::Value = serde_json::from_str(&cm.data.unwrap()["state.json"]).unwrap();
    for (i, replica) in replicas.iter().enumerate() {
        let weight = replica.cluster_state("race-v2").await["weight"].clone();
        assert!(
            stored
                .to_string()
                .contains(&format!("\"race-v2\":{weight}")),
            "replica {i} routes with race-v2 at {weight}; the ConfigMap holds {stored}"
        );
    }
}

/// An API server slow to list (here: frozen at the gateway's start for longer than the first
/// probe round) does not make `/ready` true before the listed clusters had their first probe:
/// the first requests after readiness are served, not answered 503.
async fn ready_waits_for_the_first_probes_of_a_late_list(env: &KubeEnv) {
    env.namespace("late").await;
    let api = env.rayclusters("late");
    let slow = stub("late-a", "v1", &[("echo", "/echo")]).await;
    slow.set_probe_latency(Duration::from_millis(300));
    create_raycluster(&api, "late-a", "shard-0", "v1", slow.addr().port(), true).await;
    let yaml = gateway_yaml(
        env,
        "late",
        "apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n",
    );
    env.freeze_apiserver(true);
    let starting = tokio::spawn(async move { TestGateway::start(&yaml).await });
    // Longer than the first probe round (2 x probe.timeout + 200 ms = 1.2 s).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    env.freeze_apiserver(false);
    let gw = starting.await.expect("gateway started");
    let r = get(&gw.url("/echo")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.cluster(), Some("late-a"));
    gw.gateway.shutdown().await;
}

/// Until the first list of RayClusters has arrived the gateway does not know every cluster of its
/// shards: a weight change is refused with 503 (it would set the unlisted clusters to 0), and once
/// the list is in, the same change is made.
async fn changes_wait_for_the_first_list(env: &KubeEnv) {
    env.namespace("early").await;
    let api = env.rayclusters("early");
    let a = stub("early-a", "v1", &[("echo", "/echo")]).await;
    let b = stub("early-b", "v2", &[("echo", "/echo")]).await;
    create_raycluster(&api, "early-a", "shard-0", "v1", a.addr().port(), true).await;
    create_raycluster(&api, "early-b", "shard-0", "v2", b.addr().port(), true).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    let yaml = gateway_yaml(
        env,
        "early",
        "apps:\n  - {name: echo, route_prefix: /echo, shard: shard-0}\n",
    );
    std::fs::write(&config, yaml).unwrap();
    env.freeze_apiserver(true);
    let spawned = GatewayProcess::spawn(&config);
    let change = r#"{"weights": {"early-a": 40, "early-b": 60}}"#;
    let refused = match &spawned {
        Ok(gw) => Some(put(&gw.admin("/v1/shards/shard-0/weights"), change, None).await),
        Err(_) => None,
    };
    env.freeze_apiserver(false);
    let mut gw = spawned.expect("the gateway listens before its first list");
    let refused = refused.unwrap();
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.body
    );
    assert!(
        refused.body.contains("first list of RayClusters"),
        "{}",
        refused.body
    );
    gw.wait_ready().await;
    let r = put(&gw.admin("/v1/shards/shard-0/weights"), change, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(gw.terminate().success());
}

/// A RayCluster with the name of a static cluster neither replaces it nor, when it turns
/// unroutable or is deleted, removes it: discovery only removes what it added.
async fn a_raycluster_never_removes_a_static_cluster(env: &KubeEnv) {
    env.namespace("static").await;
    let api = env.rayclusters("static");
    let fixed = stub("fixed", "v1", &[("echo", "/echo")]).await;
    let imposter = stub("imposter", "v1", &[("echo", "/echo")]).await;
    let extra = format!(
        "clusters:\n  - name: fixed\n    shard: shard-0\n    revision: v1\n    serve_url: {}\n\
         apps:\n  - {{name: echo, route_prefix: /echo, shard: shard-0}}\n",
        fixed.url()
    );
    let gw = TestGateway::start(&gateway_yaml(env, "static", &extra)).await;
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("fixed"));
    let watched = |kind: &'static str| {
        let gw = &gw;
        async move {
            get(&gw.admin("/metrics")).await.body.lines().any(|l| {
                l.starts_with(&format!(
                    "rayshift_kube_watch_events_total{{namespace=\"static\",event=\"{kind}\"}}"
                ))
            })
        }
    };
    create_raycluster(&api, "fixed", "shard-0", "v1", imposter.addr().port(), true).await;
    eventually("the RayCluster seen", || watched("apply")).await;
    // Unroutable while still selected (an empty shard label), then deleted: each is a removal
    // from discovery.
    let patch = serde_json::json!({"metadata": {"labels": {"rayshift.io/shard": ""}}});
    api.patch("fixed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    api.delete("fixed", &DeleteParams::default()).await.unwrap();
    // Events of a namespace are applied in order: once a later object shows up, the removals
    // have been applied.
    let marker = stub("marker", "v1", &[("other", "/other")]).await;
    create_raycluster(&api, "marker", "shard-1", "v1", marker.addr().port(), true).await;
    eventually("a later RayCluster discovered", || async {
        find_cluster(&gw.state().await, "marker").is_some()
    })
    .await;
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("fixed"));
    }
    assert_eq!(imposter.requests(), 0);
    assert_eq!(gw.cluster_state("fixed").await["ready"], true);
    gw.gateway.shutdown().await;
}
