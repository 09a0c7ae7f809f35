//! Readiness probes of one cluster: Serve's `GET /-/healthz` and `GET /-/routes`.
//!
//! A Serve proxy can report healthy before its route table is loaded, so a cluster counts as ready
//! only when `/-/healthz` answers 200 *and* `/-/routes` answers 200 with the applications it serves;
//! per application, the routing table then requires the cluster to list that application.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::telemetry;

/// Largest probe response body read (a `/-/routes` of many thousands of apps fits easily).
const MAX_PROBE_BODY: usize = 4 << 20;

/// What one probe round found about a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// The probed cluster.
    pub cluster: Arc<str>,
    /// `/-/healthz` answered 200.
    pub healthy: bool,
    /// `/-/routes` as `route_prefix -> app name`; `None` when not populated or unreachable.
    pub routes: Option<BTreeMap<String, String>>,
    /// Application statuses from the Ray dashboard (`RUNNING`, `DEPLOYING`, ...), when the cluster
    /// has a `dashboard_url` and it answered.
    pub app_status: Option<BTreeMap<String, String>>,
    /// Why the cluster is not ready (empty when it is).
    pub detail: String,
    /// Failed rounds in a row, this one included (0 when it passed). The control plane takes a
    /// ready cluster out of its splits only at `probe.failure_threshold` of them.
    pub failed_rounds: u32,
}

/// Where a cluster's endpoints are.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    /// Scheme of the Serve HTTP proxy.
    pub scheme: Scheme,
    /// `host:port` of the Serve HTTP proxy.
    pub authority: Authority,
    /// Scheme and `host:port` of the Ray dashboard, if configured.
    pub dashboard: Option<(Scheme, Authority)>,
}

/// `GET /api/serve/applications/` of the Ray dashboard (the part rayshift reads).
#[derive(serde::Deserialize)]
struct DashboardApps {
    #[serde(default)]
    applications: BTreeMap<String, DashboardApp>,
}

#[derive(serde::Deserialize)]
struct DashboardApp {
    #[serde(default)]
    status: String,
}

impl ProbeReport {
    /// Healthy and with a populated route table.
    pub fn ready(&self) -> bool {
        self.healthy && self.routes.is_some()
    }

    /// Whether `other` found the same (the failed rounds aside).
    fn same_result(&self, other: &ProbeReport) -> bool {
        self.healthy == other.healthy
            && self.routes == other.routes
            && self.app_status == other.app_status
            && self.detail == other.detail
    }
}

/// HTTP client shared by all probes (separate from the data-path pool, with short timeouts).
/// `https://` clusters and dashboards are probed over TLS, trusting what the data path trusts.
#[derive(Clone, Debug)]
pub struct Prober {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    interval: Duration,
    timeout: Duration,
    /// `probe.failure_threshold`.
    failure_threshold: u32,
}

