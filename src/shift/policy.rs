//! How a shift moves: step size and interval, the analysis thresholds, the timeouts.
//!
//! The same keys are read from the config's `shift_defaults` (and per-shard `auto_shift`), from the
//! body of `POST /v1/shards/{shard}/shift` and from `POST /v1/rollouts`; each value is parsed from its
//! text so the three sources agree on syntax and error messages.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Every policy key, in documentation order.
pub const KEYS: [&str; 8] = [
    "step_percent",
    "step_interval",
    "max_error_rate",
    "max_p99_latency",
    "min_requests",
    "failure_threshold",
    "ready_timeout",
    "drain_timeout",
];

/// The longest duration a policy key takes (365 days): longer ones are refused, so that no deadline
/// computed from them (now + interval) can overflow the clock.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A shift policy. Defaults: 10% steps every 30 s, at most 1% errors and 1 s p99 over at least 50
/// requests per window, rollback after 2 failed checks in a row, 10 min for the target to become
/// ready, 5 min for the old clusters to drain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShiftPolicy {
    /// Weight added to the target per step (1-100).
    pub step_percent: u32,
    /// Time between steps; also the analysis window.
    #[serde(with = "humantime_serde_compat")]
    pub step_interval: Duration,
    /// Highest acceptable share (0-1) of target responses that are 5xx or failed attempts.
    pub max_error_rate: f64,
    /// Highest acceptable 99th-percentile time to response headers on the target.
    #[serde(with = "humantime_serde_compat")]
    pub max_p99_latency: Duration,
    /// Requests the target must have answered in a window before it is judged.
    pub min_requests: u64,
    /// Failed checks in a row that roll the shift back.
    pub failure_threshold: u32,
    /// How long the target may stay not ready before the shift rolls back.
    #[serde(with = "humantime_serde_compat")]
    pub ready_timeout: Duration,
    /// How long old clusters' in-flight requests may run after promotion before they are cut.
    #[serde(with = "humantime_serde_compat")]
    pub drain_timeout: Duration,
}

impl Default for ShiftPolicy {
    fn default() -> Self {
        Self {
            step_percent: 10,
            step_interval: Duration::from_secs(30),
            max_error_rate: 0.01,
            max_p99_latency: Duration::from_secs(1),
            min_requests: 50,
            failure_threshold: 2,
            ready_timeout: Duration::from_secs(600),
            drain_timeout: Duration::from_secs(300),
        }
    }
}

