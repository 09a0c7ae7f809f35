//! The `rayshift` binary as an admin API client (`status`, `shift`, `weights`) against a real
//! gateway with real stub clusters, and `demo --shift`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// What a finished `rayshift` run printed.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs the binary with `args` (and extra environment), bounded by [`WAIT`] plus the watch limit.
async fn rayshift_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rayshift"));
    cmd.args(args)
        .env("RUST_LOG", "warn")
        .env_remove("RAYSHIFT_ADMIN")
        .env_remove("RAYSHIFT_TOKEN_FILE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT + Duration::from_secs(15), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("rayshift {args:?} did not finish"))
        .expect("run rayshift");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn rayshift(args: &[&str]) -> Run {
    rayshift_env(args, &[]).await
}

/// `rayshift <args> --admin <gateway's admin URL>`.
async fn client(gw: &TestGateway, args: &[&str]) -> Run {
    let admin = gw.admin("");
    let mut all = args.to_vec();
    all.extend(["--admin", admin.as_str()]);
    rayshift(&all).await
}

/// Blue (v1, 100) and green (v2, 0) serving `echo` in shard-0; `admin_extra` goes under `admin:`.
async fn blue_green(
    admin_extra: &str,
    dir: tempfile::TempDir,
) -> (ServeStub, ServeStub, TestGateway) {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let green = stub("green", "v2", &[("echo", "/echo")]).await;
    let yaml = blue_green_yaml(&blue, &green, admin_extra);
    let gw = TestGateway::start_in(&yaml, dir).await;
    (blue, green, gw)
}

async fn gateway() -> (ServeStub, ServeStub, TestGateway) {
    blue_green("", tempfile::tempdir().unwrap()).await
}

async fn weights(gw: &TestGateway) -> (Value, Value) {
    (
        gw.cluster_state("blue").await["weight"].clone(),
        gw.cluster_state("green").await["weight"].clone(),
    )
}

async fn shard_shift(gw: &TestGateway) -> Value {
    gw.state().await["shards"][0]["shift"].clone()
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `status` shows each cluster's revision, weight and readiness; `--json` is the raw state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_clusters_and_weights() {
    let (_blue, _green, gw) = gateway().await;
    gw.wait_cluster_ready("green", true).await;
    let run = client(&gw, &["status"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines[0], "shard-0  idle", "{run}");
    assert!(
        lines[1].split_whitespace().eq([
            "CLUSTER",
            "REVISION",
            "WEIGHT",
            "READY",
            "DRAIN",
            "IN-FLIGHT"
        ]),
        "{run}"
    );
    let row = |name: &str| -> Vec<String> {
        lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}:\n{run}"))
            .split_whitespace()
            .map(String::from)
            .collect()
    };
    assert_eq!(row("blue"), ["blue", "v1", "100", "yes", "-", "0"]);
    assert_eq!(row("green"), ["green", "v2", "0", "yes", "-", "0"]);
    assert!(!run.stdout.contains("rollout"), "{run}");

    let run = client(&gw, &["status", "--json"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    let state: Value = serde_json::from_str(&run.stdout).expect("status --json is JSON");
    assert_eq!(state["shards"][0]["name"], "shard-0");
    assert_eq!(state["shards"][0]["clusters"][0]["weight"], 100);

    // RAYSHIFT_ADMIN stands in for --admin.
    let admin = gw.admin("");
    let run = rayshift_env(&["status"], &[("RAYSHIFT_ADMIN", admin.as_str())]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.starts_with("shard-0  idle\n"), "{run}");
}

/// `weights set` changes the weights the gateway routes by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_changes_weights() {
    let (_blue, _green, gw) = gateway().await;
    let run = client(
        &gw,
        &[
            "weights", "set", "--shard", "shard-0", "blue=70", "green=30",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(run.stdout, "shard-0: weights blue=70 green=30\n");
    assert_eq!(weights(&gw).await, (70.into(), 30.into()));

    // An unnamed cluster gets 0.
    let run = client(&gw, &["weights", "set", "--shard", "shard-0", "green=100"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(weights(&gw).await, (0.into(), 100.into()));
    for _ in 0..5 {
        assert_eq!(get(&gw.url("/echo")).await.cluster(), Some("green"));
    }
}

/// `shift start` under load, then `shift watch` follows it to `completed` (exit 0): green 100, blue
/// drained, no request lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_start_then_watch_completes() {
    let (_blue, green, gw) = gateway().await;
    gw.wait_cluster_ready("green", true).await;
    let load = Load::start(gw.url("/echo"), 4, true);
    load.wait_for_more(50).await;
    let run = client(
        &gw,
        &[
            "shift",
            "start",
            "--shard",
            "shard-0",
            "--to",
            "green",
            "--step-percent",
            "50",
            "--step-interval",
            "200ms",
            "--min-requests",
            "1",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.starts_with(
            "shard-0: shift progressing -> green at 0% (step 0); weights blue=100 green=0"
        ),
        "{run}"
    );
    // The body carried the given keys only; the rest are the gateway's defaults.
    let shift = shard_shift(&gw).await;
    assert_eq!(shift["policy"]["step_percent"], 50);
    assert_eq!(shift["policy"]["step_interval"], "200ms");
    assert_eq!(shift["policy"]["min_requests"], 1);
    assert_eq!(shift["policy"]["failure_threshold"], 2);

    let run = client(
        &gw,
        &["shift", "watch", "--shard", "shard-0", "--interval", "50ms"],
    )
    .await;
    let report = load.stop().await;
    assert_eq!(run.code, Some(0), "{run}");
    // Not a terminal: one line per change, each with the progress bar; then the summary.
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(
        lines[..lines.len() - 1].iter().all(|l| l.starts_with('[')),
        "{run}"
    );
    assert!(
        lines.windows(2).all(|w| w[0] != w[1]),
        "a line repeated without a change:\n{run}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("[####################] 100%")),
        "{run}"
    );
    assert_eq!(
        *lines.last().unwrap(),
        "shard-0: shift completed -> green at 100% (step 2); weights blue=0 green=100",
        "{run}"
    );
    let blue = gw.cluster_state("blue").await;
    assert_eq!(blue["weight"], 0);
    assert_eq!(blue["drain"], "drained");
    assert_eq!(gw.cluster_state("green").await["weight"], 100);
    assert_eq!(report.failed, 0, "{:?}", report.failures);
    assert!(green.requests() > 0);

    // `status` now reads the shift and the drained cluster.
    let run = client(&gw, &["status"]).await;
    assert!(
        run.stdout
            .starts_with("shard-0  shift completed -> green  target 100%  step 2\n"),
        "{run}"
    );
    assert!(run.stdout.contains(" drained "), "{run}");
}

/// A target that fails every request rolls the shift back: `shift watch` exits 2 with the reason,
/// and the weights are back where they started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_target_makes_watch_exit_2_with_the_reason() {
    let (_blue, green, gw) = gateway().await;
    gw.wait_cluster_ready("green", true).await;
    let load = Load::start(gw.url("/echo"), 4, false);
    let run = client(
        &gw,
        &[
            "shift",
            "start",
            "--shard",
            "shard-0",
            "--to",
            "green",
            "--step-percent",
            "50",
            "--step-interval",
            "300ms",
            "--min-requests",
            "1",
            "--failure-threshold",
            "1",
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    green.set_error_rate(1.0);
    let run = client(
        &gw,
        &["shift", "watch", "--shard", "shard-0", "--interval", "50ms"],
    )
    .await;
    load.stop().await;
    assert_eq!(run.code, Some(2), "{run}");
    let last = run.stdout.lines().last().unwrap_or("");
    assert!(
        last.starts_with("shard-0: shift rolled_back -> green")
            && last.contains("weights blue=100 green=0"),
        "{run}"
    );
    assert!(
        last.contains("reason: 1 failed checks in a row, last: error rate "),
        "{run}"
    );
    assert!(
        run.stderr
            .contains("rayshift: the shift of shard-0 rolled back: 1 failed checks in a row"),
        "{run}"
    );
    assert_eq!(weights(&gw).await, (100.into(), 0.into()));
    assert_eq!(shard_shift(&gw).await["state"], "rolled_back");
}

/// `shift pause`, `resume` and `abort` each print the new state and act; a control that does not
/// apply is refused with the API's message; an aborted shift makes `watch` exit 3; `promote` ends
/// a shift at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_pause_resume_abort_promote_round_trip() {
    let (_blue, _green, gw) = gateway().await;
    gw.wait_cluster_ready("green", true).await;
    let start = [
        "shift",
        "start",
        "--shard",
        "shard-0",
        "--to-revision",
        "v2",
        "--step-percent",
        "10",
        "--step-interval",
        "1h",
    ];
    let run = client(&gw, &start).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains("shift progressing -> revision v2"),
        "{run}"
    );
    // The first step (0 -> 10%) comes at once; the next one an hour later.
    eventually("first step", || async {
        shard_shift(&gw).await["target_weight"] == 10
    })
    .await;

    let run = client(&gw, &["shift", "pause", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        run.stdout,
        "shard-0: shift paused -> revision v2 at 10% (step 1); weights blue=90 green=10\n"
    );
    assert_eq!(shard_shift(&gw).await["state"], "paused");

    let run = client(&gw, &["shift", "pause", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_eq!(
        run.stderr,
        "rayshift: 409 Conflict: cannot pause a shift that is paused\n"
    );

    let run = client(&gw, &["shift", "resume", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.starts_with("shard-0: shift progressing"),
        "{run}"
    );
    assert_eq!(shard_shift(&gw).await["state"], "progressing");

    let run = client(&gw, &["shift", "abort", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.starts_with(
            "shard-0: shift aborted -> revision v2 after reaching 10% (step 1); weights blue=100 green=0"
        ),
        "{run}"
    );
    assert_eq!(weights(&gw).await, (100.into(), 0.into()));

    let run = client(&gw, &["shift", "watch", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(3), "{run}");
    assert!(run.stdout.contains("shift aborted"), "{run}");
    assert!(run.stderr.contains("was aborted"), "{run}");

    // Start again and promote: `start --watch` follows it to the end.
    let run = client(&gw, &start).await;
    assert_eq!(run.code, Some(0), "{run}");
    let run = client(&gw, &["shift", "promote", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stdout.contains("at 100%") && run.stdout.contains("weights blue=0 green=100"),
        "{run}"
    );
    let run = client(&gw, &["shift", "watch", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("shift completed"), "{run}");
    assert_eq!(weights(&gw).await, (0.into(), 100.into()));
}

/// `shift start --watch` starts and follows in one go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_start_with_watch_follows_to_the_end() {
    let (_blue, _green, gw) = gateway().await;
    gw.wait_cluster_ready("green", true).await;
    let load = Load::start(gw.url("/echo"), 2, false);
    let run = client(
        &gw,
        &[
            "shift",
            "start",
            "--shard",
            "shard-0",
            "--to",
            "green",
            "--step-percent",
            "100",
            "--step-interval",
            "100ms",
            "--watch",
            "--interval",
            "50ms",
        ],
    )
    .await;
    let report = load.stop().await;
    assert_eq!(run.code, Some(0), "{run}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert!(lines[0].starts_with("shard-0: shift progressing"), "{run}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("shard-0: shift completed"),
        "{run}"
    );
    assert_eq!(weights(&gw).await, (0.into(), 100.into()));
    assert_eq!(report.failed, 0, "{:?}", report.failures);
}

/// Bad input exits 1 with a clear message and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_exits_1_and_changes_nothing() {
    let (_blue, _green, gw) = gateway().await;
    let cases: &[(&[&str], &str)] = &[
        (
            &["weights", "set", "--shard", "shard-0", "blue=abc"],
            "rayshift: weights: \"blue=abc\" is not CLUSTER=WEIGHT with an integer weight 0-100",
        ),
        (
            &["weights", "set", "--shard", "shard-0", "blue=101"],
            "integer weight 0-100",
        ),
        (
            &["weights", "set", "--shard", "shard-0", "blue=50", "blue=50"],
            "cluster \"blue\" is given twice",
        ),
        (
            &[
                "weights", "set", "--shard", "shard-0", "blue=50", "green=40",
            ],
            "rayshift: 400 Bad Request: weights sum to 90, expected 100",
        ),
        (
            &["weights", "set", "--shard", "shard-9", "blue=100"],
            "rayshift: 404 Not Found: unknown shard \"shard-9\"",
        ),
        (
            &["shift", "start", "--shard", "shard-9", "--to", "green"],
            "rayshift: 404 Not Found: unknown shard \"shard-9\"",
        ),
        (
            &["shift", "start", "--shard", "shard-0", "--to", "purple"],
            "rayshift: 400 Bad Request: unknown cluster \"purple\"",
        ),
        (
            &[
                "shift",
                "start",
                "--shard",
                "shard-0",
                "--to",
                "green",
                "--max-error-rate",
                "2",
            ],
            "rayshift: 400 Bad Request: max_error_rate: expected a ratio 0-1",
        ),
        (
            &["shift", "pause", "--shard", "shard-0"],
            "rayshift: 404 Not Found: shard \"shard-0\" has no shift",
        ),
        (&["shift", "watch", "--shard", "shard-0"], "has no shift"),
    ];
    for (args, needle) in cases {
        let run = client(&gw, args).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run}");
        assert!(
            run.stderr.contains(needle),
            "{args:?}: missing {needle:?} in {run}"
        );
        assert!(run.stdout.is_empty(), "{args:?}: {run}");
    }
    assert_eq!(weights(&gw).await, (100.into(), 0.into()));
    assert_eq!(shard_shift(&gw).await, Value::Null);

    // Malformed flags are usage errors from the argument parser.
    let run = client(
        &gw,
        &[
            "shift",
            "start",
            "--shard",
            "shard-0",
            "--to",
            "green",
            "--step-interval",
            "soon",
        ],
    )
    .await;
    // Usage errors exit 1 too: 2 is what `--watch` answers for a rolled-back shift.
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("expected a duration"), "{run}");
    let run = client(&gw, &["shift", "start", "--shard", "shard-0"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("--to"), "{run}");
    assert_eq!(shard_shift(&gw).await, Value::Null);

    // No gateway there: the message names the admin URL.
    let url = format!("http://127.0.0.1:{}", closed_port());
    let run = rayshift(&["status", "--admin", &url]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .starts_with(&format!("rayshift: cannot reach the admin API at {url}")),
        "{run}"
    );
    let run = rayshift(&["status", "--admin", "https://127.0.0.1:1"]).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("https is not supported"), "{run}");
}

/// `shift watch` gives up with exit 1 once the admin API has been unreachable for 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_gives_up_after_10s_unreachable() {
    let url = format!("http://127.0.0.1:{}", closed_port());
    let started = Instant::now();
    let run = rayshift(&["shift", "watch", "--shard", "shard-0", "--admin", &url]).await;
    let took = started.elapsed();
    assert_eq!(run.code, Some(1), "{run}");
    assert!(took >= Duration::from_secs(10), "gave up after {took:?}");
    assert!(took < Duration::from_secs(14), "gave up after {took:?}");
    assert!(
        run.stderr.starts_with(&format!(
            "rayshift: gave up: the admin API at {url} was unreachable for 10 s: cannot reach the admin API at {url}"
        )),
        "{run}"
    );
}

/// With `admin.token_file`, mutating verbs need `--token-file` (or `RAYSHIFT_TOKEN_FILE`); reads
/// do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_protected_gateway_needs_the_token_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
    let token_file = dir.path().join("token").to_string_lossy().into_owned();
    let wrong_file = dir.path().join("wrong").to_string_lossy().into_owned();
    std::fs::write(&wrong_file, "not-it").unwrap();
    let (_blue, _green, gw) = blue_green("  token_file: token\n", dir).await;
    let set = [
        "weights",
        "set",
        "--shard",
        "shard-0",
        "blue=0",
        "green=100",
    ];

    let run = client(&gw, &set).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert_eq!(
        run.stderr,
        "rayshift: 401 Unauthorized: missing or wrong bearer token (Authorization: Bearer <token>)\n"
    );
    let run = client(&gw, &[&set[..], &["--token-file", &wrong_file]].concat()).await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("401 Unauthorized"), "{run}");
    let run = client(
        &gw,
        &[&set[..], &["--token-file", "/nonexistent/token"]].concat(),
    )
    .await;
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr.contains("reading token file /nonexistent/token"),
        "{run}"
    );
    assert_eq!(weights(&gw).await, (100.into(), 0.into()));

    // Reads are open.
    assert_eq!(client(&gw, &["status"]).await.code, Some(0));

    let run = client(&gw, &[&set[..], &["--token-file", &token_file]].concat()).await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(weights(&gw).await, (0.into(), 100.into()));

    let admin = gw.admin("");
    let run = rayshift_env(
        &[
            "weights", "set", "--shard", "shard-0", "blue=100", "--admin", &admin,
        ],
        &[("RAYSHIFT_TOKEN_FILE", token_file.as_str())],
    )
    .await;
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(weights(&gw).await, (100.into(), 0.into()));
}

/// A child process killed (and reaped) when dropped: a failed assertion must not leave it
/// serving.
struct KillOnDrop(std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `demo --shift` drives traffic, shifts shard-0 to green with a progress line per change, and
/// reports the outcome: completed, nothing failed, blue drained. Then it keeps serving.
#[test]
fn demo_shift_completes_without_failures() {
    let mut child = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_rayshift"))
            .args([
                "demo",
                "--shift",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn rayshift demo"),
    );
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    let summary = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.starts_with("shift ") && line.contains(" in ") => break line,
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!(
                    "no summary from the demo; stdout:\n{}\nstderr:\n{stderr}",
                    lines.join("\n"),
                );
            }
        }
    };
    let text = lines.join("\n");
    assert!(text.contains("rayshift demo is running."), "{text}");
    assert!(
        text.contains(
            "shard-0: shift progressing -> green at 20% (step 0); weights blue=80 green=20"
        ),
        "{text}"
    );
    for pct in [40, 60, 80, 100] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with('[') && l.contains(&format!("{pct}%  step"))),
            "no progress line at {pct}%:\n{text}"
        );
    }
    assert!(
        summary.starts_with("shift completed in ")
            && summary.contains(" requests, 0 failed; blue drained"),
        "{summary}\n{text}"
    );
    let requests: u64 = summary
        .split(": ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .map(|n| n.replace(',', ""))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no request count in {summary}"));
    assert!(requests >= 50, "{summary}");

    // Still serving after the shift: the proxy answers (from green).
    let proxy = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("gateway    http://"))
        .unwrap_or_else(|| panic!("no gateway address in the banner:\n{text}"))
        .to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let resp = rt.block_on(get(&format!("http://{proxy}/echo")));
    assert_eq!(resp.status, http::StatusCode::OK);
    assert_eq!(resp.cluster(), Some("green"));

    // SIGTERM stops it cleanly.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let stop_deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "demo exited with {status}");
            break;
        }
        if Instant::now() > stop_deadline {
            let _ = child.kill();
            panic!("demo did not stop on SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `demo` on a port something else holds exits non-zero, names the address, and leaves no state
/// directory behind in the temporary directory.
#[test]
fn demo_on_a_taken_port_fails_and_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rayshift"))
        .args(["demo", "--listen", &addr, "--admin-listen", "127.0.0.1:0"])
        .env("TMPDIR", tmp.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run rayshift demo");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "demo started on a taken port: {stderr}"
    );
    assert!(
        stderr.contains(&addr),
        "error does not name {addr}: {stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "demo left {left:?} in its temporary directory"
    );
}
