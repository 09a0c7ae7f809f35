//! Command-line interface: `run`, `check`, `demo`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// rayshift: a zero-downtime gateway for Ray Serve (route, shard and shift traffic across RayClusters).
#[derive(Debug, Parser)]
#[command(name = "rayshift", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve client traffic with the given config file.
    Run {
        /// The YAML config file.
        #[arg(long, short, env = "RAYSHIFT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 when valid, else print every problem and exit 1.
    Check {
        /// The YAML config file.
        #[arg(long, short, env = "RAYSHIFT_CONFIG")]
        config: PathBuf,
    },
    /// Start two local Serve look-alike clusters (blue v1, green v2) and a gateway in front of them.
    Demo {
        /// Client-traffic address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Admin API address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin_listen: SocketAddr,
    },
}
