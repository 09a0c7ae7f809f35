//! Series of clusters that left the gateway.
//!
//! The Prometheus exporter keeps every series it ever saw until the process exits. With N+1
//! upgrades clusters come and go for good (a new RayCluster per revision), so `/metrics` would
//! grow with every upgrade and list clusters deleted weeks ago. A cluster's series stay on
//! `/metrics` for `admin.removed_series_ttl` after it leaves (so a scrape sees its last counts and
//! `rayshift_cluster_present` at 0), then they are left out of the exposition. A cluster that
//! comes back under the same name shows its series again, counters where they were.
//!
//! Presence is kept per shard and cluster (a cluster that moved shard hides only its series of
//! the shard it left); a series with a `cluster` label but no `shard` label is hidden once the
//! cluster is in no shard at all. Series of clusters the gateway never had (`cluster="none"`)
//! are never hidden.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Which clusters are present, and since when the others are gone.
#[derive(Debug, Default)]
pub struct Presence {
    /// Gateways (a process may run several) that have the cluster in the shard, by (shard, cluster).
    live: HashMap<(String, String), usize>,
    /// When each (shard, cluster) that is not live left.
    left: HashMap<(String, String), Instant>,
}

impl Presence {
    /// `cluster` joined `shard`.
    pub fn join(&mut self, shard: &str, cluster: &str) {
        let key = (shard.to_string(), cluster.to_string());
        self.left.remove(&key);
        *self.live.entry(key).or_default() += 1;
    }

    /// `cluster` left `shard` at `now`.
    pub fn leave(&mut self, shard: &str, cluster: &str, now: Instant) {
        let key = (shard.to_string(), cluster.to_string());
        match self.live.get_mut(&key) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                self.live.remove(&key);
                self.left.insert(key, now);
            }
            None => {}
        }
    }

    /// Whether a series labelled `shard` (if it has that label) and `cluster` is hidden at `now`.
    pub fn hidden(&self, shard: Option<&str>, cluster: &str, now: Instant, ttl: Duration) -> bool {
        let expired = |at: &Instant| now.saturating_duration_since(*at) >= ttl;
        match shard {
            Some(shard) => self
                .left
                .get(&(shard.to_string(), cluster.to_string()))
                .is_some_and(expired),
            None => {
                let mut left = self.left.iter().filter(|((_, c), _)| c == cluster);
                let mut any = false;
                let all_expired = left.all(|(_, at)| {
                    any = true;
                    expired(at)
                });
                any && all_expired && !self.live.keys().any(|(_, c)| c == cluster)
            }
        }
    }

    /// Whether anything is hidden at `now` (most of the time nothing is: no filtering then).
    fn hides_any(&self, now: Instant, ttl: Duration) -> bool {
        self.left
            .values()
            .any(|at| now.saturating_duration_since(*at) >= ttl)
    }

    /// `text` (Prometheus text exposition) without the series hidden at `now`.
    pub fn filter(&self, text: String, now: Instant, ttl: Duration) -> String {
        if !self.hides_any(now, ttl) {
            return text;
        }
        let mut out = String::with_capacity(text.len());
        for line in text.split_inclusive('\n') {
            let hide = !line.starts_with('#')
                && labels(line).is_some_and(|(shard, cluster)| {
                    cluster.is_some_and(|c| self.hidden(shard.as_deref(), &c, now, ttl))
                });
            if !hide {
                out.push_str(line);
            }
        }
        out
    }
}

/// The `shard` and `cluster` label values of one sample line (`None` when it has no labels or
/// they do not parse).
fn labels(line: &str) -> Option<(Option<String>, Option<String>)> {
    let open = line.find('{')?;
    if line[..open].contains(' ') {
        return None;
    }
    let mut rest = &line[open + 1..];
    let (mut shard, mut cluster) = (None, None);
    loop {
        rest = rest.trim_start_matches(',');
        if rest.starts_with('}') {
            return Some((shard, cluster));
        }
        let eq = rest.find("=\"")?;
        let name = &rest[..eq];
        rest = &rest[eq + 2..];
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        rest = &rest[end + 1..];
        match name {
            "shard" => shard = Some(value),
            "cluster" => cluster = Some(value),
            _ => {}
        }
    }
}

/// The process-wide presence (the exporter is process-wide too).
fn presence() -> MutexGuard<'static, Presence> {
    static PRESENCE: OnceLock<Mutex<Presence>> = OnceLock::new();
    PRESENCE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `cluster` joined `shard` in a gateway of this process.
