//! End to end on real Ray Serve (issue 7): independent local Ray clusters behind an in-process
//! gateway, a shift v1 -> v2 under steady load with readiness gates against the real `/-/healthz`,
//! `/-/routes` and dashboard `/api/serve/applications/`, then a broken v3 rolled back by itself.
//!
//! v1 and v2 come from the config file; once v1 is drained it is stopped and removed, and v3 is
//! added, through the gateway's membership events (`ControlHandle::discovery`, what the Kubernetes
//! watcher uses), as static config has no reload.
//!
//! Needs `scripts/ray/install.sh` (ray[serve] in a cached virtualenv; the test calls it and fails
//! when it fails). Every Ray process the test starts is stopped when the test ends, also when it
//! panics ([`RayClusters`]'s `Drop`); clusters of a run that was killed outright are stopped by the
//! next run. About 2 minutes and ~2 GB of RAM (PSS) at peak.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use rayshift::config::ClusterConfig;
use rayshift::control::{ClusterSource, DiscoveredCluster, DiscoveryEvent};
use serde_json::Value;

const SHARD: &str = "shard-0";
/// The Serve applications every cluster serves (the shift gates need all of a shard's apps).
const APPS: &str = "echo=/echo,extra=/extra";
/// Upper bound for one `cluster.py start` (it bounds itself at 120 s and cleans up).
const START_WAIT: Duration = Duration::from_secs(200);
/// Upper bound for one whole shift.
const SHIFT_WAIT: Duration = Duration::from_secs(120);
/// Load connections: Ray Serve does ~150 req/s on this machine; a few connections saturate it.
const CONCURRENCY: usize = 6;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn log(msg: impl AsRef<str>) {
    println!("ray_serve: {}", msg.as_ref());
}

