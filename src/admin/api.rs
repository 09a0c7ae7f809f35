//! Admin request routing and handlers.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use crate::admin::views::{ShiftView, StateView};
use crate::admin::AdminContext;
use crate::control::{Action, ControlError, ShiftRequest};
use crate::shift::Target;

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
    // HEAD is GET without the body (hyper leaves it out), for `curl -I` and health checkers.
    let method = match req.method() {
        &Method::HEAD => Method::GET,
        m => m.clone(),
    };
    let resp = match (segments.as_slice(), &method) {
        (["live"], &Method::GET) => text(StatusCode::OK, "ok\n"),
        (["ready"], &Method::GET) => ready(&ctx),
        (["metrics"], &Method::GET) => {
            let exposition = crate::telemetry::render(&ctx.prometheus, ctx.removed_series_ttl);
            let mut resp = text(StatusCode::OK, exposition);
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
                &StateView::of(
                    &snap,
                    ctx.control.is_ready(),
                    {
                        let standing = ctx.control.standing();
                        (
                            standing == crate::kube_state::Standing::Leader,
                            standing == crate::kube_state::Standing::Stranded,
                        )
                    },
                    ctx.split_key.to_string(),
                ),
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
        (["v1", "shards", shard, "shift"], &Method::POST) => {
            let shard = shard.to_string();
            if !ctx.token.allows(req.headers()) {
                unauthorized()
            } else {
                start_shift(&ctx, &shard, req).await
            }
        }
        (["v1", "shards", shard, "shift"], &Method::GET) => {
            let snap = ctx.control.snapshot();
            match snap.shifts.get(*shard) {
                Some(shift) => json(StatusCode::OK, &ShiftView::current(shift, shard, &snap)),
                None if (0..snap.table.placement().len())
                    .any(|i| snap.table.shard_name(i as u32) == *shard) =>
                {
                    error(
                        StatusCode::NOT_FOUND,
                        format!("shard \"{shard}\" has no shift"),
                    )
                }
                None => error(StatusCode::NOT_FOUND, format!("unknown shard \"{shard}\"")),
            }
        }
        (["v1", "shards", shard, "shift", action], &Method::POST) => {
            let (shard, action) = (shard.to_string(), action.to_string());
            if !ctx.token.allows(req.headers()) {
                unauthorized()
            } else {
                match Action::parse(&action) {
                    Some(action) => match ctx.control.control_shift(&shard, action).await {
                        Ok(shift) => json(StatusCode::OK, &ShiftView::of(&shift)),
                        Err(e) => control_error(e),
                    },
                    None => error(
                        StatusCode::NOT_FOUND,
                        format!("unknown shift control \"{action}\"; expected pause, resume, promote or abort"),
                    ),
                }
            }
        }
        (["v1", "rollouts"], &Method::GET) => {
            let snap = ctx.control.snapshot();
            json(
                StatusCode::OK,
                &serde_json::json!({ "rollout": snap.rollout }),
            )
        }
        (["v1", "rollouts"], &Method::POST) => {
            if !ctx.token.allows(req.headers()) {
                unauthorized()
            } else {
                start_rollout(&ctx, req).await
            }
        }
        (["v1", "rollouts", _], &Method::POST) | (["v1", "rollouts", _, _], &Method::POST)
            if !ctx.token.allows(req.headers()) =>
        {
            // Before the id is looked at: every POST without the token gets 401.
            unauthorized()
        }
        (["v1", "rollouts", action], &Method::POST)
        | (["v1", "rollouts", _, action], &Method::POST) => {
            let id = match segments.as_slice() {
                [_, _, id, _] => match id.parse::<u64>() {
                    Ok(id) => Some(id),
                    Err(_) => {
                        return Ok(error(StatusCode::NOT_FOUND, format!("no rollout \"{id}\"")));
                    }
                },
                _ => None,
            };
            let action = action.to_string();
            match Action::parse(&action).filter(|a| *a != Action::Promote) {
                Some(action) => match ctx.control.control_rollout(id, action).await {
                    Ok(rollout) => json(StatusCode::OK, &rollout),
                    Err(e) => control_error(e),
                },
                None => error(
                    StatusCode::NOT_FOUND,
                    format!(
                        "unknown rollout control \"{action}\"; expected pause, resume or abort"
                    ),
                ),
            }
        }
        (known, _) => match allowed_methods(known) {
            Some(allow) => {
                let mut resp = error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("method {method} not allowed on {path}; allowed: {allow}"),
                );
                resp.headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(allow));
                resp
            }
            None => error(
                StatusCode::NOT_FOUND,
                format!("no admin endpoint at {path}"),
            ),
        },
    };
    Ok(resp)
}

/// The methods an admin path answers (the `Allow` header of a `405`); `None`: no such path.
fn allowed_methods(segments: &[&str]) -> Option<&'static str> {
    match segments {
        ["live" | "ready" | "metrics"] | ["v1", "state" | "placement"] => Some("GET, HEAD"),
        ["v1", "rollouts"] | ["v1", "shards", _, "shift"] => Some("GET, HEAD, POST"),
        ["v1", "shards", _, "weights"] => Some("PUT"),
        ["v1", "shards", _, "shift", _] | ["v1", "rollouts", _] | ["v1", "rollouts", _, _] => {
            Some("POST")
        }
        _ => None,
    }
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
    #[serde(deserialize_with = "unique_weights")]
    weights: BTreeMap<String, u64>,
}

