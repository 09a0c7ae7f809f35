//! The validated configuration: what the rest of rayshift reads.
//!
//! Every value here has passed validation (see [`super::validate`]); relative paths have been resolved
//! against the directory of the config file and every default has been applied.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, ConfigErrors};
use super::{raw, validate};
use crate::shift::ShiftPolicy;

/// Default address for client traffic (`listen`).
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// Default address of the admin API (`admin.listen`).
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9901));
/// Default `state_file`, resolved against the directory of the config file.
pub const DEFAULT_STATE_FILE: &str = "rayshift-state.json";
/// Weight of a shard declared by name only.
pub const DEFAULT_SHARD_WEIGHT: f64 = 1.0;
/// Default `probe.interval`.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default `probe.timeout`.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `upstream.idle_timeout`: below the 5 s keep-alive of uvicorn in older Ray, so the pool
/// closes an idle connection before Serve does.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(4);
/// Default `upstream.connect_timeout`.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default `upstream.max_idle_per_cluster`.
pub const DEFAULT_UPSTREAM_MAX_IDLE_PER_CLUSTER: usize = 256;
/// Default `upstream.max_requests_per_cluster`: as many requests as `limits.max_connections` lets
/// HTTP/1.1 clients have in flight at once; HTTP/2 fan-out (many streams per client connection)
/// and long-lived WebSockets (which leave the connection limit when they upgrade) can meet it.
pub const DEFAULT_UPSTREAM_MAX_REQUESTS_PER_CLUSTER: u64 = 10_000;
/// Default `tls.reload_interval`: how often the certificate and key files are checked for changes.
pub const DEFAULT_TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Longest shard or cluster name accepted (the DNS label limit).
pub const MAX_NAME_LEN: usize = 63;

/// The whole gateway configuration, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Address the gateway accepts client traffic on (`listen`).
    pub listen: SocketAddr,
    /// The admin API: its address and optional bearer token (`admin`).
    pub admin: AdminConfig,
    /// Where weights (and later shifts) are persisted before they take effect (`state_file`),
    /// already resolved against the config file's directory.
    pub state_file: PathBuf,
    /// The declared shard set, in file order; never empty, names unique (`shards`).
    pub shards: Vec<ShardConfig>,
    /// How requests are split between the clusters of a shard (`split_key`).
    pub split_key: SplitKey,
    /// Statically discovered clusters, in file order; names unique (`clusters`).
    pub clusters: Vec<ClusterConfig>,
    /// Statically declared applications, in file order; names and route prefixes unique (`apps`).
    pub apps: Vec<AppConfig>,
    /// Readiness probing of each cluster (`probe`).
    pub probe: ProbeConfig,
    /// Pooled HTTP/1.1 connections to Serve (`upstream`).
    pub upstream: UpstreamConfig,
    /// Policy of shifts when a request or `auto_shift` leaves a key out (`shift_defaults`).
    pub shift_defaults: ShiftPolicy,
    /// Most shards that automatic shifts move at once (`max_concurrent_shifts`, default 1).
    pub max_concurrent_shifts: usize,
    /// Protection against misbehaving clients (`limits`).
    pub limits: LimitsConfig,
    /// Ejection of failing clusters between probes (`passive_health`).
    pub passive_health: PassiveHealthConfig,
    /// Graceful shutdown (`shutdown`).
    pub shutdown: ShutdownConfig,
    /// TLS for client connections (`tls`); `None` serves plain HTTP (and h2c).
    pub tls: Option<TlsConfig>,
    /// Dynamic discovery of clusters (`discovery.kubernetes`); `None`: static clusters only.
    pub kubernetes: Option<KubernetesConfig>,
    /// Per-core proxy worker threads that serve client connections ([`crate::proxy::workers`]);
    /// 0 (what a config file gives) serves them on the runtime that starts the gateway. Not a
    /// file key: `rayshift run` sets it from the process's cores (`RAYSHIFT_WORKER_THREADS`,
    /// `RAYSHIFT_RUNTIME`).
    pub proxy_workers: usize,
}

/// How a RayCluster's Serve endpoint is reached (`discovery.kubernetes.endpoint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KubeEndpoint {
    /// `<name>-serve-svc.<namespace>.svc` (KubeRay's Serve service).
    #[default]
    ServeService,
    /// The head service's cluster IP from `.status.head.serviceIP`.
    HeadServiceIp,
}

