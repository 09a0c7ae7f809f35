//! The direct HTTP/1.1 path: the common request (keep-alive HTTP/1.1, origin-form, no body or a
//! small one with `content-length`, routed to an `http://` cluster) forwarded byte for byte on the
//! connection's own task.
//!
//! The request head is parsed in place and written once for the cluster (hop-by-hop fields out,
//! `x-forwarded-*` and `x-request-id` in, [`head`]); the response head likewise; bodies are copied
//! as they come, chunked ones unchanged ([`chunked`]). No `HeaderMap`, no second task and channel
//! per upstream connection: what a purpose-built proxy does per request, and the part of the
//! request cost that was hyper's general machinery (see BENCHMARKS.md).
//!
//! Everything else goes to the general path (hyper, [`crate::proxy::forward`]) as it arrived: a
//! connection whose request the direct path does not take is handed over, bytes already read
//! included ([`rewind::Rewind`]), and stays there. The general path answers what the direct path
//! never does itself: malformed requests (400, 431), 404 and 503 from routing, 413, HTTP/2,
//! upgrades, `Expect`, chunked uploads, `https://` clusters. Both paths count, time and judge
//! requests the same way (metrics, shift statistics, passive health, retries).

pub mod chunked;
pub mod head;
pub mod rewind;

use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::cluster::Cluster;
use crate::proxy::forward::{self, Failure};
use crate::proxy::pool::{self, RawConn};
use crate::proxy::ProxyContext;
use crate::telemetry;

use head::{Framing, Parsed};
use rewind::Rewind;

/// Largest request body the direct path reads whole before forwarding; larger ones are streamed
/// by the general path.
const MAX_BODY: u64 = 64 * 1024;

/// First size of a client connection's read buffer (grown to `limits.max_header_bytes` for a
/// long head).
const READ_BUF: usize = 4 * 1024;

/// How a client connection left the direct path.
#[derive(Debug)]
pub enum Ended<S> {
    /// It is done (closed by either side, timed out, or shut down).
    Closed,
    /// The general path serves it from here on, starting with the bytes already read.
    Handoff(Rewind<S>),
}

/// Per-listener settings of the direct path.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// `limits.header_read_timeout`: longest wait for a whole request head.
    pub header_read_timeout: Duration,
    /// `limits.max_header_bytes`: a longer head goes to the general path (which answers 431).
    pub max_header_bytes: usize,
}

