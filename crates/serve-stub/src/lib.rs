//! A small, fast, in-process HTTP/1.1 server that looks like the HTTP proxy of
//! a Ray Serve cluster, for rayshift's demo, integration tests and benchmarks.
//!
//! It serves on a real TCP socket:
//!
//! - `GET /-/healthz`: `200 success`, or `503 This node is being drained.`
//!   when [`ServeStub::set_healthy`]`(false)`.
//! - `GET /-/routes`: `200` with `{route_prefix: app_name}`, or `503` when
//!   [`ServeStub::set_routes_populated`]`(false)`.
//! - `GET /api/serve/applications/`: the dashboard's application list with a
//!   status per app ([`ServeStub::set_app_status`]).
//! - Anything else is routed to an app with Ray Serve's rule (longest route
//!   prefix first; prefix `P` matches path `X` when `P` ends in `/`, `X == P`
//!   or `X` starts with `P/`), or answered 404 like Ray Serve does.
//!
//! App responses carry `x-stub-cluster`, `x-stub-revision` and `x-stub-app`
//! (probe and 404 responses carry the first two). What an app request does
//! depends on the last segments of its path after the route prefix:
//!
//! | path ends in | answer |
//! | --- | --- |
//! | anything else | `200 <cluster> <revision> <app> <request body bytes>\n` |
//! | `/upload` | `200 {"bytes": N}` (the body is counted, never buffered) |
//! | `/stream?n=5&interval_ms=100` | `text/event-stream`, `n` chunks `data: <cluster> <i>\n\n`, each after `interval_ms` |
//! | `/headers` (or `/echo-headers`) | JSON of the request headers plus `_method`, `_uri`, `_version` |
//! | `/status/<code>` | status `<code>`, body `<cluster> <code>` |
//! | `/sleep/<ms>` | like the default after `ms` milliseconds |
//! | `/ws` | WebSocket echo: text `m` comes back as `<cluster>: m`, binary as is |
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use serve_stub::{ServeStub, StubConfig};
//! let stub = ServeStub::start(StubConfig::new("blue", "v1").with_app("echo", "/echo")).await?;
//! println!("GET {}/echo answers `blue v1 echo 0`", stub.url());
//! stub.set_error_rate(0.2); // every 5th app request answers 500
//! stub.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod body;
mod handlers;
mod server;
mod state;
mod websocket;

use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::Shared;

/// What a stub serves: the cluster's identity and its applications.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StubConfig {
    /// Cluster name, e.g. `"blue"`; sent as `x-stub-cluster` and in bodies.
    pub name: String,
    /// Revision, e.g. `"v1"`; sent as `x-stub-revision` and in bodies.
    pub revision: String,
    /// Applications as `(app name, route prefix)`, e.g. `("echo", "/echo")`.
    pub apps: Vec<(String, String)>,
}

impl StubConfig {
    /// A config for cluster `name` at `revision` with no apps yet.
    pub fn new(name: impl Into<String>, revision: impl Into<String>) -> Self {
        StubConfig {
            name: name.into(),
            revision: revision.into(),
            apps: Vec::new(),
        }
    }

    /// Adds app `name` served under `route_prefix`.
    pub fn with_app(mut self, name: impl Into<String>, route_prefix: impl Into<String>) -> Self {
        self.apps.push((name.into(), route_prefix.into()));
        self
    }
}

