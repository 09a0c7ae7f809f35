//! The admin HTTP API (JSON) on `admin.listen`: state, weights, placement, metrics, liveness, readiness.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/live` | 200 while the process runs |
//! | GET | `/ready` | 200 once the first routing table is published, 503 before and while shutting down |
//! | GET | `/metrics` | Prometheus text format |
//! | GET | `/v1/state` | shards, clusters (weight, ready, in-flight), apps |
//! | GET | `/v1/placement?app=NAME` | the shard an application name maps to |
//! | PUT | `/v1/shards/{shard}/weights` | `{"weights": {"blue": 70, "green": 30}}` |
//! | POST | `/v1/shards/{shard}/shift` | start a shift: `{"to": "green", "step_percent": 10, ...}` |
//! | GET | `/v1/shards/{shard}/shift` | the shard's current or last shift |
//! | POST | `/v1/shards/{shard}/shift/{pause,resume,promote,abort}` | control a shift |
//! | POST | `/v1/rollouts` | start a fleet rollout: `{"revision": "v2", "max_concurrent": 1, ...}` |
//! | GET | `/v1/rollouts` | the current or last rollout |
//! | POST | `/v1/rollouts[/{id}]/{pause,resume,abort}` | control a rollout |
//!
//! Mutating calls need `Authorization: Bearer <token>` when `admin.token_file` is set.

mod api;
pub mod auth;
mod views;

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::SplitKey;
use crate::control::ControlHandle;
pub use auth::AdminToken;

/// What the admin handlers need.
#[derive(Debug)]
pub struct AdminContext {
    /// The control plane.
    pub control: ControlHandle,
    /// Renders `/metrics`.
    pub prometheus: PrometheusHandle,
    /// Bearer token for mutating calls.
    pub token: AdminToken,
    /// Shown in `/v1/state`.
    pub split_key: SplitKey,
    /// Policy keys a shift or rollout request leaves out.
    pub shift_defaults: crate::shift::ShiftPolicy,
    /// True once the gateway is shutting down (`/ready` answers 503).
    pub shutting_down: watch::Receiver<bool>,
    /// How long a client has to send a request head, and then its body
    /// (`admin.request_timeout`).
    pub request_timeout: Duration,
    /// How long the series of a cluster that left stay on `/metrics`
    /// (`admin.removed_series_ttl`).
    pub removed_series_ttl: Duration,
}

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<AdminContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let ctx = Arc::clone(&ctx);
                tokio::spawn(async move {
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(ctx.request_timeout)
                        .serve_connection(
                            TokioIo::new(stream),
                            service_fn(move |req| api::handle(Arc::clone(&ctx), req)),
                        );
                    let _ = conn.await;
                });
            }
            () = crate::gateway::stopped(&mut shutdown) => return,
        }
    }
}
