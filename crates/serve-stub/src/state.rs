//! Shared, knob-controlled state of one running stub and its route table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use tokio::sync::watch;

/// Parts per million used to express the error rate exactly in integers.
const PPM: u128 = 1_000_000;

/// Status every app reports on the dashboard until told otherwise.
pub(crate) const DEFAULT_APP_STATUS: &str = "RUNNING";

/// State shared by the accept loop, every connection task and every handle.
pub(crate) struct Shared {
    /// Cluster name, e.g. `blue`.
    pub(crate) name: String,
    /// `x-stub-cluster` header value (pre-rendered).
    pub(crate) name_hv: HeaderValue,
    /// `x-stub-revision` header value (pre-rendered).
    pub(crate) revision_hv: HeaderValue,
    revision: String,
    healthy: AtomicBool,
    routes_populated: AtomicBool,
    table: RwLock<Arc<AppTable>>,
    statuses: Mutex<HashMap<String, String>>,
    error_ppm: AtomicU64,
    error_seq: AtomicU64,
    latency_us: AtomicU64,
    probe_latency_us: AtomicU64,
    requests: AtomicU64,
    probes: AtomicU64,
    in_flight: AtomicU64,
    /// Becomes `true` when the stub is shut down or killed.
    pub(crate) stop: watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn new(
        name: String,
        revision: String,
        apps: Vec<(String, String)>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let table = AppTable::build(&name, &revision, apps);
        Shared {
            name_hv: header_value(&name),
            revision_hv: header_value(&revision),
            name,
            revision,
            healthy: AtomicBool::new(true),
            routes_populated: AtomicBool::new(true),
            table: RwLock::new(Arc::new(table)),
            statuses: Mutex::new(HashMap::new()),
            error_ppm: AtomicU64::new(0),
            error_seq: AtomicU64::new(0),
            latency_us: AtomicU64::new(0),
            probe_latency_us: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            probes: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            stop,
        }
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Relaxed)
    }

    pub(crate) fn set_healthy(&self, yes: bool) {
        self.healthy.store(yes, Relaxed);
    }

    pub(crate) fn routes_populated(&self) -> bool {
        self.routes_populated.load(Relaxed)
    }

    pub(crate) fn set_routes_populated(&self, yes: bool) {
        self.routes_populated.store(yes, Relaxed);
    }

    /// The current route table (one atomic increment; never blocks for long).
    pub(crate) fn table(&self) -> Arc<AppTable> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_apps(&self, apps: Vec<(String, String)>) {
        let table = Arc::new(AppTable::build(&self.name, &self.revision, apps));
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = table;
    }

    pub(crate) fn app_status(&self, app: &str) -> String {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .cloned()
            .unwrap_or_else(|| DEFAULT_APP_STATUS.to_owned())
    }

    pub(crate) fn set_app_status(&self, app: &str, status: &str) {
        self.statuses
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(app.to_owned(), status.to_owned());
    }

    /// Sets the share of app requests answered 500 and restarts the sequence,
    /// so that e.g. 0.2 fails exactly the 5th, 10th, ... request from now on.
    pub(crate) fn set_error_rate(&self, ratio: f64) {
        let ratio = if ratio.is_nan() {
            0.0
        } else {
            ratio.clamp(0.0, 1.0)
        };
        self.error_seq.store(0, Relaxed);
        self.error_ppm
            .store((ratio * PPM as f64).round() as u64, Relaxed);
    }

    /// Whether the next app request must fail: request `k` (1-based) fails
    /// when `floor(k * rate)` steps past `floor((k - 1) * rate)`.
    pub(crate) fn should_fail(&self) -> bool {
        let ppm = u128::from(self.error_ppm.load(Relaxed));
        if ppm == 0 {
            return false;
        }
        let k = u128::from(self.error_seq.fetch_add(1, Relaxed)) + 1;
        k * ppm / PPM != (k - 1) * ppm / PPM
    }

    pub(crate) fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Relaxed))
    }

    pub(crate) fn set_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Relaxed);
    }

    pub(crate) fn probe_latency(&self) -> Duration {
        Duration::from_micros(self.probe_latency_us.load(Relaxed))
    }

    pub(crate) fn set_probe_latency(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.probe_latency_us.store(us, Relaxed);
    }

    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Relaxed)
    }

    pub(crate) fn reset_requests(&self) {
        self.requests.store(0, Relaxed);
    }

    pub(crate) fn probe_requests(&self) -> u64 {
        self.probes.load(Relaxed)
    }

    pub(crate) fn count_probe(&self) {
        self.probes.fetch_add(1, Relaxed);
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Relaxed)
    }

    /// Counts a new app request and marks it in flight until the guard drops.
    pub(crate) fn begin_app_request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Relaxed);
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(Arc::clone(self))
    }
}