/// A running stub: a cheap, cloneable handle to the server and its knobs.
///
/// Every knob takes effect on the next request. The server stops on
/// [`shutdown`](Self::shutdown), on [`kill`](Self::kill), or when the last
/// handle is dropped.
#[derive(Clone)]
#[must_use = "the server stops when the last ServeStub handle is dropped"]
pub struct ServeStub {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    /// The listener, kept here only so that [`Inner::stop`] can shut it down
    /// synchronously; the accept loop holds the other reference.
    listener: Mutex<Option<Arc<TcpListener>>>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl Inner {
    /// Signals every task to stop and stops the listener from accepting.
    fn stop(&self) {
        self.stop.send_replace(true);
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(listener) = listener {
            // On Linux this makes the listening socket refuse connections at
            // once, before the accept loop wakes up to close it.
            let _ = socket2::SockRef::from(&*listener).shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl ServeStub {
    /// Starts a stub on `127.0.0.1` with a port chosen by the system.
    pub async fn start(cfg: StubConfig) -> std::io::Result<ServeStub> {
        Self::start_on(cfg, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts a stub listening on `addr` (port 0 picks a free port).
    pub async fn start_on(cfg: StubConfig, addr: SocketAddr) -> std::io::Result<ServeStub> {
        let listener = Arc::new(TcpListener::bind(addr).await?);
        let addr = listener.local_addr()?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(
            cfg.name,
            cfg.revision,
            cfg.apps,
            stop_rx.clone(),
        ));
        let accept_task = tokio::spawn(server::accept_loop(
            Arc::clone(&listener),
            Arc::clone(&shared),
            stop_rx,
        ));
        tracing::debug!(name = %shared.name, %addr, "serve-stub: listening");
        Ok(ServeStub {
            inner: Arc::new(Inner {
                shared,
                addr,
                stop: stop_tx,
                listener: Mutex::new(Some(listener)),
                accept_task: Mutex::new(Some(accept_task)),
            }),
        })
    }

    /// The address the stub listens on.
    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The base URL, e.g. `http://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("http://{}", self.inner.addr)
    }

    /// The cluster name.
    pub fn name(&self) -> &str {
        &self.inner.shared.name
    }

    /// `true`: `/-/healthz` answers 200 `success`; `false`: 503
    /// `This node is being drained.` (as a draining Ray Serve proxy).
    pub fn set_healthy(&self, healthy: bool) {
        self.inner.shared.set_healthy(healthy);
    }

    /// `true`: `/-/routes` answers 200 with the route table; `false`: 503
    /// `Route table is not populated yet.` Routing itself is unaffected.
    pub fn set_routes_populated(&self, yes: bool) {
        self.inner.shared.set_routes_populated(yes);
    }

    /// Replaces the apps, as `(app name, route prefix)`; changes `/-/routes`,
    /// the dashboard and routing. Statuses set before are kept by app name.
    pub fn set_apps(&self, apps: Vec<(String, String)>) {
        self.inner.shared.set_apps(apps);
    }

    /// Sets the status the dashboard reports for `app` (`RUNNING` until set),
    /// e.g. `DEPLOYING`, `DEPLOY_FAILED`, `UNHEALTHY`. Routing is unaffected.
    pub fn set_app_status(&self, app: &str, status: &str) {
        self.inner.shared.set_app_status(app, status);
    }

    /// Answers this share of app requests (clamped to 0..=1) with 500, on a
    /// fixed pattern that restarts now: with 0.2 exactly the 5th, 10th, ...
    /// app request from now on fails. Probes never fail by this knob.
    pub fn set_error_rate(&self, ratio: f64) {
        self.inner.shared.set_error_rate(ratio);
    }

    /// Delay added before answering each app request (probes are not delayed).
    pub fn set_latency(&self, d: Duration) {
        self.inner.shared.set_latency(d);
    }

    /// Delay added before answering each probe (`/-/healthz`, `/-/routes`, the dashboard's
    /// application list), as from a busy head node.
    pub fn set_probe_latency(&self, d: Duration) {
        self.inner.shared.set_probe_latency(d);
    }

    /// App requests received since start or [`reset_requests`](Self::reset_requests)
    /// (including those answered 500 by the error knob; not probes, not 404s).
    pub fn requests(&self) -> u64 {
        self.inner.shared.requests()
    }

    /// Sets [`requests`](Self::requests) back to 0.
    pub fn reset_requests(&self) {
        self.inner.shared.reset_requests();
    }

    /// Requests to `/-/healthz`, `/-/routes` and the dashboard API since start.
    pub fn probe_requests(&self) -> u64 {
        self.inner.shared.probe_requests()
    }

    /// App requests being handled now, including response bodies still being
    /// streamed and open WebSocket sessions.
    pub fn in_flight(&self) -> u64 {
        self.inner.shared.in_flight()
    }

    /// Stops accepting, closes the listener and aborts every connection, then
    /// waits until all of the stub's tasks are gone and its port is free.
    pub async fn shutdown(self) {
        self.inner.stop();
        let task = self
            .inner
            .accept_task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
        // Connection tasks are gone; WebSocket tasks saw the stop signal and
        // end at their next poll, dropping their in-flight guards.
        for _ in 0..1000 {
            if self.in_flight() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Simulates a dead process: from now on new connections are refused
    /// (at once on Linux), and every open connection and WebSocket is
    /// aborted as soon as the runtime runs the stub's tasks. Does not wait.
    pub fn kill(&self) {
        self.inner.stop();
    }
}

impl std::fmt::Debug for ServeStub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeStub")
            .field("name", &self.name())
            .field("addr", &self.addr())
            .finish_non_exhaustive()
    }
}
