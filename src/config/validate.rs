//! Stage two: raw file model -> validated [`Config`], collecting every problem with its field path.
//!
//! The helpers [`parse_duration`], [`parse_positive_duration`], [`validate_name`] and
//! [`validate_url`] are `pub(crate)` so later config sections (shift policies) report problems the
//! same way.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::error::{ConfigError, ConfigErrors};
use super::model::{
    AdminConfig, AppConfig, ClusterConfig, Config, KubeEndpoint, KubeStateConfig, KubernetesConfig,
    LimitsConfig, PassiveHealthConfig, ProbeConfig, ShardConfig, ShutdownConfig, SplitKey,
    TlsConfig, UpstreamConfig, DEFAULT_LISTEN, DEFAULT_SHARD_WEIGHT, DEFAULT_STATE_FILE,
    DEFAULT_TLS_RELOAD_INTERVAL, MAX_NAME_LEN, MAX_PROBE_FAILURE_THRESHOLD,
};
use super::raw::{
    RawAdmin, RawApp, RawCluster, RawConfig, RawKubernetes, RawPolicy, RawProbe, RawSection,
    RawShard, RawUpstream, Text,
};
use crate::shift::policy::MAX_DURATION;
use crate::shift::ShiftPolicy;

/// Message for a required key that is absent (or empty, `key: ~`).
pub(crate) const MISSING: &str = "required key is missing";

/// Parses a humantime duration (`1s`, `500ms`, `1m 30s`, `1.5s`); zero is accepted, more than
/// 365 days is not (a deadline computed from it, now + duration, could overflow the clock).
pub(crate) fn parse_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let duration = humantime::parse_duration(s.trim()).map_err(|e| {
        ConfigError::new(
            field,
            format!("invalid duration {s:?}: {e} (examples: 1s, 500ms, 2m)"),
        )
    })?;
    if duration > MAX_DURATION {
        return Err(ConfigError::new(
            field,
            format!("must be at most 365d, got {s:?}"),
        ));
    }
    Ok(duration)
}

/// Like [`parse_duration`], and the duration must be greater than zero.
pub(crate) fn parse_positive_duration(field: &str, s: &str) -> Result<Duration, ConfigError> {
    let duration = parse_duration(field, s)?;
    if duration.is_zero() {
        return Err(ConfigError::new(
            field,
            format!("must be greater than 0, got {s:?}"),
        ));
    }
    Ok(duration)
}

/// Checks a shard or cluster name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most [`MAX_NAME_LEN`]
/// characters. `what` names the kind of thing in messages ("shard", "cluster").
pub(crate) fn validate_name(field: &str, what: &str, name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return Err(ConfigError::new(
            field,
            format!("{what} name must not be empty"),
        ));
    };
    let valid = first.is_ascii_alphanumeric()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !valid {
        return Err(ConfigError::new(
            field,
            format!(
                "invalid {what} name {name:?}: use letters, digits, '.', '_' and '-', starting with a letter or digit"
            ),
        ));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(ConfigError::new(
            field,
            format!(
                "{what} name {name:?} is {} characters long, at most {MAX_NAME_LEN} are allowed",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// Parses a base URL of a cluster endpoint: absolute, scheme http or https, with a host, no
/// query or fragment, path empty or `/`. A parse failure is reported with the url crate's message
/// (e.g. `relative URL without a base`).
pub(crate) fn validate_url(field: &str, s: &str) -> Result<url::Url, ConfigError> {
    let url = url::Url::parse(s).map_err(|e| ConfigError::new(field, e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(ConfigError::new(
            field,
            format!(
                "expected an http:// or https:// URL, got {s:?} (scheme {:?})",
                url.scheme()
            ),
        ));
    }
    if url.host().is_none() {
        return Err(ConfigError::new(field, format!("URL {s:?} has no host")));
    }
    if url.query().is_some() {
        return Err(ConfigError::new(
            field,
            format!("URL {s:?} must not have a query string"),
        ));
    }
    if url.fragment().is_some() {
        return Err(ConfigError::new(
            field,
            format!("URL {s:?} must not have a fragment"),
        ));
    }
    if !matches!(url.path(), "" | "/") {
        return Err(ConfigError::new(
            field,
            format!(
                "URL {s:?} must not have a path (got {:?}): requests keep their own path",
                url.path()
            ),
        ));
    }
    Ok(url)
}

/// Parses the `split_key` syntax; `Err` is the message.
pub(crate) fn parse_split_key(s: &str) -> Result<SplitKey, String> {
    let expected =
        || format!("expected none, header:<name>, cookie:<name> or client_ip, got {s:?}");
    match s {
        "none" => Ok(SplitKey::None),
        "client_ip" => Ok(SplitKey::ClientIp),
        _ => {
            if let Some(name) = s.strip_prefix("header:") {
                if name.is_empty() {
                    return Err(expected());
                }
                http::HeaderName::from_bytes(name.as_bytes())
                    .map(SplitKey::Header)
                    .map_err(|_| format!("invalid HTTP header name {name:?} in {s:?}"))
            } else if let Some(name) = s.strip_prefix("cookie:") {
                if name.is_empty() {
                    return Err(expected());
                }
                if name.bytes().all(is_token_byte) {
                    Ok(SplitKey::Cookie(name.to_owned()))
                } else {
                    Err(format!(
                        "invalid cookie name {name:?} in {s:?}: use letters, digits and !#$%&'*+-.^_`|~"
                    ))
                }
            } else {
                Err(expected())
            }
        }
    }
}

/// An HTTP token character (RFC 9110 `tchar`), which is what a cookie name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Collected problems; values that fail are replaced by placeholders so checking can go on, and
/// the placeholders never escape because any problem makes [`validate`] return `Err`.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigError::new(field, message));
    }

    fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(error) => {
                self.0.push(error);
                None
            }
        }
    }

    /// A required key's text, or a "missing" problem.
    fn required<'a>(&mut self, field: &str, value: Option<&'a Text>) -> Option<&'a str> {
        match value {
            Some(text) => Some(text.as_str()),
            None => {
                self.push(field, MISSING);
                None
            }
        }
    }
}