/// The weights map, refusing a cluster named twice (JSON would otherwise keep the last one).
fn unique_weights<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, u64>, D::Error> {
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, u64>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of cluster names to integer weights")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((name, weight)) = map.next_entry::<String, u64>()? {
                if out.insert(name.clone(), weight).is_some() {
                    return Err(serde::de::Error::custom(format!(
                        "cluster \"{name}\" is named twice"
                    )));
                }
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

async fn put_weights(ctx: &AdminContext, shard: &str, req: Request<Incoming>) -> AdminResponse {
    let body = match read_body(ctx, req).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let parsed: WeightsBody = match serde_json::from_slice(&body) {
        Ok(parsed) => parsed,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "body must be {{\"weights\": {{\"<cluster>\": <integer 0-100>, ...}}}}: {e}"
                ),
            )
        }
    };
    match ctx.control.set_weights(shard, parsed.weights.clone()).await {
        Ok(split) => {
            tracing::debug!(%shard, weights = ?split, "weights set through the admin API");
            json(
                StatusCode::OK,
                &serde_json::json!({"shard": shard, "weights": split}),
            )
        }
        Err(e) => control_error(e),
    }
}

/// A control-plane refusal as a response: 4xx for the request's fault, 5xx for the gateway's.
fn control_error(e: ControlError) -> AdminResponse {
    if !e.is_client_error() {
        tracing::error!(error = %e, "admin request failed");
    }
    error(e.status(), e.to_string())
}

/// Parses a JSON object body, or returns the 400 to send.
async fn json_object(
    ctx: &AdminContext,
    req: Request<Incoming>,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, AdminResponse> {
    let body = read_body(ctx, req).await?;
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("body must be a JSON object: {what}"),
        )),
        Err(e) => Err(error(
            StatusCode::BAD_REQUEST,
            format!("body is not JSON ({e}); expected {what}"),
        )),
    }
}

/// A string field of a JSON body, or the message saying what is wrong with it.
fn string_field(
    body: &serde_json::Map<String, serde_json::Value>,
    key: &str,
) -> Result<Option<String>, String> {
    match body.get(key) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(other) => Err(format!("{key}: expected a non-empty string, got {other}")),
    }
}

async fn start_shift(ctx: &AdminContext, shard: &str, req: Request<Incoming>) -> AdminResponse {
    const SHAPE: &str =
        r#"{"to": "<cluster>"} or {"to_revision": "<revision>"} plus optional policy keys"#;
    let body = match json_object(ctx, req, SHAPE).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let target = match (
        string_field(&body, "to"),
        string_field(&body, "to_revision"),
    ) {
        (Err(msg), _) | (_, Err(msg)) => return error(StatusCode::BAD_REQUEST, msg),
        (Ok(Some(cluster)), Ok(None)) => Target::Cluster(cluster),
        (Ok(None), Ok(Some(revision))) => Target::Revision(revision),
        (Ok(Some(_)), Ok(Some(_))) => {
            return error(
                StatusCode::BAD_REQUEST,
                "give either to or to_revision, not both".into(),
            )
        }
        (Ok(None), Ok(None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("to or to_revision is required: {SHAPE}"),
            )
        }
    };
    let policy = match ctx.shift_defaults.with_json(&body, &["to", "to_revision"]) {
        Ok(policy) => policy,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ctx
        .control
        .start_shift(shard, ShiftRequest { target, policy })
        .await
    {
        Ok(shift) => json(StatusCode::ACCEPTED, &ShiftView::of(&shift)),
        Err(e) => control_error(e),
    }
}

async fn start_rollout(ctx: &AdminContext, req: Request<Incoming>) -> AdminResponse {
    const SHAPE: &str =
        r#"{"revision": "<revision>", "max_concurrent": 1} plus optional policy keys"#;
    let body = match json_object(ctx, req, SHAPE).await {
        Ok(body) => body,
        Err(resp) => return resp,
    };
    let revision = match string_field(&body, "revision") {
        Ok(Some(r)) => r,
        Ok(None) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("revision is required: {SHAPE}"),
            )
        }
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let max_concurrent = match body.get("max_concurrent") {
        None => 1,
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => n as usize,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("max_concurrent: expected an integer >= 1, got {v}"),
                )
            }
        },
    };
    let policy = match ctx
        .shift_defaults
        .with_json(&body, &["revision", "max_concurrent"])
    {
        Ok(policy) => policy,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    match ctx
        .control
        .start_rollout(revision, max_concurrent, policy)
        .await
    {
        Ok(rollout) => json(StatusCode::ACCEPTED, &rollout),
        Err(e) => control_error(e),
    }
}

/// Reads a bounded request body within `admin.request_timeout`, or returns the error response to
/// send. A client that stops sending mid-body gets 408 and the connection is closed, so it cannot
/// hold the connection and its buffered body indefinitely.
async fn read_body(ctx: &AdminContext, req: Request<Incoming>) -> Result<Bytes, AdminResponse> {
    let collect = Limited::new(req.into_body(), MAX_BODY).collect();
    let Ok(collected) = tokio::time::timeout(ctx.request_timeout, collect).await else {
        let mut resp = error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} (admin.request_timeout)",
                humantime::format_duration(ctx.request_timeout)
            ),
        );
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
        return Err(resp);
    };
    match collected {
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