/// Keeps one app request counted in [`Shared::in_flight`] while alive; it is
/// moved into the response body (or WebSocket task) so streaming counts too.
pub(crate) struct InFlight(Arc<Shared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// One application as the stub serves it, with its responses pre-rendered.
pub(crate) struct AppEntry {
    /// Application name.
    pub(crate) name: String,
    /// Route prefix, e.g. `/echo` or `/`.
    pub(crate) prefix: String,
    /// `x-stub-app` header value.
    pub(crate) name_hv: HeaderValue,
    /// `"<cluster> <revision> <app> "`, the start of the default body.
    body_prefix: String,
    /// The whole default body for a request without a body.
    zero_body: Bytes,
}

impl AppEntry {
    /// The default body: `<cluster> <revision> <app> <bytes_received>\n`.
    pub(crate) fn default_body(&self, received: u64) -> Bytes {
        if received == 0 {
            return self.zero_body.clone();
        }
        Bytes::from(format!("{}{received}\n", self.body_prefix))
    }
}

/// The apps of a stub, sorted longest route prefix first, plus the
/// pre-rendered `/-/routes` body.
pub(crate) struct AppTable {
    pub(crate) apps: Vec<AppEntry>,
    pub(crate) routes_json: Bytes,
}

impl AppTable {
    fn build(cluster: &str, revision: &str, apps: Vec<(String, String)>) -> Self {
        let mut routes = serde_json::Map::new();
        let mut entries: Vec<AppEntry> = apps
            .into_iter()
            .map(|(name, prefix)| {
                routes
                    .entry(prefix.clone())
                    .or_insert_with(|| name.clone().into());
                let body_prefix = format!("{cluster} {revision} {name} ");
                AppEntry {
                    name_hv: header_value(&name),
                    zero_body: Bytes::from(format!("{body_prefix}0\n")),
                    body_prefix,
                    name,
                    prefix,
                }
            })
            .collect();
        // Stable: of two apps with the same prefix, the first one listed wins.
        entries.sort_by_key(|app| std::cmp::Reverse(app.prefix.len()));
        let routes_json = serde_json::to_vec(&routes).unwrap_or_default();
        AppTable {
            apps: entries,
            routes_json: Bytes::from(routes_json),
        }
    }

    /// Finds the app serving `path` with Ray Serve's rule and returns its
    /// index and the rest of the path after the prefix (empty or `/...`).
    pub(crate) fn route<'p>(&self, path: &'p str) -> Option<(usize, &'p str)> {
        self.apps.iter().enumerate().find_map(|(i, app)| {
            let p = app.prefix.as_str();
            if !path.starts_with(p) {
                return None;
            }
            if p.ends_with('/') {
                Some((i, &path[p.len() - 1..]))
            } else if path.len() == p.len() || path.as_bytes()[p.len()] == b'/' {
                Some((i, &path[p.len()..]))
            } else {
                None
            }
        })
    }
}

/// A header value for arbitrary text: bytes a header cannot carry become `_`.
pub(crate) fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| {
        let clean: Vec<u8> = s
            .bytes()
            .map(|b| {
                if b == b'\t' || (0x20..0x7f).contains(&b) {
                    b
                } else {
                    b'_'
                }
            })
            .collect();
        HeaderValue::from_bytes(&clean).unwrap_or(HeaderValue::from_static("_"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(apps: &[(&str, &str)]) -> AppTable {
        let apps = apps
            .iter()
            .map(|(a, p)| ((*a).to_owned(), (*p).to_owned()))
            .collect();
        AppTable::build("blue", "v1", apps)
    }

    fn app_for<'a>(t: &'a AppTable, path: &str) -> Option<(&'a str, String)> {
        t.route(path)
            .map(|(i, rest)| (t.apps[i].name.as_str(), rest.to_owned()))
    }

    #[test]
    fn ray_prefix_rule() {
        let t = table(&[("route", "/route"), ("a", "/route/a"), ("slash", "/s/")]);
        assert_eq!(app_for(&t, "/route"), Some(("route", String::new())));
        assert_eq!(app_for(&t, "/route/x"), Some(("route", "/x".into())));
        assert_eq!(app_for(&t, "/route/a/b"), Some(("a", "/b".into())));
        assert_eq!(app_for(&t, "/route/ab"), Some(("route", "/ab".into())));
        assert_eq!(app_for(&t, "/routesuffix"), None);
        assert_eq!(app_for(&t, "/s/x"), Some(("slash", "/x".into())));
        assert_eq!(app_for(&t, "/s"), None);
        let with_root = table(&[("route", "/route"), ("root", "/")]);
        assert_eq!(
            app_for(&with_root, "/routesuffix"),
            Some(("root", "/routesuffix".into()))
        );
    }

    #[test]
    fn error_rate_is_exact() {
        let (_tx, rx) = watch::channel(false);
        let s = Shared::new("b".into(), "v".into(), Vec::new(), rx);
        s.set_error_rate(0.2);
        let fails: Vec<u32> = (1..=20).filter(|_| s.should_fail()).collect();
        assert_eq!(fails, vec![5, 10, 15, 20]);
        s.set_error_rate(1.0);
        assert!((0..10).all(|_| s.should_fail()));
        s.set_error_rate(0.0);
        assert!((0..10).all(|_| !s.should_fail()));
        s.set_error_rate(0.3);
        assert_eq!((0..100).filter(|_| s.should_fail()).count(), 30);
    }

    #[test]
    fn default_bodies_and_routes_json() {
        let t = table(&[("echo", "/echo")]);
        assert_eq!(&t.apps[0].default_body(0)[..], b"blue v1 echo 0\n");
        assert_eq!(&t.apps[0].default_body(42)[..], b"blue v1 echo 42\n");
        assert_eq!(&t.routes_json[..], br#"{"/echo":"echo"}"#);
        assert_eq!(header_value("a\nb"), "a_b");
    }
}
