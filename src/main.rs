//! The `rayshift` binary: parse the command line, load config, run.

mod cli;

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use rayshift::demo::{self, DemoOptions};
use rayshift::{Config, Gateway};

use cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    rayshift::telemetry::init_logging();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} shards, {} clusters, {} apps)",
                    config.display(),
                    cfg.shards.len(),
                    cfg.clusters.len(),
                    cfg.apps.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{}: {} problem(s):", config.display(), errors.0.len());
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::FAILURE
            }
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{}: invalid config, not starting:", config.display());
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            report(runtime().and_then(|rt| rt.block_on(run(cfg))))
        }
        Command::Demo {
            listen,
            admin_listen,
        } => report(runtime().and_then(|rt| {
            rt.block_on(run_demo(DemoOptions {
                listen,
                admin_listen,
            }))
        })),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rayshift: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let gateway = Gateway::start(cfg).await?;
    // Machine-readable lines: tests and scripts read the bound addresses from here (port 0 works).
    println!(
        "rayshift: proxy listening on http://{}",
        gateway.proxy_addr()
    );
    println!(
        "rayshift: admin listening on http://{}",
        gateway.admin_addr()
    );
    std::io::stdout().flush().ok();
    shutdown_signal().await?;
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

async fn run_demo(opts: DemoOptions) -> anyhow::Result<()> {
    let demo = demo::start(&opts).await?;
    println!("{}", demo.banner());
    std::io::stdout().flush().ok();
    shutdown_signal().await?;
    demo.stop().await;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    Ok(())
}
