//! Request and response heads on the direct HTTP/1.1 path: which requests it takes, and the heads
//! it writes for the next hop. Pure: bytes in, bytes out.
//!
//! The rules are the ones the general path applies through `HeaderMap` ([`crate::proxy::headers`]):
//! hop-by-hop headers go, `x-forwarded-for` gains the client, `x-forwarded-proto` and
//! `x-forwarded-host` are set, `x-request-id` is kept or generated. Anything the direct path does
//! not handle itself (HTTP/1.0, upgrades, `Expect`, chunked uploads, absolute-form targets,
//! `Connection` naming other headers, ...) is a [`Parsed::Handoff`]: the connection goes on in the
//! general path, which knows every corner of the protocol.

use std::mem::MaybeUninit;
use std::net::IpAddr;

use crate::config::SplitKey;
use crate::proxy::headers::is_host;
use crate::proxy::split_key;
use crate::routing::key_hash;

/// Most header fields in a head (hyper's default too); more hands the request off.
pub const MAX_HEADERS: usize = 100;

/// The outcome of reading a head from the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    /// A whole head.
    Complete(T),
    /// More bytes are needed.
    Partial,
    /// Not for the direct path; the reason, a metric label (`rayshift_http1_handoffs_total`):
    /// `malformed`, `http1_0`, `connect`, `target`, `connection_option`, `transfer_encoding`,
    /// `upgrade`, `expect`, `content_length`, `no_host` (`informational` for a response).
    Handoff(&'static str),
}

/// A request head the direct path forwards; its upstream head has been written to `out`.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Bytes of the head in the client's buffer (the body follows).
    pub head_len: usize,
    /// `content-length` (0 without one).
    pub content_length: u64,
    /// `HEAD`: the response has no body whatever its headers say.
    pub is_head: bool,
    /// The method may be sent twice (RFC 9110 section 9.2.2).
    pub idempotent: bool,
    /// The client sent `Connection: close`.
    pub close: bool,
    /// The path (without the query) in the client's buffer, for routing.
    pub path: std::ops::Range<usize>,
    /// The hash of the request's split key, if it has one.
    pub split: Option<u64>,
    /// The request id in `out` (kept from the client or generated).
    pub request_id: std::ops::Range<usize>,
}

