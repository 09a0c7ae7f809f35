//! Every metric name rayshift exports, their help texts, the Prometheus recorder and log setup.
//!
//! Dashboards and alert rules depend on these names: they are a public contract. Add new metrics here,
//! never rename one.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests answered, by application, shard, cluster and status code (`cluster` is `none` when the
/// gateway answered itself, e.g. 503 without a ready cluster).
pub const REQUESTS_TOTAL: &str = "rayshift_requests_total";
/// Time from receiving a request (a retried one: from its retry) to the answering cluster's
/// response headers, by shard and cluster.
pub const REQUEST_DURATION_SECONDS: &str = "rayshift_request_duration_seconds";
/// Failed upstream attempts by cluster and kind (`connect`, `request`, `body`, ...).
pub const UPSTREAM_ERRORS_TOTAL: &str = "rayshift_upstream_errors_total";
/// Connections opened to each cluster (a pooled connection carries many requests).
pub const UPSTREAM_CONNECTIONS_OPENED_TOTAL: &str = "rayshift_upstream_connections_opened_total";
/// Client connections the gateway closed because a limit passed, by `reason` ([`CLOSE_REASONS`]).
pub const CLIENT_CONNECTIONS_CLOSED_TOTAL: &str = "rayshift_client_connections_closed_total";
/// Why the gateway closed a client connection: `header_timeout` (no request, or a request head
/// not complete, or with TLS no finished handshake, within `limits.header_read_timeout`), `http2_idle` (HTTP/2 with no request in
/// flight for `limits.http2_idle_timeout`: told GOAWAY), `send_timeout` (a client taking no
/// response data for `limits.send_timeout`: HTTP/2 flow control, or TCP on HTTP/1.1), `resets`
/// (HTTP/2 resetting more than 200 streams before their response within 10 s), `tunnel_idle` (an
/// upgraded connection that carried nothing for `limits.tunnel_idle_timeout`), `tls_handshake` (a
/// TLS handshake that failed: not TLS, no shared protocol version or cipher, a bad message).
pub const CLOSE_REASONS: [&str; 6] = [
    "header_timeout",
    "http2_idle",
    "send_timeout",
    "resets",
    "tunnel_idle",
    "tls_handshake",
];
/// Requests answered 503 because their cluster had `upstream.max_requests_per_cluster` in flight.
pub const UPSTREAM_OVERFLOW_TOTAL: &str = "rayshift_upstream_overflow_total";
/// Configured traffic weight (0-100) of each cluster in its shard.
pub const CLUSTER_WEIGHT: &str = "rayshift_cluster_weight";
/// 1 when the cluster passes its readiness probes, is ready in Kubernetes (a discovered one) and
/// is not ejected by passive health, else 0.
pub const CLUSTER_READY: &str = "rayshift_cluster_ready";
/// 1 while the cluster is one of the gateway's (configured or discovered), 0 once it left.
pub const CLUSTER_PRESENT: &str = "rayshift_cluster_present";
/// Requests currently in flight on each cluster.
pub const CLUSTER_IN_FLIGHT: &str = "rayshift_cluster_in_flight";
/// Client connections each proxy worker serves now (only with per-core workers).
pub const WORKER_CONNECTIONS: &str = "rayshift_worker_connections";
/// Routing-table snapshots published.
pub const ROUTING_TABLE_UPDATES_TOTAL: &str = "rayshift_routing_table_updates_total";
/// Readiness probes sent to clusters, by cluster and result.
pub const PROBES_TOTAL: &str = "rayshift_probes_total";
/// Applications in the routing table, by shard.
pub const APPS: &str = "rayshift_apps";
/// Gauge: apps of a shard served by draining clusters, no other cluster of theirs able to take
/// requests (label `shard`).
pub const APPS_ON_DRAINING_CLUSTERS: &str = "rayshift_apps_on_draining_clusters";

/// 1 for the shard's current shift state (`idle`, `progressing`, `paused`, `draining`,
/// `completed`, `rolled_back`, `aborted`), 0 for the others.
pub const SHIFT_STATE: &str = "rayshift_shift_state";
/// Weight (0-100) the shard's shift has moved to its target.
pub const SHIFT_TARGET_WEIGHT: &str = "rayshift_shift_target_weight";
/// Steps taken by shifts, by shard.
pub const SHIFT_STEPS_TOTAL: &str = "rayshift_shift_steps_total";
/// Automatic rollbacks, by shard and reason (`error_rate`, `latency`, `not_ready`).
pub const SHIFT_ROLLBACKS_TOTAL: &str = "rayshift_shift_rollbacks_total";
/// Failed analysis checks, by shard and check (`error_rate`, `latency`).
pub const SHIFT_CHECK_FAILURES_TOTAL: &str = "rayshift_shift_check_failures_total";
/// 1 while a cluster drains after a promoted shift.
pub const CLUSTER_DRAINING: &str = "rayshift_cluster_draining";
/// 1 once a cluster is drained (safe to delete).
pub const CLUSTER_DRAINED: &str = "rayshift_cluster_drained";
/// Shards of the current rollout by state (`waiting`, `shifting`, `done`, `failed`).
pub const ROLLOUT_SHARDS: &str = "rayshift_rollout_shards";

