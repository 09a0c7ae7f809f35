//! A small client of the admin API, and the shift progress display the CLI and the demo share.
//!
//! - [`AdminClient`]: JSON requests to the admin API (plain HTTP, optional bearer token, a 10 s
//!   timeout per request), with 4xx/5xx answers turned into [`ClientError::Api`].
//! - [`ShiftProgress`]: the parts of a shift (`GET /v1/shards/{shard}/shift`) a watcher shows, and
//!   its one-line [`progress_line`](ShiftProgress::progress_line).
//! - [`watch_shift`]: polls a shard's shift until it completes, rolls back or is aborted.
//! - [`ProgressPrinter`]: redraws one line on a terminal, or prints a line per change elsewhere.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

/// How long one admin request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`watch_shift`] tolerates an unreachable admin API by default.
pub const UNREACHABLE_LIMIT: Duration = Duration::from_secs(10);

/// Why an admin request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL cannot be used.
    #[error("bad admin URL {url:?}: {reason}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No connection to the admin API.
    #[error("cannot reach the admin API at {url}")]
    Connect {
        /// The admin API's base URL.
        url: String,
        /// The connection error.
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The connection broke while the request or response was under way.
    #[error("request to the admin API at {url} failed: {message}")]
    Request {
        /// The admin API's base URL.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// No complete answer within the request timeout.
    #[error("the admin API at {url} did not answer within {} s", .after.as_secs_f64())]
    Timeout {
        /// The admin API's base URL.
        url: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The API answered with a 4xx or 5xx status.
    #[error("{status}: {message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The `error` field of the JSON answer (or the body text when it has none).
        message: String,
    },
    /// A 2xx answer that is not the JSON expected.
    #[error("unexpected answer from {url}: {message}")]
    Decode {
        /// The full request URL.
        url: String,
        /// What is wrong with the answer.
        message: String,
    },
}

impl ClientError {
    /// True for failures that may go away by themselves (no connection, timeout, 502-504).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Request { .. }
            | ClientError::Timeout { .. } => true,
            ClientError::Api { status, .. } => matches!(
                *status,
                StatusCode::BAD_GATEWAY
                    | StatusCode::SERVICE_UNAVAILABLE
                    | StatusCode::GATEWAY_TIMEOUT
            ),
            ClientError::BadUrl { .. } | ClientError::Decode { .. } => false,
        }
    }
}

/// A client of one gateway's admin API.
#[derive(Debug, Clone)]
pub struct AdminClient {
    /// The base URL as given (for messages).
    url: String,
    /// The base URL without a trailing slash; request paths are appended.
    base: String,
    token: Option<String>,
    timeout: Duration,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl AdminClient {
    /// A client of the admin API at `base_url` (`http://host:port`, optionally with a path prefix;
    /// a bare `host:port` means `http://host:port`). With `token`, every request carries
    /// `Authorization: Bearer <token>`.
    pub fn new(base_url: &str, token: Option<String>) -> Result<AdminClient, ClientError> {
        let bad = |reason: &str| ClientError::BadUrl {
            url: base_url.to_string(),
            reason: reason.to_string(),
        };
        let base_url = base_url.trim();
        let with_scheme;
        let base_url = if base_url.contains("://") {
            base_url
        } else {
            with_scheme = format!("http://{base_url}");
            &with_scheme
        };
        let parsed = url::Url::parse(base_url).map_err(|e| bad(&e.to_string()))?;
        match parsed.scheme() {
            "http" => {}
            "https" => return Err(bad("https is not supported; use http://")),
            other => return Err(bad(&format!("scheme {other:?}; expected http://"))),
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a query or fragment is not allowed"));
        }
        if let Some(token) = &token {
            if token.is_empty() {
                return Err(bad("the bearer token is empty"));
            }
            if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
                return Err(bad("the bearer token has characters a header cannot carry"));
            }
        }
        let base = parsed.as_str().trim_end_matches('/').to_string();
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build_http();
        Ok(AdminClient {
            url: base_url.trim_end_matches('/').to_string(),
            base,
            token,
            timeout: REQUEST_TIMEOUT,
            http,
        })
    }

