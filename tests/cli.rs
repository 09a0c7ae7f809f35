//! The `rayshift` binary: `check`, and `run` refusing bad input before serving; state across restarts.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use http::StatusCode;

fn rayshift(args: &[&str]) -> std::process::Output {
    rayshift_with_env(args, &[])
}

/// [`rayshift`] with more environment variables.
fn rayshift_with_env(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rayshift"))
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run rayshift")
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Every example config in `config/` passes `rayshift check`.
#[test]
fn example_configs_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let out = rayshift(&["check", "--config", path.to_str().unwrap()]);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(": ok ("));
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} example configs");
}

/// `check` prints every problem with its field path and exits 1; `run` refuses the same file.
#[test]
fn check_reports_every_problem_and_run_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.yaml",
        "listen: 127.0.0.1:0\nadmin:\n  listen: nowhere\nshards: [shard-0]\nsplit_key: sticky\nclusters:\n  - name: blue\n    shard: shard-0\n    revision: v1\n    serve_url: http://127.0.0.1:1\n  - name: green\n    shard: shard-9\n    revision: v2\n    serve_url: foo\n",
    );
    let out = rayshift(&["check", "--config", &bad]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "admin.listen:",
        "split_key: expected none, header:<name>, cookie:<name> or client_ip",
        "clusters[1].shard: unknown shard \"shard-9\"",
        "clusters[1].serve_url: relative URL without a base",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in:\n{stderr}");
    }
    let out = rayshift(&["run", "--config", &bad]);
    assert_eq!(out.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid config, not starting"));

    let out = rayshift(&["check", "--config", "/nonexistent/rayshift.yaml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/rayshift.yaml"));
}

fn gateway_config(dir: &Path, blue: &ServeStub, green: &ServeStub) -> std::path::PathBuf {
    let yaml = config_yaml(
        &["shard-0"],
        &[
            cluster(blue, "shard-0", "v1", Some(100)),
            cluster(green, "shard-0", "v2", Some(0)),
        ],
        "",
    );
    let path = dir.join("rayshift.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

/// PUTs blue/green weights to a gateway's weights URL and expects 200.
async fn set_weights(url: &str, blue: u32, green: u32) {
    let body = format!(r#"{{"weights": {{"blue": {blue}, "green": {green}}}}}"#);
    let r = put(url, &body, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
}

/// Weights set through the admin API survive `kill -9` and a restart; a graceful stop leaves them in
/// the state file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_survive_kill_and_restart() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &blue, &green);

    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("blue"));
    set_weights(&gw.admin("/v1/shards/shard-0/weights"), 0, 100).await;
    gw.kill(); // SIGKILL: no chance to flush anything

    let gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    for _ in 0..10 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
    let state: serde_json::Value =
        serde_json::from_str(&get(&gw.admin("/v1/state")).await.body).unwrap();
    assert_eq!(state["shards"][0]["clusters"][1]["name"], "green");
    assert_eq!(state["shards"][0]["clusters"][1]["weight"], 100);

    // The change came back from the journal and was folded into the state file at start; a
    // graceful stop folds again, so the state file alone is current while the gateway is down.
    let snapshot = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.path().join("state.json")).unwrap()).unwrap()
    };
    assert_eq!(snapshot()["shards"]["shard-0"]["weights"]["green"], 100);
    let mut gw = gw;
    set_weights(&gw.admin("/v1/shards/shard-0/weights"), 40, 60).await;
    assert!(gw.terminate().success());
    let file = snapshot();
    assert_eq!(file["shards"]["shard-0"]["weights"]["green"], 60);
    assert_eq!(file["shards"]["shard-0"]["weights"]["blue"], 40);
}

