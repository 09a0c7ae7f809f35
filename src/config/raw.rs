//! Stage one: the config file as written, deserialized with serde.
//!
//! Every scalar is kept as its source text ([`Text`]) so that a wrong value (`weight: lots`,
//! `listen: 8080`) is not a deserialization error but a validation error, reported together with all
//! the others by [`super::validate`]. What can fail here is the shape: YAML syntax, a list where a
//! mapping belongs, an unknown key. Such an error is reported alone, with the best field path
//! [`super::locate`] can find.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use super::error::ConfigError;
use super::locate;

/// Parses `text` into the raw file model.
pub(crate) fn parse(text: &str) -> Result<RawConfig, ConfigError> {
    let options = serde_saphyr::Options {
        with_snippet: false,
        ..Default::default()
    };
    serde_saphyr::from_str_with_options::<Option<RawConfig>>(text, options)
        .map(Option::unwrap_or_default)
        .map_err(|error| locate::stage_one_error(text, &error))
}

/// A scalar as written in the file (`8080`, `1s`, `v1.10`), whatever YAML type it would resolve to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Text(pub String);

impl Text {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl Visitor<'_> for TextVisitor {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a single value, not a list or mapping")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text, E> {
                Ok(Text(v))
            }
        }
        // Strings are asked for, so the YAML parser hands over the source text of any scalar.
        deserializer.deserialize_string(TextVisitor)
    }
}

/// The top level of the file.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping of config keys (listen, admin, state_file, shards, split_key, clusters, apps, probe, upstream, shift_defaults, max_concurrent_shifts, limits, passive_health, shutdown, tls, discovery)"
)]
pub(crate) struct RawConfig {
    pub listen: Option<Text>,
    pub admin: Option<RawAdmin>,
    pub state_file: Option<Text>,
    pub shards: Option<Vec<RawShard>>,
    pub split_key: Option<Text>,
    pub clusters: Option<Vec<RawCluster>>,
    pub apps: Option<Vec<RawApp>>,
    pub probe: Option<RawProbe>,
    pub upstream: Option<RawUpstream>,
    pub shift_defaults: Option<RawPolicy>,
    pub max_concurrent_shifts: Option<Text>,
    pub limits: Option<RawSection>,
    pub passive_health: Option<RawSection>,
    pub shutdown: Option<RawSection>,
    pub tls: Option<RawSection>,
    pub discovery: Option<RawDiscovery>,
}

/// `discovery`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a mapping with the key kubernetes")]
pub(crate) struct RawDiscovery {
    pub kubernetes: Option<RawKubernetes>,
}

/// `discovery.kubernetes`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with keys namespaces, label_selector, endpoint, kubeconfig, delete_drained, auto_shift, state"
)]
pub(crate) struct RawKubernetes {
    pub namespaces: Option<Vec<Text>>,
    pub label_selector: Option<Text>,
    pub endpoint: Option<Text>,
    pub kubeconfig: Option<Text>,
    pub delete_drained: Option<Text>,
    pub auto_shift: Option<RawPolicy>,
    pub state: Option<RawSection>,
}

/// A section whose keys are checked by validation (so an unknown key gets a field path and the list
/// of known keys). A key with an empty value (`key:` or `key: ~`) counts as omitted, as everywhere
/// else in the file; its name is kept, so that an unknown one is still reported.
#[derive(Debug, Default)]
pub(crate) struct RawSection(BTreeMap<String, Text>, Vec<String>);

impl RawSection {
    /// The keys given without a value.
    pub fn empty_keys(&self) -> &[String] {
        &self.1
    }
}

impl std::ops::Deref for RawSection {
    type Target = BTreeMap<String, Text>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<'a> IntoIterator for &'a RawSection {
    type Item = (&'a String, &'a Text);
    type IntoIter = std::collections::btree_map::Iter<'a, String, Text>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl<'de> Deserialize<'de> for RawSection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let keys = BTreeMap::<String, Option<Text>>::deserialize(deserializer)?;
        let empty = keys
            .iter()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key.clone())
            .collect();
        Ok(Self(
            keys.into_iter()
                .filter_map(|(key, value)| Some((key, value?)))
                .collect(),
            empty,
        ))
    }
}

