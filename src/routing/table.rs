//! The routing snapshot the request path reads: path -> app -> shard -> split.

use std::sync::Arc;

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use super::{AppId, ClusterId, Member, Placement, PrefixMatcher, ShardId, Split};

/// Everything a [`RoutingTable`] is built from; ids index these vectors.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableSpec {
    /// The shards apps are placed on, by [`ShardId`].
    pub shards: Vec<ShardSpec>,
    /// The backend Ray clusters, by [`ClusterId`].
    pub clusters: Vec<ClusterSpec>,
    /// The Serve applications, by [`AppId`].
    pub apps: Vec<AppSpec>,
}

/// A shard: a named group of clusters serving the same apps.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSpec {
    /// The shard's name; placement hashes it, so renaming a shard re-places apps.
    pub name: String,
    /// The shard's share of apps relative to the others; a finite number above 0.
    pub weight: f64,
}

/// A Ray cluster behind the gateway, as the control plane currently sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name (unique).
    pub name: String,
    /// The shard it belongs to.
    pub shard: ShardId,
    /// Its share of its shard's traffic, 0 to 100; a shard's weights normally add up to 100.
    pub weight: u32,
    /// Its revision. A shard's clusters of one revision, next to each other in spec order (older
    /// revisions first), share one interval of a sticky split (see [`Split`]).
    pub revision: String,
    /// Whether its Serve proxy is healthy.
    pub ready: bool,
    /// Whether it is being drained: it gets no new requests while another cluster of the app's
    /// split can take them (when none can and it is ready, it takes them rather than the app
    /// failing).
    pub draining: bool,
    /// The app names its `/-/routes` lists.
    pub apps: Vec<String>,
}

/// A Serve application.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppSpec {
    /// The application's name (unique).
    pub name: String,
    /// Its route prefix; starts with `/`.
    pub route_prefix: String,
    /// The shard it is pinned to, overriding placement by hash.
    pub pinned_shard: Option<ShardId>,
}

/// Why a [`TableSpec`] cannot become a [`RoutingTable`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TableError {
    /// Two shards share a name.
    #[error("shard `{name}` is declared twice")]
    DuplicateShard {
        /// The shard name.
        name: String,
    },
    /// A shard weight is zero, negative, infinite or NaN.
    #[error("shard `{shard}` has weight {weight}; a shard weight must be a finite number above 0")]
    InvalidShardWeight {
        /// The shard name.
        shard: String,
        /// The weight given.
        weight: f64,
    },
    /// Two clusters share a name.
    #[error("cluster `{name}` is declared twice")]
    DuplicateCluster {
        /// The cluster name.
        name: String,
    },
    /// A cluster belongs to a shard id that is not declared.
    #[error("cluster `{cluster}` belongs to shard {shard}, but only {shards} shards are declared")]
    UnknownShard {
        /// The cluster name.
        cluster: String,
        /// The shard id it names.
        shard: ShardId,
        /// How many shards are declared.
        shards: usize,
    },
    /// Two apps share a name.
    #[error("app `{name}` is declared twice")]
    DuplicateApp {
        /// The app name.
        name: String,
    },
    /// A route prefix does not start with `/` (Serve rejects those too).
    #[error("app `{app}` has route prefix `{prefix}`; a route prefix must start with `/`")]
    InvalidRoutePrefix {
        /// The app name.
        app: String,
        /// The prefix given.
        prefix: String,
    },
    /// Two apps share a route prefix.
    #[error("route prefix `{prefix}` is used by both app `{first_app}` and app `{second_app}`")]
    DuplicateRoutePrefix {
        /// The prefix.
        prefix: String,
        /// The app declared first with it.
        first_app: String,
        /// The app declared second with it.
        second_app: String,
    },
    /// An app is pinned to a shard id that is not declared.
    #[error("app `{app}` is pinned to shard {shard}, but only {shards} shards are declared")]
    UnknownPinnedShard {
        /// The app name.
        app: String,
        /// The shard id it is pinned to.
        shard: ShardId,
        /// How many shards are declared.
        shards: usize,
    },
    /// An app needs a shard but none is declared.
    #[error("app `{app}` needs a shard, but no shard is declared")]
    NoShards {
        /// The app name.
        app: String,
    },
}

