//! The accept loop: one tokio task per connection, served by hyper's HTTP/1.1
//! connection with keep-alive and upgrades.

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::handlers;
use crate::state::Shared;

/// Accepts connections until `stop` turns `true` (or its sender is gone),
/// then closes the listener and aborts every connection task.
pub(crate) async fn accept_loop(
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut http = http1::Builder::new();
    http.keep_alive(true);
    let mut conns = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.wait_for(|stopped| *stopped) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let _ = stream.set_nodelay(true);
                let shared = Arc::clone(&shared);
                let conn = http
                    .serve_connection(
                        TokioIo::new(stream),
                        service_fn(move |req| handlers::handle(Arc::clone(&shared), req)),
                    )
                    .with_upgrades();
                conns.spawn(async move {
                    if let Err(err) = conn.await {
                        tracing::debug!(%err, "serve-stub: connection ended with an error");
                    }
                });
            }
            Err(err) => {
                if *stop.borrow() {
                    break;
                }
                // E.g. out of file descriptors: back off instead of spinning.
                tracing::warn!(%err, "serve-stub: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}
