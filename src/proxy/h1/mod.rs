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
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::cluster::{Cluster, InFlight};
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

/// A deadline that moves later with every request without touching the runtime's timer wheel:
/// the timer stays armed at an earlier deadline, and when it fires before the current one it is
/// armed again. A busy connection re-arms once per timeout period, not once per request.
struct Deadline {
    timer: Pin<Box<tokio::time::Sleep>>,
    at: tokio::time::Instant,
}

impl Deadline {
    fn new(at: tokio::time::Instant) -> Self {
        Self {
            timer: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    /// Moves the deadline to `at` (re-arming the timer only if `at` is earlier than it).
    fn set(&mut self, at: tokio::time::Instant) {
        self.at = at;
        if self.timer.deadline() > at {
            self.timer.as_mut().reset(at);
        }
    }

    /// Completes when the deadline has passed.
    async fn passed(&mut self) {
        loop {
            (&mut self.timer).await;
            if tokio::time::Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.timer.as_mut().reset(at);
        }
    }
}

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
    let now = tokio::time::Instant::now();
    let mut head_deadline = Deadline::new(now + settings.header_read_timeout);
    let mut scratch = Scratch {
        down_head: Vec::new(),
        early: BytesMut::new(),
        deadline: Deadline::new(now + ctx.response_timeout),
        half_closed: false,
    };
    // When the connection last finished a response. The clock is read when a request's head is
    // in and when its response is out (again after a stream); deadlines and the pool use those
    // readings.
    let mut idle_since = now;
    let start = now;
    // Waits for the gateway's shutdown while the connection is idle between requests: one
    // registration for the connection's life (on its own receiver, so `shutdown` stays free for
    // the handoff), not one per request.
    let mut stop = shutdown.clone();
    let stopped = crate::gateway::stopped(&mut stop);
    tokio::pin!(stopped);
    loop {
        // A whole request head (the client may have sent it already, pipelined).
        let mut deadline_set = false;
        // Bytes of `buf` already parsed as an incomplete head: a head that trickles in is parsed
        // again only when new bytes may end it (not on every read, which would cost the square
        // of its length).
        let mut scanned: usize = 0;
        let req = loop {
            // Empty lines before a request line are ignored (RFC 9112 section 2.2), and dropped
            // here: httparse would skip them on every parse, and a client sending nothing else
            // would make each read parse them all again.
            let empty = empty_lines(&buf);
            if empty > 0 {
                buf.advance(empty);
                scanned = scanned.saturating_sub(empty);
            }
            if !buf.is_empty() && scanned > 0 && !may_end_head(&buf[scanned.saturating_sub(3)..]) {
                if buf.len() >= settings.max_header_bytes {
                    return hand_off(client, buf, shutdown, "head_size").await;
                }
            } else if !buf.is_empty() {
                match head::request(&buf, info, &mut up_head) {
                    Parsed::Complete(req) if req.head_len <= settings.max_header_bytes => {
                        break req
                    }
                    // Over the limit: the general path answers 431.
                    Parsed::Complete(_) => {
                        return hand_off(client, buf, shutdown, "head_size").await
                    }
                    // The HTTP/2 preface starts an h2c connection only as its first bytes
                    // (RFC 9113 section 3.3); after a request served here it is a bad request,
                    // not a switch to HTTP/2 (which the general path would make).
                    Parsed::Handoff(_) if idle_since != start && buf.starts_with(H2_PREFACE) => {
                        let msg = "the HTTP/2 connection preface is only valid at the start of a connection\n";
                        answer_and_close(client, StatusCode::BAD_REQUEST, false, msg).await;
                        return Ended::Closed;
                    }
                    Parsed::Handoff(why) => return hand_off(client, buf, shutdown, why).await,
                    Parsed::Partial if buf.len() >= settings.max_header_bytes => {
                        return hand_off(client, buf, shutdown, "head_size").await;
                    }
                    Parsed::Partial => {}
                }
            }
            scanned = buf.len();
            if !deadline_set {
                head_deadline.set(idle_since + settings.header_read_timeout);
                deadline_set = true;
            }
            let idle = buf.is_empty();
            buf.reserve(READ_BUF.min(settings.max_header_bytes));
            tokio::select! {
                biased;
                read = client.read_buf(&mut buf) => match client_io(read) {
                    Ok(0) | Err(_) => return Ended::Closed,
                    Ok(_) => {}
                },
                () = head_deadline.passed() => {
                    // Counted when a head was started or none ever came; an idle keep-alive
                    // connection closing after a served request is routine.
                    if !idle || idle_since == start {
                        telemetry::connection_closed("header_timeout");
                    }
                    tracing::debug!(%peer, "no whole request head within limits.header_read_timeout: closing the connection");
                    return Ended::Closed;
                }
                () = &mut stopped, if idle => return Ended::Closed,
            }
        };
        // The request's time starts with its head, as in the general path (the upload counts).
        let start = Instant::now();
        if req.content_length > MAX_BODY
            || ctx
                .max_body_bytes
                .is_some_and(|max| req.content_length > max)
        {
            return hand_off(client, buf, shutdown, "body_size").await;
        }
        let Some(route) = route(ctx, &buf, &req) else {
            return hand_off(client, buf, shutdown, "route").await;
        };
        // In flight on its cluster from now, while its body is still coming: a drain of the
        // cluster waits for it (`None`: the cluster is full; answered 503 once the body is in).
        let entered = route.cluster.enter(ctx.max_requests_per_cluster);

        // The body, whole: small bodies arrive with the head or right after it. Each pause is
        // bounded by `limits.body_read_timeout`, the whole upload by `upstream.response_timeout`
        // (in the general path the upload is part of the wait for the response).
        let total = req.head_len + req.content_length as usize;
        let mut ready_at = start;
        let upload_deadline = tokio::time::Instant::from_std(start) + ctx.response_timeout;
        while buf.len() < total {
            buf.reserve(total - buf.len());
            let pause = tokio::time::Instant::now() + ctx.body_read_timeout;
            let read =
                tokio::time::timeout_at(pause.min(upload_deadline), client.read_buf(&mut buf));
            match read.await.map(client_io) {
                Ok(Ok(0)) | Ok(Err(_)) => return Ended::Closed,
                Ok(Ok(_)) => ready_at = Instant::now(),
                Err(_) => {
                    let failure = Failure::BodyTimeout(ctx.body_read_timeout);
                    let (status, mut msg) = forward::count_failure(
                        &route.cluster,
                        &route.app,
                        &failure,
                        start.elapsed(),
                    );
                    if pause > upload_deadline {
                        msg = format!(
                            "request body not received within {} (upstream.response_timeout)\n",
                            humantime::format_duration(ctx.response_timeout)
                        );
                    }
                    let id = &up_head[req.request_id.clone()];
                    let answer = &mut scratch.down_head;
                    head::local_response(answer, status, id, true, req.is_head, &msg);
                    let _ = write_all(&mut client, answer, &[]).await;
                    linger_close(client).await;
                    return Ended::Closed;
                }
            }
        }
        ctx.retry.deposit();
        let mut exchange = Exchange {
            ctx,
            req: &req,
            path: std::str::from_utf8(&buf[req.path.clone()]).unwrap_or("/"),
            body: &buf[req.head_len..total],
            up_head: &up_head,
            start,
            ready_at,
            done_at: start,
            pipelined: buf.len() > total || scratch.half_closed,
        };
        let done = exchange
            .run(&mut client, route, entered, &mut scratch, shutdown)
            .await;
        idle_since = tokio::time::Instant::from_std(exchange.done_at);
        buf.advance(total);
        if !scratch.early.is_empty() {
            buf.extend_from_slice(&scratch.early);
            scratch.early.clear();
        }
        if !done {
            linger_close(client).await;
            return Ended::Closed;
        }
        // A long head or a body grew the buffers: an idle connection keeps only small ones.
        if buf.is_empty() && buf.capacity() > READ_BUF {
            buf = BytesMut::with_capacity(READ_BUF);
        }
        for head in [&mut up_head, &mut scratch.down_head] {
            if head.capacity() > READ_BUF {
                *head = Vec::new();
            }
        }
        if scratch.early.capacity() > READ_BUF {
            scratch.early = BytesMut::new();
        }
    }
}

/// The request line of the HTTP/2 connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// How many bytes at the start of `buf` are whole empty lines (`\r\n` or `\n`).
fn empty_lines(buf: &[u8]) -> usize {
    let mut n = 0;
    loop {
        match &buf[n..] {
            [b'\r', b'\n', ..] => n += 2,
            [b'\n', ..] => n += 1,
            _ => return n,
        }
    }
}

/// Whether `bytes` hold an empty line's end (`\n\n` or `\n\r\n`): where a request head ends.
fn may_end_head(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b'\n')
        .any(|(i, _)| matches!(&bytes[i + 1..], [b'\n', ..] | [b'\r', b'\n', ..]))
}

