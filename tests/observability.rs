//! The Grafana dashboard (`deploy/grafana/rayshift.json`) and the Prometheus alert rules
//! (`deploy/prometheus/rules.yaml`) against the real gateway.
//!
//! - Every PromQL expression in them names only metrics a running gateway exports (a real scrape of
//!   `/metrics` after traffic, a completed shift, a rollback, an ejection and retries), and only
//!   labels those metrics carry. A small PromQL tokenizer finds the metric selectors, their label
//!   matchers and the labels of `by`/`without`/`on`/`ignoring`/`group_*` clauses.
//! - Every metric of `src/telemetry.rs` is in `docs/metrics.md` and on the dashboard (or listed in
//!   `NOT_ON_DASHBOARD` with the reason), and every `rayshift_` metric the gateway exports is
//!   declared in `src/telemetry.rs`.
//! - The dashboard is well-formed Grafana JSON; every rule has a severity, summary and description.
//! - With `promtool` installed: `promtool check rules` on the rules, on the dashboard's queries (as
//!   recording rules, so Prometheus' own parser reads them), and `promtool test rules` with synthetic
//!   series for each alert. Without it these checks are skipped with a notice, unless
//!   `RAYSHIFT_REQUIRE_PROMTOOL=1`, which makes a missing `promtool` a failure.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::{Method, StatusCode};
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

fn dashboard() -> Value {
    serde_json::from_str(&read("deploy/grafana/rayshift.json"))
        .unwrap_or_else(|e| panic!("deploy/grafana/rayshift.json is not valid JSON: {e}"))
}

fn rules() -> Value {
    serde_saphyr::from_str(&read("deploy/prometheus/rules.yaml"))
        .unwrap_or_else(|e| panic!("deploy/prometheus/rules.yaml is not valid YAML: {e}"))
}

/// Every alerting rule of the rules file.
fn alert_rules(rules: &Value) -> Vec<&Value> {
    rules["groups"]
        .as_array()
        .expect("rules.yaml: groups must be a list")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("group without rules").iter())
        .collect()
}

/// `(where, expression)` of every PromQL expression in the dashboard (panel targets, annotations).
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(v: &Value, at: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(map) => {
                let here = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("panel \"{title}\""),
                    None => match map.get("name").and_then(Value::as_str) {
                        Some(name) => format!("\"{name}\""),
                        None => at.to_string(),
                    },
                };
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push((here.clone(), expr.clone())),
                        _ => walk(v, &here, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, at, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, "dashboard", &mut out);
    out
}

/// `(where, expression)` of every rule expression.
fn rule_exprs(rules: &Value) -> Vec<(String, String)> {
    alert_rules(rules)
        .into_iter()
        .map(|r| {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            let expr = r["expr"].as_str().expect("rule without expr");
            (format!("rule {name}"), expr.to_string())
        })
        .collect()
}

/// Metric names declared in `src/telemetry.rs` (`pub const X: &str = "rayshift_...";`).
fn declared_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = read("src/telemetry.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const"))
        .filter_map(|l| l.split('"').nth(1))
        .filter(|n| n.starts_with("rayshift_"))
        .map(str::to_string)
        .collect();
    assert!(
        names.len() >= 10,
        "found only {names:?} in src/telemetry.rs"
    );
    names
}

// === The dashboard and rules on their own ===

#[test]
fn dashboard_is_well_formed() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "rayshift");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    let schema = dash["schemaVersion"].as_u64().expect("schemaVersion");
    assert!((36..=41).contains(&schema), "schemaVersion {schema}");

    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} template variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("shard")["type"], "query");
    assert_eq!(
        var("shard")["definition"],
        "label_values(rayshift_cluster_weight, shard)"
    );

    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    let mut kinds = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "panel without a title: {panel}");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let g = &panel["gridPos"];
        let [h, w, x, y] = ["h", "w", "x", "y"].map(|k| {
            g[k].as_u64()
                .unwrap_or_else(|| panic!("panel \"{title}\": gridPos.{k} missing"))
        });
        assert!(
            h > 0 && w > 0 && x + w <= 24,
            "panel \"{title}\": gridPos {g}"
        );
        for (other, [oh, ow, ox, oy]) in &boxes {
            let apart = x + w <= *ox || ox + ow <= x || y + h <= *oy || oy + oh <= y;
            assert!(apart, "panels \"{title}\" and \"{other}\" overlap");
        }
        boxes.push((title.to_string(), [h, w, x, y]));
        let kind = panel["type"].as_str().expect("panel type");
        kinds.insert(kind);
        if kind == "row" {
            continue;
        }
        assert!(
            [
                "timeseries",
                "stat",
                "state-timeline",
                "bargauge",
                "table",
                "gauge"
            ]
            .contains(&kind),
            "panel \"{title}\": unexpected type {kind}"
        );
        assert!(
            panel["description"].as_str().is_some_and(|d| !d.is_empty()),
            "panel \"{title}\" has no description"
        );
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel \"{title}\" must use the $datasource variable"
        );
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel \"{title}\" has no target");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel \"{title}\": a target without expr"
            );
            assert!(
                t["refId"].is_string(),
                "panel \"{title}\": target without refId"
            );
        }
    }
    for kind in ["timeseries", "stat", "state-timeline"] {
        assert!(kinds.contains(kind), "no {kind} panel");
    }
}

