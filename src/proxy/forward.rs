//! One request through the gateway: route, pick a cluster, forward (retrying where safe), stream the
//! response back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Uri};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::cluster::{Cluster, InFlight};
use crate::proxy::body::{local_response, ProxyBody};
use crate::proxy::pool::{self, Sender};
use crate::proxy::request_body::{BodyTimeout, BodyTooLarge, ClientBodyError, RequestBody};
use crate::proxy::{headers, split_key, tunnel, Open, ProxyContext};
use crate::telemetry;

/// Label used for `cluster`/`app` when the gateway answered without a cluster.
pub(crate) const NONE: &str = "none";

/// Where a request goes.
struct Route {
    cluster: Arc<Cluster>,
    app: Arc<str>,
    /// The split value used for the pick (reused, shifted, for a retry).
    x: u64,
    /// The split has another cluster a retry could go to.
    alternatives: bool,
}

/// How one attempt ended without a response.
pub(crate) enum Failure {
    /// The cluster did not answer within `upstream.response_timeout`.
    Timeout,
    /// The client's body went over `limits.max_body_bytes`.
    TooLarge(u64),
    /// The client paused its body longer than `limits.body_read_timeout`.
    BodyTimeout(Duration),
    /// The client's body failed on the client's side (it went away mid-upload, reset its stream,
    /// or sent malformed chunks).
    ClientBody(String),
    /// The attempt failed (connect error, reset, ...).
    Error { connect: bool, cause: String },
}

