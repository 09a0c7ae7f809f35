//! The upstream connection pool against a real HTTP/1.1 server on 127.0.0.1 that labels every
//! response with the number of the connection it came on (`x-conn`), so the tests see exactly which
//! connection each request used: reuse after every kind of body, no reuse after an abandoned body,
//! connections the server closed are skipped, idle connections are closed after `idle_timeout`.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, get, send, GatewayProcess, TestGateway};
use http::Method;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// Size of `/big`: far more than socket buffers hold, so a client that stops reading leaves most of
/// it unsent.
const BIG: usize = 4 << 20;

/// A minimal Serve look-alike speaking HTTP/1.1 by hand. Answers Serve's probes and:
/// `/app/small` (content-length), `/app/chunked`, `/app/empty` (204), `/app/big` (4 MiB),
/// `/app/close` (answers, then closes the connection without saying so), `/app/early` (401 before
/// the request body is read, then reads the body and keeps the connection), `/app/trailers`
/// (chunked, with a trailer field it announces in `Trailer`), `/app/eof` (no length: the body
/// ends when the server closes), `/app/flaky` (on a connection that already answered a request,
/// closes without answering, as a server does whose keep-alive timer fired as the request came),
/// `/app/reset` (always closes without answering), `/app/slow` (answers after 5 s, unless the
/// client closes first: counted in `cancelled`), `/app/trickle` (a chunked stream lasting 1.5 s),
/// `/app/hold` (never answers; the connection ends when the client closes it), `/app/liar` (a 204
/// declaring a 38-byte body, whose 38 bytes, a response head, follow 1 s later), `/app/switch`
/// (101 to a request that asked for no upgrade), `/app/both` (chunked with a wrong
/// `content-length` too), `/app/gzipped` (a transfer coding before `chunked`), `/app/badchunk`
/// (a chunked body malformed in its first bytes, sent with the head), `/app/listed`
/// (`Connection` naming `content-length` and `x-request-id`),
/// `/app/endless` (a chunked stream of 64 KiB chunks that ends only when writing fails),
/// `/app/quiet` (one chunk of a stream, then nothing: counted in `cancelled` when the gateway
/// closes the connection), `/app/slowlen` (a 6-byte `content-length` body, its second half 2 s
/// late), `/app/stalllen` (a head announcing a 10-byte body, 3 bytes of it, then nothing until the
/// gateway closes), `/app/cut` (a head announcing a body, then the connection closes),
/// `/app/stall` (never reads the request body, never answers).
struct Backend {
    port: u16,
    /// Connections that carried at least one request outside `/-/`.
    app_conns: Arc<AtomicUsize>,
    /// Of those, connections the client (the gateway) closed.
    closed_by_client: Arc<AtomicUsize>,
    /// `/app/slow` requests whose connection the gateway closed before the answer.
    cancelled: Arc<AtomicUsize>,
    /// `/app/reset` requests that arrived.
    resets: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let app_conns = Arc::new(AtomicUsize::new(0));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let next_id = Arc::new(AtomicUsize::new(0));
        let cancelled = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let (a, c, x, r) = (
            Arc::clone(&app_conns),
            Arc::clone(&closed_by_client),
            Arc::clone(&cancelled),
            Arc::clone(&resets),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let id = next_id.fetch_add(1, Ordering::SeqCst) + 1;
                let counts = (
                    Arc::clone(&a),
                    Arc::clone(&c),
                    Arc::clone(&x),
                    Arc::clone(&r),
                );
                tokio::spawn(serve_conn(stream, id, counts));
            }
        });
        Backend {
            port,
            app_conns,
            closed_by_client,
            cancelled,
            resets,
            task,
        }
    }

    fn app_conns(&self) -> usize {
        self.app_conns.load(Ordering::SeqCst)
    }

    fn closed_by_client(&self) -> usize {
        self.closed_by_client.load(Ordering::SeqCst)
    }
}

type Counts = (
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
    Arc<AtomicUsize>,
);

