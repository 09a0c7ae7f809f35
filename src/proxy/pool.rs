//! Keep-alive HTTP/1.1 connections to one cluster.
//!
//! Each [`Cluster`] owns one [`ClusterPool`]. A request checks out the most recently used idle
//! connection (or opens one), sends on it, and the connection goes back to the pool when the
//! response body has been read to its end (see [`crate::proxy::body::ProxyBody`]). A connection
//! whose response was not read to the end (client gone, error, upgrade) is never reused: HTTP/1.1
//! cannot tell where the unread rest would end.
//!
//! This replaces hyper-util's general-purpose client on the request path: no pool key to hash, no
//! global map behind a lock shared by all clusters, no task spawned per request to wait for the
//! connection to become idle, no absolute-form URI to build and strip again. The pool's lock is
//! per cluster and held for a push or a pop.
//!
//! The direct HTTP/1.1 path keeps plain TCP connections in the same pool ([`RawConn`]). The
//! general path takes one of those over (starting hyper on it) before it opens a connection;
//! hyper's connections do not go the other way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service;

use crate::cluster::Cluster;
use crate::proxy::request_body::RequestBody;

/// Opens connections to clusters: plain TCP for `http://`, TLS for `https://` (see
/// [`crate::proxy::cluster_connector`]).
pub type Connector = HttpsConnector<HttpConnector>;

/// The sending half of one upstream connection; its connection task runs on its own.
pub type Sender = http1::SendRequest<RequestBody>;

/// How sending a request to a cluster failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened, or a new connection closed before taking the request: the
    /// request never reached the cluster.
    #[error("{0}")]
    Connect(String),
    /// The request failed on an open connection (reset, closed mid-response, body error).
    #[error(transparent)]
    Request(hyper::Error),
}

impl SendError {
    /// True when the request certainly did not reach the cluster.
    pub fn is_connect(&self) -> bool {
        matches!(self, SendError::Connect(_))
    }
}

/// Idle keep-alive connections to one cluster, newest last: hyper's (general path) and plain
/// TCP ones (the direct HTTP/1.1 path, [`crate::proxy::h1`]; their read buffers stay with the
/// thread while they are idle, see [`RawConn`]).
///
/// With per-core proxy workers ([`crate::proxy::workers`]) each kind is split into one part per
/// worker (and one for any other thread): a connection is registered with the poller of the
/// worker that opened it and is only used by that worker. The budget (`max_idle`) is the
/// cluster's, shared by the parts (see [`ClusterPool::push`]).
#[derive(Debug)]
pub struct ClusterPool {
    idle: Kind<Sender>,
    raw: Kind<RawConn>,
    /// Most idle connections of each kind kept (`upstream.max_idle_per_cluster`).
    max_idle: usize,
    /// What one worker's part keeps without looking at the others' (`max_idle` over the
    /// workers, rounded up).
    share: usize,
    /// Idle connections older than this are closed (`upstream.idle_timeout`).
    idle_timeout: Duration,
}

/// The idle connections of one kind, in one part per worker.
#[derive(Debug)]
struct Kind<T> {
    slots: Box<[Slot<T>]>,
}

/// The idle connections of one worker (or of the threads that are none), and how many there are
/// (written under the lock, read by the other workers when their own part is over its share).
/// Each on its own cache lines: a worker writes only lines no other worker writes.
#[derive(Debug)]
#[repr(align(128))]
struct Slot<T> {
    idle: Mutex<VecDeque<Idle<T>>>,
    len: AtomicUsize,
}

/// A locked part; its length is published when it is released.
struct Part<'a, T> {
    idle: std::sync::MutexGuard<'a, VecDeque<Idle<T>>>,
    published: &'a AtomicUsize,
}

impl<T> std::ops::Deref for Part<'_, T> {
    type Target = VecDeque<Idle<T>>;
    fn deref(&self) -> &Self::Target {
        &self.idle
    }
}