/// RayClusters as the source of clusters (`discovery.kubernetes`).
#[derive(Debug, Clone, PartialEq)]
pub struct KubernetesConfig {
    /// Namespaces to watch; empty: all namespaces.
    pub namespaces: Vec<String>,
    /// Only RayClusters matching this label selector (default `rayshift.io/shard`).
    pub label_selector: String,
    /// How the Serve endpoint is addressed.
    pub endpoint: KubeEndpoint,
    /// A kubeconfig file; `None`: `KUBECONFIG`, `~/.kube/config` or in-cluster credentials.
    pub kubeconfig: Option<PathBuf>,
    /// Delete a RayCluster once it is drained (after annotating it).
    pub delete_drained: bool,
    /// When set, every shard without its own `auto_shift` shifts automatically to a newer revision.
    pub auto_shift: Option<ShiftPolicy>,
    /// Shared state for several replicas (`discovery.kubernetes.state`); `None`: the local
    /// `state_file`, one replica.
    pub state: Option<KubeStateConfig>,
}

/// Where replicas keep their shared state and elect a leader (`discovery.kubernetes.state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeStateConfig {
    /// Namespace of the ConfigMap and the Lease.
    pub namespace: String,
    /// ConfigMap holding the state document (default `rayshift-state`).
    pub configmap: String,
    /// Lease electing the replica that advances shifts (default `rayshift-leader`).
    pub lease: String,
    /// How long a Lease holder stays leader without renewing (default 15s).
    pub lease_duration: Duration,
    /// This replica's name in the Lease (default: `POD_NAME`, else host name and process id).
    pub identity: Option<String>,
}

/// TLS on the client-facing listener (`tls`). Only the paths are checked when the config is
/// loaded; the files are read (and must parse) when the gateway starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (`tls.cert_file`), resolved against the config file's
    /// directory.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf certificate: PKCS#8, PKCS#1 (RSA) or SEC1 (EC) (`tls.key_file`).
    pub key_file: PathBuf,
    /// How often the two files are checked for changes of their contents; a change reloads them.
    /// Zero: only on SIGHUP.
    pub reload_interval: Duration,
}

/// The admin API (`admin`): admin calls, `/metrics`, `/live` and `/ready`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Address the admin API listens on (`admin.listen`).
    pub listen: SocketAddr,
    /// File holding the bearer token that mutating admin calls must present
    /// (`Authorization: Bearer <token>`), resolved against the config file's directory; `None`
    /// leaves the admin API open. Only the path is checked here; the file is read at startup.
    pub token_file: Option<PathBuf>,
    /// How long a client has to send a whole admin request, head and body
    /// (`admin.request_timeout`); a slower one gets 408 (body) or is disconnected (head).
    pub request_timeout: Duration,
    /// How long the series of a cluster that left the gateway (a deleted RayCluster, a cluster
    /// moved to another shard) stay on `/metrics` (`admin.removed_series_ttl`); long enough for
    /// scrapes to see their last values.
    pub removed_series_ttl: Duration,
}

/// Default of `admin.request_timeout`.
pub const DEFAULT_ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of `admin.removed_series_ttl`.
pub const DEFAULT_REMOVED_SERIES_TTL: Duration = Duration::from_secs(600);

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN,
            token_file: None,
            request_timeout: DEFAULT_ADMIN_REQUEST_TIMEOUT,
            removed_series_ttl: DEFAULT_REMOVED_SERIES_TTL,
        }
    }
}

/// One declared shard (`shards[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ShardConfig {
    /// Shard name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 63 characters.
    pub name: String,
    /// Relative capacity of the shard when apps are placed by consistent hashing; finite and > 0,
    /// [`DEFAULT_SHARD_WEIGHT`] when the shard is declared by name only.
    pub weight: f64,
    /// When set (`auto_shift:`), a cluster of a newer revision that joins the shard and becomes
    /// ready starts a shift to it by itself, with this policy (`shift_defaults` plus overrides).
    pub auto_shift: Option<ShiftPolicy>,
}

/// What keeps a client on the same cluster while traffic is split (`split_key`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum SplitKey {
    /// `none`: every request is placed independently (no stickiness).
    #[default]
    None,
    /// `header:<name>`: requests carrying the same value of this header go to the same cluster.
    /// The name is stored lowercased.
    Header(http::HeaderName),
    /// `cookie:<name>`: requests carrying the same value of this cookie go to the same cluster.
    Cookie(String),
    /// `client_ip`: requests from the same client address go to the same cluster.
    ClientIp,
}