fn socket_addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.trim().parse().map_err(|_| {
        ConfigError::new(
            field,
            format!(
                "invalid socket address {s:?}: expected an IP address and port such as 127.0.0.1:8080 or [::1]:8080"
            ),
        )
    })
}

/// A path key: non-empty, resolved against `base_dir` when relative.
fn path(field: &str, s: &str, base_dir: &Path) -> Result<PathBuf, ConfigError> {
    if s.is_empty() {
        return Err(ConfigError::new(field, "path must not be empty"));
    }
    Ok(base_dir.join(s))
}

/// Validates the raw file model; relative paths resolve against `base_dir`.
pub(crate) fn validate(raw: RawConfig, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let mut p = Problems::default();

    let listen = raw
        .listen
        .as_ref()
        .and_then(|text| p.check(socket_addr("listen", text.as_str())))
        .unwrap_or(DEFAULT_LISTEN);

    let admin = admin(&mut p, raw.admin.as_ref(), base_dir);

    let state_file = match &raw.state_file {
        Some(text) => p
            .check(path("state_file", text.as_str(), base_dir))
            .unwrap_or_default(),
        None => base_dir.join(DEFAULT_STATE_FILE),
    };

    let (shards, declared) = shards(&mut p, raw.shards.as_deref());

    let split_key = match &raw.split_key {
        Some(text) => match parse_split_key(text.as_str()) {
            Ok(key) => key,
            Err(message) => {
                p.push("split_key", message);
                SplitKey::None
            }
        },
        None => SplitKey::None,
    };

    let clusters = clusters(&mut p, raw.clusters.as_deref().unwrap_or(&[]), &declared);
    let apps = apps(&mut p, raw.apps.as_deref().unwrap_or(&[]), &declared);
    let probe = probe(&mut p, raw.probe.as_ref());
    let upstream = upstream(&mut p, raw.upstream.as_ref(), base_dir);
    let shift_defaults = match &raw.shift_defaults {
        Some(keys) => policy(&mut p, "shift_defaults", &ShiftPolicy::default(), keys),
        None => ShiftPolicy::default(),
    };
    let shards = shards
        .into_iter()
        .map(|(mut shard, i, auto)| {
            if let Some(keys) = auto {
                let field = format!("shards[{i}].auto_shift");
                shard.auto_shift = Some(policy(&mut p, &field, &shift_defaults, keys));
            }
            shard
        })
        .collect();
    let limits = limits(&mut p, raw.limits.as_ref());
    let passive_health = passive_health(&mut p, raw.passive_health.as_ref());
    let shutdown = shutdown(&mut p, raw.shutdown.as_ref());
    let tls = tls(&mut p, raw.tls.as_ref(), base_dir);
    let kubernetes = raw
        .discovery
        .as_ref()
        .and_then(|d| d.kubernetes.as_ref())
        .map(|k| kubernetes(&mut p, k, &shift_defaults, base_dir));
    let max_concurrent_shifts = match &raw.max_concurrent_shifts {
        Some(text) => match text.as_str().trim().parse::<usize>() {
            Ok(n) if n >= 1 => n,
            _ => {
                p.push(
                    "max_concurrent_shifts",
                    format!("expected an integer >= 1, got {:?}", text.as_str()),
                );
                1
            }
        },
        None => 1,
    };

    if !p.0.is_empty() {
        return Err(ConfigErrors(p.0));
    }
    Ok(Config {
        listen,
        admin,
        state_file,
        shards,
        split_key,
        clusters,
        apps,
        probe,
        upstream,
        shift_defaults,
        max_concurrent_shifts,
        limits,
        passive_health,
        shutdown,
        tls,
        kubernetes,
        proxy_workers: 0,
    })
}

