//! Route prefix matching with Ray Serve's rule: the longest matching prefix wins.

use super::AppId;

/// Whether route prefix `prefix` matches request path `path` under Ray Serve's rule.
///
/// `path` must start with `prefix`, and then either `prefix` ends in `/`, or the two are equal, or
/// the rest of `path` starts with `/`. So `/route` matches `/route` and `/route/x` but not
/// `/routesuffix`, and `/a/` matches `/a/b` but not `/a`. This is the reference the
/// [`PrefixMatcher`] is tested against.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        None => false,
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
    }
}

/// Finds the app whose route prefix is the longest one matching a path, without allocating.
///
/// Built once per routing table. A prefix `P` can only match a path `X` if `P` is `X` itself,
/// `X` cut just after a `/`, or `X` cut just before a `/`; so a lookup probes a hash map with
/// those slices of `X`, longest first, and stops at the first hit. It costs at most `2k + 1`
/// probes for a path with `k` slashes, whatever the number of prefixes.
#[derive(Debug, Clone, Default)]
pub struct PrefixMatcher {
    /// Prefix -> app; the first app given a prefix keeps it.
    by_prefix: foldhash::HashMap<Box<str>, AppId>,
    /// Bit `n` is set when some prefix is `n` bytes long (`n < 256`): probes of other lengths
    /// are skipped without hashing.
    lengths: [u64; 4],
    /// The app of the empty prefix, which matches every path starting with `/`. Probing `X[..0]`
    /// at every miss would cost a hash per request for a prefix Serve never accepts, so it is
    /// kept aside.
    empty: Option<AppId>,
}

// === impl PrefixMatcher ===