async fn serve_conn(stream: TcpStream, id: usize, counts: Counts) {
    let (app_conns, closed_by_client, cancelled, resets) = counts;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut counted = false;
    let mut served = 0;
    loop {
        let mut request_line = String::new();
        match read.read_line(&mut request_line).await {
            Ok(0) | Err(_) => {
                if counted {
                    closed_by_client.fetch_add(1, Ordering::SeqCst);
                }
                return;
            }
            Ok(_) => {}
        }
        let mut content_length = 0usize;
        loop {
            let mut line = String::new();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    content_length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut parts = request_line.split(' ');
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if path == "/app/early" {
            // Refuses before reading the body (as an auth check does), then reads and drops the
            // body as it arrives, keeping the connection.
            let refusal =
                format!("HTTP/1.1 401 Unauthorized\r\nx-conn: {id}\r\ncontent-length: 0\r\n\r\n");
            if write.write_all(refusal.as_bytes()).await.is_err() {
                return;
            }
        }
        let mut body = vec![0u8; content_length];
        if read.read_exact(&mut body).await.is_err() {
            return;
        }
        if path == "/app/early" {
            continue;
        }
        if path == "/app/reset" {
            resets.fetch_add(1, Ordering::SeqCst);
            return;
        }
        if path == "/app/flaky" && served > 0 {
            return;
        }
        if !path.starts_with("/-/") {
            served += 1;
        }
        if !path.starts_with("/-/") && !counted {
            counted = true;
            app_conns.fetch_add(1, Ordering::SeqCst);
        }
        if path == "/app/trickle" {
            let first = format!(
                "HTTP/1.1 200 OK\r\nx-conn: {id}\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
            );
            if write.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if write.write_all(b"3\r\ndef\r\n0\r\n\r\n").await.is_err() {
                return;
            }
            continue;
        }
        if path == "/app/liar" {
            let lie =
                format!("HTTP/1.1 204 No Content\r\nx-conn: {id}\r\ncontent-length: 38\r\n\r\n");
            if write.write_all(lie.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
            let late = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
            if write.write_all(late).await.is_err() {
                return;
            }
            continue;
        }
        if path == "/app/endless" {
            let head =
                format!("HTTP/1.1 200 OK\r\nx-conn: {id}\r\ntransfer-encoding: chunked\r\n\r\n");
            if write.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = [b"10000\r\n".as_slice(), &vec![b'x'; 0x10000], b"\r\n"].concat();
            while write.write_all(&chunk).await.is_ok() {}
            return;
        }
        if path == "/app/stall" {
            // Takes the request head and never reads its body.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        if path == "/app/quiet" {
            // A stream that sends one chunk, then works on: counted in `cancelled` if the gateway
            // closes the connection within 5 s.
            let first = format!(
                "HTTP/1.1 200 OK\r\nx-conn: {id}\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n"
            );
            if write.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_secs(5), read.read(&mut probe)).await
            {
                cancelled.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
        if path == "/app/slowlen" {
            // A `content-length` body whose second half comes 2 s after the first.
            let first = format!("HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: 6\r\n\r\nabc");
            if write.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2000)).await;
            if write.write_all(b"def").await.is_err() {
                return;
            }
            continue;
        }
        if path == "/app/stalllen" {
            // A head announcing 10 bytes of body, 3 of them, then nothing until the gateway closes.
            let first = format!("HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: 10\r\n\r\nabc");
            if write.write_all(first.as_bytes()).await.is_err() {
                return;
            }
            let mut probe = [0u8; 1];
            if let Ok(0) = read.read(&mut probe).await {
                closed_by_client.fetch_add(1, Ordering::SeqCst);
            }
            return;
        }
        if path == "/app/cut" {
            // A head announcing 10 bytes of body, then the connection closes.
            let head = format!("HTTP/1.1 200 OK\r\nx-conn: {id}\r\ncontent-length: 10\r\n\r\n");
            let _ = write.write_all(head.as_bytes()).await;
            return;
        }
        if path == "/app/hold" {
            let mut probe = [0u8; 1];
            let _ = read.read(&mut probe).await;
            return;
        }
        if path == "/app/slow" {
            let mut probe = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_secs(5), read.read(&mut probe)).await
            {
                cancelled.fetch_add(1, Ordering::SeqCst);
                return;
            }
        }
        let head = |status: &str, extra: &str| {
            format!("HTTP/1.1 {status}\r\nx-conn: {id}\r\n{extra}\r\n").into_bytes()
        };
        let (mut out, close) = match path {
            "/-/healthz" => (
                [head("200 OK", "content-length: 7\r\n"), b"success".to_vec()].concat(),
                false,
            ),
            "/-/routes" => {
                let routes = br#"{"/app":"app"}"#;
                let h = head(
                    "200 OK",
                    &format!(
                        "content-length: {}\r\ncontent-type: application/json\r\n",
                        routes.len()
                    ),
                );
                ([h, routes.to_vec()].concat(), false)
            }
            "/app/small" => (
                [head("200 OK", "content-length: 5\r\n"), b"hello".to_vec()].concat(),
                false,
            ),
            "/app/chunked" => (
                [
                    head("200 OK", "transfer-encoding: chunked\r\n"),
                    b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                false,
            ),
            "/app/trailers" => (
                [
                    head(
                        "200 OK",
                        "transfer-encoding: chunked\r\ntrailer: x-checksum\r\n",
                    ),
                    b"3\r\nabc\r\n0\r\nx-checksum: 900150983cd24fb0\r\n\r\n".to_vec(),
                ]
                .concat(),
                false,
            ),
            "/app/empty" => (head("204 No Content", ""), false),
            "/app/switch" => (
                head("101 Switching Protocols", "upgrade: x\r\nconnection: upgrade\r\n"),
                true,
            ),
            "/app/both" => (
                [
                    head(
                        "200 OK",
                        "transfer-encoding: chunked\r\ncontent-length: 2\r\n",
                    ),
                    b"3\r\nabc\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                false,
            ),
            "/app/badchunk" => (
                [
                    head("200 OK", "transfer-encoding: chunked\r\n"),
                    b"zz\r\nabc\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                true,
            ),
            "/app/gzipped" => (
                [
                    head("200 OK", "transfer-encoding: gzip, chunked\r\n"),
                    b"3\r\nabc\r\n0\r\n\r\n".to_vec(),
                ]
                .concat(),
                false,
            ),
            "/app/listed" => (
                [
                    head(
                        "200 OK",
                        "connection: x-request-id, content-length\r\nx-request-id: up-1\r\ncontent-length: 5\r\n",
                    ),
                    b"hello".to_vec(),
                ]
                .concat(),
                false,
            ),
            "/app/flaky" | "/app/slow" => (
                [head("200 OK", "content-length: 5\r\n"), b"fresh".to_vec()].concat(),
                false,
            ),
            "/app/eof" => (
                [head("200 OK", ""), b"until the end".to_vec()].concat(),
                true,
            ),
            "/app/close" => (
                [head("200 OK", "content-length: 2\r\n"), b"ok".to_vec()].concat(),
                true,
            ),
            "/app/big" => {
                let h = head("200 OK", &format!("content-length: {BIG}\r\n"));
                ([h, vec![b'x'; BIG]].concat(), false)
            }
            _ => (head("404 Not Found", "content-length: 0\r\n"), false),
        };
        if method == "HEAD" {
            let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            out.truncate(end);
        }
        if write.write_all(&out).await.is_err() {
            return;
        }
        if close {
            // Closes like a server whose keep-alive timer fired: no `connection: close` first.
            return;
        }
    }
}

/// A gateway with one cluster, `name` (unique per test: the metrics recorder is shared by the
/// tests of this binary), in front of `backend`.
///
/// Every client connection is served on the test's runtime, so all of them share one part of the
/// cluster's pool: these tests follow upstream connections across client connections, and with
/// per-core workers the kernel would spread the client connections over the workers' sockets at
/// random, each worker with its own upstream connections
/// (`per_core_workers_spread_clients_and_keep_their_own_upstream_connections` covers that).
async fn gateway(backend: &Backend, name: &str, upstream: &str) -> TestGateway {
    let yaml = gateway_yaml(backend, name, upstream);
    TestGateway::start_with(&yaml, tempfile::tempdir().unwrap(), 0).await
}

fn gateway_yaml(backend: &Backend, name: &str, upstream: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [s]\n\
         probe:\n  interval: 100ms\n  timeout: 500ms\n\
         clusters:\n  - name: {name}\n    shard: s\n    revision: v1\n    serve_url: http://127.0.0.1:{}\n\
         {upstream}",
        backend.port
    )
}

/// `rayshift_upstream_connections_opened_total` of `cluster`, from the admin API's `/metrics`.
async fn connections_opened(gw: &TestGateway, cluster: &str) -> u64 {
    let metrics = get(&gw.admin("/metrics")).await.body;
    series_value(
        &metrics,
        &format!("rayshift_upstream_connections_opened_total{{cluster=\"{cluster}\"}}"),
    ) as u64
}

/// The value of `series` (name and labels, as exported) in a `/metrics` text.
fn series_value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

fn conn_of(resp: &common::Resp) -> String {
    resp.headers
        .get("x-conn")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn one_connection_carries_requests_with_every_kind_of_body() {
    reuse_one_connection("reuse", "").await;
}

/// The same through hyper alone (`upstream.direct_http1: false`).
#[tokio::test]
async fn one_connection_carries_requests_with_every_kind_of_body_through_hyper() {
    reuse_one_connection("reuse-hyper", "upstream:\n  direct_http1: false\n").await;
}

async fn reuse_one_connection(name: &str, upstream: &str) {
    let backend = Backend::start().await;
    let gw = gateway(&backend, name, upstream).await;
    let mut conns = Vec::new();
    for round in 0..10 {
        let small = get(&gw.url("/app/small")).await;
        assert_eq!(
            (small.status.as_u16(), small.body.as_str()),
            (200, "hello"),
            "round {round}"
        );
        let chunked = get(&gw.url("/app/chunked")).await;
        assert_eq!(
            (chunked.status.as_u16(), chunked.body.as_str()),
            (200, "abcdef")
        );
        let empty = get(&gw.url("/app/empty")).await;
        assert_eq!((empty.status.as_u16(), empty.body.as_str()), (204, ""));
        let head = send(Method::HEAD, &gw.url("/app/small"), &[], "").await;
        assert_eq!((head.status.as_u16(), head.body.as_str()), (200, ""));
        assert_eq!(head.headers["content-length"], "5");
        conns.extend([&small, &chunked, &empty, &head].map(conn_of));
    }
    // Requests one after another: every one went on the same upstream connection.
    conns.dedup();
    assert_eq!(conns.len(), 1, "connections used in order: {conns:?}");
    assert_eq!(backend.app_conns(), 1);
    assert_eq!(connections_opened(&gw, name).await, 1);
}

/// Reads from `client` until what arrived satisfies `done` (each read within 5 s, the connection
/// open until then); returns it.
async fn read_until(client: &mut TcpStream, done: impl Fn(&[u8]) -> bool) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !done(&seen) {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("the whole response")
            .unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// Reads from `client` until it closes; returns everything it sent.
async fn read_until_closed(client: &mut TcpStream) -> String {
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut all))
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

/// Requests sent back to back in one write (pipelined) are answered in order on the direct path,
/// and a request it does not take (`Connection` naming another header) carries on in the general
/// path on the same connection, followed by more requests.
#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_the_handoff() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pipeline", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(
            b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\n\
              GET /app/chunked HTTP/1.1\r\nhost: x\r\n\r\n\
              HEAD /app/small HTTP/1.1\r\nhost: x\r\n\r\n\
              GET /app/empty HTTP/1.1\r\nhost: x\r\nconnection: x-hop\r\nx-hop: 1\r\n\r\n\
              GET /app/small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let all = read_until_closed(&mut client).await.to_ascii_lowercase();
    let starts: Vec<_> = all.match_indices("http/1.1 ").map(|(i, _)| i).collect();
    assert_eq!(starts.len(), 5, "{all}");
    let answers: Vec<&str> = starts
        .iter()
        .zip(starts.iter().skip(1).chain([&all.len()]))
        .map(|(&a, &b)| &all[a..b])
        .collect();
    assert!(
        answers[0].starts_with("http/1.1 200") && answers[0].ends_with("\r\n\r\nhello"),
        "{}",
        answers[0]
    );
    assert!(
        answers[1].contains("transfer-encoding: chunked")
            && answers[1].ends_with("3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"),
        "{}",
        answers[1]
    );
    assert!(
        answers[2].contains("content-length: 5") && answers[2].ends_with("\r\n\r\n"),
        "{}",
        answers[2]
    );
    assert!(answers[3].starts_with("http/1.1 204"), "{}", answers[3]);
    assert!(
        answers[4].starts_with("http/1.1 200") && answers[4].ends_with("hello"),
        "{}",
        answers[4]
    );
    for answer in &answers {
        assert!(answer.contains("x-request-id: "), "{answer}");
        assert!(!answer.contains("x-hop"), "{answer}");
    }
    // One upstream connection carried all five: after the handoff the general path took over
    // the connection the direct path's three had used.
    assert_eq!(backend.app_conns(), 1);
    let metrics = get(&gw.admin("/metrics")).await.body;
    let handoffs = r#"rayshift_http1_handoffs_total{reason="connection_option"} 1"#;
    assert!(metrics.contains(handoffs), "{metrics}");
}

/// A response without a length ends when the cluster closes: the client gets it re-framed as
/// chunks (so it can tell a whole body from a cut one) and keeps its connection; the next request
/// opens a new upstream connection.
#[tokio::test]
async fn a_response_ending_at_close_reaches_the_client_whole() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-eof", "").await;
    for _ in 0..3 {
        let resp = get(&gw.url("/app/eof")).await;
        assert_eq!(
            (resp.status.as_u16(), resp.body.as_str()),
            (200, "until the end")
        );
    }
    assert_eq!(backend.app_conns(), 3);
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(
            b"GET /app/eof HTTP/1.1\r\nhost: x\r\n\r\nGET /app/small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let all = read_until_closed(&mut client).await.to_ascii_lowercase();
    assert!(all.starts_with("http/1.1 200"), "{all}");
    assert!(all.contains("\r\ntransfer-encoding: chunked\r\n"), "{all}");
    let second = all.find("\r\n\r\nd\r\nuntil the end\r\n0\r\n\r\nhttp/1.1 200");
    assert!(second.is_some(), "{all}");
    assert!(all.ends_with("\r\n\r\nhello"), "{all}");
}

/// A stream that lasts longer than `limits.header_read_timeout` does not use up the connection's
/// wait for its next request: the client sends another on the same connection after it.
#[tokio::test]
async fn a_long_stream_leaves_the_connection_open_for_the_next_request() {
    the_connection_waits_anew_after("pool-trickle", "/app/trickle", b"0\r\n\r\n").await;
}

/// Through a gateway with `limits.header_read_timeout: 1s`: a response to `path` that lasts
/// longer (its end: `ends`), then another request on the same connection, answered.
async fn the_connection_waits_anew_after(name: &str, path: &str, ends: &[u8]) {
    let backend = Backend::start().await;
    let gw = gateway(&backend, name, "limits:\n  header_read_timeout: 1s\n").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_until(&mut client, |seen| seen.ends_with(ends)).await;
    client
        .write_all(b"GET /app/small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let next = read_until_closed(&mut client).await;
    assert!(
        next.starts_with("HTTP/1.1 200") && next.ends_with("hello"),
        "{next}"
    );
}

/// A client that sends two requests and then closes its sending side gets both answers.
#[tokio::test]
async fn pipelined_requests_before_a_half_close_are_all_answered() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-half-close", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(
            b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\nGET /app/chunked HTTP/1.1\r\nhost: x\r\n\r\n",
        )
        .await
        .unwrap();
    client.shutdown().await.unwrap();
    let all = read_until_closed(&mut client).await;
    assert_eq!(all.matches("HTTP/1.1 200").count(), 2, "{all}");
    assert!(all.ends_with("3\r\ndef\r\n0\r\n\r\n"), "{all}");
}

/// A failed request answered to a HEAD carries no body (the client would read it as the next
/// response), and the connection goes on.
#[tokio::test]
async fn an_error_answer_to_head_has_no_body() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-head-error", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(
            b"HEAD /app/reset HTTP/1.1\r\nhost: x\r\n\r\nGET /app/small HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let all = read_until_closed(&mut client).await.to_ascii_lowercase();
    assert!(all.starts_with("http/1.1 502"), "{all}");
    let (error, next) = all.split_once("\r\n\r\n").unwrap();
    assert!(error.contains("content-length: "), "{error}");
    assert!(next.starts_with("http/1.1 200"), "{all}");
    assert!(next.ends_with("\r\n\r\nhello"), "{all}");
}

