//! The body sent upstream: the client's body streamed as it arrives (optionally size-limited), or
//! nothing (a bodiless request rebuilt for a retry).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

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

/// A request body on its way to a cluster.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed frame by frame.
    Stream {
        /// The client's body.
        body: Incoming,
        /// Set at the body's end (`None`: the body was empty from the start).
        sent: Option<Sent>,
    },
    /// The client's body, failing once more than `limit` bytes went through.
    Limited {
        /// The client's body.
        body: Incoming,
        /// The limit.
        limit: u64,
        /// Bytes seen so far.
        seen: u64,
        /// Set at the body's end (`None`: the body was empty from the start).
        sent: Option<Sent>,
    },
    /// No body.
    Empty,
}

impl RequestBody {
    /// The client's body, limited when `limit` is set, and (when the body is not empty) the flag
    /// that tells when it has all been sent.
    pub fn new(body: Incoming, limit: Option<u64>) -> (Self, Option<Sent>) {
        // Only a body that has something to send needs watching (and an allocation for it).
        let sent = (!body.is_end_stream()).then(Sent::default);
        let watch = sent.clone();
        let body = match limit {
            Some(limit) => RequestBody::Limited {
                body,
                limit,
                seen: 0,
                sent,
            },
            None => RequestBody::Stream { body, sent },
        };
        (body, watch)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let (polled, body, sent) = match self.get_mut() {
            RequestBody::Stream { body, sent } => {
                let polled = Pin::new(&mut *body).poll_frame(cx).map_err(Into::into);
                (polled, body, sent)
            }
            RequestBody::Limited {
                body,
                limit,
                seen,
                sent,
            } => {
                let polled = match Pin::new(&mut *body).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            *seen += data.len() as u64;
                            if *seen > *limit {
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge {
                                    limit: *limit,
                                }))));
                            }
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                    other => other.map_err(Into::into),
                };
                (polled, body, sent)
            }
            RequestBody::Empty => return Poll::Ready(None),
        };
        // hyper stops polling a body that says it has ended: the last frame counts as the end.
        if let Some(sent) = sent {
            if matches!(polled, Poll::Ready(None))
                || (matches!(polled, Poll::Ready(Some(Ok(_)))) && body.is_end_stream())
            {
                sent.done();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream { body, .. } | RequestBody::Limited { body, .. } => {
                body.is_end_stream()
            }
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream { body, .. } | RequestBody::Limited { body, .. } => {
                body.size_hint()
            }
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
