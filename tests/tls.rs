//! TLS: HTTP/1.1 and HTTP/2 over TLS (ALPN) to the gateway, `x-forwarded-proto: https`, certificate
//! reload (explicit, polled, SIGHUP to the binary) without dropping open connections, startup
//! errors naming the file, and TLS to `https://` clusters with `upstream.ca_file`.
//!
//! Certificates are made at test time with rcgen; everything listens on 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{config_yaml, eventually, get, metric, stub, TestGateway, WAIT};
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rayshift::tls::CertResolver;
use rayshift::{Config, Gateway, GatewayError};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::Message;

// ---------------------------------------------------------------------------------------------
// Certificates

/// A certificate authority made for one test.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A server certificate for `localhost` and `127.0.0.1`, issued by a [`Ca`].
struct Leaf {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca { cert, key }
    }

    /// A server certificate whose subject CN is `cn`.
    fn issue(&self, cn: &str) -> Leaf {
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("leaf params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .expect("leaf certificate");
        Leaf { cert, key }
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).expect("write CA");
    }

    fn client_config(&self, alpn: &[&[u8]]) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("add root");
        let mut config = rustls::ClientConfig::builder_with_provider(rayshift::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }
}

impl Leaf {
    fn der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Writes `cert.pem` and `key.pem` into `dir` (replacing what is there).
    fn write(&self, dir: &Path) {
        std::fs::write(dir.join("cert.pem"), self.cert.pem()).expect("write cert");
        std::fs::write(dir.join("key.pem"), self.key.serialize_pem()).expect("write key");
    }

    fn certified_key(&self) -> CertifiedKey {
        CertifiedKey::from_der(
            vec![self.der()],
            PrivateKeyDer::Pkcs8(self.key.serialize_der().into()),
            &rayshift::tls::provider(),
        )
        .expect("certified key")
    }
}

// ---------------------------------------------------------------------------------------------
// A TLS client on one connection