    /// This client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> AdminClient {
        self.timeout = timeout;
        self
    }

    /// The admin API's base URL, as given.
    pub fn base_url(&self) -> &str {
        &self.url
    }

    /// `GET path` (e.g. `/v1/state`).
    pub async fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        self.request(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::POST, path, Some(body)).await
    }

    /// `PUT path` with a JSON body.
    pub async fn put_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.request(Method::PUT, path, Some(body)).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        let full = format!("{}/{}", self.base, path.trim_start_matches('/'));
        let mut req = Request::builder()
            .method(method)
            .uri(&full)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(body) => {
                req = req.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::BadUrl {
                url: full.clone(),
                reason: e.to_string(),
            })?;
        let exchange = async {
            let resp = self.http.request(req).await.map_err(|source| {
                if source.is_connect() {
                    ClientError::Connect {
                        url: self.url.clone(),
                        source,
                    }
                } else {
                    ClientError::Request {
                        url: self.url.clone(),
                        message: error_chain(&source),
                    }
                }
            })?;
            let (parts, body) = resp.into_parts();
            let bytes = body
                .collect()
                .await
                .map_err(|e| ClientError::Request {
                    url: self.url.clone(),
                    message: format!("reading the answer: {}", error_chain(&e)),
                })?
                .to_bytes();
            Ok::<_, ClientError>((parts.status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ClientError::Timeout {
                url: self.url.clone(),
                after: self.timeout,
            })??;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| {
                    let text = String::from_utf8_lossy(&bytes).trim().to_string();
                    if text.is_empty() {
                        status.canonical_reason().unwrap_or("error").to_string()
                    } else {
                        text
                    }
                });
            return Err(ClientError::Api { status, message });
        }
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            url: full,
            message: format!("not JSON: {e}"),
        })
    }
}

/// An error and its sources, joined with `: `.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let _ = write!(text, ": {s}");
        source = s.source();
    }
    text
}

/// The latest analysis check of a shift, as the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CheckView {
    /// Step the check ran at.
    pub step: u32,
    /// Target requests in the window.
    pub requests: u64,
    /// Target error rate (0-1) in the window.
    pub error_rate: f64,
    /// Target p99 time to response headers, in milliseconds.
    pub p99_ms: Option<f64>,
    /// `passed`, `failed` or `waiting`.
    pub result: String,
    /// What failed, or what is awaited.
    pub detail: String,
}

/// What a watcher needs of a shift (`GET /v1/shards/{shard}/shift`); unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ShiftProgress {
    /// `progressing`, `paused`, `draining`, `completed`, `rolled_back` or `aborted`.
    pub state: String,
    /// What was asked for: `{"cluster": "green"}` or `{"revision": "v2"}`.
    pub target: Value,
    /// The clusters that receive the target weight.
    pub target_clusters: Vec<String>,
    /// Current total weight of the target clusters (0-100).
    pub target_weight: u32,
    /// Steps taken.
    pub step: u32,
    /// Current weights of the shard's clusters.
    pub weights: BTreeMap<String, u32>,
    /// The latest analysis check.
    pub last_check: Option<CheckView>,
    /// Why it was rolled back or aborted.
    pub reason: Option<String>,
    /// Clusters that had weight before (drained at promotion).
    pub old_clusters: Vec<String>,
}

/// How a watched shift ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Promoted and the old clusters drained.
    Completed,
    /// Rolled back automatically.
    RolledBack,
    /// Aborted by an operator.
    Aborted,
}

impl Outcome {
    /// The process exit code for this outcome: 0, 2 or 3.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => 0,
            Outcome::RolledBack => 2,
            Outcome::Aborted => 3,
        }
    }
}

impl ShiftProgress {
    /// Reads a shift from its JSON.
    pub fn from_json(value: &Value) -> Result<ShiftProgress, String> {
        let progress = ShiftProgress::deserialize(value).map_err(|e| e.to_string())?;
        if progress.state.is_empty() {
            return Err("no \"state\" field".into());
        }
        Ok(progress)
    }

    /// The outcome, once the shift has ended (`draining` has not: it ends as `completed`).
    pub fn outcome(&self) -> Option<Outcome> {
        match self.state.as_str() {
            "completed" => Some(Outcome::Completed),
            "rolled_back" => Some(Outcome::RolledBack),
            "aborted" => Some(Outcome::Aborted),
            _ => None,
        }
    }

    /// Rolled back or aborted: the weights went back to where the shift started.
    fn went_back(&self) -> bool {
        matches!(self.state.as_str(), "rolled_back" | "aborted")
    }