/// A client that goes away while its request is with the cluster: the gateway closes the
/// upstream connection at once (Serve cancels the request) instead of waiting for the answer.
#[tokio::test]
async fn a_client_gone_mid_request_cancels_it_upstream() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-gone", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(b"GET /app/slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    eventually("the request reaches the cluster", || async {
        backend.app_conns() == 1
    })
    .await;
    let gone = std::time::Instant::now();
    drop(client);
    eventually("the cluster sees its connection closed", || async {
        backend.cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(
        gone.elapsed() < Duration::from_secs(3),
        "{:?}",
        gone.elapsed()
    );
    let state = gw.cluster_state("pool-gone").await;
    assert_eq!(state["in_flight"], 0, "{state}");
}

/// A client that goes away while a stream's body is on its way (the head and a first chunk
/// are out, the cluster is still working): the gateway closes the upstream connection at once,
/// so Serve cancels the request, on both paths.
#[tokio::test]
async fn a_client_gone_mid_stream_cancels_it_upstream() {
    for (name, upstream) in [
        ("pool-gone-stream", ""),
        (
            "pool-gone-stream-hyper",
            "upstream:\n  direct_http1: false\n",
        ),
    ] {
        let backend = Backend::start().await;
        let gw = gateway(&backend, name, upstream).await;
        let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
        client
            .write_all(b"GET /app/quiet HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        read_until(&mut client, |seen| seen.ends_with(b"abc\r\n")).await;
        let gone = std::time::Instant::now();
        drop(client);
        eventually("the cluster sees its connection closed", || async {
            backend.cancelled.load(Ordering::SeqCst) == 1
        })
        .await;
        assert!(
            gone.elapsed() < Duration::from_secs(3),
            "{name}: {:?}",
            gone.elapsed()
        );
        let state = gw.cluster_state(name).await;
        assert_eq!(state["in_flight"], 0, "{name}: {state}");
    }
}

/// A `content-length` body that takes longer than `limits.header_read_timeout` to arrive: the
/// connection's wait for its next request starts when the body is out, not at its head.
#[tokio::test]
async fn a_slow_body_leaves_the_connection_open_for_the_next_request() {
    the_connection_waits_anew_after("pool-slowlen", "/app/slowlen", b"abcdef").await;
}

/// An upstream connection that carried a body for longer than `upstream.idle_timeout` returns to
/// the pool as idle from the end of the body: it is reused, and it does not make the pool drop
/// the other idle connections as expired.
#[tokio::test]
async fn a_long_download_returns_its_connection_as_fresh() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "pool-slowlen-idle",
        "upstream:\n  idle_timeout: 1s\n",
    )
    .await;
    let url = gw.url("/app/slowlen");
    let slow = tokio::spawn(async move { get(&url).await });
    // Meanwhile a second connection opens for another request (the first one is busy).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(get(&gw.url("/app/small")).await.body, "hello");
    assert_eq!(slow.await.unwrap().body, "abcdef");
    assert_eq!(backend.app_conns(), 2);
    // Both idle, both fresh: the next requests reuse them.
    assert_eq!(get(&gw.url("/app/small")).await.body, "hello");
    assert_eq!(get(&gw.url("/app/small")).await.body, "hello");
    assert_eq!(
        backend.app_conns(),
        2,
        "a pooled connection was dropped as expired"
    );
}

