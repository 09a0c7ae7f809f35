//! What passes through the gateway unchanged, what it adds, and what it removes: streaming bodies in
//! both directions, WebSocket upgrades, HTTP/2 clients, hop-by-hop and forwarding headers.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio_tungstenite::tungstenite::Message;

async fn one_cluster() -> (ServeStub, TestGateway) {
    one_cluster_with("").await
}

/// [`one_cluster`] with `extra` config (top-level YAML keys).
async fn one_cluster_with(extra: &str) -> (ServeStub, TestGateway) {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let gw = TestGateway::start(&config_yaml(
        &["shard-0"],
        &[cluster(&blue, "shard-0", "v1", None)],
        extra,
    ))
    .await;
    (blue, gw)
}

/// A WebSocket to the echo app through the gateway, and the gateway's answer to the upgrade.
async fn websocket(
    gw: &TestGateway,
) -> (
    tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    http::Response<Option<Vec<u8>>>,
) {
    let stream = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    let url = format!("ws://{}/echo/ws", gw.gateway.proxy_addr());
    tokio_tungstenite::client_async(url, stream).await.unwrap()
}

/// An SSE response arrives event by event, as the cluster sends it, not buffered to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_response_arrives_incrementally() {
    let (_blue, gw) = one_cluster().await;
    let req = Request::get(gw.url("/echo/stream?n=5&interval_ms=200"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let start = Instant::now();
    let mut body = resp.into_body();
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.unwrap() {
        if let Ok(data) = frame.unwrap().into_data() {
            arrivals.push(start.elapsed());
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    for i in 0..5 {
        assert!(text.contains(&format!("data: blue {i}\n\n")), "{text}");
    }
    // The first event came long before the last: the stream was not buffered whole.
    assert!(arrivals.len() >= 4, "{arrivals:?}");
    let spread = *arrivals.last().unwrap() - arrivals[0];
    assert!(
        spread >= Duration::from_millis(500),
        "events arrived together: {arrivals:?}"
    );
}

/// A 64 MiB upload streams through a gateway process whose peak memory stays far below the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_upload_streams_with_bounded_memory() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rayshift.yaml");
    std::fs::write(
        &path,
        config_yaml(&["shard-0"], &[cluster(&blue, "shard-0", "v1", None)], ""),
    )
    .unwrap();
    let gw = GatewayProcess::spawn(&path).unwrap();
    gw.wait_ready().await;
    let before = gw.peak_rss();

    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 256; // 64 MiB
    let chunk = Bytes::from(vec![b'x'; CHUNK]);
    let stream = futures_util::stream::iter(
        (0..CHUNKS).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();
    let req = Request::post(gw.url("/echo/upload"))
        .body(StreamBody::new(stream))
        .unwrap();
    let resp = tokio::time::timeout(WAIT * 3, client.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["bytes"], (CHUNK * CHUNKS) as u64);

    let after = gw.peak_rss();
    println!(
        "gateway peak RSS {} MiB before, {} MiB after a 64 MiB upload",
        before >> 20,
        after >> 20
    );
    assert!(after > 0, "could not read the gateway's memory");
    assert!(
        after - before < 24 << 20,
        "peak RSS grew by {} MiB",
        (after - before) >> 20
    );
}

/// Sends `text` on `ws` and checks that the echo app answers it, prefixed by its cluster.
async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let msg = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.into_text().unwrap().as_str(), format!("blue: {text}"));
}

/// WebSocket upgrade passes through; messages echo both ways; the cluster counts it in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_through_the_gateway() {
    let (_blue, gw) = one_cluster().await;
    let (mut ws, resp) = websocket(&gw).await;
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        echo(&mut ws, &format!("hello {i}")).await;
    }
    assert_eq!(gw.cluster_state("blue").await["in_flight"], 1);
    ws.close(None).await.unwrap();
    // Read the cluster's close reply, then the client hangs up, as a browser does.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(WAIT, ws.next()).await {}
    drop(ws);
    eventually("websocket no longer in flight", || async {
        gw.cluster_state("blue").await["in_flight"] == 0
    })
    .await;
}

