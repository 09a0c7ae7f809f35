//! The body sent upstream: the client's body streamed as it arrives (optionally size-limited), or
//! nothing (a bodiless request rebuilt for a retry).

use std::pin::Pin;
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

/// A request body on its way to a cluster.
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed frame by frame.
    Stream(Incoming),
    /// The client's body, failing once more than `limit` bytes went through.
    Limited {
        /// The client's body.
        body: Incoming,
        /// The limit.
        limit: u64,
        /// Bytes seen so far.
        seen: u64,
    },
    /// No body.
    Empty,
}

impl RequestBody {
    /// The client's body, limited when `limit` is set.
    pub fn new(body: Incoming, limit: Option<u64>) -> Self {
        match limit {
            Some(limit) => RequestBody::Limited {
                body,
                limit,
                seen: 0,
            },
            None => RequestBody::Stream(body),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            RequestBody::Stream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            RequestBody::Limited { body, limit, seen } => match Pin::new(body).poll_frame(cx) {
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
            },
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(body) | RequestBody::Limited { body, .. } => body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(body) | RequestBody::Limited { body, .. } => body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}
