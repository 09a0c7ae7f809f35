//! The client-facing reverse proxy: listener, per-request forwarding, header hygiene, upstream pool.
//!
//! The request path reads one routing snapshot per request from an `ArcSwap` and never takes a lock
//! or waits on the control plane.

pub mod body;
pub mod forward;
pub mod headers;
pub mod request_body;
pub mod retry;
pub mod server;
pub mod split_key;

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Config, SplitKey, UpstreamConfig};
use crate::proxy::request_body::RequestBody;
use crate::proxy::retry::RetryBudget;
use crate::snapshot::Snapshot;

/// Pooled HTTP/1.1 client to the Serve clusters (one pool per scheme and `host:port`): plain TCP
/// for `http://` clusters, rustls for `https://` ones.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

/// Everything a request needs, shared by all connections of one listener.
#[derive(Debug)]
pub struct ProxyContext {
    /// The routing snapshot, swapped by the control plane.
    pub table: Arc<ArcSwap<Snapshot>>,
    /// Keep-alive connection pool to the clusters.
    pub client: UpstreamClient,
    /// How requests are keyed for a sticky split.
    pub split_key: SplitKey,
    /// Value of `x-forwarded-proto` (`http` or `https`).
    pub proto: &'static str,
    /// Longest wait for response headers (`upstream.response_timeout`).
    pub response_timeout: std::time::Duration,
    /// Largest request body accepted (`limits.max_body_bytes`).
    pub max_body_bytes: Option<u64>,
    /// Whether safe retries are on (`upstream.retries`).
    pub retries: bool,
    /// The retry budget shared by all requests.
    pub retry: RetryBudget,
    /// Upgraded connections (WebSockets) open now: they leave hyper's connection tracking when
    /// they switch protocols, so the shutdown drain waits on this count.
    pub open_tunnels: Arc<std::sync::atomic::AtomicU64>,
}

impl ProxyContext {
    /// A context routing by `table`, configured by `config`; `upstream_tls` is the client
    /// configuration for `https://` clusters (see [`crate::tls::client_config`]).
    pub fn new(
        table: Arc<ArcSwap<Snapshot>>,
        config: &Config,
        upstream_tls: rustls::ClientConfig,
    ) -> Self {
        Self {
            table,
            client: upstream_client(&config.upstream, upstream_tls),
            split_key: config.split_key.clone(),
            proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            response_timeout: config.upstream.response_timeout,
            max_body_bytes: config.limits.max_body_bytes,
            retries: config.upstream.retries,
            open_tunnels: Arc::default(),
            retry: RetryBudget::new(
                config.upstream.retry_budget,
                config.upstream.retry_min_per_second,
            ),
        }
    }
}

/// Connections to clusters: plain TCP for `http://`, TLS (HTTP/1.1 only, like Serve) for
/// `https://`, with TCP_NODELAY and keep-alive probes. Shared by the request pool and the probes.
pub fn cluster_connector(
    connect_timeout: std::time::Duration,
    tls: rustls::ClientConfig,
) -> HttpsConnector<HttpConnector> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(std::time::Duration::from_secs(60)));
    // The HTTPS connector checks the scheme itself.
    http.enforce_http(false);
    HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// The upstream pool: HTTP/1.1 only (Serve speaks nothing else), idle connections closed before
/// Serve's own keep-alive timeout so a request never races a connection the server is closing.
/// `http://` clusters get plain TCP connections (the TLS layer only passes them through);
/// `https://` clusters get TLS with `tls` (certificate checked against the cluster's host name).
pub fn upstream_client(cfg: &UpstreamConfig, tls: rustls::ClientConfig) -> UpstreamClient {
    let connector = cluster_connector(cfg.connect_timeout, tls);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(cfg.idle_timeout)
        .pool_max_idle_per_host(cfg.max_idle_per_cluster)
        .build(connector)
}
