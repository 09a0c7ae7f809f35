//! `RoutingTable::build` and `lookup` on generated table specs.
//!
//! Names come from small vocabularies so duplicates and cross references happen often; weights
//! and ids are sometimes out of range. Asserts: build never panics and accepts a spec exactly when
//! a reference check of the documented rules does (with the same kind of error); in a built table
//! every app is placed on its pin or its rendezvous shard and reached at its own prefix; a lookup
//! agrees with a brute-force longest-prefix search, the app's route prefix matches the path, and
//! its split holds exactly the clusters of its shard that list it, those that are ready and not
//! draining as the ones requests go to.

#![no_main]

use std::mem::discriminant;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rayshift::routing::{
    prefix_matches, AppId, AppSpec, ClusterId, ClusterSpec, Member, Placement, RoutingTable,
    ShardSpec, Split, TableError, TableSpec,
};

const SHARD_NAMES: [&str; 5] = ["s0", "s1", "s2", "shard-3", ""];
const CLUSTER_NAMES: [&str; 5] = ["c0", "c1", "c2", "c3", "c4"];
const APP_NAMES: [&str; 7] = ["a", "b", "c", "d", "e", "", "ghost"];
const PIECES: [&str; 8] = ["/", "a", "b", "/a", "/b", "ab", "é", "?"];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok((spec, paths, xs)) = generate(&mut u) else {
        return;
    };
    let built = RoutingTable::build(&spec);
    let expected = reference_check(&spec);
    match (&built, &expected) {
        (Ok(_), Ok(())) => {}
        (Err(got), Err(want)) => assert_eq!(
            discriminant(got),
            discriminant(want),
            "got {got}, expected {want}, spec {spec:?}"
        ),
        (got, want) => panic!("build gave {got:?}, expected {want:?}, spec {spec:?}"),
    }
    let Ok(table) = built else {
        return;
    };

    let placement = Placement::new(spec.shards.iter().map(|s| (s.name.as_str(), s.weight)));
    assert_eq!(table.apps().len(), spec.apps.len());
    for (id, app) in spec.apps.iter().enumerate() {
        let route = table.app(id as AppId);
        assert_eq!(&*route.name, app.name.as_str());
        assert_eq!(&*route.route_prefix, app.route_prefix.as_str());
        let shard = app.pinned_shard.or_else(|| placement.place(&app.name));
        assert_eq!(Some(route.shard), shard, "app {app:?}");
        let hit = table.lookup(&app.route_prefix).expect("own prefix routes");
        assert_eq!(hit.app_id as usize, id, "app {app:?}");
        assert_eq!(
            *table.split_of(id as AppId),
            expected_split(&spec, id, route.shard)
        );
    }

    let prefixes: Vec<&str> = spec.apps.iter().map(|a| a.route_prefix.as_str()).collect();
    let extended: Vec<String> = prefixes
        .iter()
        .flat_map(|p| paths.iter().map(move |q| format!("{p}{q}")))
        .collect();
    for path in paths.iter().chain(&extended) {
        let hit = table.lookup(path);
        let want = prefixes
            .iter()
            .enumerate()
            .filter(|(_, p)| prefix_matches(p, path))
            .max_by_key(|(i, p)| (p.len(), std::cmp::Reverse(*i)))
            .map(|(i, _)| i as AppId);
        assert_eq!(hit.map(|h| h.app_id), want, "path {path:?}, spec {spec:?}");
        let Some(hit) = hit else { continue };
        assert!(prefix_matches(&hit.app.route_prefix, path), "path {path:?}");
        assert_eq!(hit.shard, hit.app.shard);
        assert!((hit.shard as usize) < spec.shards.len());
        assert_eq!(hit.split, table.split_of(hit.app_id));
        for &x in &xs {
            match hit.split.pick(x) {
                None => assert!(hit.split.is_empty()),
                Some(c) => {
                    let cluster = &spec.clusters[c as usize];
                    assert_eq!(cluster.shard, hit.shard);
                    assert!(cluster.ready && !cluster.draining);
                    assert!(cluster.apps.iter().any(|a| *a == *hit.app.name));
                    assert_eq!(table.cluster_name(c), cluster.name);
                }
            }
        }
    }
});

