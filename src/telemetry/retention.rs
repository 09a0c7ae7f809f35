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
//! cluster is in no shard at all. Series labelled `cluster="none"` (requests the gateway answered
//! itself) are never hidden, even after a cluster named `none` left.
//!
//! Only the exposition shrinks: the exporter keeps the values (a few KiB per cluster) until the
//! process exits.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
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

    /// `text` (Prometheus text exposition) without the series hidden at `now`.
    #[cfg(test)]
    fn filter(&self, text: String, now: Instant, ttl: Duration) -> String {
        self.hidden(now, ttl).filter(text)
    }

    /// What is hidden at `now`.
    fn hidden(&self, now: Instant, ttl: Duration) -> Hidden {
        let expired = |at: &Instant| now.saturating_duration_since(*at) >= ttl;
        let pairs: HashSet<(String, String)> = self
            .left
            .iter()
            .filter(|(_, at)| expired(at))
            .map(|(key, _)| key.clone())
            .collect();
        // Gone from every shard: not live anywhere, and every departure past the ttl.
        let live: HashSet<&str> = self.live.keys().map(|(_, c)| c.as_str()).collect();
        let mut clusters: HashSet<String> = pairs
            .iter()
            .map(|(_, c)| c.clone())
            .filter(|c| !live.contains(c.as_str()))
            .collect();
        for ((_, c), at) in &self.left {
            if !expired(at) {
                clusters.remove(c);
            }
        }
        Hidden { pairs, clusters }
    }
}

/// The series to leave out of one exposition.
#[derive(Debug, Default)]
struct Hidden {
    /// (shard, cluster) pairs that left more than the ttl ago.
    pairs: HashSet<(String, String)>,
    /// Clusters in no shard, the last of them to leave more than the ttl ago.
    clusters: HashSet<String>,
}

impl Hidden {
    /// `text` without the hidden series (as it is when nothing is hidden).
    fn filter(&self, text: String) -> String {
        if self.pairs.is_empty() {
            return text;
        }
        let mut out = String::with_capacity(text.len());
        let mut key = (String::new(), String::new());
        for line in text.split_inclusive('\n') {
            if !line.starts_with('#') && self.hides(line, &mut key) {
                continue;
            }
            out.push_str(line);
        }
        out
    }

    /// Whether the sample `line` is hidden; `key` is reused for the lookup.
    fn hides(&self, line: &str, key: &mut (String, String)) -> bool {
        let Some((shard, Some(cluster))) = labels(line) else {
            return false;
        };
        if cluster == "none" {
            return false;
        }
        match shard {
            Some(shard) => {
                key.0.clear();
                key.0.push_str(&shard);
                key.1.clear();
                key.1.push_str(&cluster);
                self.pairs.contains(key)
            }
            None => self.clusters.contains(cluster.as_ref()),
        }
    }
}

/// A label value, borrowed from the line unless it holds escapes.
type Value<'a> = Cow<'a, str>;

/// The `shard` and `cluster` label values of one sample line (`None` when it has no labels or
/// they do not parse).
fn labels(line: &str) -> Option<(Option<Value<'_>>, Option<Value<'_>>)> {
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
        let (value, len) = label_value(rest)?;
        rest = &rest[len + 1..];
        match name {
            "shard" => shard = Some(value),
            "cluster" => cluster = Some(value),
            _ => {}
        }
    }
}

/// The label value at the start of `s` (just after its opening quote), unescaped, and the length
/// of its escaped form (up to its closing quote).
fn label_value(s: &str) -> Option<(Value<'_>, usize)> {
    let end = s.find(['"', '\\'])?;
    if s.as_bytes()[end] == b'"' {
        return Some((Cow::Borrowed(&s[..end]), end));
    }
    let mut value = String::from(&s[..end]);
    let mut chars = s[end..].char_indices();
    loop {
        match chars.next()? {
            (i, '"') => return Some((Cow::Owned(value), end + i)),
            (_, '\\') => match chars.next()?.1 {
                'n' => value.push('\n'),
                c => value.push(c),
            },
            (_, c) => value.push(c),
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
    // Only the sets are made under the lock, which the control task takes as clusters come and go.
    let hidden = presence().hidden(Instant::now(), ttl);
    hidden.filter(text)
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

    /// The gateway's own answers (`cluster="none"`) stay even after a cluster named `none` left.
    #[test]
    fn the_gateways_own_series_stay() {
        let mut p = Presence::default();
        let t0 = Instant::now();
        p.join("s0", "none");
        p.leave("s0", "none", t0);
        assert_eq!(p.filter(TEXT.into(), t0 + 2 * TTL, TTL), TEXT);
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
        assert_eq!(
            labels("m{cluster=\"a\\\"b\"} 1\n"),
            Some((None, Some("a\"b".into())))
        );
        assert_eq!(labels("m 1\n"), None);
        assert_eq!(labels("m{xcluster=\"blue\"} 1\n"), Some((None, None)));
        assert_eq!(labels("m{cluster=\"unterminated} 1\n"), None);
    }
}
