//! Stable hashing shared by shard placement and sticky splits.
//!
//! Every gateway replica must compute the same shard for an app and the same cluster for a split
//! key, on any machine and after any rebuild. So hashing is xxh3 with a fixed seed, never a
//! randomly keyed hasher (std's SipHash `RandomState`, aHash, foldhash's `RandomState`).

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The seed of every stable hash rayshift computes: the ASCII bytes of `rayshift`, read big-endian.
///
/// Changing it re-places every app on the shards and re-keys every sticky session, so it never changes.
pub const FIXED_SEED: u64 = 0x7261_7973_6869_6674;

/// Hashes a split key (a session cookie, a header value) into the value [`Split::pick_key`] takes.
///
/// [`Split::pick_key`]: super::Split::pick_key
#[inline]
pub fn key_hash(bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, FIXED_SEED)
}

/// Maps a 64-bit hash to a float strictly inside the open interval (0, 1).
///
/// Keeps the top 52 bits `k` and returns `(k + 0.5) / 2^52`. `k + 0.5` needs 53 significant bits,
/// exactly what an `f64` holds, so the result is exact, never 0 and never 1 (with 53 bits,
/// `2^53 - 0.5` would round up to `2^53` and give exactly 1, whose logarithm is 0).
#[inline]
pub(crate) fn unit_interval(h: u64) -> f64 {
    const SCALE: f64 = 1.0 / (1u64 << 52) as f64;
    ((h >> 12) as f64 + 0.5) * SCALE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_seed_spells_rayshift() {
        assert_eq!(FIXED_SEED.to_be_bytes(), *b"rayshift");
    }

    #[test]
    fn key_hash_is_stable() {
        // Stability guard: these values were computed once; a change re-keys every sticky session.
        assert_eq!(key_hash(b"session-1"), GOLDEN_SESSION_1);
        assert_ne!(key_hash(b"session-1"), key_hash(b"session-2"));
    }

    /// Computed once and cross-checked against the C xxHash library (Python `xxhash` 4.1).
    const GOLDEN_SESSION_1: u64 = 0x650c_9cba_ab3a_b5c9;

    #[test]
    fn unit_interval_is_open() {
        for h in [0, 1, 1 << 12, u64::MAX >> 1, u64::MAX - 1, u64::MAX] {
            let u = unit_interval(h);
            assert!(u > 0.0 && u < 1.0, "{h:#x} -> {u}");
            assert!(u.ln() < 0.0, "{h:#x} -> ln {}", u.ln());
        }
        assert!(unit_interval(0) < unit_interval(1 << 12));
        assert!(unit_interval(u64::MAX - (1 << 12)) < unit_interval(u64::MAX));
    }
}
