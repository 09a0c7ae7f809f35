//! A state store for tests of the control task: every write and every read of the shared state is
//! handed to the test, which answers it when it chooses. A write the test holds is a write in
//! flight (a slow disk, an API server that stopped answering) while the control task goes on
//! judging shifts; a write it fails is a failed one.

use tokio::sync::{mpsc, oneshot};

use crate::state::{State, StateError};

/// The store's side, kept by the control task (in [`super::Store::Test`]).
#[derive(Debug)]
pub struct TestStore {
    /// Stands for state shared by replicas (a ConfigMap): a replica that steps down with changes
    /// it could not write reads the shared state again.
    pub shared: bool,
    writes: mpsc::UnboundedSender<Write>,
    reads: mpsc::UnboundedSender<Read>,
}

/// The test's side: the calls the control task made, in order.
pub(super) struct Calls {
    writes: mpsc::UnboundedReceiver<Write>,
    reads: mpsc::UnboundedReceiver<Read>,
}

/// A write waiting for its outcome.
pub(super) struct Write {
    /// What the control task writes.
    pub state: State,
    reply: oneshot::Sender<Result<(), StateError>>,
}

/// A read of the shared state waiting for its answer.
pub(super) struct Read {
    reply: oneshot::Sender<Result<Option<State>, StateError>>,
}

/// A store and the test's side of it.
pub(super) fn pair(shared: bool) -> (TestStore, Calls) {
    let (writes, write_rx) = mpsc::unbounded_channel();
    let (reads, read_rx) = mpsc::unbounded_channel();
    (
        TestStore {
            shared,
            writes,
            reads,
        },
        Calls {
            writes: write_rx,
            reads: read_rx,
        },
    )
}

impl TestStore {
    /// Hands `state` to the test and waits for its outcome (a test that is gone fails it).
    pub async fn write(&self, state: State) -> Result<(), StateError> {
        let (reply, outcome) = oneshot::channel();
        let _ = self.writes.send(Write { state, reply });
        outcome.await.unwrap_or_else(|_| Err(failure()))
    }

    /// Asks the test for the shared state and waits for its answer.
    pub async fn read(&self) -> Result<Option<State>, StateError> {
        let (reply, answer) = oneshot::channel();
        let _ = self.reads.send(Read { reply });
        answer.await.unwrap_or_else(|_| Err(failure()))
    }
}

impl Calls {
    /// The next write the control task makes (panics after 60 s of the test's clock without one).
    pub async fn write(&mut self) -> Write {
        tokio::time::timeout(std::time::Duration::from_secs(60), self.writes.recv())
            .await
            .expect("the control task writes")
            .expect("the store is open")
    }

    /// The next write, landed.
    pub async fn land(&mut self) -> State {
        let write = self.write().await;
        let state = write.state.clone();
        write.land();
        state
    }

    /// Whether a write is waiting now.
    pub fn has_write(&mut self) -> bool {
        !self.writes.is_empty()
    }

    /// The next read of the shared state.
    pub async fn read(&mut self) -> Read {
        tokio::time::timeout(std::time::Duration::from_secs(60), self.reads.recv())
            .await
            .expect("the control task reads the shared state")
            .expect("the store is open")
    }
}

impl Write {
    /// The write succeeds.
    pub fn land(self) {
        let _ = self.reply.send(Ok(()));
    }

    /// The write fails, as on a failing disk.
    pub fn fail(self) {
        let _ = self.reply.send(Err(failure()));
    }
}

impl Read {
    /// The read returns `state`.
    pub fn answer(self, state: State) {
        let _ = self.reply.send(Ok(Some(state)));
    }
}

fn failure() -> StateError {
    StateError::Write {
        path: "test-store".into(),
        source: std::io::Error::other("the test failed this write"),
    }
}
