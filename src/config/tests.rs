//! Tests of the config module: parsing, defaults, every validation rule and error reporting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::validate::{parse_duration, parse_positive_duration, validate_name, validate_url};
use super::*;

const FULL: &str = r#"
listen: 0.0.0.0:8080
admin:
  listen: "[::1]:9902"
  token_file: secrets/admin-token
  request_timeout: 5s
  removed_series_ttl: 0s
state_file: /var/lib/rayshift/state.json
shards: [shard-0, {name: shard-1, weight: 2.5}]
split_key: header:X-User-Id
clusters:
  - name: blue
    shard: shard-0
    revision: v1
    serve_url: http://127.0.0.1:8101
    dashboard_url: http://127.0.0.1:8265
    weight: 90
  - name: green
    shard: shard-0
    revision: v2
    serve_url: https://green.example.com:8443/
    weight: 10
  - name: red
    shard: shard-1
    revision: "1.10"
    serve_url: http://10.0.0.7:8000
apps:
  - name: echo
    route_prefix: /echo
    shard: shard-0
  - name: summarize
    route_prefix: /
probe:
  interval: 2s
  timeout: 500ms
  failure_threshold: 2
upstream:
  idle_timeout: 3s
  connect_timeout: 1s 500ms
  max_idle_per_cluster: 64
"#;

const MINIMAL: &str = "shards: [shard-0]\n";

fn base() -> &'static Path {
    Path::new("/etc/rayshift")
}

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_yaml(text, base())
}

fn errors(text: &str) -> Vec<ConfigError> {
    match parse(text) {
        Ok(config) => panic!("expected errors, got {config:?}"),
        Err(ConfigErrors(errors)) => errors,
    }
}

/// The errors as `field: message` lines.
fn lines(text: &str) -> Vec<String> {
    errors(text).iter().map(ToString::to_string).collect()
}

fn only_error(text: &str) -> ConfigError {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    errors.into_iter().next().unwrap_or_else(|| unreachable!())
}