    /// The target as text: the cluster name, or `revision v2`.
    pub fn target_label(&self) -> String {
        if let Some(cluster) = self.target.get("cluster").and_then(Value::as_str) {
            cluster.to_string()
        } else if let Some(revision) = self.target.get("revision").and_then(Value::as_str) {
            format!("revision {revision}")
        } else if !self.target_clusters.is_empty() {
            self.target_clusters.join("+")
        } else {
            "?".to_string()
        }
    }

    /// `blue=60 green=40`.
    pub fn weights_label(&self) -> String {
        weights_label(&self.weights)
    }

    /// One line about the shift: `shift progressing -> green at 40% (step 2); weights blue=60 green=40`,
    /// plus the reason when it has one.
    pub fn summary(&self) -> String {
        // A shift that went back keeps the weight it had reached; its target has none now.
        let at = if self.went_back() {
            "after reaching"
        } else {
            "at"
        };
        let mut line = format!(
            "shift {} -> {} {at} {}% (step {}); weights {}",
            self.state,
            self.target_label(),
            self.target_weight,
            self.step,
            self.weights_label()
        );
        if let Some(reason) = self.reason.as_deref().filter(|r| !r.is_empty()) {
            let _ = write!(line, "; reason: {reason}");
        }
        line
    }

    /// The live progress line:
    /// `[#######.............] 35%  step 3  progressing  err 0.2%  p99 41ms`.
    pub fn progress_line(&self) -> String {
        const WIDTH: u32 = 20;
        // The bar shows the weight the target has: after a rollback or abort, what it has now.
        let pct = if self.went_back() {
            self.target_clusters
                .iter()
                .filter_map(|c| self.weights.get(c))
                .sum::<u32>()
                .min(100)
        } else {
            self.target_weight.min(100)
        };
        let filled = (pct * WIDTH / 100) as usize;
        let mut line = format!(
            "[{}{}] {pct:>3}%  step {}  {}",
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled),
            self.step,
            self.state
        );
        match &self.last_check {
            Some(check) if check.result != "waiting" || check.requests > 0 => {
                let _ = write!(line, "  err {}", percent(check.error_rate));
                match check.p99_ms {
                    Some(ms) => {
                        let _ = write!(line, "  p99 {}", millis(ms));
                    }
                    None => line.push_str("  p99 -"),
                }
            }
            _ => line.push_str("  err -  p99 -"),
        }
        if self.went_back() {
            let _ = write!(line, "  (had reached {}%)", self.target_weight);
        }
        if let Some(check) = &self.last_check {
            if self.state == "progressing" && check.result == "waiting" && !check.detail.is_empty()
            {
                let _ = write!(line, "  (waiting: {})", check.detail);
            }
        }
        line
    }
}

/// `blue=60 green=40`.
pub fn weights_label(weights: &BTreeMap<String, u32>) -> String {
    weights
        .iter()
        .map(|(name, w)| format!("{name}={w}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A ratio as a percentage with one decimal: `0.2%`.
fn percent(ratio: f64) -> String {
    format!("{:.1}%", ratio * 100.0)
}

/// Milliseconds as `41ms` or `1.25s`.
fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2}s", ms / 1000.0)
    } else {
        format!("{ms:.0}ms")
    }
}

/// Shows a changing progress line: on a terminal one line redrawn in place, elsewhere a new line
/// each time the text changes.
pub struct ProgressPrinter {
    out: Box<dyn Write + Send>,
    tty: bool,
    last: Option<String>,
    drawn: usize,
}

impl std::fmt::Debug for ProgressPrinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgressPrinter")
            .field("tty", &self.tty)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

impl ProgressPrinter {
    /// A printer on `out`; `tty` selects redrawing in place.
    pub fn new(out: Box<dyn Write + Send>, tty: bool) -> ProgressPrinter {
        ProgressPrinter {
            out,
            tty,
            last: None,
            drawn: 0,
        }
    }

    /// A printer on stdout, redrawing when stdout is a terminal.
    pub fn stdout() -> ProgressPrinter {
        let tty = std::io::stdout().is_terminal();
        ProgressPrinter::new(Box::new(std::io::stdout()), tty)
    }

