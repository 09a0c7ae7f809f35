//! Shared test helpers: real Serve look-alike clusters, gateways (in-process or as a child process),
//! an HTTP client and a load generator. Everything binds 127.0.0.1 port 0.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rayshift::{Config, Gateway};
pub use serve_stub::{ServeStub, StubConfig};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(20);

/// Starts a stub cluster serving `apps` (name, route prefix).
pub async fn stub(name: &str, revision: &str, apps: &[(&str, &str)]) -> ServeStub {
    let mut cfg = StubConfig::new(name, revision);
    for (app, prefix) in apps {
        cfg = cfg.with_app(*app, *prefix);
    }
    ServeStub::start(cfg).await.expect("start stub cluster")
}

/// One `clusters:` entry of a test config.
pub struct ClusterDecl<'a> {
    pub stub: &'a ServeStub,
    pub shard: &'a str,
    pub revision: &'a str,
    pub weight: Option<u32>,
}

/// Convenience constructor for [`ClusterDecl`].
pub fn cluster<'a>(
    stub: &'a ServeStub,
    shard: &'a str,
    revision: &'a str,
    weight: Option<u32>,
) -> ClusterDecl<'a> {
    ClusterDecl {
        stub,
        shard,
        revision,
        weight,
    }
}

/// A YAML config on port 0 with fast probes; `extra` is appended verbatim (top-level keys).
pub fn config_yaml(shards: &[&str], clusters: &[ClusterDecl<'_>], extra: &str) -> String {
    let mut y = String::from(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\n",
    );
    y.push_str(&format!("shards: [{}]\n", shards.join(", ")));
    y.push_str("probe:\n  interval: 100ms\n  timeout: 500ms\n");
    y.push_str("clusters:\n");
    for c in clusters {
        y.push_str(&format!(
            "  - name: {}\n    shard: {}\n    revision: {}\n    serve_url: {}\n",
            c.stub.name(),
            c.shard,
            c.revision,
            c.stub.url()
        ));
        if let Some(w) = c.weight {
            y.push_str(&format!("    weight: {w}\n"));
        }
    }
    y.push_str(extra);
    y
}

/// Two stub clusters serving `echo` at `/echo` in one shard: `old` (revision v1) and `new`
/// (revision v2) with the given weights, behind an in-process gateway.
pub async fn old_and_new(
    shard: &str,
    (old, old_weight): (&str, u32),
    (new, new_weight): (&str, u32),
    extra: &str,
) -> (ServeStub, ServeStub, TestGateway) {
    let old = stub(old, "v1", &[("echo", "/echo")]).await;
    let new = stub(new, "v2", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &[shard],
        &[
            cluster(&old, shard, "v1", Some(old_weight)),
            cluster(&new, shard, "v2", Some(new_weight)),
        ],
        extra,
    ))
    .await;
    (old, new, gw)
}

/// The config of `blue` (v1, weight 100) and `green` (v2, weight 0) in shard-0, with
/// `admin_extra` (lines indented two spaces) added to its `admin:` section.
pub fn blue_green_yaml(blue: &ServeStub, green: &ServeStub, admin_extra: &str) -> String {
    config_yaml(
        &["shard-0"],
        &[
            cluster(blue, "shard-0", "v1", Some(100)),
            cluster(green, "shard-0", "v2", Some(0)),
        ],
        "",
    )
    .replace(
        "admin:\n  listen: 127.0.0.1:0\n",
        &format!("admin:\n  listen: 127.0.0.1:0\n{admin_extra}"),
    )
}

/// Per-core proxy workers of an in-process test gateway: what `rayshift run` starts on a
/// two-core machine, so the suites exercise client connections served on worker threads.
pub const PROXY_WORKERS: usize = 2;

/// An in-process gateway with its own temporary directory (state file lives there).
pub struct TestGateway {
    pub gateway: Gateway,
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Parses `yaml` (relative paths against a fresh temp dir), starts the gateway, waits until ready.
    pub async fn start(yaml: &str) -> TestGateway {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(yaml, dir).await
    }

    /// Like [`start`](Self::start) in a given directory.
    pub async fn start_in(yaml: &str, dir: tempfile::TempDir) -> TestGateway {
        Self::start_with(yaml, dir, PROXY_WORKERS).await
    }