/// Serves `client` until it closes, the gateway shuts down, or a request needs the general path.
pub async fn serve<S>(
    mut client: S,
    ctx: &ProxyContext,
    peer: SocketAddr,
    peer_value: &[u8],
    settings: Settings,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let info = head::Client {
        peer: peer_value,
        ip: peer.ip(),
        proto: ctx.proto,
        split_key: &ctx.split_key,
    };
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let mut up_head = Vec::new();
    let mut down_head = Vec::new();
    let timer = tokio::time::sleep(settings.header_read_timeout);
    tokio::pin!(timer);
    loop {
        // A whole request head (the client may have sent it already, pipelined).
        let mut deadline_set = false;
        let req = loop {
            if !buf.is_empty() {
                match head::request(&buf, info, &mut up_head) {
                    Parsed::Complete(req) => break req,
                    Parsed::Handoff(why) => {
                        tracing::trace!(%peer, why, "request handed to the general path");
                        return Ended::Handoff(Rewind::new(buf, client));
                    }
                    Parsed::Partial if buf.len() >= settings.max_header_bytes => {
                        return Ended::Handoff(Rewind::new(buf, client));
                    }
                    Parsed::Partial => {}
                }
            }
            if !deadline_set {
                timer
                    .as_mut()
                    .reset(tokio::time::Instant::now() + settings.header_read_timeout);
                deadline_set = true;
            }
            let idle = buf.is_empty();
            buf.reserve(READ_BUF.min(settings.max_header_bytes));
            tokio::select! {
                biased;
                read = client.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
                () = &mut timer => {
                    tracing::debug!(%peer, "no whole request head within limits.header_read_timeout: closing the connection");
                    return Ended::Closed;
                }
                () = crate::gateway::stopped(shutdown), if idle => return Ended::Closed,
            }
        };
        if req.content_length > MAX_BODY
            || ctx
                .max_body_bytes
                .is_some_and(|max| req.content_length > max)
        {
            return Ended::Handoff(Rewind::new(buf, client));
        }
        let Some(route) = route(ctx, &buf, &req) else {
            return Ended::Handoff(Rewind::new(buf, client));
        };

        // The body, whole: small bodies arrive with the head or right after it.
        let total = req.head_len + req.content_length as usize;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            let read = tokio::time::timeout(ctx.body_read_timeout, client.read_buf(&mut buf));
            match read.await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ended::Closed,
                Ok(Ok(_)) => {}
                Err(_) => {
                    let (status, msg) = forward::count_failure(
                        &route.cluster,
                        &route.app,
                        &Failure::BodyTimeout(ctx.body_read_timeout),
                        Duration::ZERO,
                    );
                    let id = &up_head[req.request_id.clone()];
                    head::local_response(&mut down_head, status, id, true, &msg);
                    let _ = write_all(&mut client, &down_head, &[]).await;
                    return Ended::Closed;
                }
            }
        }
        ctx.retry.deposit();
        let close = req.close || *shutdown.borrow();
        let done = exchange(
            ctx,
            &mut client,
            std::str::from_utf8(&buf[req.path.clone()]).unwrap_or("/"),
            &buf[req.head_len..total],
            &req,
            route,
            &up_head,
            &mut down_head,
            close,
        )
        .await;
        buf.advance(total);
        if !done || close {
            let _ = client.shutdown().await;
            return Ended::Closed;
        }
        if buf.is_empty() && buf.capacity() > READ_BUF {
            // A long head or a body grew the buffer: an idle connection keeps only the first size.
            buf = BytesMut::with_capacity(READ_BUF);
        }
    }
}

/// Where a request goes (see `forward::Route`).
struct Route {
    cluster: Arc<Cluster>,
    app: Arc<str>,
    x: u64,
    alternatives: bool,
}

/// The app and cluster of a request; `None` when the general path must answer it (no app: 404;
/// no ready cluster: 503; an `https://` cluster).
fn route(ctx: &ProxyContext, buf: &[u8], req: &head::Request) -> Option<Route> {
    let path = std::str::from_utf8(&buf[req.path.clone()]).ok()?;
    let snap = ctx.table.load();
    let hit = snap.table.lookup(path)?;
    let x = req.split.unwrap_or_else(|| fastrand::u64(..));
    let cluster = snap.cluster(hit.split.pick(x)?);
    if cluster.scheme != http::uri::Scheme::HTTP {
        return None;
    }
    Some(Route {
        cluster: Arc::clone(cluster),
        app: Arc::clone(&hit.app.name),
        x,
        alternatives: hit.split.len() > 1,
    })
}

