//! Request dispatch: Ray Serve's probe endpoints, the dashboard API and the
//! behaviour of app requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::body::StubBody;
use crate::state::{AppEntry, Shared};
use crate::websocket;

/// Name of the cluster that answered (every response).
pub(crate) const X_STUB_CLUSTER: HeaderName = HeaderName::from_static("x-stub-cluster");
/// Revision of the cluster that answered (every response).
pub(crate) const X_STUB_REVISION: HeaderName = HeaderName::from_static("x-stub-revision");
/// App that answered (app responses only).
pub(crate) const X_STUB_APP: HeaderName = HeaderName::from_static("x-stub-app");

pub(crate) const TEXT: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
const JSON: HeaderValue = HeaderValue::from_static("application/json");
const EVENT_STREAM: HeaderValue = HeaderValue::from_static("text/event-stream");

const DRAINING_MESSAGE: &str = "This node is being drained.";
const NO_ROUTES_MESSAGE: &str = "Route table is not populated yet.";

/// What an app request asks for, from the last segments of its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Default,
    Upload,
    Stream,
    Headers,
    Status(u16),
    Sleep(u64),
    WebSocket,
}

impl Op {
    /// Classifies the path after the app's route prefix (`""` or `/...`).
    fn of(rest: &str) -> Op {
        let mut segments = rest.rsplit('/');
        let last = segments.next().unwrap_or("");
        match (segments.next(), last) {
            (_, "upload") => Op::Upload,
            (_, "stream") => Op::Stream,
            (_, "headers" | "echo-headers") => Op::Headers,
            (_, "ws") => Op::WebSocket,
            (Some("status"), code) => code.parse().map_or(Op::Default, Op::Status),
            (Some("sleep"), ms) => ms.parse().map_or(Op::Default, Op::Sleep),
            _ => Op::Default,
        }
    }
}

/// Answers one request. Never fails: every problem becomes a response.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<StubBody>, Infallible> {
    let path = req.uri().path();
    if let Some(resp) = probe(&shared, path) {
        let delay = shared.probe_latency();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        return Ok(resp);
    }
    let table = shared.table();
    // Serve matches route prefixes against the percent-decoded path.
    let decoded = percent_encoding::percent_decode_str(path).decode_utf8_lossy();
    let Some((idx, rest)) = table.route(&decoded) else {
        let body =
            format!("Path '{path}' not found. Ping http://.../-/routes for available routes.");
        return Ok(respond(&shared, StatusCode::NOT_FOUND, TEXT, body));
    };
    let op = Op::of(rest);
    Ok(app_request(&shared, &table.apps[idx], op, req).await)
}

/// Health, routes and dashboard endpoints; `None` when `path` is none of them.
fn probe(shared: &Shared, path: &str) -> Option<Response<StubBody>> {
    let resp = match path {
        "/-/healthz" => {
            if shared.healthy() {
                respond(shared, StatusCode::OK, TEXT, "success")
            } else {
                respond(
                    shared,
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    DRAINING_MESSAGE,
                )
            }
        }
        "/-/routes" => {
            if shared.routes_populated() {
                let json = shared.table().routes_json.clone();
                respond(shared, StatusCode::OK, JSON, json)
            } else {
                respond(
                    shared,
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    NO_ROUTES_MESSAGE,
                )
            }
        }
        "/api/serve/applications/" | "/api/serve/applications" => {
            respond(shared, StatusCode::OK, JSON, applications_json(shared))
        }
        _ => return None,
    };
    shared.count_probe();
    Some(resp)
}

/// The dashboard's `GET /api/serve/applications/` document.
fn applications_json(shared: &Shared) -> Vec<u8> {
    let table = shared.table();
    let mut apps = serde_json::Map::new();
    // Sorted longest prefix first; report each app once, first listing wins.
    for app in &table.apps {
        apps.entry(app.name.clone()).or_insert_with(|| {
            serde_json::json!({
                "name": app.name,
                "route_prefix": app.prefix,
                "status": shared.app_status(&app.name),
            })
        });
    }
    serde_json::to_vec(&serde_json::json!({ "applications": apps })).unwrap_or_default()
}