/// How the end of a response body is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304).
    Empty,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`, forwarded as it is.
    Chunked,
    /// Until the cluster closes the connection.
    Close,
}

/// A response head; its downstream head (without the final empty line) has been written to `out`.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Bytes of the head in the upstream buffer.
    pub head_len: usize,
    /// The status code.
    pub status: u16,
    /// Where the body ends.
    pub framing: Framing,
    /// The cluster keeps the connection open after this response.
    pub keep_alive: bool,
    /// The response carries its own `x-request-id`.
    pub has_request_id: bool,
}

/// What is wrong with a cluster's response head.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadResponse {
    /// Not HTTP/1.x.
    #[error("malformed response head: {0}")]
    Malformed(httparse::Error),
    /// `101` to a request that asked for no upgrade.
    #[error("unexpected 101 Switching Protocols")]
    UnexpectedUpgrade,
    /// A transfer coding other than chunked.
    #[error("unsupported transfer-encoding")]
    TransferEncoding,
    /// A `content-length` that is not one number.
    #[error("content_length")]
    ContentLength,
    /// A status code below 100.
    #[error("invalid status code {0}")]
    Status(u16),
}

/// Per-connection inputs of the request rewrite.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// The client's address, formatted once per connection.
    pub peer: &'a [u8],
    /// The client's address, for a `client_ip` split.
    pub ip: IpAddr,
    /// `x-forwarded-proto`.
    pub proto: &'static str,
    /// How requests are keyed for a sticky split.
    pub split_key: &'a SplitKey,
}

/// Parses a request head from `buf` and, when the direct path takes it, writes the head for the
/// cluster into `out` (cleared first).
pub fn request(buf: &[u8], client: Client<'_>, out: &mut Vec<u8>) -> Parsed<Request> {
    let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let head_len = match req.parse_with_uninit_headers(buf, &mut storage) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Handoff("malformed"),
    };
    if req.version != Some(1) {
        return Parsed::Handoff("http1_0");
    }
    let (Some(method), Some(target)) = (req.method, req.path) else {
        return Parsed::Handoff("malformed");
    };
    // Methods are case-sensitive: `CONNECT` asks for a tunnel (the general path refuses it).
    if method == "CONNECT" {
        return Parsed::Handoff("connect");
    }
    if !is_origin_form(target.as_bytes()) {
        return Parsed::Handoff("target");
    }
    let path_len = target.find('?').unwrap_or(target.len());
    let path_start = target.as_ptr() as usize - buf.as_ptr() as usize;

    out.clear();
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");

    let mut content_length = None;
    let mut close = false;
    let mut host: Option<&[u8]> = None;
    let mut forwarded_for: Option<&[u8]> = None;
    let mut request_id = None;
    let mut split = None;
    let mut lines = Lines::new(buf);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if split.is_none() {
            split = match client.split_key {
                SplitKey::Header(key) if name.eq_ignore_ascii_case(key.as_str().as_bytes()) => {
                    Some(key_hash(value))
                }
                SplitKey::Cookie(key) if is_name(name, b"cookie") => {
                    split_key::cookie_in(value, key).map(key_hash)
                }
                _ => None,
            };
        }
        // Lengths first: most names are ruled out by one comparison.
        match name.len() {
            4 if is_name(name, b"host") => {
                // Several `Host` fields: the gateway and Serve could read different hosts
                // (RFC 9112 section 3.2 asks for a 400, which the general path answers).
                if host.is_some() {
                    return Parsed::Handoff("malformed");
                }
                host = Some(value);
            }
            10 if is_name(name, b"connection") => {
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        return Parsed::Handoff("connection_option");
                    }
                }
                continue;
            }
            10 if is_name(name, b"keep-alive") => continue,
            2 if is_name(name, b"te") => continue,
            16 if is_name(name, b"proxy-connection") => continue,
            17 if is_name(name, b"transfer-encoding") => {
                return Parsed::Handoff("transfer_encoding")
            }
            7 if is_name(name, b"upgrade") => return Parsed::Handoff("upgrade"),
            6 if is_name(name, b"expect") => return Parsed::Handoff("expect"),
            14 if is_name(name, b"content-length") => {
                if content_length.is_some() {
                    return Parsed::Handoff("content_length");
                }
                match parse_length(value) {
                    Some(n) => content_length = Some(n),
                    None => return Parsed::Handoff("content_length"),
                }
            }
            15 if is_name(name, b"x-forwarded-for") => {
                // Several lines are one list (a proxy in front may add its own line): the general
                // path joins them.
                if forwarded_for.is_some() {
                    return Parsed::Handoff("forwarded_for");
                }
                forwarded_for = Some(value);
                continue;
            }
            17 if is_name(name, b"x-forwarded-proto") => continue,
            16 if is_name(name, b"x-forwarded-host") => continue,
            12 if is_name(name, b"x-request-id") => {
                if request_id.is_none() {
                    if value.is_empty() {
                        // An empty id is replaced (with all other `x-request-id` fields).
                        request_id = Some(None);
                    } else {
                        lines.flush(out);
                        let start = out.len() + name.len() + 2;
                        request_id = Some(Some(start..start + value.len()));
                    }
                }
                if request_id == Some(None) {
                    continue;
                }
            }
            _ => {}
        }
        lines.push(out, name, value);
    }
    lines.flush(out);
    let Some(host) = host else {
        return Parsed::Handoff("no_host");
    };
    if !is_host(host) {
        // The general path answers 400.
        return Parsed::Handoff("malformed");
    }
    // The chain grows by the client; an earlier value that is not text starts a new one.
    out.extend_from_slice(b"x-forwarded-for: ");
    if let Some(prev) = forwarded_for.filter(|v| is_text(v) && !v.trim_ascii().is_empty()) {
        out.extend_from_slice(prev);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(client.peer);
    out.extend_from_slice(b"\r\nx-forwarded-proto: ");
    out.extend_from_slice(client.proto.as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"x-forwarded-host", host);
    let request_id = match request_id {
        Some(Some(range)) => range,
        None | Some(None) => {
            out.extend_from_slice(b"x-request-id: ");
            let start = out.len();
            out.extend_from_slice(&new_request_id());
            let range = start..out.len();
            out.extend_from_slice(b"\r\n");
            range
        }
    };
    out.extend_from_slice(b"\r\n");
    if let SplitKey::ClientIp = client.split_key {
        split = Some(split_key::ip_hash(client.ip));
    }
    Parsed::Complete(Request {
        head_len,
        content_length: content_length.unwrap_or(0),
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        close,
        path: path_start..path_start + path_len,
        split,
        request_id,
    })
}

/// Parses a response head from `buf` (for a request that was a `HEAD` when `is_head`) and writes
/// the head for the client into `out` (cleared first), without the empty line that ends it.
///
/// Informational responses (`100`, `103`) come back as [`Parsed::Handoff`] with reason
/// `"informational"` and `head_len` in [`informational_len`]: the caller skips them.
pub fn response(
    buf: &[u8],
    is_head: bool,
    out: &mut Vec<u8>,
) -> Result<Parsed<Response>, BadResponse> {
    let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(Parsed::Partial),
        Err(e) => return Err(BadResponse::Malformed(e)),
    };
    let status = resp.code.unwrap_or(0);
    if status < 100 {
        return Err(BadResponse::Status(status));
    }
    if status == 101 {
        return Err(BadResponse::UnexpectedUpgrade);
    }
    if (100..200).contains(&status) {
        return Ok(Parsed::Handoff("informational"));
    }
    let mut keep_alive = resp.version == Some(1);
    // Names listed in `Connection` are hop-by-hop too (rare: looked for before writing anything).
    let mut listed: Vec<&[u8]> = Vec::new();
    for h in resp.headers.iter() {
        if is_name(h.name.as_bytes(), b"connection") {
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                    listed.push(token);
                }
            }
        }
    }
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status);
    out.push(b' ');
    out.extend_from_slice(resp.reason.unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut length = None;
    let mut chunked = false;
    let mut has_request_id = false;
    let mut length_at = None;
    let mut te_at = None;
    let mut lines = Lines::new(buf);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        match name.len() {
            10 if is_name(name, b"connection") || is_name(name, b"keep-alive") => continue,
            2 if is_name(name, b"te") => continue,
            7 if is_name(name, b"upgrade") => continue,
            16 if is_name(name, b"proxy-connection") => continue,
            // The framing fields and the request id are never dropped for being listed in
            // `Connection`: the body's framing depends on them.
            17 if is_name(name, b"transfer-encoding") => {
                if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                    return Err(BadResponse::TransferEncoding);
                }
                chunked = true;
                lines.flush(out);
                te_at = Some(out.len()..out.len() + name.len() + h.value.len() + 4);
            }
            14 if is_name(name, b"content-length") => {
                let n = parse_length(h.value).ok_or(BadResponse::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(BadResponse::ContentLength);
                }
                if length.is_some() {
                    continue;
                }
                length = Some(n);
                lines.flush(out);
                length_at = Some(out.len()..out.len() + name.len() + h.value.len() + 4);
            }
            12 if is_name(name, b"x-request-id") => has_request_id = true,
            _ if !listed.is_empty() && listed.iter().any(|l| l.eq_ignore_ascii_case(name)) => {
                continue
            }
            _ => {}
        }
        lines.push(out, name, h.value);
    }
    lines.flush(out);
    // Chunked framing wins over a length (RFC 9112 section 6.3): the length is not forwarded, and
    // as a sender that sent both may frame its next response wrongly too, the connection is not
    // reused. A 204 carries neither field, a 304 no `transfer-encoding` (RFC 9110 sections 8.6,
    // 15.3.5; RFC 9112 section 6.1): they are not forwarded either.
    let cut_length = length_at.filter(|_| chunked || status == 204);
    let cut_te = te_at.filter(|_| status == 204 || status == 304);
    // The later one first, so that the earlier one's place holds.
    let (first, second) = match (cut_length, cut_te) {
        (Some(l), Some(t)) if l.start < t.start => (Some(t), Some(l)),
        (l, t) => (l, t),
    };
    for range in [first, second].into_iter().flatten() {
        out.drain(range);
    }
    if chunked && length.is_some() {
        keep_alive = false;
    }
    if (status == 204 || status == 304) && (chunked || length.is_some_and(|n| n > 0)) {
        // No body by definition, but one declared: a server that sends it anyway would have it
        // read as the answer to the connection's next request. Not reused.
        keep_alive = false;
    }
    let framing = if is_head || status == 204 || status == 304 {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Parsed::Complete(Response {
        head_len,
        status,
        framing,
        keep_alive,
        has_request_id,
    }))
}

/// The length of the informational (1xx) head at the start of `buf`, if there is a whole one.
pub fn informational_len(buf: &[u8]) -> Option<usize> {
    let mut storage = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut storage,
    ) {
        Ok(httparse::Status::Complete(n)) if resp.code.is_some_and(|c| (100..200).contains(&c)) => {
            Some(n)
        }
        _ => None,
    }
}

/// Writes a whole response the gateway makes itself (errors), body included unless it answers a
/// `HEAD` request.
pub fn local_response(
    out: &mut Vec<u8>,
    status: http::StatusCode,
    request_id: &[u8],
    close: bool,
    is_head: bool,
    body: &str,
) {
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    push_status(out, status.as_u16());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ");
    out.extend_from_slice(body.len().to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    push_header(out, b"x-request-id", request_id);
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !is_head {
        out.extend_from_slice(body.as_bytes());
    }
}

/// Header lines written to a head for the next hop. A line received as `name: value\r\n`, the
/// form [`push_header`] writes, is copied as it came, and lines that follow each other in the
/// received head as one slice: the bytes written are the same, with fewer copies.
struct Lines<'b> {
    buf: &'b [u8],
    /// Lines of `buf` not yet written.
    run: std::ops::Range<usize>,
}

impl<'b> Lines<'b> {
    fn new(buf: &'b [u8]) -> Self {
        Lines { buf, run: 0..0 }
    }

    /// Writes the field `name: value` (both slices of `buf`), now or with the lines around it.
    fn push(&mut self, out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
        let base = self.buf.as_ptr() as usize;
        let start = name.as_ptr() as usize - base;
        let value_start = start + name.len() + 2;
        let end = value_start + value.len() + 2;
        let canonical = !value.is_empty()
            && value.as_ptr() as usize == base + value_start
            && self.buf.get(value_start - 2..value_start) == Some(b": ")
            && self.buf.get(end - 2..end) == Some(b"\r\n");
        if !canonical {
            self.flush(out);
            push_header(out, name, value);
        } else if !self.run.is_empty() && self.run.end == start {
            self.run.end = end;
        } else {
            self.flush(out);
            self.run = start..end;
        }
    }

    /// Writes the lines held back.
    fn flush(&mut self, out: &mut Vec<u8>) {
        if !self.run.is_empty() {
            out.extend_from_slice(&self.buf[self.run.clone()]);
            self.run = 0..0;
        }
    }
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Whether a header name (a token: httparse checked it) is `lower`, a name of lowercase letters,
/// digits and `-`, in any case. Setting bit 5 lowercases a letter, and no other token character
/// turns into one of `lower`'s that way: one pass without branches, where `eq_ignore_ascii_case`
/// lowercases both sides byte by byte.
#[inline]
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower
        .iter()
        .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
    name.len() == lower.len()
        && name
            .iter()
            .zip(lower)
            .fold(0u8, |diff, (&a, &b)| diff | ((a | 0x20) ^ b))
            == 0
}

fn push_status(out: &mut Vec<u8>, status: u16) {
    let status = status.min(999);
    out.extend_from_slice(&[
        b'0' + (status / 100) as u8,
        b'0' + (status / 10 % 10) as u8,
        b'0' + (status % 10) as u8,
    ]);
}

/// A `content-length` value: decimal digits only, at most 19 of them.
fn parse_length(value: &[u8]) -> Option<u64> {
    let value = value.trim_ascii();
    if value.is_empty() || value.len() > 19 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(
        value
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

/// A header value `HeaderValue::to_str` accepts: visible ASCII, space and tab.
fn is_text(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
}

/// Longest request target `http::Uri` accepts (hyper answers 400 to a longer one).
const MAX_TARGET_LEN: usize = u16::MAX as usize - 1;

/// An origin-form target (`/path?query`) that `http::uri::PathAndQuery`, which hyper parses
/// targets with, accepts as it is: its byte classes for the path and for the query, ASCII only,
/// no fragment (`#`), at most [`MAX_TARGET_LEN`] bytes. Anything else hands the request to the
/// general path, which answers it as hyper does (400 for what `http` refuses).
fn is_origin_form(target: &[u8]) -> bool {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(i) => (&target[..i], &target[i + 1..]),
        None => (target, &[][..]),
    };
    target.len() <= MAX_TARGET_LEN
        && path.first() == Some(&b'/')
        && path
            .iter()
            .all(|&b| matches!(b, 0x21 | 0x22 | 0x24..=0x3B | 0x3D | 0x40..=0x5F | 0x61..=0x7E))
        && query
            .iter()
            .all(|&b| matches!(b, 0x21 | 0x24..=0x3B | 0x3D | 0x3F..=0x7E))
}