pub fn cluster_joined(shard: &str, cluster: &str) {
    presence().join(shard, cluster);
}

/// `cluster` left `shard` in a gateway of this process.
pub fn cluster_left(shard: &str, cluster: &str) {
    presence().leave(shard, cluster, Instant::now());
}

/// `text` without the series of clusters that left more than `ttl` ago.
pub fn filter(text: String, ttl: Duration) -> String {
    presence().filter(text, Instant::now(), ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    const TEXT: &str = "# HELP rayshift_cluster_present 1 while ...\n\
        # TYPE rayshift_cluster_present gauge\n\
        rayshift_cluster_present{shard=\"s0\",cluster=\"blue\"} 0\n\
        rayshift_cluster_present{shard=\"s0\",cluster=\"green\"} 1\n\
        rayshift_cluster_present{shard=\"s1\",cluster=\"blue\"} 1\n\
        rayshift_requests_total{app=\"echo\",shard=\"s0\",cluster=\"none\",status=\"503\"} 4\n\
        rayshift_probes_total{cluster=\"blue\",result=\"ok\"} 12\n\
        rayshift_request_duration_seconds_bucket{shard=\"s0\",cluster=\"blue\",le=\"0.5\"} 3\n\
        rayshift_apps{shard=\"s0\"} 2\n\
        rayshift_routing_table_updates_total 9\n";

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn nothing_is_hidden_before_the_ttl() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "blue");
        p.leave("s0", "blue", t0);
        assert_eq!(p.filter(TEXT.into(), t0 + TTL / 2, TTL), TEXT);
    }

    #[test]
    fn a_cluster_that_moved_shard_hides_only_the_shard_it_left() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "blue");
        p.join("s0", "green");
        p.join("s1", "blue");
        p.leave("s0", "blue", t0);
        let out = p.filter(TEXT.into(), t0 + TTL, TTL);
        let expected: Vec<&str> = lines(TEXT)
            .into_iter()
            .filter(|l| !l.contains("shard=\"s0\",cluster=\"blue\""))
            .collect();
        assert_eq!(lines(&out), expected);
        // Still in s1: its series without a shard label stay.
        assert!(out.contains("rayshift_probes_total{cluster=\"blue\""));
    }

    #[test]
    fn a_cluster_gone_from_every_shard_hides_all_its_series() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "blue");
        p.join("s1", "blue");
        p.leave("s0", "blue", t0);
        p.leave("s1", "blue", t0 + TTL / 2);
        // The later departure counts for the series without a shard label.
        let early = p.filter(TEXT.into(), t0 + TTL, TTL);
        assert!(early.contains("rayshift_probes_total{cluster=\"blue\""));
        assert!(!early.contains("shard=\"s0\",cluster=\"blue\""));
        let out = p.filter(TEXT.into(), t0 + 2 * TTL, TTL);
        assert!(!out.contains("cluster=\"blue\""), "{out}");
        for kept in [
            "# TYPE rayshift_cluster_present gauge",
            "rayshift_cluster_present{shard=\"s0\",cluster=\"green\"} 1",
            "cluster=\"none\"",
            "rayshift_apps{shard=\"s0\"} 2",
            "rayshift_routing_table_updates_total 9",
        ] {
            assert!(out.contains(kept), "{kept} in {out}");
        }
    }

    #[test]
    fn a_cluster_that_comes_back_shows_again() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "blue");
        p.leave("s0", "blue", t0);
        p.join("s0", "blue");
        assert_eq!(p.filter(TEXT.into(), t0 + 2 * TTL, TTL), TEXT);
    }

    #[test]
    fn a_cluster_another_gateway_still_has_stays() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "blue");
        p.join("s0", "blue");
        p.leave("s0", "blue", t0);
        assert_eq!(p.filter(TEXT.into(), t0 + 2 * TTL, TTL), TEXT);
    }

    #[test]
    fn label_values_are_unescaped_and_other_labels_cannot_pose_as_cluster() {
        assert_eq!(
            labels("m{a=\"cluster=\\\"x\\\"\",cluster=\"b\\\\c\\n\",shard=\"s\"} 1\n"),
            Some((Some("s".into()), Some("b\\c\n".into())))
        );
        assert_eq!(labels("m 1\n"), None);
        assert_eq!(labels("m{xcluster=\"blue\"} 1\n"), Some((None, None)));
        assert_eq!(labels("m{cluster=\"unterminated} 1\n"), None);
    }
}