    /// Shows `line` (nothing happens when it equals the line shown last).
    pub fn update(&mut self, line: &str) {
        if self.last.as_deref() == Some(line) {
            return;
        }
        if self.tty {
            let width = line.chars().count();
            let pad = self.drawn.saturating_sub(width);
            let _ = write!(self.out, "\r{line}{}", " ".repeat(pad));
            self.drawn = width;
        } else {
            let _ = writeln!(self.out, "{line}");
        }
        let _ = self.out.flush();
        self.last = Some(line.to_string());
    }

    /// Prints a whole line (ending the redrawn line first on a terminal).
    pub fn println(&mut self, line: &str) {
        self.finish();
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
    }

    /// Ends the redrawn line on a terminal, so later output starts on a fresh line.
    pub fn finish(&mut self) {
        if self.tty && self.drawn > 0 {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.drawn = 0;
            self.last = None;
        }
    }
}

/// How [`watch_shift`] polls.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Time between polls.
    pub interval: Duration,
    /// Give up after the admin API has been unreachable this long.
    pub unreachable_limit: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            interval: Duration::from_millis(500),
            unreachable_limit: UNREACHABLE_LIMIT,
        }
    }
}

/// Why [`watch_shift`] stopped before the shift ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The admin API could not be reached for longer than the limit.
    #[error("gave up: the admin API at {url} was unreachable for {} s", .limit.as_secs())]
    Unreachable {
        /// The admin API's base URL.
        url: String,
        /// The limit that passed.
        limit: Duration,
        /// The last failure.
        #[source]
        last: ClientError,
    },
    /// The API refused (no such shard, no shift, ...) or answered something unexpected.
    #[error(transparent)]
    Client(#[from] ClientError),
}

/// Polls `GET /v1/shards/{shard}/shift` every `opts.interval`, calling `on_update` with each answer,
/// until the shift is completed, rolled back or aborted; returns that outcome and the last answer.
pub async fn watch_shift(
    client: &AdminClient,
    shard: &str,
    opts: WatchOptions,
    mut on_update: impl FnMut(&ShiftProgress),
) -> Result<(Outcome, ShiftProgress), WatchError> {
    let path = format!("/v1/shards/{}/shift", path_segment(shard));
    // When the admin API stopped answering (the start of the first failed poll since the last
    // answer): the limit counts from there, not from the last answer, so a long `interval` does
    // not use it up while the watcher sleeps.
    let mut failing_since: Option<Instant> = None;
    loop {
        let asked_at = Instant::now();
        let left = match failing_since {
            Some(since) => opts.unreachable_limit.saturating_sub(since.elapsed()),
            None => opts.unreachable_limit,
        }
        .max(Duration::from_millis(100));
        let answer = match tokio::time::timeout(left, client.get_json(&path)).await {
            Ok(answer) => answer,
            Err(_) => Err(ClientError::Timeout {
                url: client.base_url().to_string(),
                after: left,
            }),
        };
        match answer {
            Ok(value) => {
                failing_since = None;
                let progress =
                    ShiftProgress::from_json(&value).map_err(|message| ClientError::Decode {
                        url: format!("{}{path}", client.base_url()),
                        message,
                    })?;
                on_update(&progress);
                if let Some(outcome) = progress.outcome() {
                    return Ok((outcome, progress));
                }
            }
            Err(e) if e.is_transient() => {
                let since = *failing_since.get_or_insert(asked_at);
                if since.elapsed() >= opts.unreachable_limit {
                    return Err(WatchError::Unreachable {
                        url: client.base_url().to_string(),
                        limit: opts.unreachable_limit,
                        last: e,
                    });
                }
            }
            Err(e) => return Err(e.into()),
        }
        // While the API does not answer (a gateway restarting, say), it is asked again within a
        // second, whatever the interval: the limit is not spent asleep.
        let pause = match failing_since {
            Some(_) => opts.interval.min(Duration::from_secs(1)),
            None => opts.interval,
        };
        tokio::time::sleep(pause).await;
    }
}

