//! Kubernetes label selectors (`discovery.kubernetes.label_selector`), checked before the gateway
//! starts: a selector the API server would refuse would otherwise fail every list of RayClusters
//! at run time, and `/ready` would wait for discovery forever.
//!
//! The grammar is the API server's (`k8s.io/apimachinery/pkg/labels.Parse`): requirements joined
//! by commas, each `key`, `!key`, `key=value`, `key==value`, `key!=value`, `key in (v1, v2)`,
//! `key notin (v1, v2)`, `key>N` or `key<N`. An empty selector selects everything.

/// Checks `selector`; the error names what is wrong and where.
pub(crate) fn check(selector: &str) -> Result<(), String> {
    let mut rest = selector.trim();
    if rest.is_empty() {
        return Ok(());
    }
    loop {
        rest = requirement(rest)?.trim_start();
        match rest.strip_prefix(',') {
            Some(more) => rest = more.trim_start(),
            None if rest.is_empty() => return Ok(()),
            None => return Err(format!("expected ',' before {rest:?}")),
        }
        if rest.is_empty() {
            return Err("a ',' ends the selector".into());
        }
    }
}

/// One requirement at the start of `s`; returns what follows it.
fn requirement(s: &str) -> Result<&str, String> {
    let (negated, s) = match s.strip_prefix('!') {
        Some(rest) => (true, rest.trim_start()),
        None => (false, s),
    };
    let end = s
        .find(|c: char| c.is_whitespace() || matches!(c, ',' | '=' | '!' | '(' | ')' | '<' | '>'))
        .unwrap_or(s.len());
    let key = &s[..end];
    label_key(key)?;
    let rest = s[end..].trim_start();
    if negated || rest.is_empty() || rest.starts_with(',') {
        // `key` or `!key`: an existence test.
        return Ok(rest);
    }
    for op in ["==", "!=", "=", ">", "<"] {
        if let Some(after) = rest.strip_prefix(op) {
            let after = after.trim_start();
            let end = after
                .find(|c: char| c.is_whitespace() || c == ',')
                .unwrap_or(after.len());
            let value = &after[..end];
            if op == ">" || op == "<" {
                if value.parse::<i64>().is_err() {
                    return Err(format!("{key}{op}: expected an integer, got {value:?}"));
                }
            } else {
                label_value(value).map_err(|e| format!("value of {key:?}: {e}"))?;
            }
            return Ok(&after[end..]);
        }
    }
    for op in ["notin", "in"] {
        if let Some(after) = rest.strip_prefix(op) {
            let after = after.trim_start();
            let Some(set) = after.strip_prefix('(') else {
                return Err(format!("{key} {op}: expected '(' and a list of values"));
            };
            let Some(close) = set.find(')') else {
                return Err(format!("{key} {op}: missing ')'"));
            };
            for value in set[..close].split(',') {
                label_value(value.trim()).map_err(|e| format!("value of {key:?}: {e}"))?;
            }
            return Ok(&set[close + 1..]);
        }
    }
    Err(format!(
        "after {key:?}: expected =, ==, !=, in, notin, <, > or ',', got {rest:?}"
    ))
}

/// A label key: an optional DNS-subdomain prefix and `/`, then a name of at most 63 characters.
fn label_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("a label key is missing".into());
    }
    let name = match key.rsplit_once('/') {
        Some((prefix, name)) => {
            let subdomain = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|part| {
                    !part.is_empty()
                        && part
                            .bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                        && !part.starts_with('-')
                        && !part.ends_with('-')
                });
            if !subdomain {
                return Err(format!(
                    "{key:?}: the prefix {prefix:?} is not a DNS subdomain"
                ));
            }
            name
        }
        None => key,
    };
    if name.is_empty() {
        return Err(format!("{key:?}: the name after '/' is missing"));
    }
    label_value(name).map_err(|e| format!("{key:?}: {e}"))
}

/// A label value (or a key's name part): at most 63 of `A-Z a-z 0-9 - _ .`, starting and ending
/// with a letter or digit; empty is allowed for values.
fn label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    let edge = |b: u8| b.is_ascii_alphanumeric();
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && edge(v.as_bytes()[0])
        && edge(v.as_bytes()[v.len() - 1]);
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a label value (at most 63 letters, digits, '-', '_', '.'; starting and ending with a letter or digit)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn selectors_the_api_server_accepts() {
        for ok in [
            "",
            "rayshift.io/shard",
            "!rayshift.io/drained",
            "rayshift.io/shard=shard-0",
            "rayshift.io/shard == shard-0, team!=ml",
            "env in (prod, staging),tier notin (frontend)",
            "rayshift.io/shard,env=",
            "gpu>2, gpu<9",
            "app in ()",
            // DNS subdomain prefixes limit the whole (253), not each label.
            &format!("{}.example.com/x", "a".repeat(64)),
        ] {
            assert_eq!(check(ok), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn selectors_the_api_server_refuses_name_the_problem() {
        for (bad, says) in [
            ("rayshift.io/shard in (a", "missing ')'"),
            ("a b", "expected =, ==, !=, in, notin"),
            ("a=b c", "expected ','"),
            ("a,", "a ',' ends the selector"),
            ("=b", "a label key is missing"),
            ("Bad_Prefix/x", "not a DNS subdomain"),
            ("a=-b", "is not a label value"),
            ("gpu>two", "expected an integer"),
            ("a in b", "expected '('"),
            ("rayshift.io/", "the name after '/' is missing"),
        ] {
            let err = check(bad).expect_err(bad);
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }
}