/// One client connection to the gateway, HTTP/1.1 or HTTP/2 over TLS.
enum Conn {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// A response, fully read.
struct Reply {
    status: StatusCode,
    version: Version,
    body: String,
}

/// A TLS connection to `addr` offering `alpn`, checked against `ca` for the name `localhost`.
async fn tls_connect(
    addr: SocketAddr,
    ca: &Ca,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let connector = TlsConnector::from(Arc::new(ca.client_config(alpn)));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(WAIT, connector.connect(name, tcp))
        .await
        .expect("handshake timed out")
        .expect("TLS handshake")
}

/// Opens a TLS connection offering `alpn`; returns the HTTP connection (by the negotiated
/// protocol) and the certificate the server presented.
async fn open(addr: SocketAddr, ca: &Ca, alpn: &[&[u8]]) -> (Conn, CertificateDer<'static>) {
    let tls = tls_connect(addr, ca, alpn).await;
    let (_, session) = tls.get_ref();
    let peer = session
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("peer certificate")
        .clone()
        .into_owned();
    let negotiated = session.alpn_protocol().map(<[u8]>::to_vec);
    let io = TokioIo::new(tls);
    let conn = if negotiated.as_deref() == Some(b"h2") {
        let (send, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        Conn::H2(send)
    } else {
        let (send, conn) = http1::handshake(io).await.expect("http/1.1 handshake");
        tokio::spawn(conn);
        Conn::H1(send)
    };
    (conn, peer)
}

impl Conn {
    fn version(&self) -> Version {
        match self {
            Conn::H1(_) => Version::HTTP_11,
            Conn::H2(_) => Version::HTTP_2,
        }
    }

    /// `GET path` on this connection.
    async fn get(&mut self, path: &str) -> Reply {
        let fut = async {
            let resp = match self {
                Conn::H1(send) => {
                    let req = Request::get(path)
                        .header(http::header::HOST, "localhost")
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    send.ready().await.expect("connection ready");
                    send.send_request(req).await.expect("send request")
                }
                Conn::H2(send) => {
                    let req = Request::get(format!("https://localhost{path}"))
                        .version(Version::HTTP_2)
                        .body(Full::new(Bytes::new()))
                        .expect("request");
                    send.ready().await.expect("connection ready");
                    send.send_request(req).await.expect("send request")
                }
            };
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.expect("read body").to_bytes();
            Reply {
                status: parts.status,
                version: parts.version,
                body: String::from_utf8_lossy(&body).into_owned(),
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("request timed out")
    }
}

/// The certificate a new connection to `addr` is presented.
async fn presented(addr: SocketAddr, ca: &Ca) -> CertificateDer<'static> {
    open(addr, ca, &[b"http/1.1"]).await.1
}

/// A gateway in front of one stub cluster (app `echo` at `/echo`), serving TLS with `leaf`.
async fn tls_gateway(
    name: &str,
    leaf: &Leaf,
    reload_interval: &str,
) -> (serve_stub::ServeStub, TestGateway) {
    tls_gateway_with(name, leaf, reload_interval, "").await
}

/// [`tls_gateway`] with `extra` config (top-level YAML keys).
async fn tls_gateway_with(
    name: &str,
    leaf: &Leaf,
    reload_interval: &str,
    extra: &str,
) -> (serve_stub::ServeStub, TestGateway) {
    let blue = stub(name, "v1", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    leaf.write(dir.path());
    let yaml = config_yaml(
        &["shard-0"],
        &[common::cluster(&blue, "shard-0", "v1", None)],
        &format!(
            "tls:\n  cert_file: cert.pem\n  key_file: key.pem\n  reload_interval: {reload_interval}\n{extra}"
        ),
    );
    let gw = TestGateway::start_in(&yaml, dir).await;
    assert_eq!(gw.gateway.proxy_scheme(), "https");
    (blue, gw)
}

// ---------------------------------------------------------------------------------------------
// Downstream TLS

/// HTTP/1.1 and HTTP/2 chosen by ALPN, through the gateway to a cluster; the cluster sees
/// `x-forwarded-proto: https`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_h2_over_tls() {
    let ca = Ca::new("downstream CA");
    let leaf = ca.issue("gateway-one");
    let (_blue, gw) = tls_gateway("tls-blue", &leaf, "5s").await;
    let addr = gw.gateway.proxy_addr();

    for (alpn, version) in [
        (&[b"http/1.1" as &[u8]][..], Version::HTTP_11),
        (&[b"h2" as &[u8], b"http/1.1"][..], Version::HTTP_2),
        // No ALPN at all: HTTP/1.1.
        (&[][..], Version::HTTP_11),
    ] {
        let (mut conn, cert) = open(addr, &ca, alpn).await;
        assert_eq!(cert, leaf.der());
        assert_eq!(conn.version(), version, "ALPN {alpn:?}");
        // Two requests on the one connection: it is kept alive.
        for _ in 0..2 {
            let r = conn.get("/echo/headers").await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.body);
            assert_eq!(r.version, version);
            let headers: serde_json::Value = serde_json::from_str(&r.body).expect("headers JSON");
            assert_eq!(headers["x-forwarded-proto"], "https", "{headers}");
            assert_eq!(headers["x-forwarded-host"], "localhost", "{headers}");
            // Upstream is HTTP/1.1 whatever the client spoke.
            assert_eq!(headers["_version"], "HTTP/1.1", "{headers}");
        }
        let r = conn.get("/echo/x").await;
        assert_eq!(r.body, "tls-blue v1 echo 0\n");
    }

    // A plain-HTTP request to the TLS port is not served.
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tcp.write_all(b"GET /echo/x HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut buf)).await;
    assert!(
        !String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"),
        "plain HTTP was served on the TLS port"
    );
}

/// WebSockets (HTTP/1.1 upgrade) pass through a TLS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_over_tls() {
    let ca = Ca::new("wss CA");
    let (_blue, gw) = tls_gateway("wss-blue", &ca.issue("gateway"), "5s").await;
    let stream = tls_connect(gw.gateway.proxy_addr(), &ca, &[b"http/1.1"]).await;
    let (mut ws, resp) = tokio_tungstenite::client_async("wss://localhost/echo/ws", stream)
        .await
        .expect("WebSocket handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}")))
            .await
            .expect("send");
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("echo timed out")
            .expect("stream open")
            .expect("message");
        assert_eq!(
            msg.into_text().expect("text").as_str(),
            format!("wss-blue: hello {i}")
        );
    }
    ws.close(None).await.expect("close");
}