impl PrefixMatcher {
    /// Builds a matcher from `(route prefix, app)` pairs; of equal prefixes, the first one wins.
    pub fn new<'a>(prefixes: impl IntoIterator<Item = (&'a str, AppId)>) -> Self {
        let prefixes = prefixes.into_iter();
        let mut matcher = PrefixMatcher {
            by_prefix: foldhash::HashMap::with_capacity_and_hasher(
                prefixes.size_hint().0,
                Default::default(),
            ),
            ..PrefixMatcher::default()
        };
        for (prefix, app) in prefixes {
            matcher.insert(prefix, app);
        }
        matcher
    }

    /// Adds `prefix` for `app`, unless the prefix is already taken: then returns the app holding it.
    pub(crate) fn insert(&mut self, prefix: &str, app: AppId) -> Option<AppId> {
        if let Some(&holder) = self.by_prefix.get(prefix) {
            return Some(holder);
        }
        self.by_prefix.insert(prefix.into(), app);
        if let Some(word) = self.lengths.get_mut(prefix.len() / 64) {
            *word |= 1 << (prefix.len() % 64);
        }
        if prefix.is_empty() {
            self.empty = Some(app);
        }
        None
    }

    /// The app whose route prefix is the longest one matching `path` (query already stripped).
    pub fn lookup(&self, path: &str) -> Option<AppId> {
        if self.by_prefix.is_empty() {
            return None;
        }
        if let Some(app) = self.probe(path, path.len()) {
            return Some(app);
        }
        let bytes = path.as_bytes();
        let mut end = bytes.len();
        // Walk the slashes right to left; candidate lengths only decrease, so the first hit is
        // the longest match.
        while let Some(i) = bytes[..end].iter().rposition(|&b| b == b'/') {
            // X[..=i] is a prefix ending in '/'; when '/' ends the path it is the path itself,
            // probed already.
            if i + 1 < bytes.len() {
                if let Some(app) = self.probe(path, i + 1) {
                    return Some(app);
                }
            }
            // X[..i] is followed by '/'. The empty X[..0] is handled below.
            if i > 0 {
                if let Some(app) = self.probe(path, i) {
                    return Some(app);
                }
            }
            end = i;
        }
        if bytes.first() == Some(&b'/') {
            self.empty
        } else {
            None
        }
    }

    /// The number of distinct prefixes.
    pub fn len(&self) -> usize {
        self.by_prefix.len()
    }

    /// Whether the matcher holds no prefix, so every lookup misses.
    pub fn is_empty(&self) -> bool {
        self.by_prefix.is_empty()
    }

    /// Looks up `path[..len]`; `len` is always at a char boundary (the path's end or next to a `/`).
    #[inline]
    fn probe(&self, path: &str, len: usize) -> Option<AppId> {
        let possible = match self.lengths.get(len / 64) {
            Some(word) => word & (1 << (len % 64)) != 0,
            None => true,
        };
        if !possible {
            return None;
        }
        self.by_prefix.get(&path[..len]).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn matcher(prefixes: &[&str]) -> PrefixMatcher {
        PrefixMatcher::new(prefixes.iter().enumerate().map(|(i, p)| (*p, i as AppId)))
    }

    /// The longest prefix matching `path` by the reference rule; of equal ones, the first.
    fn brute_force(prefixes: &[String], path: &str) -> Option<AppId> {
        let mut best: Option<(usize, AppId)> = None;
        for (i, p) in prefixes.iter().enumerate() {
            if prefix_matches(p, path) && best.is_none_or(|(len, _)| p.len() > len) {
                best = Some((p.len(), i as AppId));
            }
        }
        best.map(|(_, app)| app)
    }

    #[test]
    fn reference_rule() {
        assert!(prefix_matches("/route", "/route"));
        assert!(prefix_matches("/route", "/route/x"));
        assert!(!prefix_matches("/route", "/routesuffix"));
        assert!(!prefix_matches("/route", "/rout"));
        assert!(prefix_matches("/", "/anything/at/all"));
        assert!(prefix_matches("/", "/"));
        assert!(!prefix_matches("/", ""));
        assert!(prefix_matches("/a/", "/a/"));
        assert!(prefix_matches("/a/", "/a/b"));
        assert!(!prefix_matches("/a/", "/a"));
        assert!(prefix_matches("/a", "/a/"));
    }

    #[test]
    fn route_does_not_match_routesuffix() {
        let m = matcher(&["/route"]);
        assert_eq!(m.lookup("/route"), Some(0));
        assert_eq!(m.lookup("/route/x"), Some(0));
        assert_eq!(m.lookup("/route/"), Some(0));
        assert_eq!(m.lookup("/routesuffix"), None);
        assert_eq!(m.lookup("/routesuffix/x"), None);
        assert_eq!(m.lookup("/rout"), None);
    }

    #[test]
    fn root_matches_everything_with_a_leading_slash() {
        let m = matcher(&["/"]);
        for path in ["/", "/a", "/a/b/c", "//", "/routesuffix?"] {
            assert_eq!(m.lookup(path), Some(0), "{path}");
        }
        assert_eq!(m.lookup(""), None);
        assert_eq!(m.lookup("a"), None);
    }

    #[test]
    fn trailing_slash_prefix() {
        let m = matcher(&["/a/"]);
        assert_eq!(m.lookup("/a/"), Some(0));
        assert_eq!(m.lookup("/a/b"), Some(0));
        assert_eq!(m.lookup("/a/b/"), Some(0));
        assert_eq!(m.lookup("/a"), None);
        assert_eq!(m.lookup("/ab"), None);
    }

    #[test]
    fn a_and_a_slash_are_distinct_prefixes() {
        let m = matcher(&["/a", "/a/"]);
        assert_eq!(m.lookup("/a"), Some(0));
        // Both match; `/a/` is longer.
        assert_eq!(m.lookup("/a/"), Some(1));
        assert_eq!(m.lookup("/a/b"), Some(1));
    }

    #[test]
    fn exact_match() {
        let m = matcher(&["/team-1/model-2"]);
        assert_eq!(m.lookup("/team-1/model-2"), Some(0));
        assert_eq!(m.lookup("/team-1/model-23"), None);
        assert_eq!(m.lookup("/team-1"), None);
    }

    #[test]
    fn deeper_longest_wins() {
        let m = matcher(&["/", "/a", "/a/b", "/a/b/c/"]);
        assert_eq!(m.lookup("/x"), Some(0));
        assert_eq!(m.lookup("/a"), Some(1));
        assert_eq!(m.lookup("/a/x"), Some(1));
        assert_eq!(m.lookup("/a/b"), Some(2));
        assert_eq!(m.lookup("/a/b/c"), Some(2));
        assert_eq!(m.lookup("/a/b/c/"), Some(3));
        assert_eq!(m.lookup("/a/b/c/d/e"), Some(3));
        assert_eq!(m.lookup("/ab"), Some(0));
    }

    #[test]
    fn path_without_leading_slash() {
        let m = matcher(&["/", "/a"]);
        assert_eq!(m.lookup("a"), None);
        assert_eq!(m.lookup("a/b"), None);
        assert_eq!(m.lookup("*"), None);
        let m = matcher(&["a"]);
        assert_eq!(m.lookup("a/b"), Some(0));
    }

    #[test]
    fn empty_path() {
        assert_eq!(matcher(&["/", "/a"]).lookup(""), None);
        assert_eq!(matcher(&[""]).lookup(""), Some(0));
    }

    #[test]
    fn empty_prefix_follows_the_reference_rule() {
        let m = matcher(&["", "/a"]);
        assert_eq!(m.lookup("/"), Some(0));
        assert_eq!(m.lookup("/b"), Some(0));
        assert_eq!(m.lookup("/a/b"), Some(1));
        assert_eq!(m.lookup("b"), None);
    }

    #[test]
    fn first_of_equal_prefixes_wins() {
        let m = matcher(&["/a", "/a"]);
        assert_eq!(m.len(), 1);
        assert_eq!(m.lookup("/a"), Some(0));
    }

    #[test]
    fn empty_matcher_misses() {
        let m = PrefixMatcher::new([]);
        assert!(m.is_empty());
        assert_eq!(m.len(), 0);
        assert_eq!(m.lookup("/"), None);
    }

    #[test]
    fn long_prefixes_beyond_the_length_bitmap() {
        let long = format!("/{}", "x".repeat(300));
        let m = PrefixMatcher::new([(long.as_str(), 7), ("/", 1)]);
        assert_eq!(m.lookup(&format!("{long}/tail")), Some(7));
        assert_eq!(m.lookup(&long), Some(7));
        assert_eq!(m.lookup(&format!("{long}x")), Some(1));
    }

    #[test]
    fn non_ascii_paths() {
        let m = matcher(&["/é", "/"]);
        assert_eq!(m.lookup("/é/ü"), Some(0));
        assert_eq!(m.lookup("/éü"), Some(1));
    }

    proptest! {
        #[test]
        fn lookup_equals_brute_force(
            prefixes in prop::collection::vec("[ab/]{0,5}", 0..12),
            paths in prop::collection::vec("[ab/]{0,9}", 0..16),
            suffixes in prop::collection::vec("[ab/]{0,4}", 1..8),
        ) {
            let m = PrefixMatcher::new(
                prefixes.iter().enumerate().map(|(i, p)| (p.as_str(), i as AppId)),
            );
            // Paths that extend a prefix exercise the hits; random ones the misses.
            let extended = prefixes
                .iter()
                .flat_map(|p| suffixes.iter().map(move |s| format!("{p}{s}")));
            for path in paths.iter().cloned().chain(extended) {
                prop_assert_eq!(m.lookup(&path), brute_force(&prefixes, &path), "path {:?}", path);
            }
        }
    }
}
