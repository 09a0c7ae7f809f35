//! Admin request bodies: `PUT /v1/shards/{shard}/weights`, `POST /v1/shards/{shard}/shift` and
//! `POST /v1/rollouts`, parsed the way `src/admin/api.rs` parses them.
//!
//! The parsing functions of the admin API are private, so this target holds a copy of their shape
//! checks (the `WeightsBody` struct, `string_field`, the target and `max_concurrent` rules) around
//! the public `ShiftPolicy::with_json` they call; docs/fuzzing.md says what to make public so the
//! target can call the real ones. Input: a selector byte (weights, shift, rollout), then the body.
//! Asserts: nothing panics; a refused body gets a non-empty message; an accepted weights body
//! round-trips through JSON; an accepted shift or rollout body has exactly one target, a policy in
//! range that round-trips, and no key outside the documented ones.

#![no_main]

use std::collections::BTreeMap;

mod common;

use libfuzzer_sys::fuzz_target;
use rayshift::shift::policy::KEYS;
use rayshift::shift::ShiftPolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Copy of `admin::api::WeightsBody`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsBody {
    weights: BTreeMap<String, u64>,
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => weights(body),
        1 => shift(body),
        _ => rollout(body),
    }
});

fn weights(body: &[u8]) {
    let Ok(parsed) = serde_json::from_slice::<WeightsBody>(body) else {
        return;
    };
    let text = serde_json::to_string(&parsed).expect("serializes");
    let back: WeightsBody = serde_json::from_str(&text).expect("parses back");
    assert_eq!(back, parsed);
}

/// Copy of `admin::api::string_field`.
fn string_field(body: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(format!("{key}: expected a non-empty string, got {other}")),
    }
}

fn object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn shift(body: &[u8]) {
    let Some(body) = object(body) else { return };
    let also = ["to", "to_revision"];
    let target = match (
        string_field(&body, "to"),
        string_field(&body, "to_revision"),
    ) {
        (Err(msg), _) | (_, Err(msg)) => return assert!(!msg.is_empty()),
        (Ok(Some(cluster)), Ok(None)) => cluster,
        (Ok(None), Ok(Some(revision))) => revision,
        _ => return,
    };
    assert!(!target.is_empty());
    accepted_policy(&body, &also);
}

fn rollout(body: &[u8]) {
    let Some(body) = object(body) else { return };
    let also = ["revision", "max_concurrent"];
    match string_field(&body, "revision") {
        Ok(Some(revision)) => assert!(!revision.is_empty()),
        Ok(None) => return,
        Err(msg) => return assert!(!msg.is_empty()),
    }
    if let Some(v) = body.get("max_concurrent") {
        match v.as_u64() {
            Some(n) if n >= 1 => assert!(usize::try_from(n).is_ok()),
            _ => return,
        }
    }
    accepted_policy(&body, &also);
}

fn accepted_policy(body: &Map<String, Value>, also: &[&str]) {
    let policy = match ShiftPolicy::default().with_json(body, also) {
        Ok(policy) => policy,
        Err(e) => {
            assert!(body.contains_key(&e.key) && !also.contains(&e.key.as_str()));
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    for key in body.keys() {
        assert!(
            KEYS.contains(&key.as_str()) || also.contains(&key.as_str()),
            "{key}"
        );
    }
    assert!((1..=100).contains(&policy.step_percent));
    assert!((0.0..=1.0).contains(&policy.max_error_rate));
    assert!(policy.failure_threshold >= 1);
    assert!(!policy.step_interval.is_zero());
    let text = serde_json::to_string(&policy).expect("serializes");
    let back: ShiftPolicy =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text} does not parse back: {e}"));
    common::assert_same_policy(&back, &policy, &text);
}