/// One app as the request path sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppRoute {
    /// The app's name.
    pub name: Arc<str>,
    /// The app's route prefix.
    pub route_prefix: Arc<str>,
    /// The shard serving it.
    pub shard: ShardId,
    /// Index of its split in [`RoutingTable::splits`]; apps with the same clusters, each as able to
    /// take requests, share one.
    split: u32,
}

/// What a path routes to.
#[derive(Debug, Clone, Copy)]
pub struct Lookup<'a> {
    /// The app whose route prefix matched.
    pub app_id: AppId,
    /// That app.
    pub app: &'a AppRoute,
    /// The shard serving it.
    pub shard: ShardId,
    /// The clusters to pick from; empty when none is eligible (answer 503).
    pub split: &'a Split,
}

/// A cluster of an app's split while the table is built, whether it can take requests, and
/// whether it can as a last resort (ready but draining).
type SplitMember = (ClusterId, bool, bool);

/// An immutable routing snapshot: route prefixes, shard placement and per-app splits.
#[derive(Debug, Clone, Default)]
pub struct RoutingTable {
    /// Apps, by [`AppId`].
    apps: Vec<AppRoute>,
    /// Route prefix -> [`AppId`].
    matcher: PrefixMatcher,
    /// Distinct splits; [`AppRoute::split`] indexes them.
    splits: Vec<Split>,
    /// The shards, for placing apps and naming shards.
    placement: Placement,
    /// Cluster names, by [`ClusterId`].
    cluster_names: Vec<Arc<str>>,
}

// === impl RoutingTable ===

impl RoutingTable {
    /// Builds the snapshot for `spec`, checking names, ids and route prefixes.
    ///
    /// An app's split holds the clusters of its shard that list the app, in spec order, with
    /// their weights and revisions; requests go to those that are ready and not draining (when
    /// there are none, to those that are ready and draining), the others keep their sticky keys'
    /// homes (see [`Split::from_members`]).
    pub fn build(spec: &TableSpec) -> Result<RoutingTable, TableError> {
        let placement = shards(&spec.shards)?;
        let cluster_names = clusters(&spec.clusters, spec.shards.len())?;

        let mut app_ids: HashMap<&str, AppId> = HashMap::with_capacity(spec.apps.len());
        let mut matcher = PrefixMatcher::new([]);
        let mut apps = Vec::with_capacity(spec.apps.len());
        for (id, app) in spec.apps.iter().enumerate() {
            // Ids are u32 by design: four billion apps would not fit in memory anyway.
            let id = id as AppId;
            if app_ids.insert(&app.name, id).is_some() {
                return Err(TableError::DuplicateApp {
                    name: app.name.clone(),
                });
            }
            if !app.route_prefix.starts_with('/') {
                return Err(TableError::InvalidRoutePrefix {
                    app: app.name.clone(),
                    prefix: app.route_prefix.clone(),
                });
            }
            if let Some(first) = matcher.insert(&app.route_prefix, id) {
                return Err(TableError::DuplicateRoutePrefix {
                    prefix: app.route_prefix.clone(),
                    first_app: spec.apps[first as usize].name.clone(),
                    second_app: app.name.clone(),
                });
            }
            let shard = match app.pinned_shard {
                Some(shard) if (shard as usize) < spec.shards.len() => shard,
                Some(shard) => {
                    return Err(TableError::UnknownPinnedShard {
                        app: app.name.clone(),
                        shard,
                        shards: spec.shards.len(),
                    })
                }
                None => placement
                    .place(&app.name)
                    .ok_or_else(|| TableError::NoShards {
                        app: app.name.clone(),
                    })?,
            };
            apps.push(AppRoute {
                name: app.name.as_str().into(),
                route_prefix: app.route_prefix.as_str().into(),
                shard,
                split: 0,
            });
        }

        // Each app's clusters, in spec order since clusters are visited in order, and whether
        // each can take requests.
        let mut members: Vec<Vec<SplitMember>> = vec![Vec::new(); apps.len()];
        for (cluster_id, cluster) in spec.clusters.iter().enumerate() {
            let cluster_id = cluster_id as ClusterId;
            let available = cluster.ready && !cluster.draining;
            let last_resort = cluster.ready && cluster.draining;
            for name in &cluster.apps {
                let Some(&app) = app_ids.get(name.as_str()) else {
                    continue; // served but not declared: nothing routes to it
                };
                let list = &mut members[app as usize];
                // `last` catches an app listed twice by the same cluster.
                if apps[app as usize].shard == cluster.shard
                    && list.last().map(|&(c, _, _)| c) != Some(cluster_id)
                {
                    list.push((cluster_id, available, last_resort));
                }
            }
        }

        // Apps of a shard with the same clusters share a split.
        let mut split_ids: HashMap<(ShardId, &[SplitMember]), u32> = HashMap::new();
        let mut splits = Vec::new();
        for (app, clusters) in apps.iter_mut().zip(&members) {
            app.split = *split_ids.entry((app.shard, clusters)).or_insert_with(|| {
                let members = clusters.iter().map(|&(c, available, last_resort)| {
                    let cluster = &spec.clusters[c as usize];
                    Member {
                        cluster: c,
                        name: &cluster.name,
                        group: &cluster.revision,
                        weight: cluster.weight,
                        available,
                        last_resort,
                    }
                });
                splits.push(Split::from_members(members));
                (splits.len() - 1) as u32
            });
        }

        Ok(RoutingTable {
            apps,
            matcher,
            splits,
            placement,
            cluster_names,
        })
    }

