//! Proxy workers: one thread per core, each running its own single-threaded tokio runtime.
//!
//! With more than one core, `rayshift run` serves client connections on `N` worker threads
//! instead of tokio's work-stealing pool (`RAYSHIFT_RUNTIME`, docs/cli.md). Each worker accepts
//! on its own listening socket, all bound to the proxy address with `SO_REUSEPORT` (the kernel
//! spreads new connections over them by a hash of their addresses, [`bind`]), and a connection
//! stays on the worker that accepted it: its requests, its upstream connections (each cluster's
//! pool keeps one part per worker, see [`crate::proxy::pool`]) and the tasks it spawns (HTTP/2
//! streams, WebSockets) all run on that thread. No task moves between threads and neither a
//! request nor a new connection wakes another thread; what workers still share is atomic
//! counters (a cluster's in-flight count and statistics, metrics, the retry budget, the
//! connection limit). The shape of nginx's workers with `reuseport` and of Envoy's.
//!
//! The admin API and the control plane stay on the main runtime.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;

use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::JoinHandle;

thread_local! {
    /// 1 + the index of the worker running on this thread; 0 on every other thread.
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// The pool slot of the calling thread: `1 + i` on worker `i`, `0` on any other thread (the main
/// runtime, tokio's work-stealing pool, tests). Used to keep a worker's upstream connections to
/// itself.
pub fn slot() -> usize {
    SLOT.with(Cell::get)
}

/// Runs `f` as if on the worker of `slot` (0: no worker): for tests of what depends on it.
#[cfg(test)]
pub(crate) fn with_slot<R>(slot: usize, f: impl FnOnce() -> R) -> R {
    let before = SLOT.with(|s| s.replace(slot));
    let result = f();
    SLOT.with(|s| s.set(before));
    result
}

/// Running proxy workers. Dropping it stops them (their open connections are closed); the gateway
/// stops them with [`Workers::stop`] after its drain.
#[derive(Debug)]
pub struct Workers {
    handles: Vec<Handle>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Why the workers could not start.
#[derive(Debug, thiserror::Error)]
#[error("starting proxy worker {index}: {source}")]
pub struct StartError {
    index: usize,
    #[source]
    source: std::io::Error,
}

impl Workers {
    /// Starts `n` worker threads (`rayshift-worker-<i>`), each with a single-threaded runtime
    /// (I/O and timers on), parked until given work.
    pub fn start(n: usize) -> Result<Workers, StartError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for index in 0..n {
            let fail = |source| StartError { index, source };
            // The runtime is built and dropped on its own thread (a runtime dropped inside the
            // caller's async context would panic).
            let (started, handle) = std::sync::mpsc::channel();
            let mut stop_rx = stop_rx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("rayshift-worker-{index}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    SLOT.with(|slot| slot.set(index + 1));
                    let _ = started.send(Ok(runtime.handle().clone()));
                    runtime.block_on(crate::gateway::stopped(&mut stop_rx));
                    // Dropping the runtime drops the tasks still open (after the drain timeout).
                    drop(runtime);
                })
                .map_err(fail)?;
            let handle = handle
                .recv()
                .unwrap_or_else(|_| Err(std::io::Error::other("the worker thread ended")))
                .map_err(fail)?;
            handles.push(handle);
            threads.push(thread);
        }
        Ok(Workers {
            handles,
            stop,
            threads,
        })
    }

    /// Runs `future` on worker `index`.
    pub fn spawn<F>(&self, index: usize, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index].spawn(future)
    }

    /// Registers `listener` with worker `index`'s poller.
    pub fn listener(
        &self,
        index: usize,
        listener: std::net::TcpListener,
    ) -> std::io::Result<tokio::net::TcpListener> {
        let _on_worker = self.handles[index].enter();
        tokio::net::TcpListener::from_std(listener)
    }

    /// Stops the workers and waits for their threads to end. Connections still open are closed.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Backlog of each proxy listening socket: connections the kernel has accepted that wait for the
/// gateway (at `limits.max_connections`, or in a burst).
pub const BACKLOG: i32 = 1024;

/// Binds the proxy's listening sockets to `addr`, non-blocking, each with a backlog of
/// [`BACKLOG`]: one plain socket for `n == 1`; for more (one per worker), `n` sockets with
/// `SO_REUSEPORT`, among which the kernel spreads new connections. Port 0 picks one port for all.
///
/// A port another socket holds is refused, as a plain bind is: without the check the group would
/// share the port with another process's `SO_REUSEPORT` sockets of the same user (a second
/// gateway started by mistake), which would then get part of the traffic. (The check is made at
/// start; a socket of the same user that joins the group later is not seen.)
pub fn bind(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let group = n > 1;
    if group && addr.port() != 0 {
        // A plain socket binds only where nothing listens, SO_REUSEPORT or not.
        drop(std::net::TcpListener::bind(addr)?);
    }
    let mut addr = addr;
    (0..n)
        .map(|_| {
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            if group {
                socket.set_reuse_port(true)?;
            }
            socket.set_nonblocking(true)?;
            socket.bind(&addr.into())?;
            socket.listen(BACKLOG)?;
            let listener: std::net::TcpListener = socket.into();
            // Port 0: the first socket's port for the others.
            addr = listener.local_addr()?;
            Ok(listener)
        })
        .collect()
}

/// Counts a client connection on its worker's `rayshift_worker_connections` gauge until dropped.
#[derive(Debug)]
pub struct Counted(metrics::Gauge);

impl Counted {
    /// Counts one connection on `gauge`.
    pub fn new(gauge: &metrics::Gauge) -> Counted {
        gauge.increment(1.0);
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sockets on one port (port 0 picked once), each accepting on its own worker; a port
    /// another socket holds is refused.
    #[tokio::test]
    async fn each_worker_accepts_on_its_own_socket_of_one_port() {
        let workers = Workers::start(2).unwrap();
        let listeners = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let port = listeners[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert_eq!(listeners[1].local_addr().unwrap().port(), port);
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
        for (index, listener) in listeners.into_iter().enumerate() {
            let listener = workers.listener(index, listener).unwrap();
            let report = report.clone();
            workers.spawn(index, async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = report.send((slot(), stream));
                }
            });
        }
        // Connections from many source ports: the kernel's hash sends some to each socket.
        let mut clients = Vec::new();
        let mut slots = std::collections::BTreeSet::new();
        for _ in 0..64 {
            clients.push(
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .unwrap(),
            );
            let (slot, _stream) = reports.recv().await.unwrap();
            slots.insert(slot);
        }
        assert_eq!(slots, [1, 2].into(), "accepted on both workers' threads");

        let taken = bind(SocketAddr::from(([127, 0, 0, 1], port)), 1).unwrap_err();
        assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse);
        drop(clients);
        workers.stop().await;
    }
}