fn err(field: &str, message: &str) -> ConfigError {
    ConfigError::new(field, message)
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn url(s: &str) -> url::Url {
    url::Url::parse(s).unwrap()
}

/// Two declared shards (`shard-0`, `shard-1`) and one cluster written as `cluster_lines`.
fn with_cluster(cluster_lines: &str) -> String {
    format!("shards: [shard-0, shard-1]\nclusters:\n  - {cluster_lines}\n")
}

// ----- round trip and defaults -----

#[test]
fn full_config_round_trip() {
    let config = parse(FULL).unwrap();
    let expected = Config {
        listen: addr("0.0.0.0:8080"),
        admin: AdminConfig {
            listen: addr("[::1]:9902"),
            token_file: Some(PathBuf::from("/etc/rayshift/secrets/admin-token")),
            request_timeout: Duration::from_secs(5),
            removed_series_ttl: Duration::ZERO,
        },
        state_file: PathBuf::from("/var/lib/rayshift/state.json"),
        shards: vec![
            ShardConfig {
                name: "shard-0".into(),
                weight: 1.0,
                auto_shift: None,
            },
            ShardConfig {
                name: "shard-1".into(),
                weight: 2.5,
                auto_shift: None,
            },
        ],
        split_key: SplitKey::Header(http::HeaderName::from_static("x-user-id")),
        clusters: vec![
            ClusterConfig {
                name: "blue".into(),
                shard: "shard-0".into(),
                revision: "v1".into(),
                serve_url: url("http://127.0.0.1:8101"),
                dashboard_url: Some(url("http://127.0.0.1:8265")),
                weight: Some(90),
            },
            ClusterConfig {
                name: "green".into(),
                shard: "shard-0".into(),
                revision: "v2".into(),
                serve_url: url("https://green.example.com:8443/"),
                dashboard_url: None,
                weight: Some(10),
            },
            ClusterConfig {
                name: "red".into(),
                shard: "shard-1".into(),
                revision: "1.10".into(),
                serve_url: url("http://10.0.0.7:8000"),
                dashboard_url: None,
                weight: None,
            },
        ],
        apps: vec![
            AppConfig {
                name: "echo".into(),
                route_prefix: "/echo".into(),
                shard: Some("shard-0".into()),
            },
            AppConfig {
                name: "summarize".into(),
                route_prefix: "/".into(),
                shard: None,
            },
        ],
        probe: ProbeConfig {
            interval: Duration::from_secs(2),
            timeout: Duration::from_millis(500),
            failure_threshold: 2,
        },
        upstream: UpstreamConfig {
            idle_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_millis(1500),
            max_idle_per_cluster: 64,
            ..UpstreamConfig::default()
        },
        shift_defaults: crate::shift::ShiftPolicy::default(),
        max_concurrent_shifts: 1,
        limits: crate::config::LimitsConfig::default(),
        passive_health: crate::config::PassiveHealthConfig::default(),
        shutdown: crate::config::ShutdownConfig::default(),
        tls: None,
        kubernetes: None,
        proxy_workers: 0,
    };
    assert_eq!(config, expected);
    assert_eq!(config.shard_index("shard-1"), Some(1));
    assert_eq!(config.shard_index("shard-0"), Some(0));
    assert_eq!(config.shard_index("shard-9"), None);
}

#[test]
fn defaults_apply_when_keys_are_omitted() {
    let config = parse(MINIMAL).unwrap();
    assert_eq!(config.listen, addr("127.0.0.1:8080"));
    assert_eq!(config.listen, DEFAULT_LISTEN);
    assert_eq!(
        config.admin,
        AdminConfig {
            listen: addr("127.0.0.1:9901"),
            token_file: None,
            request_timeout: Duration::from_secs(10),
            removed_series_ttl: Duration::from_secs(600),
        }
    );
    assert_eq!(
        config.state_file,
        PathBuf::from("/etc/rayshift/rayshift-state.json")
    );
    assert_eq!(
        config.shards,
        vec![ShardConfig {
            name: "shard-0".into(),
            weight: 1.0,
            auto_shift: None,
        }]
    );
    assert_eq!(config.split_key, SplitKey::None);
    assert!(config.clusters.is_empty());
    assert!(config.apps.is_empty());
    assert_eq!(
        config.probe,
        ProbeConfig {
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            failure_threshold: 3,
        }
    );
    assert_eq!(
        config.upstream,
        UpstreamConfig {
            idle_timeout: Duration::from_secs(4),
            connect_timeout: Duration::from_secs(2),
            max_idle_per_cluster: 256,
            max_requests_per_cluster: 10_000,
            response_timeout: Duration::from_secs(300),
            retries: true,
            direct_http1: true,
            retry_budget: 0.2,
            retry_min_per_second: 10,
            ca_file: None,
        }
    );
    assert_eq!(config.tls, None);
}

#[test]
fn reliability_sections_parse_and_report_bad_keys() {
    let yaml = "shards: [s]\nlimits:\n  max_header_bytes: 16384\n  max_body_bytes: 1048576\n  header_read_timeout: 2s\n  max_connections: 100\npassive_health:\n  consecutive_failures: 3\n  base_ejection: 1s\n  max_ejection: 10s\nshutdown:\n  ready_delay: 1s\n  drain_timeout: 5s\nupstream:\n  response_timeout: 30s\n  retries: false\n  retry_budget: 0.1\n";
    let c = Config::from_yaml(yaml, Path::new("/")).unwrap();
    assert_eq!(c.limits.max_header_bytes, 16384);
    assert_eq!(c.limits.max_body_bytes, Some(1_048_576));
    assert_eq!(c.limits.header_read_timeout, Duration::from_secs(2));
    assert_eq!(c.limits.max_connections, 100);
    assert_eq!(c.passive_health.consecutive_failures, 3);
    assert_eq!(c.shutdown.drain_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream.response_timeout, Duration::from_secs(30));
    assert!(!c.upstream.retries);
    let bad = "shards: [s]\nlimits:\n  max_header_bytes: 100\n  max_bodybytes: 5\npassive_health:\n  base_ejection: 10s\n  max_ejection: 1s\nupstream:\n  retries: maybe\n  retry_budget: 2\n";
    let errors = Config::from_yaml(bad, Path::new("/"))
        .unwrap_err()
        .to_string();
    for needle in [
        "limits.max_header_bytes: expected an integer 8192 to 262144",
        "limits.max_bodybytes: unknown key; expected one of",
        "passive_health.max_ejection: must not be shorter than base_ejection",
        "upstream.retries: expected true or false",
        "upstream.retry_budget: expected a ratio 0-1",
    ] {
        assert!(errors.contains(needle), "{needle} not in:\n{errors}");
    }
}

/// Values so large that a deadline or a buffer computed from them would overflow are refused
/// before the gateway serves.
#[test]
fn durations_and_limits_have_upper_bounds() {
    let huge = "10000000000000000000s";
    let yaml = format!(
        "shards: [s]\nadmin:\n  request_timeout: 0s\nprobe:\n  interval: {huge}\nshutdown:\n  drain_timeout: 366d\nlimits:\n  max_connections: 18446744073709551615\n  max_header_bytes: 1048576\n  body_read_timeout: 366d\n  http2_idle_timeout: 0s\nshift_defaults:\n  step_interval: {huge}\n"
    );
    let errors = Config::from_yaml(&yaml, Path::new("/"))
        .unwrap_err()
        .to_string();
    for needle in [
        "admin.request_timeout: must be greater than 0",
        "probe.interval: must be at most 365d",
        "shutdown.drain_timeout: must be at most 365d",
        "limits.max_connections: expected an integer 1 to 1000000",
        "limits.http2_idle_timeout: must be greater than 0",
        "limits.body_read_timeout: must be at most 365d",
        "limits.max_header_bytes: expected an integer 8192 to 262144",
        "shift_defaults.step_interval: must be at most 365d",
    ] {
        assert!(errors.contains(needle), "{needle} not in:\n{errors}");
    }
    let at_the_limits = "shards: [s]\nprobe:\n  interval: 365d\nlimits:\n  max_connections: 1000000\n  max_header_bytes: 262144\n";
    let c = Config::from_yaml(at_the_limits, Path::new("/")).unwrap();
    assert_eq!(c.probe.interval, Duration::from_secs(365 * 24 * 3600));
    assert_eq!(c.limits.max_connections, 1_000_000);
}

#[test]
fn partial_sections_keep_defaults_for_missing_keys() {
    let config =
        parse("shards: [a]\nadmin: {token_file: t}\nprobe: {timeout: 250ms}\nupstream: {max_idle_per_cluster: 0}\n")
            .unwrap();
    assert_eq!(config.admin.listen, DEFAULT_ADMIN_LISTEN);
    assert_eq!(config.admin.request_timeout, Duration::from_secs(10));
    assert_eq!(
        config.admin.token_file,
        Some(PathBuf::from("/etc/rayshift/t"))
    );
    assert_eq!(config.probe.interval, Duration::from_secs(1));
    assert_eq!(config.probe.timeout, Duration::from_millis(250));
    assert_eq!(config.upstream.idle_timeout, Duration::from_secs(4));
    assert_eq!(config.upstream.max_idle_per_cluster, 0);
}

#[test]
fn empty_values_mean_default() {
    let config = parse("listen: ~\nshards: [a]\nclusters:\napps: []\nprobe:\n").unwrap();
    assert_eq!(config.listen, DEFAULT_LISTEN);
    assert!(config.clusters.is_empty());
    assert_eq!(config.probe, ProbeConfig::default());
}

#[test]
fn relative_state_file_resolves_against_base_dir() {
    let config = parse("state_file: ./data/state.json\nshards: [a]\n").unwrap();
    assert_eq!(
        config.state_file,
        PathBuf::from("/etc/rayshift/./data/state.json")
    );
    let config = Config::from_yaml("state_file: s.json\nshards: [a]\n", Path::new("")).unwrap();
    assert_eq!(config.state_file, PathBuf::from("s.json"));
}

#[test]
fn load_reads_the_file_and_resolves_against_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rayshift.yaml");
    std::fs::write(&path, "shards: [a]\nadmin: {token_file: token}\n").unwrap();
    let config = Config::load(&path).unwrap();
    assert_eq!(config.state_file, dir.path().join("rayshift-state.json"));
    assert_eq!(config.admin.token_file, Some(dir.path().join("token")));
}

