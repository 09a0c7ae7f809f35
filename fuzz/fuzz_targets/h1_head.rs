//! The direct HTTP/1.1 path's head parsers and chunked scanner (`src/proxy/h1`) on arbitrary
//! bytes.
//!
//! Input: a selector byte (request head, response head, chunked body), a split-key choice, then
//! the bytes. Asserts: nothing panics; a request the direct path takes is rewritten into a head
//! that parses again as one complete HTTP/1.1 request with the same method and target, keeps the
//! client's other fields unchanged and in order, carries no
//! hop-by-hop field, one `x-forwarded-for`/`-proto`/`-host` each and at most one
//! `content-length` (the one that framed the client's body), and a non-empty request id inside the
//! rewritten head; a response head that is taken is rewritten into a head that parses again with
//! the same status, the cluster's fields unchanged and in order (less the ones that may go), and no
//! hop-by-hop field but `transfer-encoding: chunked` for a chunked body (none on a 204 or 304, and
//! no `content-length` on a 204);
//! the chunked scanner gives the same answer whether the bytes come whole or in two pieces.

#![no_main]

use libfuzzer_sys::fuzz_target;
use rayshift::config::SplitKey;
use rayshift::proxy::h1::chunked::Scanner;
use rayshift::proxy::h1::head::{self, Framing, Parsed};

const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (selector, key, bytes) = (data[0], data[1], &data[2..]);
    match selector % 3 {
        0 => request(key, bytes),
        1 => response(key & 1 == 1, bytes),
        _ => chunked(key as usize, bytes),
    }
});

fn request(key: u8, bytes: &[u8]) {
    let split_key = match key % 4 {
        0 => SplitKey::None,
        1 => SplitKey::Header(http::HeaderName::from_static("x-user")),
        2 => SplitKey::Cookie("sid".into()),
        _ => SplitKey::ClientIp,
    };
    let client = head::Client {
        peer: b"127.0.0.1",
        ip: "127.0.0.1".parse().unwrap(),
        proto: "http",
        split_key: &split_key,
    };
    let mut out = Vec::new();
    let Parsed::Complete(req) = head::request(bytes, client, &mut out) else {
        return;
    };
    assert!(req.head_len <= bytes.len());
    assert!(bytes[req.path.clone()].starts_with(b"/"));
    assert!(!out[req.request_id.clone()].is_empty());
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut again = httparse::Request::new(&mut storage);
    let status = again.parse(&out).expect("the rewritten head parses");
    assert_eq!(status, httparse::Status::Complete(out.len()));
    assert_eq!(again.version, Some(1));
    let mut original = [httparse::EMPTY_HEADER; 128];
    let mut first = httparse::Request::new(&mut original);
    first.parse(bytes).unwrap();
    assert_eq!(again.method, first.method);
    assert_eq!(again.path, first.path);
    let count = |name: &str| {
        again
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .count()
    };
    for name in HOP_BY_HOP {
        assert_eq!(count(name), 0, "{name} forwarded");
    }
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!(count(name), 1, "{name}");
    }
    assert!(count("content-length") <= 1);
    // The client's fields go on unchanged and in order (all but those the gateway owns); the
    // gateway's own follow them.
    let owned = |name: &str| {
        HOP_BY_HOP.contains(&name)
            || name.starts_with("x-forwarded-")
            || name == "x-request-id"
            || name == "content-length"
    };
    let not_owned = |headers: &[httparse::Header<'_>]| -> Vec<(String, Vec<u8>)> {
        headers
            .iter()
            .filter(|h| !owned(&h.name.to_ascii_lowercase()))
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect()
    };
    assert_eq!(not_owned(first.headers), not_owned(again.headers));
    if let Some(h) = again
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let n: u64 = std::str::from_utf8(h.value)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(n, req.content_length);
    } else {
        assert_eq!(req.content_length, 0);
    }
}

fn response(is_head: bool, bytes: &[u8]) {
    let mut out = Vec::new();
    let Ok(Parsed::Complete(resp)) = head::response(bytes, is_head, &mut out) else {
        return;
    };
    assert!(resp.head_len <= bytes.len());
    out.extend_from_slice(b"\r\n");
    let mut storage = [httparse::EMPTY_HEADER; 128];
    let mut again = httparse::Response::new(&mut storage);
    let status = again.parse(&out).expect("the rewritten head parses");
    assert_eq!(status, httparse::Status::Complete(out.len()));
    assert_eq!(again.code, Some(resp.status));
    // What goes on is the cluster's fields unchanged, in order, less some: those that go are
    // hop-by-hop, named in `Connection`, or a `content-length` that chunked framing overrides.
    let mut original = [httparse::EMPTY_HEADER; 128];
    let mut first = httparse::Response::new(&mut original);
    first.parse(bytes).unwrap();
    let listed: Vec<String> = first
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|&b| b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).to_ascii_lowercase())
        .collect();
    let mut from = first.headers.iter();
    for h in again.headers.iter() {
        let found = from.any(|o| o.name == h.name && o.value == h.value);
        assert!(found, "{} forwarded changed or out of order", h.name);
    }
    for o in first.headers.iter() {
        let name = o.name.to_ascii_lowercase();
        let may_go = HOP_BY_HOP.contains(&name.as_str())
            || listed.contains(&name)
            || name == "content-length";
        if !may_go {
            assert!(
                again
                    .headers
                    .iter()
                    .any(|h| h.name == o.name && h.value == o.value),
                "{name} dropped"
            );
        }
    }
    for h in again.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        // RFC 9110 sections 8.6 and 15.3.5: a 204 carries no framing field, a 304 no
        // `transfer-encoding`.
        if resp.status == 204 {
            assert!(name != "content-length", "content-length on a 204");
        }
        if resp.status == 204 || resp.status == 304 {
            assert!(
                name != "transfer-encoding",
                "transfer-encoding on a {}",
                resp.status
            );
        }
        if name == "transfer-encoding" {
            assert!(resp.framing == Framing::Chunked || resp.framing == Framing::Empty);
            continue;
        }
        assert!(!HOP_BY_HOP.contains(&name.as_str()), "{name} forwarded");
    }
    if resp.framing == Framing::Close {
        assert!(!resp.keep_alive);
    }
}

fn chunked(split: usize, bytes: &[u8]) {
    let mut whole = Scanner::default();
    let whole_result = whole.scan(bytes);
    let at = split.min(bytes.len());
    let mut pieces = Scanner::default();
    let pieces_result = pieces.scan(&bytes[..at]).and_then(|n| {
        if n < at {
            Ok(n)
        } else {
            pieces.scan(&bytes[at..]).map(|m| n + m)
        }
    });
    assert_eq!(whole_result, pieces_result);
    assert_eq!(whole.is_done(), pieces.is_done());
}