#[test]
fn alert_rules_are_well_formed() {
    let rules = rules();
    let mut names = BTreeSet::new();
    for rule in alert_rules(&rules) {
        let name = rule["alert"].as_str().expect("only alerting rules here");
        assert!(names.insert(name), "alert {name} defined twice");
        assert!(name.starts_with("Rayshift"), "{name}");
        assert!(rule["expr"].as_str().is_some_and(|e| !e.trim().is_empty()));
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name}: no {key} annotation"
            );
        }
    }
    for expected in [
        "RayshiftShiftStuck",
        "RayshiftShiftRolledBack",
        "RayshiftClusterErrorRatioHigh",
        "RayshiftShardNoReadyCluster",
    ] {
        assert!(names.contains(expected), "no alert {expected}");
    }
}

/// Declared metrics the dashboard may leave out, and why. Each needs a feature the live scrape
/// below does not configure, so a panel for it could not be checked against a real gateway.
const NOT_ON_DASHBOARD: &[(&str, &str)] = &[
    (
        "rayshift_kube_watch_events_total",
        "exported only with discovery.kubernetes (needs an API server)",
    ),
    (
        "rayshift_kube_watch_errors_total",
        "exported only with discovery.kubernetes (needs an API server)",
    ),
];

/// The metrics reference and the dashboard cover every declared metric.
#[test]
fn every_declared_metric_is_documented_and_on_the_dashboard() {
    let docs = read("docs/metrics.md");
    let mut used = BTreeSet::new();
    for (at, expr) in dashboard_exprs(&dashboard()) {
        let refs = promql::refs(&expr).unwrap_or_else(|e| panic!("{at}: {e}\n{expr}"));
        used.extend(refs.selectors.into_iter().map(|s| s.metric));
    }
    let declared = declared_metrics();
    // A histogram is used through its _bucket, _sum and _count series.
    let used: BTreeSet<&str> = used
        .iter()
        .map(|m| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| m.strip_suffix(s).filter(|b| declared.contains(*b)))
                .unwrap_or(m)
        })
        .collect();
    for metric in &declared {
        assert!(
            docs.contains(&format!("`{metric}`")),
            "{metric} (src/telemetry.rs) is not in docs/metrics.md"
        );
        assert!(
            used.contains(metric.as_str()) || NOT_ON_DASHBOARD.iter().any(|(m, _)| m == metric),
            "{metric} (src/telemetry.rs) is on no panel of deploy/grafana/rayshift.json"
        );
    }
}

// === Against a live scrape ===

/// What a scrape exports: label names seen on each series name, and the `# TYPE` of each family.
#[derive(Debug, Default)]
struct Scrape {
    labels: BTreeMap<String, BTreeSet<String>>,
    types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses the Prometheus text format.
    fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    scrape.types.insert(name.to_string(), kind.to_string());
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            let name = &line[..end];
            let labels = scrape.labels.entry(name.to_string()).or_default();
            if line[end..].starts_with('{') {
                let mut chars = line[end + 1..].chars().peekable();
                loop {
                    let label: String = chars
                        .by_ref()
                        .take_while(|c| *c != '=' && *c != '}')
                        .collect();
                    let label = label.trim().trim_start_matches(',').trim();
                    if label.is_empty() {
                        break;
                    }
                    labels.insert(label.to_string());
                    // The quoted value, with backslash escapes.
                    assert_eq!(chars.next(), Some('"'), "bad label value in: {line}");
                    let mut escaped = false;
                    for c in chars.by_ref() {
                        match (escaped, c) {
                            (false, '\\') => escaped = true,
                            (false, '"') => break,
                            _ => escaped = false,
                        }
                    }
                    match chars.peek() {
                        Some(',') => {
                            chars.next();
                        }
                        _ => break,
                    }
                }
            }
        }
        scrape
    }

    fn has(&self, metric: &str) -> bool {
        self.labels.contains_key(metric)
    }
}

/// Problems of one expression against a scrape: unknown metrics, unknown labels, `rate()` of a gauge.
fn check_expr(at: &str, expr: &str, scrape: &Scrape, declared: &BTreeSet<String>) -> Vec<String> {
    let refs = match promql::refs(expr) {
        Ok(refs) => refs,
        Err(e) => return vec![format!("{at}: {e}")],
    };
    let mut problems = Vec::new();
    if refs.selectors.is_empty() {
        problems.push(format!("{at}: no metric in {expr:?}"));
    }
    let mut all_labels = BTreeSet::new();
    for sel in &refs.selectors {
        let Some(labels) = scrape.labels.get(&sel.metric) else {
            problems.push(format!("{at}: metric {} is not exported", sel.metric));
            continue;
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                let base = sel.metric.strip_suffix(s)?;
                (scrape.types.get(base).map(String::as_str) == Some("histogram")).then_some(base)
            })
            .unwrap_or(&sel.metric);
        if !declared.contains(family) {
            problems.push(format!(
                "{at}: metric {family} is not declared in src/telemetry.rs"
            ));
        }
        all_labels.extend(labels.iter().cloned());
        for label in &sel.labels {
            if !labels.contains(label) && label != "__name__" {
                problems.push(format!(
                    "{at}: {} has no label {label} (it has {labels:?})",
                    sel.metric
                ));
            }
        }
    }
    for label in &refs.grouping {
        if !all_labels.contains(label) {
            problems.push(format!(
                "{at}: label {label} (in by/without/on/ignoring) is on none of the expression's metrics"
            ));
        }
    }
    for (func, metric) in &refs.counter_functions {
        let counter = ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|s| metric.ends_with(s));
        if !counter {
            problems.push(format!(
                "{at}: {func}() of {metric}, which is not a counter"
            ));
        }
    }
    problems
}

