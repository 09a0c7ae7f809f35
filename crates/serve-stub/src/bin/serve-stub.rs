//! `serve-stub`: run one Ray Serve look-alike as its own process.
//!
//! ```text
//! serve-stub --name blue --revision v1 --listen 127.0.0.1:8101 --app echo=/echo --app other=/other
//! ```
//!
//! Prints `serve-stub <name> listening on http://ADDR` once it accepts
//! connections, and runs until SIGINT or SIGTERM.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use serve_stub::{ServeStub, StubConfig};

const USAGE: &str = "\
usage: serve-stub [--name NAME] [--revision REV] [--listen ADDR] [--app NAME=PREFIX]...
                  [--latency-ms MS] [--error-rate RATIO]

  --name NAME         cluster name (default: stub)
  --revision REV      revision (default: v1)
  --listen ADDR       address to listen on (default: 127.0.0.1:8000; port 0 picks one)
  --app NAME=PREFIX   an application and its route prefix, repeatable
                      (default: default=/ as Ray Serve's default app)
  --latency-ms MS     delay added before answering each app request
  --error-rate RATIO  share of app requests answered 500 (e.g. 0.2 = every 5th)";

struct Args {
    cfg: StubConfig,
    listen: SocketAddr,
    latency: Duration,
    error_rate: f64,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        cfg: StubConfig::new("stub", "v1"),
        listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
        latency: Duration::ZERO,
        error_rate: 0.0,
    };
    while let Some(flag) = args.next() {
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (flag, None),
        };
        if flag == "-h" || flag == "--help" {
            return Err(String::new());
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(format!("{flag} needs a value")),
        };
        match flag.as_str() {
            "--name" => parsed.cfg.name = value,
            "--revision" => parsed.cfg.revision = value,
            "--listen" => {
                parsed.listen = value
                    .parse()
                    .map_err(|e| format!("--listen {value}: {e}"))?;
            }
            "--app" => {
                let (name, prefix) = value
                    .split_once('=')
                    .filter(|(n, p)| !n.is_empty() && p.starts_with('/'))
                    .ok_or_else(|| format!("--app {value}: expected NAME=/PREFIX"))?;
                parsed.cfg.apps.push((name.to_owned(), prefix.to_owned()));
            }
            "--latency-ms" => {
                let ms = value
                    .parse()
                    .map_err(|e| format!("--latency-ms {value}: {e}"))?;
                parsed.latency = Duration::from_millis(ms);
            }
            "--error-rate" => {
                parsed.error_rate = value
                    .parse()
                    .map_err(|e| format!("--error-rate {value}: {e}"))?;
            }
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if parsed.cfg.apps.is_empty() {
        parsed.cfg.apps.push(("default".into(), "/".into()));
    }
    Ok(parsed)
}

/// Installs the SIGINT and SIGTERM handlers now; the returned future resolves
/// when either signal arrives.
#[cfg(unix)]
fn on_termination() -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        Ok(())
    })
}

/// Resolves on Ctrl-C.
#[cfg(not(unix))]
fn on_termination() -> std::io::Result<impl std::future::Future<Output = std::io::Result<()>>> {
    Ok(tokio::signal::ctrl_c())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(msg) if msg.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(msg) => {
            eprintln!("serve-stub: {msg}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let stub = match ServeStub::start_on(args.cfg, args.listen).await {
        Ok(stub) => stub,
        Err(err) => {
            eprintln!("serve-stub: cannot listen on {}: {err}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    stub.set_latency(args.latency);
    stub.set_error_rate(args.error_rate);
    // Install the handlers before announcing readiness, so a supervisor that
    // signals right after reading the line never hits the default action.
    let terminated = match on_termination() {
        Ok(terminated) => terminated,
        Err(err) => {
            eprintln!("serve-stub: cannot install signal handlers: {err}");
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "serve-stub {} listening on {}",
        stub.name(),
        stub.url()
    );
    let _ = stdout.flush();
    drop(stdout);
    let result = terminated.await;
    stub.shutdown().await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("serve-stub: waiting for signals failed: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn parses_the_documented_command_line() {
        let a = parse(&[
            "--name",
            "blue",
            "--revision",
            "v1",
            "--listen",
            "127.0.0.1:8101",
            "--app",
            "echo=/echo",
            "--app=other=/other",
        ])
        .unwrap();
        assert_eq!(a.cfg.name, "blue");
        assert_eq!(a.cfg.revision, "v1");
        assert_eq!(a.listen, "127.0.0.1:8101".parse().unwrap());
        assert_eq!(
            a.cfg.apps,
            vec![
                ("echo".into(), "/echo".into()),
                ("other".into(), "/other".into())
            ]
        );
        assert_eq!(
            parse(&[]).unwrap().cfg.apps,
            vec![("default".into(), "/".into())]
        );
        assert!(parse(&["--app", "echo"]).is_err());
        assert!(parse(&["--listen"]).is_err());
        assert!(parse(&["--bogus", "x"]).is_err());
    }
}