/// A reload (as SIGHUP does) swaps the certificate for new connections; connections open across
/// the reload, HTTP/1.1 and HTTP/2, keep working. A bad PEM keeps the current certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_open_connections_and_serves_the_new_certificate() {
    let ca = Ca::new("reload CA");
    let first = ca.issue("gateway-first");
    // Polling off: only the explicit reloads below change the certificate.
    let (_blue, gw) = tls_gateway("reload-blue", &first, "0s").await;
    let addr = gw.gateway.proxy_addr();

    let (mut h1, cert) = open(addr, &ca, &[b"http/1.1"]).await;
    assert_eq!(cert, first.der());
    let (mut h2, _) = open(addr, &ca, &[b"h2"]).await;
    assert_eq!(h1.get("/echo/a").await.status, StatusCode::OK);
    assert_eq!(h2.get("/echo/a").await.status, StatusCode::OK);

    let second = ca.issue("gateway-second");
    second.write(gw.dir.path());
    gw.gateway.reload_tls().expect("reload");

    // The open connections go on.
    for _ in 0..3 {
        let r = h1.get("/echo/b").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let r = h2.get("/echo/b").await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // New connections see the new certificate.
    let (mut fresh, cert) = open(addr, &ca, &[b"h2"]).await;
    assert_eq!(
        cert,
        second.der(),
        "a new connection got the old certificate"
    );
    assert_eq!(fresh.get("/echo/c").await.status, StatusCode::OK);

    // A broken certificate file: the reload fails naming the file, the current one stays.
    std::fs::write(
        gw.dir.path().join("cert.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!\n",
    )
    .expect("write");
    let e = gw
        .gateway
        .reload_tls()
        .expect_err("bad PEM reloaded")
        .to_string();
    assert!(e.contains("cert.pem"), "{e}");
    assert_eq!(presented(addr, &ca).await, second.der());
    assert_eq!(h1.get("/echo/d").await.status, StatusCode::OK);

    let metrics = get(&gw.admin("/metrics")).await.body;
    assert!(
        metrics.contains(r#"rayshift_tls_reloads_total{result="ok"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"rayshift_tls_reloads_total{result="error"}"#),
        "{metrics}"
    );
}

/// With `reload_interval`, a changed certificate file is picked up without a signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_files_are_reloaded_by_polling() {
    let ca = Ca::new("poll CA");
    let first = ca.issue("gateway-first");
    let (_blue, gw) = tls_gateway("poll-blue", &first, "100ms").await;
    let addr = gw.gateway.proxy_addr();
    let (mut open_conn, _) = open(addr, &ca, &[b"http/1.1"]).await;

    let second = ca.issue("gateway-second");
    second.write(gw.dir.path());
    eventually("the new certificate is presented", || async {
        presented(addr, &ca).await == second.der()
    })
    .await;
    assert_eq!(open_conn.get("/echo/x").await.status, StatusCode::OK);
}

/// A client that opens a TLS connection and sends nothing is closed after
/// `limits.header_read_timeout` and counted as `header_timeout`; one that speaks plain HTTP to the
/// TLS listener fails its handshake and is counted as `tls_handshake`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_plaintext_clients_on_a_tls_listener_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new("closed CA");
    let leaf = ca.issue("gateway-closed");
    let (_blue, gw) = tls_gateway_with(
        "closed-blue",
        &leaf,
        "1m",
        "limits:\n  header_read_timeout: 1s\n",
    )
    .await;
    let timeouts = r#"rayshift_client_connections_closed_total{reason="header_timeout"}"#;
    let failures = r#"rayshift_client_connections_closed_total{reason="tls_handshake"}"#;
    let (timeouts_before, failures_before) = (
        metric(&gw, timeouts).await.unwrap_or(0.0),
        metric(&gw, failures).await.unwrap_or(0.0),
    );

    let mut silent = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    let mut plain = tokio::net::TcpStream::connect(gw.gateway.proxy_addr())
        .await
        .unwrap();
    plain
        .write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    for conn in [&mut silent, &mut plain] {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(WAIT, conn.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the gateway did not close the connection");
    }
    eventually("both closes counted", || async {
        metric(&gw, timeouts).await.unwrap_or(0.0) > timeouts_before
            && metric(&gw, failures).await.unwrap_or(0.0) > failures_before
    })
    .await;
}

/// The binary reloads on SIGHUP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate() {
    let ca = Ca::new("sighup CA");
    let first = ca.issue("gateway-first");
    let blue = stub("hup-blue", "v1", &[("echo", "/echo")]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    first.write(dir.path());
    let yaml = config_yaml(
        &["shard-0"],
        &[common::cluster(&blue, "shard-0", "v1", None)],
        "tls:\n  cert_file: cert.pem\n  key_file: key.pem\n  reload_interval: 0s\n",
    );
    let config = dir.path().join("rayshift.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let gw = Process::spawn(&config);
    let addr = gw.proxy;

    let (mut conn, cert) = open(addr, &ca, &[b"h2"]).await;
    assert_eq!(cert, first.der());
    eventually("the cluster is ready", || async {
        let (mut conn, _) = open(addr, &ca, &[b"http/1.1"]).await;
        conn.get("/echo/x").await.status == StatusCode::OK
    })
    .await;

    let second = ca.issue("gateway-second");
    second.write(dir.path());
    gw.signal("HUP");
    eventually("the new certificate is presented after SIGHUP", || async {
        presented(addr, &ca).await == second.der()
    })
    .await;
    assert_eq!(conn.get("/echo/x").await.status, StatusCode::OK);
    let metrics = format!("http://{}/metrics", gw.admin);
    let failing = || {
        let url = metrics.clone();
        async move {
            let body = get(&url).await.body;
            body.lines()
                .find_map(|l| l.strip_prefix("rayshift_tls_reload_failing "))
                .unwrap_or_else(|| panic!("no rayshift_tls_reload_failing in:\n{body}"))
                .trim()
                .to_string()
        }
    };
    assert_eq!(failing().await, "0");

    // A broken key: the reload fails, the gauge says so until a good pair loads.
    std::fs::write(dir.path().join("key.pem"), "not a key\n").expect("write");
    gw.signal("HUP");
    eventually(
        "a failed reload shows in rayshift_tls_reload_failing",
        || async { failing().await == "1" },
    )
    .await;
    assert_eq!(presented(addr, &ca).await, second.der());
    second.write(dir.path());
    gw.signal("HUP");
    eventually(
        "a good reload clears rayshift_tls_reload_failing",
        || async { failing().await == "0" },
    )
    .await;
    // SIGHUP did not stop the gateway.
    assert_eq!(
        open(addr, &ca, &[b"h2"])
            .await
            .0
            .get("/echo/y")
            .await
            .status,
        StatusCode::OK
    );
}

/// Certificate, key and CA files are read at startup; a problem stops the start and names the
/// file (`rayshift run` exits non-zero).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_on_bad_files_naming_them() {
    let ca = Ca::new("startup CA");
    let dir = tempfile::tempdir().expect("tempdir");
    ca.issue("gw").write(dir.path());
    std::fs::write(dir.path().join("garbage.pem"), "hello\n").expect("write");
    let base =
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [s]\n";
    for (extra, needle) in [
        (
            "tls: {cert_file: cert.pem, key_file: missing-key.pem}\n",
            "missing-key.pem",
        ),
        (
            "tls: {cert_file: garbage.pem, key_file: key.pem}\n",
            "garbage.pem: no certificate found",
        ),
        (
            "tls: {cert_file: cert.pem, key_file: garbage.pem}\n",
            "garbage.pem: no private key found",
        ),
        ("upstream: {ca_file: garbage.pem}\n", "upstream.ca_file"),
    ] {
        let config = Config::from_yaml(&format!("{base}{extra}"), dir.path()).expect("config");
        let e = Gateway::start(config)
            .await
            .expect_err("started with a bad file");
        assert!(matches!(e, GatewayError::Tls(_)), "{e:?}");
        assert!(e.to_string().contains(needle), "{needle} not in {e}");
    }

    // The binary: non-zero exit, the file named on stderr.
    let config = dir.path().join("bad.yaml");
    std::fs::write(
        &config,
        format!("{base}tls: {{cert_file: garbage.pem, key_file: key.pem}}\n"),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rayshift"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn rayshift");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("rayshift started with a bad certificate file");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    assert!(!status.success());
    assert!(stderr.contains("garbage.pem"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// Upstream TLS

/// A TLS terminator in front of a stub cluster, with a certificate that can be swapped.
struct TlsFront {
    addr: SocketAddr,
    resolver: Arc<CertResolver>,
    /// When set, new connections are accepted and then left without a TLS handshake.
    stall: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsFront {
    async fn start(backend: SocketAddr, leaf: &Leaf) -> TlsFront {
        let resolver = Arc::new(CertResolver::new(leaf.certified_key()));
        let mut config = rustls::ServerConfig::builder_with_provider(rayshift::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&resolver) as _);
        // No session resumption: every handshake shows (and the gateway checks) the certificate
        // presented now, as after a restart of a real server.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stall = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stalled = Arc::clone(&stall);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                if stalled.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                        drop(tcp);
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront {
            addr,
            resolver,
            stall,
            task,
        }
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gateway config with one `https://` cluster behind `front`; `extra` appended.
fn https_cluster_yaml(front: &TlsFront, probe_interval: &str, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\nstate_file: state.json\nshards: [s]\n\
         probe:\n  interval: {probe_interval}\n  timeout: 2s\n\
         clusters:\n  - name: tls-up\n    shard: s\n    revision: v1\n    serve_url: https://127.0.0.1:{}\n{extra}",
        front.addr.port()
    )
}

/// A stub cluster `name` behind a TLS front with a certificate of its own CA, and a ready gateway
/// trusting that CA (`upstream.ca_file`) with `upstream_keys` (indented lines) added. Probes are
/// slow (the first is at once) and nothing is pooled: every request makes a new TLS connection.
async fn https_cluster(
    name: &str,
    upstream_keys: &str,
) -> (Ca, common::ServeStub, TlsFront, TestGateway) {
    let upstream_ca = Ca::new("upstream CA");
    let backend = stub(name, "v1", &[("echo", "/echo")]).await;
    let front = TlsFront::start(backend.addr(), &upstream_ca.issue("serve")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    upstream_ca.write(&dir.path().join("ca.pem"));
    let yaml = https_cluster_yaml(
        &front,
        "1h",
        &format!(
            "upstream:\n  ca_file: ca.pem\n  max_idle_per_cluster: 0\n  retries: false\n{upstream_keys}"
        ),
    );
    let gw = TestGateway::start_in(&yaml, dir).await;
    gw.wait_cluster_ready("tls-up", true).await;
    (upstream_ca, backend, front, gw)
}

/// With `upstream.ca_file`, `https://` clusters are probed and served over TLS. A certificate the
/// CA did not issue fails the request with 502 naming the cluster; without the CA file the
/// cluster never becomes ready (its probe fails on the certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_clusters_with_a_ca_file() {
    let (upstream_ca, backend, front, gw) = https_cluster("tls-up", "").await;
    assert!(backend.probe_requests() > 0);
    let gw_url = gw.url("/echo/x");
    for _ in 0..3 {
        let r = get(&gw_url).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(r.body, "tls-up v1 echo 0\n");
    }
    let r = get(&gw.url("/echo/headers")).await;
    let headers: serde_json::Value = serde_json::from_str(&r.body).expect("headers JSON");
    assert_eq!(headers["x-forwarded-proto"], "http", "{headers}");

    // The cluster now presents a certificate from another CA: refused on the data path.
    let rogue = Ca::new("rogue CA").issue("serve");
    front.resolver.set(rogue.certified_key());
    let r = get(&gw_url).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert!(
        r.body.contains("upstream cluster 'tls-up' failed"),
        "{}",
        r.body
    );
    assert!(r.body.contains("certificate"), "{}", r.body);
    front
        .resolver
        .set(upstream_ca.issue("serve").certified_key());
    assert_eq!(get(&gw_url).await.status, StatusCode::OK);

    // Without the CA file the certificate is not trusted: the probe fails, the cluster is not ready.
    let apps = "apps:\n  - {name: echo, route_prefix: /echo}\n";
    let gw2 = TestGateway::start(&https_cluster_yaml(&front, "100ms", apps)).await;
    let state = gw2.cluster_state("tls-up").await;
    assert_eq!(state["ready"], false, "{state}");
    let detail = state["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("certificate"), "{state}");
    let r = get(&gw2.url("/echo/x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
}

// ---------------------------------------------------------------------------------------------
// The binary as a child process

/// `rayshift run` with a TLS config; killed when dropped.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Process {
    fn spawn(config: &Path) -> Process {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rayshift"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn rayshift");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let (mut proxy, mut admin) = (None, None);
        while proxy.is_none() || admin.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(line) = rx.recv_timeout(left) else {
                break;
            };
            if let Some(addr) = line.strip_prefix("rayshift: proxy listening on https://") {
                proxy = addr.parse().ok();
            } else if let Some(addr) = line.strip_prefix("rayshift: admin listening on http://") {
                admin = addr.parse().ok();
            }
        }
        match (proxy, admin) {
            (Some(proxy), Some(admin)) => Process {
                child,
                proxy,
                admin,
            },
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("rayshift printed no https proxy and admin addresses");
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A cluster that accepts connections but never finishes the TLS handshake fails a request as a
/// connect failure within `upstream.connect_timeout` (502 naming it), not after the much longer
/// response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_a_connect_failure() {
    let (_ca, _backend, front, gw) = https_cluster(
        "tls-stall",
        "  connect_timeout: 2s\n  response_timeout: 60s\n",
    )
    .await;
    assert_eq!(get(&gw.url("/echo/x")).await.status, StatusCode::OK);
    front.stall.store(true, std::sync::atomic::Ordering::SeqCst);
    let r = get(&gw.url("/echo/x")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert!(r.body.contains("upstream.connect_timeout"), "{}", r.body);
}