/// `GET /v1/state` as a readable table: per shard its shift and clusters, then the rollout.
pub fn format_state(state: &Value) -> String {
    let mut out = String::new();
    let shards = state["shards"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if shards.is_empty() {
        out.push_str("no shards\n");
    }
    for shard in shards {
        let name = shard["name"].as_str().unwrap_or("?");
        match ShiftProgress::from_json(&shard["shift"]) {
            Ok(shift) => {
                let _ = writeln!(
                    out,
                    "{name}  shift {} -> {}  target {}%  step {}",
                    shift.state,
                    shift.target_label(),
                    shift.target_weight,
                    shift.step
                );
                if let Some(reason) = shift.reason.as_deref().filter(|r| !r.is_empty()) {
                    let _ = writeln!(out, "  reason: {reason}");
                }
            }
            Err(_) => {
                let _ = writeln!(out, "{name}  idle");
            }
        }
        let clusters = shard["clusters"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        if clusters.is_empty() {
            out.push_str("  (no clusters)\n");
            continue;
        }
        let mut rows = vec![[
            "CLUSTER",
            "REVISION",
            "WEIGHT",
            "READY",
            "DRAIN",
            "IN-FLIGHT",
            "",
        ]
        .map(String::from)];
        for c in clusters {
            let text = |key: &str| c[key].as_str().unwrap_or("").to_string();
            let number = |key: &str| c[key].as_u64().map_or("?".into(), |n| n.to_string());
            let drain = match c["drain"].as_str() {
                Some(d) => d.to_string(),
                None if c["draining"] == true => "draining".into(),
                None => "-".into(),
            };
            rows.push([
                text("name"),
                text("revision"),
                number("weight"),
                if c["ready"] == true { "yes" } else { "no" }.into(),
                drain,
                number("in_flight"),
                text("detail"),
            ]);
        }
        out.push_str(&table(
            &rows,
            &[false, false, true, false, false, true, false],
        ));
    }
    if state["rollout"].is_object() {
        out.push_str(&rollout_line(&state["rollout"]));
        out.push('\n');
    }
    out
}

/// `GET /v1/rollouts` (the `rollout` object, or null) as readable text.
pub fn format_rollout(rollout: &Value) -> String {
    if !rollout.is_object() {
        return "no rollout\n".into();
    }
    let mut out = rollout_line(rollout);
    if let Some(max) = rollout["max_concurrent"].as_u64() {
        let _ = write!(out, "; at most {max} shard(s) at a time");
    }
    out.push('\n');
    let shards = rollout["shards"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let rows: Vec<[String; 3]> = shards
        .iter()
        .map(|s| {
            [
                s["shard"].as_str().unwrap_or("?").to_string(),
                s["state"].as_str().unwrap_or("?").to_string(),
                s["reason"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    out.push_str(&table(&rows, &[false, false, false]));
    out
}

/// `rollout 3: revision v2 running (waiting 1, shifting 1, done 2, failed 0)`, plus the reason.
fn rollout_line(rollout: &Value) -> String {
    let shards = rollout["shards"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    let count = |state: &str| shards.iter().filter(|s| s["state"] == state).count();
    let mut line = format!(
        "rollout {}: revision {} {} (waiting {}, shifting {}, done {}, failed {})",
        rollout["id"].as_u64().map_or("?".into(), |n| n.to_string()),
        rollout["revision"].as_str().unwrap_or("?"),
        rollout["phase"].as_str().unwrap_or("?"),
        count("waiting"),
        count("shifting"),
        count("done"),
        count("failed"),
    );
    if let Some(reason) = rollout["reason"].as_str() {
        let _ = write!(line, "; reason: {reason}");
    }
    line
}

/// Rows as aligned columns (two spaces apart, indented by two); `right[i]` right-aligns column i.
/// Trailing empty cells are left out.
fn table<const N: usize>(rows: &[[String; N]], right: &[bool; N]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(" ");
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            line.push(' ');
            if right[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            }
            line.push(' ');
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `4,213`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Percent-encodes one path segment of an admin URL (names are normally plain, so usually
/// unchanged): a mistyped name with a space gets the API's "unknown shard", not a bad URL.
pub fn path_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_refused() {
        for (url, needle) in [
            ("https://example.com", "https is not supported"),
            ("ftp://example.com", "scheme"),
            ("http://", "empty host"),
            ("not a url", "invalid"),
            ("http://host/?q=1", "query"),
        ] {
            let e = AdminClient::new(url, None).unwrap_err();
            assert!(matches!(e, ClientError::BadUrl { .. }), "{url}: {e}");
            assert!(e.to_string().contains(needle), "{url}: {e}");
        }
        let c = AdminClient::new("http://127.0.0.1:9901/", None).unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:9901");
        let c = AdminClient::new("localhost:9901", None).unwrap();
        assert_eq!(c.base_url(), "http://localhost:9901");
        assert!(AdminClient::new("http://h:1", Some(String::new())).is_err());
        assert!(AdminClient::new("http://h:1", Some("a\nb".into())).is_err());
    }

    #[test]
    fn progress_line_shows_bar_step_state_and_check() {
        let shift: Value = serde_json::json!({
            "state": "progressing",
            "weights": {"blue": 65, "green": 35},
            "target": {"cluster": "green"},
            "target_clusters": ["green"],
            "target_weight": 35,
            "step": 3,
            "last_check": {"step": 2, "requests": 500, "error_rate": 0.002, "p99_ms": 41.2,
                           "result": "passed"},
            "reason": null,
            "some_new_field": [1, 2],
        });
        let p = ShiftProgress::from_json(&shift).unwrap();
        assert_eq!(
            p.progress_line(),
            "[#######.............]  35%  step 3  progressing  err 0.2%  p99 41ms"
        );
        assert_eq!(
            p.summary(),
            "shift progressing -> green at 35% (step 3); weights blue=65 green=35"
        );
        assert_eq!(p.outcome(), None);

        let waiting: Value = serde_json::json!({
            "state": "progressing", "target": {"revision": "v2"}, "target_weight": 0, "step": 0,
            "last_check": {"step": 0, "requests": 0, "error_rate": 0.0, "p99_ms": null,
                           "result": "waiting", "detail": "3 of 10 requests needed"},
        });
        let p = ShiftProgress::from_json(&waiting).unwrap();
        assert_eq!(
            p.progress_line(),
            "[....................]   0%  step 0  progressing  err -  p99 -  (waiting: 3 of 10 requests needed)"
        );
        assert_eq!(p.target_label(), "revision v2");

        // Rolled back at 40%: the target has 0 now; the 40% is what it had reached.
        let done: Value = serde_json::json!({"state": "rolled_back", "target_weight": 40,
            "target": {"cluster": "green"}, "target_clusters": ["green"],
            "weights": {"blue": 100, "green": 0},
            "step": 9, "reason": "too many errors",
            "last_check": {"error_rate": 1.0, "p99_ms": 1500.0, "result": "failed"}});
        let p = ShiftProgress::from_json(&done).unwrap();
        assert_eq!(
            p.progress_line(),
            "[....................]   0%  step 9  rolled_back  err 100.0%  p99 1.50s  (had reached 40%)"
        );
        assert_eq!(p.outcome(), Some(Outcome::RolledBack));
        assert_eq!(
            p.summary(),
            "shift rolled_back -> green after reaching 40% (step 9); weights blue=100 green=0; reason: too many errors"
        );
        assert!(ShiftProgress::from_json(&serde_json::json!({"error": "x"})).is_err());
    }

    #[test]
    fn draining_is_not_the_end() {
        for (state, outcome) in [
            ("progressing", None),
            ("paused", None),
            ("draining", None),
            ("completed", Some(Outcome::Completed)),
            ("aborted", Some(Outcome::Aborted)),
        ] {
            let p = ShiftProgress {
                state: state.into(),
                ..ShiftProgress::default()
            };
            assert_eq!(p.outcome(), outcome, "{state}");
        }
        assert_eq!(Outcome::Completed.exit_code(), 0);
        assert_eq!(Outcome::RolledBack.exit_code(), 2);
        assert_eq!(Outcome::Aborted.exit_code(), 3);
    }

    #[test]
    fn state_and_rollout_read_as_tables() {
        let state = serde_json::json!({
            "shards": [
                {"name": "shard-0", "clusters": [
                    {"name": "blue", "revision": "v1", "weight": 60, "ready": true,
                     "draining": false, "in_flight": 3},
                    {"name": "green-long", "revision": "v2", "weight": 40, "ready": false,
                     "draining": false, "in_flight": 12, "detail": "healthz answered 503"},
                 ],
                 "shift": {"state": "progressing", "target": {"cluster": "green-long"},
                           "target_weight": 40, "step": 4}},
                {"name": "shard-1", "clusters": [
                    {"name": "red", "revision": "v1", "weight": 0, "ready": true,
                     "draining": true, "drain": "drained", "in_flight": 0}],
                 "shift": null},
            ],
            "rollout": {"id": 3, "revision": "v2", "phase": "running", "max_concurrent": 1,
                        "shards": [{"shard": "shard-0", "state": "shifting"},
                                   {"shard": "shard-1", "state": "failed", "reason": "boom"}]},
        });
        let text = format_state(&state);
        let expected = "\
shard-0  shift progressing -> green-long  target 40%  step 4
  CLUSTER     REVISION  WEIGHT  READY  DRAIN  IN-FLIGHT
  blue        v1            60  yes    -              3
  green-long  v2            40  no     -             12  healthz answered 503
shard-1  idle
  CLUSTER  REVISION  WEIGHT  READY  DRAIN    IN-FLIGHT
  red      v1             0  yes    drained          0
rollout 3: revision v2 running (waiting 0, shifting 1, done 0, failed 1)
";
        assert_eq!(text, expected, "\n{text}");
        let text = format_rollout(&state["rollout"]);
        assert!(text.starts_with("rollout 3: revision v2 running (waiting 0, shifting 1, done 0, failed 1); at most 1 shard(s) at a time\n"), "{text}");
        assert!(text.contains("  shard-1  failed    boom\n"), "{text}");
        assert_eq!(format_rollout(&Value::Null), "no rollout\n");
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(4213), "4,213");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    /// A shared buffer to read what a printer wrote.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn printer_redraws_on_a_terminal_and_prints_changes_elsewhere() {
        let buf = Buf::default();
        let mut p = ProgressPrinter::new(Box::new(buf.clone()), false);
        for line in ["a 10%", "a 10%", "b 20%", "b 20%"] {
            p.update(line);
        }
        p.println("done");
        assert_eq!(buf.text(), "a 10%\nb 20%\ndone\n");

        let buf = Buf::default();
        let mut p = ProgressPrinter::new(Box::new(buf.clone()), true);
        for line in ["long line", "long line", "short"] {
            p.update(line);
        }
        p.println("done");
        assert_eq!(buf.text(), "\rlong line\rshort    \ndone\n");
    }

    #[tokio::test]
    async fn watch_gives_up_on_an_unreachable_api() {
        // A port nothing listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = AdminClient::new(&format!("http://127.0.0.1:{port}"), None).unwrap();
        let started = std::time::Instant::now();
        let opts = WatchOptions {
            interval: Duration::from_millis(50),
            unreachable_limit: Duration::from_millis(400),
        };
        let e = watch_shift(&client, "shard-0", opts, |_| {})
            .await
            .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(started.elapsed() < Duration::from_secs(5));
        let text = e.to_string();
        assert!(matches!(e, WatchError::Unreachable { .. }), "{text}");
        assert!(
            text.contains(&format!("http://127.0.0.1:{port}")) && text.contains("unreachable"),
            "{text}"
        );
    }

    /// One answer per connection, in order: `Some(body)` is a 200 with that JSON, `None` closes
    /// the connection without an answer. Returns the base URL.
    async fn scripted_admin(answers: Vec<Option<&'static str>>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            for answer in answers {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                if let Some(body) = answer {
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = conn.write_all(reply.as_bytes()).await;
                }
            }
        });
        url
    }

    /// The unreachable limit counts from the first failed poll, not from the last answer: with an
    /// interval longer than the limit, one refused poll is not the end of the watch.
    #[tokio::test]
    async fn watch_survives_one_failed_poll_when_the_interval_is_longer_than_the_limit() {
        let url = scripted_admin(vec![
            Some(r#"{"state": "progressing", "target": {"cluster": "g"}, "target_weight": 50}"#),
            None,
            Some(r#"{"state": "completed", "target": {"cluster": "g"}, "target_weight": 100}"#),
        ])
        .await;
        let client = AdminClient::new(&url, None).unwrap();
        // The first poll answers, the second (3 s later) fails, the third (1 s after that, well
        // inside the 2 s limit counted from the failure) answers.
        let opts = WatchOptions {
            interval: Duration::from_secs(3),
            unreachable_limit: Duration::from_secs(2),
        };
        let mut seen = Vec::new();
        let (outcome, last) = tokio::time::timeout(
            Duration::from_secs(20),
            watch_shift(&client, "shard-0", opts, |p| seen.push(p.state.clone())),
        )
        .await
        .expect("watch did not end")
        .expect("watch gave up after one failed poll");
        assert_eq!(outcome, Outcome::Completed);
        assert_eq!(last.target_weight, 100);
        assert_eq!(seen, ["progressing", "completed"]);
    }
}