fn kubernetes(
    p: &mut Problems,
    raw: &RawKubernetes,
    defaults: &ShiftPolicy,
    base_dir: &Path,
) -> KubernetesConfig {
    let field = "discovery.kubernetes";
    let mut namespaces = Vec::new();
    for (i, ns) in raw.namespaces.iter().flatten().enumerate() {
        let ns = ns.as_str().trim();
        if !is_namespace_name(ns) {
            p.push(
                format!("{field}.namespaces[{i}]"),
                format!("{ns:?} is not a Kubernetes namespace name"),
            );
        } else if namespaces.iter().any(|n| n == ns) {
            // Two watchers of one namespace would report every RayCluster twice.
            p.push(
                format!("{field}.namespaces[{i}]"),
                format!("namespace {ns:?} is listed twice"),
            );
        } else {
            namespaces.push(ns.to_string());
        }
    }
    let label_selector = raw.label_selector.as_ref().map_or_else(
        || "rayshift.io/shard".to_string(),
        |t| t.as_str().trim().to_string(),
    );
    if let Err(message) = super::selector::check(&label_selector) {
        p.push(format!("{field}.label_selector"), message);
    }
    let endpoint = match raw.endpoint.as_ref().map(|t| t.as_str().trim()) {
        None | Some("serve_service") => KubeEndpoint::ServeService,
        Some("head_service_ip") => KubeEndpoint::HeadServiceIp,
        Some(other) => {
            p.push(
                format!("{field}.endpoint"),
                format!("expected serve_service or head_service_ip, got {other:?}"),
            );
            KubeEndpoint::ServeService
        }
    };
    let kubeconfig = raw
        .kubeconfig
        .as_ref()
        .and_then(|t| p.check(path(&format!("{field}.kubeconfig"), t.as_str(), base_dir)));
    let delete_drained = match raw.delete_drained.as_ref().map(|t| t.as_str().trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            p.push(
                format!("{field}.delete_drained"),
                format!("expected true or false, got {other:?}"),
            );
            false
        }
    };
    let auto_shift = raw
        .auto_shift
        .as_ref()
        .map(|keys| policy(p, &format!("{field}.auto_shift"), defaults, keys));
    let state = raw.state.as_ref().map(|raw| {
        let mut state = KubeStateConfig {
            namespace: String::new(),
            configmap: "rayshift-state".into(),
            lease: "rayshift-leader".into(),
            lease_duration: Duration::from_secs(15),
            identity: None,
        };
        keyed(
            p,
            &format!("{field}.state"),
            Some(raw),
            &mut state,
            &[
                ("namespace", |s, v| {
                    if !is_namespace_name(v) {
                        return Err(format!("{v:?} is not a Kubernetes namespace name"));
                    }
                    s.namespace = v.to_string();
                    Ok(())
                }),
                ("configmap", |s, v| {
                    s.configmap = object_name(v)?;
                    Ok(())
                }),
                ("lease", |s, v| {
                    s.lease = object_name(v)?;
                    Ok(())
                }),
                ("lease_duration", |s, v| {
                    s.lease_duration = positive_duration(v)?;
                    Ok(())
                }),
                ("identity", |s, v| {
                    if v.trim().is_empty() {
                        return Err("must not be empty".into());
                    }
                    s.identity = Some(v.to_string());
                    Ok(())
                }),
            ],
        );
        if state.namespace.is_empty() {
            p.push(format!("{field}.state.namespace"), MISSING);
        }
        state
    });
    KubernetesConfig {
        namespaces,
        label_selector,
        endpoint,
        kubeconfig,
        delete_drained,
        auto_shift,
        state,
    }
}

