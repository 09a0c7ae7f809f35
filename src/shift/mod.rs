//! N+1 upgrades: shifting a shard's traffic to a new cluster in steps, gated on readiness and
//! analysis, with automatic rollback and a drain of the old clusters; and fleet rollouts above.
//!
//! - [`policy`]: step size, interval, thresholds and timeouts.
//! - [`machine`]: the pure state machine of one shard's shift.
//! - [`rollout`]: the sequencer that upgrades many shards, a few at a time.
//!
//! The control plane ([`crate::control`]) drives these with its clock and the gateway's own
//! per-cluster measurements, and persists every transition before it takes effect.

pub mod machine;
pub mod policy;
pub mod rollout;

#[cfg(test)]
mod tests;

pub use machine::{Observation, Phase, Shift, Target};
pub use policy::ShiftPolicy;
pub use rollout::{Rollout, RolloutPhase, ShardProgress};
