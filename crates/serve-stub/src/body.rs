//! The response body type: a single chunk, or a timed server-sent-event stream.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::state::InFlight;

/// Body of every response the stub sends.
pub(crate) struct StubBody {
    kind: Kind,
    /// Keeps the app request counted as in flight until the body is dropped,
    /// i.e. fully sent or abandoned with its connection.
    _in_flight: Option<InFlight>,
}

enum Kind {
    Full(Option<Bytes>),
    Events(Box<Events>),
}

/// `n` events `data: <cluster> <i>\n\n`, each one `interval` after the last.
/// Every event is its own chunk: the body returns `Pending` between events,
/// which makes hyper flush what it has written.
struct Events {
    prefix: String,
    next: u64,
    n: u64,
    interval: Duration,
    sleep: Pin<Box<Sleep>>,
}

impl StubBody {
    /// A body sent in one piece (with a `content-length`).
    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        StubBody {
            kind: Kind::Full(Some(bytes.into())).normalized(),
            _in_flight: None,
        }
    }

    /// An empty body.
    pub(crate) fn empty() -> Self {
        StubBody {
            kind: Kind::Full(None),
            _in_flight: None,
        }
    }

    /// A chunked stream of `n` server-sent events from cluster `name`.
    pub(crate) fn events(name: &str, n: u64, interval: Duration) -> Self {
        let events = Events {
            prefix: format!("data: {name} "),
            next: 0,
            n,
            interval,
            sleep: Box::pin(tokio::time::sleep(interval)),
        };
        StubBody {
            kind: Kind::Events(Box::new(events)),
            _in_flight: None,
        }
    }

    /// Attaches the in-flight guard of the app request this body answers.
    pub(crate) fn with_guard(mut self, guard: InFlight) -> Self {
        self._in_flight = Some(guard);
        self
    }
}

impl Kind {
    fn normalized(self) -> Self {
        match self {
            Kind::Full(Some(b)) if b.is_empty() => Kind::Full(None),
            other => other,
        }
    }
}

impl Body for StubBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match &mut self.get_mut().kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Events(ev) => {
                if ev.next >= ev.n {
                    return Poll::Ready(None);
                }
                if ev.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let chunk = format!("{}{}\n\n", ev.prefix, ev.next);
                ev.next += 1;
                let deadline = Instant::now() + ev.interval;
                ev.sleep.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Events(ev) => ev.next >= ev.n,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(bytes) => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Events(_) => SizeHint::default(),
        }
    }
}