impl<T> std::ops::DerefMut for Part<'_, T> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.idle
    }
}

impl<T> Drop for Part<'_, T> {
    fn drop(&mut self) {
        self.published.store(self.idle.len(), Ordering::Relaxed);
    }
}

impl<T> Kind<T> {
    fn new(slots: usize) -> Self {
        Self {
            slots: (0..slots)
                .map(|_| Slot {
                    idle: Mutex::default(),
                    len: AtomicUsize::new(0),
                })
                .collect(),
        }
    }

    /// The calling thread's part.
    fn local(&self) -> Part<'_, T> {
        let slots = &self.slots;
        lock(
            slots
                .get(crate::proxy::workers::slot())
                .unwrap_or(&slots[0]),
        )
    }

    /// Every part, one after the other.
    fn each(&self) -> impl Iterator<Item = Part<'_, T>> {
        self.slots.iter().map(lock)
    }

    /// Idle connections in all parts (as last published by each).
    fn total(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Keeps the connections of every part for which `keep` holds; the others are closed.
    fn retain(&self, mut keep: impl FnMut(&Idle<T>) -> bool) {
        for mut part in self.each() {
            part.retain(&mut keep);
        }
    }
}

fn lock<T>(slot: &Slot<T>) -> Part<'_, T> {
    Part {
        // A panic while holding the lock leaves a valid deque: recover it.
        idle: slot.idle.lock().unwrap_or_else(|e| e.into_inner()),
        published: &slot.len,
    }
}

/// An idle connection and when it became idle.
#[derive(Debug)]
struct Idle<T> {
    conn: T,
    since: Instant,
}

/// A plain TCP connection to a cluster with its read buffer while it carries an exchange (idle in
/// the pool it holds none).
#[derive(Debug)]
pub struct RawConn {
    /// The connection.
    pub stream: TcpStream,
    /// Bytes read from it and not yet forwarded.
    pub buf: BytesMut,
}

/// Initial read buffer of a direct-path upstream connection: a head and a 16 KiB body in one read.
const RAW_READ_BUF: usize = 32 * 1024;

/// Read buffers kept per thread for the next exchange (see [`read_buffer`]).
const SPARE_BUFFERS: usize = 64;

/// Buffers whose memory grew past this are freed, not kept for another exchange.
const SPARE_BUFFER_MAX: usize = 4 * RAW_READ_BUF;

std::thread_local! {
    /// Read buffers of plain connections that went idle, most recently used last.
    static SPARE: std::cell::RefCell<Vec<BytesMut>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A read buffer for an exchange: the one this thread freed last (its memory likely still in
/// the core's caches), or a new one.
///
/// Buffers follow exchanges, not connections: an idle connection holds none. Traffic that moves
/// between clusters (a weight change sends every request to another cluster's idle connections)
/// then reuses the same few warm buffers instead of touching a second set, and idle connections
/// cost no buffer memory.
fn read_buffer() -> BytesMut {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| BytesMut::with_capacity(RAW_READ_BUF))
}

/// Keeps the empty read buffer of a connection that goes idle for the next exchange, its start
/// moved back to the start of its memory (the bytes read advanced it), so that a head and a
/// 16 KiB body fit in one read again. Moving the start copies nothing: the buffer is empty.
fn spare_buffer(mut buf: BytesMut) {
    debug_assert!(buf.is_empty());
    // `capacity` is the room after the read position, not the buffer's memory: one that can make
    // room for more than the limit has grown past it. One that cannot make room for a read
    // buffer's worth holds no memory to speak of (an idle connection's).
    if buf.try_reclaim(SPARE_BUFFER_MAX + 1) || !buf.try_reclaim(RAW_READ_BUF) {
        return;
    }
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    });
}

