//! `split_hash` and `cookie_value` on arbitrary header bytes.
//!
//! Headers are built from fuzzed name and value bytes (those `http` accepts, as hyper would hand
//! them over), many of them `cookie`. Asserts: nothing panics; `none` never hashes; a header key
//! hashes the header's first value; a cookie key hashes exactly what a reference reading of the
//! `Cookie` headers finds (the first `name=value` pair, split on `;`, trimmed), and that value holds
//! no `;` and no surrounding whitespace; `client_ip` always hashes, an IPv4-mapped IPv6 peer like
//! its IPv4 address.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{HeaderMap, HeaderName, HeaderValue, COOKIE};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rayshift::config::SplitKey;
use rayshift::proxy::split_key::{cookie_value, split_hash};
use rayshift::routing::key_hash;

const NAMES: [&str; 4] = ["cookie", "x-user", "sid", "x-session-id"];

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});

fn run(u: &mut Unstructured) -> Result<()> {
    let header_name = match u.int_in_range(0..=3u8)? {
        0 => HeaderName::from_bytes(u.arbitrary::<&[u8]>()?).ok(),
        n => Some(HeaderName::from_static(NAMES[n as usize])),
    };
    let cookie_name: String = if u.ratio(1, 2)? {
        u.arbitrary()?
    } else {
        u.choose(&["sid", "session", "a", ""])?.to_string()
    };

    let mut headers = HeaderMap::new();
    for _ in 0..u.int_in_range(0..=6)? {
        let name = match u.int_in_range(0..=4u8)? {
            0 => match HeaderName::from_bytes(u.arbitrary::<&[u8]>()?) {
                Ok(name) => name,
                Err(_) => continue,
            },
            1 => header_name.clone().unwrap_or(COOKIE),
            _ => COOKIE,
        };
        let value = if u.ratio(1, 2)? {
            // Cookie-shaped: pairs joined by ';' with stray spaces.
            let mut v = Vec::new();
            for _ in 0..u.int_in_range(0..=4)? {
                if !v.is_empty() {
                    v.extend_from_slice(u.choose(&[&b";"[..], b"; ", b" ;", b";;"])?);
                }
                v.extend_from_slice(u.choose(&[&b"sid"[..], b"session", b" a ", b"", b"sid "])?);
                if u.ratio(3, 4)? {
                    v.push(b'=');
                }
                v.extend_from_slice(u.arbitrary::<&[u8]>()?);
            }
            v
        } else {
            u.arbitrary::<&[u8]>()?.to_vec()
        };
        if let Ok(value) = HeaderValue::from_bytes(&value) {
            headers.append(name, value);
        }
    }

    let peer = if u.arbitrary()? {
        IpAddr::V4(Ipv4Addr::from(u.arbitrary::<[u8; 4]>()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u.arbitrary::<[u8; 16]>()?))
    };

    assert_eq!(split_hash(&SplitKey::None, &headers, peer), None);

    if let Some(name) = header_name {
        let key = SplitKey::Header(name.clone());
        let want = headers.get(&name).map(|v| key_hash(v.as_bytes()));
        assert_eq!(split_hash(&key, &headers, peer), want, "{headers:?}");
    }

    let found = cookie_value(&headers, &cookie_name);
    let want = reference_cookie(&headers, cookie_name.as_bytes());
    assert_eq!(
        found,
        want.as_deref(),
        "cookie {cookie_name:?} in {headers:?}"
    );
    if let Some(v) = found {
        assert!(!v.contains(&b';'));
        assert_eq!(v.trim_ascii(), v);
    }
    let key = SplitKey::Cookie(cookie_name);
    assert_eq!(split_hash(&key, &headers, peer), found.map(key_hash));

    let by_ip = split_hash(&SplitKey::ClientIp, &headers, peer);
    assert!(by_ip.is_some());
    if let IpAddr::V4(v4) = peer {
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        assert_eq!(split_hash(&SplitKey::ClientIp, &headers, mapped), by_ip);
        assert_eq!(by_ip, Some(key_hash(&v4.octets())));
    }
    Ok(())
}

/// The first pair named `name` across the `Cookie` headers, in order, read byte by byte: pairs are
/// separated by `;`, a pair is `name=value`, and both sides are trimmed of ASCII whitespace.
fn reference_cookie(headers: &HeaderMap, name: &[u8]) -> Option<Vec<u8>> {
    let is_space = |b: &u8| b.is_ascii_whitespace();
    let trim = |s: &[u8]| -> Vec<u8> {
        let start = s.iter().position(|b| !is_space(b)).unwrap_or(s.len());
        let end = s
            .iter()
            .rposition(|b| !is_space(b))
            .map_or(start, |e| e + 1);
        s[start..end.max(start)].to_vec()
    };
    for value in headers.get_all(COOKIE) {
        let mut pair = Vec::new();
        let bytes = value.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            if b != b';' {
                pair.push(b);
            }
            if b == b';' || i + 1 == bytes.len() {
                if let Some(eq) = pair.iter().position(|&b| b == b'=') {
                    if trim(&pair[..eq]) == name {
                        return Some(trim(&pair[eq + 1..]));
                    }
                }
                pair.clear();
            }
        }
    }
    None
}