/// Hands the connection to the general path (counted by `reason` in
/// `rayshift_http1_handoffs_total`), unless the gateway is shutting down: then the request is
/// answered `503` and the connection closed (a connection handed over now would be closed by the
/// drain before its request was read).
async fn hand_off<S>(
    client: S,
    buf: BytesMut,
    shutdown: &watch::Receiver<bool>,
    reason: &'static str,
) -> Ended<S>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !*shutdown.borrow() {
        tracing::trace!(reason, "connection handed to the general path");
        metrics::counter!(telemetry::HTTP1_HANDOFFS_TOTAL, "reason" => reason).increment(1);
        return Ended::Handoff(Rewind::new(buf, client));
    }
    let is_head = buf.starts_with(b"HEAD ");
    answer_and_close(
        client,
        StatusCode::SERVICE_UNAVAILABLE,
        is_head,
        "the gateway is shutting down\n",
    )
    .await;
    Ended::Closed
}

/// Answers the connection's next request with `status` and `msg` (no cluster involved: counted
/// with `none` labels) and closes the connection.
async fn answer_and_close<S>(mut client: S, status: StatusCode, is_head: bool, msg: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    forward::count(forward::NONE, forward::NONE, forward::NONE, status);
    let mut answer = Vec::new();
    head::local_response(&mut answer, status, b"-", true, is_head, msg);
    let _ = write_all(&mut client, &answer, &[]).await;
    linger_close(client).await;
}

