//! Starting and stopping a whole gateway: control plane, proxy listener and admin listener.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, AdminContext, AdminToken};
use crate::config::{Config, ShutdownConfig};
use crate::control::{self, ControlHandle};
use crate::proxy::{self, ProxyContext};
use crate::telemetry;
use crate::tls::{self, ServerTls, TlsError};

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
    /// The admin API would be reachable from other machines without a token.
    #[error("admin.listen {0} is not a loopback address: set admin.token_file so the admin API is not open to the network")]
    AdminExposed(SocketAddr),
    /// A certificate, key or CA file (`tls.*`, `upstream.ca_file`) could not be read or used; the
    /// message names the file.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The Kubernetes client could not be set up (`discovery.kubernetes`).
    #[error(transparent)]
    Kube(#[from] crate::discovery::kube::KubeError),
    /// A proxy worker thread or its runtime could not be started.
    #[error(transparent)]
    Workers(#[from] proxy::workers::StartError),
}

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    proxy_addr: SocketAddr,
    admin_addr: SocketAddr,
    control: ControlHandle,
    /// True once shutdown starts: `/ready` answers 503, then the proxy stops accepting.
    draining: watch::Sender<bool>,
    /// True once the proxy has drained: the admin API stops.
    stop: watch::Sender<bool>,
    proxy_task: JoinHandle<()>,
    admin_task: JoinHandle<()>,
    shutdown: ShutdownConfig,
    /// The listener's certificate, when it serves TLS.
    tls: Option<Arc<ServerTls>>,
    /// RayCluster watchers and the drain annotator (Kubernetes discovery).
    discovery_tasks: Vec<JoinHandle<()>>,
    /// The permits of `limits.max_connections`, one per open client connection.
    connections: Arc<tokio::sync::Semaphore>,
    max_connections: usize,
}