/// One key of a keyed section: its name and how its text is applied.
type KeySetter<T> = (&'static str, fn(&mut T, &str) -> Result<(), String>);

/// Applies each key of a section; bad values and unknown keys are reported as `field.key`.
fn keyed<T>(
    p: &mut Problems,
    field: &str,
    raw: Option<&RawSection>,
    target: &mut T,
    keys: &[KeySetter<T>],
) {
    let Some(raw) = raw else { return };
    let known = || keys.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ");
    for key in raw.empty_keys() {
        if !keys.iter().any(|(k, _)| k == key) {
            p.push(
                format!("{field}.{key}"),
                format!("unknown key; expected one of {}", known()),
            );
        }
    }
    for (key, value) in raw {
        match keys.iter().find(|(k, _)| k == key) {
            Some((_, set)) => {
                if let Err(message) = set(target, value.as_str().trim()) {
                    p.push(format!("{field}.{key}"), message);
                }
            }
            None => {
                p.push(
                    format!("{field}.{key}"),
                    format!("unknown key; expected one of {}", known()),
                );
            }
        }
    }
}

/// A Kubernetes namespace name: a DNS label (lowercase letters, digits, `-`; at most 63).
fn is_namespace_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes object name (ConfigMap, Lease): a DNS subdomain (lowercase letters, digits, `-`
/// and `.`, starting and ending with a letter or digit; at most 253).
fn object_name(s: &str) -> Result<String, String> {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let valid = !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| alnum(b) || b == b'-' || b == b'.')
        && s.bytes().next().is_some_and(alnum)
        && s.bytes().last().is_some_and(alnum);
    if valid {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a Kubernetes object name (lowercase letters, digits, '-' and '.')"
        ))
    }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    parse_positive_duration("", s).map_err(|e| e.message)
}

fn any_duration(s: &str) -> Result<Duration, String> {
    parse_duration("", s).map_err(|e| e.message)
}

fn count<T: std::str::FromStr>(s: &str, min: u64) -> Result<T, String> {
    bounded_count(s, min, u64::MAX)
}

/// Like [`count`], and at most `max`.
fn bounded_count<T: std::str::FromStr>(s: &str, min: u64, max: u64) -> Result<T, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => {
            s.parse::<T>().map_err(|_| format!("{s:?} is too large"))
        }
        _ if max == u64::MAX => Err(format!("expected an integer >= {min}, got {s:?}")),
        _ => Err(format!("expected an integer {min} to {max}, got {s:?}")),
    }
}

/// Largest `limits.max_header_bytes` (256 KiB).
const MAX_HEADER_BYTES: u64 = 256 * 1024;
/// Largest `limits.max_connections`.
const MAX_CONNECTIONS: u64 = 1_000_000;

fn limits(p: &mut Problems, raw: Option<&RawSection>) -> LimitsConfig {
    let mut limits = LimitsConfig::default();
    keyed(
        p,
        "limits",
        raw,
        &mut limits,
        &[
            ("max_header_bytes", |l, s| {
                // Bounded: HTTP/2 header lists near 1 MiB could fill a header map so that adding
                // the forwarded headers overflows it.
                l.max_header_bytes = bounded_count(s, 8192, MAX_HEADER_BYTES)?;
                Ok(())
            }),
            ("max_body_bytes", |l, s| {
                l.max_body_bytes = if s == "0" || s == "none" {
                    None
                } else {
                    Some(count(s, 1)?)
                };
                Ok(())
            }),
            ("header_read_timeout", |l, s| {
                l.header_read_timeout = positive_duration(s)?;
                Ok(())
            }),
            ("body_read_timeout", |l, s| {
                l.body_read_timeout = positive_duration(s)?;
                Ok(())
            }),
            ("http2_idle_timeout", |l, s| {
                l.http2_idle_timeout = positive_duration(s)?;
                Ok(())
            }),
            ("send_timeout", |l, s| {
                l.send_timeout = positive_duration(s)?;
                Ok(())
            }),
            ("tunnel_idle_timeout", |l, s| {
                l.tunnel_idle_timeout = positive_duration(s)?;
                Ok(())
            }),
            ("max_connections", |l, s| {
                l.max_connections = bounded_count(s, 1, MAX_CONNECTIONS)?;
                Ok(())
            }),
        ],
    );
    limits
}

fn passive_health(p: &mut Problems, raw: Option<&RawSection>) -> PassiveHealthConfig {
    let mut health = PassiveHealthConfig::default();
    keyed(
        p,
        "passive_health",
        raw,
        &mut health,
        &[
            ("consecutive_failures", |h, s| {
                h.consecutive_failures = count(s, 0)?;
                Ok(())
            }),
            ("base_ejection", |h, s| {
                h.base_ejection = positive_duration(s)?;
                Ok(())
            }),
            ("max_ejection", |h, s| {
                h.max_ejection = positive_duration(s)?;
                Ok(())
            }),
        ],
    );
    if health.max_ejection < health.base_ejection {
        p.push(
            "passive_health.max_ejection",
            "must not be shorter than base_ejection",
        );
    }
    health
}

