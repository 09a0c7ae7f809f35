//! The body sent upstream: the client's body streamed as it arrives (optionally size-limited,
//! always bounded in how long it may pause), or nothing (a bodiless request rebuilt for a retry).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The client sent more than `limits.max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body larger than the limit of {limit} bytes")]
pub struct BodyTooLarge {
    /// The configured limit.
    pub limit: u64,
}

/// Turns true once a request body has been read to its end (and handed to the upstream
/// connection). Until then the connection is still sending the request, even if the cluster has
/// already answered (an early `401` or `413`), so it must not be reused by another request.
#[derive(Debug, Clone, Default)]
pub struct Sent(Arc<AtomicBool>);

impl Sent {
    /// True once the whole body went to the connection.
    pub fn is_done(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn done(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The client paused longer than `limits.body_read_timeout` while sending its body.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no body data for {} (limits.body_read_timeout)", humantime::format_duration(*.timeout))]
pub struct BodyTimeout {
    /// The configured timeout.
    pub timeout: Duration,
}

/// The client's body failed on the client's side (it closed or reset the connection or its
/// stream mid-body, or sent malformed chunks): not the cluster's fault.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body ended early: {source}")]
pub struct ClientBodyError {
    /// The error the client connection reported.
    #[source]
    pub source: hyper::Error,
}

/// A request body on its way to a cluster.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed frame by frame.
    Client(ClientBody),
    /// No body.
    Empty,
}

/// The client's body as it streams to the cluster. A body with anything to send is watched (see
/// [`Watch`]); an empty one costs nothing more than the body itself.
#[derive(Debug)]
pub struct ClientBody {
    body: Incoming,
    /// Boxed: requests are moved between futures, and most have no body.
    watch: Option<Box<Watch>>,
}

/// What is kept about a body with something to send: its size against `limits.max_body_bytes`,
/// its pauses against `limits.body_read_timeout`, and its end.
#[derive(Debug)]
struct Watch {
    /// `limits.max_body_bytes`.
    limit: Option<u64>,
    /// Bytes seen so far.
    seen: u64,
    /// Set at the body's end.
    sent: Sent,
    /// The declared length (`content-length`), when there is one: hyper stops polling once it has
    /// sent that many bytes, even if the client's end-of-stream comes later (HTTP/2).
    expected: Option<u64>,
    /// The pause allowed between two frames.
    idle_timeout: Duration,
    /// The pause timer, made at the first wait for the client.
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Whether `idle` runs for the current wait.
    armed: bool,
}

impl RequestBody {
    /// The client's body, limited when `limit` is set, failing after a pause of `idle_timeout`,
    /// and (when the body is not empty) the flag that tells when it has all been sent.
    pub fn new(body: Incoming, limit: Option<u64>, idle_timeout: Duration) -> (Self, Option<Sent>) {
        if body.is_end_stream() {
            return (RequestBody::Client(ClientBody { body, watch: None }), None);
        }
        let sent = Sent::default();
        let watch = Watch {
            limit,
            seen: 0,
            sent: sent.clone(),
            expected: body.size_hint().exact(),
            idle_timeout,
            idle: None,
            armed: false,
        };
        let body = RequestBody::Client(ClientBody {
            body,
            watch: Some(Box::new(watch)),
        });
        (body, Some(sent))
    }
}

impl Watch {
    /// Polls the pause timer while the client sends nothing; `true` once the pause is too long. The
    /// pause runs from when the gateway starts waiting for the client's next frame (not while it
    /// connects upstream, or before a 100-continue went out).
    fn paused_too_long(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        let timer = match &mut self.idle {
            Some(timer) => {
                if !self.armed {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => self
                .idle
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        self.armed = true;
        timer.as_mut().poll(cx).is_ready()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let c = match self.get_mut() {
            RequestBody::Client(c) => c,
            RequestBody::Empty => return Poll::Ready(None),
        };
        let polled = Pin::new(&mut c.body).poll_frame(cx);
        let Some(w) = c.watch.as_deref_mut() else {
            return polled.map_err(|source| Box::new(ClientBodyError { source }) as Self::Error);
        };
        let polled =
            match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(data) = frame.data_ref() {
                        w.seen += data.len() as u64;
                        if let Some(limit) = w.limit.filter(|limit| w.seen > *limit) {
                            return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                        }
                    }
                    w.armed = false;
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Pending => {
                    if w.paused_too_long(cx) {
                        let timeout = w.idle_timeout;
                        return Poll::Ready(Some(Err(Box::new(BodyTimeout { timeout }))));
                    }
                    Poll::Pending
                }
                Poll::Ready(Some(Err(source))) => Poll::Ready(Some(Err(
                    Box::new(ClientBodyError { source }) as Self::Error,
                ))),
                Poll::Ready(None) => Poll::Ready(None),
            };
        // hyper stops polling a body that says it has ended, or that has sent its declared
        // length: the last frame counts as the end.
        if matches!(polled, Poll::Ready(None))
            || (matches!(polled, Poll::Ready(Some(Ok(_))))
                && (c.body.is_end_stream() || w.expected == Some(w.seen)))
        {
            w.sent.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(c) => c.body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(c) => c.body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