#[test]
fn load_reports_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.yaml");
    let ConfigErrors(errors) = Config::load(&path).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].field, "<file>");
    assert!(
        errors[0].message.starts_with("cannot read config file ")
            && errors[0].message.contains("missing.yaml"),
        "{}",
        errors[0].message
    );
}

#[test]
fn empty_document_only_lacks_shards() {
    for text in ["", "# nothing yet\n", "~\n"] {
        assert_eq!(
            errors(text),
            vec![err(
                "shards",
                "at least one shard must be declared, e.g. shards: [shard-0]"
            )]
        );
    }
}

#[test]
fn scalars_keep_their_text() {
    // YAML would read these as numbers or booleans; the config keeps what was written.
    let config = parse(
        "shards: [0, 'yes']\nclusters:\n  - {name: '007', shard: '0', revision: 1.10, serve_url: 'http://h:1'}\n",
    )
    .unwrap();
    assert_eq!(config.shards[0].name, "0");
    assert_eq!(config.clusters[0].name, "007");
    assert_eq!(config.clusters[0].revision, "1.10");
}

// ----- split_key -----

#[test]
fn split_key_forms_and_display() {
    let cases = [
        ("none", SplitKey::None, "none"),
        ("client_ip", SplitKey::ClientIp, "client_ip"),
        (
            "header:X-Session",
            SplitKey::Header(http::HeaderName::from_static("x-session")),
            "header:x-session",
        ),
        (
            "cookie:session_id",
            SplitKey::Cookie("session_id".into()),
            "cookie:session_id",
        ),
    ];
    for (text, expected, displayed) in cases {
        let config = parse(&format!("shards: [a]\nsplit_key: {text}\n")).unwrap();
        assert_eq!(config.split_key, expected);
        assert_eq!(config.split_key.to_string(), displayed);
    }
}

#[test]
fn split_key_rejects_other_values() {
    for (value, message) in [
        (
            "random",
            r#"expected none, header:<name>, cookie:<name> or client_ip, got "random""#,
        ),
        (
            "'header:'",
            r#"expected none, header:<name>, cookie:<name> or client_ip, got "header:""#,
        ),
        (
            "'cookie:'",
            r#"expected none, header:<name>, cookie:<name> or client_ip, got "cookie:""#,
        ),
        (
            "None",
            r#"expected none, header:<name>, cookie:<name> or client_ip, got "None""#,
        ),
        (
            "'header:x y'",
            r#"invalid HTTP header name "x y" in "header:x y""#,
        ),
        (
            "'cookie:a;b'",
            r#"invalid cookie name "a;b" in "cookie:a;b": use letters, digits and !#$%&'*+-.^_`|~"#,
        ),
    ] {
        assert_eq!(
            only_error(&format!("shards: [a]\nsplit_key: {value}\n")),
            err("split_key", message),
            "{value}"
        );
    }
}

// ----- listen addresses -----

#[test]
fn listen_addresses_must_be_socket_addresses() {
    assert_eq!(
        lines("listen: localhost:8080\nadmin: {listen: 9901}\nshards: [a]\n"),
        vec![
            r#"listen: invalid socket address "localhost:8080": expected an IP address and port such as 127.0.0.1:8080 or [::1]:8080"#,
            r#"admin.listen: invalid socket address "9901": expected an IP address and port such as 127.0.0.1:8080 or [::1]:8080"#,
        ]
    );
}

// ----- paths -----

#[test]
fn paths_must_not_be_empty() {
    assert_eq!(
        errors("state_file: ''\nadmin: {token_file: ''}\nshards: [a]\n"),
        vec![
            err("admin.token_file", "path must not be empty"),
            err("state_file", "path must not be empty"),
        ]
    );
}

// ----- shards -----

#[test]
fn shards_must_be_declared() {
    assert_eq!(
        only_error("shards: []\n"),
        err(
            "shards",
            "at least one shard must be declared, e.g. shards: [shard-0]"
        )
    );
}

#[test]
fn shard_names_and_weights_are_checked() {
    let text = r#"
shards:
  - shard-0
  - -bad
  - {name: "has space"}
  - shard-0
  - {weight: 2}
  - {name: ok, weight: 0}
  - {name: ok2, weight: -1.5}
  - {name: ok3, weight: .inf}
  - {name: ok4, weight: heavy}
  - ""
  -
  - aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa
"#;
    assert_eq!(
        lines(text),
        vec![
            r#"shards[1]: invalid shard name "-bad": use letters, digits, '.', '_' and '-', starting with a letter or digit"#,
            r#"shards[2].name: invalid shard name "has space": use letters, digits, '.', '_' and '-', starting with a letter or digit"#,
            r#"shards[3]: duplicate shard name "shard-0" (first at shards[0])"#,
            "shards[4].name: required key is missing",
            r#"shards[5].weight: must be a finite number greater than 0, got "0""#,
            r#"shards[6].weight: must be a finite number greater than 0, got "-1.5""#,
            r#"shards[7].weight: expected a number greater than 0, got ".inf""#,
            r#"shards[8].weight: expected a number greater than 0, got "heavy""#,
            "shards[9]: shard name must not be empty",
            "shards[10]: shard name must not be empty",
            r#"shards[11]: shard name "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" is 64 characters long, at most 63 are allowed"#,
        ]
    );
}

#[test]
fn shard_names_allow_dots_underscores_and_63_characters() {
    let long = "a".repeat(63);
    let config = parse(&format!("shards: [A.b_c-9, 9x, {long}]\n")).unwrap();
    assert_eq!(config.shards[0].name, "A.b_c-9");
    assert_eq!(config.shards[2].name, long);
}

#[test]
fn shard_weight_accepts_integers_and_exponents() {
    let config = parse("shards: [{name: a, weight: 3}, {name: b, weight: 1e-2}]\n").unwrap();
    assert_eq!(config.shards[0].weight, 3.0);
    assert_eq!(config.shards[1].weight, 0.01);
}

