//! The gateway's configuration file: a YAML document, parsed and validated into [`Config`].
//!
//! ```yaml
//! listen: 127.0.0.1:8080
//! admin:
//!   listen: 127.0.0.1:9901
//! shards: [shard-0]
//! clusters:
//!   - name: blue
//!     shard: shard-0
//!     revision: v1
//!     serve_url: http://127.0.0.1:8101
//! ```
//!
//! Loading happens in two stages:
//!
//! 1. `raw`: serde deserializes the file into a model that mirrors it, with every scalar kept as
//!    its text. Unknown keys are rejected there, so typos are caught. A YAML syntax error or a value
//!    of the wrong shape (a mapping where a list belongs) stops loading and is reported alone, with
//!    the field path found for its line and column.
//! 2. `validate`: every value is checked and converted, defaults are applied and relative paths
//!    (`state_file`, `admin.token_file`, `tls.cert_file`, `tls.key_file`, `upstream.ca_file`) are resolved against the directory of the config file.
//!    Every problem is collected, each with its field path (`clusters[1].serve_url: relative URL
//!    without a base`), in the order of the file's sections.
//!
//! The key reference, with types, defaults and rules, is `docs/config.md`.
//!
//! ```no_run
//! use std::path::Path;
//! use rayshift::config::Config;
//!
//! match Config::load(Path::new("config/example.yaml")) {
//!     Ok(config) => println!("{} shard(s)", config.shards.len()),
//!     Err(errors) => eprintln!("invalid config:\n{errors}"),
//! }
//! ```

mod error;
mod locate;
mod model;
mod raw;
mod selector;
pub(crate) mod validate;

#[cfg(test)]
mod tests;

pub use error::{ConfigError, ConfigErrors};
pub use model::{
    AdminConfig, AppConfig, ClusterConfig, Config, KubeEndpoint, KubeStateConfig, KubernetesConfig,
    LimitsConfig, PassiveHealthConfig, ProbeConfig, ShardConfig, ShutdownConfig, SplitKey,
    TlsConfig, UpstreamConfig, DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN,
    DEFAULT_PROBE_FAILURE_THRESHOLD, DEFAULT_PROBE_INTERVAL, DEFAULT_PROBE_TIMEOUT,
    DEFAULT_SHARD_WEIGHT, DEFAULT_STATE_FILE, DEFAULT_TLS_RELOAD_INTERVAL,
    DEFAULT_UPSTREAM_CONNECT_TIMEOUT, DEFAULT_UPSTREAM_IDLE_TIMEOUT,
    DEFAULT_UPSTREAM_MAX_IDLE_PER_CLUSTER, DEFAULT_UPSTREAM_MAX_REQUESTS_PER_CLUSTER, MAX_NAME_LEN,
    MAX_PROBE_FAILURE_THRESHOLD,
};