impl ClusterPool {
    /// An empty pool keeping at most `max_idle` connections of each kind, each for at most
    /// `idle_timeout`, for a gateway with `workers` per-core proxy workers (0: none, connections
    /// served on the main runtime).
    pub fn new(max_idle: usize, idle_timeout: Duration, workers: usize) -> Self {
        Self {
            idle: Kind::new(workers + 1),
            raw: Kind::new(workers + 1),
            max_idle,
            share: max_idle.div_ceil(workers.max(1)),
            idle_timeout,
        }
    }

    /// Idle connections now (including ones the cluster may have closed since).
    pub fn idle_count(&self) -> usize {
        self.idle.total() + self.raw.total()
    }

    /// The most recently used idle plain connection still open and young enough at `now` (see
    /// [`ClusterPool::checkout`]), and since when it was idle.
    pub fn checkout_raw(&self, now: Instant) -> Option<(RawConn, Instant)> {
        self.pop_raw(now).map(|mut c| {
            c.conn.buf = read_buffer();
            (c.conn, c.since)
        })
    }

    /// The most recently used idle plain connection still open and young enough at `now`,
    /// without a read buffer.
    fn pop_raw(&self, now: Instant) -> Option<Idle<RawConn>> {
        self.pop_idle(&self.raw, now, |c| is_open(&c.stream))
    }

    /// Closes the idle plain connections that have been idle since `since` or longer. Called when
    /// the cluster closed a pooled connection, idle since `since`, under a request: whatever
    /// ended it (the cluster's keep-alive timer, a restart) has likely ended those too, every
    /// worker's. Younger ones, put back since, stay.
    pub fn close_idle_since(&self, since: Instant) {
        for mut part in self.raw.each() {
            let all = std::mem::take(&mut *part);
            let (stale, young): (VecDeque<_>, _) = all.into_iter().partition(|c| c.since <= since);
            *part = young;
            drop(part);
            // Closed outside the lock.
            drop(stale);
        }
    }

    /// Takes a plain connection back after its response ended on a message boundary, its buffer
    /// empty, at `now`. As [`ClusterPool::put`].
    pub fn put_raw(&self, mut conn: RawConn, now: Instant) {
        if self.max_idle == 0 || !conn.buf.is_empty() {
            return;
        }
        spare_buffer(std::mem::take(&mut conn.buf));
        self.push(&self.raw, conn, now);
    }

    /// The most recently used idle connection still open and young enough (the closed and expired
    /// ones in front of it are closed).
    fn checkout(&self) -> Option<Sender> {
        self.pop_idle(&self.idle, Instant::now(), |s| !s.is_closed())
            .map(|c| c.conn)
    }

