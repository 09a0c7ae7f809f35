//! The client-facing reverse proxy: listener, per-request forwarding, header hygiene, upstream pool.
//!
//! The request path reads one routing snapshot per request from an `ArcSwap` and never waits on the
//! control plane; the only lock it takes is its cluster's connection pool, for one push or pop.

pub mod body;
mod conn_watch;
pub mod forward;
pub mod h1;
pub mod headers;
pub mod pool;
pub mod request_body;
pub mod retry;
pub mod server;
pub mod split_key;
mod tunnel;
pub mod workers;

use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;

use crate::config::{Config, SplitKey};
use crate::proxy::pool::Connector;
use crate::proxy::retry::RetryBudget;
use crate::snapshot::Snapshot;

/// Everything a request needs, shared by all connections of one listener.
#[derive(Debug)]
pub struct ProxyContext {
    /// The routing snapshot, swapped by the control plane.
    pub table: Arc<ArcSwap<Snapshot>>,
    /// Opens connections to the clusters (each cluster pools its own, see [`pool`]).
    pub connector: Connector,
    /// How requests are keyed for a sticky split.
    pub split_key: SplitKey,
    /// Value of `x-forwarded-proto` (`http` or `https`).
    pub proto: &'static str,
    /// Longest wait for a new connection to a cluster, TCP and TLS handshake together
    /// (`upstream.connect_timeout`).
    pub connect_timeout: std::time::Duration,
    /// Longest wait for response headers (`upstream.response_timeout`).
    pub response_timeout: std::time::Duration,
    /// Largest request body accepted (`limits.max_body_bytes`).
    pub max_body_bytes: Option<u64>,
    /// Longest pause while a client sends its body (`limits.body_read_timeout`).
    pub body_read_timeout: std::time::Duration,
    /// Longest an upgraded connection may carry no bytes before it is closed
    /// (`limits.tunnel_idle_timeout`).
    pub tunnel_idle_timeout: std::time::Duration,
    /// Whether safe retries are on (`upstream.retries`).
    pub retries: bool,
    /// Most requests in flight to one cluster (`upstream.max_requests_per_cluster`).
    pub max_requests_per_cluster: u64,
    /// The retry budget shared by all requests.
    pub retry: RetryBudget,
    /// Upgraded connections (WebSockets) open now: they leave hyper's connection tracking when
    /// they switch protocols, so the shutdown drain waits on this count.
    pub open_tunnels: Arc<std::sync::atomic::AtomicU64>,
    /// Client connections on the direct HTTP/1.1 path now (also outside hyper's tracking).
    pub open_direct: Arc<std::sync::atomic::AtomicU64>,
    /// Whether HTTP/1.1 requests start on the direct path (`upstream.direct_http1`).
    pub direct_http1: bool,
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
            connector: cluster_connector(config.upstream.connect_timeout, upstream_tls),
            split_key: config.split_key.clone(),
            proto: if config.tls.is_some() {
                "https"
            } else {
                "http"
            },
            connect_timeout: config.upstream.connect_timeout,
            response_timeout: config.upstream.response_timeout,
            max_body_bytes: config.limits.max_body_bytes,
            body_read_timeout: config.limits.body_read_timeout,
            tunnel_idle_timeout: config.limits.tunnel_idle_timeout,
            retries: config.upstream.retries,
            max_requests_per_cluster: config.upstream.max_requests_per_cluster,
            open_tunnels: Arc::default(),
            open_direct: Arc::default(),
            direct_http1: config.upstream.direct_http1,
            retry: RetryBudget::new(
                config.upstream.retry_budget,
                config.upstream.retry_min_per_second,
            ),
        }
    }
}

/// A connection counted in one of [`ProxyContext`]'s open-connection counts
/// ([`ProxyContext::open_tunnels`], [`ProxyContext::open_direct`]) until it is dropped.
pub(crate) struct Open(Arc<std::sync::atomic::AtomicU64>);

impl Open {
    /// Counts one more in `counter`.
    pub(crate) fn new(counter: &Arc<std::sync::atomic::AtomicU64>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(Arc::clone(counter))
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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

/// Closes expired idle upstream connections of the clusters in `table` every `every` (the pools
/// also drop them when a request or a returned connection finds them): an idle gateway does not
/// keep sockets open past `upstream.idle_timeout`. Ends when the table is gone.
pub async fn prune_idle_connections(
    table: std::sync::Weak<ArcSwap<Snapshot>>,
    every: std::time::Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(table) = table.upgrade() else { return };
        for cluster in table.load().clusters.iter() {
            cluster.pool.prune();
        }
    }
}

/// The path a request is routed by: percent-decoded, as Serve matches route prefixes against the
/// decoded path (`/caf%C3%A9` is under the prefix `/café`, `/api%2Fv1` under `/api`). The request
/// is forwarded with the path as it came. A path that does not decode to UTF-8 is matched as it is.
pub(crate) fn route_path(raw: &str) -> std::borrow::Cow<'_, str> {
    if !raw.as_bytes().contains(&b'%') {
        return std::borrow::Cow::Borrowed(raw);
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .unwrap_or(std::borrow::Cow::Borrowed(raw))
}

/// A request's cluster in `split`: sticky by its split key's hash `key` when it has one, else at
/// random by weight; with the value a retry picks from (`pick_excluding`).
#[inline]
pub(crate) fn pick(
    split: &crate::routing::Split,
    key: Option<u64>,
) -> (Option<crate::routing::ClusterId>, u64) {
    match key {
        Some(key) => (split.pick_key(key), key),
        None => {
            let x = fastrand::u64(..);
            (split.pick(x), x)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::route_path;

    #[test]
    fn routing_paths_are_percent_decoded() {
        assert_eq!(route_path("/api/v1"), "/api/v1");
        assert_eq!(route_path("/api%2Fv1"), "/api/v1");
        assert_eq!(route_path("/caf%C3%A9/x"), "/café/x");
        assert_eq!(route_path("/%61pi"), "/api");
        // Not UTF-8 once decoded, or not an escape at all: as it came.
        assert_eq!(route_path("/%FF"), "/%FF");
        assert_eq!(route_path("/100%"), "/100%");
    }
}
