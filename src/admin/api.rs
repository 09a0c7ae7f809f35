//! Admin request routing and handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::admin::views::StateView;
use crate::admin::AdminContext;

/// Largest admin request body accepted.
const MAX_BODY: usize = 1 << 20;

type AdminResponse = Response<Full<Bytes>>;

/// Routes one admin request. Errors are JSON `{"error": "..."}` with a 4xx/5xx status.
pub async fn handle(
    ctx: Arc<AdminContext>,
    req: Request<Incoming>,
) -> Result<AdminResponse, Infallible> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let resp = match (segments.as_slice(), &method) {
        (["live"], &Method::GET) => text(StatusCode::OK, "ok\n"),
        (["ready"], &Method::GET) => ready(&ctx),
        (["metrics"], &Method::GET) => {
            let mut resp = text(StatusCode::OK, ctx.prometheus.render());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (["v1", "state"], &Method::GET) => {
            let snap = ctx.control.snapshot();
            json(
                StatusCode::OK,
                &StateView::of(&snap, ctx.control.is_ready(), ctx.split_key.to_string()),
            )
        }
        (["v1", "placement"], &Method::GET) => placement(&ctx, req.uri().query()),
        (["v1", "shards", shard, "weights"], &Method::PUT) => {
            let shard = shard.to_string();
            if !ctx.token.allows(req.headers()) {
                unauthorized()
            } else {
                put_weights(&ctx, &shard, req).await
            }
        }
        (["live" | "ready" | "metrics"] | ["v1", "state" | "placement"], _)
        | (["v1", "shards", _, "weights"], _) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint at {path}"),
        ),
    };
    Ok(resp)
}

fn ready(ctx: &AdminContext) -> AdminResponse {
    if *ctx.shutting_down.borrow() {
        text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if ctx.control.is_ready() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "routing table not published yet\n",
        )
    }
}

#[derive(Serialize)]
struct Placement<'a> {
    app: &'a str,
    shard: &'a str,
    /// The app is in the routing table (configured or discovered) and its shard comes from there.
    known: bool,
}

fn placement(ctx: &AdminContext, query: Option<&str>) -> AdminResponse {
    let app = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(k, _)| k == "app")
        .map(|(_, v)| v.into_owned());
    let Some(app) = app.filter(|a| !a.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "query parameter app=NAME is required".into(),
        );
    };
    let snap = ctx.control.snapshot();
    let table = &snap.table;
    let known = table.apps().iter().find(|a| *a.name == *app);
    let shard = match known {
        Some(a) => Some(a.shard),
        None => table.placement().place(&app),
    };
    match shard {
        Some(shard) => json(
            StatusCode::OK,
            &Placement {
                app: &app,
                shard: table.shard_name(shard),
                known: known.is_some(),
            },
        ),
        None => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no shards are declared".into(),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightsBody {
    weights: BTreeMap<String, u64>,
}

async fn put_weights(ctx: &AdminContext, shard: &str, req: Request<Incoming>) -> AdminResponse {
    let body = match read_body(req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let parsed: WeightsBody =
        match serde_json::from_slice(&body) {
            Ok(parsed) => parsed,
            Err(e) => return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be {{\"weights\": {{\"<cluster>\": <integer 0-100>, ...}}}}: {e}"
                ),
            ),
        };
    match ctx.control.set_weights(shard, parsed.weights.clone()).await {
        Ok(()) => {
            tracing::info!(%shard, weights = ?parsed.weights, "weights set through the admin API");
            json(
                StatusCode::OK,
                &serde_json::json!({"shard": shard, "weights": parsed.weights}),
            )
        }
        Err(e) if e.is_client_error() => {
            let status = if matches!(e, crate::control::ControlError::UnknownShard(_)) {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_REQUEST
            };
            error(status, e.to_string())
        }
        Err(e) => {
            tracing::error!(%shard, error = %e, "weight change failed");
            error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        }
    }
}

/// Reads a bounded request body, or returns the error response to send.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, AdminResponse> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {MAX_BODY} bytes"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("reading request body: {e}"),
        )),
    }
}

fn unauthorized() -> AdminResponse {
    let mut resp = error(
        StatusCode::UNAUTHORIZED,
        "missing or wrong bearer token (Authorization: Bearer <token>)".into(),
    );
    resp.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> AdminResponse {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json(status: StatusCode, value: &impl Serialize) -> AdminResponse {
    match serde_json::to_vec_pretty(value) {
        Ok(mut body) => {
            body.push(b'\n');
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serializing: {e}\n"),
        ),
    }
}

fn error(status: StatusCode, message: String) -> AdminResponse {
    json(status, &serde_json::json!({ "error": message }))
}
