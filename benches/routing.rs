//! Micro-benchmarks of the request-path routing steps and of the table build.
//!
//! Run: `cargo bench --bench routing`. Paths look like `/team-17/model-1723/v1/predict` (query
//! already stripped); each iteration takes the next of 4,096 shuffled inputs, so the numbers
//! include the cache misses of a large table rather than one hot entry.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rayshift::routing::{
    key_hash, AppSpec, ClusterSpec, Member, Placement, PrefixMatcher, RoutingTable, ShardSpec,
    Split, TableSpec,
};

/// Inputs cycled through per benchmark; a power of two so the index wraps with a mask.
const INPUTS: usize = 4096;

/// App counts the per-request benchmarks run at.
const APP_COUNTS: [usize; 3] = [10, 1_000, 10_000];

fn app_name(i: usize) -> String {
    format!("team-{}-model-{i}", i / 100)
}

fn route_prefix(i: usize) -> String {
    format!("/team-{}/model-{i}", i / 100)
}

/// A spec of `apps` apps over `shards` shards of one cluster per weight, every cluster ready
/// and listing the apps placed on its shard.
fn spec(apps: usize, shards: usize, weights: &[u32]) -> TableSpec {
    let shards: Vec<ShardSpec> = (0..shards)
        .map(|s| ShardSpec::new(format!("shard-{s}")))
        .collect();
    let placement = Placement::new(shards.iter().map(|s| (s.name.as_str(), s.weight)));
    let apps: Vec<AppSpec> = (0..apps)
        .map(|i| AppSpec {
            name: app_name(i),
            route_prefix: route_prefix(i),
            pinned_shard: None,
        })
        .collect();
    let mut served = vec![Vec::new(); shards.len()];
    for app in &apps {
        served[placement.place(&app.name).expect("shards declared") as usize]
            .push(app.name.clone());
    }
    let clusters = served
        .iter()
        .enumerate()
        .flat_map(|(shard, names)| {
            weights
                .iter()
                .enumerate()
                .map(move |(k, &weight)| ClusterSpec {
                    name: format!("shard-{shard}-rev-{k}"),
                    shard: shard as u32,
                    weight,
                    revision: format!("v{k}"),
                    ready: true,
                    draining: false,
                    apps: names.clone(),
                })
        })
        .collect();
    TableSpec {
        shards,
        clusters,
        apps,
    }
}

/// Request paths hitting random apps of `apps`, with a sub-path.
fn paths(apps: usize, rng: &mut fastrand::Rng) -> Vec<String> {
    (0..INPUTS)
        .map(|_| format!("{}/v1/predict", route_prefix(rng.usize(..apps))))
        .collect()
}

fn randoms(rng: &mut fastrand::Rng) -> Vec<u64> {
    (0..INPUTS).map(|_| rng.u64(..)).collect()
}

/// Runs `f` on the next input each iteration.
fn cycle<'a, T, R>(inputs: &'a [T], mut f: impl FnMut(&T) -> R + 'a) -> impl FnMut() -> R + 'a {
    let mut i = 0;
    move || {
        i = (i + 1) & (INPUTS - 1);
        f(black_box(&inputs[i]))
    }
}

fn prefix_match(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefix_match");
    let mut rng = fastrand::Rng::with_seed(1);
    for apps in APP_COUNTS {
        let prefixes: Vec<String> = (0..apps).map(route_prefix).collect();
        let matcher = PrefixMatcher::new(
            prefixes
                .iter()
                .enumerate()
                .map(|(i, p)| (p.as_str(), i as u32)),
        );
        let paths = paths(apps, &mut rng);
        group.bench_function(BenchmarkId::from_parameter(apps), |b| {
            b.iter(cycle(&paths, |p| matcher.lookup(p)))
        });
    }
    let prefixes: Vec<String> = (0..10_000).map(route_prefix).collect();
    let matcher = PrefixMatcher::new(
        prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i as u32)),
    );
    let misses: Vec<String> = (0..INPUTS)
        .map(|i| format!("/team-{i}/unknown/v1/predict"))
        .collect();
    group.bench_function("miss/10000", |b| {
        b.iter(cycle(&misses, |p| matcher.lookup(p)))
    });
    group.finish();
}