/// The documented rules, checked in the order `build` reports them.
fn reference_check(spec: &TableSpec) -> std::result::Result<(), TableError> {
    for (i, shard) in spec.shards.iter().enumerate() {
        if !(shard.weight.is_finite() && shard.weight > 0.0) {
            return Err(TableError::InvalidShardWeight {
                shard: shard.name.clone(),
                weight: shard.weight,
            });
        }
        if spec.shards[..i].iter().any(|s| s.name == shard.name) {
            return Err(TableError::DuplicateShard {
                name: shard.name.clone(),
            });
        }
    }
    for (i, cluster) in spec.clusters.iter().enumerate() {
        if cluster.shard as usize >= spec.shards.len() {
            return Err(TableError::UnknownShard {
                cluster: cluster.name.clone(),
                shard: cluster.shard,
                shards: spec.shards.len(),
            });
        }
        if spec.clusters[..i].iter().any(|c| c.name == cluster.name) {
            return Err(TableError::DuplicateCluster {
                name: cluster.name.clone(),
            });
        }
    }
    for (i, app) in spec.apps.iter().enumerate() {
        let before = &spec.apps[..i];
        if before.iter().any(|a| a.name == app.name) {
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
        if let Some(first) = before.iter().find(|a| a.route_prefix == app.route_prefix) {
            return Err(TableError::DuplicateRoutePrefix {
                prefix: app.route_prefix.clone(),
                first_app: first.name.clone(),
                second_app: app.name.clone(),
            });
        }
        match app.pinned_shard {
            Some(shard) if shard as usize >= spec.shards.len() => {
                return Err(TableError::UnknownPinnedShard {
                    app: app.name.clone(),
                    shard,
                    shards: spec.shards.len(),
                })
            }
            Some(_) => {}
            None if spec.shards.is_empty() => {
                return Err(TableError::NoShards {
                    app: app.name.clone(),
                })
            }
            None => {}
        }
    }
    Ok(())
}

/// The clusters of `shard` that list the app, in spec order, weighted, available when ready and
/// not draining, a last resort when ready and draining.
fn expected_split(spec: &TableSpec, app: usize, shard: u32) -> Split {
    let name = &spec.apps[app].name;
    Split::from_members(
        spec.clusters
            .iter()
            .enumerate()
            .filter(|(_, c)| c.shard == shard && c.apps.contains(name))
            .map(|(i, c)| Member {
                cluster: i as ClusterId,
                name: &c.name,
                group: &c.revision,
                weight: c.weight,
                available: c.ready && !c.draining,
                last_resort: c.ready && c.draining,
            }),
    )
}

type Generated = (TableSpec, Vec<String>, Vec<u64>);

fn generate(u: &mut Unstructured) -> Result<Generated> {
    let shards = (0..u.int_in_range(0..=4)?)
        .map(|_| {
            Ok(ShardSpec {
                name: u.choose(&SHARD_NAMES)?.to_string(),
                weight: match u.int_in_range(0..=15u8)? {
                    0 => 0.0,
                    1 => -1.0,
                    2 => f64::NAN,
                    3 => f64::INFINITY,
                    4 => f64::MIN_POSITIVE,
                    5 => 5e-324,
                    6 => f64::MAX,
                    7 => f64::from_bits(u.arbitrary()?),
                    8..=11 => 1.0,
                    n => f64::from(n) / 4.0,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let shard_count = shards.len() as u32;
    let clusters = (0..u.int_in_range(0..=5)?)
        .map(|_| {
            Ok(ClusterSpec {
                name: u.choose(&CLUSTER_NAMES)?.to_string(),
                shard: u.int_in_range(0..=shard_count)?,
                weight: if u.ratio(1, 8)? {
                    u.arbitrary()?
                } else {
                    u.int_in_range(0..=100)?
                },
                revision: u.choose(&["v1", "v2"])?.to_string(),
                ready: u.ratio(4, 5)?,
                draining: u.ratio(1, 6)?,
                apps: (0..u.int_in_range(0..=4)?)
                    .map(|_| Ok(u.choose(&APP_NAMES)?.to_string()))
                    .collect::<Result<_>>()?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let apps = (0..u.int_in_range(0..=6)?)
        .map(|_| {
            Ok(AppSpec {
                name: u.choose(&APP_NAMES)?.to_string(),
                route_prefix: path(u)?,
                pinned_shard: if u.ratio(1, 3)? {
                    Some(u.int_in_range(0..=shard_count)?)
                } else {
                    None
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let paths = (0..u.int_in_range(0..=6)?)
        .map(|_| path(u))
        .collect::<Result<Vec<_>>>()?;
    let xs = vec![0, u64::MAX, u.arbitrary()?, u.arbitrary()?];
    Ok((
        TableSpec {
            shards,
            clusters,
            apps,
        },
        paths,
        xs,
    ))
}

/// A path or prefix: mostly pieces of a small alphabet, sometimes arbitrary text.
fn path(u: &mut Unstructured) -> Result<String> {
    if u.ratio(1, 8)? {
        return u.arbitrary();
    }
    let mut s = String::new();
    if u.ratio(7, 8)? {
        s.push('/');
    }
    for _ in 0..u.int_in_range(0..=4)? {
        s.push_str(u.choose(&PIECES)?);
    }
    Ok(s)
}
