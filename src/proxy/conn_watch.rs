//! Time limits of a client connection that hyper does not enforce: the wait for its first request,
//! and how long an HTTP/2 connection may stay open with no request in flight; and the connection's
//! part in the gateway's graceful shutdown.
//!
//! hyper's `header_read_timeout` only runs once a connection is known to speak HTTP/1 (and then
//! between requests too, which also bounds idle HTTP/1 keep-alive). Before that, while the first
//! bytes tell HTTP/1 from HTTP/2, nothing bounds a client that connects and sends nothing (or half
//! the HTTP/2 preface); and an HTTP/2 connection that sent a request may stay open doing nothing
//! (keep-alive pings only find peers that are gone). Either would hold a `limits.max_connections`
//! permit forever. So a connection gets `limits.header_read_timeout` for its first request, and an
//! HTTP/2 connection is closed after `limits.http2_idle_timeout` without a request in flight.
//!
//! An idle HTTP/2 connection is closed the way the protocol asks for: GOAWAY first, so a client
//! that sends a request at that very moment learns it was not processed and can retry it
//! elsewhere, where a bare TCP close would leave it not knowing. The gateway's shutdown does the
//! same to every connection (HTTP/2: GOAWAY; HTTP/1: closed after the response in flight).
//!
//! An HTTP/2 client that stops taking data (it opens no flow-control window) would hold every
//! stream's response, its upstream connection and its place in `upstream.max_requests_per_cluster`
//! forever, up to 200 streams per connection, while it answers pings. hyper polls a response body
//! for its next frame only once it can send the one before (window for it, or h2's buffer drained
//! of the earlier data), so a stream whose body handed over a frame and was not polled again is
//! waiting on the client. When a frame has waited `limits.send_timeout` and no stream of the
//! connection took a frame in that time either (a slow client that still reads is not cut), the
//! connection is closed, without GOAWAY: the client reads nothing. (HTTP/1.1 clients that stop
//! reading are found by TCP: `TCP_USER_TIMEOUT` on the socket, see `server.rs`.)
//!
//! A client that resets its streams after the gateway took them (HTTP/2 "rapid reset", CVE-2023-44487:
//! h2's own limit only counts streams reset before they were accepted) makes the gateway route
//! each request and open, then drop, an upstream connection for it, at the cost of two frames.
//! When, in a window of [`RESET_WINDOW`], more than [`MAX_RESETS`] streams ended before their
//! response and they are more than half of the streams opened, the connection is closed (without
//! GOAWAY). The share keeps a proxy that multiplexes many users' requests, and their
//! cancellations, onto one connection from being cut. Streams reset after their response started
//! are not counted.
//!
//! The timers live on the connection's own task; per request the cost is an atomic store (and,
//! for HTTP/2 only, a count of streams in flight and a note per response frame).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Version;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// What one client connection did so far, shared by its requests and its task.
#[derive(Clone)]
pub(super) struct ConnWatch(Arc<State>);

struct State {
    /// A request arrived.
    seen: AtomicBool,
    /// The connection speaks HTTP/2.
    h2: AtomicBool,
    /// HTTP/2 requests whose response has not ended.
    active: AtomicUsize,
    /// When the last HTTP/2 request ended, in milliseconds since `start`.
    idle_since_ms: AtomicU64,
    /// HTTP/2 streams whose response frame waits for the client's window: stream number and
    /// since when (milliseconds since `start`).
    waiting: Mutex<Vec<(u64, u64)>>,
    /// Numbers the HTTP/2 streams.
    streams: AtomicU64,
    /// When a waiting frame of any stream was last taken (milliseconds since `start`).
    taken_ms: AtomicU64,
    /// HTTP/2 streams opened and reset in the current [`RESET_WINDOW`].
    resets: Mutex<ResetWindow>,
    /// More than [`MAX_RESETS`] resets in a window, and more than half its streams: close.
    flooded: AtomicBool,
    start: Instant,
}

impl State {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Applies `count` to the current reset window (a new one when it is over) and notes a flood.
    fn count_stream(&self, count: impl FnOnce(&mut ResetWindow)) {
        let now = self.now_ms();
        let mut window = lock(&self.resets);
        if now.saturating_sub(window.start_ms) >= RESET_WINDOW.as_millis() as u64 {
            *window = ResetWindow {
                start_ms: now,
                ..ResetWindow::default()
            };
        }
        count(&mut window);
        if window.reset > MAX_RESETS && window.reset * 2 > window.opened {
            self.flooded.store(true, Ordering::Relaxed);
        }
    }
}

/// HTTP/2 streams of one connection in one [`RESET_WINDOW`].
#[derive(Debug, Default)]
struct ResetWindow {
    /// When the window started (milliseconds since the connection's start).
    start_ms: u64,
    /// Streams opened in it.
    opened: u64,
    /// Streams that ended before their response in it.
    reset: u64,
}