/// The state journal's records apply only over the state file they were made after: a state file
/// restored from a backup wins over the records a crash left, and records whose state file is
/// missing stop the start (exit 1, naming what to do) instead of being dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_state_file_wins_over_the_journal_of_another() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &blue, &green);
    let state = dir.path().join("state.json");
    let weights = || -> serde_json::Value {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
        file["shards"]["shard-0"]["weights"].clone()
    };
    let run_and_set = |blue: u32, green: u32| {
        let config = config.clone();
        async move {
            let gw = GatewayProcess::spawn(&config).unwrap();
            gw.wait_ready().await;
            set_weights(&gw.admin("/v1/shards/shard-0/weights"), blue, green).await;
            gw
        }
    };
    assert!(run_and_set(0, 100).await.terminate().success());
    let backup = std::fs::read(&state).unwrap();
    assert!(run_and_set(40, 60).await.terminate().success());
    run_and_set(70, 30).await.kill(); // the journal holds 70/30, after the 40/60 snapshot
    std::fs::write(&state, &backup).unwrap();

    let mut gw = GatewayProcess::spawn(&config).unwrap();
    gw.wait_ready().await;
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
    assert!(gw.terminate().success());
    assert_eq!(
        weights()["green"],
        100,
        "the journal overrode the restored file"
    );

    run_and_set(50, 50).await.kill();
    std::fs::remove_file(&state).unwrap();
    let out = rayshift(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("state.json.journal") && stderr.contains("restore the state file"),
        "{stderr}"
    );
    assert!(!state.exists());
}

/// A corrupt state file or one of an unknown version stops the start with a clear error; the file
/// is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_state_file_refuses_to_start() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &blue, &green);
    let state = dir.path().join("state.json");
    for (content, needle) in [
        ("{\"version\": 1, \"shards\": {", "is corrupt"),
        ("{\"version\": 99, \"shards\": {}}", "has version 99"),
        ("", "is corrupt"),
    ] {
        std::fs::write(&state, content).unwrap();
        let out = rayshift(&["run", "--config", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "started with state {content:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{needle:?} not in {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
        assert_eq!(
            std::fs::read_to_string(&state).unwrap(),
            content,
            "state file was touched"
        );
    }
}

/// A second gateway pointed at a state file another gateway uses refuses to start (exit 1, a clear
/// message) and changes nothing; the first one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_gateway_on_the_same_state_file_refuses_to_start() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &blue, &green);
    let first = GatewayProcess::spawn(&config).unwrap();
    first.wait_ready().await;
    set_weights(&first.admin("/v1/shards/shard-0/weights"), 30, 70).await;

    let mut second = Command::new(env!("CARGO_BIN_EXE_rayshift"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while second.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = second.kill();
            panic!("the second gateway started on a state file in use");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is in use by another rayshift process"),
        "{stderr}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&get(&first.admin("/v1/state")).await.body).unwrap();
    assert_eq!(state["shards"][0]["clusters"][1]["weight"], 70);
    assert_eq!(get(&first.url("/echo")).await.status, StatusCode::OK);
}

/// A listener address already in use is a clear start error, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_port_is_a_start_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = gateway_config(dir.path(), &blue, &green);
    let yaml = std::fs::read_to_string(&config).unwrap().replacen(
        "listen: 127.0.0.1:0",
        &format!("listen: 127.0.0.1:{port}"),
        1,
    );
    std::fs::write(&config, yaml).unwrap();
    let out = rayshift(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("binding proxy listener on 127.0.0.1:{port}")),
        "{stderr}"
    );
}

/// A bad `RAYSHIFT_RUNTIME` or `RAYSHIFT_WORKER_THREADS` stops `run` before it binds anything,
/// naming the variable and what it takes.
#[test]
fn bad_runtime_variables_are_start_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "rayshift.yaml",
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [s]\n",
    );
    for (var, value, expected) in [
        (
            "RAYSHIFT_RUNTIME",
            "stealing",
            "RAYSHIFT_RUNTIME=\"stealing\": expected \"per-core\" or \"work-stealing\"",
        ),
        (
            "RAYSHIFT_WORKER_THREADS",
            "0",
            "RAYSHIFT_WORKER_THREADS=\"0\": expected an integer >= 1",
        ),
    ] {
        let out = rayshift_with_env(&["run", "--config", &config], &[(var, value)]);
        assert_eq!(out.status.code(), Some(1), "{var}={value}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{var}={value}: {stderr}");
        assert!(!dir.path().join("state.json").exists());
    }
}