    /// Like [`start_in`](Self::start_in) with `workers` per-core proxy workers (0: client
    /// connections served on the test's runtime, sharing one part of each cluster's pool).
    pub async fn start_with(yaml: &str, dir: tempfile::TempDir, workers: usize) -> TestGateway {
        let config = Config::from_yaml(yaml, dir.path())
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n{yaml}"));
        let gateway = Gateway::start(Config {
            proxy_workers: workers,
            ..config
        })
        .await
        .expect("start gateway");
        tokio::time::timeout(WAIT, gateway.wait_ready())
            .await
            .expect("gateway ready");
        TestGateway { gateway, dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.gateway.proxy_addr(), path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.gateway.admin_addr(), path)
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }

    /// The durable state as rayshift reads it at start (state file and journal), as JSON.
    #[allow(dead_code)]
    pub fn stored_state(&self) -> Option<serde_json::Value> {
        rayshift::state::StateStore::new(self.state_file())
            .load()
            .expect("state readable")
            .map(|s| serde_json::to_value(s).unwrap())
    }

    /// `GET /v1/state` as JSON.
    pub async fn state(&self) -> serde_json::Value {
        let r = get(&self.admin("/v1/state")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        serde_json::from_str(&r.body).expect("state json")
    }

    /// Weight, readiness of a cluster from `/v1/state`.
    pub async fn cluster_state(&self, name: &str) -> serde_json::Value {
        let state = self.state().await;
        find_cluster(&state, name).unwrap_or_else(|| panic!("cluster {name} not in state: {state}"))
    }

    /// Waits until the cluster's readiness in `/v1/state` is `ready`.
    pub async fn wait_cluster_ready(&self, name: &str, ready: bool) {
        let deadline = Instant::now() + WAIT;
        loop {
            // A cluster just handed to discovery may not be in the table yet.
            if find_cluster(&self.state().await, name).is_some_and(|c| c["ready"] == ready) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "cluster {name} never became ready={ready}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `PUT /v1/shards/{shard}/weights`.
    pub async fn set_weights(&self, shard: &str, weights: &[(&str, u32)]) -> Resp {
        let map: BTreeMap<&str, u32> = weights.iter().copied().collect();
        let body = serde_json::json!({ "weights": map }).to_string();
        put(
            &self.admin(&format!("/v1/shards/{shard}/weights")),
            &body,
            None,
        )
        .await
    }
}

/// The value of the series `series` (`name{labels}` as exported) in the gateway's `/metrics`.
pub async fn metric(gw: &TestGateway, series: &str) -> Option<f64> {
    let metrics = get(&gw.admin("/metrics")).await.body;
    let prefix = format!("{series} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.trim().parse().ok())
}

/// A cluster's entry in a `/v1/state` document.
pub fn find_cluster(state: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    state["shards"]
        .as_array()?
        .iter()
        .flat_map(|shard| shard["clusters"].as_array().into_iter().flatten())
        .find(|c| c["name"] == name)
        .cloned()
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

impl Resp {
    /// The `x-stub-cluster` header: which stub cluster answered.
    pub fn cluster(&self) -> Option<&str> {
        self.headers
            .get("x-stub-cluster")
            .and_then(|v| v.to_str().ok())
    }
}

/// A shared plain HTTP/1.1 client.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(2))
        .build_http()
}

/// Sends a request and reads the whole response (bounded by [`WAIT`]).
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let fut = async {
        let resp = client().request(req).await.expect("send request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("read body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    };
    tokio::time::timeout(WAIT, fut)
        .await
        .expect("request timed out")
}

pub async fn get(url: &str) -> Resp {
    send(Method::GET, url, &[], "").await
}

pub async fn put(url: &str, body: &str, token: Option<&str>) -> Resp {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    send(Method::PUT, url, &headers, body).await
}

/// Polls `cond` until true or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Outcome counts of a [`Load`] run.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    /// Responses per answering cluster (`x-stub-cluster`).
    pub by_cluster: BTreeMap<String, u64>,
    /// A few failure descriptions, for the assertion message.
    pub failures: Vec<String>,
}

/// Closed-loop load: `concurrency` tasks sending requests back to back until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<LoadReport>>,
}

impl Load {
    /// GETs to `url` (and, when `with_posts`, every other request a small POST).
    pub fn start(url: String, concurrency: usize, with_posts: bool) -> Load {
        let mut requests = vec![(Method::GET, url.clone())];
        if with_posts {
            requests.push((Method::POST, url));
        }
        Self::rotating(requests, concurrency)
    }

    /// Requests cycling through `requests` (method, URL); POSTs carry a small body.
    pub fn rotating(requests: Vec<(Method, String)>, concurrency: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..concurrency)
            .map(|worker| {
                let (stop, sent, requests) =
                    (Arc::clone(&stop), Arc::clone(&sent), requests.clone());
                tokio::spawn(async move {
                    let client = client();
                    let mut report = LoadReport::default();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let (method, url) =
                            &requests[((i + worker as u64) % requests.len() as u64) as usize];
                        let post = method == Method::POST;
                        let req = Request::builder()
                            .method(method.clone())
                            .uri(url)
                            .body(Full::new(if post {
                                Bytes::from_static(b"payload")
                            } else {
                                Bytes::new()
                            }))
                            .expect("request");
                        let result = tokio::time::timeout(Duration::from_secs(10), async {
                            let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
                            let status = resp.status();
                            let cluster = resp
                                .headers()
                                .get("x-stub-cluster")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_string();
                            let body = resp
                                .into_body()
                                .collect()
                                .await
                                .map_err(|e| format!("body: {e:?}"))?;
                            let _ = body.to_bytes();
                            Ok::<_, String>((status, cluster))
                        })
                        .await
                        .unwrap_or_else(|_| Err("timed out".into()));
                        sent.fetch_add(1, Ordering::Relaxed);
                        match result {
                            Ok((status, cluster)) if status.is_success() => {
                                report.ok += 1;
                                *report.by_cluster.entry(cluster).or_default() += 1;
                            }
                            Ok((status, cluster)) => {
                                report.failed += 1;
                                if report.failures.len() < 5 {
                                    report.failures.push(format!("{status} from {cluster}"));
                                }
                            }
                            Err(e) => {
                                report.failed += 1;
                                if report.failures.len() < 5 {
                                    report.failures.push(e);
                                }
                            }
                        }
                    }
                    report
                })
            })
            .collect();
        Load { stop, sent, tasks }
    }

