//! `rayshift demo`: two Serve look-alike clusters (`blue` v1 and `green` v2) and a gateway in front,
//! with nothing else installed. The clusters come from the `serve-stub` crate, kept apart from the
//! gateway; the gateway itself is the real one, configured through the same YAML path as `run`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serve_stub::{ServeStub, StubConfig};

use crate::config::{Config, ConfigErrors};
use crate::gateway::{Gateway, GatewayError};

/// Where the demo listens.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Client traffic.
    pub listen: SocketAddr,
    /// Admin API.
    pub admin_listen: SocketAddr,
}

/// Why the demo could not start.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A demo cluster could not start.
    #[error("starting demo cluster {name}: {source}")]
    Cluster {
        /// The cluster.
        name: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The generated config was rejected (a bug).
    #[error("demo config: {0}")]
    Config(#[from] ConfigErrors),
    /// The state directory could not be created.
    #[error("creating demo state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The gateway could not start.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
}

/// A running demo.
#[derive(Debug)]
pub struct Demo {
    /// The gateway.
    pub gateway: Gateway,
    /// Cluster `blue`, revision v1.
    pub blue: ServeStub,
    /// Cluster `green`, revision v2.
    pub green: ServeStub,
    state_dir: PathBuf,
}

/// Apps both demo clusters serve.
const APPS: [(&str, &str); 2] = [("echo", "/echo"), ("summarize", "/summarize")];

/// Starts both demo clusters and the gateway (blue 80, green 20 in one shard).
pub async fn start(opts: &DemoOptions) -> Result<Demo, DemoError> {
    let apps: Vec<(String, String)> = APPS
        .iter()
        .map(|(a, p)| (a.to_string(), p.to_string()))
        .collect();
    let stub = |name: &'static str, revision: &str| {
        let cfg = StubConfig {
            name: name.into(),
            revision: revision.into(),
            apps: apps.clone(),
        };
        async move {
            ServeStub::start(cfg)
                .await
                .map_err(|source| DemoError::Cluster { name, source })
        }
    };
    let blue = stub("blue", "v1").await?;
    let green = stub("green", "v2").await?;
    let state_dir = std::env::temp_dir().join(format!("rayshift-demo-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).map_err(|source| DemoError::StateDir {
        path: state_dir.clone(),
        source,
    })?;
    let yaml = format!(
        r#"
listen: "{listen}"
admin:
  listen: "{admin}"
state_file: state.json
shards: [shard-0]
clusters:
  - name: blue
    shard: shard-0
    revision: v1
    serve_url: {blue}
    weight: 80
  - name: green
    shard: shard-0
    revision: v2
    serve_url: {green}
    weight: 20
probe:
  interval: 500ms
  timeout: 500ms
"#,
        listen = opts.listen,
        admin = opts.admin_listen,
        blue = blue.url(),
        green = green.url(),
    );
    let config = Config::from_yaml(&yaml, &state_dir)?;
    let gateway = Gateway::start(config).await?;
    gateway.wait_ready().await;
    Ok(Demo {
        gateway,
        blue,
        green,
        state_dir,
    })
}

impl Demo {
    /// What to print for the user: URLs and commands to try.
    pub fn banner(&self) -> String {
        let proxy = self.gateway.proxy_addr();
        let admin = self.gateway.admin_addr();
        format!(
            "rayshift demo is running.\n\
             \n  clusters   blue (v1) {blue}   green (v2) {green}   apps: /echo /summarize\
             \n  gateway    http://{proxy}\
             \n  admin      http://{admin}   (/v1/state, /metrics)\n\
             \nTry:\
             \n  curl http://{proxy}/echo                     # answered by blue (80%) or green (20%)\
             \n  curl http://{admin}/v1/state\
             \n  curl -X PUT http://{admin}/v1/shards/shard-0/weights -d '{{\"weights\": {{\"blue\": 0, \"green\": 100}}}}'\
             \n  curl -N 'http://{proxy}/echo/stream?n=5&interval_ms=300'   # a streamed (SSE) response\n\
             \nCtrl-C stops everything.\n",
            blue = self.blue.url(),
            green = self.green.url(),
        )
    }

    /// Stops the gateway and both clusters and removes the demo's state directory.
    pub async fn stop(self) {
        self.gateway.shutdown().await;
        self.blue.shutdown().await;
        self.green.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}