/// Closes a client connection after its last answer. Unread request bytes at close would make
/// the kernel reset the connection, which can destroy the answer before the client reads it: the
/// sending side is shut first, and what the client still sends is read and dropped for a moment
/// (until it closes too, at most [`LINGER`]).
async fn linger_close<S>(mut client: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = client.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = client.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
}

/// How long [`linger_close`] waits for a client to close after its last answer.
const LINGER: Duration = Duration::from_millis(500);

/// What a connection's exchanges work in, kept from one request to the next.
struct Scratch {
    /// The head (or whole local answer) for the client.
    down_head: Vec<u8>,
    /// Bytes the client sent while its request was with the cluster: the next request.
    early: BytesMut,
    /// `upstream.response_timeout` of the attempt in progress.
    deadline: Deadline,
    /// The client closed its sending side after pipelining requests; it still reads the answers.
    half_closed: bool,
}

/// Where a request goes (see `forward::Route`).
struct Route {
    cluster: Arc<Cluster>,
    app: Arc<str>,
    x: u64,
    alternatives: bool,
}

/// The app and cluster of a request; `None` when the general path must answer it (no app: 404;
/// no ready cluster: 503) or must forward it (a split with an `https://` cluster: deciding here
/// and again there would skew the split).
fn route(ctx: &ProxyContext, buf: &[u8], req: &head::Request) -> Option<Route> {
    let path = std::str::from_utf8(&buf[req.path.clone()]).ok()?;
    let snap = ctx.table.load();
    let hit = snap.table.lookup(&crate::proxy::route_path(path))?;
    if !hit
        .split
        .entries()
        .all(|(id, _)| is_plain(snap.cluster(id)))
    {
        return None;
    }
    let (picked, x) = crate::proxy::pick(hit.split, req.split);
    let cluster = snap.cluster(picked?);
    Some(Route {
        cluster: Arc::clone(cluster),
        app: Arc::clone(&hit.app.name),
        x,
        alternatives: hit.split.len() > 1,
    })
}

/// The direct path speaks plain HTTP/1.1 to clusters; `https://` ones are the general path's.
fn is_plain(cluster: &Cluster) -> bool {
    cluster.scheme == http::uri::Scheme::HTTP
}

