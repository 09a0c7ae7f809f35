//! Starting and stopping a whole gateway: control plane, proxy listener and admin listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminContext, AdminToken};
use crate::config::Config;
use crate::control::{self, ControlHandle};
use crate::proxy::{self, ProxyContext};
use crate::telemetry;

/// How long open client connections may finish after shutdown starts.
const DRAIN: Duration = Duration::from_secs(30);

/// Why the gateway could not start. Nothing is served when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A listener could not be bound.
    #[error("binding {what} listener on {addr}: {source}")]
    Bind {
        /// `proxy` or `admin`.
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The admin token file could not be used.
    #[error(transparent)]
    Token(#[from] admin::auth::TokenError),
    /// The control plane could not start (state file, cluster URLs).
    #[error(transparent)]
    Control(#[from] control::StartError),
    /// Metrics could not be set up.
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    control: ControlHandle,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Gateway {
    /// Loads state, binds both listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        let prometheus = telemetry::prometheus()?;
        let token = match &config.admin.token_file {
            Some(path) => AdminToken::from_file(path)?,
            None => AdminToken::none(),
        };
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { what, addr, source })
        };
        let proxy_listener = bind("proxy", config.listen).await?;
        let admin_listener = bind("admin", config.admin.listen).await?;
        let proxy_addr = local_addr(&proxy_listener, "proxy", config.listen)?;
        let admin_addr = local_addr(&admin_listener, "admin", config.admin.listen)?;

        let config = Arc::new(config);
        let control = control::start(Arc::clone(&config))?;
        let (shutdown, shutdown_rx) = watch::channel(false);

        let proxy_ctx = Arc::new(ProxyContext::new(
            Arc::clone(control.table()),
            &config.upstream,
            config.split_key.clone(),
        ));
        let admin_ctx = Arc::new(AdminContext {
            control: control.clone(),
            prometheus,
            token,
            split_key: config.split_key.clone(),
            shift_defaults: config.shift_defaults.clone(),
            shutting_down: shutdown_rx.clone(),
        });
        let tasks = vec![
            tokio::spawn(proxy::server::serve(
                proxy_listener,
                proxy_ctx,
                shutdown_rx.clone(),
                DRAIN,
            )),
            tokio::spawn(admin::serve(admin_listener, admin_ctx, shutdown_rx)),
        ];
        tracing::info!(%proxy_addr, %admin_addr, clusters = config.clusters.len(), "rayshift started");
        Ok(Gateway {
            proxy_addr,
            admin_addr,
            control,
            shutdown,
            tasks,
        })
    }

    /// Address of the client-traffic listener (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The control plane.
    pub fn control(&self) -> &ControlHandle {
        &self.control
    }

    /// Waits until the first routing table with probe results is published.
    pub async fn wait_ready(&self) {
        self.control.wait_ready().await;
    }

    /// Stops accepting, lets open connections finish (bounded), and returns when both listeners are done.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

fn local_addr(
    listener: &TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, GatewayError> {
    listener
        .local_addr()
        .map_err(|source| GatewayError::Bind { what, addr, source })
}

/// Resolves once `shutdown` turns true (or its sender is gone).
pub(crate) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Drop the borrow guard inside, so callers' futures stay Send.
    let _ = shutdown.wait_for(|s| *s).await.map(|_| ());
}