/// Traffic, a completed shift (shard ob-a), a rollback (ob-b) and a passive-health ejection (ob-c)
/// through one gateway; retries against a killed cluster through a second (ob-d) and a spent retry
/// budget through a third (ob-e, budget 0: no failed attempt is retried); then every dashboard and
/// rule expression against `/metrics` (the gateways of one process share the metrics recorder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_names_exported_metrics_and_labels() {
    let a_blue = stub("ob-a-blue", "v1", &[("obs-a", "/a")]).await;
    let a_green = stub("ob-a-green", "v2", &[("obs-a", "/a")]).await;
    let b_blue = stub("ob-b-blue", "v1", &[("obs-b", "/b")]).await;
    let b_green = stub("ob-b-green", "v2", &[("obs-b", "/b")]).await;
    let c_one = stub("ob-c-one", "v1", &[("obs-c", "/c")]).await;
    let c_two = stub("ob-c-two", "v1", &[("obs-c", "/c")]).await;
    let extra = "\
apps:
  - {name: obs-a, route_prefix: /a, shard: ob-a}
  - {name: obs-b, route_prefix: /b, shard: ob-b}
  - {name: obs-c, route_prefix: /c, shard: ob-c}
passive_health:
  consecutive_failures: 3
  base_ejection: 10s
  max_ejection: 20s