// ----- clusters -----

#[test]
fn cluster_required_keys() {
    assert_eq!(
        lines("shards: [a]\nclusters:\n  - {}\n  - {name: x, shard: a, revision: v1, serve_url: 'http://h:1'}\n"),
        vec![
            "clusters[0].name: required key is missing",
            "clusters[0].shard: required key is missing",
            "clusters[0].revision: required key is missing",
            "clusters[0].serve_url: required key is missing",
        ]
    );
}

#[test]
fn cluster_name_rules() {
    let text = r#"
shards: [a]
clusters:
  - {name: blue, shard: a, revision: v1, serve_url: "http://h:1"}
  - {name: "bad name", shard: a, revision: v1, serve_url: "http://h:2"}
  - {name: green, shard: a, revision: v1, serve_url: "http://h:3"}
  - {name: blue, shard: a, revision: v2, serve_url: "http://h:4"}
"#;
    assert_eq!(
        lines(text),
        vec![
            r#"clusters[1].name: invalid cluster name "bad name": use letters, digits, '.', '_' and '-', starting with a letter or digit"#,
            r#"clusters[3].name: duplicate cluster name "blue" (first at clusters[0])"#,
        ]
    );
}

#[test]
fn cluster_shard_must_be_declared() {
    assert_eq!(
        only_error(&with_cluster(
            "{name: b, shard: shard-9, revision: v1, serve_url: 'http://h:1'}"
        )),
        err(
            "clusters[0].shard",
            r#"unknown shard "shard-9"; declared: shard-0, shard-1"#
        )
    );
}

#[test]
fn cluster_revision_must_not_be_empty() {
    assert_eq!(
        only_error(&with_cluster(
            "{name: b, shard: shard-0, revision: '', serve_url: 'http://h:1'}"
        )),
        err("clusters[0].revision", "must not be empty")
    );
}

#[test]
fn relative_serve_url_is_reported_with_the_url_crate_message() {
    let text = "shards: [a]\nclusters:\n  - {name: a, shard: a, revision: v1, serve_url: 'http://h:1'}\n  - {name: b, shard: a, revision: v1, serve_url: foo}\n";
    assert_eq!(
        lines(text),
        vec!["clusters[1].serve_url: relative URL without a base"]
    );
}

#[test]
fn serve_url_rules() {
    let cases = [
        (
            "ftp://h:21",
            r#"expected an http:// or https:// URL, got "ftp://h:21" (scheme "ftp")"#,
        ),
        (
            "localhost:8000",
            r#"expected an http:// or https:// URL, got "localhost:8000" (scheme "localhost")"#,
        ),
        (
            "'http://h:1/?a=b'",
            r#"URL "http://h:1/?a=b" must not have a query string"#,
        ),
        (
            "'http://h:1/#top'",
            r#"URL "http://h:1/#top" must not have a fragment"#,
        ),
        (
            "http://h:1/api",
            r#"URL "http://h:1/api" must not have a path (got "/api"): requests keep their own path"#,
        ),
        ("'http://:1'", "empty host"),
        ("'http://h:99999'", "invalid port number"),
    ];
    for (value, message) in cases {
        assert_eq!(
            only_error(&with_cluster(&format!(
                "{{name: b, shard: shard-0, revision: v1, serve_url: {value}}}"
            ))),
            err("clusters[0].serve_url", message),
            "{value}"
        );
    }
}

#[test]
fn dashboard_url_follows_the_same_rules() {
    assert_eq!(
        only_error(&with_cluster(
            "{name: b, shard: shard-0, revision: v1, serve_url: 'http://h:1', dashboard_url: /dash}"
        )),
        err("clusters[0].dashboard_url", "relative URL without a base")
    );
}