/// One request on its way: what every attempt sends.
struct Exchange<'a> {
    ctx: &'a ProxyContext,
    req: &'a head::Request,
    /// The request's path, for a retry's route check.
    path: &'a str,
    body: &'a [u8],
    /// The head for the cluster.
    up_head: &'a [u8],
    /// When the request's head was in.
    start: Instant,
    /// When its body was in too: the time of the first attempt's checkout from the pool.
    ready_at: Instant,
    /// When its response was out (set by [`Exchange::run`]): the connection is idle from then.
    done_at: Instant,
    /// The client sent more after this request, or closed its sending side after pipelining
    /// requests: it is waiting for answers even though it sends nothing more.
    pipelined: bool,
}

impl Exchange<'_> {
    /// Forwards the request (retrying on another cluster where safe, as the general path does)
    /// and its response. Returns false when the client connection cannot carry another request.
    ///
    /// While the cluster works, the client is watched: if it goes away, the attempt is dropped
    /// (its connection closed, so Serve can cancel the request), as the general path does. Bytes
    /// it sends meanwhile (a pipelined request) are kept in `early`.
    async fn run<S>(
        &mut self,
        client: &mut S,
        route: Route,
        entered: Option<InFlight>,
        scratch: &mut Scratch,
        shutdown: &watch::Receiver<bool>,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let ctx = self.ctx;
        let req = self.req;
        let mut cluster = route.cluster;
        let Some(mut in_flight) = entered else {
            let close = req.close || *shutdown.borrow();
            let msg = forward::overflow(ctx, &cluster, &route.app);
            let request_id = &self.up_head[req.request_id.clone()];
            let down_head = &mut scratch.down_head;
            let status = StatusCode::SERVICE_UNAVAILABLE;
            head::local_response(down_head, status, request_id, close, req.is_head, &msg);
            self.done_at = Instant::now();
            return write_all(client, down_head, &[]).await.is_ok() && !close;
        };
        let since = tokio::time::Instant::from_std(self.start);
        // When the attempt whose outcome is recorded began: a retried request's time on the
        // first cluster is not the second one's (shift analysis judges a target by it).
        let mut attempt_start = self.start;
        let mut outcome = match self.watched(client, &cluster, scratch, since).await {
            Some(outcome) => outcome,
            None => return false,
        };
        if let Err(Failure::Error { connect, .. }) = &outcome {
            // Safe as in the general path: never reached the cluster, or idempotent without a
            // body; and to a cluster the direct path can reach.
            let retry = ctx.retries
                && route.alternatives
                && req.content_length == 0
                && (*connect || req.idempotent);
            let other = retry
                .then(|| forward::retry_target(ctx, &route.app, &cluster, self.path, route.x))
                .flatten()
                .filter(|(other, _)| is_plain(other));
            if let Some((other, entered)) = other {
                if ctx.retry.try_withdraw() {
                    if let Err(failure) = &outcome {
                        forward::record_retry(&cluster, &other, failure, self.start.elapsed());
                    }
                    cluster = other;
                    in_flight = entered;
                    self.ready_at = Instant::now();
                    attempt_start = self.ready_at;
                    let since = tokio::time::Instant::from_std(self.ready_at);
                    outcome = match self.watched(client, &cluster, scratch, since).await {
                        Some(outcome) => outcome,
                        None => return false,
                    };
                } else {
                    metrics::counter!(telemetry::RETRY_BUDGET_EXHAUSTED_TOTAL).increment(1);
                }
            }
        }
        // A small body that came after its head is waited for here, before the response counts:
        // a cluster that closes instead of sending it gets the client a 502, not an empty reply.
        // Likewise a chunked body malformed in the bytes that came with its head: nothing has
        // reached the client yet.
        let short_body = match &mut outcome {
            Ok((conn, resp)) if resp.framing == Framing::Chunked => chunked::Scanner::default()
                .scan(&conn.buf[resp.head_len..])
                .err()
                .map(|e| Failure::Error {
                    connect: false,
                    cause: e.to_string(),
                }),
            Ok((conn, resp)) => {
                match await_small_body(client, conn, resp, scratch, self.pipelined).await {
                    Ok(()) => None,
                    Err(SmallBody::Copy(Copy::Client)) => {
                        tracing::debug!(cluster = %cluster.name, "client went away before the response: request dropped");
                        return false;
                    }
                    Err(SmallBody::Copy(Copy::Upstream(cause))) => Some(Failure::Error {
                        connect: false,
                        cause,
                    }),
                    Err(SmallBody::Timeout) => Some(Failure::Timeout),
                }
            }
            Err(_) => None,
        };
        if let Some(failure) = short_body {
            outcome = Err(failure);
        }
        let end = Instant::now();
        let elapsed = end - attempt_start;
        self.done_at = end;
        let request_id = &self.up_head[req.request_id.clone()];
        // Shutting down: this is the connection's last response, and the client is told so.
        let close = req.close || *shutdown.borrow();
        let Scratch {
            down_head,
            early,
            half_closed,
            ..
        } = scratch;
        let (mut conn, resp) = match outcome {
            Ok(pair) => pair,
            Err(failure) => {
                let (status, msg) = forward::count_failure(&cluster, &route.app, &failure, elapsed);
                head::local_response(down_head, status, request_id, close, req.is_head, &msg);
                return write_all(client, down_head, &[]).await.is_ok() && !close;
            }
        };
        cluster.stats.record_response(resp.status, elapsed);
        cluster.duration.record(elapsed.as_secs_f64());
        let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
        cluster
            .requests
            .increment(&route.app, &cluster.shard, &cluster.name, status);

        if !resp.has_request_id {
            down_head.extend_from_slice(b"x-request-id: ");
            down_head.extend_from_slice(request_id);
            down_head.extend_from_slice(b"\r\n");
        }
        if resp.framing == Framing::Close {
            // Re-framed as chunks: the client keeps its connection and can tell a complete body
            // from one the cluster cut short.
            down_head.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        if close {
            down_head.extend_from_slice(b"connection: close\r\n");
        }
        down_head.extend_from_slice(b"\r\n");
        conn.buf.advance(resp.head_len);
        let mut watch = ClientWatch {
            early,
            half_closed,
            pipelined: self.pipelined,
        };
        let copied = copy_body(client, &mut conn, resp.framing, down_head, &mut watch).await;
        if copied.as_ref().is_ok_and(|waited| *waited) {
            // A body that needed more reads or writes (a stream, a large or slow download) may
            // have lasted long: both connections are idle from now, not from the head.
            self.done_at = Instant::now();
        }
        match copied {
            Ok(_) => {
                if resp.keep_alive {
                    cluster.pool.put_raw(conn, self.done_at);
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

    /// An attempt, bounded by `upstream.response_timeout` (connecting included), dropped if the
    /// client goes away first (`None`).
    async fn watched<S>(
        &self,
        client: &mut S,
        cluster: &Cluster,
        scratch: &mut Scratch,
        since: tokio::time::Instant,
    ) -> Option<Result<(RawConn, head::Response), Failure>>
    where
        S: AsyncRead + Unpin,
    {
        let Scratch {
            down_head,
            early,
            deadline,
            half_closed,
        } = scratch;
        deadline.set(since + self.ctx.response_timeout);
        let attempt = self.attempt(cluster, down_head);
        tokio::pin!(attempt);
        // A client that sent more requests and then closed its sending side (half-close) still
        // waits for the answers: it is watched no further.
        let mut watching = !*half_closed;
        loop {
            tokio::select! {
                biased;
                outcome = &mut attempt => return Some(outcome),
                () = deadline.passed() => return Some(Err(Failure::Timeout)),
                read = client.read_buf(early), if watching && early.len() < READ_BUF => match client_io(read) {
                    Ok(0) | Err(_) if early.is_empty() && !self.pipelined => {
                        tracing::debug!(cluster = %cluster.name, "client went away before the response: request dropped");
                        return None;
                    }
                    Ok(0) | Err(_) => {
                        *half_closed = true;
                        watching = false;
                    }
                    Ok(_) => {}
                },
            }
        }
    }

    /// One attempt on `cluster`: send the request on an idle connection or a new one and read
    /// the response head. On success the response head for the client is in `down_head` and the connection's buffer
    /// starts with the cluster's head.
    async fn attempt(
        &self,
        cluster: &Cluster,
        down_head: &mut Vec<u8>,
    ) -> Result<(RawConn, head::Response), Failure> {
        let req = self.req;
        let mut now = self.ready_at;
        // A request that may have reached the cluster on a pooled connection that then failed is
        // sent again once, on a new connection: a cluster that takes requests and closes without
        // answering gets one twice at most, not once per idle connection in the pool.
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only {
                None
            } else {
                cluster.pool.checkout_raw(now)
            };
            // `Some(since)`: a pooled connection, idle since then.
            let (mut conn, pooled_since) = match pooled {
                Some((conn, since)) => (conn, Some(since)),
                None => match pool::connect_raw(cluster, self.ctx.connect_timeout).await {
                    Ok(conn) => (conn, None),
                    Err(cause) => {
                        // After a pooled attempt the request may have reached the cluster.
                        return Err(Failure::Error {
                            connect: !fresh_only,
                            cause,
                        });
                    }
                },
            };
            if let Err((written, e)) =
                write_counted(&mut conn.stream, self.up_head, self.body).await
            {
                if let Some(since) = pooled_since {
                    // The cluster closed the idle connection. It cannot have acted on a request
                    // whose head did not all arrive: the next pooled connection (after a
                    // cluster's restart, each dead one fails this way at once).
                    if written < self.up_head.len() {
                        continue;
                    }
                    // The head went out: an idempotent request may be sent again, once.
                    cluster.pool.close_idle_since(since);
                    if req.idempotent {
                        fresh_only = true;
                        continue;
                    }
                }
                return Err(Failure::Error {
                    connect: false,
                    cause: format!("writing the request: {e}"),
                });
            }
            match (
                read_head(&mut conn, req.is_head, down_head).await,
                pooled_since,
            ) {
                (Ok(resp), _) => return Ok((conn, resp)),
                // Closed with no answer on a connection that had been idle: the keep-alive race,
                // or a cluster that restarted (its connections idle as long are as dead, and are
                // closed). An idempotent request is sent again on a new connection.
                (Err(ReadHead::ClosedEarly), Some(since)) => {
                    cluster.pool.close_idle_since(since);
                    if req.idempotent {
                        now = Instant::now();
                        fresh_only = true;
                        continue;
                    }
                    tracing::debug!(cluster = %cluster.name, "pooled connection closed under a request that is not idempotent");
                    return Err(Failure::Error {
                        connect: false,
                        cause: ReadHead::ClosedEarly.to_string(),
                    });
                }
                (Err(e), _) => {
                    tracing::debug!(cluster = %cluster.name, error = %e, "upstream request failed");
                    return Err(Failure::Error {
                        connect: false,
                        cause: e.to_string(),
                    });
                }
            }
        }
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

/// Writes `down_head` and the response body to the client, reading from `conn` as needed, and
/// watching the client meanwhile ([`read_upstream`]). On success `conn.buf` holds what the cluster
/// sent after the body (nothing, for a reusable connection), and the result tells whether the copy
/// took more than one write that did not wait (so its end needs the clock).
async fn copy_body<S>(
    client: &mut S,
    conn: &mut RawConn,
    framing: Framing,
    down_head: &mut Vec<u8>,
    watch: &mut ClientWatch<'_>,
) -> Result<bool, Copy>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if let Framing::Length(n) = framing {
        // A body of modest size that is all in (see `await_small_body`) goes out with its head:
        // one round of the kernel's per-packet work, not two.
        if n <= COALESCE as u64 && conn.buf.len() as u64 >= n {
            let n = n as usize;
            let (written, blocked) = if n <= COPY_INTO_HEAD {
                // Small: behind the head in one buffer, one `send`.
                down_head.extend_from_slice(&conn.buf[..n]);
                waiting(write_all(client, down_head, &[])).await
            } else {
                waiting(write_all(client, down_head, &conn.buf[..n])).await
            };
            conn.buf.advance(n);
            return written
                .map(|()| n > COPY_INTO_HEAD || blocked)
                .map_err(|_| Copy::Client);
        }
    }
    let mut head: &[u8] = down_head;
    match framing {
        Framing::Empty => {
            let (written, blocked) = waiting(write_all(client, head, &[])).await;
            written.map(|()| blocked).map_err(|_| Copy::Client)
        }
        Framing::Length(mut left) => loop {
            let take = (conn.buf.len() as u64).min(left) as usize;
            write_all(client, head, &conn.buf[..take])
                .await
                .map_err(|_| Copy::Client)?;
            head = &[];
            conn.buf.advance(take);
            left -= take as u64;
            if left == 0 {
                return Ok(true);
            }
            read_more(conn, client, watch).await?;
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
                    return Ok(true);
                }
                read_more(conn, client, watch).await?;
            }
        }
        Framing::Close => {
            // Each read becomes one chunk; the cluster's close, the last chunk.
            let mut frame = Vec::with_capacity(head.len() + 20);
            loop {
                frame.clear();
                frame.extend_from_slice(head);
                head = &[];
                if !conn.buf.is_empty() {
                    frame.extend_from_slice(format!("{:x}\r\n", conn.buf.len()).as_bytes());
                }
                let data = if conn.buf.is_empty() {
                    &[][..]
                } else {
                    &conn.buf[..]
                };
                write_all(client, &frame, data)
                    .await
                    .map_err(|_| Copy::Client)?;
                if !conn.buf.is_empty() {
                    write_all(client, b"\r\n", &[])
                        .await
                        .map_err(|_| Copy::Client)?;
                }
                conn.buf.clear();
                if read_upstream(conn, client, watch).await? == 0 {
                    return write_all(client, b"0\r\n\r\n", &[])
                        .await
                        .map(|()| true)
                        .map_err(|_| Copy::Client);
                }
            }
        }
    }
}

/// The client side of an exchange while the cluster's response is read: a client that goes away
/// ends the exchange (the cluster's connection is dropped, so Serve can cancel the request), as
/// while waiting for the head ([`Exchange::watched`]).
struct ClientWatch<'a> {
    /// Bytes the client sent meanwhile: its next request.
    early: &'a mut BytesMut,
    /// The client closed its sending side after pipelining requests; it still reads the answers.
    half_closed: &'a mut bool,
    /// The client sent more after this request (see [`Exchange::pipelined`]).
    pipelined: bool,
}

/// Why the wait for a small body ([`await_small_body`]) ended without it.
enum SmallBody {
    /// The cluster closed or failed, or the client went away.
    Copy(Copy),
    /// `upstream.response_timeout` passed: the cluster sent a head and stalled.
    Timeout,
}

/// Waits once for the rest of a `content-length` body of up to [`COALESCE`] bytes that did not
/// come with its head, so head and body can go out in one write ([`copy_body`]); a body still
/// incomplete after that read is forwarded as it comes. `conn.buf` still starts with the head.
///
/// The wait is bounded by the attempt's `upstream.response_timeout`: nothing has reached the
/// client yet, so a cluster that sends a head and then nothing must not hold the client without
/// an answer; it gets the 504 a cluster that sends no head gets.
async fn await_small_body<S>(
    client: &mut S,
    conn: &mut RawConn,
    resp: &head::Response,
    scratch: &mut Scratch,
    pipelined: bool,
) -> Result<(), SmallBody>
where
    S: AsyncRead + Unpin,
{
    let Framing::Length(n) = resp.framing else {
        return Ok(());
    };
    if n > COALESCE as u64 || (conn.buf.len() - resp.head_len) as u64 >= n {
        return Ok(());
    }
    let Scratch {
        early,
        deadline,
        half_closed,
        ..
    } = scratch;
    let mut watch = ClientWatch {
        early,
        half_closed,
        pipelined,
    };
    tokio::select! {
        biased;
        read = read_more(conn, client, &mut watch) => read.map_err(SmallBody::Copy),
        () = deadline.passed() => Err(SmallBody::Timeout),
    }
}

/// Bodies up to this size are copied behind their head and sent with it as one buffer.
const COPY_INTO_HEAD: usize = 2048;

/// `content-length` bodies up to this size that arrive just after their head are written with it
/// (see [`copy_body`]). Larger ones (and chunked ones, which may be streams) are forwarded as they
/// arrive.
const COALESCE: usize = 64 * 1024;

/// Reads more of a response body; the cluster closing here cuts the body short.
async fn read_more<S: AsyncRead + Unpin>(
    conn: &mut RawConn,
    client: &mut S,
    watch: &mut ClientWatch<'_>,
) -> Result<(), Copy> {
    match read_upstream(conn, client, watch).await? {
        0 => Err(Copy::Upstream(
            "connection closed in the response body".into(),
        )),
        _ => Ok(()),
    }
}

/// Reads from the cluster into `conn.buf` (0: it closed) while watching the client: one that
/// closes or resets with nothing pipelined has gone away ([`Copy::Client`]); bytes it sends are
/// kept in `watch.early` (up to [`READ_BUF`], then it is no longer read until the response is out).
async fn read_upstream<S: AsyncRead + Unpin>(
    conn: &mut RawConn,
    client: &mut S,
    watch: &mut ClientWatch<'_>,
) -> Result<usize, Copy> {
    conn.buf.reserve(16 * 1024);
    loop {
        let watching = !*watch.half_closed && watch.early.len() < READ_BUF;
        tokio::select! {
            biased;
            read = conn.stream.read_buf(&mut conn.buf) => {
                return read.map_err(|e| Copy::Upstream(e.to_string()));
            }
            read = client.read_buf(watch.early), if watching => match client_io(read) {
                Ok(0) | Err(_) if watch.early.is_empty() && !watch.pipelined => {
                    tracing::debug!("client went away during the response: request dropped");
                    return Err(Copy::Client);
                }
                Ok(0) | Err(_) => *watch.half_closed = true,
                Ok(_) => {}
            },
        }
    }
}

/// Writes `a` then `b` to the client with as few system calls as the socket allows (one,
/// usually); a kernel abort is counted ([`client_io`]).
async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, a: &[u8], b: &[u8]) -> io::Result<()> {
    client_io(write_counted(w, a, b).await.map_err(|(_, e)| e))
}

