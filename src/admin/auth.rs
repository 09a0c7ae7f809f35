//! Bearer-token check for mutating admin calls.

use http::{header, HeaderMap};

/// The admin token; `None` when no `admin.token_file` is configured (every call allowed).
#[derive(Clone, Default)]
pub struct AdminToken(Option<Vec<u8>>);

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.write_str(if self.0.is_some() {
            "AdminToken(set)"
        } else {
            "AdminToken(none)"
        })
    }
}

/// Errors loading the token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("admin.token_file {path}: {source}")]
    Read {
        /// The token file.
        path: std::path::PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file holds no token.
    #[error("admin.token_file {0}: the file is empty")]
    Empty(std::path::PathBuf),
    /// The token has bytes no `Authorization` header can carry, so no client could send it.
    #[error("admin.token_file {0}: the token has characters an HTTP header cannot carry (a line break or another control character inside it)")]
    Unsendable(std::path::PathBuf),
}

impl AdminToken {
    /// No token: the admin API is open (only sensible on loopback).
    pub fn none() -> Self {
        Self(None)
    }

    /// A token given directly.
    pub fn new(token: impl Into<Vec<u8>>) -> Self {
        Self(Some(token.into()))
    }

    /// Reads the token from a file (surrounding whitespace trimmed).
    pub fn from_file(path: &std::path::Path) -> Result<Self, TokenError> {
        let raw = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(TokenError::Empty(path.to_path_buf()));
        }
        if http::HeaderValue::from_bytes(token).is_err() {
            return Err(TokenError::Unsendable(path.to_path_buf()));
        }
        Ok(Self::new(token))
    }

    /// True when a token is configured.
    pub fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// True when no token is configured or the request carries `Authorization: Bearer <token>`.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.0 else { return true };
        // The scheme name is case-insensitive (RFC 9110 section 11.1).
        let Some(given) = headers.get(header::AUTHORIZATION).and_then(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ")).then(|| &v[7..])
        }) else {
            return false;
        };
        constant_time_eq(given.trim_ascii(), expected)
    }
}

/// Compares without an early exit, so the time taken does not reveal how much of a guess was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= u64::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with_auth(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn bearer_token_must_match_exactly() {
        let token = AdminToken::new("s3cret");
        assert!(token.allows(&with_auth("Bearer s3cret")));
        assert!(token.allows(&with_auth("bearer s3cret")));
        assert!(!token.allows(&with_auth("Basic s3cret")));
        assert!(!token.allows(&with_auth("Bearer s3cre")));
        assert!(!token.allows(&with_auth("Bearer s3cret2")));
        assert!(!token.allows(&with_auth("Basic s3cret")));
        assert!(!token.allows(&HeaderMap::new()));
        assert!(AdminToken::none().allows(&HeaderMap::new()));
        assert_eq!(format!("{token:?}"), "AdminToken(set)");
    }

    #[test]
    fn token_file_is_trimmed_and_must_fit_a_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, " s3cret\n").unwrap();
        let token = AdminToken::from_file(&path).unwrap();
        assert!(token.allows(&with_auth("Bearer s3cret")));

        std::fs::write(&path, "first\nsecond\n").unwrap();
        let e = AdminToken::from_file(&path).unwrap_err();
        assert!(matches!(e, TokenError::Unsendable(_)), "{e}");
        assert!(e.to_string().contains("cannot carry"), "{e}");

        std::fs::write(&path, "\n \t\n").unwrap();
        assert!(matches!(
            AdminToken::from_file(&path),
            Err(TokenError::Empty(_))
        ));
    }
}