fn shutdown(p: &mut Problems, raw: Option<&RawSection>) -> ShutdownConfig {
    let mut shutdown = ShutdownConfig::default();
    keyed(
        p,
        "shutdown",
        raw,
        &mut shutdown,
        &[
            ("ready_delay", |c, s| {
                c.ready_delay = any_duration(s)?;
                Ok(())
            }),
            ("drain_timeout", |c, s| {
                c.drain_timeout = any_duration(s)?;
                Ok(())
            }),
        ],
    );
    shutdown
}

/// `tls`: absent (or `tls: ~`) is plain HTTP; a `tls` mapping needs both files, also when it is
/// empty or its values are (a template that rendered them empty must not serve plain HTTP on the
/// TLS port).
fn tls(p: &mut Problems, raw: Option<&RawSection>, base_dir: &Path) -> Option<TlsConfig> {
    let raw = raw?;
    // Empty paths stand for "not set"; they never escape (a missing file key is a problem).
    let mut tls = TlsConfig {
        cert_file: PathBuf::new(),
        key_file: PathBuf::new(),
        reload_interval: DEFAULT_TLS_RELOAD_INTERVAL,
    };
    keyed(
        p,
        "tls",
        Some(raw),
        &mut tls,
        &[
            ("cert_file", |t, s| {
                t.cert_file = non_empty_path(s)?;
                Ok(())
            }),
            ("key_file", |t, s| {
                t.key_file = non_empty_path(s)?;
                Ok(())
            }),
            ("reload_interval", |t, s| {
                t.reload_interval = any_duration(s)?;
                Ok(())
            }),
        ],
    );
    for (key, other) in [("cert_file", "key_file"), ("key_file", "cert_file")] {
        if !raw.contains_key(key) {
            let message = if raw.contains_key(other) {
                format!("required when tls.{other} is set: TLS needs both files")
            } else {
                format!("{MISSING}: TLS needs tls.cert_file and tls.key_file")
            };
            p.push(format!("tls.{key}"), message);
        }
    }
    if tls.cert_file.as_os_str().is_empty() || tls.key_file.as_os_str().is_empty() {
        return None; // reported above
    }
    tls.cert_file = base_dir.join(&tls.cert_file);
    tls.key_file = base_dir.join(&tls.key_file);
    Some(tls)
}

fn non_empty_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("path must not be empty".into());
    }
    Ok(PathBuf::from(s))
}

/// A policy: `base` with every key of `keys` applied; each bad key is reported as `field.key`.
fn policy(p: &mut Problems, field: &str, base: &ShiftPolicy, keys: &RawPolicy) -> ShiftPolicy {
    let mut policy = base.clone();
    for key in keys.empty_keys() {
        if !crate::shift::policy::KEYS.contains(&key.as_str()) {
            p.push(
                format!("{field}.{key}"),
                format!(
                    "unknown policy key; expected one of {}",
                    crate::shift::policy::KEYS.join(", ")
                ),
            );
        }
    }
    for (key, value) in keys {
        if let Err(e) = policy.set(key, value.as_str()) {
            p.push(format!("{field}.{key}"), e.message);
        }
    }
    policy
}

fn admin(p: &mut Problems, raw: Option<&RawAdmin>, base_dir: &Path) -> AdminConfig {
    let mut admin = AdminConfig::default();
    let Some(raw) = raw else { return admin };
    if let Some(text) = &raw.listen {
        if let Some(addr) = p.check(socket_addr("admin.listen", text.as_str())) {
            admin.listen = addr;
        }
    }
    if let Some(text) = &raw.token_file {
        admin.token_file = p.check(path("admin.token_file", text.as_str(), base_dir));
    }
    if let Some(text) = &raw.request_timeout {
        if let Some(timeout) = p.check(parse_positive_duration(
            "admin.request_timeout",
            text.as_str(),
        )) {
            admin.request_timeout = timeout;
        }
    }
    if let Some(text) = &raw.removed_series_ttl {
        if let Some(ttl) = p.check(parse_duration("admin.removed_series_ttl", text.as_str())) {
            admin.removed_series_ttl = ttl;
        }
    }
    // The admin API changes where traffic goes: reachable from other hosts only with a token.
    if !admin.listen.ip().is_loopback() && admin.token_file.is_none() && raw.token_file.is_none() {
        p.push(
            "admin.listen",
            format!(
                "{} is not a loopback address: set admin.token_file so the admin API, which moves traffic, is not open to the network (or listen on 127.0.0.1 or [::1])",
                admin.listen
            ),
        );
    }
    admin
}