async fn app_request(
    shared: &Arc<Shared>,
    app: &AppEntry,
    op: Op,
    mut req: Request<Incoming>,
) -> Response<StubBody> {
    let guard = shared.begin_app_request();
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let fail = shared.should_fail();
    if op == Op::WebSocket && !fail {
        let resp = websocket::accept(shared, &mut req, guard);
        return with_app(resp, app);
    }
    let (parts, body) = req.into_parts();
    let received = match count_body(body).await {
        Ok(n) => n,
        Err(err) => {
            tracing::debug!(%err, "serve-stub: request body failed");
            let body = format!("{} request body error: {err}", shared.name);
            return with_app(respond(shared, StatusCode::BAD_REQUEST, TEXT, body), app);
        }
    };
    let resp = if fail {
        let body = format!("{} 500 injected error", shared.name);
        respond(shared, StatusCode::INTERNAL_SERVER_ERROR, TEXT, body)
    } else {
        match op {
            // A WebSocket request only gets here when failing (handled above).
            Op::Default | Op::WebSocket => {
                respond(shared, StatusCode::OK, TEXT, app.default_body(received))
            }
            Op::Sleep(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                respond(shared, StatusCode::OK, TEXT, app.default_body(received))
            }
            Op::Upload => {
                let body = format!("{{\"bytes\": {received}}}");
                respond(shared, StatusCode::OK, JSON, body)
            }
            Op::Headers => respond(shared, StatusCode::OK, JSON, headers_json(&parts)),
            Op::Status(code) => status(shared, code),
            Op::Stream => stream(shared, &parts),
        }
    };
    let (parts, body) = with_app(resp, app).into_parts();
    Response::from_parts(parts, body.with_guard(guard))
}

/// Reads a request body to its end chunk by chunk, counting its bytes.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

/// `.../status/<code>`: that status with body `<cluster> <code>`.
fn status(shared: &Shared, code: u16) -> Response<StubBody> {
    match StatusCode::from_u16(code) {
        Ok(s) if s.as_u16() >= 200 => {
            if s == StatusCode::NO_CONTENT || s == StatusCode::NOT_MODIFIED {
                respond_with(shared, s, None, StubBody::empty())
            } else {
                respond(shared, s, TEXT, format!("{} {code}", shared.name))
            }
        }
        _ => {
            let body = format!("{} cannot answer with status {code}", shared.name);
            respond(shared, StatusCode::BAD_REQUEST, TEXT, body)
        }
    }
}

/// `.../stream?n=5&interval_ms=100`: `n` server-sent events.
fn stream(shared: &Shared, parts: &Parts) -> Response<StubBody> {
    let (mut n, mut interval_ms) = (5u64, 100u64);
    for pair in parts.uri.query().unwrap_or("").split('&') {
        match pair.split_once('=') {
            Some(("n", v)) => n = v.parse().unwrap_or(n),
            Some(("interval_ms", v)) => interval_ms = v.parse().unwrap_or(interval_ms),
            _ => {}
        }
    }
    let body = StubBody::events(&shared.name, n, Duration::from_millis(interval_ms));
    let mut resp = respond_with(shared, StatusCode::OK, Some(EVENT_STREAM), body);
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    resp
}

/// `.../headers`: the request's headers as a JSON object, repeated headers
/// joined with `", "`, plus `_method`, `_uri` and `_version`.
fn headers_json(parts: &Parts) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        match map.get_mut(name.as_str()) {
            Some(serde_json::Value::String(joined)) => {
                joined.push_str(", ");
                joined.push_str(&value);
            }
            _ => {
                map.insert(name.as_str().to_owned(), value.into_owned().into());
            }
        }
    }
    map.insert("_method".into(), parts.method.as_str().into());
    map.insert("_uri".into(), parts.uri.to_string().into());
    map.insert("_version".into(), format!("{:?}", parts.version).into());
    serde_json::to_vec(&map).unwrap_or_default()
}

/// A response with the cluster headers, a content type and a one-piece body.
pub(crate) fn respond(
    shared: &Shared,
    status: StatusCode,
    content_type: HeaderValue,
    body: impl Into<Bytes>,
) -> Response<StubBody> {
    respond_with(shared, status, Some(content_type), StubBody::full(body))
}

/// A response with the cluster headers and any body.
pub(crate) fn respond_with(
    shared: &Shared,
    status: StatusCode,
    content_type: Option<HeaderValue>,
    body: StubBody,
) -> Response<StubBody> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(X_STUB_CLUSTER, shared.name_hv.clone());
    h.insert(X_STUB_REVISION, shared.revision_hv.clone());
    if let Some(content_type) = content_type {
        h.insert(CONTENT_TYPE, content_type);
    }
    resp
}

fn with_app(mut resp: Response<StubBody>, app: &AppEntry) -> Response<StubBody> {
    resp.headers_mut().insert(X_STUB_APP, app.name_hv.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::Op;

    #[test]
    fn ops_from_path_suffix() {
        assert_eq!(Op::of(""), Op::Default);
        assert_eq!(Op::of("/"), Op::Default);
        assert_eq!(Op::of("/x/y"), Op::Default);
        assert_eq!(Op::of("/stream"), Op::Stream);
        assert_eq!(Op::of("/a/b/upload"), Op::Upload);
        assert_eq!(Op::of("/headers"), Op::Headers);
        assert_eq!(Op::of("/echo-headers"), Op::Headers);
        assert_eq!(Op::of("/ws"), Op::WebSocket);
        assert_eq!(Op::of("/status/418"), Op::Status(418));
        assert_eq!(Op::of("/status/x"), Op::Default);
        assert_eq!(Op::of("/deep/sleep/25"), Op::Sleep(25));
        assert_eq!(Op::of("/stream/"), Op::Default);
    }
}
