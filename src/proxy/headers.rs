//! Header hygiene between client and Serve: hop-by-hop removal, `x-forwarded-*`, `x-request-id`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-forwarded-for`: the client chain.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`: the scheme the client used to reach the gateway.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `x-forwarded-host`: the host the client asked for.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// `x-request-id`: Serve's request id; kept when the client sends one, generated otherwise.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one hop and are never forwarded (RFC 9110 section 7.6.1). `Trailer` is
/// not one of them: it announces the trailer fields, which hyper only writes when it is present.
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// True when the request asks to switch protocols (`Connection: upgrade` plus an `Upgrade` header).
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers, including those the `Connection` header names. For an upgrade the
/// `Upgrade` header and `Connection: upgrade` are kept, since the next hop must see them.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    remove_hop_by_hop_keeping(headers, keep_upgrade, &[]);
}

/// The head of a response for the client: hop-by-hop headers removed, except that the framing
/// and the request id are never dropped for being listed in `Connection` (as on the direct path);
/// a `content-length` next to `transfer-encoding` goes (the body was read as chunked: RFC 9112
/// section 6.3), as the client's framing is hyper's to set.
pub fn clean_response(headers: &mut HeaderMap) {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    remove_hop_by_hop_keeping(headers, false, &[&header::CONTENT_LENGTH, &X_REQUEST_ID]);
}

/// Gives the response its request id: the cluster's `x-request-id` if it sent one, else
/// `request_id`, each marked never to be indexed by an HTTP/2 client's HPACK table (RFC 7541
/// section 7.1.3). A value unique to each response only fills that table, one entry per response,
/// pushing out the fields that do repeat (`server`, `content-type`), and the encoder compares
/// every new id against each id the table holds. HTTP/1.1 responses are written the same either way.
pub fn set_response_request_id(headers: &mut HeaderMap, request_id: HeaderValue) {
    match headers.entry(&X_REQUEST_ID) {
        header::Entry::Occupied(mut ids) => ids.iter_mut().for_each(|id| id.set_sensitive(true)),
        header::Entry::Vacant(slot) => {
            let mut id = request_id;
            id.set_sensitive(true);
            slot.insert(id);
        }
    }
}

/// Every cookie in one `cookie` field: HTTP/2 clients may split them into several fields, which
/// HTTP/1.1 does not allow (RFC 9113 section 8.2.3); joined with `"; "`.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, value);
    }
}

fn remove_hop_by_hop_keeping(headers: &mut HeaderMap, keep_upgrade: bool, keep: &[&HeaderName]) {
    // One pass over the few names finds which hop-by-hop headers are there (bit i: HOP_BY_HOP[i]);
    // most requests have none, and then nothing is hashed or removed.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names listed in Connection are hop-by-hop too; collect before removing Connection itself.
    // The common options `keep-alive` and `close` name no other header.
    if present & 1 != 0 {
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for name in listed {
            if (keep_upgrade && name == header::UPGRADE) || keep.contains(&&name) {
                continue;
            }
            headers.remove(name);
        }
    }
    let upgrade = if keep_upgrade {
        headers.remove(header::UPGRADE)
    } else {
        None
    };
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether `value` is a `Host` field value: empty, or a host (a name, an IPv4 address or an IP
/// literal in brackets) and an optional port, in the bytes RFC 3986 allows there (section 3.2.2:
/// unreserved, percent-encoded, sub-delimiters; `:` and brackets). No user information (`@`),
/// path or whitespace.
pub fn is_host(value: &[u8]) -> bool {
    value.iter().all(|&b| HOST_BYTES[b as usize])
}

/// The bytes [`is_host`] allows, by value (one load per byte on the request path).
static HOST_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~%!$&'()*+,;=:[]";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// What the gateway cannot forward in a message's `transfer-encoding`: a coding other than
/// `chunked` (the framing is taken off and the field with it, hop-by-hop, so the coding's name
/// would be lost while the body stays coded), or `chunked` applied twice (RFC 9112 section 6.1).
/// `Err` holds the status a request gets (501 for a coding, 400 for the double `chunked`) and
/// the message.
pub fn check_transfer_codings(headers: &HeaderMap) -> Result<(), (http::StatusCode, String)> {
    let mut chunked = false;
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        let codings = value
            .as_bytes()
            .split(|&b| b == b',')
            .map(<[u8]>::trim_ascii);
        for coding in codings.filter(|c| !c.is_empty()) {
            if !coding.eq_ignore_ascii_case(b"chunked") {
                let coding = String::from_utf8_lossy(coding);
                return Err((
                    http::StatusCode::NOT_IMPLEMENTED,
                    format!("transfer coding \"{coding}\" is not supported (only chunked)\n"),
                ));
            }
            if chunked {
                return Err((
                    http::StatusCode::BAD_REQUEST,
                    "transfer-encoding applies chunked more than once\n".into(),
                ));
            }
            chunked = true;
        }
    }
    Ok(())
}

/// The client's address as a header value: made once per connection, shared by its requests. An
/// IPv4 client of a dual-stack (`[::]`) listener arrives as an IPv4-mapped IPv6 address and is
/// written as its IPv4 address (`192.0.2.7`, not `::ffff:192.0.2.7`), as the split hashes it.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(peer.to_canonical().to_string()))
        .expect("an IP address is a valid header value")
}