/// Retries sent to another cluster, by the cluster that failed and reason (`connect`, `reset`).
pub const RETRIES_TOTAL: &str = "rayshift_retries_total";
/// Retries not sent because the retry budget was exhausted.
pub const RETRY_BUDGET_EXHAUSTED_TOTAL: &str = "rayshift_retry_budget_exhausted_total";
/// HTTP/1.1 client connections handed from the direct path to the general one, by reason.
pub const HTTP1_HANDOFFS_TOTAL: &str = "rayshift_http1_handoffs_total";
/// Passive-health ejections, by cluster.
pub const CLUSTER_EJECTIONS_TOTAL: &str = "rayshift_cluster_ejections_total";
/// 1 while a cluster is ejected by passive health.
pub const CLUSTER_EJECTED: &str = "rayshift_cluster_ejected";

/// Reloads of the listener's TLS certificate and key (SIGHUP or file change), by result
/// (`ok`, `error`: the old certificate stays).
pub const TLS_RELOADS_TOTAL: &str = "rayshift_tls_reloads_total";
/// 1 while the certificate and key files on disk cannot be loaded (the last reload failed, or the
/// files became unreadable): the gateway still presents the certificate it loaded before.
pub const TLS_RELOAD_FAILING: &str = "rayshift_tls_reload_failing";

/// RayCluster watch events, by namespace and event (`init`, `init_apply`, `init_done`, `apply`, `delete`).
pub const KUBE_WATCH_EVENTS_TOTAL: &str = "rayshift_kube_watch_events_total";
/// RayCluster watch errors (the watch backs off and resumes), by namespace.
pub const KUBE_WATCH_ERRORS_TOTAL: &str = "rayshift_kube_watch_errors_total";

/// A `'static` label for a status code, without allocating per request.
pub fn status_label(status: http::StatusCode) -> &'static str {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| {
        (0..1000u16)
            .map(|c| &*Box::leak(c.to_string().into_boxed_str()))
            .collect()
    });
    labels
        .get(usize::from(status.as_u16()))
        .copied()
        .unwrap_or("other")
}

/// Histogram buckets for request durations, in seconds (Serve inference ranges from ms to minutes).
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Errors setting up telemetry.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The Prometheus recorder could not be built.
    #[error("building the Prometheus recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    /// Another metrics recorder was installed first, by someone other than rayshift.
    #[error("a different metrics recorder is already installed in this process")]
    AlreadyInstalled,
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

mod retention;
pub use retention::{cluster_joined, cluster_left};

/// The `/metrics` exposition: every series, except those of clusters that left the gateway more
/// than `removed_series_ttl` ago (see [`retention`]).
pub fn render(handle: &PrometheusHandle, removed_series_ttl: Duration) -> String {
    retention::filter(handle.render(), removed_series_ttl)
}

/// Installs the process-wide Prometheus recorder (once) and returns a handle to render `/metrics`.
///
/// Several gateways in one process (tests, the demo) share the recorder.
pub fn prometheus() -> Result<PrometheusHandle, TelemetryError> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(REQUEST_DURATION_SECONDS.to_string()),
            DURATION_BUCKETS,
        )?
        .build_recorder();
    let handle = recorder.handle();
    if HANDLE.set(handle.clone()).is_err() {
        // Lost a race with another thread that installed it: use theirs.
        return HANDLE
            .get()
            .cloned()
            .ok_or(TelemetryError::AlreadyInstalled);
    }
    metrics::set_global_recorder(recorder).map_err(|_| TelemetryError::AlreadyInstalled)?;
    describe();
    let upkeep = handle.clone();
    // The recorder's histograms need periodic upkeep to drain their buffers.
    std::thread::Builder::new()
        .name("rayshift-metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(5));
            upkeep.run_upkeep();
        })
        .ok();
    Ok(handle)
}