    /// Requests completed so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more requests completed.
    pub async fn wait_for_more(&self, n: u64) {
        let target = self.sent() + n;
        let sent = Arc::clone(&self.sent);
        eventually(&format!("{n} more load requests"), || {
            let sent = Arc::clone(&sent);
            async move { sent.load(Ordering::Relaxed) >= target }
        })
        .await;
    }

    /// Stops the load and sums up.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        for t in self.tasks {
            let r = t.await.expect("load task");
            total.ok += r.ok;
            total.failed += r.failed;
            for (k, v) in r.by_cluster {
                *total.by_cluster.entry(k).or_default() += v;
            }
            total.failures.extend(r.failures);
        }
        total
    }
}

/// The `rayshift` binary running as a child process; killed when dropped.
pub struct GatewayProcess {
    pub child: Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
}

impl GatewayProcess {
    /// Runs `rayshift run --config PATH` and reads the bound addresses from its stdout.
    pub fn spawn(config: &Path) -> Result<GatewayProcess, String> {
        Self::spawn_with_env(config, &[])
    }

    /// [`spawn`](Self::spawn) with more environment variables.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> Result<GatewayProcess, String> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rayshift"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn rayshift: {e}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stderr.take().expect("stderr");
            let sink = Arc::clone(&stderr);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut s = sink.lock().unwrap();
                    s.push_str(&line);
                    s.push('\n');
                }
            });
        }
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let parse = |line: &str, what: &str| -> Option<SocketAddr> {
            line.strip_prefix(&format!("rayshift: {what} listening on http://"))?
                .parse()
                .ok()
        };
        let (mut proxy, mut admin) = (None, None);
        let deadline = Instant::now() + WAIT;
        while proxy.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    proxy = proxy.or_else(|| parse(&line, "proxy"));
                    admin = admin.or_else(|| parse(&line, "admin"));
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "rayshift did not start (exit {status:?}); stderr:\n{}",
                        stderr.lock().unwrap()
                    ));
                }
            }
        }
        Ok(GatewayProcess {
            child,
            proxy: proxy.unwrap(),
            admin: admin.unwrap(),
            stderr,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// Waits for `/ready` to answer 200.
    pub async fn wait_ready(&self) {
        let url = self.admin("/ready");
        eventually("gateway process ready", || {
            let url = url.clone();
            async move { get(&url).await.status == StatusCode::OK }
        })
        .await;
    }

    /// Peak resident memory of the process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
            .unwrap_or(0)
    }

    /// SIGTERM (a graceful stop) and wait up to 30 s for the exit status.
    #[allow(dead_code)]
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(sent.success(), "kill -TERM failed");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Everything the server sends on `client` until it closes the connection (bounded by [`WAIT`]).
#[allow(dead_code)]
pub async fn read_answer(client: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = String::new();
    tokio::time::timeout(WAIT, client.read_to_string(&mut answer))
        .await
        .expect("answered")
        .unwrap();
    answer
}
