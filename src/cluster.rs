//! A backend Ray cluster as the request path sees it: where to send requests, and its live counters.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use metrics::{Counter, Gauge, Histogram};

use crate::proxy::pool::ClusterPool;
use crate::stats::ClusterStats;
use crate::telemetry;

/// One Serve cluster (the Serve proxy of a RayCluster). Created once by the control plane when the
/// cluster appears and shared by `Arc` across routing-table snapshots, so its counters survive swaps.
#[derive(Debug)]
pub struct Cluster {
    /// Cluster name, unique in the gateway (e.g. `blue`).
    pub name: Arc<str>,
    /// Name of the shard the cluster serves.
    pub shard: Arc<str>,
    /// Revision label (e.g. `v2`); newer revisions are shift targets.
    pub revision: Arc<str>,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// `host:port` of the cluster's Serve HTTP proxy.
    pub authority: Authority,
    /// Outcome counters for shift analysis and `/v1/state`.
    pub stats: ClusterStats,
    /// `rayshift_request_duration_seconds{shard,cluster}`, resolved once.
    pub duration: Histogram,
    /// `rayshift_cluster_in_flight{cluster}`, resolved once.
    pub in_flight_gauge: Gauge,
    /// `rayshift_upstream_connections_opened_total{cluster}`, resolved once.
    pub connections_opened: Counter,
    /// `rayshift_upstream_overflow_total{cluster}`, resolved once.
    pub overflow: Counter,
    /// `rayshift_requests_total` handles by app and status code.
    pub requests: RequestCounters,
    /// Idle keep-alive connections to the cluster.
    pub pool: ClusterPool,
}

impl Cluster {
    /// Creates the cluster entry (with an empty connection pool) and resolves its metric handles.
    pub fn new(
        name: &str,
        shard: &str,
        revision: &str,
        scheme: Scheme,
        authority: Authority,
        pool: ClusterPool,
    ) -> Self {
        let duration = metrics::histogram!(
            telemetry::REQUEST_DURATION_SECONDS,
            "shard" => shard.to_string(),
            "cluster" => name.to_string()
        );
        let in_flight_gauge =
            metrics::gauge!(telemetry::CLUSTER_IN_FLIGHT, "cluster" => name.to_string());
        let connections_opened = metrics::counter!(
            telemetry::UPSTREAM_CONNECTIONS_OPENED_TOTAL,
            "cluster" => name.to_string()
        );
        let overflow =
            metrics::counter!(telemetry::UPSTREAM_OVERFLOW_TOTAL, "cluster" => name.to_string());
        Self {
            name: name.into(),
            shard: shard.into(),
            revision: revision.into(),
            scheme,
            authority,
            stats: ClusterStats::default(),
            duration,
            in_flight_gauge,
            connections_opened,
            overflow,
            requests: RequestCounters::default(),
            pool,
        }
    }

    /// Marks a request as started on this cluster; the guard marks it finished when dropped.
    /// `None` when `limit` requests are in flight on it already (`upstream.max_requests_per_cluster`):
    /// nothing is started (the caller answers, see `forward::overflow`).
    pub fn enter(self: &Arc<Self>, limit: u64) -> Option<InFlight> {
        if !self.stats.try_enter(limit) {
            return None;
        }
        // Increments, not the count just seen: concurrent enters and leaves on several threads
        // would otherwise leave whichever value was set last.
        self.in_flight_gauge.increment(1.0);
        Some(InFlight {
            cluster: Arc::clone(self),
        })
    }
}

/// A request in flight on a cluster; dropping it ends the request (on body end, error or cancel).
#[derive(Debug)]
pub struct InFlight {
    cluster: Arc<Cluster>,
}

impl InFlight {
    /// The cluster the request is on.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cluster.stats.leave();
        self.cluster.in_flight_gauge.decrement(1.0);
    }
}

/// Request counters by app name, then by status code (a few codes per app).
type CountersByApp = HashMap<Box<str>, Vec<(u16, Counter)>, foldhash::fast::RandomState>;

/// `rayshift_requests_total{app,shard,cluster,code}` handles of one cluster, resolved once per
/// (app, code) and then found without allocating or locking: the request path only loads an
/// `ArcSwap` and compares a few entries. A new (app, code) pair copies the small map once.
#[derive(Debug, Default)]
pub struct RequestCounters {
    by_app: ArcSwap<CountersByApp>,
}

impl RequestCounters {
    /// Counts one response of `app` with `status` on the cluster `cluster` of `shard`.
    pub fn increment(&self, app: &str, shard: &str, cluster: &str, status: http::StatusCode) {
        let code = status.as_u16();
        if let Some(codes) = self.by_app.load().get(app) {
            if let Some((_, counter)) = codes.iter().find(|(c, _)| *c == code) {
                counter.increment(1);
                return;
            }
        }
        let counter = metrics::counter!(
            telemetry::REQUESTS_TOTAL,
            "app" => app.to_string(),
            "shard" => shard.to_string(),
            "cluster" => cluster.to_string(),
            "code" => telemetry::status_label(status)
        );
        counter.increment(1);
        self.by_app.rcu(|map| {
            let mut map = HashMap::clone(map);
            let codes = map.entry(app.into()).or_default();
            if !codes.iter().any(|(c, _)| *c == code) {
                codes.push((code, counter.clone()));
            }
            map
        });
    }
}