/// A shift policy (`shift_defaults`, `shards[i].auto_shift`): policy keys to values, checked by
/// [`crate::shift::ShiftPolicy::set`] so the config and the admin API share one syntax.
pub(crate) type RawPolicy = RawSection;

/// `admin`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with keys listen, token_file, request_timeout and removed_series_ttl"
)]
pub(crate) struct RawAdmin {
    pub listen: Option<Text>,
    pub token_file: Option<Text>,
    pub request_timeout: Option<Text>,
    pub removed_series_ttl: Option<Text>,
}

/// `shards[i]`: a bare name or a `{name, weight}` mapping.
#[derive(Debug)]
pub(crate) enum RawShard {
    Name(String),
    Entry(RawShardEntry),
}

/// `shards[i]` written as a mapping.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with keys name, weight and auto_shift"
)]
pub(crate) struct RawShardEntry {
    pub name: Option<Text>,
    pub weight: Option<Text>,
    pub auto_shift: Option<RawPolicy>,
}

impl<'de> Deserialize<'de> for RawShard {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ShardVisitor;
        impl<'de> Visitor<'de> for ShardVisitor {
            type Value = RawShard;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a shard name or a {name, weight} mapping")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawShard, E> {
                Ok(RawShard::Name(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<RawShard, E> {
                Ok(RawShard::Name(v))
            }
            // A plain `0` or `true` is resolved by YAML before we see it; as a name it is its text.
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawShard, E> {
                Ok(RawShard::Name(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawShard, E> {
                Ok(RawShard::Name(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RawShard, E> {
                Ok(RawShard::Name(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<RawShard, E> {
                Ok(RawShard::Name(v.to_string()))
            }
            // An empty entry (`- ` or `- ~`) is an empty name, reported by validation.
            fn visit_unit<E: de::Error>(self) -> Result<RawShard, E> {
                Ok(RawShard::Name(String::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawShard, A::Error> {
                RawShardEntry::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(RawShard::Entry)
            }
        }
        deserializer.deserialize_any(ShardVisitor)
    }
}

/// `clusters[i]`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a cluster mapping (name, shard, revision, serve_url, dashboard_url, weight)"
)]
pub(crate) struct RawCluster {
    pub name: Option<Text>,
    pub shard: Option<Text>,
    pub revision: Option<Text>,
    pub serve_url: Option<Text>,
    pub dashboard_url: Option<Text>,
    pub weight: Option<Text>,
}

/// `apps[i]`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "an app mapping (name, route_prefix, shard)"
)]
pub(crate) struct RawApp {
    pub name: Option<Text>,
    pub route_prefix: Option<Text>,
    pub shard: Option<Text>,
}

/// `probe`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with keys interval, timeout and failure_threshold"
)]
pub(crate) struct RawProbe {
    pub interval: Option<Text>,
    pub timeout: Option<Text>,
    pub failure_threshold: Option<Text>,
}

/// `upstream`.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a mapping with keys idle_timeout, connect_timeout, response_timeout, max_idle_per_cluster, max_requests_per_cluster, retries, retry_budget, retry_min_per_second, ca_file and direct_http1"
)]
pub(crate) struct RawUpstream {
    pub idle_timeout: Option<Text>,
    pub connect_timeout: Option<Text>,
    pub response_timeout: Option<Text>,
    pub max_idle_per_cluster: Option<Text>,
    pub max_requests_per_cluster: Option<Text>,
    pub retries: Option<Text>,
    pub retry_budget: Option<Text>,
    pub retry_min_per_second: Option<Text>,
    pub ca_file: Option<Text>,
    pub direct_http1: Option<Text>,
}