impl Prober {
    /// A prober with the Mozilla root certificates for `https://` targets.
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Self::with_tls(interval, timeout, crate::tls::default_client_config())
    }

    /// Like [`new`](Self::new), with `tls` for `https://` targets.
    pub fn with_tls(interval: Duration, timeout: Duration, tls: rustls::ClientConfig) -> Self {
        let connector = crate::proxy::cluster_connector(timeout, tls);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(3))
            .pool_max_idle_per_host(2)
            .build(connector);
        Self {
            client,
            interval,
            timeout,
            failure_threshold: crate::config::DEFAULT_PROBE_FAILURE_THRESHOLD,
        }
    }

    /// Sets `probe.failure_threshold`: failed rounds in a row before a ready cluster is reported
    /// not ready (at least 1).
    pub fn with_failure_threshold(mut self, rounds: u32) -> Self {
        self.failure_threshold = rounds.max(1);
        self
    }

    /// Probes the cluster once.
    pub async fn probe(&self, cluster: &Arc<str>, target: &ProbeTarget) -> ProbeReport {
        let (scheme, authority) = (&target.scheme, &target.authority);
        let healthz = self.get(scheme, authority, "/-/healthz").await;
        let (healthy, mut detail) = match &healthz {
            Ok((StatusCode::OK, _)) => (true, String::new()),
            Ok((status, body)) => (
                false,
                format!("/-/healthz answered {status}: {}", excerpt(body)),
            ),
            Err(e) => (false, format!("/-/healthz failed: {e}")),
        };
        let routes = match self.get(scheme, authority, "/-/routes").await {
            Ok((StatusCode::OK, body)) => {
                match serde_json::from_slice::<BTreeMap<String, String>>(&body) {
                    Ok(routes) => Some(routes),
                    Err(e) => {
                        append(
                            &mut detail,
                            format!("/-/routes is not a JSON object of strings: {e}"),
                        );
                        None
                    }
                }
            }
            Ok((status, _)) => {
                append(
                    &mut detail,
                    format!("/-/routes answered {status} (route table not populated)"),
                );
                None
            }
            Err(e) => {
                append(&mut detail, format!("/-/routes failed: {e}"));
                None
            }
        };
        let app_status = match &target.dashboard {
            None => None,
            Some((scheme, authority)) => match self
                .get(scheme, authority, "/api/serve/applications/")
                .await
            {
                Ok((StatusCode::OK, body)) => {
                    match serde_json::from_slice::<DashboardApps>(&body) {
                        Ok(apps) => Some(
                            apps.applications
                                .into_iter()
                                .map(|(name, app)| (name, app.status))
                                .collect(),
                        ),
                        Err(e) => {
                            append(
                                &mut detail,
                                format!("dashboard applications unreadable: {e}"),
                            );
                            None
                        }
                    }
                }
                Ok((status, _)) => {
                    append(&mut detail, format!("dashboard answered {status}"));
                    None
                }
                Err(e) => {
                    append(&mut detail, format!("dashboard failed: {e}"));
                    None
                }
            },
        };
        let report = ProbeReport {
            cluster: Arc::clone(cluster),
            healthy,
            routes,
            app_status,
            detail,
            failed_rounds: 0,
        };
        let result = if report.ready() { "ready" } else { "not_ready" };
        metrics::counter!(telemetry::PROBES_TOTAL, "cluster" => cluster.to_string(), "result" => result)
            .increment(1);
        report
    }

    async fn get(
        &self,
        scheme: &Scheme,
        authority: &Authority,
        path: &'static str,
    ) -> Result<(StatusCode, Bytes), String> {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query(path)
            .build()
            .map_err(|e| e.to_string())?;
        let req = Request::get(uri)
            .header(http::header::USER_AGENT, "rayshift-probe")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| crate::proxy::pool::describe(&e))?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_PROBE_BODY)
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok((status, body))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }

    /// Probes the cluster every interval, sending a report whenever the result changes (and the first
    /// one always). Ends when the receiver is gone; abort the handle to stop it earlier.
    pub fn spawn(
        &self,
        cluster: Arc<str>,
        target: ProbeTarget,
        reports: mpsc::UnboundedSender<ProbeReport>,
    ) -> JoinHandle<()> {
        let prober = self.clone();
        tokio::spawn(async move {
            // The last report sent: the control plane's view of the cluster.
            let mut last: Option<ProbeReport> = None;
            let mut failures: u32 = 0;
            // Ready as the control plane counts it (see `ProbeReport::failed_rounds`).
            let mut serving = false;
            let threshold = prober.failure_threshold;
            let mut tick = tokio::time::interval(prober.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let mut report = prober.probe(&cluster, &target).await;
                failures = if report.ready() {
                    0
                } else {
                    failures.saturating_add(1)
                };
                report.failed_rounds = failures;
                serving = report.ready() || (serving && failures < threshold);
                // Sent when the result changes, and when the failed rounds reach the threshold
                // (a ready cluster leaves its splits then). Every round is counted in
                // `rayshift_probes_total`.
                let changed = !last.as_ref().is_some_and(|l| l.same_result(&report));
                if !changed && failures != threshold {
                    continue;
                }
                if report.ready() {
                    tracing::info!(cluster = %cluster, "cluster ready");
                } else if serving {
                    tracing::info!(cluster = %cluster, failed_rounds = failures, threshold, detail = %report.detail, "probe round failed; the cluster stays ready until probe.failure_threshold rounds in a row fail");
                } else {
                    tracing::warn!(cluster = %cluster, failed_rounds = failures, detail = %report.detail, "cluster not ready");
                }
                if reports.send(report.clone()).is_err() {
                    return;
                }
                last = Some(report);
            }
        })
    }
}

/// Longest part of an error body kept in a cluster's `detail`.
const DETAIL_BODY_CHARS: usize = 200;

/// The start of an error body for a cluster's `detail`: an error page of a load balancer in
/// front of the cluster can be long, and can differ on every probe (a request id, a time), which
/// would make every probe round a change of the cluster's state.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(DETAIL_BODY_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_string(),
    }
}

fn append(detail: &mut String, more: String) {
    if !detail.is_empty() {
        detail.push_str("; ");
    }
    detail.push_str(&more);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_body_is_cut_for_the_detail() {
        assert_eq!(
            excerpt(b"  No replicas are available yet.\n"),
            "No replicas are available yet."
        );
        let page = format!("<html>{}</html>", "x".repeat(5000));
        let cut = excerpt(page.as_bytes());
        assert_eq!(cut.chars().count(), DETAIL_BODY_CHARS + 3);
        assert!(
            cut.starts_with("<html>xxx") && cut.ends_with("..."),
            "{cut}"
        );
        // Cut at a character, not inside one.
        let wide = "é".repeat(300);
        assert_eq!(
            excerpt(wide.as_bytes()).chars().count(),
            DETAIL_BODY_CHARS + 3
        );
    }
}
