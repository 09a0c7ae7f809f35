//! The sticky split key of a request (`split_key:` in the config), hashed for the weighted pick.
//!
//! With a key, the pick is a pure function of the key's hash and the weights: a client keeps hitting
//! the same cluster, and as a shift raises the new cluster's weight a client moves to it once and never
//! back. Requests without the key (header or cookie absent) fall back to a random pick.

use std::net::IpAddr;

use http::header::{self, HeaderMap};

use crate::config::SplitKey;
use crate::routing::key_hash;

/// The hash of the request's split key, or `None` when splitting is random or the key is absent.
pub fn split_hash(key: &SplitKey, headers: &HeaderMap, peer: IpAddr) -> Option<u64> {
    match key {
        SplitKey::None => None,
        SplitKey::Header(name) => headers.get(name).map(|v| key_hash(v.as_bytes())),
        SplitKey::Cookie(name) => cookie_value(headers, name).map(key_hash),
        SplitKey::ClientIp => Some(ip_hash(peer)),
    }
}

/// The split hash of a client address (an IPv4-mapped IPv6 address hashes as its IPv4 one).
pub fn ip_hash(peer: IpAddr) -> u64 {
    match peer {
        IpAddr::V4(ip) => key_hash(&ip.octets()),
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => key_hash(&v4.octets()),
            None => key_hash(&ip.octets()),
        },
    }
}

/// The value of cookie `name` from the request's `Cookie` header(s), if present.
pub fn cookie_value<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .find_map(|v| cookie_in(v.as_bytes(), name))
}

/// The value of cookie `name` in one `Cookie` header value, if present.
pub fn cookie_in<'a>(value: &'a [u8], name: &str) -> Option<&'a [u8]> {
    value.split(|&b| b == b';').find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&b| b == b'=')?;
        (pair[..eq].trim_ascii() == name.as_bytes()).then(|| pair[eq + 1..].trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn cookie_values_are_found_across_headers() {
        let h = headers(&[("cookie", "a=1; session=abc ;b=2"), ("cookie", "late=x")]);
        assert_eq!(cookie_value(&h, "session"), Some(&b"abc"[..]));
        assert_eq!(cookie_value(&h, "late"), Some(&b"x"[..]));
        assert_eq!(cookie_value(&h, "sess"), None);
        assert_eq!(
            cookie_value(&headers(&[("cookie", "novalue; =x")]), "novalue"),
            None
        );
    }

    #[test]
    fn keys_hash_stably_and_fall_back_when_absent() {
        let peer: IpAddr = "127.0.0.7".parse().unwrap();
        let h = headers(&[("x-user", "alice"), ("cookie", "sid=alice")]);
        let by_header = SplitKey::Header(HeaderName::from_static("x-user"));
        assert_eq!(split_hash(&by_header, &h, peer), Some(key_hash(b"alice")));
        assert_eq!(
            split_hash(&SplitKey::Cookie("sid".into()), &h, peer),
            Some(key_hash(b"alice"))
        );
        assert_eq!(split_hash(&by_header, &HeaderMap::new(), peer), None);
        assert_eq!(split_hash(&SplitKey::None, &h, peer), None);
        let mapped: IpAddr = "::ffff:127.0.0.7".parse().unwrap();
        assert_eq!(
            split_hash(&SplitKey::ClientIp, &h, peer),
            split_hash(&SplitKey::ClientIp, &h, mapped)
        );
    }
}