/// 32 lowercase hex digits of randomness, as [`crate::proxy::headers::ensure_request_id`].
fn new_request_id() -> [u8; 32] {
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&hex8((n >> (96 - 32 * i)) as u32));
    }
    buf
}

/// The 8 lowercase hex digits of `x`, most significant first, computed on all of them at once:
/// each nibble spread into its own byte, then `'0'` added, and `'a' - '0' - 10` more where the
/// nibble is over 9.
fn hex8(x: u32) -> [u8; 8] {
    let mut v = u64::from(x);
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // Byte k of `v` now holds nibble k of `x`.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (v + 0x3030_3030_3030_3030 + letters * 0x27).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(key: &SplitKey) -> Client<'_> {
        Client {
            peer: b"127.0.0.9",
            ip: "127.0.0.9".parse().unwrap(),
            proto: "http",
            split_key: key,
        }
    }

    fn rewrite(raw: &str) -> (Parsed<Request>, String) {
        let mut out = Vec::new();
        let parsed = request(raw.as_bytes(), client(&SplitKey::None), &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    /// Every token character against every name the parser looks for: `is_name` agrees with
    /// `eq_ignore_ascii_case` wherever httparse lets a name through.
    #[test]
    fn is_name_agrees_with_eq_ignore_ascii_case_on_token_characters() {
        let tchar: Vec<u8> = (0u8..=255)
            .filter(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b))
            .collect();
        for lower in [
            &b"content-length"[..],
            b"te",
            b"x-request-id",
            b"host",
            b"a1-",
        ] {
            for pos in 0..lower.len() {
                for &c in &tchar {
                    let mut name = lower.to_vec();
                    name[pos] = c;
                    assert_eq!(
                        is_name(&name, lower),
                        name.eq_ignore_ascii_case(lower),
                        "{:?} vs {:?}",
                        String::from_utf8_lossy(&name),
                        String::from_utf8_lossy(lower)
                    );
                }
            }
            assert!(!is_name(&lower[1..], lower));
        }
        assert!(is_name(b"Content-LENGTH", b"content-length"));
    }

    #[test]
    fn hex8_writes_what_format_writes() {
        for x in [
            0,
            9,
            10,
            15,
            0x0123_4567,
            0x89ab_cdef,
            0xdead_beef,
            u32::MAX,
        ] {
            assert_eq!(hex8(x), *format!("{x:08x}").as_bytes(), "{x:#x}");
        }
        for _ in 0..10_000 {
            let x = fastrand::u32(..);
            assert_eq!(hex8(x), *format!("{x:08x}").as_bytes(), "{x:#x}");
        }
        let id = new_request_id();
        assert!(id
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }

    #[test]
    fn a_plain_get_is_rewritten_for_the_cluster() {
        let raw = "GET /app/x?q=1 HTTP/1.1\r\nHost: api.example\r\nConnection: keep-alive\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nx-request-id: abc\r\nAccept: */*\r\n\r\nNEXT";
        let (parsed, out) = rewrite(raw);
        let Parsed::Complete(req) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(req.head_len, raw.len() - 4);
        assert_eq!(&raw[req.path.clone()], "/app/x");
        assert_eq!(&out[req.request_id.clone()], "abc");
        assert!(req.idempotent && !req.is_head && !req.close);
        assert_eq!(req.content_length, 0);
        assert_eq!(
            out,
            "GET /app/x?q=1 HTTP/1.1\r\nHost: api.example\r\nx-request-id: abc\r\nAccept: */*\r\n\
             x-forwarded-for: 10.0.0.1, 127.0.0.9\r\nx-forwarded-proto: http\r\n\
             x-forwarded-host: api.example\r\n\r\n"
        );
    }

    #[test]
    fn a_missing_or_empty_request_id_is_generated() {
        for raw in [
            "POST /a HTTP/1.1\r\nhost: h\r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc",
            "POST /a HTTP/1.1\r\nhost: h\r\nx-request-id: \r\ncontent-length: 3\r\nconnection: close\r\n\r\nabc",
        ] {
            let (parsed, out) = rewrite(raw);
            let Parsed::Complete(req) = parsed else {
                panic!("{parsed:?}")
            };
            assert_eq!(req.content_length, 3);
            assert!(req.close && !req.idempotent);
            let id = &out[req.request_id.clone()];
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
            assert_eq!(out.matches("x-request-id").count(), 1, "{out}");
            assert!(out.contains("x-forwarded-for: 127.0.0.9\r\n"), "{out}");
            assert!(!out.to_ascii_lowercase().contains("connection"), "{out}");
        }
    }

    #[test]
    fn what_the_direct_path_does_not_take_is_handed_off() {
        for raw in [
            "GET / HTTP/1.0\r\nHost: h\r\n\r\n",
            "GET http://h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: h\r\ncontent-length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: h\r\nConnection: x-secret\r\nx-secret: 1\r\n\r\n",
            "CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
            "CONNECT /app/x HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /app/<script> HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /app?q=\"x\" HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: h\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(
                matches!(rewrite(raw).0, Parsed::Handoff(_)),
                "{raw:?} was taken"
            );
        }
        assert_eq!(rewrite("GET / HTTP/1.1\r\nHost: h\r\n").0, Parsed::Partial);
    }

    #[test]
    fn split_keys_are_read_from_the_raw_head() {
        let raw = b"GET / HTTP/1.1\r\nHost: h\r\nCookie: a=1; sid=alice\r\nX-User: bob\r\n\r\n";
        let mut out = Vec::new();
        let split = |key: &SplitKey, out: &mut Vec<u8>| match request(raw, client(key), out) {
            Parsed::Complete(r) => r.split,
            other => panic!("{other:?}"),
        };
        let header = SplitKey::Header(http::HeaderName::from_static("x-user"));
        assert_eq!(split(&header, &mut out), Some(key_hash(b"bob")));
        assert_eq!(
            split(&SplitKey::Cookie("sid".into()), &mut out),
            Some(key_hash(b"alice"))
        );
        assert_eq!(split(&SplitKey::Cookie("nope".into()), &mut out), None);
        assert_eq!(split(&SplitKey::None, &mut out), None);
        assert_eq!(
            split(&SplitKey::ClientIp, &mut out),
            Some(split_key::ip_hash("127.0.0.9".parse().unwrap()))
        );
    }

    fn response_of(raw: &str, is_head: bool) -> (Result<Parsed<Response>, BadResponse>, String) {
        let mut out = Vec::new();
        let parsed = response(raw.as_bytes(), is_head, &mut out);
        (parsed, String::from_utf8(out).unwrap())
    }

    /// Lines in other forms than `name: value\r\n` (no space, more spaces, trailing blanks, a
    /// bare `\n`, an empty value) are written in that form; lines in it are copied, and the
    /// forms mix in any order.
    #[test]
    fn header_lines_are_written_in_one_form_whatever_form_they_came_in() {
        let raw = "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nA:1\r\nB:   2  \r\nC: 3\nD: 4\r\nE:\r\nF: 6\r\nContent-Length: 3\r\nG: 7\r\nConnection: close\r\nH: 8\r\n\r\nabc";
        let (parsed, out) = response_of(raw, false);
        assert!(matches!(parsed, Ok(Parsed::Complete(_))), "{parsed:?}");
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nServer: s\r\nDate: d\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: \r\nF: 6\r\nContent-Length: 3\r\nG: 7\r\nH: 8\r\n"
        );

        let req = "GET / HTTP/1.1\r\nA: 1\r\nHost:h\r\nB: 2\r\nC: 3\r\nx-request-id:  id-1\r\nD: 4\r\n\r\n";
        let (parsed, out) = rewrite(req);
        let Parsed::Complete(parsed) = parsed else {
            panic!("{parsed:?}")
        };
        assert!(out.starts_with(
            "GET / HTTP/1.1\r\nA: 1\r\nHost: h\r\nB: 2\r\nC: 3\r\nx-request-id: id-1\r\nD: 4\r\nx-forwarded-for: "
        ), "{out}");
        assert_eq!(&out[parsed.request_id], "id-1");
    }

    /// A 204 or 304 has no body, whatever it declares; one that declares a body is not reused
    /// (bytes the server might still send would be taken as the next request's answer). A
    /// response to HEAD with a length is the usual case and keeps its connection.
    #[test]
    fn a_bodiless_status_that_declares_a_body_ends_its_connection() {
        for (raw, is_head, keep_alive) in [
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 38\r\n\r\n",
                false,
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n",
                false,
                true,
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", false, true),
            ("HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\n", true, true),
        ] {
            let (parsed, _) = response_of(raw, is_head);
            let Ok(Parsed::Complete(resp)) = parsed else {
                panic!("{parsed:?}")
            };
            assert_eq!(
                (resp.framing, resp.keep_alive),
                (Framing::Empty, keep_alive),
                "{raw:?}"
            );
        }
    }

    /// A 204 goes out without `content-length` and `transfer-encoding`, a 304 without
    /// `transfer-encoding`; a response with both framing fields loses its length and ends its
    /// upstream connection.
    #[test]
    fn bodiless_statuses_and_double_framing_are_forwarded_without_the_fields() {
        for (raw, forwarded, keep_alive) in [
            (
                "HTTP/1.1 204 No Content\r\ncontent-length: 5\r\nx-a: 1\r\n\r\n",
                "HTTP/1.1 204 No Content\r\nx-a: 1\r\n",
                false,
            ),
            (
                "HTTP/1.1 204 No Content\r\nx-a: 1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
                "HTTP/1.1 204 No Content\r\nx-a: 1\r\n",
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\netag: x\r\n\r\n",
                "HTTP/1.1 304 Not Modified\r\netag: x\r\n",
                false,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n",
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n",
                true,
            ),
        ] {
            let (parsed, out) = response_of(raw, false);
            let Ok(Parsed::Complete(resp)) = parsed else {
                panic!("{parsed:?}")
            };
            assert_eq!(out, forwarded, "{raw:?}");
            assert_eq!(resp.keep_alive, keep_alive, "{raw:?}");
        }
    }

    /// Several `x-forwarded-for` lines are one list: the general path joins them.
    #[test]
    fn repeated_forwarded_for_lines_go_to_the_general_path() {
        let raw = "GET /a HTTP/1.1\r\nhost: h\r\nx-forwarded-for: 6.6.6.6\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n";
        assert!(matches!(rewrite(raw).0, Parsed::Handoff("forwarded_for")));
    }

    /// A `Host` that is no host (RFC 9112 section 3.2) goes to the general path, which answers
    /// 400; an empty one is allowed.
    #[test]
    fn an_invalid_host_goes_to_the_general_path() {
        for host in ["h\u{7f}", "a b", "h/x", "h@x", "\"h\""] {
            let raw = format!("GET /a HTTP/1.1\r\nhost: {host}\r\n\r\n");
            assert!(
                matches!(rewrite(&raw).0, Parsed::Handoff("malformed")),
                "{host:?}"
            );
        }
        for host in [
            "",
            "api.example",
            "api.example:8080",
            "[::1]:80",
            "10.0.0.1",
            "x_y-z.~",
        ] {
            let raw = format!("GET /a HTTP/1.1\r\nhost: {host}\r\n\r\n");
            assert!(matches!(rewrite(&raw).0, Parsed::Complete(_)), "{host:?}");
        }
    }

    /// The targets taken are exactly those `http::uri::PathAndQuery` (hyper's parser) accepts,
    /// byte by byte in the path and in the query, less fragments (handed off) and non-ASCII.
    #[test]
    fn targets_taken_are_the_ones_http_accepts() {
        for b in 0u8..0x80 {
            for target in [
                [b"/a".as_slice(), &[b], b"b"].concat(),
                [b"/a?q=".as_slice(), &[b], b"x"].concat(),
            ] {
                let http_ok = http::uri::PathAndQuery::try_from(target.as_slice()).is_ok();
                assert_eq!(
                    is_origin_form(&target),
                    http_ok && b != b'#',
                    "{:?}",
                    String::from_utf8_lossy(&target)
                );
            }
        }
        let longest = [b"/".as_slice(), &vec![b'a'; MAX_TARGET_LEN - 1]].concat();
        assert!(is_origin_form(&longest));
        assert!(http::uri::PathAndQuery::try_from(longest.as_slice()).is_ok());
        let too_long = [longest.as_slice(), b"a"].concat();
        assert!(!is_origin_form(&too_long));
        assert!(http::uri::PathAndQuery::try_from(too_long.as_slice()).is_err());
        assert!(!is_origin_form(b"*") && !is_origin_form(b"?q") && !is_origin_form(b""));
    }

    #[test]
    fn response_heads_lose_hop_by_hop_fields_and_know_their_framing() {
        let raw = "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, x-hop\r\nKeep-Alive: timeout=5\r\nx-hop: 1\r\nx-request-id: r1\r\n\r\nabc";
        let (parsed, out) = response_of(raw, false);
        let Ok(Parsed::Complete(resp)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(resp.head_len, raw.len() - 3);
        assert_eq!(
            (resp.status, resp.framing, resp.keep_alive),
            (200, Framing::Length(3), true)
        );
        assert!(resp.has_request_id);
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nx-request-id: r1\r\n"
        );

        let chunked = "HTTP/1.1 200 OK\r\ncontent-length: 9\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (parsed, out) = response_of(chunked, false);
        let Ok(Parsed::Complete(resp)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(resp.framing, Framing::Chunked);
        assert_eq!(out, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n");

        let (parsed, _) = response_of("HTTP/1.0 200 OK\r\n\r\nbody", false);
        let Ok(Parsed::Complete(resp)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!((resp.framing, resp.keep_alive), (Framing::Close, false));

        let (parsed, _) = response_of(
            "HTTP/1.1 200 OK\r\nConnection: close\r\ncontent-length: 5\r\n\r\n",
            true,
        );
        let Ok(Parsed::Complete(resp)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!((resp.framing, resp.keep_alive), (Framing::Empty, false));
        let (parsed, _) = response_of(
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
            false,
        );
        assert!(matches!(
            parsed,
            Ok(Parsed::Complete(Response {
                framing: Framing::Empty,
                ..
            }))
        ));
    }

    #[test]
    fn framing_fields_listed_in_connection_are_kept() {
        let raw = "HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding, x-request-id, x-hop\r\n\
                   Content-Length: 3\r\nTransfer-Encoding: chunked\r\nx-request-id: r\r\nx-hop: 1\r\n\r\n";
        let (parsed, out) = response_of(raw, false);
        let Ok(Parsed::Complete(resp)) = parsed else {
            panic!("{parsed:?}")
        };
        assert_eq!(
            (resp.framing, resp.has_request_id),
            (Framing::Chunked, true)
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-request-id: r\r\n"
        );
    }

    #[test]
    fn bad_and_informational_responses() {
        assert_eq!(
            response_of("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false).0,
            Err(BadResponse::TransferEncoding)
        );
        assert_eq!(
            response_of(
                "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .0,
            Err(BadResponse::ContentLength)
        );
        assert_eq!(
            response_of("HTTP/1.1 101 Switching Protocols\r\n\r\n", false).0,
            Err(BadResponse::UnexpectedUpgrade)
        );
        assert_eq!(
            response_of("HTTP/1.1 042 Odd\r\n\r\n", false).0,
            Err(BadResponse::Status(42))
        );
        assert!(matches!(
            response_of("SSH-2.0-x\r\n\r\n", false).0,
            Err(BadResponse::Malformed(_))
        ));
        let early = "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n";
        assert_eq!(
            response_of(early, false).0,
            Ok(Parsed::Handoff("informational"))
        );
        assert_eq!(informational_len(early.as_bytes()), Some(early.len() - 17));
        assert_eq!(
            response_of("HTTP/1.1 200 OK\r\n", false).0,
            Ok(Parsed::Partial)
        );
    }

    #[test]
    fn local_responses_are_whole() {
        let mut out = Vec::new();
        let status = http::StatusCode::BAD_GATEWAY;
        local_response(&mut out, status, b"id1", true, false, "oops\n");
        let whole = "HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain; charset=utf-8\r\n\
             content-length: 5\r\nx-request-id: id1\r\nconnection: close\r\n\r\noops\n";
        assert_eq!(String::from_utf8(out.clone()).unwrap(), whole);
        // To a HEAD request: the same head, no body (the client reads none).
        local_response(&mut out, status, b"id1", true, true, "oops\n");
        assert_eq!(String::from_utf8(out).unwrap(), &whole[..whole.len() - 5]);
    }
}