/// How a connection's task ended.
pub(super) enum Ended<O> {
    /// The connection ended by itself, with its result.
    Done(O),
    /// No request within `limits.header_read_timeout`: closed.
    NoFirstRequest,
    /// HTTP/2 with nothing in flight for `limits.http2_idle_timeout`, then told GOAWAY, and not
    /// closed by the client within [`GOAWAY_GRACE`] after: closed.
    Idle,
    /// HTTP/2 with a response frame that waited `limits.send_timeout` for the client's window:
    /// closed.
    Stalled,
    /// HTTP/2 with more than [`MAX_RESETS`] streams reset before their response in a
    /// [`RESET_WINDOW`], more than half of its streams: closed.
    Resets,
}

/// Streams of one HTTP/2 connection that may end before their response (reset by the client)
/// in a [`RESET_WINDOW`]; one more closes the connection, when they are also more than half of
/// the streams opened in it.
pub(super) const MAX_RESETS: u64 = 200;
/// See [`MAX_RESETS`].
pub(super) const RESET_WINDOW: Duration = Duration::from_secs(10);

/// How long an idle HTTP/2 connection told GOAWAY has to close (the client acknowledges the
/// GOAWAY's PING, then the gateway sends the final GOAWAY and closes), with no stream in flight.
pub(super) const GOAWAY_GRACE: Duration = Duration::from_secs(5);

impl ConnWatch {
    /// A new connection's watch.
    pub(super) fn new() -> Self {
        ConnWatch(Arc::new(State {
            seen: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            waiting: Mutex::new(Vec::new()),
            streams: AtomicU64::new(0),
            taken_ms: AtomicU64::new(0),
            resets: Mutex::new(ResetWindow::default()),
            flooded: AtomicBool::new(false),
            start: Instant::now(),
        }))
    }

    /// Notes a request; an HTTP/2 request is counted in flight until the returned guard drops
    /// (with its response body).
    pub(super) fn request(&self, version: Version) -> Option<StreamGuard> {
        let guard = (version == Version::HTTP_2).then(|| {
            self.0.h2.store(true, Ordering::Relaxed);
            self.0.active.fetch_add(1, Ordering::AcqRel);
            self.0.count_stream(|w| w.opened += 1);
            StreamGuard {
                id: self.0.streams.fetch_add(1, Ordering::Relaxed),
                waiting: false,
                answered: false,
                state: Arc::clone(&self.0),
            }
        });
        self.0.seen.store(true, Ordering::Release);
        guard
    }

    /// Runs `conn` until it ends, or closes it (drops it) when a limit passes. `graceful` starts
    /// the connection's graceful shutdown (hyper's `graceful_shutdown`): called once, when `stop`
    /// completes (the gateway shuts down) or the connection has been idle too long.
    pub(super) fn run<F, G>(
        self,
        conn: F,
        graceful: G,
        stop: Pin<Box<dyn Future<Output = ()> + Send>>,
        first_request: Duration,
        http2_idle: Duration,
        send_timeout: Duration,
    ) -> Limited<F, G>
    where
        F: Future + Unpin,
        G: FnMut(&mut F),
    {
        Limited {
            conn,
            graceful,
            stop: Some(stop),
            closing: None,
            first: Some(Box::pin(tokio::time::sleep(first_request))),
            idle: None,
            http2_idle,
            stall: None,
            send_timeout,
            watch: self,
        }
    }
}

/// Keeps an HTTP/2 request counted in flight, and notes when its response waits on the client.
pub(super) struct StreamGuard {
    id: u64,
    /// A frame of the response is waiting for the client's window (noted in `state.waiting`).
    waiting: bool,
    /// The response is under way (the guard went into its body).
    answered: bool,
    state: Arc<State>,
}

impl StreamGuard {
    /// hyper took a frame of the response: until it polls the body again, the frame waits for
    /// the client's flow-control window.
    fn handed_over(&mut self) {
        let now = self.state.now_ms();
        lock(&self.state.waiting).push((self.id, now));
        self.waiting = true;
    }

    /// hyper polls the body again: the frame it had could be sent.
    fn taken(&mut self) {
        if self.waiting {
            self.waiting = false;
            lock(&self.state.waiting).retain(|&(id, _)| id != self.id);
            let now = self.state.now_ms();
            self.state.taken_ms.fetch_max(now, Ordering::Relaxed);
        }
    }
}

