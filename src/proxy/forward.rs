//! One request through the gateway: route, pick a cluster, forward, stream the response back.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::uri::{PathAndQuery, Uri};
use http::{header, HeaderValue, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::cluster::{Cluster, InFlight};
use crate::discovery::probe::describe_client_error;
use crate::proxy::body::{local_response, ProxyBody};
use crate::proxy::{headers, split_key, ProxyContext};
use crate::telemetry;

/// Label used for `cluster`/`app` when the gateway answered without a cluster.
const NONE: &str = "none";

/// Handles one downstream request. Never fails: every problem becomes a response with a status.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, std::convert::Infallible> {
    let start = Instant::now();

    // Route with one snapshot load; keep only Arcs of what the rest of the request needs, so the
    // snapshot is not pinned while the request waits on the network.
    let (cluster, app) = {
        let snap = ctx.table.load();
        let path = req.uri().path();
        let Some(hit) = snap.table.lookup(path) else {
            count(NONE, NONE, NONE, StatusCode::NOT_FOUND);
            let msg = format!(
                "Path '{path}' not found: no application's route prefix matches it (GET /v1/state on the admin port lists them).\n"
            );
            return Ok(local_response(StatusCode::NOT_FOUND, msg));
        };
        let x = split_key::split_hash(&ctx.split_key, req.headers(), peer.ip())
            .unwrap_or_else(|| fastrand::u64(..));
        match hit.split.pick(x) {
            Some(id) => (Arc::clone(snap.cluster(id)), Arc::clone(&hit.app.name)),
            None => {
                let shard = snap.table.shard_name(hit.shard);
                count(&hit.app.name, shard, NONE, StatusCode::SERVICE_UNAVAILABLE);
                let msg = format!(
                    "no ready cluster for application '{}' in shard '{shard}'\n",
                    hit.app.name
                );
                return Ok(local_response(StatusCode::SERVICE_UNAVAILABLE, msg));
            }
        }
    };

    let upgrade = headers::is_upgrade_request(req.headers());
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let request_id = prepare(&mut parts, &cluster, peer, upgrade, ctx.proto);

    let in_flight = cluster.enter();
    let result = ctx.client.request(Request::from_parts(parts, body)).await;
    let elapsed = start.elapsed();
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            cluster.stats.record_failure(elapsed);
            let kind = if e.is_connect() { "connect" } else { "request" };
            metrics::counter!(
                telemetry::UPSTREAM_ERRORS_TOTAL,
                "cluster" => cluster.name.to_string(),
                "kind" => kind
            )
            .increment(1);
            let cause = describe_client_error(&e);
            tracing::debug!(cluster = %cluster.name, %cause, "upstream request failed");
            count(&app, &cluster.shard, &cluster.name, StatusCode::BAD_GATEWAY);
            let msg = format!("upstream cluster '{}' failed: {cause}\n", cluster.name);
            let mut resp = local_response(StatusCode::BAD_GATEWAY, msg);
            resp.headers_mut()
                .insert(&headers::X_REQUEST_ID, request_id);
            return Ok(resp);
        }
    };

    let status = resp.status();
    cluster.stats.record_response(status.as_u16(), elapsed);
    cluster.duration.record(elapsed.as_secs_f64());
    count(&app, &cluster.shard, &cluster.name, status);

    if status == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream) = downstream_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(tunnel(downstream, upstream, in_flight));
            let (mut parts, _) = resp.into_parts();
            headers::remove_hop_by_hop(&mut parts.headers, true);
            return Ok(Response::from_parts(parts, ProxyBody::empty()));
        }
    }

    let (mut parts, body) = resp.into_parts();
    headers::remove_hop_by_hop(&mut parts.headers, false);
    if !parts.headers.contains_key(&headers::X_REQUEST_ID) {
        parts.headers.insert(&headers::X_REQUEST_ID, request_id);
    }
    Ok(Response::from_parts(
        parts,
        ProxyBody::Upstream {
            body,
            in_flight: Some(in_flight),
        },
    ))
}

/// Rewrites the request head for the upstream hop; returns the request id.
fn prepare(
    parts: &mut http::request::Parts,
    cluster: &Cluster,
    peer: SocketAddr,
    upgrade: bool,
    proto: &'static str,
) -> HeaderValue {
    // HTTP/2 clients send :authority instead of Host; Serve (HTTP/1.1) wants a Host header.
    let host = parts.headers.get(header::HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    headers::remove_hop_by_hop(&mut parts.headers, upgrade);
    headers::set_forwarded(&mut parts.headers, peer.ip(), proto, host.clone());
    if let Some(host) = host {
        parts.headers.insert(header::HOST, host);
    }
    let request_id = headers::ensure_request_id(&mut parts.headers);
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    if let Ok(uri) = Uri::builder()
        .scheme(cluster.scheme.clone())
        .authority(cluster.authority.clone())
        .path_and_query(path)
        .build()
    {
        parts.uri = uri;
    }
    parts.version = Version::HTTP_11;
    request_id
}

/// Copies bytes both ways between an upgraded client connection and an upgraded upstream one.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    in_flight: InFlight,
) {
    let (down, up) = match tokio::try_join!(downstream, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(cluster = %in_flight.cluster().name, error = %e, "upgrade failed");
            return;
        }
    };
    let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(cluster = %in_flight.cluster().name, error = %e, "upgraded connection ended");
    }
    drop(in_flight);
}

/// Counts a response in `rayshift_requests_total`.
fn count(app: &str, shard: &str, cluster: &str, status: StatusCode) {
    metrics::counter!(
        telemetry::REQUESTS_TOTAL,
        "app" => app.to_string(),
        "shard" => shard.to_string(),
        "cluster" => cluster.to_string(),
        "code" => status_label(status)
    )
    .increment(1);
}

/// A `'static` label for a status code, without allocating per request.
fn status_label(status: StatusCode) -> &'static str {
    static LABELS: OnceLock<Vec<&'static str>> = OnceLock::new();
    let labels = LABELS.get_or_init(|| {
        (0..1000u16)
            .map(|c| &*Box::leak(format!("{c}").into_boxed_str()))
            .collect()
    });
    labels
        .get(status.as_u16() as usize)
        .copied()
        .unwrap_or("other")
}
