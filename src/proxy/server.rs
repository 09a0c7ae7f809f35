//! Accepting client connections: HTTP/1.1 and HTTP/2 (prior knowledge, h2c; or over TLS with
//! ALPN `h2`/`http/1.1`) on one port, with upgrades, connection limits and a graceful drain.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::config::LimitsConfig;
use crate::proxy::conn_watch::{ConnWatch, Ended, Tracked};
use crate::proxy::workers::Counted;
use crate::proxy::{forward, h1, headers, Open, ProxyContext};

/// Serves client connections from `listener` until `shutdown` turns true; then stops accepting,
/// tells HTTP/2 clients GOAWAY, closes idle HTTP/1 connections, and waits up to `drain` for open
/// requests, streamed bodies and upgraded connections (WebSockets) to finish: those hyper tracks
/// here, then ([`drain_untracked`], called by the gateway once for all listeners) the others.
/// Returns the drain's deadline, or `None` when it passed (logged). Connections are served on
/// the runtime this runs on (a per-core worker's, see [`crate::proxy::workers`]).
///
/// With `tls`, every connection starts with a TLS handshake (bounded by
/// `limits.header_read_timeout`, done on the connection's own task); the protocol is then what
/// the client chose by ALPN (`h2` or `http/1.1`; the connection preface tells them apart). The
/// certificate comes from the configuration's resolver, so a reload affects new handshakes only.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<ProxyContext>,
    mut shutdown: watch::Receiver<bool>,
    limits: LimitsConfig,
    drain: Duration,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Shared,
) -> Option<tokio::time::Instant> {
    let Shared {
        connections,
        worker,
    } = shared;
    let index = worker.as_ref().map(|(index, _)| *index);
    let worker = worker.map(|(_, gauge)| gauge);
    let tls = tls.map(TlsAcceptor::from);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // A peer that vanished without closing (host gone, NAT state lost) is found by pings
        // instead of holding its connection (and a `max_connections` permit) forever.
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        // A stream whose cluster does not read its upload holds up to a stream window of unread
        // data; with a connection window of the same size (hyper's default, 1 MiB both) that one
        // stream would stop every other upload on the connection (a load balancer multiplexing
        // many users on one connection). Four streams can stall before the others wait, with the
        // connection's buffered uploads bounded as before.
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(4 * H2_STREAM_WINDOW);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let direct = ctx.direct_http1;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // At the connection limit this client waits, accepted and unread, for a permit,
                // and the next ones wait in the listen backlog. (Taking the permit before
                // accepting would leave it idle with a worker whose socket gets no client while
                // another worker's clients wait.)
                let permit = tokio::select! {
                    permit = Arc::clone(&connections).acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = crate::gateway::stopped(&mut shutdown) => break,
                };
                let _ = stream.set_nodelay(true);
                // A client that stops reading leaves sent data unacknowledged (its window shut):
                // the kernel closes the connection after `limits.send_timeout` of that, so the
                // response, its upstream connection and its place at the cluster are freed.
                #[cfg(any(target_os = "linux", target_os = "android"))]
                let _ = socket2::SockRef::from(&stream).set_tcp_user_timeout(Some(limits.send_timeout));
                let client_ctx = Arc::clone(&ctx);
                let ctx = Arc::clone(&ctx);
                let peer_value = headers::peer_value(peer.ip());
                let direct_peer = peer_value.clone();
                let watch = ConnWatch::new();
                let requests = watch.clone();
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let guard = requests.request(req.version());
                    let (ctx, peer_value) = (Arc::clone(&ctx), peer_value.clone());
                    // The request's future (several KiB) is made inside the block and boxed:
                    // one made before the block and awaited inside would be held twice in its
                    // state, and the block itself is moved several times per request (hyper's
                    // HTTP/2 server spawns a task per stream; its HTTP/1 dispatcher stores it).
                    // Measured in BENCHMARKS.md ("HTTP/2 and TLS clients").
                    async move {
                        let resp = Box::pin(forward::handle(ctx, peer, peer_value, req)).await?;
                        Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, guard)))
                    }
                });
                let client = Client {
                    ctx: client_ctx,
                    peer,
                    peer_value: direct_peer,
                    shutdown: shutdown.clone(),
                    builder: Arc::clone(&builder),
                    watcher: graceful.watcher(),
                    limits: limits.clone(),
                    direct,
                };
                let counted = worker.as_ref().map(Counted::new);
                let Some(acceptor) = &tls else {
                    tokio::spawn(async move {
                        client.serve(stream, watch, service).await;
                        drop((permit, counted));
                    });
                    continue;
                };
                let acceptor = acceptor.clone();
                let handshake_timeout = limits.header_read_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => client.serve(stream, watch, service).await,
                        Ok(Err(e)) => {
                            // A client that hung up (a load balancer's TCP check) is not counted:
                            // the gateway closed nothing. One that refused the certificate sends
                            // an alert, and is.
                            let hung_up = matches!(
                                e.kind(),
                                std::io::ErrorKind::UnexpectedEof
                                    | std::io::ErrorKind::ConnectionReset
                                    | std::io::ErrorKind::BrokenPipe
                            );
                            if !hung_up {
                                crate::telemetry::connection_closed("tls_handshake");
                            }
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                        Err(_) => {
                            // Bounded by limits.header_read_timeout, as a request head is.
                            crate::telemetry::connection_closed("header_timeout");
                            tracing::debug!(%peer, ?handshake_timeout, "TLS handshake timed out");
                        }
                    }
                    drop((permit, counted));
                });
            }
            () = crate::gateway::stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + drain;
    if tokio::time::timeout_at(deadline, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            worker = index,
            "drain timeout: closing remaining client connections"
        );
        return None;
    }
    Some(deadline)
}