/// A cluster that sends a head announcing a small body and closes: the client gets a 502 (nothing
/// was sent to it yet), not an empty reply, and the request counts as failed.
#[tokio::test]
async fn a_body_cut_before_anything_was_sent_is_a_502() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-cut", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(b"GET /app/cut HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = read_until_closed(&mut client).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp:?}");
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("rayshift_requests_total{")
                && l.contains("pool-cut")
                && l.contains("code=\"200\"")),
        "counted as a 200:\n{metrics}"
    );
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rayshift_requests_total{")
                && l.contains("pool-cut")
                && l.contains("code=\"502\"")),
        "no 502 counted for the cluster:\n{metrics}"
    );
}

/// A cluster that sends a head announcing a small body, part of the body, and then nothing: the
/// client is not held without an answer. Nothing has reached it yet (a small body goes out with
/// its head), so after `upstream.response_timeout` it gets the 504 of a cluster that does not
/// answer, counted as a timeout, and the stalled connection is closed, not pooled.
#[tokio::test]
async fn a_body_that_stalls_before_anything_was_sent_is_a_504() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "pool-stalllen",
        "upstream:\n  response_timeout: 1s\n",
    )
    .await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(b"GET /app/stalllen HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), read_until_closed(&mut client))
        .await
        .expect("an answer within the response timeout and some slack");
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp:?}");
    assert!(resp.contains("did not answer in time"), "{resp:?}");
    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("rayshift_upstream_errors_total{")
                && l.contains("pool-stalllen")
                && l.contains("kind=\"timeout\"")),
        "no timeout counted for the cluster:\n{metrics}"
    );
    eventually(
        "the stalled connection is closed by the gateway",
        || async { backend.closed_by_client() == 1 },
    )
    .await;
}

/// The cluster closes a pooled connection as a request arrives on it, without answering: a GET
/// is sent again on a new connection; a POST is not (it may have been acted on) and gets 502.
#[tokio::test]
async fn a_pooled_connection_closing_under_a_request_replays_only_idempotent_ones() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-flaky", "").await;
    assert_eq!(get(&gw.url("/app/small")).await.status, 200);
    let again = get(&gw.url("/app/flaky")).await;
    assert_eq!((again.status.as_u16(), again.body.as_str()), (200, "fresh"));
    assert_eq!(backend.app_conns(), 2);
    let post = send(Method::POST, &gw.url("/app/flaky"), &[], "x").await;
    assert_eq!(post.status.as_u16(), 502, "{}", post.body);
    assert!(
        post.body.contains("closed before a response"),
        "{}",
        post.body
    );
    assert_eq!(backend.app_conns(), 2, "the POST was not sent twice");
}