    /// A table with no app: every lookup misses.
    pub fn empty() -> RoutingTable {
        RoutingTable::default()
    }

    /// Routes `path` (without its query); `None` when no route prefix matches (answer 404).
    #[inline]
    pub fn lookup(&self, path: &str) -> Option<Lookup<'_>> {
        let app_id = self.matcher.lookup(path)?;
        let app = &self.apps[app_id as usize];
        Some(Lookup {
            app_id,
            app,
            shard: app.shard,
            split: &self.splits[app.split as usize],
        })
    }

    /// All apps, by [`AppId`].
    pub fn apps(&self) -> &[AppRoute] {
        &self.apps
    }

    /// App `id`. Panics if `id` is not an app of this table.
    pub fn app(&self, id: AppId) -> &AppRoute {
        &self.apps[id as usize]
    }

    /// The split of app `app`. Panics if `app` is not an app of this table.
    pub fn split_of(&self, app: AppId) -> &Split {
        &self.splits[self.apps[app as usize].split as usize]
    }

    /// The distinct splits; apps with the same shard and clusters (each as able to take requests)
    /// share one.
    pub fn splits(&self) -> &[Split] {
        &self.splits
    }

    /// The shard placement the apps were placed with.
    pub fn placement(&self) -> &Placement {
        &self.placement
    }

    /// The name of shard `id`. Panics if `id` is not a declared shard.
    pub fn shard_name(&self, id: ShardId) -> &str {
        self.placement.name(id)
    }

    /// The name of cluster `id`. Panics if `id` is not a declared cluster.
    pub fn cluster_name(&self, id: ClusterId) -> &str {
        &self.cluster_names[id as usize]
    }
}

/// Checks the shards and builds their placement.
fn shards(shards: &[ShardSpec]) -> Result<Placement, TableError> {
    let mut names = HashSet::with_capacity(shards.len());
    for shard in shards {
        if !(shard.weight.is_finite() && shard.weight > 0.0) {
            return Err(TableError::InvalidShardWeight {
                shard: shard.name.clone(),
                weight: shard.weight,
            });
        }
        if !names.insert(shard.name.as_str()) {
            return Err(TableError::DuplicateShard {
                name: shard.name.clone(),
            });
        }
    }
    Ok(Placement::new(
        shards.iter().map(|s| (s.name.as_str(), s.weight)),
    ))
}

/// Checks the clusters and returns their names.
fn clusters(clusters: &[ClusterSpec], shards: usize) -> Result<Vec<Arc<str>>, TableError> {
    let mut names = HashSet::with_capacity(clusters.len());
    for cluster in clusters {
        if cluster.shard as usize >= shards {
            return Err(TableError::UnknownShard {
                cluster: cluster.name.clone(),
                shard: cluster.shard,
                shards,
            });
        }
        if !names.insert(cluster.name.as_str()) {
            return Err(TableError::DuplicateCluster {
                name: cluster.name.clone(),
            });
        }
    }
    Ok(clusters.iter().map(|c| c.name.as_str().into()).collect())
}

// === impl ShardSpec ===