/// The declared shards, and the names clusters and apps may refer to. The latter holds every
/// non-empty name as written, even invalid ones, so one bad shard name is reported once rather
/// than again at every reference.
#[allow(clippy::type_complexity)]
fn shards<'a>(
    p: &mut Problems,
    raw: Option<&'a [RawShard]>,
) -> (
    Vec<(ShardConfig, usize, Option<&'a RawPolicy>)>,
    Vec<String>,
) {
    let raw = raw.unwrap_or(&[]);
    if raw.is_empty() {
        p.push(
            "shards",
            "at least one shard must be declared, e.g. shards: [shard-0]",
        );
        return (Vec::new(), Vec::new());
    }
    let mut shards = Vec::with_capacity(raw.len());
    let mut declared: Vec<String> = Vec::new();
    let mut first_at: HashMap<String, usize> = HashMap::new();
    for (i, entry) in raw.iter().enumerate() {
        let (name_field, name, weight, auto) = match entry {
            RawShard::Name(name) => (format!("shards[{i}]"), Some(name.as_str()), None, None),
            RawShard::Entry(entry) => {
                let field = format!("shards[{i}].name");
                let name = p.required(&field, entry.name.as_ref());
                (
                    field,
                    name,
                    entry.weight.as_ref(),
                    entry.auto_shift.as_ref(),
                )
            }
        };
        let weight = match weight {
            None => Some(DEFAULT_SHARD_WEIGHT),
            Some(text) => shard_weight(p, &format!("shards[{i}].weight"), text.as_str()),
        };
        let Some(name) = name else { continue };
        let name_ok = p.check(validate_name(&name_field, "shard", name)).is_some();
        if let Some(first) = first_at.get(name) {
            p.push(
                &name_field,
                format!("duplicate shard name {name:?} (first at shards[{first}])"),
            );
            continue;
        }
        if !name.is_empty() {
            first_at.insert(name.to_owned(), i);
            declared.push(name.to_owned());
        }
        if let (true, Some(weight)) = (name_ok, weight) {
            let shard = ShardConfig {
                name: name.to_owned(),
                weight,
                auto_shift: None,
            };
            shards.push((shard, i, auto));
        }
    }
    (shards, declared)
}

fn shard_weight(p: &mut Problems, field: &str, s: &str) -> Option<f64> {
    match s.trim().parse::<f64>() {
        Ok(w) if w.is_finite() && w > 0.0 => Some(w),
        Ok(_) => {
            p.push(
                field,
                format!("must be a finite number greater than 0, got {s:?}"),
            );
            None
        }
        Err(_) => {
            p.push(
                field,
                format!("expected a number greater than 0, got {s:?}"),
            );
            None
        }
    }
}

/// Checks a reference to a shard against the declared names (skipped when none is declared: that
/// is already reported at `shards`).
fn shard_ref(p: &mut Problems, field: &str, name: &str, declared: &[String]) -> bool {
    if declared.is_empty() || declared.iter().any(|d| d == name) {
        return true;
    }
    p.push(
        field,
        format!("unknown shard {name:?}; declared: {}", declared.join(", ")),
    );
    false
}

/// A cluster weight as written: absent, valid, or invalid (already reported).
#[derive(Clone, Copy)]
enum Weight {
    Absent,
    Valid(u32),
    Invalid,
}

fn clusters(p: &mut Problems, raw: &[RawCluster], declared: &[String]) -> Vec<ClusterConfig> {
    let mut clusters = Vec::with_capacity(raw.len());
    let mut first_at: HashMap<&str, usize> = HashMap::new();
    // Per shard, in order of first mention: (shard, [(cluster index, weight)]).
    let mut by_shard: Vec<(&str, Vec<(usize, Weight)>)> = Vec::new();

    for (i, c) in raw.iter().enumerate() {
        let field = |key: &str| format!("clusters[{i}].{key}");

        let name = p
            .required(&field("name"), c.name.as_ref())
            .and_then(|name| {
                p.check(validate_name(&field("name"), "cluster", name))?;
                if let Some(first) = first_at.get(name) {
                    p.push(
                        field("name"),
                        format!("duplicate cluster name {name:?} (first at clusters[{first}])"),
                    );
                    return None;
                }
                first_at.insert(name, i);
                Some(name)
            });

        let shard_text = p.required(&field("shard"), c.shard.as_ref());
        let shard = shard_text.filter(|s| shard_ref(p, &field("shard"), s, declared));

        let revision = p
            .required(&field("revision"), c.revision.as_ref())
            .and_then(|r| {
                if r.trim().is_empty() {
                    p.push(field("revision"), "must not be empty");
                    None
                } else {
                    Some(r)
                }
            });

        let serve_url = p
            .required(&field("serve_url"), c.serve_url.as_ref())
            .and_then(|s| p.check(validate_url(&field("serve_url"), s)));

        let dashboard_url = match &c.dashboard_url {
            None => Some(None),
            Some(text) => p
                .check(validate_url(&field("dashboard_url"), text.as_str()))
                .map(Some),
        };

        let weight = match &c.weight {
            None => Weight::Absent,
            Some(text) => match text.as_str().trim().parse::<u32>() {
                Ok(w) if w <= 100 => Weight::Valid(w),
                Ok(w) => {
                    p.push(
                        field("weight"),
                        format!("must be between 0 and 100, got {w}"),
                    );
                    Weight::Invalid
                }
                Err(_) => {
                    p.push(
                        field("weight"),
                        format!("expected an integer from 0 to 100, got {:?}", text.as_str()),
                    );
                    Weight::Invalid
                }
            },
        };

        if let Some(shard) = shard_text {
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, members)) => members.push((i, weight)),
                None => by_shard.push((shard, vec![(i, weight)])),
            }
        }

        if let (Some(name), Some(shard), Some(revision), Some(serve_url), Some(dashboard_url)) =
            (name, shard, revision, serve_url, dashboard_url)
        {
            clusters.push(ClusterConfig {
                name: name.to_owned(),
                shard: shard.to_owned(),
                revision: revision.to_owned(),
                serve_url,
                dashboard_url,
                weight: match weight {
                    Weight::Valid(w) => Some(w),
                    Weight::Absent | Weight::Invalid => None,
                },
            });
        }
    }

    for (shard, members) in &by_shard {
        shard_weights(p, shard, members);
    }
    clusters
}