impl Gateway {
    /// Loads state, binds both listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Gateway, GatewayError> {
        if !config.admin.listen.ip().is_loopback() && config.admin.token_file.is_none() {
            return Err(GatewayError::AdminExposed(config.admin.listen));
        }
        let prometheus = telemetry::prometheus()?;
        let token = match &config.admin.token_file {
            Some(path) => AdminToken::from_file(path)?,
            None => AdminToken::none(),
        };
        tls::install_default_provider();
        let server_tls = match &config.tls {
            Some(cfg) => Some(Arc::new(ServerTls::new(cfg)?)),
            None => None,
        };
        let upstream_tls = tls::client_config(config.upstream.ca_file.as_deref())?;
        let bind = |what, addr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| GatewayError::Bind { what, addr, source })
        };
        // With per-core workers, one listening socket each (SO_REUSEPORT), registered with its
        // worker's poller.
        let bind_error = |source| GatewayError::Bind {
            what: "proxy",
            addr: config.listen,
            source,
        };
        let (proxy_listeners, workers) = match config.proxy_workers {
            0 => {
                let listener = proxy::workers::bind(config.listen, 1)
                    .and_then(|mut one| TcpListener::from_std(one.remove(0)))
                    .map_err(bind_error)?;
                (vec![listener], None)
            }
            n => {
                let workers = proxy::workers::Workers::start(n)?;
                let listeners = proxy::workers::bind(config.listen, n)
                    .map_err(bind_error)?
                    .into_iter()
                    .enumerate()
                    .map(|(i, listener)| workers.listener(i, listener))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bind_error)?;
                (listeners, Some(workers))
            }
        };
        let admin_listener = bind("admin", config.admin.listen).await?;
        let proxy_addr = local_addr(&proxy_listeners[0], "proxy", config.listen)?;
        let admin_addr = local_addr(&admin_listener, "admin", config.admin.listen)?;

        let config = Arc::new(config);
        // Probes of https:// clusters trust what requests trust.
        let kube_client = match &config.kubernetes {
            Some(kube_cfg) => Some(crate::discovery::kube::client(kube_cfg).await?),
            None => None,
        };
        let control = control::start(
            Arc::clone(&config),
            upstream_tls.clone(),
            kube_client.clone(),
        )
        .await?;
        let discovery_tasks = match (&config.kubernetes, kube_client) {
            (Some(kube_cfg), Some(client)) => {
                crate::discovery::kube::spawn(client, kube_cfg.clone(), control.clone())
            }
            _ => Vec::new(),
        };
        let (draining, draining_rx) = watch::channel(false);
        let (stop, stop_rx) = watch::channel(false);

        let proxy_ctx = Arc::new(ProxyContext::new(
            Arc::clone(control.table()),
            &config,
            upstream_tls,
        ));
        tokio::spawn(proxy::prune_idle_connections(
            Arc::downgrade(control.table()),
            (config.upstream.idle_timeout / 2).max(std::time::Duration::from_millis(100)),
        ));
        let admin_ctx = Arc::new(AdminContext {
            control: control.clone(),
            prometheus,
            token,
            split_key: config.split_key.clone(),
            shift_defaults: config.shift_defaults.clone(),
            shutting_down: draining_rx.clone(),
            request_timeout: config.admin.request_timeout,
            removed_series_ttl: config.admin.removed_series_ttl,
        });
        // The proxy stops accepting `ready_delay` after /ready turned 503, so load balancers that
        // watch /ready stop sending first.
        let (proxy_stop_tx, proxy_stop) = watch::channel(false);
        let ready_delay = config.shutdown.ready_delay;
        tokio::spawn(async move {
            let mut draining = draining_rx;
            stopped(&mut draining).await;
            tokio::time::sleep(ready_delay).await;
            let _ = proxy_stop_tx.send(true);
        });
        // One connection limit for all workers.
        let connections = Arc::new(tokio::sync::Semaphore::new(config.limits.max_connections));
        let serve = |listener, worker| {
            proxy::server::serve(
                listener,
                Arc::clone(&proxy_ctx),
                proxy_stop.clone(),
                config.limits.clone(),
                config.shutdown.drain_timeout,
                server_tls.as_ref().map(|t| t.server_config()),
                proxy::server::Shared {
                    connections: Arc::clone(&connections),
                    worker,
                },
            )
        };
        let drain = config.shutdown.drain_timeout;
        let proxy_task = match workers {
            None => {
                let serving = serve(proxy_listeners.into_iter().next().expect("one"), None);
                tokio::spawn(async move {
                    if let Some(deadline) = serving.await {
                        proxy::server::drain_untracked(&proxy_ctx, deadline, drain).await;
                    }
                })
            }
            Some(workers) => {
                let serving: Vec<_> = proxy_listeners
                    .into_iter()
                    .enumerate()
                    .map(|(i, listener)| {
                        let gauge = telemetry::worker_connections(i);
                        workers.spawn(i, serve(listener, Some((i, gauge))))
                    })
                    .collect();
                // The workers stop once every one has drained, whether the gateway is shut down
                // or dropped (which also starts the drain).
                tokio::spawn(async move {
                    let mut drained = Vec::new();
                    for (index, worker) in serving.into_iter().enumerate() {
                        drained.push(worker.await.unwrap_or_else(|e| {
                            tracing::error!(worker = index, error = %e, "proxy worker failed");
                            None
                        }));
                    }
                    // The earliest deadline; none when a worker's drain timed out or it failed.
                    let deadline = drained.into_iter().collect::<Option<Vec<_>>>();
                    if let Some(deadline) = deadline.and_then(|d| d.into_iter().min()) {
                        proxy::server::drain_untracked(&proxy_ctx, deadline, drain).await;
                    }
                    workers.stop().await;
                })
            }
        };
        if let Some(tls) = &server_tls {
            tls.spawn_watcher(stop_rx.clone());
        }
        let admin_task = tokio::spawn(admin::serve(admin_listener, admin_ctx, stop_rx));
        tracing::info!(%proxy_addr, %admin_addr, tls = server_tls.is_some(), clusters = config.clusters.len(), "rayshift started");
        Ok(Gateway {
            proxy_addr,
            admin_addr,
            control,
            draining,
            stop,
            proxy_task,
            admin_task,
            shutdown: config.shutdown.clone(),
            tls: server_tls,
            discovery_tasks,
            connections,
            max_connections: config.limits.max_connections,
        })
    }

    /// `https` when the proxy listener serves TLS (`tls:`), else `http`.
    pub fn proxy_scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// Re-reads the TLS certificate and key files (what SIGHUP does). New connections get the new
    /// certificate; open ones keep theirs. On error the current certificate stays; the error names
    /// the file. Counted in `rayshift_tls_reloads_total`. [`TlsError::NotConfigured`] without `tls:`.
    pub fn reload_tls(&self) -> Result<(), TlsError> {
        match &self.tls {
            Some(tls) => tls.reload(),
            None => Err(TlsError::NotConfigured),
        }
    }

    /// The listener's TLS (certificate resolver, files), when configured.
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Address of the client-traffic listener (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// Client connections open now (each holds one of `limits.max_connections`), on every worker.
    pub fn client_connections(&self) -> usize {
        self.max_connections - self.connections.available_permits()
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

    /// Shuts down gracefully: `/ready` answers 503, after `shutdown.ready_delay` the proxy stops
    /// accepting, open requests, streams and WebSockets get up to `shutdown.drain_timeout` to
    /// finish (HTTP/2 clients get GOAWAY), then the admin API stops, and the control task folds the
    /// state journal into the state file and stops (shifts stop advancing; nothing is written after
    /// the fold).
    pub async fn shutdown(self) {
        let _ = self.draining.send(true);
        tracing::info!(
            ready_delay = ?self.shutdown.ready_delay,
            drain_timeout = ?self.shutdown.drain_timeout,
            "shutting down: draining client connections"
        );
        let _ = self.proxy_task.await;
        let _ = self.stop.send(true);
        for task in &self.discovery_tasks {
            task.abort();
        }
        let _ = self.admin_task.await;
        self.control.stop().await;
        tracing::info!("shut down");
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