";
    let gw = TestGateway::start(&config_yaml(
        &["ob-a", "ob-b", "ob-c"],
        &[
            cluster(&a_blue, "ob-a", "v1", Some(100)),
            cluster(&a_green, "ob-a", "v2", Some(0)),
            cluster(&b_blue, "ob-b", "v1", Some(100)),
            cluster(&b_green, "ob-b", "v2", Some(0)),
            cluster(&c_one, "ob-c", "v1", Some(50)),
            cluster(&c_two, "ob-c", "v1", Some(50)),
        ],
        extra,
    ))
    .await;
    let d_one = stub("ob-d-one", "v1", &[("obs-d", "/d")]).await;
    let d_two = stub("ob-d-two", "v1", &[("obs-d", "/d")]).await;
    let e_one = stub("ob-e-one", "v1", &[("obs-e", "/e")]).await;
    let e_two = stub("ob-e-two", "v1", &[("obs-e", "/e")]).await;
    // Slow probes: a killed cluster stays in the split (and fails requests) until passive health
    // ejects it, instead of until the next probe, which might come before any request.
    let slow_probes = |yaml: String| yaml.replace("interval: 100ms", "interval: 10s");
    let retrying = TestGateway::start(&slow_probes(config_yaml(
        &["ob-d"],
        &[
            cluster(&d_one, "ob-d", "v1", Some(50)),
            cluster(&d_two, "ob-d", "v1", Some(50)),
        ],
        "",
    )))
    .await;
    let no_budget = TestGateway::start(&slow_probes(config_yaml(
        &["ob-e"],
        &[
            cluster(&e_one, "ob-e", "v1", Some(50)),
            cluster(&e_two, "ob-e", "v1", Some(50)),
        ],
        "upstream:\n  retry_budget: 0\n  retry_min_per_second: 0\n",
    )))
    .await;
    // A gateway with TLS whose certificate reload fails (the reload metrics exist only with TLS).
    let f_one = stub("ob-f-one", "v1", &[("obs-f", "/f")]).await;
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let self_signed =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
    std::fs::write(tls_dir.path().join("cert.pem"), self_signed.cert.pem()).expect("write");
    std::fs::write(
        tls_dir.path().join("key.pem"),
        self_signed.key_pair.serialize_pem(),
    )
    .expect("write");
    let with_tls = TestGateway::start_in(
        &config_yaml(
            &["ob-f"],
            &[cluster(&f_one, "ob-f", "v1", None)],
            "tls:\n  cert_file: cert.pem\n  key_file: key.pem\n  reload_interval: 0s\n",
        ),
        tls_dir,
    )
    .await;
    std::fs::write(with_tls.dir.path().join("key.pem"), "not a key\n").expect("write");
    with_tls
        .gateway
        .reload_tls()
        .expect_err("a reload of a broken key fails");

    let load = Load::rotating(
        ["/a", "/b", "/c", "/a/stream?n=2&interval_ms=5"]
            .iter()
            .map(|p| (Method::GET, gw.url(p)))
            .chain([
                (Method::GET, retrying.url("/d")),
                (Method::GET, no_budget.url("/e")),
            ])
            .collect(),
        8,
    );
    load.wait_for_more(300).await;
    assert_eq!(get(&gw.url("/nowhere")).await.status, StatusCode::NOT_FOUND);

    // ob-c: every request to ob-c-two fails, so passive health ejects it.
    c_two.set_error_rate(1.0);
    // ob-d: a dead cluster; GETs that failed on it are retried on ob-d-one (then it is ejected).
    d_two.kill();
    // ob-e: the same without a retry budget: the failures go back to the clients.
    e_two.kill();
    // ob-b: half of the target's answers are 500; the first analysis window rolls the shift back.
    // (Every other request fails, never three in a row, so passive health leaves it alone.)
    b_green.set_error_rate(0.5);
    let start = |shard: &str, body: &'static str| {
        let url = gw.admin(&format!("/v1/shards/{shard}/shift"));
        async move {
            let r = send(
                Method::POST,
                &url,
                &[("content-type", "application/json")],
                body,
            )
            .await;
            assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
        }
    };
    start(
        "ob-a",
        r#"{"to": "ob-a-green", "step_percent": 50, "step_interval": "200ms", "min_requests": 5, "max_p99_latency": "5s", "drain_timeout": "2s"}"#,
    )
    .await;
    start(
        "ob-b",
        r#"{"to": "ob-b-green", "step_percent": 20, "step_interval": "300ms", "min_requests": 10, "max_error_rate": 0.05, "failure_threshold": 1}"#,
    )
    .await;
    wait_shift(&gw, "ob-a", "completed").await;
    wait_shift(&gw, "ob-b", "rolled_back").await;

    // Every metric the queries name, polled until present (ejection and retries race the probes).
    let dash = dashboard();
    let rules = rules();
    let exprs: Vec<(String, String)> = dashboard_exprs(&dash)
        .into_iter()
        .chain(rule_exprs(&rules))
        .collect();
    let mut wanted = BTreeSet::new();
    for (at, expr) in &exprs {
        let refs = promql::refs(expr).unwrap_or_else(|e| panic!("{at}: {e}\n{expr}"));
        wanted.extend(refs.selectors.into_iter().map(|s| s.metric));
    }
    let deadline = Instant::now() + WAIT;
    let scrape = loop {
        let r = get(&gw.admin("/metrics")).await;
        assert_eq!(r.status, StatusCode::OK);
        let scrape = Scrape::parse(&r.body);
        let missing: Vec<&String> = wanted.iter().filter(|m| !scrape.has(m)).collect();
        if missing.is_empty() || Instant::now() > deadline {
            break scrape;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = load.stop().await;
    println!(
        "observability: {} requests, {} failed; {} series names scraped; {} expressions checked",
        report.ok + report.failed,
        report.failed,
        scrape.labels.len(),
        exprs.len()
    );

    let declared = declared_metrics();
    let mut problems: Vec<String> = exprs
        .iter()
        .flat_map(|(at, expr)| check_expr(at, expr, &scrape, &declared))
        .collect();
    // The $shard variable's query: label_values(metric, label).
    for var in dash["templating"]["list"].as_array().expect("templating") {
        let Some(def) = var["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|s| s.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable query {def:?} is not label_values(metric, label)"));
        let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
        match scrape.labels.get(metric.trim()) {
            Some(labels) if labels.contains(label.trim()) => {}
            _ => problems.push(format!(
                "variable {}: {def} names nothing exported",
                var["name"]
            )),
        }
    }
    // Everything the gateway exports under rayshift_ is declared in one place.
    for name in scrape.labels.keys().filter(|n| n.starts_with("rayshift_")) {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| scrape.types.contains_key(*b))
            })
            .unwrap_or(name);
        if !declared.contains(family) {
            problems.push(format!(
                "/metrics exports {name}, which src/telemetry.rs does not declare"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

async fn wait_shift(gw: &TestGateway, shard: &str, state: &str) {
    let url = gw.admin(&format!("/v1/shards/{shard}/shift"));
    let deadline = Instant::now() + WAIT;
    loop {
        let r = get(&url).await;
        let shift: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
        if shift["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "shift of {shard} never reached {state}: {shift}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// === promtool ===

/// The `promtool` binary, or None (with a notice) when it is not installed and not required.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("RAYSHIFT_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
            "RAYSHIFT_REQUIRE_PROMTOOL=1 but promtool is not on PATH \
             (Debian: apt-get install prometheus; or a release from github.com/prometheus/prometheus)"
        );
        eprintln!("promtool not found: skipping the promtool checks");
    }
    found
}

fn run_promtool(promtool: &Path, args: &[&str], dir: &Path) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool {} failed:\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_checks_the_rules() {
    let Some(promtool) = promtool() else { return };
    let rules = repo("deploy/prometheus/rules.yaml");
    run_promtool(
        &promtool,
        &["check", "rules", rules.to_str().expect("path")],
        &repo("."),
    );
}

/// Prometheus' own parser reads every dashboard query (as a recording rule, with Grafana's
/// variables replaced by values).
#[test]
fn promtool_parses_the_dashboard_queries() {
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rules = vec![];
    for (i, (at, expr)) in dashboard_exprs(&dashboard()).into_iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h")
            .replace("$shard", ".*");
        assert!(!expr.contains('$'), "{at}: unknown variable in {expr}");
        rules.push(serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": expr}));
    }
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(dir.path().join("dashboard.json"), file.to_string()).expect("write");
    run_promtool(&promtool, &["check", "rules", "dashboard.json"], dir.path());
}

/// Each alert on synthetic series: when it must fire and when it must not, including the first
/// event of a counter that did not exist before (which `increase()` alone misses).
#[test]
fn promtool_unit_tests_the_alerts() {
    let Some(promtool) = promtool() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    // The alerts without annotations: promtool would otherwise compare their rendered text too.
    let mut rules = rules();
    for group in rules["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            rule.as_object_mut().expect("rule").remove("annotations");
        }
    }
    std::fs::write(dir.path().join("rules.json"), rules.to_string()).expect("write");
    std::fs::write(dir.path().join("tests.yaml"), ALERT_TESTS).expect("write");
    run_promtool(&promtool, &["test", "rules", "tests.yaml"], dir.path());
}

const ALERT_TESTS: &str = r#"
rule_files: [rules.json]
evaluation_interval: 1m
tests:
  - name: shift stuck
    interval: 1m
    input_series:
      # s1: progressing, never stepped (its steps counter stays at 0, its target weight too).
      - series: 'rayshift_shift_state{shard="s1",state="progressing"}'
        values: '1+0x40'
      - series: 'rayshift_shift_steps_total{shard="s1"}'
        values: '0+0x40'
      - series: 'rayshift_shift_target_weight{shard="s1"}'
        values: '0+0x40'
      # s5: a replica without the Lease: the shift it follows steps every 5 minutes (its target
      # weight moves), its own steps counter stays at 0. Not stuck.
      - series: 'rayshift_shift_state{shard="s5",state="progressing"}'
        values: '1+0x40'
      - series: 'rayshift_shift_steps_total{shard="s5"}'
        values: '0+0x40'
      - series: 'rayshift_shift_target_weight{shard="s5"}'
        values: '10+0x4 20+0x4 30+0x4 40+0x4 50+0x4 60+0x4 70+0x4 80+0x4 90'
      # s2: progressing and stepping every 5 minutes.
      - series: 'rayshift_shift_state{shard="s2",state="progressing"}'
        values: '1+0x40'
      - series: 'rayshift_shift_steps_total{shard="s2"}'
        values: '1 1 1 1 1 2 2 2 2 2 3 3 3 3 3 4 4 4 4 4 5 5 5 5 5 6 6 6 6 6 7 7 7 7 7 8 8 8 8 8 9'
      # s3: its first step at 10m creates the steps series at 1, then nothing.
      - series: 'rayshift_shift_state{shard="s3",state="progressing"}'
        values: '1+0x40'
      - series: 'rayshift_shift_steps_total{shard="s3"}'
        values: '_x10 1+0x30'
      # s4: paused for 40 minutes is not stuck.
      - series: 'rayshift_shift_state{shard="s4",state="progressing"}'
        values: '0+0x40'
      - series: 'rayshift_shift_state{shard="s4",state="paused"}'
        values: '1+0x40'
    alert_rule_test:
      - eval_time: 10m
        alertname: RayshiftShiftStuck
        exp_alerts: []
      - eval_time: 20m
        alertname: RayshiftShiftStuck
        exp_alerts:
          - exp_labels: {severity: warning, shard: s1, state: progressing}
      - eval_time: 40m
        alertname: RayshiftShiftStuck
        exp_alerts:
          - exp_labels: {severity: warning, shard: s1, state: progressing}
          - exp_labels: {severity: warning, shard: s3, state: progressing}

  - name: shift rolled back
    interval: 1m
    input_series:
      # The first rollback of shard a creates its series at 1 (increase() alone misses it).
      - series: 'rayshift_shift_rollbacks_total{shard="a",reason="error_rate"}'
        values: '_x5 1+0x40'
      # Shard b rolled back before Prometheus first saw it, then again at 30m.
      - series: 'rayshift_shift_rollbacks_total{shard="b",reason="latency"}'
        values: '1+0x29 2+0x10'
      # A new gateway exports every shard's counters at 0: no alert. Its first rollback at 20m is one.
      - series: 'rayshift_shift_rollbacks_total{shard="c",reason="error_rate"}'
        values: '0+0x19 1+0x20'
    alert_rule_test:
      - eval_time: 4m
        alertname: RayshiftShiftRolledBack
        exp_alerts:
          - exp_labels: {severity: warning, shard: b, reason: latency}
      - eval_time: 7m
        alertname: RayshiftShiftRolledBack
        exp_alerts:
          - exp_labels: {severity: warning, shard: a, reason: error_rate}
          - exp_labels: {severity: warning, shard: b, reason: latency}
      - eval_time: 25m
        alertname: RayshiftShiftRolledBack
        exp_alerts:
          - exp_labels: {severity: warning, shard: c, reason: error_rate}
      - eval_time: 32m
        alertname: RayshiftShiftRolledBack
        exp_alerts:
          - exp_labels: {severity: warning, shard: b, reason: latency}
      - eval_time: 41m
        alertname: RayshiftShiftRolledBack
        exp_alerts: []

  - name: cluster error ratio
    interval: 1m
    input_series:
      # green: 10/s answered 200, 1/s answered 502: 9% errors.
      - series: 'rayshift_requests_total{app="echo",shard="s",cluster="green",code="200"}'
        values: '0+600x20'
      - series: 'rayshift_requests_total{app="echo",shard="s",cluster="green",code="502"}'
        values: '0+60x20'
      - series: 'rayshift_requests_total{app="echo",shard="s",cluster="blue",code="200"}'
        values: '0+600x20'
      # idle: every request fails, but only 0.1 request/s.
      - series: 'rayshift_requests_total{app="echo",shard="s",cluster="idle",code="500"}'
        values: '0+6x20'
      # The gateway's own 503s are no cluster's errors.
      - series: 'rayshift_requests_total{app="echo",shard="s",cluster="none",code="503"}'
        values: '0+600x20'
    alert_rule_test:
      - eval_time: 3m
        alertname: RayshiftClusterErrorRatioHigh
        exp_alerts: []
      - eval_time: 15m
        alertname: RayshiftClusterErrorRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, shard: s, cluster: green}

  - name: shard without a ready cluster
    interval: 1m
    input_series:
      - series: 'rayshift_cluster_ready{shard="down",cluster="d1"}'
        values: '1 1 0+0x10'
      - series: 'rayshift_cluster_ready{shard="down",cluster="d2"}'
        values: '0+0x12'
      - series: 'rayshift_cluster_ready{shard="up",cluster="u1"}'
        values: '0+0x12'
      - series: 'rayshift_cluster_ready{shard="up",cluster="u2"}'
        values: '1+0x12'
      - series: 'rayshift_cluster_present{shard="down",cluster="d1"}'
        values: '1+0x12'
      - series: 'rayshift_cluster_present{shard="down",cluster="d2"}'
        values: '1+0x12'
      - series: 'rayshift_cluster_present{shard="up",cluster="u1"}'
        values: '1+0x12'
      - series: 'rayshift_cluster_present{shard="up",cluster="u2"}'
        values: '1+0x12'
      # A shard whose one cluster was deleted at 1m (its series stay, at 0) and that has no
      # applications left: nothing to alert.
      - series: 'rayshift_cluster_ready{shard="retired",cluster="r1"}'
        values: '1 0+0x11'
      - series: 'rayshift_cluster_present{shard="retired",cluster="r1"}'
        values: '1 0+0x11'
      - series: 'rayshift_apps{shard="retired"}'
        values: '1 0+0x11'
      # A shard whose one cluster was deleted at 1m while its applications stay placed on it.
      - series: 'rayshift_cluster_ready{shard="orphaned",cluster="o1"}'
        values: '1 0+0x11'
      - series: 'rayshift_cluster_present{shard="orphaned",cluster="o1"}'
        values: '1 0+0x11'
      - series: 'rayshift_apps{shard="orphaned"}'
        values: '3+0x12'
      # Applications but no cluster at all.
      - series: 'rayshift_apps{shard="empty"}'
        values: '2+0x12'
      # Neither applications nor clusters: nothing to serve, nothing to alert.
      - series: 'rayshift_apps{shard="unused"}'
        values: '0+0x12'
      - series: 'rayshift_apps{shard="down"}'
        values: '1+0x12'
      - series: 'rayshift_apps{shard="up"}'
        values: '1+0x12'
    alert_rule_test:
      - eval_time: 10m
        alertname: RayshiftShardNoReadyCluster
        exp_alerts:
          - exp_labels: {severity: critical, shard: down}
          - exp_labels: {severity: critical, shard: empty}
          - exp_labels: {severity: critical, shard: orphaned}

  - name: cluster ejected
    interval: 1m
    input_series:
      - series: 'rayshift_cluster_ejected{shard="s",cluster="flaky"}'
        values: '0 0 0 1+0x12'
      - series: 'rayshift_cluster_ejected{shard="s",cluster="once"}'
        values: '0 0 0 1 1 0+0x10'
    alert_rule_test:
      - eval_time: 4m
        alertname: RayshiftClusterEjected
        exp_alerts: []
      - eval_time: 12m
        alertname: RayshiftClusterEjected
        exp_alerts:
          - exp_labels: {severity: warning, shard: s, cluster: flaky}

  - name: shard on its draining clusters
    interval: 1m
    input_series:
      # s: the target down from 5m to 20m. t: a blip of under a minute.
      - series: 'rayshift_apps_on_draining_clusters{shard="s"}'
        values: '0x4 3x15 0x10'
      - series: 'rayshift_apps_on_draining_clusters{shard="t"}'
        values: '0x4 2 0x25'
    alert_rule_test:
      - eval_time: 5m
        alertname: RayshiftShardOnDrainingClusters
        exp_alerts: []
      - eval_time: 10m
        alertname: RayshiftShardOnDrainingClusters
        exp_alerts:
          - exp_labels: {severity: warning, shard: s}
      - eval_time: 25m
        alertname: RayshiftShardOnDrainingClusters
        exp_alerts: []

  - name: drained cluster not removed
    interval: 5m
    input_series:
      - series: 'rayshift_cluster_drained{shard="s",cluster="blue"}'
        values: '0 1+0x20'
      - series: 'rayshift_cluster_drained{shard="s",cluster="green"}'
        values: '0+0x20'
    alert_rule_test:
      - eval_time: 30m
        alertname: RayshiftClusterDrainedNotRemoved
        exp_alerts: []
      - eval_time: 70m
        alertname: RayshiftClusterDrainedNotRemoved
        exp_alerts:
          - exp_labels: {severity: info, shard: s, cluster: blue}

  - name: requests shed at the cluster limit
    interval: 1m
    input_series:
      # blue sheds 0.1 requests/s from 10m to 30m; red a 3-minute burst at 10m; green never.
      - series: 'rayshift_upstream_overflow_total{cluster="blue"}'
        values: '0x10 6+6x19 120x20'
      - series: 'rayshift_upstream_overflow_total{cluster="red"}'
        values: '0x10 6+6x2 18x37'
      - series: 'rayshift_upstream_overflow_total{cluster="green"}'
        values: '0x50'
    alert_rule_test:
      - eval_time: 15m
        alertname: RayshiftRequestsShed
        exp_alerts: []
      - eval_time: 25m
        alertname: RayshiftRequestsShed
        exp_alerts:
          - exp_labels: {severity: warning, cluster: blue}
      - eval_time: 45m
        alertname: RayshiftRequestsShed
        exp_alerts: []

  - name: tls reload failing
    interval: 1m
    input_series:
      # a: a bad file at 10m, fixed at 30m. b: a failure fixed within the 5 minutes.
      - series: 'rayshift_tls_reload_failing{instance="a"}'
        values: '0x9 1x20 0x10'
      - series: 'rayshift_tls_reload_failing{instance="b"}'
        values: '0x9 1x2 0x28'
    alert_rule_test:
      - eval_time: 12m
        alertname: RayshiftTlsReloadFailing
        exp_alerts: []
      - eval_time: 20m
        alertname: RayshiftTlsReloadFailing
        exp_alerts:
          - exp_labels: {severity: warning, instance: a}
      - eval_time: 35m
        alertname: RayshiftTlsReloadFailing
        exp_alerts: []
"#;

// === A PromQL tokenizer, enough to find metric selectors and label names ===

mod promql {
    use std::collections::BTreeSet;

    /// A metric selector: `name{label="v", ...}`.
    #[derive(Debug, PartialEq, Eq)]
    pub struct Selector {
        pub metric: String,
        /// Label names of its matchers.
        pub labels: Vec<String>,
    }

    /// What an expression refers to.
    #[derive(Debug, Default)]
    pub struct Refs {
        pub selectors: Vec<Selector>,
        /// Label names in `by`, `without`, `on`, `ignoring`, `group_left`, `group_right` lists.
        pub grouping: BTreeSet<String>,
        /// `(function, metric)` for the first metric inside each `rate`/`irate`/`increase`.
        pub counter_functions: Vec<(String, String)>,
    }

    const FUNCTIONS: &[&str] = &[
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "deg",
        "delta",
        "deriv",
        "double_exponential_smoothing",
        "exp",
        "floor",
        "histogram_avg",
        "histogram_count",
        "histogram_fraction",
        "histogram_quantile",
        "histogram_stddev",
        "histogram_stdvar",
        "histogram_sum",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "mad_over_time",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_by_label",
        "sort_by_label_desc",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
        "start",
        "end",
    ];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const GROUPING: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    const KEYWORDS: &[&str] = &[
        "and", "or", "unless", "offset", "bool", "atan2", "inf", "nan",
    ];

    #[derive(Debug, Clone, PartialEq)]
    enum Tok {
        Ident(String),
        /// A string, number, duration or Grafana variable: nothing to check.
        Literal,
        Punct(String),
    }

    fn lex(src: &str) -> Result<Vec<Tok>, String> {
        let chars: Vec<char> = src.chars().collect();
        let mut toks = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if c.is_whitespace() {
                i += 1;
            } else if c == '#' {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            } else if c == '"' || c == '\'' || c == '`' {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    i += if chars[i] == '\\' && c != '`' { 2 } else { 1 };
                }
                if i >= chars.len() {
                    return Err(format!("unterminated string in {src:?}"));
                }
                i += 1;
                toks.push(Tok::Literal);
            } else if c == '$' {
                // Grafana variable: $name, ${name}, ${name:fmt}.
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
                toks.push(Tok::Literal);
            } else if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
            {
                // Numbers and durations: 0.99, 1e3, 0x1f, 5m, 1h30m.
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                toks.push(Tok::Literal);
            } else if c.is_ascii_alphabetic() || c == '_' {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                toks.push(Tok::Ident(chars[start..i].iter().collect()));
            } else {
                let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
                if ["!=", "=~", "!~", "==", "<=", ">="].contains(&two.as_str()) {
                    toks.push(Tok::Punct(two));
                    i += 2;
                } else if "{}()[],:=<>+-*/%^@".contains(c) {
                    toks.push(Tok::Punct(c.to_string()));
                    i += 1;
                } else {
                    return Err(format!("unexpected character {c:?} in {src:?}"));
                }
            }
        }
        Ok(toks)
    }

    fn is_punct(t: Option<&Tok>, p: &str) -> bool {
        matches!(t, Some(Tok::Punct(s)) if s == p)
    }

    /// The metric selectors and grouping labels of `expr`.
    pub fn refs(expr: &str) -> Result<Refs, String> {
        let toks = lex(expr)?;
        let mut refs = Refs::default();
        // Open `rate(`-like calls waiting for their first metric.
        let mut pending_counter_fn: Option<String> = None;
        let mut i = 0;
        while i < toks.len() {
            match &toks[i] {
                Tok::Ident(word) if GROUPING.contains(&word.as_str()) => {
                    i += 1;
                    if is_punct(toks.get(i), "(") {
                        i += 1;
                        while !is_punct(toks.get(i), ")") {
                            match toks.get(i) {
                                Some(Tok::Ident(label)) => {
                                    refs.grouping.insert(label.clone());
                                }
                                Some(Tok::Punct(p)) if p == "," => {}
                                other => {
                                    return Err(format!("unexpected {other:?} in {word}(...)"))
                                }
                            }
                            i += 1;
                        }
                        i += 1;
                    }
                }
                Tok::Ident(word) if AGGREGATIONS.contains(&word.as_str()) => i += 1,
                Tok::Ident(word) if KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) => {
                    i += 1
                }
                Tok::Ident(word) if is_punct(toks.get(i + 1), "(") => {
                    if !FUNCTIONS.contains(&word.as_str()) {
                        return Err(format!("unknown function {word}()"));
                    }
                    if ["rate", "irate", "increase"].contains(&word.as_str()) {
                        pending_counter_fn = Some(word.clone());
                    }
                    i += 1;
                }
                Tok::Ident(metric) => {
                    let mut sel = Selector {
                        metric: metric.clone(),
                        labels: Vec::new(),
                    };
                    i += 1;
                    if is_punct(toks.get(i), "{") {
                        i = matchers(&toks, i + 1, &mut sel.labels)?;
                    }
                    if let Some(func) = pending_counter_fn.take() {
                        refs.counter_functions.push((func, sel.metric.clone()));
                    }
                    refs.selectors.push(sel);
                }
                Tok::Punct(p) if p == "{" => {
                    // A selector without a name: {__name__="..."}.
                    let mut labels = Vec::new();
                    matchers(&toks, i + 1, &mut labels)?;
                    return Err(format!(
                        "selector without a metric name ({labels:?}) in {expr:?}"
                    ));
                }
                _ => i += 1,
            }
        }
        Ok(refs)
    }

    /// Reads `label op "value", ...}` from `i`; returns the index after `}`.
    fn matchers(toks: &[Tok], mut i: usize, labels: &mut Vec<String>) -> Result<usize, String> {
        loop {
            match (toks.get(i), toks.get(i + 1), toks.get(i + 2)) {
                (Some(Tok::Punct(p)), _, _) if p == "}" => return Ok(i + 1),
                (Some(Tok::Punct(p)), _, _) if p == "," => i += 1,
                (Some(Tok::Ident(label)), Some(Tok::Punct(op)), Some(Tok::Literal))
                    if ["=", "!=", "=~", "!~"].contains(&op.as_str()) =>
                {
                    labels.push(label.clone());
                    i += 3;
                }
                other => return Err(format!("bad label matcher near {other:?}")),
            }
        }
    }

    #[test]
    fn finds_selectors_labels_and_grouping() {
        let r = refs(
            r#"histogram_quantile(0.99, sum by (le, cluster) (rate(x_bucket{shard=~"$shard", code!="5.."}[$__rate_interval])))
               / on (cluster) group_left () max without (pod) (y offset 5m) and z{a="}"} # comment: w"#,
        )
        .unwrap();
        assert_eq!(
            r.selectors,
            vec![
                Selector {
                    metric: "x_bucket".into(),
                    labels: vec!["shard".into(), "code".into()]
                },
                Selector {
                    metric: "y".into(),
                    labels: vec![]
                },
                Selector {
                    metric: "z".into(),
                    labels: vec!["a".into()]
                },
            ]
        );
        assert_eq!(
            r.grouping.into_iter().collect::<Vec<_>>(),
            ["cluster", "le", "pod"]
        );
        assert_eq!(r.counter_functions, [("rate".into(), "x_bucket".into())]);
        assert!(refs("sum(nonsense_fn(x))").is_err());
        assert!(refs(r#"{__name__="x"}"#).is_err());
        assert!(refs("count(x == 1) or vector(0)").unwrap().selectors.len() == 1);
    }
}

/// The checker itself catches what it is there for.
#[test]
fn checker_reports_unknown_metrics_labels_and_rates_of_gauges() {
    let scrape = Scrape::parse(
        "# TYPE rayshift_requests_total counter\n\
         rayshift_requests_total{app=\"a\",shard=\"s\",cluster=\"c\",code=\"200\"} 3\n\
         # TYPE rayshift_cluster_ready gauge\n\
         rayshift_cluster_ready{shard=\"s\",cluster=\"c,}\\\"x\"} 1\n",
    );
    assert_eq!(
        scrape.labels["rayshift_cluster_ready"],
        BTreeSet::from(["shard".to_string(), "cluster".to_string()])
    );
    let declared = declared_metrics();
    let ok = check_expr(
        "ok",
        r#"sum by (shard) (rate(rayshift_requests_total{code=~"5.."}[5m])) and on (cluster) rayshift_cluster_ready"#,
        &scrape,
        &declared,
    );
    assert!(ok.is_empty(), "{ok:?}");
    let bad = check_expr(
        "bad",
        r#"sum by (pod) (rate(rayshift_cluster_ready{zone="x"}[5m])) + rayshift_nope"#,
        &scrape,
        &declared,
    );
    assert_eq!(bad.len(), 4, "{bad:#?}");
}
