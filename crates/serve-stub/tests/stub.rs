//! Integration tests: a real stub on a real socket, driven by a plain hyper
//! client and a tokio-tungstenite client. Every test is bounded by a timeout.

use std::convert::Infallible;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serve_stub::{ServeStub, StubConfig};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type Body = BoxBody<Bytes, Infallible>;
type HttpClient = Client<HttpConnector, Body>;

/// Runs a test body, failing it if it takes longer than 30 s.
async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("test timed out")
}

/// Waits (at most 5 s) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

fn empty() -> Body {
    Empty::new().boxed()
}

async fn blue() -> ServeStub {
    let cfg = StubConfig::new("blue", "v1")
        .with_app("echo", "/echo")
        .with_app("other", "/other");
    ServeStub::start(cfg).await.expect("stub starts")
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(client: &HttpClient, req: Request<Body>) -> Answer {
    let resp = client.request(req).await.expect("request succeeds");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body arrives").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8(body.to_vec()).expect("utf-8 body"),
    }
}

async fn get(client: &HttpClient, url: String) -> Answer {
    send(client, Request::get(url).body(empty()).unwrap()).await
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_follows_the_healthy_knob() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let ok = get(&c, format!("{}/-/healthz", stub.url())).await;
        assert_eq!((ok.status, ok.body.as_str()), (StatusCode::OK, "success"));
        assert_eq!(header(&ok, "x-stub-cluster"), "blue");
        assert_eq!(header(&ok, "x-stub-revision"), "v1");

        stub.set_healthy(false);
        let down = get(&c, format!("{}/-/healthz", stub.url())).await;
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(down.body, "This node is being drained.");

        stub.set_healthy(true);
        let up = get(&c, format!("{}/-/healthz", stub.url())).await;
        assert_eq!(up.status, StatusCode::OK);
        assert_eq!(stub.probe_requests(), 3);
        assert_eq!(stub.requests(), 0, "probes are not app requests");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_follow_the_populated_knob_and_set_apps() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let routes = get(&c, format!("{}/-/routes", stub.url())).await;
        assert_eq!(routes.status, StatusCode::OK);
        assert_eq!(header(&routes, "content-type"), "application/json");
        let json: serde_json::Value = serde_json::from_str(&routes.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"/echo": "echo", "/other": "other"})
        );

        stub.set_routes_populated(false);
        let not_yet = get(&c, format!("{}/-/routes", stub.url())).await;
        assert_eq!(not_yet.status, StatusCode::SERVICE_UNAVAILABLE);

        stub.set_routes_populated(true);
        stub.set_apps(vec![("fresh".into(), "/fresh".into())]);
        let routes = get(&c, format!("{}/-/routes", stub.url())).await;
        let json: serde_json::Value = serde_json::from_str(&routes.body).unwrap();
        assert_eq!(json, serde_json::json!({"/fresh": "fresh"}));
        let gone = get(&c, format!("{}/echo", stub.url())).await;
        assert_eq!(gone.status, StatusCode::NOT_FOUND);
        let fresh = get(&c, format!("{}/fresh", stub.url())).await;
        assert_eq!(fresh.body, "blue v1 fresh 0\n");
        assert_eq!(stub.probe_requests(), 3);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_reports_app_statuses() {
    bounded(async {
        let stub = blue().await;
        stub.set_app_status("other", "DEPLOY_FAILED");
        let c = client();
        let a = get(&c, format!("{}/api/serve/applications/", stub.url())).await;
        assert_eq!(a.status, StatusCode::OK);
        let json: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"applications": {
                "echo": {"name": "echo", "route_prefix": "/echo", "status": "RUNNING"},
                "other": {"name": "other", "route_prefix": "/other", "status": "DEPLOY_FAILED"},
            }})
        );
        assert_eq!(stub.probe_requests(), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn longest_prefix_routing_like_ray_serve() {
    bounded(async {
        let cfg = StubConfig::new("blue", "v1")
            .with_app("route", "/route")
            .with_app("deeper", "/route/a");
        let stub = ServeStub::start(cfg).await.unwrap();
        let c = client();
        let app_of = |path: &'static str| {
            let (c, url) = (c.clone(), format!("{}{path}", stub.url()));
            async move {
                let a = get(&c, url).await;
                a.headers
                    .get("x-stub-app")
                    .map(|v| v.to_str().unwrap().to_owned())
                    .ok_or((a.status, a.body))
            }
        };
        assert_eq!(app_of("/route").await.unwrap(), "route");
        assert_eq!(app_of("/route/").await.unwrap(), "route");
        assert_eq!(app_of("/route/x/y").await.unwrap(), "route");
        assert_eq!(app_of("/route/a").await.unwrap(), "deeper");
        assert_eq!(app_of("/route/a/b").await.unwrap(), "deeper");
        assert_eq!(app_of("/route/ab").await.unwrap(), "route");
        assert_eq!(
            app_of("/routesuffix").await.unwrap_err(),
            (
                StatusCode::NOT_FOUND,
                "Path '/routesuffix' not found. Ping http://.../-/routes for available routes."
                    .to_owned()
            )
        );

        // A `/` prefix catches everything the longer prefixes do not.
        stub.set_apps(vec![
            ("root".into(), "/".into()),
            ("route".into(), "/route".into()),
        ]);
        assert_eq!(app_of("/routesuffix").await.unwrap(), "root");
        assert_eq!(app_of("/route/x").await.unwrap(), "route");
        assert_eq!(app_of("/").await.unwrap(), "root");
        assert_eq!(stub.requests(), 9, "404s are not app requests");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_body_names_cluster_revision_app_and_bytes() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let a = get(&c, format!("{}/echo", stub.url())).await;
        assert_eq!(
            (a.status, a.body.as_str()),
            (StatusCode::OK, "blue v1 echo 0\n")
        );
        assert_eq!(header(&a, "x-stub-cluster"), "blue");
        assert_eq!(header(&a, "x-stub-revision"), "v1");
        assert_eq!(header(&a, "x-stub-app"), "echo");

        let post = Request::post(format!("{}/other/any/path", stub.url()))
            .body(http_body_util::Full::new(Bytes::from_static(b"hello")).boxed())
            .unwrap();
        let a = send(&c, post).await;
        assert_eq!(a.body, "blue v1 other 5\n");
        assert_eq!(stub.requests(), 2);
        stub.reset_requests();
        assert_eq!(stub.requests(), 0);
        assert_eq!(stub.in_flight(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_sends_each_event_as_its_own_timed_chunk() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let started = Instant::now();
        let url = format!("{}/echo/stream?n=4&interval_ms=150", stub.url());
        let resp = c
            .request(Request::get(url).body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        assert_eq!(resp.headers()["transfer-encoding"], "chunked");
        assert_eq!(resp.headers()["x-stub-app"], "echo");
        let mut body = resp.into_body();
        let mut chunks = Vec::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                chunks.push((started.elapsed(), data));
                if chunks.len() == 1 {
                    assert_eq!(stub.in_flight(), 1, "a streaming body is in flight");
                }
            }
        }
        let texts: Vec<&[u8]> = chunks.iter().map(|(_, d)| &d[..]).collect();
        assert_eq!(
            texts,
            vec![
                &b"data: blue 0\n\n"[..],
                b"data: blue 1\n\n",
                b"data: blue 2\n\n",
                b"data: blue 3\n\n"
            ]
        );
        for pair in chunks.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap >= Duration::from_millis(100),
                "chunks only {gap:?} apart"
            );
        }
        assert!(chunks[0].0 >= Duration::from_millis(100));
        eventually("the stream is no longer in flight", || {
            stub.in_flight() == 0
        })
        .await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_counts_ten_mib_sent_in_chunks() {
    bounded(async {
        static CHUNK: [u8; 64 * 1024] = [7; 64 * 1024];
        let stub = blue().await;
        let chunks = futures_util::stream::iter(
            (0..160).map(|_| Ok::<_, Infallible>(Frame::data(Bytes::from_static(&CHUNK)))),
        );
        let req = Request::post(format!("{}/echo/upload", stub.url()))
            .body(BodyExt::boxed(StreamBody::new(chunks)))
            .unwrap();
        let a = send(&client(), req).await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.body, r#"{"bytes": 10485760}"#);
        assert_eq!(header(&a, "x-stub-app"), "echo");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_rate_fails_exactly_every_fifth_app_request_and_never_probes() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        stub.set_error_rate(0.2);
        let mut failed = Vec::new();
        for i in 1..=20 {
            let a = get(&c, format!("{}/echo", stub.url())).await;
            if a.status == StatusCode::INTERNAL_SERVER_ERROR {
                assert_eq!(header(&a, "x-stub-cluster"), "blue");
                failed.push(i);
            } else {
                assert_eq!(a.status, StatusCode::OK);
            }
            let probe = get(&c, format!("{}/-/healthz", stub.url())).await;
            assert_eq!(probe.status, StatusCode::OK, "probes never fail");
        }
        assert_eq!(failed, vec![5, 10, 15, 20]);
        assert_eq!(stub.requests(), 20);

        stub.set_error_rate(0.0);
        for _ in 0..5 {
            assert_eq!(
                get(&c, format!("{}/echo", stub.url())).await.status,
                StatusCode::OK
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_status_sleep_and_latency() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let req = Request::get(format!("{}/echo/headers?x=1", stub.url()))
            .header("x-foo", "a")
            .header("x-foo", "b")
            .header("x-request-id", "r-1")
            .body(empty())
            .unwrap();
        let a = send(&c, req).await;
        let json: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(json["x-foo"], "a, b");
        assert_eq!(json["x-request-id"], "r-1");
        assert_eq!(json["host"], stub.addr().to_string());
        assert_eq!(json["_method"], "GET");
        assert_eq!(json["_uri"], "/echo/headers?x=1");
        assert_eq!(json["_version"], "HTTP/1.1");

        let teapot = get(&c, format!("{}/echo/status/418", stub.url())).await;
        assert_eq!(
            (teapot.status.as_u16(), teapot.body.as_str()),
            (418, "blue 418")
        );
        let no_content = get(&c, format!("{}/echo/status/204", stub.url())).await;
        assert_eq!(
            (no_content.status.as_u16(), no_content.body.as_str()),
            (204, "")
        );

        let t = Instant::now();
        let slept = get(&c, format!("{}/echo/sleep/120", stub.url())).await;
        assert!(t.elapsed() >= Duration::from_millis(120));
        assert_eq!(slept.body, "blue v1 echo 0\n");

        stub.set_latency(Duration::from_millis(300));
        let t = Instant::now();
        get(&c, format!("{}/-/healthz", stub.url())).await;
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "probes are not delayed"
        );
        let t = Instant::now();
        get(&c, format!("{}/other", stub.url())).await;
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "app requests are delayed"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echoes_text_with_cluster_prefix_and_binary_as_is() {
    bounded(async {
        let stub = blue().await;
        let tcp = TcpStream::connect(stub.addr()).await.unwrap();
        let url = format!("ws://{}/echo/ws", stub.addr());
        let (mut ws, resp) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(resp.headers()["x-stub-app"], "echo");

        ws.send(Message::text("hello")).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::text("blue: hello"));
        ws.send(Message::binary(vec![0u8, 1, 2, 255]))
            .await
            .unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply, Message::binary(vec![0u8, 1, 2, 255]));
        assert_eq!(stub.in_flight(), 1, "an open websocket is in flight");

        ws.close(None).await.unwrap();
        while let Some(msg) = ws.next().await {
            if let Ok(msg) = msg {
                assert!(msg.is_close(), "only the close reply follows, got {msg:?}");
            }
        }
        eventually("the websocket is no longer in flight", || {
            stub.in_flight() == 0
        })
        .await;

        // A plain GET on the same path is not an upgrade.
        let a = get(&client(), format!("{}/echo/ws", stub.url())).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_refuses_new_connections_and_drops_open_ones() {
    bounded(async {
        let stub = blue().await;
        let addr = stub.addr();
        let c = client();
        assert_eq!(
            get(&c, format!("{}/echo", stub.url())).await.status,
            StatusCode::OK
        );
        // An open keep-alive connection that has been served once.
        let mut open = TcpStream::connect(addr).await.unwrap();
        open.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = open.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        // And a slow stream in progress.
        let url = format!("{}/echo/stream?n=100&interval_ms=50", stub.url());
        let streaming = c
            .request(Request::get(url).body(empty()).unwrap())
            .await
            .unwrap();

        stub.kill();
        let refused = TcpStream::connect(addr).await;
        assert!(refused.is_err(), "a new connection after kill() must fail");

        let eof = tokio::time::timeout(Duration::from_secs(5), open.read(&mut buf)).await;
        assert!(
            matches!(eof, Ok(Ok(0)) | Ok(Err(_))),
            "open connection must be closed, got {eof:?}"
        );
        let rest = streaming.into_body().collect().await;
        assert!(rest.is_err(), "a stream cut by kill() must end in an error");
        assert!(c
            .request(
                Request::get(format!("{}/echo", stub.url()))
                    .body(empty())
                    .unwrap()
            )
            .await
            .is_err());
        eventually("nothing is in flight", || stub.in_flight() == 0).await;
        // The port is released once the stub's tasks have run.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpListener::bind(addr).await.is_err() {
            assert!(Instant::now() < deadline, "port {addr} still taken");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_port_and_open_websockets() {
    bounded(async {
        let stub = blue().await;
        let addr = stub.addr();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/echo/ws"), tcp)
            .await
            .unwrap();
        let handle = stub.clone();
        assert_eq!(handle.in_flight(), 1);
        stub.shutdown().await;
        assert_eq!(
            handle.in_flight(),
            0,
            "shutdown waits for the websocket task"
        );
        TcpListener::bind(addr)
            .await
            .expect("port is free after shutdown");
        let next = ws.next().await;
        assert!(!matches!(next, Some(Ok(Message::Text(_)))), "got {next:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_server() {
    bounded(async {
        let stub = blue().await;
        let addr = stub.addr();
        drop(stub);
        assert!(TcpStream::connect(addr).await.is_err());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_keep_alive_load_is_all_served() {
    bounded(async {
        let stub = blue().await;
        let c = client();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (c, url) = (c.clone(), format!("{}/echo", stub.url()));
                tokio::spawn(async move {
                    for _ in 0..100 {
                        let a = get(&c, url.clone()).await;
                        assert_eq!(a.body, "blue v1 echo 0\n");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(stub.requests(), 1600);
        assert_eq!(stub.in_flight(), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_announces_serves_and_exits_on_sigterm() {
    bounded(async {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_serve-stub"))
            .args([
                "--name",
                "green",
                "--revision",
                "v2",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--app", "echo=/echo", "--app", "other=/other"])
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = lines.next_line().await.unwrap().expect("a readiness line");
        let url = line
            .strip_prefix("serve-stub green listening on ")
            .unwrap_or_else(|| panic!("unexpected line {line:?}"))
            .to_owned();
        assert!(url.starts_with("http://127.0.0.1:"));
        let a = get(&client(), format!("{url}/other/x")).await;
        assert_eq!(a.body, "green v2 other 0\n");

        let pid = child.id().unwrap().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
        let status = child.wait().await.unwrap();
        assert!(status.success(), "exit status {status:?}");
    })
    .await;
}

/// On a current-thread runtime with a blocking connect, the stub's tasks
/// cannot run between `kill()` and the connect: `kill()` itself must make the
/// port refuse connections, as a dead process's port does (not accept them
/// and reset them later).
#[tokio::test(flavor = "current_thread")]
async fn kill_refuses_connections_before_the_stub_tasks_run() {
    bounded(async {
        let stub = blue().await;
        let addr = stub.addr();
        let before = std::net::TcpStream::connect(addr);
        assert!(before.is_ok(), "the stub accepts before kill()");
        stub.kill();
        let after = std::net::TcpStream::connect(addr).map(drop);
        assert_eq!(
            after.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused),
            "kill() must refuse new connections at once"
        );
    })
    .await;
}