/// An HTTP/1.0 request cannot switch protocols (RFC 9110 section 7.8): its `Upgrade` is not
/// forwarded, and the client never gets a 101.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_upgrade_is_not_forwarded() {
    use tokio::io::AsyncWriteExt;
    let (_blue, gw) = one_cluster().await;
    let mut client = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    client
        .write_all(
            b"GET /echo/ws HTTP/1.0\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let answer = read_answer(&mut client).await;
    let status_line = answer.lines().next().unwrap_or_default();
    assert!(
        status_line.starts_with("HTTP/1.") && status_line.contains(" 400 "),
        "{answer}"
    );
    assert!(answer.contains("expected a WebSocket upgrade"), "{answer}");
}

/// A WebSocket that carries nothing for `limits.tunnel_idle_timeout` is closed, both sides, and
/// leaves its cluster; one that keeps talking for longer than the timeout in total is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_websocket_is_closed_after_tunnel_idle_timeout() {
    let (_blue, gw) = one_cluster_with("limits:\n  tunnel_idle_timeout: 2s\n").await;
    let (mut ws, _) = websocket(&gw).await;
    // A message every 400 ms for 3.2 s: never quiet for the timeout, longer than it in total.
    for i in 0..8 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        echo(&mut ws, &format!("hello {i}")).await;
    }
    // Then nothing from here on (the gateway read the last message before its echo came back).
    let quiet = Instant::now();
    assert_eq!(gw.cluster_state("blue").await["in_flight"], 1);
    let closed = "rayshift_client_connections_closed_total{reason=\"tunnel_idle\"}";
    assert_eq!(metric(&gw, closed).await, Some(0.0));

    // The gateway closes the client's side (no message arrives, the stream ends)...
    let end = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(
        !matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))),
        "{end:?}"
    );
    let waited = quiet.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "closed after {waited:?} of silence"
    );
    // ...and the cluster's: the tunnel is no longer in flight there.
    eventually("quiet websocket no longer in flight", || async {
        gw.cluster_state("blue").await["in_flight"] == 0
    })
    .await;
    assert_eq!(metric(&gw, closed).await, Some(1.0));
}

/// A WebSocket client that stops reading is disconnected by the kernel after
/// `limits.send_timeout` of unacknowledged data (`TCP_USER_TIMEOUT`), as an HTTP client is: the
/// tunnel ends, leaves its cluster, and the disconnection is counted.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_client_that_stops_reading_is_disconnected() {
    let (_blue, gw) = one_cluster_with("limits:\n  send_timeout: 500ms\n").await;
    let (ws, _) = websocket(&gw).await;
    assert_eq!(gw.cluster_state("blue").await["in_flight"], 1);
    let closed = "rayshift_client_connections_closed_total{reason=\"send_timeout\"}";
    assert_eq!(metric(&gw, closed).await, Some(0.0));
    // Messages go out, their echoes are never read: the client's window shuts.
    let (mut sink, unread) = ws.split();
    let sender = tokio::spawn(async move {
        let message = "x".repeat(64 << 10);
        for _ in 0..256 {
            if sink.send(Message::text(message.clone())).await.is_err() {
                break;
            }
        }
    });
    eventually("the unread websocket freed", || async {
        gw.cluster_state("blue").await["in_flight"] == 0
    })
    .await;
    eventually("the disconnection counted", || async {
        metric(&gw, closed).await == Some(1.0)
    })
    .await;
    sender.abort();
    drop(unread);
}

/// An HTTP/2 (prior knowledge, h2c) client is served; Serve still sees HTTP/1.1 with a Host header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_client_is_proxied_to_http1() {
    let (_blue, gw) = one_cluster().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for _ in 0..3 {
        let req = Request::get(gw.url("/echo/headers"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["_version"], "HTTP/1.1");
        assert_eq!(seen["host"], gw.gateway.proxy_addr().to_string());
    }
}

/// An HTTP/2 client's cookie fields reach Serve as one `Cookie` header (Starlette reads only the
/// first), joined with "; " (RFC 9113 section 8.2.3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_cookie_fields_reach_serve_as_one() {
    let (_blue, gw) = one_cluster().await;
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let req = Request::get(gw.url("/echo/headers"))
        .header("cookie", "theme=dark")
        .header("cookie", "session=xyz")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    // The stub joins repeated fields with ", ": one field arrived.
    assert_eq!(seen["cookie"], "theme=dark; session=xyz", "{seen}");
}

/// Sends `request` (ending the connection) on a new connection to `addr` and reads the answer of
/// the echo app's `/echo/headers`: the response head and the request headers it saw.
async fn raw_echo_headers(
    addr: std::net::SocketAddr,
    request: &str,
) -> (String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut answer))
        .await
        .expect("answered and closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole response");
    // Whatever the framing, the JSON object is between the first `{` and the last `}`.
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    (head.to_string(), serde_json::from_str(json).unwrap())
}