/// Forwards one request (retrying on another cluster where safe, as the general path does) and
/// its response. Returns false when the client connection cannot carry another request.
#[allow(clippy::too_many_arguments)]
async fn exchange<S>(
    ctx: &ProxyContext,
    client: &mut S,
    path: &str,
    body: &[u8],
    req: &head::Request,
    route: Route,
    up_head: &[u8],
    down_head: &mut Vec<u8>,
    close: bool,
) -> bool
where
    S: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut cluster = route.cluster;
    let mut in_flight = cluster.enter();
    let mut outcome = attempt(ctx, &cluster, up_head, body, req, down_head).await;
    if let Err(Failure::Error { connect, .. }) = &outcome {
        // Safe as in the general path: never reached the cluster, or idempotent without a body.
        let retry = ctx.retries
            && route.alternatives
            && req.content_length == 0
            && (*connect || req.idempotent);
        if let Some(other) = retry
            .then(|| forward::retry_target(ctx, &route.app, &cluster, path, route.x))
            .flatten()
        {
            if ctx.retry.try_withdraw() {
                let reason = if *connect { "connect" } else { "reset" };
                metrics::counter!(telemetry::RETRIES_TOTAL, "cluster" => cluster.name.to_string(), "reason" => reason)
                    .increment(1);
                tracing::debug!(from = %cluster.name, to = %other.name, reason, "retrying on another cluster");
                if let Err(failure) = &outcome {
                    forward::record_failure(&cluster, failure, start.elapsed());
                }
                drop(in_flight);
                cluster = other;
                in_flight = cluster.enter();
                outcome = attempt(ctx, &cluster, up_head, body, req, down_head).await;
            } else {
                metrics::counter!(telemetry::RETRY_BUDGET_EXHAUSTED_TOTAL).increment(1);
            }
        }
    }
    let elapsed = start.elapsed();
    let request_id = &up_head[req.request_id.clone()];
    let (mut conn, resp) = match outcome {
        Ok(pair) => pair,
        Err(failure) => {
            let (status, msg) = forward::count_failure(&cluster, &route.app, &failure, elapsed);
            head::local_response(down_head, status, request_id, close, &msg);
            return write_all(client, down_head, &[]).await.is_ok();
        }
    };
    cluster.stats.record_response(resp.status, elapsed);
    cluster.duration.record(elapsed.as_secs_f64());
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
    cluster
        .requests
        .increment(&route.app, &cluster.shard, &cluster.name, status);

    let close = close || resp.framing == Framing::Close;
    if !resp.has_request_id {
        down_head.extend_from_slice(b"x-request-id: ");
        down_head.extend_from_slice(request_id);
        down_head.extend_from_slice(b"\r\n");
    }
    if close {
        down_head.extend_from_slice(b"connection: close\r\n");
    }
    down_head.extend_from_slice(b"\r\n");
    conn.buf.advance(resp.head_len);
    match copy_body(client, &mut conn, resp.framing, down_head).await {
        Ok(()) => {
            if resp.keep_alive {
                cluster.pool.put_raw(conn);
            }
            drop(in_flight);
            !close
        }
        Err(Copy::Upstream(e)) => {
            tracing::debug!(cluster = %cluster.name, error = %e, "upstream response body failed");
            metrics::counter!(telemetry::UPSTREAM_ERRORS_TOTAL, "cluster" => cluster.name.to_string(), "kind" => "body")
                .increment(1);
            false
        }
        Err(Copy::Client) => false,
    }
}

/// One attempt on `cluster`: send the request on an idle connection or a new one and read the
/// response head (bounded by `upstream.response_timeout`, connecting included). On success the
/// response head for the client is in `down_head` and the connection's buffer starts with the
/// cluster's head.
async fn attempt(
    ctx: &ProxyContext,
    cluster: &Cluster,
    up_head: &[u8],
    body: &[u8],
    req: &head::Request,
    down_head: &mut Vec<u8>,
) -> Result<(RawConn, head::Response), Failure> {
    let sent = async {
        loop {
            let (mut conn, reused) = match cluster.pool.checkout_raw() {
                Some(conn) => (conn, true),
                None => match pool::connect_raw(cluster, ctx.connect_timeout).await {
                    Ok(conn) => (conn, false),
                    Err(cause) => {
                        return Err(Failure::Error {
                            connect: true,
                            cause,
                        })
                    }
                },
            };
            if let Err(e) = write_all(&mut conn.stream, up_head, body).await {
                if reused {
                    // The cluster closed the idle connection: nothing it could act on arrived.
                    continue;
                }
                return Err(Failure::Error {
                    connect: false,
                    cause: format!("writing the request: {e}"),
                });
            }
            match read_head(&mut conn, req.is_head, down_head).await {
                Ok(resp) => return Ok((conn, resp)),
                // Closed with no answer on a connection that had been idle: the keep-alive race;
                // an idempotent request is sent again on another connection.
                Err(ReadHead::ClosedEarly) if reused && req.idempotent => continue,
                Err(e) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "upstream request failed");
                    return Err(Failure::Error {
                        connect: false,
                        cause: e.to_string(),
                    });
                }
            }
        }
    };
    match tokio::time::timeout(ctx.response_timeout, sent).await {
        Ok(outcome) => outcome,
        Err(_) => Err(Failure::Timeout),
    }
}