/// A cluster that takes a GET and closes without answering, with many idle pooled connections:
/// the GET is sent again once, on a new connection (the keep-alive race's remedy), not once per
/// pooled connection, and the client gets 502. The other idle connections are closed with the
/// failed one: the next request opens a new connection.
#[tokio::test]
async fn a_request_the_cluster_drops_is_sent_again_only_once() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-drops", "").await;
    let url = gw.url("/app/slowlen");
    let warm: Vec<_> = (0..8).map(|_| get(&url)).collect();
    for r in futures_util::future::join_all(warm).await {
        assert_eq!(r.status, 200);
    }
    assert!(
        backend.app_conns() >= 4,
        "pool not warmed: {}",
        backend.app_conns()
    );
    let r = get(&gw.url("/app/reset")).await;
    assert_eq!(r.status.as_u16(), 502, "{}", r.body);
    assert_eq!(
        backend.resets.load(Ordering::SeqCst),
        2,
        "sent once, then once more on a new connection"
    );
    let opened = connections_opened(&gw, "pool-drops").await;
    assert_eq!(get(&gw.url("/app/small")).await.status, 200);
    assert_eq!(connections_opened(&gw, "pool-drops").await, opened + 1);
}

#[tokio::test]
async fn an_abandoned_body_is_not_reused() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "abandon", "").await;
    let first = get(&gw.url("/app/small")).await;
    assert_eq!(first.status.as_u16(), 200);

    // Read the head of the 4 MiB body and a little of it, then go away.
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(b"GET /app/big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = client.read(&mut buf).await.unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n.min(80)])
    );
    drop(client);

    // The rest of that body is still on its upstream connection: the next requests must not see it.
    for _ in 0..5 {
        let again = get(&gw.url("/app/small")).await;
        assert_eq!((again.status.as_u16(), again.body.as_str()), (200, "hello"));
    }
    assert_eq!(
        backend.app_conns(),
        2,
        "the abandoned connection was replaced once"
    );
    eventually("the gateway closes the abandoned connection", || async {
        backend.closed_by_client() >= 1
    })
    .await;
}

#[tokio::test]
async fn connections_the_server_closed_are_skipped() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "closed", "").await;
    for i in 0..20 {
        // The server closes after each answer without a `connection: close`; the next request must
        // not be sent into the closed connection.
        let resp = get(&gw.url("/app/close")).await;
        assert_eq!(
            (resp.status.as_u16(), resp.body.as_str()),
            (200, "ok"),
            "request {i}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(backend.app_conns(), 20);
}

#[tokio::test]
async fn idle_connections_are_closed_after_idle_timeout() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "idle", "upstream:\n  idle_timeout: 300ms\n").await;
    let resp = get(&gw.url("/app/small")).await;
    assert_eq!(resp.status.as_u16(), 200);
    assert_eq!(backend.closed_by_client(), 0);
    eventually("the idle connection is closed by the gateway", || async {
        backend.closed_by_client() == 1
    })
    .await;
    // And a request after that opens a fresh one.
    let resp = get(&gw.url("/app/small")).await;
    assert_eq!((resp.status.as_u16(), backend.app_conns()), (200, 2));
}

/// At shutdown a client connection idle between requests on the direct path is closed at once
/// (the drain does not wait for it), while a stream in progress runs to its end first.
#[tokio::test]
async fn shutdown_closes_idle_direct_connections_and_answers_busy_ones() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "stop",
        "shutdown:\n  ready_delay: 0s\n  drain_timeout: 30s\n",
    )
    .await;
    let addr = gw.gateway.proxy_addr();
    let mut idle = TcpStream::connect(addr).await.unwrap();
    idle.write_all(b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut idle, |seen| seen.ends_with(b"hello")).await;
    // A chunked stream lasting 1.5 s: its head is out before the shutdown begins.
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /app/trickle HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut busy, |seen| seen.ends_with(b"abc\r\n")).await;

    let started = std::time::Instant::now();
    let TestGateway { gateway, dir: _dir } = gw;
    let stopping = tokio::spawn(gateway.shutdown());
    assert_eq!(read_until_closed(&mut idle).await, "");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let rest = read_until_closed(&mut busy).await;
    assert!(rest.ends_with("3\r\ndef\r\n0\r\n\r\n"), "{rest}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the drain ends when the last request is answered")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

/// A request of the general path (here HTTP/2 from the client) takes over an idle connection
/// the direct HTTP/1.1 path left, instead of opening one more.
#[tokio::test]
async fn the_general_path_takes_over_idle_direct_connections() {
    use http_body_util::{BodyExt, Empty};
    let backend = Backend::start().await;
    let gw = gateway(&backend, "takeover", "").await;
    let addr = gw.gateway.proxy_addr();
    let mut h1 = TcpStream::connect(addr).await.unwrap();
    h1.write_all(b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let first =
        String::from_utf8(read_until(&mut h1, |seen| seen.ends_with(b"hello")).await).unwrap();
    let conn_id = |head: &str| {
        head.lines()
            .find_map(|l| l.strip_prefix("x-conn: "))
            .unwrap_or_else(|| panic!("no x-conn in {head}"))
            .to_string()
    };
    let direct_conn = conn_id(&first);
    assert_eq!(connections_opened(&gw, "takeover").await, 1);

    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                TcpStream::connect(addr).await.unwrap(),
            ))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let resp = sender
            .send_request(
                http::Request::get(gw.url("/app/small"))
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let conn = resp.headers()["x-conn"].to_str().unwrap().to_string();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!((conn, &body[..]), (direct_conn.clone(), &b"hello"[..]));
    }
    assert_eq!(connections_opened(&gw, "takeover").await, 1);
    assert_eq!(backend.app_conns(), 1);
}

#[tokio::test]
async fn pooling_off_opens_a_connection_per_request() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "unpooled",
        "upstream:\n  max_idle_per_cluster: 0\n",
    )
    .await;
    for _ in 0..5 {
        let resp = get(&gw.url("/app/small")).await;
        assert_eq!((resp.status.as_u16(), resp.body.as_str()), (200, "hello"));
    }
    assert_eq!(backend.app_conns(), 5);
    assert_eq!(connections_opened(&gw, "unpooled").await, 5);
    eventually("every connection is closed", || async {
        backend.closed_by_client() == 5
    })
    .await;
}

/// The cluster refuses a request before its body has arrived (the client is still uploading,
/// slowly): the response reaches the client, and the connection, busy sending the rest of that
/// body, is not handed to the next request, which gets its own connection at once.
#[tokio::test]
async fn a_connection_still_sending_its_request_is_not_reused() {
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "pool-early",
        "upstream:\n  response_timeout: 3s\n",
    )
    .await;
    let mut uploader = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    uploader
        .write_all(
            b"POST /app/early HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n0123456789",
        )
        .await
        .unwrap();
    let mut answer = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), uploader.read_exact(&mut answer))
        .await
        .expect("the early answer reaches the client")
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 401");
    // The uploader has stopped sending; other requests must not wait for it.
    // (Handed the busy connection, a request would wait for it and get 504 after 3 s.)
    for _ in 0..3 {
        let r = get(&gw.url("/app/small")).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    drop(uploader);
}

