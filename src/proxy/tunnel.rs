//! Upgraded connections (WebSockets): bytes copied both ways between the client and the cluster
//! until either side closes, or until neither has sent anything for `limits.tunnel_idle_timeout`.
//!
//! Without that limit a tunnel whose peers both went quiet (a client that vanished without a FIN,
//! an application that neither sends nor pings) would hold its client socket, its upstream
//! connection and its place in `upstream.max_requests_per_cluster` for as long as the process
//! runs: TCP's own timeouts only act on data waiting to be acknowledged.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::cluster::InFlight;
use crate::proxy::Open;
use crate::telemetry;

/// Copies bytes both ways between an upgraded client connection and an upgraded upstream one.
/// The cluster counts the tunnel in flight (`in_flight`) and the shutdown drain waits on it
/// (`open`) until it ends.
pub(crate) async fn run(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
    open: Open,
    idle_timeout: Duration,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(cluster = %in_flight.cluster().name, error = %e, "upgrade failed");
            return;
        }
    };
    let activity = Activity::new();
    let mut down = Watched::new(TokioIo::new(down), &activity, true);
    let mut up = Watched::new(TokioIo::new(up), &activity, false);
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut down, &mut up) => {
            if let Err(e) = copied {
                if activity.client_timed_out.load(Ordering::Relaxed) {
                    // The kernel gave up on the client (TCP_USER_TIMEOUT, `limits.send_timeout`).
                    telemetry::connection_closed("send_timeout");
                }
                tracing::debug!(cluster = %in_flight.cluster().name, error = %e, "upgraded connection ended");
            }
        }
        () = activity.idle_for(idle_timeout) => {
            telemetry::connection_closed("tunnel_idle");
            tracing::debug!(
                cluster = %in_flight.cluster().name, timeout = ?idle_timeout,
                "upgraded connection carried nothing for limits.tunnel_idle_timeout: closing it"
            );
        }
    }
    // Dropping both sides closes them; then the tunnel leaves its cluster and the drain count.
    drop((down, up));
    drop(in_flight);
    drop(open);
}

/// When a tunnel last carried bytes, in either direction.
struct Activity {
    /// The tunnel's start; `last` counts from it.
    start: Instant,
    /// Microseconds from `start` to the last read or write that moved data.
    last: AtomicU64,
    /// The client's socket failed with `ETIMEDOUT`: the kernel disconnected a client that left
    /// sent data unacknowledged for `limits.send_timeout`.
    client_timed_out: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
            client_timed_out: AtomicBool::new(false),
        }
    }

    /// Notes that bytes moved just now.
    fn touch(&self) {
        let micros = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.last.store(micros, Ordering::Relaxed);
    }

    /// The moment the tunnel has been idle for `timeout`, given the reads so far.
    fn deadline(&self, timeout: Duration) -> Instant {
        self.start + Duration::from_micros(self.last.load(Ordering::Relaxed)) + timeout
    }

    /// Completes once no bytes have moved for `timeout`; one timer per `timeout` of activity,
    /// not one per read.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let deadline = self.deadline(timeout);
            if deadline <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// One side of a tunnel, noting in its [`Activity`] every read and write that moved data (a
/// peer that takes data slowly but steadily is not idle), and a client's `ETIMEDOUT`.
struct Watched<'a, T> {
    io: T,
    activity: &'a Activity,
    /// The client's side (else the cluster's).
    client: bool,
}

impl<'a, T> Watched<'a, T> {
    fn new(io: T, activity: &'a Activity, client: bool) -> Self {
        Self {
            io,
            activity,
            client,
        }
    }

    /// Notes a read or write that moved `n` bytes, or failed.
    fn note(&self, done: Result<usize, &io::Error>) {
        match done {
            Ok(0) => {}
            Ok(_) => self.activity.touch(),
            Err(e) if self.client && e.kind() == io::ErrorKind::TimedOut => {
                self.activity
                    .client_timed_out
                    .store(true, Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    /// A polled write, noted.
    fn noted(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(done) = &polled {
            self.note(done.as_ref().copied());
        }
        polled
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(done) = &polled {
            this.note(done.as_ref().map(|()| buf.filled().len() - before));
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.noted(polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.noted(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads and writes keep the tunnel alive; once they stop, it is idle exactly `timeout` after
    /// the last.
    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_read_or_write() {
        let activity = Activity::new();
        let (mut far, near) = tokio::io::duplex(64);
        let mut watched = Watched::new(near, &activity, true);
        let timeout = Duration::from_secs(10);
        let begun = Instant::now();
        let mut buf = [0u8; 8];
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            far.write_all(b"ping").await.unwrap();
            assert_eq!(watched.read(&mut buf).await.unwrap(), 4);
        }
        // A write counts too: a peer taking data slowly but steadily is not idle.
        tokio::time::sleep(Duration::from_secs(4)).await;
        watched.write_all(b"pong").await.unwrap();
        activity.idle_for(timeout).await;
        assert_eq!(begun.elapsed(), Duration::from_secs(18 + 4 + 10));
        assert!(!activity.client_timed_out.load(Ordering::Relaxed));
    }

    /// A read that ends the stream (0 bytes) is not activity.
    #[tokio::test(start_paused = true)]
    async fn end_of_stream_is_not_activity() {
        let activity = Activity::new();
        let (far, near) = tokio::io::duplex(64);
        drop(far);
        let mut watched = Watched::new(near, &activity, true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut buf = [0u8; 8];
        assert_eq!(watched.read(&mut buf).await.unwrap(), 0);
        let begun = Instant::now();
        activity.idle_for(Duration::from_secs(10)).await;
        assert_eq!(begun.elapsed(), Duration::from_secs(5));
    }
}
