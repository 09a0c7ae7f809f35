//! Helpers shared by the fuzz targets (included with `mod common;`).

use rayshift::shift::ShiftPolicy;

/// Asserts that a shift policy came back from a JSON round trip unchanged.
///
/// KNOWN FINDING (see docs/fuzzing.md): rayshift's serde_json is built without its
/// `float_roundtrip` feature, so parsing is not correctly rounded for some floats: the policy
/// `max_error_rate: 1e-30` is written as `1e-30` and read back as `9.999999999999999e-31`.
/// Until the root Cargo.toml enables `serde_json/float_roundtrip`, `max_error_rate` is allowed to
/// come back one ulp away; every other field must be exact. With the feature enabled (it unifies
/// into this crate's build), drop the tolerance.
#[allow(dead_code)]
pub fn assert_same_policy(back: &ShiftPolicy, original: &ShiftPolicy, context: &str) {
    let ulps = (back.max_error_rate.to_bits() as i64 - original.max_error_rate.to_bits() as i64)
        .unsigned_abs();
    assert!(
        ulps <= 1,
        "max_error_rate {} came back as {}: {context}",
        original.max_error_rate,
        back.max_error_rate
    );
    let exact = ShiftPolicy {
        max_error_rate: original.max_error_rate,
        ..back.clone()
    };
    assert_eq!(&exact, original, "{context}");
}