impl fmt::Display for SplitKey {
    /// Writes the key back in the file syntax: `none`, `header:<name>`, `cookie:<name>`, `client_ip`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SplitKey::None => f.write_str("none"),
            SplitKey::Header(name) => write!(f, "header:{}", name.as_str()),
            SplitKey::Cookie(name) => write!(f, "cookie:{name}"),
            SplitKey::ClientIp => f.write_str("client_ip"),
        }
    }
}

/// One statically discovered Ray cluster (`clusters[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// Cluster name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 63 characters, unique.
    pub name: String,
    /// Name of the declared shard this cluster serves.
    pub shard: String,
    /// Revision (version label) of what the cluster runs, e.g. `v1`; non-empty.
    pub revision: String,
    /// Base URL of the cluster's Serve HTTP proxy: http or https, with a host, no path, query or fragment.
    pub serve_url: url::Url,
    /// Base URL of the cluster's Ray dashboard, same rules as `serve_url`, if set.
    pub dashboard_url: Option<url::Url>,
    /// Initial traffic weight within its shard, 0..=100; weights stored in the state file win.
    /// Either no cluster of a shard sets a weight, or all do and they sum to 100.
    pub weight: Option<u32>,
}

/// One statically declared Serve application (`apps[i]`); apps are also discovered from each
/// cluster's `GET /-/routes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Application name as Serve knows it; non-empty, no whitespace or control characters, unique.
    pub name: String,
    /// The app's route prefix; starts with `/`, unique across apps.
    pub route_prefix: String,
    /// Shard the app is pinned to, overriding consistent-hash placement; a declared shard.
    pub shard: Option<String>,
}

/// Readiness probing of each cluster (`probe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Time between two probes of a cluster; > 0.
    pub interval: Duration,
    /// Time a probe may take before it counts as failed; > 0.
    pub timeout: Duration,
    /// Failed probe rounds in a row before a ready cluster counts as not ready; 1 to
    /// [`MAX_PROBE_FAILURE_THRESHOLD`]. A cluster that was not ready is ready at its first passing
    /// round.
    pub failure_threshold: u32,
}

/// Default `probe.failure_threshold`: a single slow or failed round (a GC pause, a dropped
/// connection) does not take a cluster out of its splits; three in a row do.
pub const DEFAULT_PROBE_FAILURE_THRESHOLD: u32 = 3;

/// Largest `probe.failure_threshold`.
pub const MAX_PROBE_FAILURE_THRESHOLD: u32 = 100;

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            interval: DEFAULT_PROBE_INTERVAL,
            timeout: DEFAULT_PROBE_TIMEOUT,
            failure_threshold: DEFAULT_PROBE_FAILURE_THRESHOLD,
        }
    }
}

/// Pooled HTTP/1.1 connections to Serve (`upstream`).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// How long an idle pooled connection is kept; > 0. Must stay below Serve's keep-alive timeout
    /// (5 s in older Ray) or requests race connections the server is closing.
    pub idle_timeout: Duration,
    /// Time allowed to establish a connection to a cluster; > 0.
    pub connect_timeout: Duration,
    /// Most idle connections kept per cluster (0 disables pooling).
    pub max_idle_per_cluster: usize,
    /// Most requests in flight to one cluster (each holds an upstream connection); one more is
    /// answered 503 at once, without reaching the cluster or counting against it; >= 1.
    pub max_requests_per_cluster: u64,
    /// Longest wait for a cluster's response headers before the gateway answers 504; > 0.
    pub response_timeout: Duration,
    /// Retry requests that are safe to retry (see the README's reliability section).
    pub retries: bool,
    /// Retries allowed as a share of recent requests (0-1): a failing cluster is not hammered.
    pub retry_budget: f64,
    /// Retries always allowed per second, whatever the traffic (so a quiet gateway can retry too).
    pub retry_min_per_second: u32,
    /// PEM file of the CA certificates trusted for `https://` clusters (`upstream.ca_file`),
    /// resolved against the config file's directory; `None` trusts the Mozilla root certificates
    /// compiled into rayshift (webpki-roots). Read at startup.
    pub ca_file: Option<PathBuf>,
    /// Serve plain HTTP/1.1 requests to `http://` clusters on the direct path (heads parsed and
    /// forwarded in place, see [`crate::proxy::h1`]); `false` sends every request through hyper.
    pub direct_http1: bool,
}