/// Runs `scripts/ray/install.sh` (a quick import check when the venv is there) and returns the
/// venv's python (its last stdout line). Panics when the install fails: never skipped.
fn install_ray() -> String {
    let out = Command::new(repo().join("scripts/ray/install.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/ray/install.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "scripts/ray/install.sh failed ({}):\n{stdout}",
        out.status
    );
    let python = stdout.lines().last().unwrap_or("").trim().to_string();
    assert!(
        Path::new(&python).is_file(),
        "scripts/ray/install.sh printed no python path:\n{stdout}"
    );
    python
}

/// A started Ray Serve cluster, from its `cluster.json`.
#[derive(Debug, Clone)]
struct RayCluster {
    name: String,
    serve_url: String,
    dashboard_url: Option<String>,
    json: Value,
}

/// One cluster directory of the test and the `start` still running for it, if any.
struct Entry {
    name: String,
    dir: PathBuf,
    start: Option<Child>,
    stopped: bool,
}

/// Every Ray cluster the test starts. `Drop` stops those not stopped yet (kills a `start` still
/// running, runs `cluster.py stop`, then kills whatever is left of the cluster by its temp dir and
/// session), so a failing test leaves no Ray process behind. On a panic the cluster dirs (with
/// Ray's logs) are kept and their path printed.
struct RayClusters {
    python: String,
    script: PathBuf,
    root: PathBuf,
    entries: Mutex<Vec<Entry>>,
}

impl RayClusters {
    fn new(python: String) -> RayClusters {
        let script = repo().join("tests/ray/cluster.py");
        reap_stale_runs(&python, &script);
        let root = tempfile::Builder::new()
            .prefix(ROOT_PREFIX)
            .tempdir()
            .expect("tempdir")
            .keep();
        std::fs::write(root.join(OWNER_FILE), std::process::id().to_string()).expect("owner file");
        RayClusters {
            python,
            script,
            root,
            entries: Mutex::new(Vec::new()),
        }
    }

    /// Spawns `cluster.py start` for a cluster named and versioned `name` (returns at once).
    fn spawn_start(&self, name: &str, extra: &[&str]) {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let out = std::fs::File::create(dir.join("start.stdout")).expect("start.stdout");
        let err = std::fs::File::create(dir.join("start.stderr")).expect("start.stderr");
        let mut entries = self.entries.lock().unwrap();
        // Registered before the spawn: from here on, Drop stops whatever it started.
        entries.push(Entry {
            name: name.to_string(),
            dir: dir.clone(),
            start: None,
            stopped: false,
        });
        let child = Command::new(&self.python)
            .arg(&self.script)
            .args(["start", "--dir"])
            .arg(&dir)
            .args(["--name", name, "--version", name, "--apps", APPS])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn cluster.py start");
        entries.last_mut().unwrap().start = Some(child);
    }

    /// Waits for the `start` of `name` to finish and reads its `cluster.json`.
    async fn wait_started(&self, name: &str) -> RayCluster {
        let deadline = Instant::now() + START_WAIT;
        let dir = loop {
            {
                let mut entries = self.entries.lock().unwrap();
                let e = entries
                    .iter_mut()
                    .find(|e| e.name == name)
                    .expect("cluster spawned");
                let child = e.start.as_mut().expect("start running");
                if let Some(status) = child.try_wait().expect("wait for cluster.py start") {
                    e.start = None;
                    let stderr =
                        std::fs::read_to_string(e.dir.join("start.stderr")).unwrap_or_default();
                    assert!(
                        status.success(),
                        "cluster.py start {name} failed ({status}); its stderr (tail):\n{}",
                        tail(&stderr, 80)
                    );
                    break e.dir.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "cluster.py start {name} still running after {START_WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let json = read_json(&dir.join("cluster.json")).expect("cluster.json");
        assert_eq!(json["state"], "running", "{json}");
        RayCluster {
            name: name.to_string(),
            serve_url: json["serve_url"].as_str().expect("serve_url").to_string(),
            dashboard_url: json["dashboard_url"].as_str().map(str::to_string),
            json,
        }
    }

    /// Stops the cluster `name` (`cluster.py stop`) and checks that none of its processes is left.
    async fn stop(&self, name: &str) -> Duration {
        let t = Instant::now();
        let dir = {
            let entries = self.entries.lock().unwrap();
            let e = entries.iter().find(|e| e.name == name).expect("cluster");
            assert!(e.start.is_none(), "{name} is still starting");
            e.dir.clone()
        };
        let json = read_json(&dir.join("cluster.json")).unwrap_or(Value::Null);
        let out = tokio::process::Command::new(&self.python)
            .arg(&self.script)
            .args(["stop", "--dir"])
            .arg(&dir)
            .output()
            .await
            .expect("run cluster.py stop");
        assert!(
            out.status.success(),
            "cluster.py stop {name} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let left = leftovers(&json);
        assert!(
            left.is_empty(),
            "{name}: processes left after stop: {left:?}"
        );
        let temp_dir = json["temp_dir"].as_str().unwrap_or("");
        assert!(
            !temp_dir.is_empty() && !Path::new(temp_dir).exists(),
            "{name}: temp dir {temp_dir} left"
        );
        let after = read_json(&dir.join("cluster.json")).unwrap_or(Value::Null);
        assert_eq!(after["state"], "stopped", "{after}");
        self.entries
            .lock()
            .unwrap()
            .iter_mut()
            .find(|e| e.name == name)
            .unwrap()
            .stopped = true;
        t.elapsed()
    }

    /// Cleanup of everything not stopped yet; used by `Drop`.
    fn cleanup(&mut self) {
        let panicking = std::thread::panicking();
        let entries = std::mem::take(&mut *self.entries.lock().unwrap_or_else(|e| e.into_inner()));
        for mut e in entries.into_iter().filter(|e| !e.stopped) {
            if let Some(mut child) = e.start.take() {
                // A start still running: kill it, then stop what it got to start.
                let _ = child.kill();
                let _ = child.wait();
            }
            let mut stop = Command::new(&self.python);
            stop.arg(&self.script).args(["stop", "--dir"]).arg(&e.dir);
            if panicking {
                stop.arg("--keep-logs");
            }
            let ok = stop
                .stdin(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            let json = read_json(&e.dir.join("cluster.json")).unwrap_or(Value::Null);
            let mut left = leftovers(&json);
            if !ok || !left.is_empty() {
                eprintln!(
                    "ray_serve: cluster.py stop {} failed; killing its processes: {left:?}",
                    e.name
                );
                for pid in left.keys() {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
                std::thread::sleep(Duration::from_millis(500));
                left = leftovers(&json);
                if let Some(t) = json["temp_dir"]
                    .as_str()
                    .filter(|t| t.starts_with("/tmp/rs-"))
                {
                    let _ = std::fs::remove_dir_all(t);
                }
            }
            if left.is_empty() {
                eprintln!("ray_serve: cleanup: cluster {} stopped", e.name);
            } else {
                eprintln!(
                    "ray_serve: cleanup: cluster {} processes STILL ALIVE: {left:?}",
                    e.name
                );
            }
        }
        if panicking {
            let _ = std::fs::remove_file(self.root.join(OWNER_FILE));
            eprintln!(
                "ray_serve: cluster dirs (start logs, Ray logs) kept in {}",
                self.root.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl Drop for RayClusters {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Prefix of the test's directory (under the system temp dir) holding one dir per cluster.
const ROOT_PREFIX: &str = "rayshift-ray-serve-";
/// File in that directory with the pid of the test process that owns it.
const OWNER_FILE: &str = "owner.pid";

/// Stops the clusters of earlier runs whose test process is gone without cleaning up (killed with
/// SIGKILL or Ctrl-C: no `Drop` runs then), and removes their directories. Runs of a live test
/// process (another engineer's, in parallel) are left alone.
fn reap_stale_runs(python: &str, script: &Path) {
    let Ok(dirs) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for root in dirs.flatten().map(|d| d.path()) {
        let is_ours = root
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(ROOT_PREFIX));
        let Some(owner) = is_ours
            .then(|| std::fs::read_to_string(root.join(OWNER_FILE)).ok())
            .flatten()
        else {
            continue; // not ours, or kept after a failure (its clusters were stopped then)
        };
        let alive = std::fs::read(format!("/proc/{}/cmdline", owner.trim()))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("ray_serve"));
        if alive {
            continue;
        }
        for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if dir.path().join("cluster.json").is_file() {
                eprintln!(
                    "ray_serve: stopping a cluster left by a killed run: {}",
                    dir.path().display()
                );
                let _ = Command::new(python)
                    .arg(script)
                    .args(["stop", "--dir"])
                    .arg(dir.path())
                    .stdin(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(&root);
    }
}

fn read_json(path: &Path) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Live (non-zombie) processes of a cluster: command line or open files under its temp dir, or
/// members of the sessions `ray start` created (trusted while the temp dir exists, as cluster.py
/// does). pid -> command line.
fn leftovers(cluster_json: &Value) -> BTreeMap<u32, String> {
    let mut found = BTreeMap::new();
    let Some(temp_dir) = cluster_json["temp_dir"].as_str().filter(|t| t.len() > 5) else {
        return found;
    };
    let under = |s: &str| s == temp_dir || s.contains(&format!("{temp_dir}/"));
    let sessions: Vec<u64> = if Path::new(temp_dir).is_dir() {
        cluster_json["pgids"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, pgrp, session, ...
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        if fields.first() == Some(&"Z") {
            continue;
        }
        let session = fields.get(3).and_then(|s| s.parse::<u64>().ok());
        let cmdline = std::fs::read(p.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let mut hit = under(cmdline.trim()) || session.is_some_and(|s| sessions.contains(&s));
        if !hit {
            if let Ok(fds) = std::fs::read_dir(p.path().join("fd")) {
                hit = fds.flatten().any(|fd| {
                    std::fs::read_link(fd.path()).is_ok_and(|l| under(&l.to_string_lossy()))
                });
            }
        }
        if hit {
            found.insert(pid, cmdline.chars().take(100).collect());
        }
    }
    found
}

/// The gateway's config: shard-0 with `v1` (weight 100) and `v2` (weight 0, with its dashboard).
fn gateway_yaml(clusters: &[(&RayCluster, u32)]) -> String {
    let mut y = String::from(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\n",
    );
    y.push_str(&format!("shards: [{SHARD}]\n"));
    y.push_str("probe:\n  interval: 200ms\n  timeout: 2s\n");
    y.push_str("clusters:\n");
    for (c, weight) in clusters {
        y.push_str(&format!(
            "  - name: {}\n    shard: {SHARD}\n    revision: {}\n    serve_url: {}\n    weight: {weight}\n",
            c.name, c.name, c.serve_url
        ));
        if let Some(d) = &c.dashboard_url {
            y.push_str(&format!("    dashboard_url: {d}\n"));
        }
    }
    y.push_str("apps:\n");
    for app in APPS.split(',') {
        let (name, prefix) = app.split_once('=').unwrap();
        y.push_str(&format!("  - name: {name}\n    route_prefix: {prefix}\n"));
    }
    y
}

/// GET and POST to both applications, in rotation.
fn load(gw: &TestGateway) -> Load {
    Load::rotating(
        vec![
            (Method::GET, gw.url("/echo")),
            (Method::POST, gw.url("/extra/post")),
            (Method::GET, gw.url("/extra")),
            (Method::POST, gw.url("/echo/post")),
        ],
        CONCURRENCY,
    )
}

/// `n` requests (GET and POST, both apps) one after the other: all must be answered 200 by
/// `version` (body `<version> <app>`, `x-version`).
async fn all_answered_by(gw: &TestGateway, version: &str, n: usize) {
    for i in 0..n {
        let app = if i % 2 == 0 { "echo" } else { "extra" };
        let method = if i % 4 < 2 { Method::GET } else { Method::POST };
        let r = send(method.clone(), &gw.url(&format!("/{app}/check")), &[], "x").await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "{method} /{app}/check: {}",
            r.body
        );
        assert_eq!(r.body, format!("{version} {app}"), "{method} /{app}/check");
        assert_eq!(
            r.headers.get("x-version").and_then(|v| v.to_str().ok()),
            Some(version)
        );
    }
}

async fn post_json(url: &str, body: &str) -> Resp {
    send(
        Method::POST,
        url,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

async fn shift_of(gw: &TestGateway) -> Value {
    let r = get(&gw.admin(&format!("/v1/shards/{SHARD}/shift"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

/// Follows a shift until it reaches one of `end` states, printing each weight change.
async fn follow_shift(gw: &TestGateway, end: &[&str]) -> Value {
    let t0 = Instant::now();
    let mut last_weight = None;
    loop {
        let shift = shift_of(gw).await;
        let w = shift["target_weight"].as_u64();
        if w != last_weight {
            log(format!(
                "  +{:>5.1}s  {:<11} step {} target weight {:>3}  last check: {}",
                t0.elapsed().as_secs_f64(),
                shift["state"].as_str().unwrap_or("?"),
                shift["step"],
                w.unwrap_or(0),
                shift["last_check"]
            ));
            last_weight = w;
        }
        if end.iter().any(|s| shift["state"] == *s) {
            log(format!(
                "  +{:>5.1}s  {}: {}",
                t0.elapsed().as_secs_f64(),
                shift["state"].as_str().unwrap_or("?"),
                shift["weights"]
            ));
            return shift;
        }
        assert!(
            t0.elapsed() < SHIFT_WAIT,
            "shift never reached {end:?}; last: {shift}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `rayshift_requests_total` summed by (cluster, code).
async fn requests_by_cluster(gw: &TestGateway) -> BTreeMap<(String, String), u64> {
    let metrics = get(&gw.admin("/metrics")).await.body;
    let label = |line: &str, key: &str| -> String {
        line.split_once(&format!("{key}=\""))
            .and_then(|(_, rest)| rest.split_once('"'))
            .map(|(v, _)| v.to_string())
            .unwrap_or_default()
    };
    let mut out = BTreeMap::new();
    for line in metrics.lines() {
        if let Some(rest) = line.strip_prefix("rayshift_requests_total{") {
            let n: u64 = rest
                .rsplit_once(' ')
                .and_then(|(_, v)| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            *out.entry((label(line, "cluster"), label(line, "code")))
                .or_default() += n;
        }
    }
    out
}

fn count(by: &BTreeMap<(String, String), u64>, cluster: &str, code: Option<&str>) -> u64 {
    by.iter()
        .filter(|((c, k), _)| c == cluster && code.is_none_or(|code| k == code))
        .map(|(_, n)| n)
        .sum()
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shift_and_rollback_on_real_ray_serve() {
    let t_all = Instant::now();
    let mut timings: Vec<(&str, Duration)> = Vec::new();

    // -- Install (a quick check when cached) and start v1 and v2 side by side.
    let t = Instant::now();
    let python = tokio::task::spawn_blocking(install_ray).await.unwrap();
    timings.push(("install check", t.elapsed()));
    let ray = RayClusters::new(python);
    let t = Instant::now();
    ray.spawn_start("v1", &[]);
    ray.spawn_start("v2", &["--dashboard"]);
    let v1 = ray.wait_started("v1").await;
    let v2 = ray.wait_started("v2").await;
    timings.push(("start v1 + v2 (parallel)", t.elapsed()));
    for c in [&v1, &v2] {
        log(format!(
            "cluster {}: serve {} dashboard {:?} ray {} start timings {}",
            c.name, c.serve_url, c.dashboard_url, c.json["ray_version"], c.json["timings_s"]
        ));
    }
    let v2_dashboard = v2
        .dashboard_url
        .clone()
        .expect("v2 started with --dashboard");

    // The real endpoints the gates read, straight from the clusters.
    for c in [&v1, &v2] {
        assert_eq!(
            get(&format!("{}/-/healthz", c.serve_url)).await.status,
            StatusCode::OK
        );
        let routes: Value =
            serde_json::from_str(&get(&format!("{}/-/routes", c.serve_url)).await.body).unwrap();
        assert_eq!(routes["/echo"], "echo", "{}: {routes}", c.name);
        assert_eq!(routes["/extra"], "extra", "{}: {routes}", c.name);
    }
    let apps: Value = serde_json::from_str(
        &get(&format!("{v2_dashboard}/api/serve/applications/"))
            .await
            .body,
    )
    .unwrap();
    for app in ["echo", "extra"] {
        assert_eq!(
            apps["applications"][app]["status"], "RUNNING",
            "v2 dashboard: {apps}"
        );
    }

    // -- The gateway in front of them.
    let t = Instant::now();
    let gw = TestGateway::start(&gateway_yaml(&[(&v1, 100), (&v2, 0)])).await;
    gw.wait_cluster_ready("v1", true).await;
    gw.wait_cluster_ready("v2", true).await;
    timings.push(("gateway ready", t.elapsed()));
    let state = gw.state().await;
    for name in ["v1", "v2"] {
        let c = gw.cluster_state(name).await;
        assert_eq!(c["apps"], serde_json::json!(["echo", "extra"]), "{state}");
    }
    all_answered_by(&gw, "v1", 8).await;
    let r = get(&gw.url("/echoes")).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.body);

    // -- Shift v1 -> v2 under steady load.
    let load1 = load(&gw);
    load1.wait_for_more(100).await;
    let t_shift = Instant::now();
    let r = post_json(
        &gw.admin(&format!("/v1/shards/{SHARD}/shift")),
        r#"{"to": "v2", "step_percent": 25, "step_interval": "4s", "min_requests": 20,
            "max_error_rate": 0.01, "max_p99_latency": "5s", "failure_threshold": 2}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    log("shift v1 -> v2 started (step 25%, every 4s)");
    let shift = follow_shift(&gw, &["completed", "rolled_back", "aborted"]).await;
    let shift_duration = t_shift.elapsed();
    timings.push(("shift v1 -> v2", shift_duration));
    assert_eq!(shift["state"], "completed", "{shift}");
    assert_eq!(shift["target_weight"], 100);
    assert!(shift["step"].as_u64().unwrap() >= 4, "{shift}");
    let v1_state = gw.cluster_state("v1").await;
    assert_eq!(v1_state["drain"], "drained", "{v1_state}");
    assert_eq!(v1_state["weight"], 0);
    assert_eq!(v1_state["in_flight"], 0);
    assert_eq!(gw.cluster_state("v2").await["weight"], 100);
    load1.wait_for_more(100).await;
    let during_shift = requests_by_cluster(&gw).await;

    // v1 is drained: delete it while the load goes on (v3 starts meanwhile, in the background).
    let t = Instant::now();
    ray.spawn_start("v3", &["--fail-ratio", "0.3"]);
    let stop_v1 = ray.stop("v1").await;
    gw.gateway
        .control()
        .discovery(DiscoveryEvent::Remove("v1".into()))
        .await
        .expect("remove v1");
    load1.wait_for_more(200).await;
    let report1 = load1.stop().await;
    let sent1 = report1.ok + report1.failed;
    log(format!(
        "shift v1 -> v2: {sent1} requests sent through the gateway, {} failed; shift took {}; \
         v1 stopped {} after promotion (its stop {})",
        report1.failed,
        secs(shift_duration),
        secs(t.elapsed()),
        secs(stop_v1)
    ));
    assert_eq!(
        report1.failed, 0,
        "failed requests during the shift: {:?}",
        report1.failures
    );
    let v1_answered = count(&during_shift, "v1", Some("200"));
    let v2_answered = count(&during_shift, "v2", Some("200"));
    log(format!(
        "  answered during the shift: v1 {v1_answered}, v2 {v2_answered} (gateway metrics)"
    ));
    assert!(
        v1_answered > 0 && v2_answered > 0,
        "both clusters served: {during_shift:?}"
    );
    // All traffic on v2 now.
    all_answered_by(&gw, "v2", 40).await;
    let by = requests_by_cluster(&gw).await;
    assert_eq!(count(&by, "v1", None), count(&during_shift, "v1", None));
    let v2_state = gw.state().await;
    assert!(
        !v2_state.to_string().contains("\"name\":\"v1\""),
        "v1 still known: {v2_state}"
    );

    // -- A broken v3 (30% of its requests raise): rolled back by itself.
    let v3 = ray.wait_started("v3").await;
    timings.push(("v3 start (after v2 promoted)", t.elapsed()));
    log(format!(
        "cluster v3: serve {} fail_ratio {} start timings {}",
        v3.serve_url, v3.json["fail_ratio"], v3.json["timings_s"]
    ));
    gw.gateway
        .control()
        .discovery(DiscoveryEvent::Upsert(Box::new(DiscoveredCluster {
            config: ClusterConfig {
                name: "v3".into(),
                shard: SHARD.into(),
                revision: "v3".into(),
                serve_url: v3.serve_url.parse().unwrap(),
                dashboard_url: None,
                weight: None,
            },
            created: None,
            ready: true,
            source: ClusterSource::Static,
        })))
        .await
        .expect("add v3");
    gw.wait_cluster_ready("v3", true).await;
    assert_eq!(gw.cluster_state("v3").await["weight"], 0);
    let before_v3 = requests_by_cluster(&gw).await;
    assert_eq!(count(&before_v3, "v3", None), 0);

    let load2 = load(&gw);
    load2.wait_for_more(100).await;
    let t_rb = Instant::now();
    let r = post_json(
        &gw.admin(&format!("/v1/shards/{SHARD}/shift")),
        r#"{"to": "v3", "step_percent": 25, "step_interval": "2s", "min_requests": 20,
            "max_error_rate": 0.05, "max_p99_latency": "5s", "failure_threshold": 2}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    log("shift v2 -> v3 started (step 25%, every 2s, failure_threshold 2)");
    let shift = follow_shift(&gw, &["completed", "rolled_back", "aborted"]).await;
    let rollback_after = t_rb.elapsed();
    let report2 = load2.stop().await;
    timings.push(("shift v2 -> v3 until rollback", rollback_after));
    let sent2 = report2.ok + report2.failed;
    assert_eq!(shift["state"], "rolled_back", "{shift}");
    let reason = shift["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("error rate") && reason.contains("2 failed checks in a row"),
        "{reason}"
    );
    assert_eq!(shift["last_check"]["result"], "failed", "{shift}");
    assert_eq!(shift["weights"]["v2"], 100, "{shift}");
    assert_eq!(shift["weights"]["v3"], 0, "{shift}");
    assert_eq!(gw.cluster_state("v2").await["weight"], 100);
    assert_eq!(gw.cluster_state("v3").await["weight"], 0);
    let by = requests_by_cluster(&gw).await;
    let v3_total = count(&by, "v3", None);
    let v3_500 = count(&by, "v3", Some("500"));
    log(format!(
        "rollback: after {} at target weight {} (step {}); reason: {reason}",
        secs(rollback_after),
        shift["target_weight"],
        shift["step"]
    ));
    log(format!(
        "  {sent2} requests sent during the v3 shift, {} failed (v3 answered {v3_total}, {v3_500} of them 500)",
        report2.failed
    ));
    assert!(v3_500 > 0, "v3 never failed: {by:?}");
    assert!(
        report2.failed <= v3_500,
        "failures other than v3's 500s: {} > {v3_500}: {:?}",
        report2.failed,
        report2.failures
    );
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics
            .contains(r#"rayshift_shift_rollbacks_total{shard="shard-0",reason="error_rate"} 1"#),
        "rollback metric"
    );

    // After the rollback: nothing fails, nothing reaches v3.
    let load3 = load(&gw);
    load3.wait_for_more(300).await;
    let report3 = load3.stop().await;
    all_answered_by(&gw, "v2", 40).await;
    let after = requests_by_cluster(&gw).await;
    let sent3 = report3.ok + report3.failed;
    log(format!(
        "after the rollback: {sent3} requests sent, {} failed, {} reached v3",
        report3.failed,
        count(&after, "v3", None) - v3_total
    ));
    assert_eq!(report3.failed, 0, "{:?}", report3.failures);
    assert_eq!(
        count(&after, "v3", None),
        v3_total,
        "v3 got traffic: {after:?}"
    );

    // -- Stop every Ray cluster; none of their processes may be left.
    let t = Instant::now();
    let (s2, s3) = tokio::join!(ray.stop("v2"), ray.stop("v3"));
    timings.push(("stop v2 + v3", t.elapsed()));
    log(format!(
        "stopped v2 in {}, v3 in {}; no Ray process left",
        secs(s2),
        secs(s3)
    ));

    log(format!(
        "SUMMARY: shift v1 -> v2: {sent1} requests, {} failed, {}; rollback of v3: after {}, \
         {sent2} requests, {} failed (v3's 500s); after rollback: {sent3} requests, {} failed",
        report1.failed,
        secs(shift_duration),
        secs(rollback_after),
        report2.failed,
        report3.failed
    ));
    for (what, d) in &timings {
        log(format!("  {what:<32} {}", secs(*d)));
    }
    log(format!("  {:<32} {}", "total", secs(t_all.elapsed())));
    drop(ray);
}