/// Handles one downstream request. Never fails: every problem becomes a response with a status.
///
/// `peer_value` is the client's address as a header value ([`headers::peer_value`], made once per
/// connection).
pub async fn handle(
    ctx: Arc<ProxyContext>,
    peer: SocketAddr,
    peer_value: HeaderValue,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let start = Instant::now();

    if req.method() == Method::CONNECT {
        // A tunnel to wherever the client names: not what a gateway to Serve applications is for.
        count(NONE, NONE, NONE, StatusCode::NOT_IMPLEMENTED);
        let msg = "CONNECT is not supported: the gateway forwards requests to Ray Serve \
                   applications and opens no tunnels\n";
        return Ok(local_response(StatusCode::NOT_IMPLEMENTED, msg.into()));
    }
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        // The gateway and Serve could read different hosts (RFC 9112 section 3.2: answer 400).
        count(NONE, NONE, NONE, StatusCode::BAD_REQUEST);
        let msg = "the request has more than one Host header\n";
        return Ok(local_response(StatusCode::BAD_REQUEST, msg.into()));
    }
    // RFC 9112 section 3.2: an HTTP/1.1 request names its host, and a `Host` field holds a host.
    let host = req.headers().get(header::HOST);
    if host.is_some_and(|h| !headers::is_host(h.as_bytes()))
        || (host.is_none() && req.version() == Version::HTTP_11)
    {
        count(NONE, NONE, NONE, StatusCode::BAD_REQUEST);
        let msg = match host {
            Some(_) => "the Host header is not a host[:port]\n",
            None => "an HTTP/1.1 request needs a Host header\n",
        };
        return Ok(local_response(StatusCode::BAD_REQUEST, msg.into()));
    }
    if let Err((status, msg)) = headers::check_transfer_codings(req.headers()) {
        count(NONE, NONE, NONE, status);
        return Ok(local_response(status, msg));
    }
    // hyper parsed `content-length` already: the body's exact size hint is it.
    if let (Some(limit), Some(len)) = (ctx.max_body_bytes, req.body().size_hint().exact()) {
        if len > limit {
            count(NONE, NONE, NONE, StatusCode::PAYLOAD_TOO_LARGE);
            let msg = format!("request body of {len} bytes is over the limit of {limit} bytes\n");
            return Ok(local_response(StatusCode::PAYLOAD_TOO_LARGE, msg));
        }
    }
    let route = match route(&ctx, &req, peer) {
        Ok(route) => route,
        Err(resp) => return Ok(resp),
    };
    // Requests answered above, before routing, fund no retries (as on the direct path).
    ctx.retry.deposit();

    // Only HTTP/1.1 switches protocols: an HTTP/1.0 request's `Upgrade` is dropped as hop-by-hop
    // (RFC 9110 section 7.8), and a 101 to it would be refused as unasked for.
    let upgrade =
        req.version() == http::Version::HTTP_11 && headers::is_upgrade_request(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let request_id = prepare(&mut parts, &peer_value, upgrade, ctx.proto);
    if !body.is_end_stream()
        && body.size_hint().exact().is_none()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        // A body of unknown length (chunked from an HTTP/1.1 client, DATA frames without
        // content-length from an HTTP/2 one) goes upstream chunked. Without the header hyper
        // would send a GET's or HEAD's body as empty, and Serve would answer another request.
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let Some(mut in_flight) = route.cluster.enter(ctx.max_requests_per_cluster) else {
        let msg = overflow(&ctx, &route.cluster, &route.app);
        return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, msg, request_id));
    };
    // A bodiless request can be sent again; keep what a retry needs (only then: it costs a copy).
    let retry_head =
        (ctx.retries && route.alternatives && !upgrade && body.is_end_stream()).then(|| {
            (
                parts.method.clone(),
                parts.uri.path_and_query().cloned(),
                parts.headers.clone(),
            )
        });
    let idempotent = matches!(
        parts.method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );

    let mut cluster = route.cluster;
    set_upstream(&mut parts, &cluster);
    let (body, request_sent) = RequestBody::new(body, ctx.max_body_bytes, ctx.body_read_timeout);
    // When the attempt whose outcome is recorded began: a retried request's time on the first
    // cluster is not the second one's (shift analysis judges a target by it).
    let mut attempt_start = start;
    let mut outcome = send(&ctx, &cluster, Request::from_parts(parts, body), upgrade).await;

    if let (Err(Failure::Error { connect, .. }), Some((method, path, headers))) =
        (&outcome, &retry_head)
    {
        // Safe: the request never reached the cluster (connect failure), or it is idempotent and
        // had no body; and no response has been sent downstream yet.
        if *connect || idempotent {
            if let Some((other, entered)) = retry_target(
                &ctx,
                &route.app,
                &cluster,
                path.as_ref().map_or("/", |p| p.path()),
                route.x,
            ) {
                if ctx.retry.try_withdraw() {
                    if let Err(failure) = &outcome {
                        record_retry(&cluster, &other, failure, start.elapsed());
                    }
                    cluster = other;
                    in_flight = entered;
                    let mut retry = Request::new(RequestBody::Empty);
                    *retry.method_mut() = method.clone();
                    *retry.headers_mut() = headers.clone();
                    *retry.uri_mut() = origin_form(path.as_ref());
                    *retry.version_mut() = Version::HTTP_11;
                    ensure_host(retry.headers_mut(), &cluster);
                    attempt_start = Instant::now();
                    outcome = send(&ctx, &cluster, retry, false).await;
                } else {
                    metrics::counter!(telemetry::RETRY_BUDGET_EXHAUSTED_TOTAL).increment(1);
                }
            }
        }
    }

    let elapsed = attempt_start.elapsed();
    // A response coded otherwise than chunked (hyper takes the chunks off; the coding's name
    // would go with the field while the body stays coded) is the cluster's failure.
    let outcome =
        outcome.and_then(
            |(resp, conn)| match headers::check_transfer_codings(resp.headers()) {
                Ok(()) => Ok((resp, conn)),
                Err((_, msg)) => Err(Failure::Error {
                    connect: false,
                    cause: format!("response {}", msg.trim_end()),
                }),
            },
        );
    let (mut resp, conn) = match outcome {
        Ok(sent) => sent,
        Err(failure) => {
            let (status, msg) = count_failure(&cluster, &route.app, &failure, elapsed);
            return Ok(answer(status, msg, request_id));
        }
    };

    let status = resp.status();
    // A 204 or 304 has no body, but one that declares a body may still send it: those bytes
    // would be read as the connection's next answer, so the connection is not reused.
    let reusable = !(matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED)
        && declares_body(resp.headers()));
    cluster.stats.record_response(status.as_u16(), elapsed);
    cluster.duration.record(elapsed.as_secs_f64());
    cluster
        .requests
        .increment(&route.app, &cluster.shard, &cluster.name, status);

    // `send` lets a 101 through only to a request that asked for the upgrade.
    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            // The connection becomes the tunnel.
            drop(conn);
            let upstream = hyper::upgrade::on(&mut resp);
            let open = Open::new(&ctx.open_tunnels);
            tokio::spawn(tunnel::run(
                downstream,
                upstream,
                in_flight,
                open,
                ctx.tunnel_idle_timeout,
            ));
            let (mut parts, _) = resp.into_parts();
            headers::remove_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
    }

    let (mut parts, body) = resp.into_parts();
    headers::clean_response(&mut parts.headers);
    headers::set_response_request_id(&mut parts.headers, request_id);
    let conn = reusable.then_some(conn);
    Ok(Response::from_parts(
        parts,
        ProxyBody::upstream(body, in_flight, conn, request_sent),
    ))
}

