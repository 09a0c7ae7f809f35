//! `PrefixMatcher::lookup` against a brute-force longest-prefix search with `prefix_matches`.
//!
//! Input (UTF-8 text, so seeds are readable): route prefixes one per line, then a NUL byte, then
//! request paths one per line. Without a NUL the lines serve as both. Every path, every prefix and
//! every prefix followed by a path (the paths that hit) is looked up.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rayshift::routing::{prefix_matches, AppId, PrefixMatcher};

const MAX_LINES: usize = 64;
const MAX_JOINED: usize = 16;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (prefix_text, path_text) = text.split_once('\0').unwrap_or((text, text));
    let prefixes: Vec<&str> = prefix_text.split('\n').take(MAX_LINES).collect();
    let paths: Vec<&str> = path_text.split('\n').take(MAX_LINES).collect();

    let matcher = PrefixMatcher::new(prefixes.iter().enumerate().map(|(i, p)| (*p, i as AppId)));
    let mut distinct = prefixes.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(matcher.len(), distinct.len());
    assert_eq!(matcher.is_empty(), prefixes.is_empty());

    let check = |path: &str| {
        let got = matcher.lookup(path);
        let want = brute_force(&prefixes, path);
        assert_eq!(got, want, "path {path:?}, prefixes {prefixes:?}");
    };
    for path in &paths {
        check(path);
    }
    for prefix in &prefixes {
        check(prefix);
    }
    for prefix in prefixes.iter().take(MAX_JOINED) {
        for path in paths.iter().take(MAX_JOINED) {
            check(&format!("{prefix}{path}"));
        }
    }
});

/// The longest prefix matching `path` under Serve's rule; of equal prefixes, the first given.
fn brute_force(prefixes: &[&str], path: &str) -> Option<AppId> {
    let mut best: Option<(usize, AppId)> = None;
    for (i, p) in prefixes.iter().enumerate() {
        if prefix_matches(p, path) && best.is_none_or(|(len, _)| p.len() > len) {
            best = Some((p.len(), i as AppId));
        }
    }
    best.map(|(_, app)| app)
}
