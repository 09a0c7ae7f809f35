//! `floor MODE PORT BACKEND_PORT`: a minimal HTTP/1.1 relay on 127.0.0.1:`PORT` in front of
//! 127.0.0.1:`BACKEND_PORT`, for the load benchmark (`benches/load`, targets `floor-*`).
//!
//! It is a measuring stick, not a proxy: each client connection gets its own upstream connection,
//! a request head is forwarded byte for byte once its blank line has arrived (GET only: no request
//! bodies; one request at a time: a client that pipelines is not served), and the response is
//! forwarded once its `Content-Length` bytes are in. No routing, no
//! header rewriting, no timeouts, no pooling, no metrics. What it costs per request is the floor a
//! proxy on the same event loop cannot go below: four socket calls (epoll, tokio) or four
//! submitted operations (io_uring) and a buffer search.
//!
//! Modes:
//! - `epoll`: one thread, edge-triggered epoll, non-blocking `read`/`write`;
//! - `tokio`: tokio's current-thread runtime (the one rayshift runs per core), a task per
//!   connection, `AsyncReadExt::read` / `AsyncWriteExt::write_all`;
//! - `uring`: one thread, io_uring (single issuer, deferred task work), one `io_uring_enter`
//!   submitting every operation the last batch of completions asked for.

mod framing;
#[cfg(target_os = "linux")]
mod relay_epoll;
mod relay_tokio;
#[cfg(target_os = "linux")]
mod relay_uring;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parsed = match args.as_slice() {
        [mode, port, backend] => match (port.parse::<u16>(), backend.parse::<u16>()) {
            (Ok(port), Ok(backend)) => Some((mode.as_str(), port, backend)),
            _ => None,
        },
        _ => None,
    };
    let Some((mode, port, backend)) = parsed else {
        eprintln!("usage: floor epoll|tokio|uring PORT BACKEND_PORT");
        return ExitCode::from(2);
    };
    let result = match mode {
        #[cfg(target_os = "linux")]
        "epoll" => relay_epoll::run(port, backend),
        "tokio" => relay_tokio::run(port, backend),
        #[cfg(target_os = "linux")]
        "uring" => relay_uring::run(port, backend),
        other => {
            eprintln!("floor: unknown mode {other:?} (epoll, tokio or uring)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor {mode}: {e}");
            ExitCode::FAILURE
        }
    }
}