/// Sets `x-forwarded-for` (appending the peer, see [`peer_value`]), `x-forwarded-proto` and
/// `x-forwarded-host`.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: &HeaderValue,
    proto: &'static str,
    host: Option<HeaderValue>,
) {
    // Every field line of the chain, in order (RFC 9110 section 5.3: one list): a proxy in front
    // may have added its own line after the client's. A line that is not text is left out.
    let mut prev = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .peekable();
    let chain = match prev.peek() {
        Some(_) => {
            let mut chain = prev.collect::<Vec<_>>().join(", ");
            chain.push_str(", ");
            chain.push_str(peer.to_str().unwrap_or_default());
            HeaderValue::from_str(&chain).ok()
        }
        None => Some(peer.clone()),
    };
    if let Some(chain) = chain {
        headers.insert(X_FORWARDED_FOR.clone(), chain);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    match host {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        None => {
            headers.remove(&X_FORWARDED_HOST);
        }
    }
}

/// Returns the request's `x-request-id`, generating (and inserting) a random one when absent.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID) {
        if !id.is_empty() {
            return id.clone();
        }
    }
    let id = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// 32 lowercase hex digits of randomness.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    let mut buf = [0u8; 32];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = HEX[((n >> (4 * (31 - i))) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&buf).expect("hex digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
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
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "h2c"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = map(&[("cookie", "a=1"), ("x", "y"), ("cookie", "sid=s; b=2")]);
        join_cookies(&mut h);
        assert_eq!(
            h.get_all("cookie").iter().collect::<Vec<_>>(),
            ["a=1; sid=s; b=2"]
        );
        let mut one = map(&[("cookie", "a=1")]);
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1");
    }

    #[test]
    fn responses_keep_framing_and_request_id_and_lose_a_length_beside_chunked() {
        let mut h = map(&[
            ("connection", "x-request-id, content-length, x-hop"),
            ("x-request-id", "up-1"),
            ("content-length", "5"),
            ("x-hop", "1"),
        ]);
        clean_response(&mut h);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h["x-request-id"], "up-1");
        assert_eq!(h["content-length"], "5");

        let mut both = map(&[("transfer-encoding", "chunked"), ("content-length", "2")]);
        clean_response(&mut both);
        assert!(both.is_empty(), "{both:?}");
    }

    #[test]
    fn trailer_announcement_is_end_to_end() {
        let mut h = map(&[("trailer", "x-checksum"), ("transfer-encoding", "chunked")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h["trailer"], "x-checksum");
        assert!(!h.contains_key("transfer-encoding"));
    }

    #[test]
    fn upgrade_keeps_upgrade_and_connection() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("keep-alive", "1"),
        ]);
        assert!(is_upgrade_request(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!h.contains_key("keep-alive"));
        assert!(!is_upgrade_request(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn clean_headers_are_left_alone_and_close_names_nothing() {
        let mut h = map(&[("host", "a"), ("x-one", "1"), ("content-length", "3")]);
        let before = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
        let mut h = map(&[("connection", "close"), ("x-one", "1")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-one"], "1");
    }

    #[test]
    fn forwarded_headers_append_and_set() {
        let mut h = map(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(
            &mut h,
            &peer_value("127.0.0.9".parse().unwrap()),
            "http",
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, &peer_value("::1".parse().unwrap()), "http", None);
        assert_eq!(h["x-forwarded-for"], "::1");
        // An IPv4 client of a dual-stack listener is written as IPv4.
        assert_eq!(peer_value("::ffff:192.0.2.7".parse().unwrap()), "192.0.2.7");
        assert_eq!(peer_value("2001:db8::7".parse().unwrap()), "2001:db8::7");
        // Several lines are one list, in order; an empty line adds nothing.
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", " "),
            ("x-forwarded-for", "203.0.113.7, 10.0.0.2"),
        ]);
        set_forwarded(&mut h, &peer_value("::1".parse().unwrap()), "http", None);
        assert_eq!(
            h.get_all("x-forwarded-for").iter().collect::<Vec<_>>(),
            ["6.6.6.6, 203.0.113.7, 10.0.0.2, ::1"]
        );
    }

    #[test]
    fn only_chunked_transfer_coding_is_forwarded() {
        assert!(check_transfer_codings(&HeaderMap::new()).is_ok());
        assert!(check_transfer_codings(&map(&[("transfer-encoding", "Chunked")])).is_ok());
        let (status, msg) =
            check_transfer_codings(&map(&[("transfer-encoding", "gzip, chunked")])).unwrap_err();
        assert_eq!(status, http::StatusCode::NOT_IMPLEMENTED);
        assert!(msg.contains("\"gzip\""), "{msg}");
        let split = map(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked"),
        ]);
        let (status, _) = check_transfer_codings(&split).unwrap_err();
        assert_eq!(status, http::StatusCode::BAD_REQUEST);
    }

    #[test]
    fn a_response_request_id_is_never_indexed() {
        let ours = HeaderValue::from_static("ours");
        let mut h = HeaderMap::new();
        set_response_request_id(&mut h, ours.clone());
        assert_eq!(h["x-request-id"], "ours");
        assert!(h["x-request-id"].is_sensitive());
        // The cluster's ids are kept, every one of them marked.
        let mut h = map(&[("x-request-id", "theirs"), ("x-request-id", "again")]);
        set_response_request_id(&mut h, ours);
        let ids: Vec<_> = h.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["theirs", "again"]);
        assert!(ids.iter().all(|id| id.is_sensitive()));
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 32);
        assert_eq!(h["x-request-id"], id);
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);
    }
}
