//! The `rayshift` binary: parse the command line, load config, run; or talk to a running
//! gateway's admin API (`status`, `shift`, `weights`, `rollout`).

mod cli;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rayshift::client::{
    format_rollout, format_state, watch_shift, weights_label, AdminClient, Outcome,
    ProgressPrinter, ShiftProgress, WatchOptions,
};
use rayshift::demo::{self, DemoOptions};
use rayshift::tls::TlsError;
use rayshift::{Config, Gateway};
use serde_json::{json, Value};

use cli::{
    AdminArgs, Cli, Command, RolloutCommand, RolloutControlArgs, ShardArgs, ShiftCommand,
    WeightsCommand,
};

fn main() -> ExitCode {
    // A usage error exits 1 like any refused command (clap's own 2 means "rolled back" here).
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
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
            let mut cfg = match Config::load(&config) {
                Ok(cfg) => cfg,
                Err(errors) => {
                    eprintln!("{}: invalid config, not starting:", config.display());
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::FAILURE;
                }
            };
            report(runtime().and_then(|(rt, workers)| {
                cfg.proxy_workers = workers;
                rt.block_on(run(cfg))
            }))
        }
        Command::Demo {
            listen,
            admin_listen,
            shift,
        } => report(runtime().and_then(|(rt, proxy_workers)| {
            rt.block_on(run_demo(
                DemoOptions {
                    listen,
                    admin_listen,
                    proxy_workers,
                },
                shift,
            ))
        })),
        command @ (Command::Status { .. }
        | Command::Shift(_)
        | Command::Weights(_)
        | Command::Rollout(_)) => {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the tokio runtime")
                .and_then(|rt| rt.block_on(client_command(command)));
            match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("rayshift: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// The tokio runtime and the number of per-core proxy workers (`Config::proxy_workers`).
///
/// `RAYSHIFT_WORKER_THREADS=N` serves client connections on N threads; unset, one per core the
/// process may use (CPU affinity, cgroup quota). One thread: everything on tokio's
/// single-threaded runtime, the cheapest per request when rayshift gets one core. More: with
/// `RAYSHIFT_RUNTIME=per-core` (the default) N proxy workers, each a thread with its own
/// single-threaded runtime, and the control plane and admin API on a single-threaded runtime of
/// their own; with `RAYSHIFT_RUNTIME=work-stealing` everything on tokio's work-stealing pool of N
/// threads (BENCHMARKS.md compares them).
fn runtime() -> anyhow::Result<(tokio::runtime::Runtime, usize)> {
    let per_core = match std::env::var("RAYSHIFT_RUNTIME") {
        Ok(v) => match v.trim() {
            "per-core" => true,
            "work-stealing" => false,
            _ => {
                anyhow::bail!("RAYSHIFT_RUNTIME={v:?}: expected \"per-core\" or \"work-stealing\"")
            }
        },
        Err(_) => true,
    };
    let threads = match std::env::var("RAYSHIFT_WORKER_THREADS") {
        Ok(v) => Some(
            v.trim()
                .parse::<usize>()
                .ok()
                .filter(|n| *n >= 1)
                .with_context(|| {
                    format!("RAYSHIFT_WORKER_THREADS={v:?}: expected an integer >= 1")
                })?,
        ),
        Err(_) => None,
    };
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let (mut builder, workers) = if threads == 1 {
        (tokio::runtime::Builder::new_current_thread(), 0)
    } else if per_core {
        (tokio::runtime::Builder::new_current_thread(), threads)
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        (b, 0)
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    Ok((runtime, workers))
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
    // SIGHUP reloads the TLS certificate and key; a failure is logged and the old ones stay.
    // Installed first: a SIGHUP during a slow start would otherwise end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing the SIGHUP handler")?;
    // Likewise SIGTERM and SIGINT: one that arrives once the listeners accept must drain.
    let shutdown = shutdown_signal()?;
    let gateway = Gateway::start(cfg).await?;
    // Machine-readable lines: tests and scripts read the bound addresses from here (port 0 works).
    // A closed stdout (`rayshift run | head -1`) must not end the gateway.
    let _ = writeln!(
        std::io::stdout().lock(),
        "rayshift: proxy listening on {}://{}",
        gateway.proxy_scheme(),
        gateway.proxy_addr()
    );
    let _ = writeln!(
        std::io::stdout().lock(),
        "rayshift: admin listening on http://{}",
        gateway.admin_addr()
    );
    std::io::stdout().flush().ok();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            _ = hangup.recv() => match gateway.reload_tls() {
                Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                Err(TlsError::NotConfigured) => {
                    tracing::info!("SIGHUP: TLS is not configured, nothing to reload");
                }
                // Logged with the file's name by the reload itself.
                Err(_) => {}
            },
        }
    }
    tracing::info!("shutting down");
    gateway.shutdown().await;
    Ok(())
}

async fn run_demo(opts: DemoOptions, shift: bool) -> anyhow::Result<()> {
    let shutdown = shutdown_signal()?;
    let demo = demo::start(&opts).await?;
    println!("{}", demo.banner());
    std::io::stdout().flush().ok();
    tokio::pin!(shutdown);
    if shift {
        let mut printer = ProgressPrinter::stdout();
        let shifted = tokio::select! {
            shifted = demo.run_shift(&mut printer) => Some(shifted),
            () = &mut shutdown => {
                printer.finish();
                None
            }
        };
        let Some(shifted) = shifted else {
            demo.stop().await;
            return Ok(());
        };
        match shifted {
            Ok(report) => printer.println(&report.summary()),
            Err(e) => {
                printer.finish();
                eprintln!("rayshift: {e}");
            }
        }
        printer.println("Still serving; Ctrl-C stops everything.");
    }
    shutdown.await;
    demo.stop().await;
    Ok(())
}

/// Writes to stdout, ignoring a closed pipe (`rayshift status --json | head` must not panic).
macro_rules! emit {
    ($($arg:tt)*) => {{
        let _ = write!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// [`emit!`] with a newline.
macro_rules! emitln {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// Runs one admin-client verb; the result is the exit code.
async fn client_command(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Status { json, admin } => {
            let state = connect(&admin)?.get_json("/v1/state").await?;
            if json {
                emitln!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                emit!("{}", format_state(&state));
            }
            Ok(0)
        }
        Command::Shift(ShiftCommand::Start(args)) => {
            let client = connect(&args.admin)?;
            let mut body = args.policy.to_json();
            if let Some(to) = args.to {
                body.insert("to".into(), Value::from(to));
            }
            if let Some(revision) = args.to_revision {
                body.insert("to_revision".into(), Value::from(revision));
            }
            let accepted = client
                .post_json(&shift_path(&args.shard, None), &Value::Object(body))
                .await?;
            emitln!("{}: {}", args.shard, shift_of(&accepted)?.summary());
            if args.watch {
                watch(&client, &args.shard, args.interval).await
            } else {
                Ok(0)
            }
        }
        Command::Shift(ShiftCommand::Watch(args)) => {
            watch(&connect(&args.admin)?, &args.shard, args.interval).await
        }
        Command::Shift(ShiftCommand::Pause(args)) => control_shift(args, "pause").await,
        Command::Shift(ShiftCommand::Resume(args)) => control_shift(args, "resume").await,
        Command::Shift(ShiftCommand::Promote(args)) => control_shift(args, "promote").await,
        Command::Shift(ShiftCommand::Abort(args)) => control_shift(args, "abort").await,
        Command::Weights(WeightsCommand::Set {
            shard,
            weights,
            admin,
        }) => {
            let weights = parse_weights(&weights)?;
            let client = connect(&admin)?;
            let path = format!("/v1/shards/{}/weights", segment(&shard));
            let answer = client
                .put_json(&path, &json!({ "weights": weights }))
                .await?;
            let set: BTreeMap<String, u32> = serde_json::from_value(answer["weights"].clone())
                .context("reading the weights the gateway answered with")?;
            emitln!("{shard}: weights {}", weights_label(&set));
            Ok(0)
        }
        Command::Rollout(RolloutCommand::Start(args)) => {
            let client = connect(&args.admin)?;
            let mut body = args.policy.to_json();
            body.insert("revision".into(), Value::from(args.revision));
            if let Some(n) = args.max_concurrent {
                body.insert("max_concurrent".into(), Value::from(n));
            }
            let rollout = client
                .post_json("/v1/rollouts", &Value::Object(body))
                .await?;
            emit!("{}", format_rollout(&rollout));
            Ok(0)
        }
        Command::Rollout(RolloutCommand::Pause(args)) => control_rollout(args, "pause").await,
        Command::Rollout(RolloutCommand::Resume(args)) => control_rollout(args, "resume").await,
        Command::Rollout(RolloutCommand::Abort(args)) => control_rollout(args, "abort").await,
        Command::Rollout(RolloutCommand::Status { json, admin }) => {
            let answer = connect(&admin)?.get_json("/v1/rollouts").await?;
            if json {
                emitln!("{}", serde_json::to_string_pretty(&answer)?);
            } else {
                emit!("{}", format_rollout(&answer["rollout"]));
            }
            Ok(0)
        }
        Command::Run { .. } | Command::Check { .. } | Command::Demo { .. } => {
            bail!("not an admin client command")
        }
    }
}

/// A client for the admin API the arguments name, with the token file's token.
fn connect(args: &AdminArgs) -> anyhow::Result<AdminClient> {
    let token = match &args.token_file {
        Some(path) => Some(read_token(path)?),
        None => None,
    };
    Ok(AdminClient::new(&args.url, token)?)
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading token file {}", path.display()))?;
    // Trimmed as the gateway trims its admin.token_file: ASCII whitespace only.
    let token = text.trim_ascii();
    if token.is_empty() {
        bail!("token file {} is empty", path.display());
    }
    Ok(token.to_string())
}

/// `/v1/shards/{shard}/shift[/{action}]`.
fn shift_path(shard: &str, action: Option<&str>) -> String {
    match action {
        Some(action) => format!("/v1/shards/{}/shift/{action}", segment(shard)),
        None => format!("/v1/shards/{}/shift", segment(shard)),
    }
}

/// Percent-encodes a path segment (names are normally plain, so usually unchanged).
fn segment(text: &str) -> String {
    rayshift::client::path_segment(text)
}

fn shift_of(value: &Value) -> anyhow::Result<ShiftProgress> {
    ShiftProgress::from_json(value)
        .map_err(|e| anyhow::anyhow!("unexpected shift in the gateway's answer: {e}"))
}

async fn control_shift(args: ShardArgs, action: &str) -> anyhow::Result<u8> {
    let shift = connect(&args.admin)?
        .post_json(&shift_path(&args.shard, Some(action)), &json!({}))
        .await?;
    emitln!("{}: {}", args.shard, shift_of(&shift)?.summary());
    Ok(0)
}

async fn control_rollout(args: RolloutControlArgs, action: &str) -> anyhow::Result<u8> {
    let path = match args.id {
        Some(id) => format!("/v1/rollouts/{id}/{action}"),
        None => format!("/v1/rollouts/{action}"),
    };
    let rollout = connect(&args.admin)?.post_json(&path, &json!({})).await?;
    emit!("{}", format_rollout(&rollout));
    Ok(0)
}

/// Follows a shift with a live progress line; the exit code says how it ended.
async fn watch(client: &AdminClient, shard: &str, interval: Duration) -> anyhow::Result<u8> {
    let mut printer = ProgressPrinter::stdout();
    let opts = WatchOptions {
        interval,
        ..WatchOptions::default()
    };
    let result = watch_shift(client, shard, opts, |p| printer.update(&p.progress_line())).await;
    printer.finish();
    let (outcome, last) = result?;
    emitln!("{shard}: {}", last.summary());
    let reason = last.reason.as_deref().unwrap_or("no reason given");
    match outcome {
        Outcome::Completed => {}
        Outcome::RolledBack => eprintln!("rayshift: the shift of {shard} rolled back: {reason}"),
        Outcome::Aborted => eprintln!("rayshift: the shift of {shard} was aborted: {reason}"),
    }
    Ok(outcome.exit_code())
}

/// `blue=70 green=30` as a map, refusing anything but names with integer weights 0-100.
fn parse_weights(args: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut weights = BTreeMap::new();
    for arg in args {
        let parsed = arg.split_once('=').and_then(|(name, weight)| {
            let weight = weight.trim().parse::<u32>().ok().filter(|w| *w <= 100)?;
            Some((name.trim(), weight)).filter(|(name, _)| !name.is_empty())
        });
        let Some((name, weight)) = parsed else {
            bail!("weights: {arg:?} is not CLUSTER=WEIGHT with an integer weight 0-100 (e.g. blue=70 green=30)");
        };
        if weights.insert(name.to_string(), weight).is_some() {
            bail!("weights: cluster {name:?} is given twice");
        }
    }
    Ok(weights)
}

/// Installs the SIGINT (Ctrl-C) and SIGTERM handlers now, so a signal that arrives before the
/// returned future is first polled is not lost (nor kills the process by its default action),
/// and resolves on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = term.recv() => {}
        }
    })
}