/// A policy key with a bad value, or an unknown key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct PolicyError {
    /// The key.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ShiftPolicy {
    /// Sets one key from its text (`"30s"`, `"10"`, `"0.01"`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), PolicyError> {
        let err = |message: String| PolicyError {
            key: key.to_string(),
            message,
        };
        let value = value.trim();
        match key {
            "step_percent" => {
                self.step_percent = match value.parse::<u32>() {
                    Ok(n @ 1..=100) => n,
                    _ => return Err(err(format!("expected an integer 1-100, got {value:?}"))),
                }
            }
            "max_error_rate" => {
                self.max_error_rate = match value.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => r,
                    _ => {
                        return Err(err(format!(
                            "expected a ratio 0-1 (0.01 = 1%), got {value:?}"
                        )))
                    }
                }
            }
            "min_requests" => {
                self.min_requests = value
                    .parse::<u64>()
                    .map_err(|_| err(format!("expected a non-negative integer, got {value:?}")))?
            }
            "failure_threshold" => {
                self.failure_threshold = match value.parse::<u32>() {
                    Ok(n) if n >= 1 => n,
                    _ => return Err(err(format!("expected an integer >= 1, got {value:?}"))),
                }
            }
            "step_interval" | "max_p99_latency" | "ready_timeout" | "drain_timeout" => {
                let d = humantime::parse_duration(value).map_err(|e| {
                    err(format!(
                        "expected a duration like 30s or 500ms, got {value:?}: {e}"
                    ))
                })?;
                if d.is_zero() && key != "drain_timeout" {
                    return Err(err("must be greater than 0".into()));
                }
                if d > MAX_DURATION {
                    return Err(err(format!("must be at most 365d, got {value:?}")));
                }
                match key {
                    "step_interval" => self.step_interval = d,
                    "max_p99_latency" => self.max_p99_latency = d,
                    "ready_timeout" => self.ready_timeout = d,
                    _ => self.drain_timeout = d,
                }
            }
            _ => {
                return Err(err(format!(
                    "unknown policy key; expected one of {}",
                    KEYS.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// Checks every key against the rules of [`ShiftPolicy::set`] (for a policy that did not come
    /// through it, such as one read from a state file edited by hand).
    pub fn validate(&self) -> Result<(), PolicyError> {
        let duration = |d: Duration| humantime::format_duration(d).to_string();
        let values = [
            ("step_percent", self.step_percent.to_string()),
            ("step_interval", duration(self.step_interval)),
            ("max_error_rate", self.max_error_rate.to_string()),
            ("max_p99_latency", duration(self.max_p99_latency)),
            ("min_requests", self.min_requests.to_string()),
            ("failure_threshold", self.failure_threshold.to_string()),
            ("ready_timeout", duration(self.ready_timeout)),
            ("drain_timeout", duration(self.drain_timeout)),
        ];
        let mut scratch = self.clone();
        for (key, value) in &values {
            scratch.set(key, value)?;
        }
        Ok(())
    }

    /// This policy with the keys of a JSON object applied (numbers or strings); other keys listed in
    /// `also_allowed` are skipped, any other key is an error.
    pub fn with_json(
        &self,
        body: &serde_json::Map<String, serde_json::Value>,
        also_allowed: &[&str],
    ) -> Result<ShiftPolicy, PolicyError> {
        let mut policy = self.clone();
        for (key, value) in body {
            if also_allowed.contains(&key.as_str()) {
                continue;
            }
            if !KEYS.contains(&key.as_str()) {
                let mut allowed: Vec<&str> = also_allowed.to_vec();
                allowed.extend(KEYS);
                return Err(PolicyError {
                    key: key.clone(),
                    message: format!("unknown field; expected one of {}", allowed.join(", ")),
                });
            }
            let text = match value {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(PolicyError {
                        key: key.clone(),
                        message: format!("expected a number or a string, got {other}"),
                    })
                }
            };
            policy.set(key, &text)?;
        }
        Ok(policy)
    }
}

/// Durations as humantime strings (`"30s"`) in the state file and API.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(serde::de::Error::custom)?;
        if duration > super::MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "duration {text:?} is over the limit of 365d"
            )));
        }
        Ok(duration)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_with_clear_errors() {
        let mut p = ShiftPolicy::default();
        p.set("step_percent", "25").unwrap();
        p.set("step_interval", "1m 30s").unwrap();
        p.set("max_error_rate", "0.05").unwrap();
        p.set("max_p99_latency", "500ms").unwrap();
        p.set("drain_timeout", "0s").unwrap();
        p.set("ready_timeout", "365d").unwrap();
        assert_eq!(p.ready_timeout, MAX_DURATION);
        assert_eq!(p.step_percent, 25);
        assert_eq!(p.step_interval, Duration::from_secs(90));
        assert_eq!(p.max_p99_latency, Duration::from_millis(500));
        for (key, value, needle) in [
            ("step_percent", "0", "1-100"),
            ("step_percent", "101", "1-100"),
            ("step_percent", "ten", "1-100"),
            ("step_interval", "30", "duration"),
            ("step_interval", "0s", "greater than 0"),
            ("max_error_rate", "2", "ratio"),
            ("failure_threshold", "0", ">= 1"),
            ("step_interval", "10000000000000000000s", "at most 365d"),
            ("drain_timeout", "366d", "at most 365d"),
            ("ready_timeout", "1000years", "at most 365d"),
            ("nope", "1", "unknown policy key"),
        ] {
            let e = p.clone().set(key, value).unwrap_err();
            assert_eq!(e.key, key);
            assert!(e.message.contains(needle), "{key}={value}: {e}");
        }
    }

    /// A stored policy (state file) with a duration over the limit is refused when read, not
    /// turned into a deadline that overflows the clock.
    #[test]
    fn stored_durations_over_the_limit_are_refused() {
        let mut stored = serde_json::to_value(ShiftPolicy::default()).unwrap();
        assert_eq!(
            serde_json::from_value::<ShiftPolicy>(stored.clone()).unwrap(),
            ShiftPolicy::default()
        );
        stored["drain_timeout"] = "1000years".into();
        let e = serde_json::from_value::<ShiftPolicy>(stored).unwrap_err();
        assert!(e.to_string().contains("over the limit of 365d"), "{e}");
    }

    #[test]
    fn json_bodies_apply_over_defaults() {
        let body: serde_json::Map<_, _> = serde_json::from_str(
            r#"{"to": "green", "step_percent": 20, "step_interval": "5s", "max_error_rate": 0.02}"#,
        )
        .unwrap();
        let p = ShiftPolicy::default()
            .with_json(&body, &["to", "to_revision"])
            .unwrap();
        assert_eq!(p.step_percent, 20);
        assert_eq!(p.step_interval, Duration::from_secs(5));
        assert_eq!(p.failure_threshold, 2);
        let bad: serde_json::Map<_, _> =
            serde_json::from_str(r#"{"to": "g", "stepsize": 5}"#).unwrap();
        let e = ShiftPolicy::default().with_json(&bad, &["to"]).unwrap_err();
        assert_eq!(e.key, "stepsize");
        let bad: serde_json::Map<_, _> = serde_json::from_str(r#"{"step_percent": [1]}"#).unwrap();
        assert!(ShiftPolicy::default().with_json(&bad, &[]).is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let p = ShiftPolicy::default();
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains("\"step_interval\":\"30s\""), "{text}");
        assert_eq!(serde_json::from_str::<ShiftPolicy>(&text).unwrap(), p);
    }
}
