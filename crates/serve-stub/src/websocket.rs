//! WebSocket echo: the HTTP/1.1 upgrade handshake done with hyper, then
//! tokio-tungstenite on the upgraded connection.

use std::sync::Arc;

use base64::Engine as _;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{
    CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::body::StubBody;
use crate::handlers::{respond, respond_with, TEXT};
use crate::state::{InFlight, Shared};

/// The GUID RFC 6455 appends to the client's key.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub(crate) fn accept_key(key: &[u8]) -> String {
    let mut sha1 = sha1_smol::Sha1::new();
    sha1.update(key);
    sha1.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(sha1.digest().bytes())
}

/// Answers a WebSocket upgrade request with 101 and starts the echo task, or
/// answers 400 when the request is not a valid upgrade. The echo task keeps
/// `guard`, so an open WebSocket counts as an app request in flight.
pub(crate) fn accept(
    shared: &Arc<Shared>,
    req: &mut Request<Incoming>,
    guard: InFlight,
) -> Response<StubBody> {
    let headers = req.headers();
    let valid = req.method() == Method::GET
        && has_token(headers, &UPGRADE, "websocket")
        && has_token(headers, &CONNECTION, "upgrade")
        && headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v.as_bytes() == b"13");
    let key = headers.get(SEC_WEBSOCKET_KEY).filter(|_| valid);
    let Some(key) = key else {
        let body = format!("{} expected a WebSocket upgrade (version 13)", shared.name);
        return respond(shared, StatusCode::BAD_REQUEST, TEXT, body);
    };
    let accept = accept_key(key.as_bytes());

    let on_upgrade = hyper::upgrade::on(req);
    let prefix = format!("{}: ", shared.name);
    let mut stop = shared.stop.clone();
    tokio::spawn(async move {
        let _guard = guard;
        let upgraded = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            upgraded = on_upgrade => upgraded,
        };
        match upgraded {
            Ok(upgraded) => echo(upgraded, &prefix, stop).await,
            Err(err) => tracing::debug!(%err, "serve-stub: websocket upgrade failed"),
        }
    });

    let mut resp = respond_with(
        shared,
        StatusCode::SWITCHING_PROTOCOLS,
        None,
        StubBody::empty(),
    );
    let h = resp.headers_mut();
    h.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    }
    resp
}

/// Echoes text messages as `<cluster>: <text>` and binary ones unchanged until
/// the peer closes, the connection fails or the stub stops.
async fn echo(upgraded: Upgraded, prefix: &str, mut stop: watch::Receiver<bool>) {
    let io = TokioIo::new(upgraded);
    let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, None).await;
    loop {
        let msg = tokio::select! {
            _ = stop.wait_for(|stopped| *stopped) => return,
            msg = ws.next() => msg,
        };
        let reply = match msg {
            Some(Ok(Message::Text(text))) => Message::text(format!("{prefix}{}", text.as_str())),
            Some(Ok(Message::Binary(data))) => Message::Binary(data),
            // Pongs and the reply to a close are queued by tungstenite and
            // written on the next read; after a close that read ends the loop.
            Some(Ok(_)) => continue,
            Some(Err(err)) => {
                tracing::debug!(%err, "serve-stub: websocket read failed");
                return;
            }
            None => return,
        };
        if let Err(err) = ws.send(reply).await {
            tracing::debug!(%err, "serve-stub: websocket write failed");
            return;
        }
    }
}

/// Whether header `name` holds `token` in its comma-separated list.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc6455_accept_key() {
        assert_eq!(
            super::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