/// Trailer fields the cluster announces reach an HTTP/1.1 client.
#[tokio::test]
async fn trailers_reach_the_client() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-trailers", "").await;
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    client
        .write_all(b"GET /app/trailers HTTP/1.1\r\nhost: x\r\nte: trailers\r\n\r\n")
        .await
        .unwrap();
    let seen = read_until(&mut client, |seen| {
        seen.ends_with(b"\r\n\r\n") && seen.windows(3).any(|w| w == b"\r\n0")
    })
    .await;
    let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("trailer: x-checksum\r\n"), "{text}");
    assert!(
        text.contains("\r\nx-checksum: 900150983cd24fb0\r\n"),
        "{text}"
    );
}

/// An HTTP/2 upload whose end-of-stream comes in a frame of its own, after the declared length:
/// the upstream connection is reused once the body has all been sent (hyper stops reading the
/// body at its declared length, before that empty last frame).
#[tokio::test]
async fn an_h2_upload_with_a_separate_end_of_stream_reuses_its_connection() {
    use http_body_util::{BodyExt, StreamBody};
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-h2-upload", "").await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let mut conns = Vec::new();
    for _ in 0..3 {
        // One DATA frame, then the stream ends: hyper sends END_STREAM in an empty DATA frame.
        let frames = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            http_body::Frame::data(bytes::Bytes::from_static(b"hello")),
        )]);
        let req = http::Request::post(gw.url("/app/small"))
            .header("content-length", "5")
            .body(StreamBody::new(frames))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        conns.push(resp.headers()["x-conn"].to_str().unwrap().to_string());
        resp.into_body().collect().await.unwrap();
    }
    assert!(conns.iter().all(|c| *c == conns[0]), "{conns:?}");
    assert_eq!(connections_opened(&gw, "pool-h2-upload").await, 1);
}

/// A cluster with `upstream.max_requests_per_cluster` requests in flight takes no more: the next
/// is answered 503 at once by the gateway, on the direct path (HTTP/1.1, the connection kept) and
/// on the general one (concurrent HTTP/2 streams of one connection, the fan-out the limit is
/// for). The shed requests never reach the cluster and are not counted as its responses; once the
/// requests in flight end, requests go through again, also on the connection that was answered 503.
#[tokio::test]
async fn a_cluster_at_its_request_limit_sheds_the_next_request() {
    use http_body_util::BodyExt;
    let backend = Backend::start().await;
    let name = "pool-limit";
    let gw = gateway(&backend, name, "upstream:\n  max_requests_per_cluster: 2\n").await;
    let in_flight = || async { gw.cluster_state(name).await["in_flight"].as_u64() };
    // `/app/hold` is never answered: two of them hold the cluster's two places.
    let held: Vec<_> = (0..2)
        .map(|_| {
            let url = gw.url("/app/hold");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    eventually("two requests in flight", || async {
        in_flight().await == Some(2)
    })
    .await;

    // HTTP/1.1, direct path: answered at once, the connection kept.
    let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    let request = b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\n";
    client.write_all(request).await.unwrap();
    let shed = String::from_utf8(read_until(&mut client, is_whole).await).unwrap();
    assert!(shed.starts_with("HTTP/1.1 503"), "{shed}");
    assert!(
        shed.contains(&format!(
            "cluster '{name}' already has 2 requests in flight (upstream.max_requests_per_cluster)"
        )),
        "{shed}"
    );
    assert!(shed.contains("x-request-id: "), "{shed}");
    assert!(!shed.contains("connection: close"), "{shed}");

    // HTTP/2, general path: three streams at once on one connection, each shed.
    let h2 = h2_client(None);
    let streams = (0..3).map(|_| h2.request(h2_get(&gw, "/app/small")));
    for resp in futures_util::future::join_all(streams).await {
        let resp = resp.unwrap();
        assert_eq!(resp.status(), 503);
        assert!(resp.headers().contains_key("x-request-id"));
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("upstream.max_requests_per_cluster"),
            "{body:?}"
        );
    }

    // Nothing reached the cluster; the 503s are the gateway's, not the cluster's.
    assert_eq!(backend.app_conns.load(Ordering::SeqCst), 2);
    assert_eq!(in_flight().await, Some(2));
    let metrics = get(&gw.admin("/metrics")).await.body;
    let series = |prefix: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!(
        series(&format!(
            "rayshift_upstream_overflow_total{{cluster=\"{name}\"}} "
        )),
        Some(4),
        "{metrics}"
    );
    // Other tests of this binary answer for the same app and shard: at least these four.
    let by_gateway = r#"rayshift_requests_total{app="app",shard="s",cluster="none",code="503"} "#;
    assert!(series(by_gateway).is_some_and(|n| n >= 4), "{metrics}");
    assert!(
        !metrics.contains(&format!("cluster=\"{name}\",code=\"503\"")),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!(
            "rayshift_upstream_errors_total{{cluster=\"{name}\""
        )),
        "{metrics}"
    );

    // The held requests end (their clients go away); the same connection is served again.
    for task in held {
        task.abort();
    }
    eventually("no request in flight", || async {
        in_flight().await == Some(0)
    })
    .await;
    client.write_all(request).await.unwrap();
    let served = String::from_utf8(read_until(&mut client, is_whole).await).unwrap();
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert!(served.ends_with("hello"), "{served}");
}

/// A whole response with a `content-length` body.
fn is_whole(seen: &[u8]) -> bool {
    let text = String::from_utf8_lossy(seen);
    text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
        head.lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .is_some_and(|n| body.len() == n.trim().parse::<usize>().unwrap())
    })
}

/// A 204 that declares a body and sends those bytes late: its connection is not reused, so the
/// late bytes never become the next request's response, on the direct path (HTTP/1.1) and on
/// the general one (HTTP/2). The next request is sent at once, before the late bytes come.
#[tokio::test]
async fn a_204_declaring_a_body_does_not_answer_the_next_request() {
    use http_body_util::BodyExt;
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-liar", "").await;
    let lie = get(&gw.url("/app/liar")).await;
    assert_eq!(lie.status, 204);
    let next = get(&gw.url("/app/small")).await;
    assert_eq!((next.status.as_u16(), next.body.as_str()), (200, "hello"));

    let h2 = h2_client(None);
    let get_h2 = |path: &str| h2.request(h2_get(&gw, path));
    let lie = get_h2("/app/liar").await.unwrap();
    assert_eq!(lie.status(), 204);
    let next = get_h2("/app/small").await.unwrap();
    assert_eq!(next.status(), 200);
    let body = next.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
}

