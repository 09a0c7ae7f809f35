//! `ShiftPolicy::set` and `ShiftPolicy::with_json` on arbitrary keys, values and JSON objects.
//!
//! Input: a mode byte, then either `key\0value` text for `set` or a JSON document for `with_json`.
//! Asserts: nothing panics; a refusal names the offending key with a message; an accepted policy
//! keeps every documented range, round-trips through serde_json (the state file and the API's JSON)
//! and, written out, is accepted back by `with_json` as the same policy (what `GET .../shift` shows
//! can be sent again).

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use rayshift::shift::policy::KEYS;
use rayshift::shift::ShiftPolicy;
use serde_json::Value;

const ALSO_ALLOWED: [&str; 2] = ["to", "to_revision"];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let base = ShiftPolicy::default();
    if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        let (key, value) = text.split_once('\0').unwrap_or(("step_interval", text));
        let mut policy = base.clone();
        match policy.set(key, value) {
            Ok(()) => {
                assert!(KEYS.contains(&key), "accepted unknown key {key:?}");
                check_accepted(&policy, &format!("{key}={value:?}"));
            }
            Err(e) => {
                assert_eq!(e.key, key);
                assert!(!e.message.is_empty());
                assert_eq!(policy, base, "a refused set changed the policy");
            }
        }
    } else {
        let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(rest) else {
            return;
        };
        match base.with_json(&body, &ALSO_ALLOWED) {
            Ok(policy) => {
                for key in body.keys() {
                    assert!(KEYS.contains(&key.as_str()) || ALSO_ALLOWED.contains(&key.as_str()));
                }
                check_accepted(&policy, &String::from_utf8_lossy(rest));
            }
            Err(e) => {
                assert!(
                    body.contains_key(&e.key),
                    "error names {:?}, not in the body",
                    e.key
                );
                assert!(!ALSO_ALLOWED.contains(&e.key.as_str()));
                assert!(!e.message.is_empty());
            }
        }
    }
});

fn check_accepted(policy: &ShiftPolicy, input: &str) {
    assert!((1..=100).contains(&policy.step_percent), "{input}");
    assert!((0.0..=1.0).contains(&policy.max_error_rate), "{input}");
    assert!(policy.failure_threshold >= 1, "{input}");
    assert!(!policy.step_interval.is_zero(), "{input}");
    assert!(!policy.max_p99_latency.is_zero(), "{input}");
    assert!(!policy.ready_timeout.is_zero(), "{input}");

    let text = serde_json::to_string(policy).expect("policy serializes");
    let back: ShiftPolicy = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{text} does not parse back: {e}; input {input}"));
    common::assert_same_policy(
        &back,
        policy,
        &format!("JSON round trip of {text}; input {input}"),
    );

    let Value::Object(written) = serde_json::to_value(policy).expect("policy serializes") else {
        panic!("policy is not a JSON object");
    };
    let again = ShiftPolicy::default()
        .with_json(&written, &[])
        .unwrap_or_else(|e| panic!("{text} refused by with_json: {e}; input {input}"));
    assert_eq!(&again, policy, "with_json of {text}; input {input}");
}
