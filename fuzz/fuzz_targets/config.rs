//! `Config::from_yaml` on arbitrary text.
//!
//! Asserts: it never panics; a refusal lists at least one problem and every problem has a non-empty
//! field path and message; an accepted config keeps the documented rules (docs/config.md), builds a
//! routing table in which every configured app is reachable at its own route prefix, and writes its
//! `split_key` back in a syntax that parses to the same key.

#![no_main]

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

mod common;

use libfuzzer_sys::fuzz_target;
use rayshift::config::{Config, MAX_NAME_LEN};
use rayshift::routing::{ClusterSpec, RoutingTable, TableSpec};

/// An absolute base directory, so every resolved path must come out absolute.
const BASE: &str = "/etc/rayshift";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_yaml(text, Path::new(BASE)) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "refused with no error for {text:?}");
            for e in &errors.0 {
                assert!(
                    !e.field.trim().is_empty(),
                    "empty field in {e:?} for {text:?}"
                );
                assert!(
                    !e.message.trim().is_empty(),
                    "empty message in {e:?} for {text:?}"
                );
            }
            let _ = errors.to_string();
        }
        Ok(config) => check_accepted(&config, text),
    }
});

/// `[A-Za-z0-9][A-Za-z0-9._-]*`, 1 to 63 characters.
fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_LEN
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn check_accepted(config: &Config, text: &str) {
    // Shards: at least one, valid unique names, finite weights above 0.
    assert!(!config.shards.is_empty(), "no shard accepted: {text:?}");
    let mut shard_names = HashSet::new();
    for shard in &config.shards {
        assert!(
            valid_name(&shard.name),
            "shard name {:?}: {text:?}",
            shard.name
        );
        assert!(
            shard_names.insert(shard.name.as_str()),
            "duplicate shard: {text:?}"
        );
        assert!(
            shard.weight.is_finite() && shard.weight > 0.0,
            "shard weight {}: {text:?}",
            shard.weight
        );
    }

    // Clusters: valid unique names, a declared shard, a revision, base URLs, weights 0-100 that are
    // either all unset or all set and summing to 100 within a shard.
    let mut cluster_names = HashSet::new();
    let mut weights: BTreeMap<&str, (usize, usize, u32)> = BTreeMap::new(); // (clusters, set, sum)
    for cluster in &config.clusters {
        assert!(
            valid_name(&cluster.name),
            "cluster name {:?}: {text:?}",
            cluster.name
        );
        assert!(
            cluster_names.insert(cluster.name.as_str()),
            "duplicate cluster: {text:?}"
        );
        assert!(
            config.shard_index(&cluster.shard).is_some(),
            "undeclared shard: {text:?}"
        );
        assert!(
            !cluster.revision.trim().is_empty(),
            "empty revision: {text:?}"
        );
        for url in std::iter::once(&cluster.serve_url).chain(&cluster.dashboard_url) {
            assert!(matches!(url.scheme(), "http" | "https"), "{url}: {text:?}");
            assert!(url.host().is_some(), "{url}: {text:?}");
            assert!(
                url.query().is_none() && url.fragment().is_none(),
                "{url}: {text:?}"
            );
            assert!(matches!(url.path(), "" | "/"), "{url}: {text:?}");
        }
        let entry = weights.entry(cluster.shard.as_str()).or_default();
        entry.0 += 1;
        if let Some(w) = cluster.weight {
            assert!(w <= 100, "weight {w}: {text:?}");
            entry.1 += 1;
            entry.2 += w;
        }
    }
    for (shard, (clusters, set, sum)) in &weights {
        assert!(
            *set == 0 || (*set == *clusters && *sum == 100),
            "shard {shard}: {set} of {clusters} weights set, sum {sum}: {text:?}"
        );
    }

    // Apps: unique names without whitespace, unique URL-path prefixes starting with '/', pins to
    // declared shards.
    let mut app_names = HashSet::new();
    let mut prefixes = HashSet::new();
    for app in &config.apps {
        assert!(!app.name.is_empty(), "empty app name: {text:?}");
        assert!(
            !app.name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control()),
            "app name {:?}: {text:?}",
            app.name
        );
        assert!(
            app_names.insert(app.name.as_str()),
            "duplicate app: {text:?}"
        );
        assert!(
            app.route_prefix.starts_with('/'),
            "prefix {:?}: {text:?}",
            app.route_prefix
        );
        assert!(
            !app.route_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#'),
            "prefix {:?}: {text:?}",
            app.route_prefix
        );
        assert!(
            prefixes.insert(app.route_prefix.as_str()),
            "duplicate prefix: {text:?}"
        );
        if let Some(shard) = &app.shard {
            assert!(
                config.shard_index(shard).is_some(),
                "undeclared pin: {text:?}"
            );
        }
    }

    // Resolved paths are absolute (the base directory is).
    assert!(
        config.state_file.is_absolute(),
        "state_file {:?}: {text:?}",
        config.state_file
    );
    if let Some(token) = &config.admin.token_file {
        assert!(token.is_absolute(), "token_file {token:?}: {text:?}");
    }

    // The shift defaults round-trip through JSON (the state file and the admin API carry them).
    let policy = serde_json::to_string(&config.shift_defaults).expect("policy serializes");
    let back: rayshift::shift::ShiftPolicy =
        serde_json::from_str(&policy).unwrap_or_else(|e| panic!("{policy}: {e}; {text:?}"));
    common::assert_same_policy(
        &back,
        &config.shift_defaults,
        &format!("{policy}: {text:?}"),
    );

    // The routing table the control plane would build from this config (every cluster ready and
    // serving every configured app) is accepted, and every app is reached at its own prefix.
    let spec = TableSpec {
        shards: config.shard_specs(),
        clusters: config
            .clusters
            .iter()
            .map(|c| ClusterSpec {
                name: c.name.clone(),
                shard: config.shard_index(&c.shard).expect("checked above") as u32,
                weight: c.weight.unwrap_or(0),
                revision: c.revision.clone(),
                ready: true,
                draining: false,
                apps: config.apps.iter().map(|a| a.name.clone()).collect(),
            })
            .collect(),
        apps: config.app_specs(),
    };
    let table = RoutingTable::build(&spec)
        .unwrap_or_else(|e| panic!("valid config, invalid table: {e}; {text:?}"));
    for (id, app) in config.apps.iter().enumerate() {
        let hit = table.lookup(&app.route_prefix).expect("own prefix routes");
        assert_eq!(hit.app_id as usize, id, "{:?}: {text:?}", app.route_prefix);
    }

    // split_key is written back in the file syntax; that text parses to the same key.
    let written = config.split_key.to_string();
    let again = format!(
        "shards: [{}]\nsplit_key: '{}'\n",
        config.shards[0].name,
        written.replace('\'', "''")
    );
    match Config::from_yaml(&again, Path::new(BASE)) {
        Ok(reparsed) => assert_eq!(reparsed.split_key, config.split_key, "{again:?}: {text:?}"),
        Err(e) => panic!("split_key {written:?} does not parse back: {e}; {text:?}"),
    }
}
