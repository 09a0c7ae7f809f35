//! Field paths for stage-one (serde) errors.
//!
//! serde errors know where in the text they happened but not which key they are about. When stage
//! one fails, the text is parsed a second time into a schema-less tree that records the location of
//! every key and value; the error's location is then mapped back to a path like `clusters[0].weight`.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::{Location, Spanned};

use super::error::ConfigError;

/// Field used when no path can be found: YAML syntax errors, a top level that is not a mapping.
pub(crate) const DOCUMENT_FIELD: &str = "<yaml>";

/// Turns a serde-saphyr error from stage one into a [`ConfigError`] with the best field path found.
pub(crate) fn stage_one_error(text: &str, error: &serde_saphyr::Error) -> ConfigError {
    let error = error.without_snippet();
    let location = error.location();
    let at = location.map(line_column).unwrap_or_default();

    let Some(nodes) = index(text) else {
        // The text is not valid YAML: no tree, no path.
        return ConfigError::new(DOCUMENT_FIELD, format!("{}{at}", bare_message(error)));
    };

    if let serde_saphyr::Error::Message { msg, .. } = error {
        if let Some(key) = unknown_field(msg) {
            let path = unknown_field_path(&nodes, key, location);
            // Point at the key itself rather than at its mapping, when it can be found.
            let at = nodes
                .iter()
                .find(|n| n.path == path)
                .map(|n| line_column(n.location))
                .unwrap_or(at);
            return ConfigError::new(path, format!("{msg}{at}"));
        }
    }

    let node = location.and_then(|l| node_at(&nodes, l));
    let path = node.map(|n| n.path.as_str()).unwrap_or("");
    let field = if path.is_empty() {
        DOCUMENT_FIELD
    } else {
        path
    };
    let message = match error {
        // serde-saphyr's own wording ("unexpected event: expected sequence start") is about parser
        // events; say instead what belongs at this path and what was found there.
        serde_saphyr::Error::Unexpected { .. } => match node {
            Some(n) => format!("expected {}, found {}{at}", expected_at(path), n.found),
            None => format!("expected {}{at}", expected_at(path)),
        },
        other => format!("{}{at}", bare_message(other)),
    };
    ConfigError::new(field, message)
}

/// ` at line L, column C`.
fn line_column(location: Location) -> String {
    format!(" at line {}, column {}", location.line(), location.column())
}

/// The error's message without serde-saphyr's location suffix (we add our own).
fn bare_message(error: &serde_saphyr::Error) -> String {
    match error {
        serde_saphyr::Error::Message { msg, .. } | serde_saphyr::Error::HookError { msg, .. } => {
            msg.clone()
        }
        serde_saphyr::Error::Eof { .. } => "unexpected end of input".to_owned(),
        serde_saphyr::Error::Unexpected { expected, .. } => format!("expected {expected}"),
        // Other kinds carry no location, or render it differently: use their own wording.
        other => {
            let text = other.to_string();
            match other.location() {
                Some(l) => text
                    .strip_suffix(&line_column(l))
                    .map(str::to_owned)
                    .unwrap_or(text),
                None => text,
            }
        }
    }
}

/// What belongs at `path`, for "expected ..., found ..." messages.
fn expected_at(path: &str) -> &'static str {
    match generic_path(path).as_str() {
        "" => "a mapping of config keys (listen, admin, state_file, shards, split_key, clusters, apps, probe, upstream, shift_defaults, max_concurrent_shifts, limits, passive_health, shutdown, tls, discovery)",
        "admin" => "a mapping with keys listen, token_file, request_timeout and removed_series_ttl",
        "shards" => "a list of shard names",
        "shards[]" => "a shard name or a {name, weight} mapping",
        "shards[].auto_shift" | "shift_defaults" | "discovery.kubernetes.auto_shift" => {
            "a mapping of shift policy keys (step_percent, step_interval, ...)"
        }
        "clusters" => "a list of clusters",
        "clusters[]" => "a cluster mapping (name, shard, revision, serve_url, dashboard_url, weight)",
        "apps" => "a list of apps",
        "apps[]" => "an app mapping (name, route_prefix, shard)",
        "probe" => "a mapping with keys interval, timeout and failure_threshold",
        "upstream" => "a mapping with keys idle_timeout, connect_timeout, response_timeout, max_idle_per_cluster, max_requests_per_cluster, retries, retry_budget, retry_min_per_second, ca_file and direct_http1",
        "limits" | "passive_health" | "shutdown" | "tls" | "discovery.kubernetes.state" => {
            "a mapping of keys to values"
        }
        "discovery" => "a mapping with the key kubernetes",
        "discovery.kubernetes" => "a mapping with keys namespaces, label_selector, endpoint, kubeconfig, delete_drained, auto_shift, state",
        "discovery.kubernetes.namespaces" => "a list of namespace names",
        _ => "a single value, not a list or mapping",
    }
}