/// Either no cluster of `shard` sets a weight, or all do and the weights sum to 100.
fn shard_weights(p: &mut Problems, shard: &str, members: &[(usize, Weight)]) {
    if members.iter().any(|(_, w)| matches!(w, Weight::Invalid)) {
        return; // already reported; a sum would only add noise
    }
    let set: Vec<(usize, u32)> = members
        .iter()
        .filter_map(|&(i, w)| match w {
            Weight::Valid(w) => Some((i, w)),
            Weight::Absent | Weight::Invalid => None,
        })
        .collect();
    let Some(&(first_set, _)) = set.first() else {
        return; // no cluster of this shard sets a weight
    };
    if let Some(&(unset, _)) = members.iter().find(|(_, w)| matches!(w, Weight::Absent)) {
        p.push(
            format!("clusters[{unset}].weight"),
            format!(
                "required: another cluster of shard {shard:?} sets a weight (clusters[{first_set}]); \
                 set weight on every cluster of the shard or on none"
            ),
        );
        return;
    }
    let sum: u32 = set.iter().map(|&(_, w)| w).sum();
    if sum != 100 {
        let parts: Vec<String> = set
            .iter()
            .map(|(i, w)| format!("clusters[{i}]: {w}"))
            .collect();
        p.push(
            format!("clusters[{first_set}].weight"),
            format!(
                "weights of shard {shard:?} sum to {sum}, expected 100 ({})",
                parts.join(", ")
            ),
        );
    }
}

fn apps(p: &mut Problems, raw: &[RawApp], declared: &[String]) -> Vec<AppConfig> {
    let mut apps = Vec::with_capacity(raw.len());
    let mut name_at: HashMap<&str, usize> = HashMap::new();
    let mut prefix_at: HashMap<&str, usize> = HashMap::new();
    for (i, a) in raw.iter().enumerate() {
        let field = |key: &str| format!("apps[{i}].{key}");

        let name = p.required(&field("name"), a.name.as_ref()).and_then(|name| {
            if name.is_empty() {
                p.push(field("name"), "app name must not be empty");
                return None;
            }
            if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                p.push(
                    field("name"),
                    format!("invalid app name {name:?}: must not contain whitespace or control characters"),
                );
                return None;
            }
            if let Some(first) = name_at.get(name) {
                p.push(
                    field("name"),
                    format!("duplicate app name {name:?} (first at apps[{first}])"),
                );
                return None;
            }
            name_at.insert(name, i);
            Some(name)
        });

        let route_prefix = p
            .required(&field("route_prefix"), a.route_prefix.as_ref())
            .and_then(|prefix| {
                if !prefix.starts_with('/') {
                    p.push(
                        field("route_prefix"),
                        format!("must start with '/', got {prefix:?}"),
                    );
                    return None;
                }
                if prefix
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
                {
                    p.push(
                        field("route_prefix"),
                        format!("invalid route_prefix {prefix:?}: must be a URL path, without whitespace, '?' or '#'"),
                    );
                    return None;
                }
                if let Some(first) = prefix_at.get(prefix) {
                    p.push(
                        field("route_prefix"),
                        format!("duplicate route_prefix {prefix:?} (first at apps[{first}])"),
                    );
                    return None;
                }
                prefix_at.insert(prefix, i);
                Some(prefix)
            });

        let shard = match &a.shard {
            None => Some(None),
            Some(text) => {
                let s = text.as_str();
                shard_ref(p, &field("shard"), s, declared).then(|| Some(s.to_owned()))
            }
        };

        if let (Some(name), Some(route_prefix), Some(shard)) = (name, route_prefix, shard) {
            apps.push(AppConfig {
                name: name.to_owned(),
                route_prefix: route_prefix.to_owned(),
                shard,
            });
        }
    }
    apps
}