    /// Takes a connection back after its response ended. Expired connections and those over
    /// `max_idle` (oldest first) are closed.
    pub fn put(&self, sender: Sender) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        self.push(&self.idle, sender, Instant::now());
    }

    /// Adds `conn` to the calling thread's part of `kind` as the newest, after closing that part's
    /// expired connections. A part keeps up to its share of the budget (`max_idle` over the
    /// workers, rounded up; all of it without workers) on its own, and more only while all parts
    /// together hold fewer than `max_idle`: over that, its oldest makes room, and a part with none
    /// closes `conn` (other workers hold the budget). All parts together so hold at most
    /// `max_idle` plus each other worker's share, and a worker under its share touches no other
    /// worker's cache lines.
    fn push<T>(&self, kind: &Kind<T>, conn: T, now: Instant) {
        let mut idle = kind.local();
        while idle
            .front()
            .is_some_and(|c| now.saturating_duration_since(c.since) >= self.idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() >= self.share {
            // This part's published length is unchanged while it is locked.
            let others = kind.total() - idle.published.load(Ordering::Relaxed);
            if idle.len() + others >= self.max_idle && idle.pop_front().is_none() {
                return;
            }
        }
        idle.push_back(Idle { conn, since: now });
    }

    /// The newest connection of the calling thread's part of `kind` that is `usable` and young
    /// enough at `now`, with the time it became idle; the unusable and expired ones before it are
    /// closed. (The others stay: a connection is stamped with the end of its response, which a
    /// slow client can make older than that of one put back before it, so the order is only
    /// nearly by age.)
    fn pop_idle<T>(
        &self,
        kind: &Kind<T>,
        now: Instant,
        usable: impl Fn(&T) -> bool,
    ) -> Option<Idle<T>> {
        let mut idle = kind.local();
        while let Some(c) = idle.pop_back() {
            if now.saturating_duration_since(c.since) < self.idle_timeout && usable(&c.conn) {
                return Some(c);
            }
        }
        None
    }

    /// Closes idle connections that expired or that the cluster closed.
    pub fn prune(&self) {
        let now = Instant::now();
        let young = |since: Instant| now.duration_since(since) < self.idle_timeout;
        self.idle.retain(|c| !c.conn.is_closed() && young(c.since));
        self.raw
            .retain(|c| is_open(&c.conn.stream) && young(c.since));
    }

    /// Sends `req` (origin-form URI, `Host` set) on an idle connection or a new one. Returns the
    /// response head and the connection, which goes back to [`ClusterPool::put`] once the response
    /// body has been read to its end.
    ///
    /// An idle connection the cluster closed just before the request could be written (the
    /// keep-alive race) is skipped and the request sent on the next one: hyper hands a request
    /// back when none of it was written.
    ///
    /// Opening a connection (name resolution, TCP, and the TLS handshake for `https://`) is bounded by
    /// `connect_timeout`: a cluster that accepts but never finishes its handshake fails as a
    /// connect failure (retried elsewhere), not as a response timeout.
    pub async fn send(
        &self,
        connector: &Connector,
        connect_timeout: Duration,
        cluster: &Cluster,
        mut req: Request<RequestBody>,
    ) -> Result<(Response<Incoming>, Sender), SendError> {
        loop {
            let mut idle = self.checkout();
            if idle.is_none() && cluster.scheme == http::uri::Scheme::HTTP {
                // An idle connection of the direct HTTP/1.1 path, taken over: no new connection
                // while one is open and unused.
                if let Some(raw) = self.pop_raw(Instant::now()) {
                    // hyper reads with its own buffers: no read buffer taken for it.
                    let io = MaybeHttpsStream::Http(TokioIo::new(raw.conn.stream));
                    // Boxed like connecting below: the handshake's state is large and rarely
                    // needed, and would otherwise be part of every request's future.
                    idle = Box::pin(start(io, cluster)).await.ok();
                }
            }
            let (mut sender, reused) = match idle {
                Some(sender) => (sender, true),
                None => {
                    // Boxed, timer included: connecting is rare, and its large state would
                    // otherwise be part of (and moved with) every request's future.
                    let connecting = Box::pin(tokio::time::timeout(
                        connect_timeout,
                        connect(connector, cluster),
                    ));
                    match connecting.await {
                        Ok(connected) => (connected?, false),
                        Err(_) => {
                            return Err(SendError::Connect(format!(
                                "no connection within {} (upstream.connect_timeout)",
                                humantime::format_duration(connect_timeout)
                            )))
                        }
                    }
                }
            };
            // A returned connection may still be finishing its previous response.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(SendError::Connect(describe(&e)));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, sender)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => req = unsent,
                    Some(_) => return Err(SendError::Connect(describe(e.error()))),
                    None => return Err(SendError::Request(e.into_error())),
                },
            }
        }
    }
}

/// Whether an idle connection is still usable: no event since its last response was read (the
/// runtime's poller reports the cluster's close, or stray bytes, as readable; no system call
/// unless it did). A readable one is checked: closed or sent something, it is not reused.
fn is_open(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => matches!(
            stream.try_read(&mut [0u8; 1]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
        ),
    }
}