/// `clusters[3].name` -> `clusters[].name`.
fn generic_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// The key named by serde's "unknown field `key`, expected ..." message.
fn unknown_field(msg: &str) -> Option<&str> {
    let rest = msg.strip_prefix("unknown field `")?;
    rest.split_once('`').map(|(key, _)| key)
}

/// Path of the unknown `key`. serde-saphyr places the error at the start of the mapping that holds
/// the key, so look for mappings holding it, preferring one that starts where the error is.
/// (The key's own node has this path and comes before its value in `nodes`.)
fn unknown_field_path(nodes: &[Node], key: &str, location: Option<Location>) -> String {
    let holders = nodes.iter().filter(|n| n.keys.iter().any(|k| k == key));
    let mut chosen = None;
    for node in holders {
        let starts_here = location.is_some_and(|l| {
            same_place(node.location, l) || node.first_key.is_some_and(|k| same_place(k, l))
        });
        if starts_here || chosen.is_none() {
            chosen = Some(node);
        }
        if starts_here {
            break;
        }
    }
    match chosen {
        Some(map) => join(&map.path, key),
        None => key.to_owned(),
    }
}

fn same_place(a: Location, b: Location) -> bool {
    a.line() == b.line() && a.column() == b.column()
}

/// The node the error location points at: the outermost node starting at the last position at or
/// before it (a mapping value starts where its first key does; the value is what was meant).
fn node_at(nodes: &[Node], location: Location) -> Option<&Node> {
    let target = (location.line(), location.column());
    let best = nodes
        .iter()
        .map(|n| (n.location.line(), n.location.column()))
        .filter(|&p| p <= target)
        .max()?;
    nodes
        .iter()
        .find(|n| (n.location.line(), n.location.column()) == best)
}

/// A located key or value of the document, in document order.
#[derive(Debug)]
struct Node {
    path: String,
    location: Location,
    /// How the node reads in "found ..." messages.
    found: String,
    /// For a mapping: its keys, and the location of its first key.
    keys: Vec<String>,
    first_key: Option<Location>,
}

/// Parses `text` into a flat list of located nodes; `None` if it is not valid YAML.
fn index(text: &str) -> Option<Vec<Node>> {
    let options = serde_saphyr::Options {
        with_snippet: false,
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::LastWins,
        ..Default::default()
    };
    let tree: Option<Spanned<Tree>> = serde_saphyr::from_str_with_options(text, options).ok()?;
    let mut nodes = Vec::new();
    if let Some(tree) = tree {
        flatten(&tree, String::new(), &mut nodes);
    }
    Some(nodes)
}

fn flatten(node: &Spanned<Tree>, path: String, out: &mut Vec<Node>) {
    let (keys, first_key) = match &node.value {
        Tree::Map(entries) => (
            entries.iter().map(|(k, _)| k.value.key_text()).collect(),
            entries.first().map(|(k, _)| k.referenced),
        ),
        _ => (Vec::new(), None),
    };
    out.push(Node {
        path: path.clone(),
        location: node.referenced,
        found: node.value.found(),
        keys,
        first_key,
    });
    match &node.value {
        Tree::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(item, format!("{path}[{i}]"), out);
            }
        }
        Tree::Map(entries) => {
            for (key, value) in entries {
                let child = join(&path, &key.value.key_text());
                out.push(Node {
                    path: child.clone(),
                    location: key.referenced,
                    found: value.value.found(),
                    keys: Vec::new(),
                    first_key: None,
                });
                flatten(value, child, out);
            }
        }
        Tree::Null | Tree::Scalar(_) => {}
    }
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// A schema-less YAML node.
#[derive(Debug)]
enum Tree {
    Null,
    Scalar(String),
    Seq(Vec<Spanned<Tree>>),
    Map(Vec<(Spanned<Tree>, Spanned<Tree>)>),
}

impl Tree {
    fn key_text(&self) -> String {
        match self {
            Tree::Scalar(s) => s.clone(),
            Tree::Null => "~".to_owned(),
            Tree::Seq(_) | Tree::Map(_) => "?".to_owned(),
        }
    }

    fn found(&self) -> String {
        match self {
            Tree::Null => "an empty value".to_owned(),
            Tree::Scalar(s) => format!("the value {s:?}"),
            Tree::Seq(_) => "a list".to_owned(),
            Tree::Map(_) => "a mapping".to_owned(),
        }
    }
}

impl<'de> Deserialize<'de> for Tree {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TreeVisitor;
        impl<'de> Visitor<'de> for TreeVisitor {
            type Value = Tree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_string()))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Tree, E> {
                Ok(Tree::Scalar(v.to_owned()))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Tree, E> {
                Ok(Tree::Scalar(String::from_utf8_lossy(v).into_owned()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Tree, E> {
                Ok(Tree::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Tree, D::Error> {
                Tree::deserialize(d)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Tree, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Tree::Seq(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Tree, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key()? {
                    let value = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(Tree::Map(entries))
            }
        }
        deserializer.deserialize_any(TreeVisitor)
    }
}
