//! rayshift: a zero-downtime gateway for Ray Serve.
//!
//! rayshift sits in front of several small RayClusters. For every request it finds the Serve
//! application (Serve's longest-route-prefix rule), the application's shard (weighted rendezvous
//! hashing of the application name), and a cluster of that shard by weight, then forwards the request
//! over a pooled keep-alive connection. Upgrading a shard means adding one new cluster and moving the
//! shard's weight to it; the old cluster drains and can be removed (an "N+1 upgrade").
//!
//! # Layout
//! - [`config`]: the YAML file model and its validation, with field-named errors.
//! - [`routing`]: pure routing logic (prefix match, shard placement, weighted split, the table).
//! - [`snapshot`] and [`cluster`]: the immutable snapshot the request path reads, and the per-cluster
//!   entries (upstream address, live counters) shared across snapshots.
//! - [`proxy`]: the client-facing server, forwarding, header hygiene, the upstream pool.
//! - [`discovery`]: where clusters and apps come from (static config, Kubernetes RayClusters,
//!   Serve probes).
//! - [`shift`]: N+1 upgrades: shift policy, the shift state machine, fleet rollouts.
//! - [`control`]: the single owner task that holds the desired state and publishes snapshots.
//! - [`state`]: the durable state file (written before a change takes effect).
//! - [`kube_state`]: state shared by replicas through a ConfigMap, and the leader Lease.
//! - [`admin`]: the admin HTTP API, `/metrics`, `/live`, `/ready`.
//! - [`client`]: a client of the admin API and the shift progress display (the CLI's verbs).
//! - [`stats`]: per-cluster outcome counters for shift analysis.
//! - [`telemetry`]: every metric name in one place, the Prometheus recorder, logging.
//! - [`tls`]: rustls (ring) for the listener, with certificate reload, and for `https://` clusters.
//! - [`gateway`]: starting and stopping all of the above.
//! - [`demo`]: the self-contained demo (two Serve look-alike clusters plus a gateway).

pub mod admin;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod discovery;
pub mod gateway;
pub mod kube_state;
pub mod proxy;
pub mod routing;
pub mod shift;
pub mod snapshot;
pub mod state;
pub mod stats;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use gateway::{Gateway, GatewayError};