/// Opens a plain TCP connection to an `http://` cluster (name resolution included), bounded by
/// `connect_timeout`, with TCP_NODELAY and keep-alive probes like the general path's.
pub async fn connect_raw(cluster: &Cluster, connect_timeout: Duration) -> Result<RawConn, String> {
    let host = cluster
        .authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = cluster.authority.port_u16().unwrap_or(80);
    let connecting = Box::pin(tokio::time::timeout(
        connect_timeout,
        TcpStream::connect((host, port)),
    ));
    let stream = match connecting.await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return Err(format!("tcp connect error: {e}")),
        Err(_) => {
            return Err(format!(
                "no connection within {} (upstream.connect_timeout)",
                humantime::format_duration(connect_timeout)
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60));
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    cluster.connections_opened.increment(1);
    Ok(RawConn {
        stream,
        buf: read_buffer(),
    })
}

/// Opens a connection to `cluster` and starts hyper on it.
async fn connect(connector: &Connector, cluster: &Cluster) -> Result<Sender, SendError> {
    let uri = Uri::builder()
        .scheme(cluster.scheme.clone())
        .authority(cluster.authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|e| SendError::Connect(e.to_string()))?;
    let mut connector = connector.clone();
    std::future::poll_fn(|cx| connector.poll_ready(cx))
        .await
        .map_err(|e| SendError::Connect(describe(&*e)))?;
    let io = connector
        .call(uri)
        .await
        .map_err(|e| SendError::Connect(describe(&*e)))?;
    let sender = start(io, cluster).await?;
    cluster.connections_opened.increment(1);
    Ok(sender)
}

/// Starts hyper's HTTP/1.1 client on an open connection to `cluster` (a new one, or an idle one
/// of the direct path), its connection task spawned (with upgrade support, for WebSockets).
async fn start(
    io: MaybeHttpsStream<TokioIo<TcpStream>>,
    cluster: &Cluster,
) -> Result<Sender, SendError> {
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|e| SendError::Connect(describe(&e)))?;
    let name = std::sync::Arc::clone(&cluster.name);
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(cluster = %name, error = %e, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// An error with its chain of causes, on one line.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection put back with an old stamp (its response ended long ago, a slow client
    /// held it) after fresher ones: taking the newest finds it expired, closes it, and takes the
    /// next one, instead of closing every idle connection as if all behind it were older.
    #[test]
    fn an_expired_connection_put_back_last_leaves_the_fresh_ones() {
        let pool = ClusterPool::new(8, Duration::from_secs(4), 0);
        let idle = Kind::new(1);
        let now = Instant::now();
        let pop = || pool.pop_idle(&idle, now, |_| true).map(|c| c.conn);
        pool.push(&idle, "fresh-1", now - Duration::from_secs(1));
        pool.push(&idle, "fresh-2", now);
        pool.push(&idle, "stale", now - Duration::from_secs(5));
        assert_eq!(pop(), Some("fresh-2"));
        assert_eq!(idle.local().len(), 1, "the stale one closed, fresh-1 kept");
        assert_eq!(pop(), Some("fresh-1"));
        // All expired: none taken, all closed.
        pool.push(&idle, "old", now - Duration::from_secs(9));
        pool.push(&idle, "older", now - Duration::from_secs(10));
        assert_eq!(pop(), None);
        assert!(idle.local().is_empty());
        assert_eq!(idle.total(), 0);
    }

    /// With per-core workers, each worker takes only the connections it put back. A worker keeps
    /// its share of the budget on its own, and more only while the cluster's total is under the
    /// budget; past that its oldest makes room.
    #[test]
    fn workers_keep_their_own_connections_within_the_budget() {
        use crate::proxy::workers::with_slot;
        let pool = ClusterPool::new(4, Duration::from_secs(4), 2);
        let idle = Kind::new(3);
        let now = Instant::now();
        let push = |slot, conn| with_slot(slot, || pool.push(&idle, conn, now));
        let pop = |slot| with_slot(slot, || pool.pop_idle(&idle, now, |_| true).map(|c| c.conn));
        for conn in ["a", "b", "c", "d"] {
            push(1, conn);
        }
        assert_eq!(
            idle.total(),
            4,
            "past its share of 2 while the total was under 4"
        );
        push(1, "e");
        assert_eq!(idle.total(), 4, "at the budget: a made room for e");
        push(2, "f");
        push(2, "g");
        assert_eq!(idle.total(), 6, "worker 2 keeps its share of 2 on its own");
        push(2, "h");
        assert_eq!(
            idle.total(),
            6,
            "past its share at the budget: f made room for h"
        );
        assert_eq!(pop(0), None, "no worker: a part of its own");
        assert_eq!(pop(2), Some("h"));
        assert_eq!(pop(2), Some("g"));
        assert_eq!(pop(2), None);
        for conn in ["e", "d", "c", "b"] {
            assert_eq!(pop(1), Some(conn));
        }
        assert_eq!(pop(1), None);
        assert_eq!(idle.total(), 0);
    }

    /// An idle plain connection holds no read buffer: the buffer goes back to the thread and the
    /// next checkout, of this cluster's connection or another's, takes it again, reset to its
    /// whole capacity after reads that advanced it. One that grew past the limit is freed.
    #[tokio::test(flavor = "current_thread")]
    async fn read_buffers_follow_exchanges_not_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            let mut held = Vec::new();
            for _ in 0..2 {
                held.push(listener.accept().await.unwrap().0);
            }
            held
        });
        let a = TcpStream::connect(addr).await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let _held = accept.await.unwrap();
        SPARE.with(|spare| spare.borrow_mut().clear());
        let (pool_a, pool_b) = (
            ClusterPool::new(8, Duration::from_secs(60), 0),
            ClusterPool::new(8, Duration::from_secs(60), 0),
        );
        let now = Instant::now();

        let mut buf = read_buffer();
        let memory = buf.as_ptr();
        buf.extend_from_slice(&[7u8; 20 * 1024]);
        bytes::Buf::advance(&mut buf, 20 * 1024);
        pool_a.put_raw(RawConn { stream: a, buf }, now);
        assert_eq!(
            SPARE.with(|spare| spare.borrow().len()),
            1,
            "the buffer left the idle connection"
        );

        // Traffic moves to the other cluster: its connection takes the same buffer.
        pool_b.put_raw(
            RawConn {
                stream: b,
                buf: BytesMut::new(),
            },
            now,
        );
        let (conn, _) = pool_b.checkout_raw(now).expect("b's idle connection");
        assert_eq!(
            conn.buf.as_ptr(),
            memory,
            "the buffer freed last, still warm"
        );
        assert!(conn.buf.is_empty());
        assert!(
            conn.buf.capacity() >= RAW_READ_BUF,
            "reset to its whole memory, not the {} bytes left after the reads",
            RAW_READ_BUF - 20 * 1024
        );

        let (mut conn, _) = pool_a.checkout_raw(now).expect("a's idle connection");
        assert_ne!(
            conn.buf.as_ptr(),
            memory,
            "a buffer is in one exchange at a time"
        );
        // Grown past the limit, then read through far enough that the room left is under it.
        conn.buf.extend_from_slice(&vec![1u8; SPARE_BUFFER_MAX + 1]);
        bytes::Buf::advance(&mut conn.buf, SPARE_BUFFER_MAX + 1);
        assert!(conn.buf.capacity() < SPARE_BUFFER_MAX);
        pool_a.put_raw(conn, now);
        assert_eq!(
            SPARE.with(|spare| spare.borrow().len()),
            0,
            "a buffer that grew past the limit is freed"
        );
        assert_eq!(pool_a.idle_count(), 1, "the connection itself is kept");
    }
}
