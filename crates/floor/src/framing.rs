//! Where a request head and a response end: just enough HTTP/1.1 for the benchmark's GETs.

/// Each connection's buffer: a request head, or a whole response (the benchmark's largest is
/// 16 KiB of body).
pub const BUF: usize = 32 * 1024;

/// The length of the head in `b` up to and including its blank line, once it is complete.
pub fn head_end(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The length of the whole response in `b` (head plus `Content-Length` bytes), once complete.
/// A response without `Content-Length` is taken as bodiless.
pub fn response_end(b: &[u8]) -> Option<usize> {
    let head = head_end(b)?;
    let mut body = 0usize;
    for line in b[..head].split(|&c| c == b'\n') {
        const NAME: &[u8] = b"content-length:";
        if line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) {
            body = std::str::from_utf8(&line[NAME.len()..])
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    let end = head + body;
    (b.len() >= end).then_some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_responses_end_where_http_says() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
        assert_eq!(response_end(r), Some(r.len()));
        assert_eq!(response_end(&r[..r.len() - 1]), None);
        assert_eq!(response_end(b"HTTP/1.1 204 No Content\r\n\r\n"), Some(27));
    }
}