/// Protection against misbehaving clients (`limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    /// Largest request head (request line plus headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Largest request body accepted; larger gets 413. `None` (the default): unlimited, uploads stream.
    pub max_body_bytes: Option<u64>,
    /// Time a client has to send a complete request head (slowloris protection); > 0.
    pub header_read_timeout: Duration,
    /// Longest pause while a client sends a request body (no data for this long: the request
    /// fails with 408 and holds its cluster connection no longer); > 0.
    pub body_read_timeout: Duration,
    /// How long an HTTP/2 client connection may stay open with no request in flight; > 0.
    pub http2_idle_timeout: Duration,
    /// Longest a response may wait for the client to take its next bytes (HTTP/2 flow control,
    /// or sent data left unacknowledged by TCP); past it the client connection is closed; > 0.
    pub send_timeout: Duration,
    /// Longest an upgraded connection (a WebSocket) may carry no bytes in either direction before
    /// the gateway closes both of its sides; > 0.
    pub tunnel_idle_timeout: Duration,
    /// Most client connections open at once; further connections wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: 64 * 1024,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            http2_idle_timeout: Duration::from_secs(300),
            send_timeout: Duration::from_secs(60),
            tunnel_idle_timeout: Duration::from_secs(3600),
            max_connections: 10_000,
        }
    }
}

/// Ejection of failing clusters from the split between probes (`passive_health`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PassiveHealthConfig {
    /// Connect failures or 5xx in a row that eject a cluster; 0 turns passive health off.
    pub consecutive_failures: u32,
    /// First ejection time; it doubles with every ejection in a row, up to `max_ejection`.
    pub base_ejection: Duration,
    /// Longest ejection time.
    pub max_ejection: Duration,
}

impl Default for PassiveHealthConfig {
    fn default() -> Self {
        PassiveHealthConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
        }
    }
}

/// Graceful shutdown on SIGTERM/SIGINT (`shutdown`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownConfig {
    /// How long `/ready` answers 503 before the listeners close (lets load balancers notice).
    pub ready_delay: Duration,
    /// How long in-flight requests, streams and WebSockets may run after the listeners close.
    pub drain_timeout: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            ready_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            idle_timeout: DEFAULT_UPSTREAM_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            max_idle_per_cluster: DEFAULT_UPSTREAM_MAX_IDLE_PER_CLUSTER,
            max_requests_per_cluster: DEFAULT_UPSTREAM_MAX_REQUESTS_PER_CLUSTER,
            response_timeout: Duration::from_secs(300),
            retries: true,
            direct_http1: true,
            retry_budget: 0.2,
            retry_min_per_second: 10,
            ca_file: None,
        }
    }
}

impl Config {
    /// Parses and validates a YAML config. Relative `state_file` and `admin.token_file` paths are
    /// resolved against `base_dir` (normally the directory of the config file).
    ///
    /// Returns every problem found, each with its field path. A YAML syntax error or a key of the
    /// wrong shape (e.g. a mapping where a list belongs, an unknown key) stops parsing and is
    /// reported alone.
    pub fn from_yaml(text: &str, base_dir: &Path) -> Result<Config, ConfigErrors> {
        let raw = raw::parse(text)?;
        validate::validate(raw, base_dir)
    }

    /// Reads the file at `path` and parses it with [`Config::from_yaml`], resolving relative paths
    /// against the file's directory. A read failure is reported with the field `<file>`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                "<file>",
                format!("cannot read config file {}: {e}", path.display()),
            )
        })?;
        let base_dir = path.parent().unwrap_or_else(|| Path::new(""));
        Config::from_yaml(&text, base_dir)
    }

    /// Position of the shard called `name` in [`Config::shards`], if declared.
    pub fn shard_index(&self, name: &str) -> Option<usize> {
        self.shards.iter().position(|shard| shard.name == name)
    }

    /// The declared shards as routing-table input, in declaration order.
    pub fn shard_specs(&self) -> Vec<crate::routing::ShardSpec> {
        self.shards
            .iter()
            .map(|s| crate::routing::ShardSpec {
                name: s.name.clone(),
                weight: s.weight,
            })
            .collect()
    }

    /// The configured applications as routing-table input (a pinned shard as its index).
    pub fn app_specs(&self) -> Vec<crate::routing::AppSpec> {
        self.apps
            .iter()
            .map(|a| crate::routing::AppSpec {
                name: a.name.clone(),
                route_prefix: a.route_prefix.clone(),
                pinned_shard: a
                    .shard
                    .as_deref()
                    .and_then(|s| self.shard_index(s))
                    .map(|i| i as u32),
            })
            .collect()
    }
}