/// The value, also after a thread panicked holding it (every change to these is one step).
fn lock<T>(value: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    value
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if self.waiting {
            self.waiting = false;
            lock(&self.state.waiting).retain(|&(id, _)| id != self.id);
        }
        if !self.answered {
            // Ended before its response: the client reset it (or the connection went away).
            self.state.count_stream(|w| w.reset += 1);
        }
        if self.state.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            let ms = self.state.now_ms();
            self.state.idle_since_ms.store(ms, Ordering::Release);
        }
    }
}

/// A response body that holds its request's [`StreamGuard`] (HTTP/2) until it ends or is dropped.
#[derive(Debug)]
pub(super) struct Tracked<B> {
    inner: B,
    guard: Option<StreamGuard>,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamGuard")
    }
}

impl<B> Tracked<B> {
    pub(super) fn new(inner: B, mut guard: Option<StreamGuard>) -> Self {
        if let Some(guard) = &mut guard {
            guard.answered = true;
        }
        Tracked { inner, guard }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if let Some(guard) = &mut this.guard {
            guard.taken();
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.guard = None,
            Poll::Ready(Some(Ok(frame))) if frame.data_ref().is_some_and(|d| !d.is_empty()) => {
                if let Some(guard) = &mut this.guard {
                    guard.handed_over();
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A connection's future under its limits (see [`ConnWatch::run`]).
pub(super) struct Limited<F, G> {
    conn: F,
    graceful: G,
    /// Until the gateway shuts down; then the connection is asked to finish.
    stop: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// After an idle HTTP/2 connection was told GOAWAY: how long it has left to close.
    closing: Option<Pin<Box<Sleep>>>,
    /// Until the first request arrives; dropped then, so it costs nothing per request.
    first: Option<Pin<Box<Sleep>>>,
    /// For an HTTP/2 connection, from its first request on.
    idle: Option<Pin<Box<Sleep>>>,
    http2_idle: Duration,
    /// For an HTTP/2 connection, from its first request on: when the oldest waiting response
    /// frame will have waited `send_timeout`.
    stall: Option<Pin<Box<Sleep>>>,
    send_timeout: Duration,
    watch: ConnWatch,
}

impl<F: Future + Unpin, G: FnMut(&mut F) + Unpin> Future for Limited<F, G> {
    type Output = Ended<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // Before the connection takes more streams (each frame the client sends wakes this task).
        if this.watch.0.flooded.load(Ordering::Relaxed) {
            return Poll::Ready(Ended::Resets);
        }
        if let Poll::Ready(out) = Pin::new(&mut this.conn).poll(cx) {
            return Poll::Ready(Ended::Done(out));
        }
        if let Some(stop) = &mut this.stop {
            if stop.as_mut().poll(cx).is_ready() {
                this.stop = None;
                if this.closing.is_none() {
                    (this.graceful)(&mut this.conn);
                }
                // The connection may be able to finish now.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
        let state = &this.watch.0;
        if let Some(stall) = &mut this.stall {
            while stall.as_mut().poll(cx).is_ready() {
                let oldest = lock(&state.waiting).iter().map(|&(_, since)| since).min();
                let now = Instant::now();
                let next = match oldest {
                    Some(since) => {
                        // Stalled: that frame waited the whole time, and no other was taken.
                        let since = since.max(state.taken_ms.load(Ordering::Relaxed));
                        let deadline =
                            state.start + Duration::from_millis(since) + this.send_timeout;
                        if deadline <= now {
                            return Poll::Ready(Ended::Stalled);
                        }
                        deadline
                    }
                    None => now + this.send_timeout,
                };
                stall.as_mut().reset(next);
            }
        }
        if let Some(closing) = &mut this.closing {
            while closing.as_mut().poll(cx).is_ready() {
                // A stream that raced the GOAWAY is answered first, and its response gets the
                // whole grace to be written out after it ended (hyper may still hold some).
                let now = Instant::now();
                let next = if state.active.load(Ordering::Acquire) > 0 {
                    now + GOAWAY_GRACE
                } else {
                    let since = state.idle_since_ms.load(Ordering::Acquire);
                    let deadline = state.start + Duration::from_millis(since) + GOAWAY_GRACE;
                    if deadline <= now {
                        return Poll::Ready(Ended::Idle);
                    }
                    deadline
                };
                closing.as_mut().reset(next);
            }
            return Poll::Pending;
        }
        if let Some(first) = &mut this.first {
            if state.seen.load(Ordering::Acquire) {
                this.first = None;
                if state.h2.load(Ordering::Relaxed) {
                    this.idle = Some(Box::pin(tokio::time::sleep(this.http2_idle)));
                    this.stall = Some(Box::pin(tokio::time::sleep(this.send_timeout)));
                    // Polled once, so that its deadline wakes this task.
                    cx.waker().wake_by_ref();
                }
            } else if first.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ended::NoFirstRequest);
            }
        }
        if let Some(idle) = &mut this.idle {
            while idle.as_mut().poll(cx).is_ready() {
                let now = Instant::now();
                let next = if state.active.load(Ordering::Acquire) > 0 {
                    now + this.http2_idle
                } else {
                    let since = state.idle_since_ms.load(Ordering::Acquire);
                    let deadline = state.start + Duration::from_millis(since) + this.http2_idle;
                    if deadline <= now {
                        crate::telemetry::connection_closed("http2_idle");
                        this.idle = None;
                        this.closing = Some(Box::pin(tokio::time::sleep(GOAWAY_GRACE)));
                        if this.stop.is_some() {
                            (this.graceful)(&mut this.conn);
                        }
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    deadline
                };
                idle.as_mut().reset(next);
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `limited` is still running after a poll (time stands still meanwhile).
    async fn running<F: Future + Unpin, G: FnMut(&mut F) + Unpin>(
        limited: &mut Limited<F, G>,
    ) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *limited).poll(cx).is_pending())).await
    }

    type Idle = std::future::Pending<()>;

    /// `watch` running over a connection that never ends by itself, with `send_timeout` (the
    /// other limits far off), polled once so its timers are set.
    async fn watched(
        watch: ConnWatch,
        send_timeout: Duration,
    ) -> Limited<Idle, impl FnMut(&mut Idle) + Unpin> {
        let stop = Box::pin(std::future::pending::<()>());
        let mut limited = watch.run(
            std::future::pending::<()>(),
            |_: &mut Idle| {},
            stop,
            send_timeout * 10,
            send_timeout * 10,
            send_timeout,
        );
        assert!(running(&mut limited).await);
        limited
    }

    /// Streams of a window: `reset` ended before their response, `answered` had one.
    fn streams(watch: &ConnWatch, reset: u64, answered: u64) {
        for _ in 0..answered {
            let mut guard = watch.request(Version::HTTP_2).expect("an HTTP/2 stream");
            guard.answered = true;
        }
        for _ in 0..reset {
            drop(watch.request(Version::HTTP_2));
        }
    }

    /// More than 200 streams reset before their response in a 10 s window close the connection
    /// when they are more than half of its streams; not 200, not 201 among many answered ones (a
    /// proxy multiplexing users), not 300 spread over two windows.
    #[tokio::test(start_paused = true)]
    async fn resets_close_a_connection_past_the_limit_and_the_share() {
        let timeout = Duration::from_secs(60);
        let watch = ConnWatch::new();
        streams(&watch, 200, 0);
        let mut limited = watched(watch.clone(), timeout).await;
        assert!(running(&mut limited).await);
        streams(&watch, 1, 0);
        assert!(!running(&mut limited).await, "201 resets");

        let watch = ConnWatch::new();
        streams(&watch, 201, 1000);
        let mut limited = watched(watch.clone(), timeout).await;
        assert!(running(&mut limited).await);

        let watch = ConnWatch::new();
        streams(&watch, 150, 0);
        tokio::time::advance(RESET_WINDOW).await;
        streams(&watch, 150, 0);
        let mut limited = watched(watch, timeout).await;
        assert!(running(&mut limited).await);
    }

    /// A frame that waits the whole `send_timeout` while no stream takes one closes the
    /// connection; while another stream keeps taking frames (a slow client that reads), it does
    /// not; a stream that takes its frame is no longer waiting.
    #[tokio::test(start_paused = true)]
    async fn a_connection_is_stalled_only_when_no_stream_takes_a_frame() {
        let timeout = Duration::from_secs(60);
        let watch = ConnWatch::new();
        let mut stuck = watch.request(Version::HTTP_2).expect("an HTTP/2 stream");
        let mut slow = watch.request(Version::HTTP_2).expect("an HTTP/2 stream");
        let mut limited = watched(watch, timeout).await;
        stuck.handed_over();
        // The slow stream takes a frame every 30 s, for 3 minutes.
        for _ in 0..6 {
            slow.handed_over();
            tokio::time::advance(Duration::from_secs(30)).await;
            slow.taken();
            assert!(running(&mut limited).await);
        }
        // A frame taken is no longer waiting: after the slow stream's last one, nothing waits
        // but the stuck frame, and nothing is taken any more.
        tokio::time::advance(timeout - Duration::from_secs(1)).await;
        assert!(running(&mut limited).await);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(!running(&mut limited).await, "stalled");

        // Once its frame is taken, a stream is not waiting at all.
        let watch = ConnWatch::new();
        let mut stream = watch.request(Version::HTTP_2).expect("an HTTP/2 stream");
        let mut limited = watched(watch, timeout).await;
        stream.handed_over();
        stream.taken();
        tokio::time::advance(timeout * 3).await;
        assert!(running(&mut limited).await);
    }
}