/// `CONNECT` is answered 501 by the gateway, whatever its target (one that looks like a path
/// too), and never reaches a cluster.
#[tokio::test]
async fn connect_is_refused() {
    let backend = Backend::start().await;
    let gw = gateway(&backend, "pool-connect", "").await;
    for target in ["/app/small", "127.0.0.1:9"] {
        let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
        let request = format!("CONNECT {target} HTTP/1.1\r\nhost: {target}\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        let answer = String::from_utf8(read_until(&mut client, is_whole).await).unwrap();
        assert!(answer.starts_with("HTTP/1.1 501"), "{target}: {answer}");
        assert!(answer.contains("CONNECT is not supported"), "{answer}");
    }
    assert_eq!(backend.app_conns.load(Ordering::SeqCst), 0);
}

/// Upstream answers that would mislead the client are made right on both paths (HTTP/1.1, the
/// direct path; HTTP/2, the general one): a 101 nobody asked for is a 502; a chunked response that
/// also declares a (wrong) length arrives whole; a coding other than chunked is a 502;
/// `Connection` naming `content-length` or `x-request-id` drops neither.
#[tokio::test]
async fn misleading_response_heads_are_made_right_on_both_paths() {
    use http_body_util::BodyExt;
    let backend = Backend::start().await;
    let name = "pool-misleading";
    let gw = gateway(&backend, name, "").await;
    let h2 = h2_client(None);
    for http2 in [false, true] {
        let fetch = |path: &'static str| {
            let (h2, gw, url) = (h2.clone(), &gw, gw.url(path));
            async move {
                if http2 {
                    let resp = h2.request(h2_get(gw, path)).await.unwrap();
                    let (parts, body) = resp.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes());
                    (parts.status.as_u16(), parts.headers, body.ok())
                } else {
                    let r = get(&url).await;
                    (
                        r.status.as_u16(),
                        r.headers,
                        Some(bytes::Bytes::from(r.body)),
                    )
                }
            }
        };
        let (status, _, body) = fetch("/app/switch").await;
        assert_eq!(status, 502, "http2 {http2}");
        let body = String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned();
        assert!(
            body.contains("unexpected 101 Switching Protocols"),
            "http2 {http2}: {body}"
        );

        let (status, _, body) = fetch("/app/both").await;
        assert_eq!(
            (status, body.as_deref()),
            (200, Some(&b"abc"[..])),
            "http2 {http2}"
        );

        // A transfer coding the gateway cannot forward (its name would be lost, the body still
        // coded): the cluster's failure.
        let (status, _, _) = fetch("/app/gzipped").await;
        assert_eq!(status, 502, "http2 {http2}");

        if !http2 {
            // Malformed in the bytes that came with the head, before anything reached the
            // client: a 502 (the general path has sent the head by then and can only cut the
            // body short).
            let (status, _, body) = fetch("/app/badchunk").await;
            let body = String::from_utf8_lossy(body.as_deref().unwrap_or_default()).into_owned();
            assert_eq!(status, 502, "{body}");
            assert!(body.contains("malformed chunked body"), "{body}");
        }

        let (status, headers, body) = fetch("/app/listed").await;
        assert_eq!(
            (status, body.as_deref()),
            (200, Some(&b"hello"[..])),
            "http2 {http2}"
        );
        assert_eq!(headers["x-request-id"], "up-1", "http2 {http2}");
    }
}

/// An HTTP/2 client that takes no response data (its stream window stays shut, while its
/// connection answers pings) is disconnected after `limits.send_timeout`: the response, its
/// upstream connection and its place at the cluster are freed. A response that pauses because the
/// cluster sends nothing for longer than that (a stream, an SSE feed) is not cut.
#[tokio::test]
async fn an_h2_client_that_takes_no_data_is_disconnected() {
    use http_body_util::BodyExt;
    let backend = Backend::start().await;
    let name = "pool-stalled";
    let gw = gateway(&backend, name, "limits:\n  send_timeout: 500ms\n").await;
    let closed = r#"rayshift_client_connections_closed_total{reason="send_timeout"}"#;
    let _counter = SEND_TIMEOUTS.lock().await;
    let before = common::metric(&gw, closed).await.unwrap();
    let in_flight = || async { gw.cluster_state(name).await["in_flight"].as_u64() };

    // The cluster pauses 1.5 s mid-stream, with nothing waiting on the client: answered whole.
    let resp = h2_client(None)
        .request(h2_get(&gw, "/app/trickle"))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"abcdef");

    // 4 MiB to a client whose window stays shut.
    let stalled = h2_client(Some(0));
    let resp = stalled.request(h2_get(&gw, "/app/big")).await.unwrap();
    assert_eq!(resp.status(), 200);
    eventually("the stalled response freed", || async {
        in_flight().await == Some(0)
    })
    .await;
    assert!(
        resp.into_body().collect().await.is_err(),
        "the stalled stream ends in an error"
    );
    assert_eq!(common::metric(&gw, closed).await, Some(before + 1.0));
    // The cluster's connections are fine for the next client.
    let resp = h2_client(None)
        .request(h2_get(&gw, "/app/small"))
        .await
        .unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");
}

/// An HTTP/1.1 client that stops reading a response (its TCP window shut) is disconnected by the
/// kernel after `limits.send_timeout` of unacknowledged data (`TCP_USER_TIMEOUT`), on the direct
/// path as on the general one: the response, its upstream connection and its place at the
/// cluster are freed, and the disconnection is counted.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn an_http1_client_that_stops_reading_is_disconnected() {
    let backend = Backend::start().await;
    let name = "pool-unread";
    let gw = gateway(&backend, name, "limits:\n  send_timeout: 500ms\n").await;
    let in_flight = || async { gw.cluster_state(name).await["in_flight"].as_u64() };
    let closed = r#"rayshift_client_connections_closed_total{reason="send_timeout"}"#;
    let _counter = SEND_TIMEOUTS.lock().await;
    let before = common::metric(&gw, closed).await.unwrap();
    // The direct path, then (HTTP/1.0 is handed over) the general one.
    for (version, count) in [("1.1", before + 1.0), ("1.0", before + 2.0)] {
        let mut client = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
        let request = format!("GET /app/endless HTTP/{version}\r\nhost: x\r\n\r\n");
        client.write_all(request.as_bytes()).await.unwrap();
        eventually("the response under way", || async {
            in_flight().await == Some(1)
        })
        .await;
        // Never read: the kernel buffers fill, the window shuts.
        eventually("the unread response freed", || async {
            in_flight().await == Some(0)
        })
        .await;
        // And counted, as the HTTP/2 client that opens no window is.
        eventually("the disconnection counted", || async {
            common::metric(&gw, closed).await == Some(count)
        })
        .await;
        drop(client);
    }
}