impl ShardSpec {
    /// A shard with the default weight, 1.0.
    pub fn new(name: impl Into<String>) -> Self {
        ShardSpec {
            name: name.into(),
            weight: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(name: &str, prefix: &str) -> AppSpec {
        AppSpec {
            name: name.into(),
            route_prefix: prefix.into(),
            pinned_shard: None,
        }
    }

    fn pinned(name: &str, prefix: &str, shard: ShardId) -> AppSpec {
        AppSpec {
            pinned_shard: Some(shard),
            ..app(name, prefix)
        }
    }

    fn cluster(name: &str, shard: ShardId, weight: u32, apps: &[&str]) -> ClusterSpec {
        ClusterSpec {
            name: name.into(),
            shard,
            weight,
            revision: "v1".into(),
            ready: true,
            draining: false,
            apps: apps.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn split(table: &RoutingTable, app: AppId) -> Vec<(ClusterId, u32)> {
        table.split_of(app).entries().collect()
    }

    /// One shard, apps `a` (at `/a`) and `b` (at `/b`), clusters from `clusters`.
    fn one_shard(clusters: Vec<ClusterSpec>) -> TableSpec {
        TableSpec {
            shards: vec![ShardSpec::new("s")],
            clusters,
            apps: vec![app("a", "/a"), app("b", "/b")],
        }
    }

    fn build(spec: &TableSpec) -> RoutingTable {
        RoutingTable::build(spec).expect("valid spec")
    }

    /// In a shard of one revision, a cluster that goes unready (or stops serving an app) takes
    /// only its own sticky keys with it: keys of the others stay on their clusters.
    #[test]
    fn an_unready_cluster_of_a_revision_moves_only_its_own_keys() {
        let clusters = || {
            vec![
                cluster("c0", 0, 40, &["a", "b"]),
                cluster("c1", 0, 30, &["a", "b"]),
                cluster("c2", 0, 30, &["a", "b"]),
            ]
        };
        let before = build(&one_shard(clusters()));
        let mut spec = one_shard(clusters());
        // The first: with intervals per cluster, the others' would slide over each other.
        spec.clusters[0].ready = false;
        // c2 does not serve b.
        spec.clusters[2].apps = vec!["a".into()];
        let after = build(&spec);
        assert_eq!(split(&after, 0), [(1, 30), (2, 30)]);
        let (mut moved, mut kept) = (0, 0);
        for i in 0..2000u64 {
            let key = crate::routing::key_hash(&i.to_le_bytes());
            let (was, now) = (
                before.split_of(0).pick_key(key),
                after.split_of(0).pick_key(key),
            );
            if was == Some(0) {
                assert_ne!(now, Some(0));
                moved += 1;
            } else {
                assert_eq!(was, now, "key {key:#x} of a ready cluster moved");
                kept += 1;
            }
            assert_eq!(after.split_of(1).pick_key(key), Some(1), "only c1 serves b");
        }
        assert!(moved > 600 && kept > 1000, "{moved} moved, {kept} kept");
    }

    /// While two revisions share a shard (mid-shift), a cluster that goes unready, of either
    /// revision, takes only its own sticky keys with it, to the clusters of its revision that can
    /// take requests by weight, else to the other revision; no key of the other clusters moves,
    /// and its own come back with it.
    #[test]
    fn an_unready_cluster_moves_only_its_own_keys_while_two_revisions_share_a_shard() {
        let clusters = || {
            let mut clusters = vec![
                cluster("old-a", 0, 35, &["a"]),
                cluster("old-b", 0, 35, &["a"]),
                cluster("new", 0, 30, &["a"]),
            ];
            clusters[2].revision = "v2".into();
            clusters
        };
        let before = build(&one_shard(clusters()));
        let keys: Vec<u64> = (0..6000u64)
            .map(|i| crate::routing::key_hash(&i.to_le_bytes()))
            .collect();
        // Where the leaving cluster's keys go: old-a's to old-b, old-b's to old-a, new's over
        // both by weight.
        let to: [[f64; 3]; 3] = [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]];
        for leaving in 0..3u32 {
            let mut spec = one_shard(clusters());
            spec.clusters[leaving as usize].ready = false;
            let after = build(&spec);
            let mut went = [0usize; 3];
            for &key in &keys {
                let (was, now) = (
                    before.split_of(0).pick_key(key).unwrap(),
                    after.split_of(0).pick_key(key).unwrap(),
                );
                assert_ne!(now, leaving);
                if was == leaving {
                    went[now as usize] += 1;
                } else {
                    assert_eq!(was, now, "key {key:#x} of a ready cluster moved");
                }
            }
            let moved: usize = went.iter().sum();
            for (c, want) in to[leaving as usize].iter().enumerate() {
                let share = went[c] as f64 / moved as f64;
                assert!((share - want).abs() < 0.05, "without {leaving}: {went:?}");
            }
            assert!(moved > 1500, "without {leaving}: {moved} moved");
        }
    }

    /// Clusters of one revision share one interval of a sticky split; other revisions keep their
    /// own, in order.
    #[test]
    fn a_revisions_clusters_share_one_sticky_interval() {
        let mut clusters = vec![
            cluster("old", 0, 50, &["a"]),
            cluster("new-1", 0, 25, &["a"]),
            cluster("new-2", 0, 25, &["a"]),
        ];
        clusters[1].revision = "v2".into();
        clusters[2].revision = "v2".into();
        let table = build(&one_shard(clusters));
        let split = table.split_of(0);
        let step = u64::MAX / 4000 + 1;
        let mut counts = [0usize; 3];
        for i in 0..4000u64 {
            let key = i * step;
            let picked = split.pick_key(key).unwrap();
            // The first half of the key space is v1's, the second v2's.
            assert_eq!(picked == 0, i < 2000, "key {i}");
            counts[picked as usize] += 1;
        }
        assert_eq!(counts[0], 2000);
        assert!(counts[1].abs_diff(1000) < 120, "{counts:?}");
    }

    #[test]
    fn empty_table_misses() {
        let table = RoutingTable::empty();
        assert!(table.lookup("/").is_none());
        assert!(table.apps().is_empty());
        let table = build(&TableSpec::default());
        assert!(table.lookup("/a").is_none());
    }

    #[test]
    fn lookup_returns_app_shard_and_split() {
        let spec = TableSpec {
            shards: vec![ShardSpec::new("s0"), ShardSpec::new("s1")],
            clusters: vec![
                cluster("c0", 0, 100, &["root", "a"]),
                cluster("c1", 1, 100, &["ab"]),
            ],
            apps: vec![
                pinned("root", "/", 0),
                pinned("a", "/a", 0),
                pinned("ab", "/a/b", 1),
            ],
        };
        let table = build(&spec);
        let hit = table.lookup("/a/b/c").expect("matches /a/b");
        assert_eq!((hit.app_id, &*hit.app.name, hit.shard), (2, "ab", 1));
        assert_eq!(hit.split.pick(0), Some(1));
        assert_eq!(table.cluster_name(1), "c1");
        assert_eq!(table.shard_name(hit.shard), "s1");
        let hit = table.lookup("/a/x").expect("matches /a");
        assert_eq!((hit.app_id, &*hit.app.route_prefix), (1, "/a"));
        assert_eq!(hit.split.pick(u64::MAX), Some(0));
        assert_eq!(table.lookup("/zzz").map(|l| l.app_id), Some(0));
        assert_eq!(table.app(1).name.as_ref(), "a");
    }

    #[test]
    fn no_match_is_none() {
        let table = build(&one_shard(vec![]));
        assert!(table.lookup("/c").is_none());
        assert!(table.lookup("/ab").is_none());
        assert!(table.lookup("").is_none());
    }

    #[test]
    fn ineligible_clusters_are_excluded() {
        let spec = one_shard(vec![
            cluster("ready", 0, 10, &["a", "b"]),
            ClusterSpec {
                ready: false,
                ..cluster("unready", 0, 20, &["a", "b"])
            },
            ClusterSpec {
                draining: true,
                ..cluster("draining", 0, 30, &["a", "b"])
            },
            cluster("only-b", 0, 40, &["b"]),
        ]);
        let table = build(&spec);
        assert_eq!(split(&table, 0), [(0, 10)]);
        assert_eq!(split(&table, 1), [(0, 10), (3, 40)]);
    }

    #[test]
    fn unready_share_goes_to_ready_zero_weight_clusters() {
        // Mid-shift the new cluster holds all the weight, then goes unready: the old one,
        // still serving at weight 0, takes everything rather than the app failing.
        let spec = one_shard(vec![
            cluster("old", 0, 0, &["a"]),
            ClusterSpec {
                ready: false,
                ..cluster("new", 0, 100, &["a"])
            },
        ]);
        assert_eq!(split(&build(&spec), 0), [(0, 1)]);
    }

    #[test]
    fn no_eligible_cluster_gives_an_empty_split() {
        let spec = one_shard(vec![ClusterSpec {
            draining: true,
            ready: false,
            ..cluster("c", 0, 100, &["a"])
        }]);
        let table = build(&spec);
        let hit = table.lookup("/a").expect("app exists");
        assert!(hit.split.is_empty());
        assert!(!hit.split.is_last_resort());
        assert_eq!(hit.split.pick(7), None);
    }

    #[test]
    fn draining_clusters_serve_when_no_other_can() {
        // After a promotion the old clusters drain at weight 0; the target, holding all the
        // weight, goes unready: the old ones, still up, take the app's requests (sticky keys
        // too) rather than the app failing, and only the ready one of them.
        let spec = one_shard(vec![
            ClusterSpec {
                draining: true,
                ..cluster("old-1", 0, 0, &["a"])
            },
            ClusterSpec {
                draining: true,
                ready: false,
                ..cluster("old-2", 0, 0, &["a"])
            },
            ClusterSpec {
                ready: false,
                ..cluster("new", 0, 100, &["a"])
            },
        ]);
        let table = build(&spec);
        let hit = table.lookup("/a").expect("app exists");
        assert!(hit.split.is_last_resort());
        assert_eq!(split(&table, 0), [(0, 1)]);
        assert_eq!(
            hit.split.pick_key(crate::routing::key_hash(b"session")),
            Some(0)
        );

        // The target ready again: it takes everything back, the draining ones nothing.
        let mut spec = spec;
        spec.clusters[2].ready = true;
        let table = build(&spec);
        assert!(!table.lookup("/a").unwrap().split.is_last_resort());
        assert_eq!(split(&table, 0), [(2, 100)]);

        // Another cluster that can take requests, even at weight 0, comes before draining ones.
        let spec = one_shard(vec![
            ClusterSpec {
                draining: true,
                ..cluster("old", 0, 0, &["a"])
            },
            cluster("spare", 0, 0, &["a"]),
            ClusterSpec {
                ready: false,
                ..cluster("new", 0, 100, &["a"])
            },
        ]);
        assert_eq!(split(&build(&spec), 0), [(1, 1)]);
    }

    #[test]
    fn clusters_of_other_shards_are_ignored() {
        let spec = TableSpec {
            shards: vec![ShardSpec::new("s0"), ShardSpec::new("s1")],
            clusters: vec![cluster("c0", 0, 100, &["a"]), cluster("c1", 1, 100, &["a"])],
            apps: vec![pinned("a", "/a", 1)],
        };
        assert_eq!(split(&build(&spec), 0), [(1, 100)]);
    }

    #[test]
    fn apps_listed_twice_or_undeclared_are_harmless() {
        let spec = one_shard(vec![cluster("c", 0, 100, &["a", "ghost", "a"])]);
        let table = build(&spec);
        assert_eq!(split(&table, 0), [(0, 100)]);
        assert!(split(&table, 1).is_empty());
    }

    #[test]
    fn splits_are_deduplicated() {
        let spec = TableSpec {
            shards: vec![ShardSpec::new("s0"), ShardSpec::new("s1")],
            clusters: vec![
                cluster("c0", 0, 70, &["a", "b", "c"]),
                cluster("c1", 0, 30, &["a", "b"]),
                cluster("c2", 1, 100, &["d"]),
            ],
            apps: vec![
                pinned("a", "/a", 0),
                pinned("b", "/b", 0),
                pinned("c", "/c", 0),
                pinned("d", "/d", 1),
                pinned("e", "/e", 0),
                pinned("f", "/f", 1),
                pinned("g", "/g", 0),
            ],
        };
        let table = build(&spec);
        assert!(std::ptr::eq(table.split_of(0), table.split_of(1)));
        assert!(!std::ptr::eq(table.split_of(0), table.split_of(2)));
        // Empty splits are per shard.
        assert!(std::ptr::eq(table.split_of(4), table.split_of(6)));
        assert!(!std::ptr::eq(table.split_of(4), table.split_of(5)));
        // {c0,c1}, {c0}, {c2}, empty of s0, empty of s1.
        assert_eq!(table.splits().len(), 5);
        assert_eq!(split(&table, 1), [(0, 70), (1, 30)]);
    }

    #[test]
    fn pinned_shard_overrides_placement() {
        let shards: Vec<ShardSpec> = (0..8).map(|i| ShardSpec::new(format!("s{i}"))).collect();
        let placement = Placement::new(shards.iter().map(|s| (s.name.as_str(), s.weight)));
        let hashed = placement.place("app").expect("shards declared");
        let other = (hashed + 1) % 8;
        let spec = TableSpec {
            shards: shards.clone(),
            clusters: vec![],
            apps: vec![pinned("app", "/app", other), app("free", "/free")],
        };
        let table = build(&spec);
        assert_eq!(table.app(0).shard, other);
        assert_eq!(
            table.app(1).shard,
            placement.place("free").expect("shards declared")
        );
        assert_eq!(table.placement().len(), 8);
    }

    #[test]
    fn duplicate_route_prefix_is_rejected() {
        let mut spec = one_shard(vec![]);
        spec.apps.push(app("c", "/a"));
        assert_eq!(
            RoutingTable::build(&spec).unwrap_err(),
            TableError::DuplicateRoutePrefix {
                prefix: "/a".into(),
                first_app: "a".into(),
                second_app: "c".into(),
            }
        );
    }

    #[test]
    fn invalid_specs_are_rejected() {
        let err = |spec: TableSpec| RoutingTable::build(&spec).unwrap_err();
        let mut spec = one_shard(vec![]);
        spec.apps.push(app("a", "/other"));
        assert!(matches!(err(spec), TableError::DuplicateApp { name } if name == "a"));

        let mut spec = one_shard(vec![]);
        spec.apps.push(app("c", "c"));
        assert!(matches!(err(spec), TableError::InvalidRoutePrefix { .. }));

        let mut spec = one_shard(vec![]);
        spec.apps.push(pinned("c", "/c", 1));
        assert!(matches!(
            err(spec),
            TableError::UnknownPinnedShard {
                shard: 1,
                shards: 1,
                ..
            }
        ));

        let spec = one_shard(vec![cluster("c", 3, 100, &[])]);
        assert!(matches!(
            err(spec),
            TableError::UnknownShard { shard: 3, .. }
        ));

        let spec = one_shard(vec![cluster("c", 0, 50, &[]), cluster("c", 0, 50, &[])]);
        assert!(matches!(err(spec), TableError::DuplicateCluster { name } if name == "c"));

        let mut spec = one_shard(vec![]);
        spec.shards.push(ShardSpec::new("s"));
        assert!(matches!(err(spec), TableError::DuplicateShard { name } if name == "s"));

        for weight in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut spec = one_shard(vec![]);
            spec.shards[0].weight = weight;
            assert!(matches!(err(spec), TableError::InvalidShardWeight { .. }));
        }

        let mut spec = one_shard(vec![]);
        spec.shards.clear();
        assert!(matches!(err(spec), TableError::NoShards { app } if app == "a"));
    }

    #[test]
    fn error_messages_name_the_culprits() {
        let message = TableError::DuplicateRoutePrefix {
            prefix: "/a".into(),
            first_app: "x".into(),
            second_app: "y".into(),
        }
        .to_string();
        assert_eq!(
            message,
            "route prefix `/a` is used by both app `x` and app `y`"
        );
    }

    #[test]
    fn large_build_is_consistent() {
        let shards: Vec<ShardSpec> = (0..20)
            .map(|i| ShardSpec::new(format!("shard-{i}")))
            .collect();
        let placement = Placement::new(shards.iter().map(|s| (s.name.as_str(), s.weight)));
        let apps: Vec<AppSpec> = (0..2000)
            .map(|i| app(&format!("app-{i}"), &format!("/team-{}/model-{i}", i % 37)))
            .collect();
        let clusters: Vec<ClusterSpec> = (0..40u32)
            .map(|c| {
                let shard = c / 2;
                let served: Vec<&str> = apps
                    .iter()
                    .filter(|a| placement.place(&a.name) == Some(shard))
                    .map(|a| a.name.as_str())
                    .collect();
                cluster(
                    &format!("cluster-{c}"),
                    shard,
                    if c % 2 == 0 { 80 } else { 20 },
                    &served,
                )
            })
            .collect();
        let table = build(&TableSpec {
            shards,
            clusters,
            apps,
        });
        // Every shard has one {old 80, new 20} split.
        assert_eq!(table.splits().len(), 20);
        for (id, route) in table.apps().iter().enumerate() {
            let hit = table
                .lookup(&format!("{}/predict", route.route_prefix))
                .expect("routable");
            assert_eq!(hit.app_id, id as AppId);
            let clusters: Vec<_> = hit.split.entries().collect();
            assert_eq!(clusters, [(route.shard * 2, 80), (route.shard * 2 + 1, 20)]);
        }
    }
}