/// How reading a response head failed.
#[derive(Debug, thiserror::Error)]
enum ReadHead {
    #[error("connection closed before a response")]
    ClosedEarly,
    #[error("connection closed in the response head")]
    ClosedInHead,
    #[error("reading the response: {0}")]
    Io(io::Error),
    #[error("response head over {0} bytes")]
    TooLong(usize),
    #[error(transparent)]
    Bad(#[from] head::BadResponse),
}

/// Longest response head accepted from a cluster.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

async fn read_head(
    conn: &mut RawConn,
    is_head: bool,
    down_head: &mut Vec<u8>,
) -> Result<head::Response, ReadHead> {
    let mut got_any = false;
    loop {
        if !conn.buf.is_empty() {
            match head::response(&conn.buf, is_head, down_head)? {
                Parsed::Complete(resp) => return Ok(resp),
                Parsed::Handoff(_) => {
                    // Informational (100, 103): not forwarded, as the general path.
                    if let Some(n) = head::informational_len(&conn.buf) {
                        conn.buf.advance(n);
                        continue;
                    }
                }
                Parsed::Partial if conn.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ReadHead::TooLong(MAX_RESPONSE_HEAD))
                }
                Parsed::Partial => {}
            }
        }
        conn.buf.reserve(4096);
        match conn.stream.read_buf(&mut conn.buf).await {
            Ok(0) if got_any => return Err(ReadHead::ClosedInHead),
            Ok(0) => return Err(ReadHead::ClosedEarly),
            Err(e)
                if !got_any
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
                    ) =>
            {
                return Err(ReadHead::ClosedEarly)
            }
            Err(e) => return Err(ReadHead::Io(e)),
            Ok(_) => got_any = true,
        }
    }
}

/// Which side failed while a response body was copied.
enum Copy {
    /// The cluster (closed early, reset, malformed chunks): the client's response is cut short.
    Upstream(String),
    /// The client went away.
    Client,
}

/// Writes `down_head` and the response body to the client, reading from `conn` as needed. On
/// success `conn.buf` holds what the cluster sent after the body (nothing, for a reusable
/// connection).
async fn copy_body<S>(
    client: &mut S,
    conn: &mut RawConn,
    framing: Framing,
    down_head: &[u8],
) -> Result<(), Copy>
where
    S: AsyncWrite + Unpin,
{
    let mut head: &[u8] = down_head;
    match framing {
        Framing::Empty => write_all(client, head, &[]).await.map_err(|_| Copy::Client),
        Framing::Length(mut left) => loop {
            let take = (conn.buf.len() as u64).min(left) as usize;
            write_all(client, head, &conn.buf[..take])
                .await
                .map_err(|_| Copy::Client)?;
            head = &[];
            conn.buf.advance(take);
            left -= take as u64;
            if left == 0 {
                return Ok(());
            }
            read_more(conn).await?;
        },
        Framing::Chunked => {
            let mut scanner = chunked::Scanner::default();
            loop {
                let take = scanner
                    .scan(&conn.buf)
                    .map_err(|e| Copy::Upstream(e.to_string()))?;
                write_all(client, head, &conn.buf[..take])
                    .await
                    .map_err(|_| Copy::Client)?;
                head = &[];
                conn.buf.advance(take);
                if scanner.is_done() {
                    return Ok(());
                }
                read_more(conn).await?;
            }
        }
        Framing::Close => loop {
            write_all(client, head, &conn.buf)
                .await
                .map_err(|_| Copy::Client)?;
            head = &[];
            conn.buf.clear();
            conn.buf.reserve(16 * 1024);
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(Copy::Upstream(e.to_string())),
            }
        },
    }
}

/// Reads more of a response body; the cluster closing here cuts the body short.
async fn read_more(conn: &mut RawConn) -> Result<(), Copy> {
    conn.buf.reserve(16 * 1024);
    match conn.stream.read_buf(&mut conn.buf).await {
        Ok(0) => Err(Copy::Upstream(
            "connection closed in the response body".into(),
        )),
        Ok(_) => Ok(()),
        Err(e) => Err(Copy::Upstream(e.to_string())),
    }
}

/// Writes `a` then `b` with as few system calls as the socket allows (one, usually).
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    let mut slices = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        let n = w.write_vectored(bufs).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut bufs, n);
    }
    w.flush().await
}