#[test]
fn cluster_weight_range() {
    for (value, message) in [
        ("101", "must be between 0 and 100, got 101"),
        ("-1", r#"expected an integer from 0 to 100, got "-1""#),
        ("50.5", r#"expected an integer from 0 to 100, got "50.5""#),
        ("half", r#"expected an integer from 0 to 100, got "half""#),
    ] {
        assert_eq!(
            only_error(&with_cluster(&format!(
                "{{name: b, shard: shard-0, revision: v1, serve_url: 'http://h:1', weight: {value}}}"
            ))),
            err("clusters[0].weight", message),
            "{value}"
        );
    }
}

#[test]
fn cluster_weights_of_a_shard_sum_to_100() {
    let text = r#"
shards: [shard-0, shard-1]
clusters:
  - {name: a, shard: shard-1, revision: v1, serve_url: "http://h:1"}
  - {name: b, shard: shard-0, revision: v1, serve_url: "http://h:2", weight: 60}
  - {name: c, shard: shard-0, revision: v2, serve_url: "http://h:3", weight: 30}
"#;
    assert_eq!(
        errors(text),
        vec![err(
            "clusters[1].weight",
            r#"weights of shard "shard-0" sum to 90, expected 100 (clusters[1]: 60, clusters[2]: 30)"#
        )]
    );
}

#[test]
fn cluster_weights_all_or_none() {
    let text = r#"
shards: [s]
clusters:
  - {name: a, shard: s, revision: v1, serve_url: "http://h:1", weight: 100}
  - {name: b, shard: s, revision: v2, serve_url: "http://h:2"}
"#;
    assert_eq!(
        errors(text),
        vec![err(
            "clusters[1].weight",
            r#"required: another cluster of shard "s" sets a weight (clusters[0]); set weight on every cluster of the shard or on none"#
        )]
    );
}

#[test]
fn cluster_weights_valid_combinations() {
    let text = r#"
shards: [s, t, u]
clusters:
  - {name: a, shard: s, revision: v1, serve_url: "http://h:1", weight: 100}
  - {name: b, shard: s, revision: v2, serve_url: "http://h:2", weight: 0}
  - {name: c, shard: t, revision: v1, serve_url: "http://h:3"}
  - {name: d, shard: t, revision: v1, serve_url: "http://h:4"}
  - {name: e, shard: u, revision: v1, serve_url: "http://h:5", weight: 100}
"#;
    let config = parse(text).unwrap();
    let weights: Vec<_> = config.clusters.iter().map(|c| c.weight).collect();
    assert_eq!(weights, vec![Some(100), Some(0), None, None, Some(100)]);
}

#[test]
fn invalid_weight_suppresses_the_sum_check() {
    let text = r#"
shards: [s]
clusters:
  - {name: a, shard: s, revision: v1, serve_url: "http://h:1", weight: 500}
  - {name: b, shard: s, revision: v2, serve_url: "http://h:2", weight: 20}
"#;
    assert_eq!(
        lines(text),
        vec!["clusters[0].weight: must be between 0 and 100, got 500"]
    );
}

// ----- apps -----

#[test]
fn app_rules() {
    let text = r#"
shards: [s]
apps:
  - {name: echo, route_prefix: /echo}
  - {name: "two words", route_prefix: /two}
  - {name: echo, route_prefix: /echo2}
  - {name: other, route_prefix: echo}
  - {name: third, route_prefix: /echo}
  - {name: fourth, route_prefix: "/a?b"}
  - {name: pinned, route_prefix: /p, shard: nowhere}
  - {}
  - {name: "", route_prefix: /e}
"#;
    assert_eq!(
        lines(text),
        vec![
            r#"apps[1].name: invalid app name "two words": must not contain whitespace or control characters"#,
            r#"apps[2].name: duplicate app name "echo" (first at apps[0])"#,
            r#"apps[3].route_prefix: must start with '/', got "echo""#,
            r#"apps[4].route_prefix: duplicate route_prefix "/echo" (first at apps[0])"#,
            r#"apps[5].route_prefix: invalid route_prefix "/a?b": must be a URL path, without whitespace, '?' or '#'"#,
            r#"apps[6].shard: unknown shard "nowhere"; declared: s"#,
            "apps[7].name: required key is missing",
            "apps[7].route_prefix: required key is missing",
            "apps[8].name: app name must not be empty",
        ]
    );
}

#[test]
fn app_names_may_use_any_visible_characters() {
    let config =
        parse("shards: [s]\napps: [{name: 'Ünïcode/app:v1', route_prefix: /u}]\n").unwrap();
    assert_eq!(config.apps[0].name, "Ünïcode/app:v1");
}

// ----- durations -----

#[test]
fn duration_rules() {
    let text = r#"
shards: [s]
probe: {interval: 0s, timeout: 5}
upstream: {idle_timeout: soon, connect_timeout: 3 parsecs, max_idle_per_cluster: -1}
"#;
    assert_eq!(
        lines(text),
        vec![
            r#"probe.interval: must be greater than 0, got "0s""#,
            r#"probe.timeout: invalid duration "5": time unit needed, for example 5sec or 5ms (examples: 1s, 500ms, 2m)"#,
            r#"upstream.idle_timeout: invalid duration "soon": expected number at 0 (examples: 1s, 500ms, 2m)"#,
            r#"upstream.connect_timeout: invalid duration "3 parsecs": unknown time unit "parsecs", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations) (examples: 1s, 500ms, 2m)"#,
            r#"upstream.max_idle_per_cluster: expected a non-negative integer, got "-1""#,
        ]
    );
}

#[test]
fn probe_failure_threshold_is_a_count_from_1() {
    for (text, want) in [("1", 1), ("3", 3), ("100", 100)] {
        let yaml = format!("shards: [s]\nprobe: {{failure_threshold: {text}}}\n");
        assert_eq!(parse(&yaml).unwrap().probe.failure_threshold, want);
    }
    for text in ["0", "101", "-1", "three", "1.5"] {
        let yaml = format!("shards: [s]\nprobe: {{failure_threshold: {text}}}\n");
        assert_eq!(
            lines(&yaml),
            vec![format!(
                "probe.failure_threshold: expected an integer 1 to 100, got {text:?}"
            )],
        );
    }
}

#[test]
fn send_timeout_is_a_positive_duration() {
    let config = parse("shards: [s]\nlimits: {send_timeout: 90s}\n").unwrap();
    assert_eq!(config.limits.send_timeout, Duration::from_secs(90));
    assert_eq!(
        parse(MINIMAL).unwrap().limits.send_timeout,
        Duration::from_secs(60)
    );
    assert_eq!(
        lines("shards: [s]\nlimits: {send_timeout: 0s}\n"),
        vec![r#"limits.send_timeout: must be greater than 0, got "0s""#.to_string()],
    );
}

#[test]
fn tunnel_idle_timeout_is_a_positive_duration() {
    let config = parse("shards: [s]\nlimits: {tunnel_idle_timeout: 15m}\n").unwrap();
    assert_eq!(config.limits.tunnel_idle_timeout, Duration::from_secs(900));
    assert_eq!(
        parse(MINIMAL).unwrap().limits.tunnel_idle_timeout,
        Duration::from_secs(3600)
    );
    assert_eq!(
        lines("shards: [s]\nlimits: {tunnel_idle_timeout: 0s}\n"),
        vec![r#"limits.tunnel_idle_timeout: must be greater than 0, got "0s""#.to_string()],
    );
}

#[test]
fn max_requests_per_cluster_is_a_positive_integer() {
    let config = parse("shards: [s]\nupstream: {max_requests_per_cluster: 3}\n").unwrap();
    assert_eq!(config.upstream.max_requests_per_cluster, 3);
    assert_eq!(
        parse(MINIMAL).unwrap().upstream.max_requests_per_cluster,
        crate::config::DEFAULT_UPSTREAM_MAX_REQUESTS_PER_CLUSTER
    );
    for bad in ["0", "-5", "many"] {
        assert_eq!(
            lines(&format!(
                "shards: [s]\nupstream: {{max_requests_per_cluster: {bad}}}\n"
            )),
            vec![format!(
                "upstream.max_requests_per_cluster: expected an integer >= 1, got {bad:?}"
            )],
        );
    }
}

#[test]
fn probe_timeout_may_exceed_interval() {
    let config = parse("shards: [s]\nprobe: {interval: 1s, timeout: 5s}\n").unwrap();
    assert_eq!(config.probe.timeout, Duration::from_secs(5));
}

// ----- several errors, in order -----

#[test]
fn every_problem_is_reported_in_file_order() {
    let text = r#"
listen: nowhere
admin:
  listen: 127.0.0.1:99999
shards: [shard-0, shard-0]
split_key: sticky
clusters:
  - name: blue
    shard: shard-9
    revision: v1
    serve_url: foo
  - name: blue
    shard: shard-0
    revision: v2
    serve_url: http://127.0.0.1:8102
apps:
  - name: echo
    route_prefix: echo
probe:
  interval: 0ms
upstream:
  idle_timeout: 0s
"#;
    let expected = vec![
        r#"listen: invalid socket address "nowhere": expected an IP address and port such as 127.0.0.1:8080 or [::1]:8080"#,
        r#"admin.listen: invalid socket address "127.0.0.1:99999": expected an IP address and port such as 127.0.0.1:8080 or [::1]:8080"#,
        r#"shards[1]: duplicate shard name "shard-0" (first at shards[0])"#,
        r#"split_key: expected none, header:<name>, cookie:<name> or client_ip, got "sticky""#,
        r#"clusters[0].shard: unknown shard "shard-9"; declared: shard-0"#,
        "clusters[0].serve_url: relative URL without a base",
        r#"clusters[1].name: duplicate cluster name "blue" (first at clusters[0])"#,
        r#"apps[0].route_prefix: must start with '/', got "echo""#,
        r#"probe.interval: must be greater than 0, got "0ms""#,
        r#"upstream.idle_timeout: must be greater than 0, got "0s""#,
    ];
    assert_eq!(lines(text), expected);
    // Display: one error per line.
    assert_eq!(parse(text).unwrap_err().to_string(), expected.join("\n"));
}

// ----- stage one: shape, unknown keys, syntax -----

#[test]
fn unknown_top_level_key_is_named() {
    let e = only_error("shards: [a]\nlisten_addr: 1.2.3.4:80\n");
    assert_eq!(e.field, "listen_addr");
    assert!(
        e.message
            .starts_with("unknown field `listen_addr`, expected one of"),
        "{}",
        e.message
    );
    assert!(e.message.ends_with(" at line 2, column 1"), "{}", e.message);
}

#[test]
fn unknown_nested_keys_are_named_with_their_path() {
    let cases = [
        (
            "shards: [a]\nclusters:\n  - name: a\n    shard: a\n  - name: b\n    serve_ulr: x\n",
            "clusters[1].serve_ulr",
        ),
        (
            "shards: [a]\nadmin:\n  listen: 127.0.0.1:1\n  token: x\n",
            "admin.token",
        ),
        ("shards: [a, {name: b, wieght: 2}]\n", "shards[1].wieght"),
        (
            "shards: [a]\nprobe: {interval: 1s, timout: 1s}\n",
            "probe.timout",
        ),
        ("shards: [a]\nupstream:\n  idle: 1s\n", "upstream.idle"),
        (
            "shards: [a]\napps:\n  - {name: x, prefix: /x}\n",
            "apps[0].prefix",
        ),
    ];
    for (text, field) in cases {
        let e = only_error(text);
        assert_eq!(e.field, field, "{text}");
        let key = field.rsplit('.').next().unwrap_or_default();
        assert!(
            e.message
                .starts_with(&format!("unknown field `{key}`, expected")),
            "{}",
            e.message
        );
    }
    // The location is the unknown key's, not its mapping's.
    let e = only_error("shards: [a]\nclusters:\n  - name: a\n    shard: a\n    wieght: 5\n");
    assert!(e.message.ends_with(" at line 5, column 5"), "{}", e.message);
}

#[test]
fn wrong_shapes_name_the_path_and_what_was_expected() {
    assert_eq!(
        only_error("shards: shard-0\n"),
        err(
            "shards",
            r#"expected a list of shard names, found the value "shard-0" at line 1, column 9"#
        )
    );
    assert_eq!(
        only_error("shards: [a]\nclusters:\n  - blue\n"),
        err(
            "clusters[0]",
            r#"expected a cluster mapping (name, shard, revision, serve_url, dashboard_url, weight), found the value "blue" at line 3, column 5"#
        )
    );
    assert_eq!(
        only_error("shards: [a]\nlisten: [127.0.0.1, 80]\n"),
        err(
            "listen",
            "expected a single value, not a list or mapping, found a list at line 2, column 9"
        )
    );
    assert_eq!(
        only_error("shards: [a]\nprobe:\n  interval:\n    seconds: 1\n"),
        err(
            "probe.interval",
            "expected a single value, not a list or mapping, found a mapping at line 4, column 5"
        )
    );
    assert_eq!(
        only_error("shards: [a]\nadmin: 127.0.0.1:9901\n"),
        err(
            "admin",
            r#"expected a mapping with keys listen, token_file, request_timeout and removed_series_ttl, found the value "127.0.0.1:9901" at line 2, column 8"#
        )
    );
    assert_eq!(
        only_error("shards: [a, [b]]\n"),
        err(
            "shards[1]",
            "invalid type: sequence, expected a shard name or a {name, weight} mapping at line 1, column 13"
        )
    );
    assert_eq!(
        only_error("- shards\n"),
        err(
            "<yaml>",
            "expected a mapping of config keys (listen, admin, state_file, shards, split_key, clusters, apps, probe, upstream, shift_defaults, max_concurrent_shifts, limits, passive_health, shutdown, tls, discovery), found a list at line 1, column 1"
        )
    );
}

#[test]
fn sections_of_the_wrong_shape_are_named_for_what_belongs_there() {
    for (text, field, expected) in [
        (
            "shards: [a]\nshutdown: 30s\n",
            "shutdown",
            "a mapping of keys to values",
        ),
        (
            "shards: [a]\nlimits: [1]\n",
            "limits",
            "a mapping of keys to values",
        ),
        (
            "shards: [a]\ntls: on\n",
            "tls",
            "a mapping of keys to values",
        ),
        (
            "shards: [a]\nshift_defaults: 10\n",
            "shift_defaults",
            "a mapping of shift policy keys",
        ),
        (
            "shards: [a]\ndiscovery: k8s\n",
            "discovery",
            "a mapping with the key kubernetes",
        ),
        (
            "shards: [a]\ndiscovery:\n  kubernetes:\n    namespaces: serving\n",
            "discovery.kubernetes.namespaces",
            "a list of namespace names",
        ),
    ] {
        let e = only_error(text);
        assert_eq!(e.field, field, "{text:?}: {e}");
        assert!(
            e.message.starts_with(&format!("expected {expected}")),
            "{text:?}: {e}"
        );
    }
}

#[test]
fn empty_values_in_keyed_sections_mean_default() {
    let config = parse(
        "shards: [a]\nlimits:\n  max_body_bytes:\nshutdown:\n  ready_delay: ~\n  drain_timeout: 7s\nshift_defaults:\n  step_percent:\n",
    )
    .unwrap();
    assert_eq!(config.limits, LimitsConfig::default());
    assert_eq!(
        config.shutdown.ready_delay,
        ShutdownConfig::default().ready_delay
    );
    assert_eq!(config.shutdown.drain_timeout, Duration::from_secs(7));
}

#[test]
fn a_label_selector_the_api_server_would_refuse_is_a_config_error() {
    assert_eq!(
        lines("shards: [a]\ndiscovery:\n  kubernetes:\n    label_selector: 'rayshift.io/shard in (a'\n"),
        vec!["discovery.kubernetes.label_selector: rayshift.io/shard in: missing ')'".to_string()]
    );
    let config =
        parse("shards: [a]\ndiscovery:\n  kubernetes:\n    label_selector: 'rayshift.io/shard, env in (prod)'\n")
            .unwrap();
    assert_eq!(
        config.kubernetes.unwrap().label_selector,
        "rayshift.io/shard, env in (prod)"
    );
}

#[test]
fn an_admin_api_open_to_the_network_needs_a_token() {
    assert_eq!(
        only_error("shards: [a]\nadmin:\n  listen: 0.0.0.0:9901\n").field,
        "admin.listen"
    );
    let config =
        parse("shards: [a]\nadmin:\n  listen: 0.0.0.0:9901\n  token_file: token\n").unwrap();
    assert_eq!(config.admin.listen, addr("0.0.0.0:9901"));
}

#[test]
fn duplicate_keys_are_rejected() {
    assert_eq!(
        only_error("shards: [a]\nlisten: 127.0.0.1:1\nlisten: 127.0.0.1:2\n"),
        err(
            "listen",
            "duplicate mapping key: listen at line 3, column 1"
        )
    );
}

#[test]
fn yaml_syntax_error_names_the_line() {
    let e = only_error("shards: [a]\nclusters:\n  - name: a\n   shard: b\n");
    assert_eq!(e.field, "<yaml>");
    assert!(e.message.contains("at line 4, column"), "{}", e.message);

    let e = only_error("shards: [a\n");
    assert_eq!(e.field, "<yaml>");
    assert!(e.message.contains("line "), "{}", e.message);
}

// ----- helpers for later sections -----

#[test]
fn reusable_helpers() {
    assert_eq!(
        parse_duration("shifts[0].pause", "1m 30s"),
        Ok(Duration::from_secs(90))
    );
    assert_eq!(parse_duration("x", "0s"), Ok(Duration::ZERO));
    assert_eq!(
        parse_positive_duration("x", "0s"),
        Err(err("x", r#"must be greater than 0, got "0s""#))
    );
    assert!(validate_name("f", "cluster", "blue-1.a_b").is_ok());
    assert_eq!(
        validate_name("f", "cluster", "_x"),
        Err(err(
            "f",
            r#"invalid cluster name "_x": use letters, digits, '.', '_' and '-', starting with a letter or digit"#
        ))
    );
    assert_eq!(
        validate_url("u", "https://a.example/").map(|u| u.to_string()),
        Ok("https://a.example/".to_owned())
    );
    assert_eq!(
        validate_url("u", "foo"),
        Err(err("u", "relative URL without a base"))
    );
}

#[test]
fn config_errors_display_one_per_line() {
    let errors = ConfigErrors(vec![err("a", "first"), err("b.c", "second")]);
    assert_eq!(errors.to_string(), "a: first\nb.c: second");
    assert_eq!(err("a", "x").to_string(), "a: x");
}

#[test]
fn shift_defaults_and_auto_shift_policies() {
    let yaml = "shards:\n  - name: shard-0\n    auto_shift: {step_percent: 50}\n  - shard-1\nshift_defaults:\n  step_interval: 5s\n  max_error_rate: 0.02\nmax_concurrent_shifts: 2\n";
    let config = Config::from_yaml(yaml, Path::new("/etc/rayshift")).unwrap();
    assert_eq!(config.shift_defaults.step_interval, Duration::from_secs(5));
    assert_eq!(config.max_concurrent_shifts, 2);
    let auto = config.shards[0].auto_shift.as_ref().unwrap();
    assert_eq!(
        (auto.step_percent, auto.step_interval),
        (50, Duration::from_secs(5))
    );
    assert!((auto.max_error_rate - 0.02).abs() < 1e-12);
    assert_eq!(config.shards[1].auto_shift, None);

    let bad = "shards:\n  - name: shard-0\n    auto_shift: {step_percent: 0}\nshift_defaults:\n  step_interval: soon\n  stepsize: 3\nmax_concurrent_shifts: 0\n";
    let errors = Config::from_yaml(bad, Path::new("/")).unwrap_err().0;
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert!(
        fields.contains(&"shift_defaults.step_interval"),
        "{errors:?}"
    );
    assert!(fields.contains(&"shift_defaults.stepsize"), "{errors:?}");
    assert!(
        fields.contains(&"shards[0].auto_shift.step_percent"),
        "{errors:?}"
    );
    assert!(fields.contains(&"max_concurrent_shifts"), "{errors:?}");
}

#[test]
fn tls_section_and_upstream_ca_file() {
    let config = parse(
        "shards: [s]\ntls:\n  cert_file: certs/gw.pem\n  key_file: /keys/gw.key\n  reload_interval: 1s\nupstream:\n  ca_file: ca.pem\n",
    )
    .unwrap();
    assert_eq!(
        config.tls,
        Some(TlsConfig {
            cert_file: PathBuf::from("/etc/rayshift/certs/gw.pem"),
            key_file: PathBuf::from("/keys/gw.key"),
            reload_interval: Duration::from_secs(1),
        })
    );
    assert_eq!(
        config.upstream.ca_file,
        Some(PathBuf::from("/etc/rayshift/ca.pem"))
    );
    let config = parse("shards: [s]\ntls: {cert_file: c.pem, key_file: k.pem}\n").unwrap();
    assert_eq!(
        config.tls.unwrap().reload_interval,
        DEFAULT_TLS_RELOAD_INTERVAL
    );
    // Zero turns polling off (SIGHUP only).
    let config =
        parse("shards: [s]\ntls: {cert_file: c.pem, key_file: k.pem, reload_interval: 0s}\n")
            .unwrap();
    assert!(config.tls.unwrap().reload_interval.is_zero());
    assert_eq!(parse("shards: [s]\ntls:\n").unwrap().tls, None);
}

/// A `tls` mapping that is empty, or whose values rendered empty (a template with unset
/// variables), is an error: not plain HTTP on the port clients expect TLS on.
#[test]
fn an_empty_tls_section_is_an_error() {
    let missing = vec![
        "tls.cert_file: required key is missing: TLS needs tls.cert_file and tls.key_file",
        "tls.key_file: required key is missing: TLS needs tls.cert_file and tls.key_file",
    ];
    assert_eq!(lines("shards: [s]\ntls: {}\n"), missing);
    assert_eq!(
        lines("shards: [s]\ntls:\n  cert_file:\n  key_file:\n"),
        missing
    );
}

/// A misspelt key is reported also without a value (an empty value otherwise means the default).
#[test]
fn unknown_keys_without_values_are_reported() {
    let errors = lines(
        "shards: [s]\nlimits:\n  max_bodybytes:\nshift_defaults:\n  stepsize:\ntls:\n  cert_file: c.pem\n  key_file: k.pem\n  reload_intreval:\n",
    );
    for needle in [
        "limits.max_bodybytes: unknown key; expected one of",
        "shift_defaults.stepsize: unknown policy key; expected one of",
        "tls.reload_intreval: unknown key; expected one of",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "{needle} not in {errors:#?}"
        );
    }
    // Known keys without a value still mean the default.
    let config =
        parse("shards: [s]\nlimits:\n  max_body_bytes:\nshift_defaults:\n  step_percent:\n")
            .unwrap();
    assert_eq!(config.limits, LimitsConfig::default());
}

#[test]
fn tls_needs_both_files() {
    assert_eq!(
        lines("shards: [s]\ntls:\n  cert_file: c.pem\n"),
        vec!["tls.key_file: required when tls.cert_file is set: TLS needs both files"]
    );
    assert_eq!(
        lines("shards: [s]\ntls:\n  key_file: k.pem\n"),
        vec!["tls.cert_file: required when tls.key_file is set: TLS needs both files"]
    );
    assert_eq!(
        lines("shards: [s]\ntls:\n  reload_interval: 1s\n"),
        vec![
            "tls.cert_file: required key is missing: TLS needs tls.cert_file and tls.key_file",
            "tls.key_file: required key is missing: TLS needs tls.cert_file and tls.key_file",
        ]
    );
    let errors = lines(
        "shards: [s]\ntls:\n  cert_file: ''\n  key_file: k.pem\n  reload_interval: soon\n  ca_file: x\nupstream:\n  ca_file: ''\n",
    );
    for needle in [
        "tls.cert_file: path must not be empty",
        "tls.reload_interval: invalid duration \"soon\"",
        "tls.ca_file: unknown key; expected one of cert_file, key_file, reload_interval",
        "upstream.ca_file: path must not be empty",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "{needle} not in {errors:#?}"
        );
    }
}

#[test]
fn watched_namespaces_are_names_and_listed_once() {
    assert_eq!(
        errors(
            "shards: [a]\ndiscovery:\n  kubernetes:\n    namespaces: [serving, Bad_Name, serving]\n"
        ),
        vec![
            err(
                "discovery.kubernetes.namespaces[1]",
                "\"Bad_Name\" is not a Kubernetes namespace name"
            ),
            err(
                "discovery.kubernetes.namespaces[2]",
                "namespace \"serving\" is listed twice"
            ),
        ]
    );
    let config =
        parse("shards: [a]\ndiscovery:\n  kubernetes:\n    namespaces: [serving, staging]\n")
            .unwrap();
    assert_eq!(
        config.kubernetes.unwrap().namespaces,
        ["serving", "staging"]
    );
}

#[test]
fn shared_state_names_are_kubernetes_names() {
    let errors = lines(
        "shards: [a]\ndiscovery:\n  kubernetes:\n    state: {namespace: Bad_NS, configmap: '', lease: Bad Name, identity: ' '}\n",
    );
    for needle in [
        "discovery.kubernetes.state.namespace: \"Bad_NS\" is not a Kubernetes namespace name",
        "discovery.kubernetes.state.configmap: \"\" is not a Kubernetes object name",
        "discovery.kubernetes.state.lease: \"Bad Name\" is not a Kubernetes object name",
        "discovery.kubernetes.state.identity: must not be empty",
    ] {
        assert!(
            errors.iter().any(|e| e.starts_with(needle)),
            "{needle} not in {errors:#?}"
        );
    }
    let ok = parse(
        "shards: [a]\ndiscovery:\n  kubernetes:\n    state: {namespace: serving, configmap: rayshift.state, lease: rayshift-leader}\n",
    )
    .unwrap();
    let state = ok.kubernetes.unwrap().state.unwrap();
    assert_eq!(state.configmap, "rayshift.state");
}