fn probe(p: &mut Problems, raw: Option<&RawProbe>) -> ProbeConfig {
    let mut probe = ProbeConfig::default();
    let Some(raw) = raw else { return probe };
    if let Some(text) = &raw.interval {
        if let Some(d) = p.check(parse_positive_duration("probe.interval", text.as_str())) {
            probe.interval = d;
        }
    }
    if let Some(text) = &raw.timeout {
        if let Some(d) = p.check(parse_positive_duration("probe.timeout", text.as_str())) {
            probe.timeout = d;
        }
    }
    if let Some(text) = &raw.failure_threshold {
        let max = u64::from(MAX_PROBE_FAILURE_THRESHOLD);
        match bounded_count(text.as_str().trim(), 1, max) {
            Ok(n) => probe.failure_threshold = n,
            Err(message) => p.push("probe.failure_threshold", message),
        }
    }
    probe
}

fn upstream(p: &mut Problems, raw: Option<&RawUpstream>, base_dir: &Path) -> UpstreamConfig {
    let mut upstream = UpstreamConfig::default();
    let Some(raw) = raw else { return upstream };
    if let Some(text) = &raw.ca_file {
        upstream.ca_file = p.check(path("upstream.ca_file", text.as_str(), base_dir));
    }
    if let Some(text) = &raw.idle_timeout {
        if let Some(d) = p.check(parse_positive_duration(
            "upstream.idle_timeout",
            text.as_str(),
        )) {
            upstream.idle_timeout = d;
        }
    }
    if let Some(text) = &raw.connect_timeout {
        if let Some(d) = p.check(parse_positive_duration(
            "upstream.connect_timeout",
            text.as_str(),
        )) {
            upstream.connect_timeout = d;
        }
    }
    if let Some(text) = &raw.response_timeout {
        if let Some(d) = p.check(parse_positive_duration(
            "upstream.response_timeout",
            text.as_str(),
        )) {
            upstream.response_timeout = d;
        }
    }
    for (key, text, flag) in [
        ("upstream.retries", &raw.retries, &mut upstream.retries),
        (
            "upstream.direct_http1",
            &raw.direct_http1,
            &mut upstream.direct_http1,
        ),
    ] {
        if let Some(text) = text {
            match text.as_str().trim() {
                "true" | "on" | "yes" => *flag = true,
                "false" | "off" | "no" => *flag = false,
                other => p.push(key, format!("expected true or false, got {other:?}")),
            }
        }
    }
    if let Some(text) = &raw.retry_budget {
        match text.as_str().trim().parse::<f64>() {
            Ok(r) if (0.0..=1.0).contains(&r) => upstream.retry_budget = r,
            _ => p.push(
                "upstream.retry_budget",
                format!(
                    "expected a ratio 0-1 (0.2 = retries up to 20% of requests), got {:?}",
                    text.as_str()
                ),
            ),
        }
    }
    if let Some(text) = &raw.retry_min_per_second {
        match count::<u32>(text.as_str().trim(), 0) {
            Ok(n) => upstream.retry_min_per_second = n,
            Err(m) => p.push("upstream.retry_min_per_second", m),
        }
    }
    if let Some(text) = &raw.max_idle_per_cluster {
        match text.as_str().trim().parse::<usize>() {
            Ok(n) => upstream.max_idle_per_cluster = n,
            Err(_) => p.push(
                "upstream.max_idle_per_cluster",
                format!("expected a non-negative integer, got {:?}", text.as_str()),
            ),
        }
    }
    if let Some(text) = &raw.max_requests_per_cluster {
        match count::<u64>(text.as_str().trim(), 1) {
            Ok(n) => upstream.max_requests_per_cluster = n,
            Err(m) => p.push("upstream.max_requests_per_cluster", m),
        }
    }
    upstream
}