/// Registers help texts and units for every metric.
fn describe() {
    describe_counter!(
        REQUESTS_TOTAL,
        "Requests answered, by application, shard, cluster and status code."
    );
    describe_histogram!(
        REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Time from receiving a request (a retried one: from its retry) to the answering cluster's response headers."
    );
    describe_counter!(
        UPSTREAM_ERRORS_TOTAL,
        "Failed upstream attempts, by cluster and kind."
    );
    describe_counter!(
        UPSTREAM_CONNECTIONS_OPENED_TOTAL,
        "Connections opened to each cluster (pooled connections carry many requests)."
    );
    describe_counter!(
        UPSTREAM_OVERFLOW_TOTAL,
        "Requests answered 503 by the gateway because their cluster already had upstream.max_requests_per_cluster requests in flight (not sent, not counted against the cluster)."
    );
    describe_gauge!(
        CLUSTER_WEIGHT,
        "Configured traffic weight (0-100) of each cluster in its shard."
    );
    describe_gauge!(
        CLUSTER_READY,
        "1 when the cluster passes its readiness probes, is ready in Kubernetes (when discovered) and is not ejected by passive health, else 0."
    );
    describe_gauge!(
        CLUSTER_PRESENT,
        "1 while the cluster is one of the gateway's (configured or discovered), 0 after it left (its gauges then read 0; admin.removed_series_ttl later all its series leave /metrics)."
    );
    describe_gauge!(
        CLUSTER_IN_FLIGHT,
        "Requests currently in flight on each cluster."
    );
    describe_gauge!(
        WORKER_CONNECTIONS,
        "Client connections each proxy worker thread serves now (per-core workers only)."
    );
    describe_counter!(
        ROUTING_TABLE_UPDATES_TOTAL,
        "Routing-table snapshots published."
    );
    describe_counter!(
        PROBES_TOTAL,
        "Readiness probes sent to clusters, by cluster and result."
    );
    describe_gauge!(APPS, "Applications in the routing table, by shard.");
    describe_gauge!(
        APPS_ON_DRAINING_CLUSTERS,
        "Applications of the shard whose requests go to draining clusters (the old clusters of a promoted shift) because no other cluster of theirs can take requests, by shard; above 0, the shift's target is down."
    );
    describe_gauge!(
        SHIFT_STATE,
        "1 for the shard's current shift state, 0 for the others."
    );
    describe_gauge!(
        SHIFT_TARGET_WEIGHT,
        "Weight (0-100) the shard's shift has moved to its target."
    );
    describe_counter!(SHIFT_STEPS_TOTAL, "Steps taken by shifts, by shard.");
    describe_counter!(
        SHIFT_ROLLBACKS_TOTAL,
        "Automatic shift rollbacks, by shard and reason."
    );
    describe_counter!(
        SHIFT_CHECK_FAILURES_TOTAL,
        "Failed shift analysis checks, by shard and check."
    );
    describe_gauge!(
        CLUSTER_DRAINING,
        "1 while a cluster drains after a promoted shift."
    );
    describe_gauge!(
        CLUSTER_DRAINED,
        "1 once a cluster is drained and safe to delete."
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Retries sent to another cluster, by failed cluster and reason."
    );
    describe_counter!(
        RETRY_BUDGET_EXHAUSTED_TOTAL,
        "Retries not sent because the retry budget was exhausted."
    );
    describe_counter!(
        HTTP1_HANDOFFS_TOTAL,
        "Client connections handed from the direct HTTP/1.1 path to the general one, by reason."
    );
    describe_counter!(
        CLUSTER_EJECTIONS_TOTAL,
        "Passive-health ejections, by cluster."
    );
    describe_gauge!(
        CLUSTER_EJECTED,
        "1 while a cluster is ejected by passive health."
    );
    describe_counter!(
        KUBE_WATCH_EVENTS_TOTAL,
        "RayCluster watch events, by namespace and event."
    );
    describe_counter!(
        KUBE_WATCH_ERRORS_TOTAL,
        "RayCluster watch errors (retried with backoff), by namespace."
    );
    describe_gauge!(ROLLOUT_SHARDS, "Shards of the current rollout, by state.");
    describe_counter!(
        TLS_RELOADS_TOTAL,
        "Reloads of the TLS certificate and key, by result (ok, error: the old certificate stays)."
    );
    describe_gauge!(
        TLS_RELOAD_FAILING,
        "1 while the TLS certificate files cannot be loaded: the previously loaded certificate is still presented."
    );
    describe_counter!(
        CLIENT_CONNECTIONS_CLOSED_TOTAL,
        "Client connections the gateway closed because a limit passed or their TLS handshake failed, by reason (header_timeout, http2_idle, send_timeout, resets, tunnel_idle, tls_handshake)."
    );
    // Every reason from the start, at 0: a rate over them is 0, not "no data", until one happens.
    for reason in CLOSE_REASONS {
        metrics::counter!(CLIENT_CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(0);
    }
}

/// Counts a client connection the gateway closed for `reason` (one of [`CLOSE_REASONS`]).
pub fn connection_closed(reason: &'static str) {
    metrics::counter!(CLIENT_CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
}

/// The gauge of client connections on proxy worker `index` (from 0), exported at 0 from the start.
pub fn worker_connections(index: usize) -> metrics::Gauge {
    let gauge = metrics::gauge!(WORKER_CONNECTIONS, "worker" => index.to_string());
    gauge.set(0.0);
    gauge
}

/// Sets up logging to stderr; `RUST_LOG` overrides the default level (`info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