/// A read from (or write to) the client. A client whose sent data stayed unacknowledged for
/// `limits.send_timeout` is disconnected by the kernel (`TCP_USER_TIMEOUT`): the next read or
/// write of the socket, and only that one, fails with `ETIMEDOUT`, which is counted as a
/// connection closed for `send_timeout`.
fn client_io<T>(done: io::Result<T>) -> io::Result<T> {
    if let Err(e) = &done {
        if e.kind() == io::ErrorKind::TimedOut {
            telemetry::connection_closed("send_timeout");
        }
    }
    done
}

/// Awaits `fut`, telling also whether it had to wait (a write to a client that does not read:
/// the clock must be read again after it).
async fn waiting<F: std::future::Future>(fut: F) -> (F::Output, bool) {
    let mut fut = std::pin::pin!(fut);
    let mut waited = false;
    let out = std::future::poll_fn(|cx| {
        let poll = fut.as_mut().poll(cx);
        waited |= poll.is_pending();
        poll
    })
    .await;
    (out, waited)
}

/// [`write_all`], telling on failure how many bytes were written.
async fn write_counted<W: AsyncWrite + Unpin>(
    w: &mut W,
    a: &[u8],
    b: &[u8],
) -> Result<(), (usize, io::Error)> {
    if b.is_empty() {
        // One buffer: `send`, not `writev` (less work in the kernel per call).
        let mut written = 0;
        while written < a.len() {
            match w.write(&a[written..]).await {
                Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
                Ok(n) => written += n,
                Err(e) => return Err((written, e)),
            }
        }
        return w.flush().await.map_err(|e| (written, e));
    }
    let mut slices = [IoSlice::new(a), IoSlice::new(b)];
    let mut bufs = &mut slices[..];
    IoSlice::advance_slices(&mut bufs, 0);
    let mut written = 0;
    while !bufs.is_empty() {
        match w.write_vectored(bufs).await {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => {
                written += n;
                IoSlice::advance_slices(&mut bufs, n);
            }
            Err(e) => return Err((written, e)),
        }
    }
    w.flush().await.map_err(|e| (written, e))
}

#[cfg(test)]
mod tests {
    use super::{empty_lines, may_end_head};

    #[test]
    fn empty_lines_are_whole_crlf_or_lf_lines() {
        assert_eq!(empty_lines(b"\r\n\n\r\nGET"), 5);
        assert_eq!(empty_lines(b"\r\n\r"), 2);
        assert_eq!(empty_lines(b"\rGET"), 0);
        assert_eq!(empty_lines(b"GET"), 0);
        assert_eq!(empty_lines(b""), 0);
    }

    #[test]
    fn a_head_may_end_only_where_an_empty_line_ends() {
        assert!(may_end_head(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"));
        assert!(may_end_head(b"GET / HTTP/1.1\nhost: a\n\n"));
        // The end split across reads: the three bytes before the new ones are looked at again.
        assert!(may_end_head(b"\n\r\n"));
        assert!(!may_end_head(b"GET / HTTP/1.1\r\nhost: a\r\n"));
        assert!(!may_end_head(b"x-long: aaaa"));
        assert!(!may_end_head(b"\r\n\r"));
        assert!(!may_end_head(b""));
    }
}
