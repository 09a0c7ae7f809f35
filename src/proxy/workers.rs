//! Proxy workers: one thread per core, each running its own single-threaded tokio runtime.
//!
//! With more than one core, `rayshift run` serves client connections on `N` worker threads
//! instead of tokio's work-stealing pool (`RAYSHIFT_RUNTIME`, docs/cli.md). Each accepted
//! connection is handed to the worker with the fewest open connections and stays there: its
//! requests, its upstream connections (each cluster's pool keeps one part per worker, see
//! [`crate::proxy::pool`]) and the tasks it spawns (HTTP/2 streams, WebSockets) all run on that
//! thread. No task moves between threads and no request wakes another thread; what workers still
//! share is atomic counters (a cluster's in-flight count and statistics, metrics, the retry
//! budget and the pool's budget). The shape of nginx's workers and Envoy's, with the connection
//! assigned by the gateway (fewest connections) instead of by the kernel's `SO_REUSEPORT` hash.
//!
//! The accept loop, the admin API and the control plane stay on the main runtime; handing a
//! connection over costs one cross-thread wake-up per connection, not per request.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio::sync::watch;

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
    spawner: Spawner,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// One worker: where its tasks go and how many client connections it serves now.
#[derive(Debug)]
struct Worker {
    handle: Handle,
    connections: AtomicUsize,
    gauge: metrics::Gauge,
}

/// Where the accept loop starts a client connection's task: on the runtime the accept loop runs
/// on ([`Spawner::local`]: one core, or tokio's work-stealing pool), or on the proxy worker with
/// the fewest open connections ([`Workers::spawner`]).
#[derive(Debug, Clone, Default)]
pub struct Spawner {
    workers: Option<Arc<[Worker]>>,
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
    /// (I/O and timers on), parked until a connection arrives.
    pub fn start(n: usize) -> Result<Workers, StartError> {
        let (stop, stop_rx) = watch::channel(false);
        let mut workers = Vec::with_capacity(n);
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
            workers.push(Worker {
                handle,
                connections: AtomicUsize::new(0),
                gauge: crate::telemetry::worker_connections(index),
            });
            threads.push(thread);
        }
        Ok(Workers {
            spawner: Spawner {
                workers: Some(workers.into()),
            },
            stop,
            threads,
        })
    }

    /// How the accept loop hands connections to these workers.
    pub fn spawner(&self) -> Spawner {
        self.spawner.clone()
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

impl Spawner {
    /// Starts connections on the calling runtime.
    pub fn local() -> Spawner {
        Spawner::default()
    }

    /// Runs `serve` on the client connection `stream` (accepted on the calling runtime): here, or
    /// on the worker with the fewest connections, where the socket is registered with that
    /// worker's poller first.
    pub fn spawn<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let Some(workers) = &self.workers else {
            tokio::spawn(serve(stream));
            return;
        };
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "handing a client connection to a worker failed");
                return;
            }
        };
        let (index, worker) = workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.connections.load(Ordering::Relaxed))
            .expect("at least one worker");
        let open = Open::new(Arc::clone(workers), index);
        worker.handle.spawn(async move {
            let _open = open;
            match TcpStream::from_std(std_stream) {
                Ok(stream) => serve(stream).await,
                Err(e) => tracing::warn!(error = %e, "registering a client connection failed"),
            }
        });
    }
}

/// Counts a connection on its worker until dropped.
struct Open {
    workers: Arc<[Worker]>,
    index: usize,
}

impl Open {
    fn new(workers: Arc<[Worker]>, index: usize) -> Open {
        let worker = &workers[index];
        worker.connections.fetch_add(1, Ordering::Relaxed);
        // Moved by one, not set: the decrement runs on the worker, and two sets could land in
        // either order.
        worker.gauge.increment(1.0);
        Open { workers, index }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let worker = &self.workers[self.index];
        worker.connections.fetch_sub(1, Ordering::Relaxed);
        worker.gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_go_to_the_least_busy_worker_and_run_there() {
        let workers = Workers::start(2).unwrap();
        let spawner = workers.spawner();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (report, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let (release, released) = watch::channel(false);
        let (mut clients, mut slots) = (Vec::new(), Vec::new());
        for _ in 0..4 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, _) = listener.accept().await.unwrap();
            let (report, mut released) = (report.clone(), released.clone());
            spawner.spawn(stream, move |stream| async move {
                // Served on a worker thread, with the socket registered there.
                let _ = report.send((slot(), stream.peer_addr().is_ok()));
                crate::gateway::stopped(&mut released).await;
            });
            let (slot, registered) = reports.recv().await.unwrap();
            assert!(registered);
            slots.push(slot);
        }
        // Each to the worker with fewer connections (the first of equals): served on its thread.
        assert_eq!(slots, [1, 2, 1, 2]);
        let list = spawner.workers.as_ref().expect("workers spawn on workers");
        let open: Vec<usize> = list
            .iter()
            .map(|w| w.connections.load(Ordering::Relaxed))
            .collect();
        assert_eq!(open, [2, 2], "four connections spread over two workers");
        let _ = release.send(true);
        for _ in 0..100 {
            if list
                .iter()
                .all(|w| w.connections.load(Ordering::Relaxed) == 0)
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(list
            .iter()
            .all(|w| w.connections.load(Ordering::Relaxed) == 0));
        drop(clients);
        workers.stop().await;
    }
}