/// The head announces a body: `transfer-encoding`, or a `content-length` other than 0.
fn declares_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii().iter().any(|&b| b != b'0'))
}

/// The gateway's own answer to a request that has its id (`x-request-id`) already.
fn answer(status: StatusCode, msg: String, request_id: HeaderValue) -> Response<ProxyBody> {
    let mut resp = local_response(status, msg);
    headers::set_response_request_id(resp.headers_mut(), request_id);
    resp
}

/// Finds the app and picks a cluster with one snapshot load; answers 404/503 itself.
#[allow(clippy::result_large_err)]
fn route(
    ctx: &ProxyContext,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<Route, Response<ProxyBody>> {
    // Keep only Arcs of what the rest of the request needs, so the snapshot is not pinned while the
    // request waits on the network.
    let snap = ctx.table.load();
    let path = req.uri().path();
    let Some(hit) = snap.table.lookup(&super::route_path(path)) else {
        count(NONE, NONE, NONE, StatusCode::NOT_FOUND);
        let msg = format!(
            "Path '{path}' not found: no application's route prefix matches it (GET /v1/state on the admin port lists them).\n"
        );
        return Err(local_response(StatusCode::NOT_FOUND, msg));
    };
    let key = split_key::split_hash(&ctx.split_key, req.headers(), peer.ip());
    let (picked, x) = super::pick(hit.split, key);
    match picked {
        Some(id) => Ok(Route {
            cluster: Arc::clone(snap.cluster(id)),
            app: Arc::clone(&hit.app.name),
            x,
            alternatives: hit.split.len() > 1,
        }),
        None => {
            let shard = snap.table.shard_name(hit.shard);
            count(&hit.app.name, shard, NONE, StatusCode::SERVICE_UNAVAILABLE);
            let msg = format!(
                "no ready cluster for application '{}' in shard '{shard}'\n",
                hit.app.name
            );
            Err(local_response(StatusCode::SERVICE_UNAVAILABLE, msg))
        }
    }
}

/// Another cluster of the app's split than `failed`, from the current snapshot, with the request
/// entered on it; `None` also when that cluster has no room (`upstream.max_requests_per_cluster`):
/// the failed attempt's answer stands.
pub(crate) fn retry_target(
    ctx: &ProxyContext,
    app: &str,
    failed: &Arc<Cluster>,
    path: &str,
    x: u64,
) -> Option<(Arc<Cluster>, InFlight)> {
    let snap = ctx.table.load();
    let hit = snap.table.lookup(&super::route_path(path))?;
    if *hit.app.name != *app {
        return None;
    }
    let failed_id = snap.clusters.iter().position(|c| Arc::ptr_eq(c, failed))? as u32;
    let id = hit.split.pick_excluding(x.rotate_left(32), failed_id)?;
    let other = snap.cluster(id);
    let entered = other.enter(ctx.max_requests_per_cluster)?;
    Some((Arc::clone(other), entered))
}

/// Counts a request answered 503 because its cluster had no room (`upstream.max_requests_per_cluster`
/// in flight) in `rayshift_upstream_overflow_total` and in `rayshift_requests_total` (as answered
/// by the gateway: cluster `none`), and returns the body of the 503. The cluster never saw the
/// request, so nothing is counted against it.
pub(crate) fn overflow(ctx: &ProxyContext, cluster: &Cluster, app: &str) -> String {
    cluster.overflow.increment(1);
    count(app, &cluster.shard, NONE, StatusCode::SERVICE_UNAVAILABLE);
    tracing::debug!(cluster = %cluster.name, "cluster at upstream.max_requests_per_cluster: request shed");
    format!(
        "cluster '{}' already has {} requests in flight (upstream.max_requests_per_cluster); try again later\n",
        cluster.name, ctx.max_requests_per_cluster
    )
}

/// One attempt: send on a pooled connection and wait for the response headers (bounded by
/// `upstream.response_timeout`). Returns the response and its connection.
///
/// A `101` to a request that asked for no upgrade (`upgrade` false) is a failed attempt, retried
/// where a failure may be (as on the direct path): what follows it on the connection is no longer
/// HTTP, so the connection is dropped.
async fn send(
    ctx: &ProxyContext,
    cluster: &Cluster,
    req: Request<RequestBody>,
    upgrade: bool,
) -> Result<(Response<Incoming>, Sender), Failure> {
    let sent = cluster
        .pool
        .send(&ctx.connector, ctx.connect_timeout, cluster, req);
    match tokio::time::timeout(ctx.response_timeout, sent).await {
        Err(_) => Err(Failure::Timeout),
        Ok(Ok((resp, _conn))) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrade => {
            tracing::debug!(cluster = %cluster.name, "unexpected 101 Switching Protocols");
            Err(Failure::Error {
                connect: false,
                cause: "unexpected 101 Switching Protocols".into(),
            })
        }
        Ok(Ok(sent)) => Ok(sent),
        Ok(Err(e)) => {
            if let Some(too_large) = find_source::<BodyTooLarge>(&e) {
                return Err(Failure::TooLarge(too_large.limit));
            }
            if let Some(slow) = find_source::<BodyTimeout>(&e) {
                return Err(Failure::BodyTimeout(slow.timeout));
            }
            if let Some(client) = find_source::<ClientBodyError>(&e) {
                return Err(Failure::ClientBody(client.source.to_string()));
            }
            let cause = pool::describe(&e);
            tracing::debug!(cluster = %cluster.name, %cause, "upstream request failed");
            Err(Failure::Error {
                connect: e.is_connect(),
                cause,
            })
        }
    }
}

/// Records a failed attempt (stats, error metrics) and counts the response the client gets for it;
/// returns the status and body to answer with.
pub(crate) fn count_failure(
    cluster: &Cluster,
    app: &str,
    failure: &Failure,
    elapsed: Duration,
) -> (StatusCode, String) {
    let (status, msg) = record_failure(cluster, failure, elapsed);
    cluster
        .requests
        .increment(app, &cluster.shard, &cluster.name, status);
    (status, msg)
}

/// Counts a retry of the attempt that failed on `from` (connect failure or reset) on `to`, and
/// records that attempt against `from`: the client never sees its answer, so it is not a response.
pub(crate) fn record_retry(from: &Cluster, to: &Cluster, failure: &Failure, elapsed: Duration) {
    let reason = match failure {
        Failure::Error { connect: true, .. } => "connect",
        _ => "reset",
    };
    metrics::counter!(telemetry::RETRIES_TOTAL, "cluster" => from.name.to_string(), "reason" => reason)
        .increment(1);
    tracing::debug!(from = %from.name, to = %to.name, reason, "retrying on another cluster");
    record_failure(from, failure, elapsed);
}

/// Records a failed attempt against its cluster (stats, error metrics), without counting a
/// response; returns the status and body a client would be answered with.
pub(crate) fn record_failure(
    cluster: &Cluster,
    failure: &Failure,
    elapsed: Duration,
) -> (StatusCode, String) {
    let (status, kind, msg) = match failure {
        Failure::TooLarge(limit) => (
            StatusCode::PAYLOAD_TOO_LARGE,
            None,
            format!("request body is over the limit of {limit} bytes\n"),
        ),
        Failure::BodyTimeout(timeout) => (
            StatusCode::REQUEST_TIMEOUT,
            None,
            format!(
                "no request body data for {} (limits.body_read_timeout)\n",
                humantime::format_duration(*timeout)
            ),
        ),
        Failure::ClientBody(cause) => (
            StatusCode::BAD_REQUEST,
            None,
            format!("the request body ended early on the client's side: {cause}\n"),
        ),
        Failure::Timeout => (
            StatusCode::GATEWAY_TIMEOUT,
            Some("timeout"),
            format!(
                "upstream cluster '{}' did not answer in time\n",
                cluster.name
            ),
        ),
        Failure::Error { connect, cause } => (
            StatusCode::BAD_GATEWAY,
            Some(if *connect { "connect" } else { "request" }),
            format!("upstream cluster '{}' failed: {cause}\n", cluster.name),
        ),
    };
    if let Some(kind) = kind {
        // The client's body (too large, too slow, abandoned) is not the cluster's fault; everything
        // else counts against it.
        cluster.stats.record_failure(elapsed);
        metrics::counter!(telemetry::UPSTREAM_ERRORS_TOTAL, "cluster" => cluster.name.to_string(), "kind" => kind)
            .increment(1);
    }
    (status, msg)
}

/// The first error of type `E` in `e`'s source chain.
fn find_source<'a, E: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a E> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// Rewrites the request head for the upstream hop (cluster-independent parts); returns the request id.
fn prepare(
    parts: &mut http::request::Parts,
    peer: &HeaderValue,
    upgrade: bool,
    proto: &'static str,
) -> HeaderValue {
    // HTTP/2 clients send :authority instead of Host; Serve (HTTP/1.1) wants a Host header. The
    // target's authority (`:authority`, an absolute-form target) names the host asked for, over a
    // `Host` field that may disagree with it (RFC 9113 section 8.3.1, RFC 9112 section 3.2.2).
    // `host[:port]`: any userinfo (`user:password@`) stays out of `Host` and `x-forwarded-host`.
    let authority = parts.uri.authority().and_then(|a| {
        let host_port = a.as_str().rsplit('@').next().unwrap_or_default();
        HeaderValue::from_str(host_port).ok()
    });
    let host = authority
        .clone()
        .or_else(|| parts.headers.get(header::HOST).cloned());
    if parts.version == Version::HTTP_2 {
        headers::join_cookies(&mut parts.headers);
    }
    headers::remove_hop_by_hop(&mut parts.headers, upgrade);
    headers::set_forwarded(&mut parts.headers, peer, proto, host);
    if let Some(authority) = authority {
        parts.headers.insert(header::HOST, authority);
    }
    headers::ensure_request_id(&mut parts.headers)
}

/// Makes the request one for `cluster`'s connection: origin-form URI (`/path?query`, as an
/// HTTP/1.1 server expects; HTTP/2 and absolute-form requests carry scheme and authority), HTTP/1.1,
/// and a `Host` header.
fn set_upstream(parts: &mut http::request::Parts, cluster: &Cluster) {
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        parts.uri = origin_form(parts.uri.path_and_query());
    }
    parts.version = Version::HTTP_11;
    ensure_host(&mut parts.headers, cluster);
}

/// `/path?query` as a URI (`/` when there is no path).
fn origin_form(path: Option<&PathAndQuery>) -> Uri {
    Uri::from(
        path.cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    )
}

/// HTTP/1.1 requires `Host`: a client that sent none (HTTP/1.0) gets the cluster's `host:port`.
fn ensure_host(headers: &mut HeaderMap, cluster: &Cluster) {
    if !headers.contains_key(header::HOST) {
        if let Ok(host) = HeaderValue::from_str(cluster.authority.as_str()) {
            headers.insert(header::HOST, host);
        }
    }
}

/// Counts a response in `rayshift_requests_total`.
pub(crate) fn count(app: &str, shard: &str, cluster: &str, status: StatusCode) {
    metrics::counter!(
        telemetry::REQUESTS_TOTAL,
        "app" => app.to_string(),
        "shard" => shard.to_string(),
        "cluster" => cluster.to_string(),
        "code" => telemetry::status_label(status)
    )
    .increment(1);
}