fn shard_placement(c: &mut Criterion) {
    let mut group = c.benchmark_group("place");
    let names: Vec<String> = (0..INPUTS).map(app_name).collect();
    for shards in [10, 100] {
        let names_of_shards: Vec<String> = (0..shards).map(|s| format!("shard-{s}")).collect();
        let placement = Placement::new(names_of_shards.iter().map(|n| (n.as_str(), 1.0)));
        group.bench_function(BenchmarkId::new("shards", shards), |b| {
            b.iter(cycle(&names, |n| placement.place(n)))
        });
    }
    group.finish();
}

fn picks(c: &mut Criterion) {
    let mut rng = fastrand::Rng::with_seed(2);
    let xs = randoms(&mut rng);
    let shift = Split::from_weights([(0, 70), (1, 30)]);
    let five = Split::from_weights([(0, 20), (1, 20), (2, 20), (3, 20), (4, 20)]);
    let sessions: Vec<String> = (0..INPUTS)
        .map(|_| format!("{:032x}", rng.u128(..)))
        .collect();

    let mut group = c.benchmark_group("pick");
    group.bench_function("weighted/2", |b| b.iter(cycle(&xs, |&x| shift.pick(x))));
    group.bench_function("weighted/5", |b| b.iter(cycle(&xs, |&x| five.pick(x))));
    group.bench_function("sticky/2", |b| {
        b.iter(cycle(&sessions, |s| shift.pick_key(key_hash(s.as_bytes()))))
    });
    // Two clusters of one revision: the key picks between them by weighted rendezvous.
    let one_revision = Split::from_members([
        Member {
            cluster: 0,
            name: "blue-a",
            group: "v1",
            weight: 50,
            available: true,
            last_resort: false,
        },
        Member {
            cluster: 1,
            name: "blue-b",
            group: "v1",
            weight: 50,
            available: true,
            last_resort: false,
        },
    ]);
    group.bench_function("sticky/2_of_one_revision", |b| {
        b.iter(cycle(&sessions, |s| {
            one_revision.pick_key(key_hash(s.as_bytes()))
        }))
    });
    // Three of one revision and one of the next, one of the three unready: its keys' homes are
    // kept, and a key whose home it is takes a second pick among the other two.
    let names = ["blue-a", "blue-b", "blue-c", "green"];
    let one_out = Split::from_members(names.iter().enumerate().map(|(i, name)| Member {
        cluster: i as u32,
        name,
        group: if i < 3 { "v1" } else { "v2" },
        weight: 25,
        available: i != 1,
        last_resort: false,
    }));
    group.bench_function("sticky/4_one_unready", |b| {
        b.iter(cycle(&sessions, |s| {
            one_out.pick_key(key_hash(s.as_bytes()))
        }))
    });
    group.finish();
}

fn full_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("lookup_and_pick");
    let mut rng = fastrand::Rng::with_seed(3);
    for apps in APP_COUNTS {
        let shards = (apps / 100).clamp(1, 100);
        let table = RoutingTable::build(&spec(apps, shards, &[70, 30])).expect("valid spec");
        let inputs: Vec<(String, u64)> = paths(apps, &mut rng)
            .into_iter()
            .zip(randoms(&mut rng))
            .collect();
        group.bench_function(BenchmarkId::from_parameter(apps), |b| {
            b.iter(cycle(&inputs, |(path, x)| {
                table.lookup(path).and_then(|hit| hit.split.pick(*x))
            }))
        });
    }
    group.finish();
}

fn table_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("table_build");
    group.sample_size(20);
    let spec = spec(10_000, 100, &[10; 10]);
    group.bench_function("10000_apps_1000_clusters", |b| {
        b.iter_with_large_drop(|| RoutingTable::build(black_box(&spec)))
    });
    group.finish();
}

criterion_group!(
    benches,
    prefix_match,
    shard_placement,
    picks,
    full_lookup,
    table_build
);
criterion_main!(benches);
