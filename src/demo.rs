//! `rayshift demo`: two Serve look-alike clusters (`blue` v1 and `green` v2) and a gateway in front,
//! with nothing else installed. The clusters come from the `serve-stub` crate, kept apart from the
//! gateway; the gateway itself is the real one, configured through the same YAML path as `run`.
//!
//! With `--shift` the demo also drives steady traffic through the gateway and shifts `shard-0` to
//! `green` through the admin API, showing the same progress line as `rayshift shift watch`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serve_stub::{ServeStub, StubConfig};
use tokio::time::Instant;

use crate::client::{
    thousands, watch_shift, AdminClient, ClientError, Outcome, ProgressPrinter, ShiftProgress,
    WatchError, WatchOptions,
};
use crate::config::{Config, ConfigErrors};
use crate::gateway::{Gateway, GatewayError};

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Client traffic.
    pub listen: SocketAddr,
    /// Admin API.
    pub admin_listen: SocketAddr,
    /// Per-core proxy workers (`Config::proxy_workers`; 0: none).
    pub proxy_workers: usize,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A demo cluster could not start.
    #[error("starting demo cluster {name}: {source}")]
    Cluster {
        /// The cluster.
        name: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The generated config was rejected (a bug).
    #[error("demo config: {0}")]
    Config(#[from] ConfigErrors),
    /// The state directory could not be created.
    #[error("creating demo state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// The demo's shift could not be started or read through the admin API.
    #[error("demo shift: {0}")]
    Client(#[from] ClientError),
    /// The demo's shift could not be followed.
    #[error("demo shift: {0}")]
    Watch(#[from] WatchError),
}

/// A running demo.
#[derive(Debug)]
pub struct Demo {
    /// The gateway.
    pub gateway: Gateway,
    /// Cluster `blue`, revision v1.
    pub blue: ServeStub,
    /// Cluster `green`, revision v2.
    pub green: ServeStub,
    state_dir: PathBuf,
}

/// Apps both demo clusters serve.
const APPS: [(&str, &str); 2] = [("echo", "/echo"), ("summarize", "/summarize")];

/// Starts both demo clusters and the gateway (blue 80, green 20 in one shard).
pub async fn start(opts: &DemoOptions) -> Result<Demo, DemoError> {
    let apps: Vec<(String, String)> = APPS
        .iter()
        .map(|(a, p)| (a.to_string(), p.to_string()))
        .collect();
    let stub = |name: &'static str, revision: &str| {
        let cfg = StubConfig {
            name: name.into(),
            revision: revision.into(),
            apps: apps.clone(),
        };
        async move {
            ServeStub::start(cfg)
                .await
                .map_err(|source| DemoError::Cluster { name, source })
        }
    };
    let blue = stub("blue", "v1").await?;
    let green = stub("green", "v2").await?;
    let state_dir = std::env::temp_dir().join(format!("rayshift-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).map_err(|source| DemoError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let yaml = format!(
        r#"
listen: "{listen}"
admin:
  listen: "{admin}"
state_file: state.json
shards: [shard-0]
clusters:
  - name: blue
    shard: shard-0
    revision: v1
    serve_url: {blue}
    weight: 80
  - name: green
    shard: shard-0
    revision: v2
    serve_url: {green}
    weight: 20
probe:
  interval: 500ms
  timeout: 500ms
"#,
        listen = opts.listen,
        admin = opts.admin_listen,
        blue = blue.url(),
        green = green.url(),
    );
    let started = match Config::from_yaml(&yaml, &state_dir) {
        Ok(config) => Gateway::start(Config {
            proxy_workers: opts.proxy_workers,
            ..config
        })
        .await
        .map_err(DemoError::from),
        Err(e) => Err(DemoError::from(e)),
    };
    let gateway = match started {
        Ok(gateway) => gateway,
        Err(e) => {
            // A taken port, say: leave nothing behind in the temporary directory.
            blue.shutdown().await;
            green.shutdown().await;
            let _ = std::fs::remove_dir_all(&state_dir);
            return Err(e);
        }
    };
    gateway.wait_ready().await;
    Ok(Demo {
        gateway,
        blue,
        green,
        state_dir,
    })
}

impl Demo {
    /// What to print for the user: URLs and commands to try.
    pub fn banner(&self) -> String {
        let proxy = self.gateway.proxy_addr();
        let admin = self.gateway.admin_addr();
        format!(
            "rayshift demo is running.\n\
             \n  clusters   blue (v1) {blue}   green (v2) {green}   apps: /echo /summarize\
             \n  gateway    http://{proxy}\
             \n  admin      http://{admin}   (/v1/state, /metrics)\n\
             \nTry:\
             \n  curl http://{proxy}/echo                     # answered by blue (80%) or green (20%)\
             \n  curl http://{admin}/v1/state\
             \n  curl -X PUT http://{admin}/v1/shards/shard-0/weights -d '{{\"weights\": {{\"blue\": 0, \"green\": 100}}}}'\
             \n  curl -N 'http://{proxy}/echo/stream?n=5&interval_ms=300'   # a streamed (SSE) response\n\
             \nCtrl-C stops everything.\n",
            blue = self.blue.url(),
            green = self.green.url(),
        )
    }

    /// Drives traffic through the gateway, shifts `shard-0` to `green` (20% steps every 2 s, at
    /// least 10 requests per window) and shows its progress on `printer` until the shift ends.
    pub async fn run_shift(&self, printer: &mut ProgressPrinter) -> Result<ShiftReport, DemoError> {
        let admin = AdminClient::new(&format!("http://{}", self.gateway.admin_addr()), None)?;
        let traffic = Traffic::start(self.gateway.proxy_addr(), 4);
        let started = Instant::now();
        let body = serde_json::json!({
            "to": "green",
            "step_percent": 20,
            "step_interval": "2s",
            "min_requests": 10,
        });
        let watched = async {
            let accepted = admin.post_json("/v1/shards/shard-0/shift", &body).await?;
            if let Ok(p) = ShiftProgress::from_json(&accepted) {
                printer.println(&format!("shard-0: {}", p.summary()));
            }
            let opts = WatchOptions {
                interval: Duration::from_millis(250),
                ..WatchOptions::default()
            };
            let ended = watch_shift(&admin, "shard-0", opts, |p| {
                printer.update(&p.progress_line())
            })
            .await?;
            printer.finish();
            Ok::<_, DemoError>(ended)
        };
        let result = watched.await;
        let elapsed = started.elapsed();
        let counts = traffic.stop().await;
        let (outcome, last) = result?;
        let state = admin.get_json("/v1/state").await?;
        let drained = state["shards"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == "shard-0")
            .flat_map(|s| s["clusters"].as_array().into_iter().flatten())
            .filter_map(|c| {
                let drain = c["drain"].as_str()?;
                Some(format!("{} {drain}", c["name"].as_str()?))
            })
            .collect();
        Ok(ShiftReport {
            outcome,
            elapsed,
            ok: counts.ok,
            failed: counts.failed,
            drained,
            reason: last.reason,
        })
    }

    /// Stops the gateway and both clusters and removes the demo's state directory.
    pub async fn stop(self) {
        self.gateway.shutdown().await;
        self.blue.shutdown().await;
        self.green.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// What the demo's shift did, for its closing line.
#[derive(Debug, Clone)]
pub struct ShiftReport {
    /// How the shift ended.
    pub outcome: Outcome,
    /// From the start request to the end.
    pub elapsed: Duration,
    /// Demo requests answered 2xx.
    pub ok: u64,
    /// Demo requests that failed (non-2xx, connection or body errors).
    pub failed: u64,
    /// `blue drained`: the shard's clusters with a drain state afterwards.
    pub drained: Vec<String>,
    /// Why the shift rolled back or was aborted.
    pub reason: Option<String>,
}

impl ShiftReport {
    /// `shift completed in 9.1 s: 4,213 requests, 0 failed; blue drained`.
    pub fn summary(&self) -> String {
        let state = match self.outcome {
            Outcome::Completed => "completed",
            Outcome::RolledBack => "rolled back",
            Outcome::Aborted => "aborted",
        };
        let mut line = format!(
            "shift {state} in {:.1} s: {} requests, {} failed",
            self.elapsed.as_secs_f64(),
            thousands(self.ok + self.failed),
            thousands(self.failed)
        );
        if !self.drained.is_empty() {
            line.push_str("; ");
            line.push_str(&self.drained.join(", "));
        }
        if let Some(reason) = &self.reason {
            line.push_str("; reason: ");
            line.push_str(reason);
        }
        line
    }
}

/// Outcome counts of demo traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficCounts {
    /// Answered 2xx with the whole body read.
    pub ok: u64,
    /// Anything else.
    pub failed: u64,
}

/// Steady demo traffic: a few tasks sending GET and POST `/echo` to the gateway, paced a little so
/// the demo does not take a whole machine.
#[derive(Debug)]
pub struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Pause between two requests of one traffic task.
const TRAFFIC_PACE: Duration = Duration::from_millis(5);

impl Traffic {
    /// Starts `workers` tasks sending to the gateway's client address.
    pub fn start(proxy: SocketAddr, workers: usize) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let url = format!("http://{proxy}/echo");
        let tasks = (0..workers)
            .map(|worker| {
                let (stop, ok, failed, url) = (
                    Arc::clone(&stop),
                    Arc::clone(&ok),
                    Arc::clone(&failed),
                    url.clone(),
                );
                tokio::spawn(async move {
                    let client = Client::builder(TokioExecutor::new())
                        .pool_idle_timeout(Duration::from_secs(5))
                        .build_http::<Full<Bytes>>();
                    let mut i = worker;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let (method, body) = if i % 2 == 0 {
                            (Method::POST, Bytes::from_static(b"{\"demo\": true}"))
                        } else {
                            (Method::GET, Bytes::new())
                        };
                        let Ok(req) = Request::builder()
                            .method(method)
                            .uri(&url)
                            .body(Full::new(body))
                        else {
                            return;
                        };
                        let exchange = async {
                            let resp = client.request(req).await.ok()?;
                            let status = resp.status();
                            resp.into_body().collect().await.ok()?;
                            Some(status.is_success())
                        };
                        let success = tokio::time::timeout(Duration::from_secs(10), exchange)
                            .await
                            .ok()
                            .flatten()
                            .unwrap_or(false);
                        if success { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(TRAFFIC_PACE).await;
                    }
                })
            })
            .collect();
        Traffic {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Counts so far.
    pub fn counts(&self) -> TrafficCounts {
        TrafficCounts {
            ok: self.ok.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops sending (requests under way finish) and returns the final counts.
    pub async fn stop(mut self) -> TrafficCounts {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.counts()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}
