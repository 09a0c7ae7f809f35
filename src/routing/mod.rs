//! Request routing, pure: path -> app -> shard -> cluster, with no I/O and no async.
//!
//! The request path reads one immutable [`RoutingTable`] per request and goes through three steps:
//!
//! 1. **Route**: the longest route prefix matching the path names the app, by Ray Serve's own
//!    rule ([`prefix_matches`], [`PrefixMatcher`]).
//! 2. **Shard**: the app's shard is its pinned shard, else the winner of weighted rendezvous
//!    hashing of its name over the shards ([`Placement`]). Computed when the table is built.
//! 3. **Split**: the shard's clusters serving the app, with their weights; [`Split::pick`] maps a
//!    random value onto the cumulative weight intervals of those that can take requests (ready,
//!    not draining), and [`Split::pick_key`] a split key's [`key_hash`] onto a revision's
//!    interval, then onto one of its clusters by weighted rendezvous hashing (the key's home; when
//!    the home cannot take requests, another cluster of its revision).
//!
//! Every hash is xxh3 with [`FIXED_SEED`], so every gateway replica on every build and machine
//! agrees on where an app and a sticky key go.
//!
//! Ids ([`AppId`], [`ShardId`], [`ClusterId`]) index the vectors of the [`TableSpec`] the table was
//! built from.

mod hash;
mod placement;
mod prefix;
mod split;
mod table;

pub use hash::{key_hash, FIXED_SEED};
pub use placement::Placement;
pub use prefix::{prefix_matches, PrefixMatcher};
pub use split::{Member, Split};
pub use table::{
    AppRoute, AppSpec, ClusterSpec, Lookup, RoutingTable, ShardSpec, TableError, TableSpec,
};

/// An application: an index into [`TableSpec::apps`] and [`RoutingTable::apps`].
pub type AppId = u32;

/// A shard: an index into [`TableSpec::shards`].
pub type ShardId = u32;

/// A cluster: an index into [`TableSpec::clusters`].
pub type ClusterId = u32;
