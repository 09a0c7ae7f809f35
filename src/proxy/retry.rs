//! The retry budget: retries are allowed up to a share of recent requests, plus a small floor per
//! second, so a failing cluster is never hammered by a retry storm.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

/// Fixed-point scale of the balance (one retry costs `SCALE`).
const SCALE: i64 = 1000;
/// Most retries the balance can save up (bursts after quiet periods stay bounded).
const MAX_SAVED_RETRIES: i64 = 100;

/// A lock-free retry budget shared by all requests of a listener.
#[derive(Debug)]
pub struct RetryBudget {
    /// Deposit per request, in thousandths of a retry.
    deposit: i64,
    /// Saved-up retries, in thousandths.
    balance: AtomicI64,
    /// Retries always allowed per second.
    min_per_second: u32,
    /// `(second << 32) | retries used in that second` for the floor.
    floor: AtomicU64,
    /// Start of the budget's clock.
    epoch: Instant,
}

impl RetryBudget {
    /// Retries up to `ratio` (0-1) of requests, and at least `min_per_second` per second.
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            deposit: (ratio.clamp(0.0, 1.0) * SCALE as f64) as i64,
            balance: AtomicI64::new(0),
            min_per_second,
            floor: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Records a request (called once per request, on the hot path: one relaxed add).
    pub fn deposit(&self) {
        if self.deposit == 0 {
            return;
        }
        let prev = self.balance.fetch_add(self.deposit, Ordering::Relaxed);
        if prev > MAX_SAVED_RETRIES * SCALE {
            self.balance
                .store(MAX_SAVED_RETRIES * SCALE, Ordering::Relaxed);
        }
    }

    /// Takes one retry from the budget; false when it is exhausted.
    pub fn try_withdraw(&self) -> bool {
        let prev = self.balance.fetch_sub(SCALE, Ordering::Relaxed);
        if prev >= SCALE {
            return true;
        }
        self.balance.fetch_add(SCALE, Ordering::Relaxed);
        self.take_floor()
    }

    fn take_floor(&self) -> bool {
        if self.min_per_second == 0 {
            return false;
        }
        let second = self.epoch.elapsed().as_secs();
        let mut cur = self.floor.load(Ordering::Relaxed);
        loop {
            let (sec, used) = (cur >> 32, cur & 0xffff_ffff);
            let (sec, used) = if sec == second {
                (sec, used)
            } else {
                (second, 0)
            };
            if used >= u64::from(self.min_per_second) {
                return false;
            }
            let next = (sec << 32) | (used + 1);
            match self
                .floor
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_bounded_by_the_ratio_plus_the_floor() {
        let budget = RetryBudget::new(0.2, 3);
        // No traffic yet: only the floor.
        let floor: usize = (0..10).filter(|_| budget.try_withdraw()).count();
        assert_eq!(floor, 3);
        // 100 requests allow 20 retries (the floor is used up this second).
        for _ in 0..100 {
            budget.deposit();
        }
        let allowed = (0..100).filter(|_| budget.try_withdraw()).count();
        assert_eq!(allowed, 20);
    }

    #[test]
    fn savings_are_capped() {
        let budget = RetryBudget::new(1.0, 0);
        for _ in 0..10_000 {
            budget.deposit();
        }
        let allowed = (0..1000).filter(|_| budget.try_withdraw()).count();
        assert!(allowed <= MAX_SAVED_RETRIES as usize + 1, "{allowed}");
        assert!(!RetryBudget::new(0.0, 0).try_withdraw());
    }
}