/// An absolute-form target names the host over a `Host` field that disagrees (RFC 9112 section
/// 3.2.2): Serve's `Host` and `x-forwarded-host` carry the target's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absolute_form_target_names_the_host() {
    let (_blue, gw) = one_cluster().await;
    let (head, seen) = raw_echo_headers(
        gw.gateway.proxy_addr(),
        "GET http://api.example/echo/headers HTTP/1.1\r\nhost: other.example\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(seen["host"], "api.example", "{seen}");
    assert_eq!(seen["x-forwarded-host"], "api.example", "{seen}");
}

/// Hop-by-hop headers are dropped both ways; `x-forwarded-*` are set; `x-request-id` is kept or made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_hygiene() {
    let (_blue, gw) = one_cluster().await;
    let r = send(
        Method::GET,
        &gw.url("/echo/headers"),
        &[
            ("connection", "x-hop"),
            ("x-hop", "secret"),
            ("keep-alive", "timeout=9"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-forwarded-for", "192.0.2.1"),
            ("x-request-id", "req-123"),
            ("host", "api.example"),
            ("x-custom", "kept"),
        ],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    for gone in ["x-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(
            seen.get(gone).is_none(),
            "{gone} reached the cluster: {seen}"
        );
    }
    assert_eq!(seen["x-custom"], "kept");
    assert_eq!(seen["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "api.example");
    assert_eq!(seen["host"], "api.example");
    assert_eq!(seen["x-request-id"], "req-123");
    assert_eq!(r.headers["x-request-id"], "req-123");

    let r = get(&gw.url("/echo/headers")).await;
    let seen: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let id = seen["x-request-id"].as_str().unwrap();
    assert_eq!(id.len(), 32);
    assert_eq!(
        r.headers["x-request-id"], id,
        "the generated id is returned to the client"
    );
}

/// An IPv4 client of an IPv6 listener (one on `[::]`, dual-stack, or as here on the IPv4-mapped
/// loopback address) arrives as an IPv4-mapped IPv6 address: `x-forwarded-for` names it as
/// IPv4, on the direct HTTP/1.1 path and on the general one (an HTTP/1.0 request goes there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ipv4_client_of_an_ipv6_listener_is_forwarded_as_ipv4() {
    let blue = stub("blue", "v1", &[("echo", "/echo")]).await;
    let yaml = config_yaml(&["shard-0"], &[cluster(&blue, "shard-0", "v1", None)], "").replacen(
        "listen: 127.0.0.1:0\n",
        "listen: \"[::ffff:127.0.0.1]:0\"\n",
        1,
    );
    let gw = TestGateway::start(&yaml).await;
    assert!(
        gw.gateway.proxy_addr().is_ipv6(),
        "{}",
        gw.gateway.proxy_addr()
    );
    let port = gw.gateway.proxy_addr().port();
    for version in ["HTTP/1.1", "HTTP/1.0"] {
        let request = format!(
            "GET /echo/headers {version}\r\nhost: x\r\nx-forwarded-for: 192.0.2.1\r\nconnection: close\r\n\r\n"
        );
        let (head, seen) =
            raw_echo_headers(std::net::SocketAddr::from(([127, 0, 0, 1], port)), &request).await;
        assert!(
            head.starts_with(&format!("{version} 200")),
            "{version}: {head}"
        );
        assert_eq!(
            seen["x-forwarded-for"], "192.0.2.1, 127.0.0.1",
            "{version}: {seen}"
        );
    }
}

/// Request and response bodies of every size and method pass through byte-exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_status_codes_pass_through() {
    let (_blue, gw) = one_cluster().await;
    let r = send(Method::POST, &gw.url("/echo"), &[], "hello world").await;
    assert_eq!(r.body, "blue v1 echo 11\n");
    let r = send(Method::PUT, &gw.url("/echo/x"), &[], &"y".repeat(100_000)).await;
    assert_eq!(r.body, "blue v1 echo 100000\n");
    for code in [201u16, 404, 429, 500, 503] {
        let r = get(&gw.url(&format!("/echo/status/{code}"))).await;
        assert_eq!(r.status.as_u16(), code);
        assert_eq!(r.body, format!("blue {code}"));
    }
    let r = send(Method::HEAD, &gw.url("/echo"), &[], "").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "");
}