/// The rest of the drain, once every listener's [`serve`] has drained what hyper tracks: waits
/// until `deadline` for the connections it does not (counted in `ctx`, on every worker).
pub async fn drain_untracked(ctx: &ProxyContext, deadline: tokio::time::Instant, drain: Duration) {
    // Upgraded connections (WebSockets) left hyper's connection tracking when they switched
    // protocols; the proxy counts them until they close (whatever happened to their cluster).
    // Connections on the direct path finish their request in flight and close.
    while tokio::time::Instant::now() < deadline {
        let open = ctx.open_tunnels.load(std::sync::atomic::Ordering::Relaxed)
            + ctx.open_direct.load(std::sync::atomic::Ordering::Relaxed);
        if open == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::warn!(
        ?drain,
        "drain timeout: closing remaining upgraded and direct-path connections"
    );
}

/// What a listener's [`serve`] shares with the other workers' and the gateway.
#[derive(Debug, Clone)]
pub struct Shared {
    /// The permits of `limits.max_connections`, one per open client connection, for all workers.
    pub connections: Arc<Semaphore>,
    /// The worker's index and its `rayshift_worker_connections` gauge (per-core workers only).
    pub worker: Option<(usize, metrics::Gauge)>,
}

/// The general path's per-connection service (hyper calls it for each request).
trait GeneralService:
    hyper::service::Service<
        hyper::Request<hyper::body::Incoming>,
        Response = hyper::Response<Tracked<crate::proxy::body::ProxyBody>>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    > + Send
    + 'static
{
}

impl<T> GeneralService for T where
    T: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<Tracked<crate::proxy::body::ProxyBody>>,
            Error = std::convert::Infallible,
            Future: Send + 'static,
        > + Send
        + 'static
{
}

/// One accepted client connection and what serving it needs.
struct Client {
    ctx: Arc<ProxyContext>,
    peer: std::net::SocketAddr,
    peer_value: http::HeaderValue,
    shutdown: watch::Receiver<bool>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    /// Taken when the connection is created and held until it ends: the drain
    /// (`GracefulShutdown::shutdown`) waits for every connection, also those still in their TLS
    /// handshake. The connection's own graceful shutdown is started by [`ConnWatch::run`].
    watcher: hyper_util::server::graceful::Watcher,
    limits: LimitsConfig,
    /// Whether HTTP/1.1 requests start on the direct path (`upstream.direct_http1`).
    direct: bool,
}

impl Client {
    /// Serves the connection: on the direct HTTP/1.1 path first (when on), then, from the first
    /// request it does not take, with hyper.
    async fn serve<S, Svc>(mut self, io: S, watch: ConnWatch, service: Svc)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        Svc: GeneralService,
    {
        if !self.direct {
            return self.with_hyper(io, watch, service).await;
        }
        let settings = h1::Settings {
            header_read_timeout: self.limits.header_read_timeout,
            max_header_bytes: self.limits.max_header_bytes,
        };
        let open = Open::new(&self.ctx.open_direct);
        let ended = h1::serve(
            io,
            &self.ctx,
            self.peer,
            self.peer_value.as_bytes(),
            settings,
            &mut self.shutdown,
        )
        .await;
        drop(open);
        if let h1::Ended::Handoff(io) = ended {
            self.with_hyper(io, watch, service).await;
        }
    }

    /// Serves the connection (the rest of it, after a handoff) with hyper.
    async fn with_hyper<S, Svc>(self, io: S, watch: ConnWatch, service: Svc)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
        Svc: GeneralService,
    {
        // Held until the connection ends (and dropped after it): the drain waits for it.
        let _drain = self.watcher;
        let conn = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut shutdown = self.shutdown;
        let stop = Box::pin(async move { crate::gateway::stopped(&mut shutdown).await });
        let limited = watch.run(
            conn.as_mut(),
            |conn| conn.as_mut().graceful_shutdown(),
            stop,
            self.limits.header_read_timeout,
            self.limits.http2_idle_timeout,
            self.limits.send_timeout,
        );
        log_end(limited.await, &self.limits, self.peer);
    }
}

/// Whether the client connection's own socket failed with the kernel's `ETIMEDOUT` (its sent
/// data stayed unacknowledged for `TCP_USER_TIMEOUT`). An error of the service's response body
/// (hyper's "user" errors, such as an upstream connection's keep-alive timing out mid-stream) is
/// the cluster's, not the client's.
fn timed_out(e: &(dyn std::error::Error + 'static)) -> bool {
    let io = match e.downcast_ref::<hyper::Error>() {
        Some(hyper) if hyper.is_user() => None,
        Some(hyper) => std::error::Error::source(hyper)
            .and_then(|cause| cause.downcast_ref::<std::io::Error>()),
        None => e.downcast_ref::<std::io::Error>(),
    };
    io.is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
}

/// HTTP/2 flow-control window of each client stream; the connection's is four times it (1 MiB,
/// hyper's default).
const H2_STREAM_WINDOW: u32 = 256 * 1024;

/// How often an idle HTTP/2 client is pinged, and how long it has to answer.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Logs how a client connection served by hyper ended.
fn log_end(
    ended: Ended<Result<(), Box<dyn std::error::Error + Send + Sync>>>,
    limits: &LimitsConfig,
    peer: std::net::SocketAddr,
) {
    let (first_request, http2_idle) = (limits.header_read_timeout, limits.http2_idle_timeout);
    match ended {
        Ended::Done(Ok(())) => {}
        Ended::Done(Err(e)) => {
            if timed_out(e.as_ref()) {
                // The kernel aborted it: sent data stayed unacknowledged for
                // `limits.send_timeout` (TCP_USER_TIMEOUT), an HTTP/1.1 client that stopped reading.
                crate::telemetry::connection_closed("send_timeout");
            }
            tracing::debug!(%peer, error = %e, "client connection ended with an error")
        }
        Ended::NoFirstRequest => {
            crate::telemetry::connection_closed("header_timeout");
            tracing::debug!(
                %peer, timeout = ?first_request,
                "no request within limits.header_read_timeout: closing the connection"
            )
        }
        Ended::Idle => {
            // Counted when it was told GOAWAY.
            tracing::debug!(
                %peer, timeout = ?http2_idle,
                "HTTP/2 connection idle for limits.http2_idle_timeout, told GOAWAY and still open: closing it"
            )
        }
        Ended::Resets => {
            crate::telemetry::connection_closed("resets");
            tracing::debug!(
                %peer, max = super::conn_watch::MAX_RESETS, window = ?super::conn_watch::RESET_WINDOW,
                "HTTP/2 client reset more streams before their response than allowed in a window: closing the connection"
            )
        }
        Ended::Stalled => {
            crate::telemetry::connection_closed("send_timeout");
            tracing::debug!(
                %peer, timeout = ?limits.send_timeout,
                "HTTP/2 client took no response data for limits.send_timeout: closing the connection"
            )
        }
    }
}