/// An HTTP/2 client that resets its streams after the gateway took them ("rapid reset"): past
/// 200 such streams in 10 s (all of its streams) its connection is closed, and counted. Each reset
/// stream had reached the cluster (routed, sent on an upstream connection): what the limit bounds.
#[tokio::test]
async fn an_h2_client_resetting_its_streams_is_disconnected() {
    use http_body_util::Empty;
    let backend = Backend::start().await;
    let name = "pool-resets";
    let gw = gateway(&backend, name, "").await;
    let tcp = TcpStream::connect(gw.gateway.proxy_addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let mut conn = tokio::spawn(conn);
    let mut resets = 0;
    while !conn.is_finished() && resets < 300 {
        let req = http::Request::get(gw.url("/app/hold"))
            .body(Empty::new())
            .unwrap();
        // Sent at once; `/app/hold` is never answered, and its connection is not reused after
        // the reset: the cluster sees one more connection per request that reached it.
        let pending = sender.send_request(req);
        let reached = tokio::time::timeout(Duration::from_secs(2), async {
            while backend.app_conns.load(Ordering::SeqCst) < resets + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        if reached.is_err() {
            break;
        }
        // Dropping the response future resets the stream.
        drop(pending);
        resets += 1;
    }
    let ended = tokio::time::timeout(common::WAIT, &mut conn).await;
    assert!(ended.is_ok(), "still open after {resets} resets");
    assert!(
        (200..=205).contains(&resets),
        "closed after {resets} resets"
    );
    let closed = r#"rayshift_client_connections_closed_total{reason="resets"}"#;
    assert_eq!(common::metric(&gw, closed).await, Some(1.0));
}

/// On one HTTP/2 connection, an upload whose cluster does not read it does not stop the other
/// streams' uploads: the connection's flow-control window is larger than a stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_h2_upload_does_not_block_the_connections_other_streams() {
    use http_body_util::combinators::BoxBody;
    use http_body_util::{Full, StreamBody};
    type Body = BoxBody<bytes::Bytes, std::convert::Infallible>;
    let backend = Backend::start().await;
    let gw = gateway(
        &backend,
        "pool-h2-stall",
        "limits:\n  body_read_timeout: 2s\n",
    )
    .await;
    let client: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    // Stream A: 32 MiB, no length, to a server that never reads it.
    let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
    let frames =
        futures_util::stream::iter((0..32).map(move |_| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(chunk.clone()))
        }));
    let stalled = http::Request::post(gw.url("/app/stall"))
        .body(BoxBody::new(StreamBody::new(frames)))
        .unwrap();
    let a = tokio::spawn({
        let client = client.clone();
        async move { client.request(stalled).await }
    });
    // A fills the upstream socket's buffers, then its stream window.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Stream B on the same connection: 10 bytes.
    let small = http::Request::post(gw.url("/app/small"))
        .header("content-length", "10")
        .body(BoxBody::new(Full::new(bytes::Bytes::from_static(
            b"0123456789",
        ))))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(small))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(resp.status(), 200, "B's body waited behind A's");
    a.abort();
}

/// Held by the tests that count `send_timeout` disconnections: the metrics recorder is one per
/// process, shared by every gateway of this binary, and tests run in parallel.
static SEND_TIMEOUTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// An HTTP/2 (prior knowledge) client; `window`: its initial stream window (`None`: hyper's).
fn h2_client(
    window: Option<u32>,
) -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Empty<bytes::Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .http2_initial_stream_window_size(window)
        .build_http()
}

/// A bodiless `GET` of `path` through `gw`, for [`h2_client`].
fn h2_get(gw: &TestGateway, path: &str) -> http::Request<http_body_util::Empty<bytes::Bytes>> {
    http::Request::get(gw.url(path))
        .body(http_body_util::Empty::new())
        .unwrap()
}

/// With per-core workers (`rayshift run` with `RAYSHIFT_WORKER_THREADS=2`), client connections are
/// spread over the workers (each accepts on its own `SO_REUSEPORT` socket) and each worker keeps
/// its own upstream connections: requests one after another on the client connections of one
/// worker share one upstream connection, those of the other worker another. SIGTERM still
/// drains: a request in flight is answered, and the process exits cleanly.
#[tokio::test]
async fn per_core_workers_spread_clients_and_keep_their_own_upstream_connections() {
    let backend = Backend::start().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rayshift.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [s]\n\
             probe:\n  interval: 100ms\n  timeout: 500ms\n\
             shutdown:\n  ready_delay: 0s\n  drain_timeout: 30s\n\
             clusters:\n  - name: workers\n    shard: s\n    revision: v1\n    serve_url: http://127.0.0.1:{}\n",
            backend.port
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::spawn_with_env(
        &config,
        &[
            ("RAYSHIFT_WORKER_THREADS", "2"),
            ("RAYSHIFT_RUNTIME", "per-core"),
        ],
    )
    .unwrap();
    gw.wait_ready().await;
    // 32 connections from as many source ports: the kernel's hash leaves none of the two
    // sockets without one (all on one: a chance of 2 in 2^32).
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(TcpStream::connect(gw.proxy).await.unwrap());
    }
    let conn_id = |head: &[u8]| {
        let head = String::from_utf8_lossy(head);
        head.lines()
            .find_map(|l| l.strip_prefix("x-conn: "))
            .unwrap_or_else(|| panic!("no x-conn in {head}"))
            .to_string()
    };
    // One request at a time: each worker's pool always has its connection idle for the next.
    let mut seen = vec![Vec::new(); clients.len()];
    for _ in 0..2 {
        for (client, seen) in clients.iter_mut().zip(&mut seen) {
            client
                .write_all(b"GET /app/small HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            seen.push(conn_id(
                &read_until(client, |s| s.ends_with(b"hello")).await,
            ));
        }
    }
    for seen in &seen {
        assert!(seen.iter().all(|c| *c == seen[0]), "{seen:?}");
    }
    let upstream: std::collections::BTreeSet<_> = seen.iter().map(|s| s[0].clone()).collect();
    assert_eq!(
        upstream.len(),
        2,
        "one upstream connection per worker: {seen:?}"
    );
    assert_eq!(backend.app_conns(), 2);
    let metrics = get(&gw.admin("/metrics")).await.body;
    let per_worker: Vec<f64> = (0..2)
        .map(|worker| {
            series_value(
                &metrics,
                &format!("rayshift_worker_connections{{worker=\"{worker}\"}}"),
            )
        })
        .collect();
    assert!(per_worker.iter().all(|n| *n >= 1.0), "{per_worker:?}");
    assert_eq!(per_worker.iter().sum::<f64>(), 32.0, "{per_worker:?}");

    // A request in flight (answered after 5 s) when SIGTERM arrives is still answered.
    clients[1]
        .write_all(b"GET /app/slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let in_flight = gw.admin("/metrics");
    eventually("the slow request reaches the cluster", || {
        let url = in_flight.clone();
        async move {
            get(&url)
                .await
                .body
                .contains("rayshift_cluster_in_flight{cluster=\"workers\"} 1")
        }
    })
    .await;
    let stopping = tokio::task::spawn_blocking(move || gw.terminate());
    let answer = read_until_closed(&mut clients[1]).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let status = stopping.await.unwrap();
    assert!(status.success(), "{status:?}");
}
