//! Per-cluster outcome counters the request path updates and the shift analysis reads.
//!
//! Prometheus shows the same traffic, but the shift controller must not depend on a scrape: it takes a
//! [`StatsSnapshot`] at the start and end of each analysis window and compares them. Everything here is
//! a relaxed atomic so recording costs a few uncontended increments on the request path.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of latency buckets: log-linear, 8 sub-buckets per power of two of microseconds.
const BUCKETS: usize = 256;
/// Sub-bucket bits per octave (8 sub-buckets: at most 12.5% relative error on a quantile).
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;

/// Live counters of one cluster, shared by every routing-table snapshot that contains it.
#[derive(Debug)]
pub struct ClusterStats {
    /// Requests whose outcome is known (response headers received, or the attempt failed).
    requests: AtomicU64,
    /// Responses with a 5xx status plus attempts that failed without a response.
    errors: AtomicU64,
    /// Time to response headers, in log-linear microsecond buckets.
    latency: [AtomicU64; BUCKETS],
    /// Requests currently on this cluster (until the response body ends).
    in_flight: AtomicU64,
    /// Failures (5xx or failed attempts) since the last success, for passive health.
    consecutive_failures: AtomicU64,
}

impl Default for ClusterStats {
    fn default() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            in_flight: AtomicU64::new(0),
            consecutive_failures: AtomicU64::new(0),
        }
    }
}

impl ClusterStats {
    /// Records a response (its status decides whether it counts as an error) and its latency.
    pub fn record_response(&self, status: u16, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        } else if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        self.latency[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Records an attempt that got no response (connect failure, reset, timeout).
    pub fn record_failure(&self, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.latency[bucket_of(latency)].fetch_add(1, Ordering::Relaxed);
    }

    /// Marks one more request in flight, unless `limit` are in flight already: then `false` and
    /// nothing changes (a refused request never shows in the count, nor makes another one fail).
    pub fn try_enter(&self, limit: u64) -> bool {
        self.in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }

    /// Marks one request finished; returns the new count.
    pub fn leave(&self) -> u64 {
        self.in_flight.fetch_sub(1, Ordering::Relaxed) - 1
    }

    /// Failures in a row since the last success.
    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Starts counting failures in a row afresh (after an ejection).
    pub fn reset_consecutive_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Requests currently in flight on this cluster.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// A copy of the cumulative counters, for window arithmetic.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

/// Cumulative counters at one instant; subtract two to get a window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Requests with a known outcome.
    pub requests: u64,
    /// 5xx responses plus failed attempts.
    pub errors: u64,
    /// Latency histogram counts per bucket.
    pub latency: Vec<u64>,
}

impl StatsSnapshot {
    /// The counts that happened after `earlier` (saturating, so a reset never underflows).
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: self
                .latency
                .iter()
                .enumerate()
                .map(|(i, n)| n.saturating_sub(earlier.latency.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// Errors divided by requests (0 when there were none).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// The latency below which `q` (0..=1) of the requests fell, as the upper bound of its bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(Duration::from_micros(bucket_upper_micros(i)));
            }
        }
        None
    }
}

/// Bucket index of a latency: exact below 8 us, then 8 sub-buckets per power of two.
fn bucket_of(latency: Duration) -> usize {
    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= SUB_BITS
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    let idx = SUB as usize + (exp - SUB_BITS) as usize * SUB as usize + sub as usize;
    idx.min(BUCKETS - 1)
}

/// Exclusive upper bound, in microseconds, of bucket `idx`.
fn bucket_upper_micros(idx: usize) -> u64 {
    if idx < SUB as usize {
        return idx as u64 + 1;
    }
    let rel = idx - SUB as usize;
    let exp = (rel / SUB as usize) as u32 + SUB_BITS;
    let sub = (rel % SUB as usize) as u64;
    (SUB + sub + 1).saturating_mul(1 << (exp - SUB_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_bound_their_values() {
        for us in [
            0u64, 1, 7, 8, 9, 15, 16, 100, 999, 1_000, 123_456, 5_000_000, 60_000_000,
        ] {
            let idx = bucket_of(Duration::from_micros(us));
            let upper = bucket_upper_micros(idx);
            assert!(us < upper, "{us} us -> bucket {idx} with upper {upper}");
            if idx > 0 {
                assert!(
                    us >= bucket_upper_micros(idx - 1),
                    "{us} us below bucket {idx}"
                );
            }
            // Relative error of the upper bound stays within one sub-bucket (12.5%) past the exact range.
            if us >= 8 {
                assert!(
                    (upper - us) as f64 / us as f64 <= 0.125 + 1e-9,
                    "{us} -> {upper}"
                );
            }
        }
    }

    #[test]
    fn window_error_rate_and_p99() {
        let stats = ClusterStats::default();
        for _ in 0..90 {
            stats.record_response(200, Duration::from_millis(10));
        }
        let start = stats.snapshot();
        for _ in 0..98 {
            stats.record_response(200, Duration::from_millis(10));
        }
        stats.record_response(503, Duration::from_millis(400));
        stats.record_failure(Duration::from_millis(2));
        let window = stats.snapshot().since(&start);
        assert_eq!(window.requests, 100);
        assert_eq!(window.errors, 2);
        assert!((window.error_rate() - 0.02).abs() < 1e-12);
        let p99 = window.quantile(0.99).unwrap();
        assert!(
            p99 >= Duration::from_millis(10) && p99 < Duration::from_millis(12),
            "{p99:?}"
        );
        let max = window.quantile(1.0).unwrap();
        assert!(
            max >= Duration::from_millis(400) && max <= Duration::from_millis(450),
            "{max:?}"
        );
    }

    #[test]
    fn in_flight_counts_up_and_down() {
        let stats = ClusterStats::default();
        assert!(stats.try_enter(2));
        assert!(stats.try_enter(2));
        // At the limit: refused, and neither the count nor the outcome counters change.
        let before = stats.snapshot();
        assert!(!stats.try_enter(2));
        assert_eq!(stats.in_flight(), 2);
        assert_eq!(stats.snapshot().requests, before.requests);
        assert_eq!(stats.snapshot().errors, before.errors);
        assert_eq!(stats.consecutive_failures(), 0);
        assert_eq!(stats.leave(), 1);
        assert_eq!(stats.in_flight(), 1);
        assert!(stats.try_enter(2));
        assert_eq!(StatsSnapshot::default().quantile(0.99), None);
    }
}
