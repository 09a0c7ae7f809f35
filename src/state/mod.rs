//! The durable state: weights (and shifts) are written here before they take effect.
//!
//! The state lives in two files: the **state file** (`state_file`, JSON), a snapshot, and next to
//! it the **journal** (`<state_file>.journal`), which holds every change made since that snapshot,
//! one record each, appended and made durable with one `fdatasync` (see [`journal`]). The gateway
//! folds the journal into a new snapshot when it starts, when the journal is full, and when it
//! stops gracefully. A third file, `<state_file>.lock`, is held locked while a gateway runs, so a
//! second gateway on the same state file refuses to start. A snapshot write is atomic: the new
//! content goes to a temporary file in the same directory, is fsynced, and renamed over the old
//! file, and the directory is fsynced; a crash leaves either the old or the new state, never a
//! torn one. A file that cannot be read or has an unknown version stops the gateway at start: it
//! never silently resets an operator's weights.
//!
//! The journal's header names the state file its records follow (a hash of its bytes). At start
//! the records apply only over that state file: a crash between writing a new snapshot and
//! retiring the records leaves a newer state file, and a state file restored from a backup, edited
//! by hand or rewritten by a version without a journal is another one; then the state file is
//! used and the records are dropped (with a warning). Records that follow a state file that is
//! missing stop the start, as they could not be applied to anything they were made for.

pub mod journal;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::shift::{Rollout, Shift};

/// The state file format version this build reads and writes.
pub const STATE_VERSION: u32 = 1;

/// Errors reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file exists but could not be read.
    #[error("reading state file {path}: {source}")]
    Read {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid JSON of the expected shape.
    #[error("state file {path} is corrupt: {source}; fix or remove it (rayshift never resets state silently)")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// The file was written by a different, incompatible version of rayshift.
    #[error("state file {path} has version {found}, this rayshift reads version {expected}")]
    Version {
        /// The state file.
        path: PathBuf,
        /// Version found in the file.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// Another replica changed the state first (Kubernetes mode); the change was not applied.
    #[error("state in {0} changed concurrently; the change was not applied, retry")]
    Conflict(PathBuf),
    /// Another process holds the state file (its lock file is locked).
    #[error(
        "state file {path} is in use by another rayshift process (lock {lock} is held); give each \
         gateway its own state_file, or share the state through discovery.kubernetes.state"
    )]
    InUse {
        /// The state file.
        path: PathBuf,
        /// Its lock file.
        lock: PathBuf,
    },
    /// The Kubernetes API refused or failed a read or write of the state object.
    #[error("state object {path}: {message}")]
    Kube {
        /// The object.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A write of the state object got no answer in time: it may still be applied (the watch
    /// then brings it).
    #[error(
        "state object {path}: {message}; the write may still be applied: check the state \
         (GET /v1/state) before changing it again"
    )]
    KubeUncertain {
        /// The object.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file is well-formed but holds a value rayshift would never have written (edited by
    /// hand).
    #[error("state file {path} holds an invalid value: {message}; fix or remove it")]
    Invalid {
        /// The state file.
        path: PathBuf,
        /// The key and what is wrong with it.
        message: String,
    },
    /// The new state could not be written durably and its journal record could not be withdrawn:
    /// it is not in effect now, but may be after the next start.
    #[error(
        "writing state file {path}: {source}; the change is not in effect, but its journal record \
         could not be withdrawn and may take effect when the gateway next starts"
    )]
    Uncertain {
        /// The state file.
        path: PathBuf,
        /// The journal's error, then the state file's.
        source: std::io::Error,
    },
    /// The new state file reached the disk (or may have), but a later step failed: syncing its
    /// directory, or retiring or removing the journal beside it. The change is not in effect
    /// now, and may be after the next start.
    #[error(
        "state file {path}: {source}; the new state file may be on disk, so the change is not in \
         effect now but may take effect when the gateway next starts"
    )]
    Unsettled {
        /// The state file.
        path: PathBuf,
        /// What failed after the state file was written.
        source: std::io::Error,
    },
    /// The journal holds changes made after a state file that is not there.
    #[error(
        "state journal {journal} holds changes made after a state file {path} that is missing; \
         restore the state file, or remove the journal to start from an empty state, which drops \
         those changes"
    )]
    SnapshotMissing {
        /// The state file.
        path: PathBuf,
        /// The journal.
        journal: PathBuf,
    },
    /// The new state could not be written durably; the old state is still in place.
    #[error("writing state file {path}: {source}")]
    Write {
        /// The state file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Everything rayshift persists.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Format version, [`STATE_VERSION`].
    pub version: u32,
    /// Per-shard state, by shard name.
    #[serde(default)]
    pub shards: BTreeMap<String, ShardState>,
    /// The current (or last) fleet rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
    /// Id of the next rollout.
    #[serde(default)]
    pub next_rollout_id: u64,
}

/// Persisted state of one shard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardState {
    /// Operator- or shift-set weights by cluster name (0-100, summing to 100).
    #[serde(default)]
    pub weights: BTreeMap<String, u32>,
    /// The shard's current (or last) shift.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<Shift>,
    /// The newest revision any shift (automatic, manual or a rollout's) was started for:
    /// `auto_shift` only starts shifts to newer ones, so a revision that rolled back or was
    /// aborted is not retried by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_shift_revision: Option<String>,
}

impl StateError {
    /// An error of the same kind and message, for answering every change of a failed group write.
    pub fn same_kind(&self, message: &str) -> StateError {
        match self {
            StateError::Conflict(path) => StateError::Conflict(path.clone()),
            StateError::Kube { path, message } => StateError::Kube {
                path: path.clone(),
                message: message.clone(),
            },
            StateError::KubeUncertain { path, message } => StateError::KubeUncertain {
                path: path.clone(),
                message: message.clone(),
            },
            StateError::Read { path, source } | StateError::Write { path, source } => {
                StateError::Write {
                    path: path.clone(),
                    source: std::io::Error::new(source.kind(), source.to_string()),
                }
            }
            StateError::Uncertain { path, source } => StateError::Uncertain {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StateError::Unsettled { path, source } => StateError::Unsettled {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StateError::SnapshotMissing { path, .. }
            | StateError::Corrupt { path, .. }
            | StateError::Invalid { path, .. }
            | StateError::Version { path, .. }
            | StateError::InUse { path, .. } => StateError::Write {
                path: path.clone(),
                source: std::io::Error::other(message.to_string()),
            },
        }
    }
}

impl State {
    /// Checks what serde's shape checks cannot: shift and rollout policies within their rules.
    fn validate(&self) -> Result<(), String> {
        for (shard, s) in &self.shards {
            if let Some(shift) = &s.shift {
                shift
                    .policy
                    .validate()
                    .map_err(|e| format!("shards.{shard}.shift.policy.{e}"))?;
            }
        }
        if let Some(rollout) = &self.rollout {
            rollout
                .policy
                .validate()
                .map_err(|e| format!("rollout.policy.{e}"))?;
        }
        Ok(())
    }

    /// An empty state of the current version.
    pub fn new() -> Self {
        Self {
            version: STATE_VERSION,
            shards: BTreeMap::new(),
            rollout: None,
            next_rollout_id: 1,
        }
    }
}

/// Parses a state document; `origin` names where it came from in errors.
pub fn parse(bytes: &[u8], origin: &Path) -> Result<State, StateError> {
    // Check the version before the shape, so a future format gets the clearer error.
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let versioned: Versioned =
        serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
            path: origin.to_path_buf(),
            source,
        })?;
    if versioned.version != STATE_VERSION {
        return Err(StateError::Version {
            path: origin.to_path_buf(),
            found: versioned.version,
            expected: STATE_VERSION,
        });
    }
    let state: State = serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        path: origin.to_path_buf(),
        source,
    })?;
    state.validate().map_err(|message| StateError::Invalid {
        path: origin.to_path_buf(),
        message,
    })?;
    Ok(state)
}

/// The state file and its journal on disk.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
    journal: PathBuf,
}

impl StateStore {
    /// A store at `path`, with its journal at `path` + `.journal` (nothing is read or written yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let journal = journal::path_for(&path);
        Self { path, journal }
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of the journal.
    pub fn journal_path(&self) -> &Path {
        &self.journal
    }

    /// Reads the state: the newest journal record when the records follow the state file beside
    /// them, else the state file. Missing files are a fresh start (`Ok(None)`); anything
    /// unreadable is an error. Writes nothing.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        self.load_with_journal().map(|loaded| loaded.state)
    }

    /// [`load`](Self::load), and what the journal held.
    fn load_with_journal(&self) -> Result<Loaded, StateError> {
        // The snapshot is parsed even when the journal is newer: a corrupt state file is reported
        // now, not when the journal is next folded over it.
        let (snapshot, hash) = self.load_snapshot()?;
        let contents = journal::read(&self.journal).map_err(|source| StateError::Read {
            path: self.journal.clone(),
            source,
        })?;
        // A journal that does not name its state file (written by an older version) applies.
        let applies = contents
            .as_ref()
            .is_some_and(|c| c.follows.is_none_or(|f| f == hash));
        let state = match contents.as_ref().and_then(|c| c.newest.as_deref()) {
            Some(record) if applies => Some(parse(record, &self.journal)?),
            Some(_) if snapshot.is_none() => {
                return Err(StateError::SnapshotMissing {
                    path: self.path.clone(),
                    journal: self.journal.clone(),
                })
            }
            _ => snapshot,
        };
        Ok(Loaded {
            state,
            contents,
            snapshot: hash,
            applies,
        })
    }

    /// The state file's state and its [`journal::follows`] hash (`None` and the hash of no
    /// bytes when there is no state file).
    fn load_snapshot(&self) -> Result<(Option<State>, u64), StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((None, journal::follows(None)))
            }
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let state = parse(&bytes, &self.path)?;
        Ok((Some(state), journal::follows(Some(&bytes))))
    }

    /// The [`journal::follows`] hash of the state file on disk now; `None` when it cannot be read.
    fn disk_hash(&self) -> Option<u64> {
        match fs::read(&self.path) {
            Ok(bytes) => Some(journal::follows(Some(&bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(journal::follows(None)),
            Err(_) => None,
        }
    }

    /// Writes `state` as the state file, atomically and durably (temp file, fsync, rename, fsync
    /// of the directory), and returns its [`journal::follows`] hash. The journal is not touched:
    /// callers retire its records afterwards.
    pub fn save(&self, state: &State) -> Result<u64, StateError> {
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
        body.push(b'\n');
        let tmp = journal::dir_of(&self.path).join(format!(
            "{}{}",
            snapshot_temp_prefix(&self.path),
            std::process::id()
        ));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename is durable only once the directory entry is.
            journal::sync_dir(&self.path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(err)?;
        Ok(journal::follows(Some(&body)))
    }
}

/// What the state file and the journal beside it hold.
struct Loaded {
    /// The newest state: the journal's newest record when its records apply, else the state file's.
    state: Option<State>,
    /// The journal, if there is one.
    contents: Option<journal::Contents>,
    /// The state file's [`journal::follows`] hash.
    snapshot: u64,
    /// Whether the journal's records apply over the state file (they follow it, or the journal
    /// does not say which state file they follow).
    applies: bool,
}

/// One request to [`StateWriter`]'s thread.
enum Job {
    /// Make this state durable.
    Save(
        Box<State>,
        tokio::sync::oneshot::Sender<Result<(), StateError>>,
    ),
    /// Fold the journal into the state file.
    Fold(tokio::sync::oneshot::Sender<Result<(), StateError>>),
}

/// Writes the state on a thread of its own, one write at a time, at a lower CPU priority than
/// request handling (nice +10 on Linux). A durable write sleeps in `fdatasync` (on some disks
/// three times: data, inode, cache flush); woken at the proxy's own priority, the writer would
/// preempt request handling on a busy core each time (BENCHMARKS.md, Churn). The thread ends
/// when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct StateWriter {
    path: PathBuf,
    jobs: std::sync::mpsc::Sender<Job>,
}

impl StateWriter {
    /// Loads the state of `store` (`None`: a fresh start), folds any journal records into a new
    /// state file, and starts the writer thread.
    ///
    /// Only an unreadable state is an error. When the journal cannot be created (a read-only
    /// directory, say), the gateway still starts, and a change that cannot be made durable is
    /// refused when it is made.
    pub fn open(store: StateStore) -> Result<(Self, Option<State>), StateError> {
        let lock = lock_state(&store)?;
        if lock.is_some() {
            // Only the lock holder writes these: any left now are from a crash.
            remove_stale_temporaries(&store);
        }
        let Loaded {
            state,
            contents,
            snapshot,
            applies,
        } = store.load_with_journal()?;
        if !applies && contents.as_ref().is_some_and(|c| c.newest.is_some()) {
            tracing::warn!(
                state_file = %store.path().display(), journal = %store.journal_path().display(),
                "the state journal's records follow another state file than the one beside it (a crash after a new state file was written, or the state file was restored from a backup, edited, or written by a version without a journal); using the state file and dropping the records"
            );
        }
        let path = store.path().to_path_buf();
        let mut files = StateFiles {
            store,
            journal: None,
            last: state.clone(),
            snapshot,
            behind: false,
            lock,
        };
        files.open_journal(contents, applies);
        let (jobs, pending) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("rayshift-state".into())
            .spawn(move || {
                lower_thread_priority();
                while let Ok(job) = pending.recv() {
                    match job {
                        Job::Save(state, reply) => {
                            let _ = reply.send(files.save(*state));
                        }
                        Job::Fold(reply) => {
                            let _ = reply.send(files.fold_if_needed());
                        }
                    }
                }
            })
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        Ok((Self { path, jobs }, state))
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes `state` durable (one journal record, or a new state file when the journal is full)
    /// and waits for it.
    pub async fn save(&self, state: State) -> Result<(), StateError> {
        self.ask(|reply| Job::Save(Box::new(state), reply)).await
    }

    /// Folds the journal into the state file, so the state file alone is current (a graceful
    /// stop does this). Nothing is written when the journal holds no records.
    pub async fn fold(&self) -> Result<(), StateError> {
        self.ask(Job::Fold).await
    }

    async fn ask(
        &self,
        job: impl FnOnce(tokio::sync::oneshot::Sender<Result<(), StateError>>) -> Job,
    ) -> Result<(), StateError> {
        let gone = || StateError::Write {
            path: self.path.clone(),
            source: std::io::Error::other("the state writer thread has stopped"),
        };
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.jobs.send(job(reply)).map_err(|_| gone())?;
        // Taken but not answered: the thread may have made the change durable before it ended.
        outcome.await.map_err(|_| StateError::Unsettled {
            path: self.path.clone(),
            source: std::io::Error::other("the state writer thread stopped before answering"),
        })?
    }
}

/// The state file and the open journal, owned by the writer thread.
struct StateFiles {
    store: StateStore,
    /// `None` while the journal is unusable: every change then rewrites the state file.
    journal: Option<journal::Journal>,
    /// The newest durable state.
    last: Option<State>,
    /// The [`journal::follows`] hash of the state file on disk: the journal's records follow it.
    snapshot: u64,
    /// Whether the state file is older than `last` (records since it are in the journal).
    behind: bool,
    /// The state file's lock, held while the writer runs (`None`: it could not be taken, and no
    /// journal is kept).
    lock: Option<fs::File>,
}

impl StateFiles {
    /// At start: fold the records of the journal `contents` describe into the state file when
    /// they apply to it (`applies`) and reuse the journal file, retired so that it follows the
    /// state file; else create a journal.
    fn open_journal(&mut self, contents: Option<journal::Contents>, applies: bool) {
        let path = self.store.journal_path().to_path_buf();
        let had_records = applies && contents.as_ref().is_some_and(|c| c.newest.is_some());
        if let Some(contents) = contents.filter(|_| self.lock.is_some()) {
            match journal::Journal::reopen(&path, &contents) {
                Ok(j) => self.journal = Some(j),
                Err(e) => {
                    tracing::warn!(journal = %path.display(), error = %e, "reopening the state journal failed")
                }
            }
        }
        let len = self.last.as_ref().map_or(0, record_len);
        let result = match self.last.clone() {
            // The records' newest state becomes the state file before the journal is reused.
            Some(state) if had_records => {
                self.behind = true;
                self.fold(&state)
            }
            // Records that do not apply, or a journal that does not name its state file: new
            // records must follow the state file as it is.
            _ if self
                .journal
                .as_ref()
                .is_some_and(|j| j.follows() != Some(self.snapshot)) =>
            {
                let restarted = self.restart_journal(len);
                // Records left that do not apply: a graceful stop tries again, so that a version
                // before this naming (which applies any records) does not see them.
                self.behind = restarted.is_err();
                restarted
            }
            _ if self.journal.is_none() => {
                let created = self.recreate_journal(len);
                // Records left that do not apply: as above.
                self.behind = created.is_err();
                created
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "state journal not ready; changes are written when they are made");
        }
    }

    /// Makes `state` durable and remembers it as the newest.
    fn save(&mut self, state: State) -> Result<(), StateError> {
        let payload = serde_json::to_vec(&state).map_err(|e| StateError::Write {
            path: self.store.path().to_path_buf(),
            source: e.into(),
        })?;
        let mut not_withdrawn = None;
        // A journal takes records only while they follow the state file on disk (or, written by
        // an older version, it names none: its records apply over any).
        debug_assert!(self
            .journal
            .as_ref()
            .is_none_or(|j| j.follows().is_none_or(|f| f == self.snapshot)));
        let appended = match self.journal.as_mut().map(|j| j.append(&payload)) {
            Some(Ok(appended)) => appended,
            Some(Err(e)) => {
                tracing::warn!(journal = %self.store.journal_path().display(), error = %e, "appending to the state journal failed; writing the state file instead");
                self.journal = None;
                if e.get_ref()
                    .is_some_and(|inner| inner.is::<journal::NotWithdrawn>())
                {
                    // A graceful stop settles it with a new state file if nothing else does (when
                    // there is a state in effect to write).
                    self.behind = true;
                    not_withdrawn = Some(e);
                }
                false
            }
            None => false,
        };
        if appended {
            self.behind = true;
        } else {
            // A new state file (and journal) also replaces a record that could not be withdrawn.
            if let Err(e) = self.fold(&state) {
                return Err(match not_withdrawn {
                    Some(journal) => StateError::Uncertain {
                        path: self.store.path().to_path_buf(),
                        source: std::io::Error::other(format!("{journal}; then: {e}")),
                    },
                    None => e,
                });
            }
        }
        self.last = Some(state);
        Ok(())
    }

    /// Folds when the state file is behind the newest state (also when the journal has become
    /// unusable since: its records are then still the newest on disk).
    fn fold_if_needed(&mut self) -> Result<(), StateError> {
        match self.last.take() {
            Some(last) if self.behind => {
                let result = self.fold(&last);
                self.last = Some(last);
                result
            }
            last => {
                self.last = last;
                Ok(())
            }
        }
    }

    /// Writes `state` as the state file, then retires the journal's records, or replaces the
    /// journal by an empty one large enough for the state.
    fn fold(&mut self, state: &State) -> Result<(), StateError> {
        match self.store.save(state) {
            Ok(hash) => self.snapshot = hash,
            Err(e) => {
                let on_disk = self.store.disk_hash();
                if on_disk != Some(self.snapshot) {
                    // The new file is in place (the write failed after its rename, syncing the
                    // directory), or the file cannot be read: the journal's records may no longer
                    // follow it (the next start would drop them), so it takes no more.
                    self.journal = None;
                    self.behind = true;
                }
                match on_disk {
                    Some(hash) if hash != self.snapshot => {
                        // Later writes compare with the file as it is now.
                        self.snapshot = hash;
                        let source = match e {
                            StateError::Write { source, .. } => source,
                            other => std::io::Error::other(other.to_string()),
                        };
                        return Err(StateError::Unsettled {
                            path: self.store.path().to_path_buf(),
                            source,
                        });
                    }
                    _ => return Err(e),
                }
            }
        }
        self.behind = false;
        self.restart_journal(record_len(state)).map_err(|e| {
            // The state file holds a change that is not in effect: a graceful stop writes the
            // newest state in effect again.
            self.behind = true;
            StateError::Unsettled {
                path: self.store.path().to_path_buf(),
                source: std::io::Error::other(format!(
                    "written, but its journal could neither be retired nor removed: {e}"
                )),
            }
        })
    }

    /// Makes the journal empty and following the state file on disk: retires its records, or
    /// replaces it by an empty journal large enough for a state of `len` bytes.
    fn restart_journal(&mut self, len: usize) -> Result<(), StateError> {
        let capacity = journal::capacity_for(len);
        if let Some(j) = self.journal.as_mut().filter(|j| j.capacity() >= capacity) {
            match j.retire(self.snapshot) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(journal = %self.store.journal_path().display(), error = %e, "retiring the state journal's records failed")
                }
            }
        }
        self.recreate_journal(len)
    }

    /// Replaces the journal by an empty one for a state of `len` bytes. When that fails, or
    /// without the state lock, the old journal file is removed instead, so its records cannot
    /// override the state file at the next start.
    fn recreate_journal(&mut self, len: usize) -> Result<(), StateError> {
        self.journal = None;
        if self.lock.is_none() {
            // Another gateway could be appending to a journal here: every change rewrites the
            // state file (each rewrite is whole: temp file and rename).
            return self.remove_journal();
        }
        match journal::Journal::create(
            self.store.journal_path(),
            journal::capacity_for(len),
            self.snapshot,
        ) {
            Ok(j) => {
                self.journal = Some(j);
                Ok(())
            }
            Err(e) => {
                self.remove_journal()?;
                tracing::warn!(journal = %self.store.journal_path().display(), error = %e, "state journal unavailable: every change rewrites the state file");
                Ok(())
            }
        }
    }

    /// Removes the journal file, if there is one, and makes the removal durable.
    fn remove_journal(&self) -> Result<(), StateError> {
        let path = self.store.journal_path();
        let err = |source| StateError::Write {
            path: path.to_path_buf(),
            source,
        };
        match fs::remove_file(path) {
            Ok(()) => journal::sync_dir(path).map_err(err),
            Err(gone) if gone.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(other) => Err(err(other)),
        }
    }
}

/// Takes the exclusive lock on `<state_file>.lock` (flock), so that a second gateway pointed at the
/// same state file refuses to start instead of interleaving its journal records with this one's.
/// The lock goes with the returned file (or the process). A lock file this process may read but
/// not write (another user's) is locked all the same: `flock` needs no write access, and a
/// gateway that went without the lock would fold away the running one's journal. `Ok(None)`: there
/// is no lock file and none can be created (a read-only directory, say); the writer then keeps no
/// journal, and every change is a whole new state file (temp file and rename, refused where the
/// directory is read-only). A lock file that exists but can be neither written nor read (another
/// user's, unreadable) is an error: the gateway holding it could be running.
fn lock_state(store: &StateStore) -> Result<Option<fs::File>, StateError> {
    let lock = journal::with_suffix(store.path(), ".lock");
    let opened = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .or_else(|write_error| fs::File::open(&lock).map_err(|_| write_error));
    let file = match opened {
        Ok(file) => file,
        Err(e) if fs::symlink_metadata(&lock).is_ok() => {
            let message = format!(
                "{e}: the state lock file exists but cannot be opened, so the gateway holding the \
                 state file may be running; fix the lock file's permissions, or give each gateway \
                 its own state_file"
            );
            return Err(StateError::Read {
                path: lock,
                source: std::io::Error::new(e.kind(), message),
            });
        }
        Err(e) => {
            tracing::warn!(lock = %lock.display(), error = %e, "cannot create the state lock file");
            return Ok(None);
        }
    };
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: flock takes a file descriptor we own and no pointers.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(StateError::InUse {
                    path: store.path().to_path_buf(),
                    lock,
                });
            }
            return Err(StateError::Read {
                path: lock,
                source: e,
            });
        }
    }
    Ok(Some(file))
}

/// Name of the temporary file a new state file is written to, without the writer's pid:
/// `.<state file>.tmp.` (hidden, beside the state file).
fn snapshot_temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map_or_else(|| "rayshift-state.json".into(), |n| n.to_string_lossy());
    format!(".{name}{}", journal::TEMP_SUFFIX)
}

/// Removes temporary files a crash left behind while writing a new state file
/// (`.<state file>.tmp.<pid>`) or creating a journal (`<journal>.tmp.<pid>`). Best effort: a
/// file that cannot be removed is only logged.
fn remove_stale_temporaries(store: &StateStore) {
    let Some(journal_name) = store.journal_path().file_name() else {
        return;
    };
    let prefixes = [
        snapshot_temp_prefix(store.path()),
        format!("{}{}", journal_name.to_string_lossy(), journal::TEMP_SUFFIX),
    ];
    let dir = journal::dir_of(store.path());
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = prefixes.iter().any(|p| {
            name.strip_prefix(p.as_str())
                .is_some_and(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
        });
        if stale {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::info!(file = %entry.path().display(), "removed a temporary state file left by a crash")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a temporary state file left by a crash")
                }
            }
        }
    }
}

/// Bytes `state` takes as the payload of a journal record.
fn record_len(state: &State) -> usize {
    serde_json::to_vec(state).map_or(0, |p| p.len())
}

/// Nice +10 for the calling thread (on Linux, nice values are per thread), or leaves it where it
/// is when the process already runs nicer than that. Best effort: a failure leaves the thread at
/// the process's priority.
fn lower_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid, getpriority and setpriority take no pointers; lowering one's own priority
    // needs no privilege and affects only this thread.
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        let current = libc::getpriority(libc::PRIO_PROCESS, tid);
        if current < 10 {
            libc::setpriority(libc::PRIO_PROCESS, tid, 10);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_file_is_a_fresh_start_and_saves_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        assert!(store.load().unwrap().is_none());
        let mut state = State::new();
        state.shards.entry("shard-0".into()).or_default().weights =
            BTreeMap::from([("blue".into(), 70), ("green".into(), 30)]);
        store.save(&state).unwrap();
        let loaded = store.load().unwrap().unwrap();
        assert_eq!(
            loaded.shards["shard-0"].weights,
            state.shards["shard-0"].weights
        );
        assert_eq!(loaded.next_rollout_id, 1);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    fn weights(blue: u32) -> State {
        let mut state = State::new();
        state.shards.entry("s".into()).or_default().weights =
            BTreeMap::from([("blue".into(), blue)]);
        state
    }

    fn blue(state: &State) -> u32 {
        state.shards["s"].weights["blue"]
    }

    #[tokio::test]
    async fn the_writer_thread_saves_in_order_below_request_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let (writer, loaded) = StateWriter::open(store.clone()).unwrap();
        assert!(loaded.is_none());
        for weight in [10, 20, 30] {
            writer.save(weights(weight)).await.unwrap();
            assert_eq!(blue(&store.load().unwrap().unwrap()), weight);
        }
        // The changes are journal records: the state file was not rewritten for them.
        assert!(!store.path().exists());
        // A fold makes the state file current on its own.
        writer.fold().await.unwrap();
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), 30);
        assert!(journal::read(store.journal_path())
            .unwrap()
            .unwrap()
            .newest
            .is_none());
        // Linux: the writer thread runs at nice +10 or nicer (field 19 of its /proc stat line).
        #[cfg(target_os = "linux")]
        {
            let nice: Vec<i64> = fs::read_dir("/proc/self/task")
                .unwrap()
                .map(|t| t.unwrap().path())
                .filter(|t| {
                    fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "rayshift-state")
                })
                .map(|t| {
                    let stat = fs::read_to_string(t.join("stat")).unwrap();
                    let fields: Vec<&str> = stat
                        .rsplit_once(')')
                        .unwrap()
                        .1
                        .split_whitespace()
                        .collect();
                    fields[16].parse().unwrap()
                })
                .collect();
            assert!(
                !nice.is_empty() && nice.iter().all(|n| *n >= 10),
                "{nice:?}"
            );
        }
        // A failed write is reported, not lost; the writer still starts without a journal.
        let (gone, _) = StateWriter::open(StateStore::new(
            dir.path().join("missing").join("state.json"),
        ))
        .unwrap();
        let e = gone.save(State::new()).await.unwrap_err();
        assert!(e.to_string().contains("writing state file"), "{e}");
    }

    /// Opens `store` once the previous writer's thread (its last handle dropped) has let go of the
    /// lock.
    async fn reopen(store: &StateStore) -> (StateWriter, Option<State>) {
        for _ in 0..2000 {
            match StateWriter::open(store.clone()) {
                Err(StateError::InUse { .. }) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await
                }
                other => return other.unwrap(),
            }
        }
        panic!("the previous writer kept the state lock");
    }

    /// A second writer on the same state file is refused while the first one runs.
    #[tokio::test]
    async fn a_second_gateway_on_the_same_state_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        writer.save(weights(5)).await.unwrap();
        let e = StateWriter::open(store.clone()).unwrap_err();
        assert!(matches!(e, StateError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("in use by another rayshift"), "{e}");
        // The refused start changed nothing.
        assert_eq!(blue(&store.load().unwrap().unwrap()), 5);
        writer.save(weights(6)).await.unwrap();
        assert_eq!(blue(&store.load().unwrap().unwrap()), 6);
        // Once the first writer is gone, the state file is free again.
        drop(writer);
        let (_, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 6);
    }

    /// A crash (no fold) leaves the newest change in the journal; the next start reads it and
    /// folds it into the state file.
    #[tokio::test]
    async fn records_survive_a_crash_and_are_folded_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.save(&weights(1)).unwrap();
        let (writer, loaded) = StateWriter::open(store.clone()).unwrap();
        assert_eq!(blue(&loaded.unwrap()), 1);
        writer.save(weights(2)).await.unwrap();
        writer.save(weights(3)).await.unwrap();
        drop(writer);
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), 1, "the state file is only a snapshot");
        let (writer, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 3);
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), 3, "folded at start");
        writer.save(weights(4)).await.unwrap();
        assert_eq!(blue(&store.load().unwrap().unwrap()), 4);
    }

    /// Writes a state file as something other than the writer would: a crash after the new
    /// snapshot, a restored backup, a version without a journal.
    fn replace_state_file(store: &StateStore, state: &State) {
        fs::write(store.path(), serde_json::to_vec(state).unwrap()).unwrap();
    }

    /// Records follow the state file they were made after. A state file replaced since (restored
    /// from a backup here; a crash between a new snapshot and the retirement looks the same) is
    /// used as it is, the records are dropped, and the journal follows the state file again.
    #[tokio::test]
    async fn records_do_not_override_another_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.save(&weights(1)).unwrap();
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        writer.save(weights(2)).await.unwrap();
        writer.save(weights(3)).await.unwrap();
        drop(writer);
        replace_state_file(&store, &weights(7));
        assert_eq!(blue(&store.load().unwrap().unwrap()), 7);
        let (writer, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 7, "the journal's records won");
        let contents = journal::read(store.journal_path()).unwrap().unwrap();
        assert!(contents.newest.is_none());
        assert_eq!(
            contents.follows,
            Some(journal::follows(Some(&fs::read(store.path()).unwrap())))
        );
        // Records made after that start apply (a crash again: no fold).
        writer.save(weights(8)).await.unwrap();
        drop(writer);
        let (_, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 8);
    }

    /// Records that follow a state file which is missing now stop the start (and change nothing):
    /// dropping them silently would reset the operator's weights.
    #[tokio::test]
    async fn records_after_a_missing_state_file_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let store = crashed_with_a_record(dir.path()).await;
        fs::remove_file(store.path()).unwrap();
        let before = fs::read(store.journal_path()).unwrap();
        let mut outcome = StateWriter::open(store.clone());
        for _ in 0..1000 {
            if !matches!(outcome, Err(StateError::InUse { .. })) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            outcome = StateWriter::open(store.clone());
        }
        let Err(e) = outcome else {
            panic!("started over a journal whose state file is missing");
        };
        assert!(matches!(e, StateError::SnapshotMissing { .. }), "{e}");
        assert!(e.to_string().contains("restore the state file"), "{e}");
        assert_eq!(fs::read(store.journal_path()).unwrap(), before);
        assert!(!store.path().exists());
    }

    /// A state file of blue 1 and, after a crash (no fold), a journal holding blue 2.
    async fn crashed_with_a_record(dir: &Path) -> StateStore {
        let store = StateStore::new(dir.join("state.json"));
        store.save(&weights(1)).unwrap();
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        writer.save(weights(2)).await.unwrap();
        drop(writer);
        store
    }

    /// [`crashed_with_a_record`], the journal as a version before the header named its state
    /// file wrote it (the header's first 24 bytes only).
    async fn older_version_journal(dir: &Path) -> StateStore {
        use std::os::unix::fs::FileExt;
        let store = crashed_with_a_record(dir).await;
        fs::OpenOptions::new()
            .write(true)
            .open(store.journal_path())
            .unwrap()
            .write_all_at(&[0u8; 32], 24)
            .unwrap();
        store
    }

    /// The path of the temporary file this process writes a new state file of `store` to: a
    /// directory there makes the write fail.
    fn temp_path(store: &StateStore) -> PathBuf {
        journal::dir_of(store.path()).join(format!(
            "{}{}",
            snapshot_temp_prefix(store.path()),
            std::process::id()
        ))
    }

    /// A journal written by a version that did not name its state file applies as it did then,
    /// and follows the state file from the first start on.
    #[tokio::test]
    async fn a_journal_of_an_older_version_applies_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let store = older_version_journal(dir.path()).await;
        // And the state file as that version wrote it (compact, not this version's bytes).
        replace_state_file(&store, &weights(1));
        assert_eq!(
            journal::read(store.journal_path())
                .unwrap()
                .unwrap()
                .follows,
            None
        );
        let (_, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 2);
        let contents = journal::read(store.journal_path()).unwrap().unwrap();
        assert_eq!(
            contents.follows,
            Some(journal::follows(Some(&fs::read(store.path()).unwrap())))
        );
    }

    /// A state lock file that is there but cannot be opened (another user's, unreadable; here a
    /// symbolic link into a directory that does not exist, which root cannot open either) stops
    /// the start and changes nothing: the gateway holding the lock may be running, and folding its
    /// journal away would lose the changes it acknowledges from then on.
    #[tokio::test]
    async fn a_lock_that_cannot_be_taken_stops_the_start_and_leaves_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let store = crashed_with_a_record(dir.path()).await;
        let lock = journal::with_suffix(store.path(), ".lock");
        fs::remove_file(&lock).unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone/state.json.lock"), &lock).unwrap();
        let journal_before = fs::read(store.journal_path()).unwrap();
        let state_before = fs::read(store.path()).unwrap();

        let Err(err) = StateWriter::open(store.clone()) else {
            panic!("the start is refused");
        };
        assert!(
            err.to_string()
                .contains("the state lock file exists but cannot be opened"),
            "{err}"
        );
        assert_eq!(fs::read(store.journal_path()).unwrap(), journal_before);
        assert_eq!(fs::read(store.path()).unwrap(), state_before);
        assert_eq!(
            blue(&store.load().unwrap().unwrap()),
            2,
            "the record is kept"
        );
    }

    /// Without the state lock (no lock file, and none can be made: a read-only directory) no
    /// journal is kept: records a crash left are folded into the state file and the journal is
    /// removed, and every change is a whole state file. (Root can make a lock file anywhere it can
    /// write, so the files are set up here as the writer would hold them without one.)
    #[tokio::test]
    async fn without_the_lock_no_journal_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = crashed_with_a_record(dir.path()).await;
        let Loaded {
            state,
            contents,
            snapshot,
            applies,
        } = store.load_with_journal().unwrap();
        let mut files = StateFiles {
            store: store.clone(),
            journal: None,
            last: state,
            snapshot,
            behind: false,
            lock: None,
        };
        files.open_journal(contents, applies);
        let folded = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&folded), 2, "the crash's record is folded");
        assert!(!store.journal_path().exists(), "the journal is removed");
        files.save(weights(3)).unwrap();
        assert!(!store.journal_path().exists(), "no journal is started");
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), 3, "the change is a whole state file");
    }

    /// A lock file that is there but cannot be opened (here a link to nowhere; as another user's
    /// unreadable file would be) stops the start: the gateway holding it may be running, and one
    /// without the lock would fold away its journal.
    #[cfg(unix)]
    #[test]
    fn a_lock_file_that_cannot_be_opened_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let lock = dir.path().join("state.json.lock");
        std::os::unix::fs::symlink(dir.path().join("gone/lock"), &lock).unwrap();
        let err = lock_state(&store).unwrap_err();
        assert!(
            err.to_string()
                .contains("the state lock file exists but cannot be opened"),
            "{err}"
        );
        // Nothing there at all, in a directory where none can be made: no lock, no journal.
        let missing = StateStore::new(dir.path().join("gone/state.json"));
        assert!(lock_state(&missing).unwrap().is_none());
    }

    /// A writer's files with a journal, as the writer thread holds them, and the path at which a
    /// directory makes the next state-file write fail (its temporary file cannot be created).
    fn files_with_journal(dir: &Path) -> (StateFiles, PathBuf) {
        let store = StateStore::new(dir.join("state.json"));
        let snapshot = store.save(&weights(1)).unwrap();
        let lock = lock_state(&store).unwrap();
        assert!(lock.is_some());
        let block = temp_path(&store);
        let mut files = StateFiles {
            store,
            journal: None,
            last: Some(weights(1)),
            snapshot,
            behind: false,
            lock,
        };
        files.open_journal(None, false);
        assert!(files.journal.is_some());
        (files, block)
    }

    /// Closes the files (the writer stops) and reads the state as the next start would.
    fn blue_at_next_start(files: StateFiles) -> u32 {
        let store = files.store.clone();
        drop(files);
        blue(&store.load().unwrap().unwrap())
    }

    /// A journal record whose `fdatasync` fails, when the state file cannot be written either, is
    /// answered as not made, and it is withdrawn: it does not take effect at the next start (from
    /// the page cache or the disk), and the acknowledged change before it stays.
    #[test]
    fn a_failed_append_is_withdrawn_and_does_not_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, block) = files_with_journal(dir.path());
        files.save(weights(2)).unwrap();
        files.journal.as_mut().unwrap().failing_syncs = 1;
        fs::create_dir(&block).unwrap();
        match files.save(weights(9)) {
            Err(StateError::Write { .. }) => {}
            other => panic!("expected a write error, got {other:?}"),
        }
        assert_eq!(blue_at_next_start(files), 2, "the refused change came back");
    }

    /// When withdrawing the record fails too, the answer says the change may take effect at the
    /// next start instead of claiming the old state is in place; the next successful write
    /// replaces the record.
    #[test]
    fn a_record_that_cannot_be_withdrawn_is_reported_as_uncertain() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, block) = files_with_journal(dir.path());
        files.save(weights(2)).unwrap();
        files.journal.as_mut().unwrap().failing_syncs = 2;
        fs::create_dir(&block).unwrap();
        match files.save(weights(9)) {
            Err(e @ StateError::Uncertain { .. }) => {
                assert!(e.to_string().contains("may take effect"), "{e}")
            }
            other => panic!("expected an uncertain outcome, got {other:?}"),
        }
        fs::remove_dir(&block).unwrap();
        files.save(weights(3)).unwrap();
        // The new state file's journal holds nothing and follows it.
        let contents = journal::read(files.store.journal_path()).unwrap().unwrap();
        assert!(contents.newest.is_none());
        let on_disk = fs::read(files.store.path()).unwrap();
        assert_eq!(contents.follows, Some(journal::follows(Some(&on_disk))));
        assert_eq!(blue_at_next_start(files), 3);
    }

    /// A record that could not be withdrawn is settled by the graceful stop's fold when no later
    /// change did: the state in effect is written again.
    #[test]
    fn a_graceful_stop_settles_a_record_that_could_not_be_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, block) = files_with_journal(dir.path());
        files.save(weights(2)).unwrap();
        files.fold_if_needed().unwrap();
        assert!(!files.behind);
        files.journal.as_mut().unwrap().failing_syncs = 2;
        fs::create_dir(&block).unwrap();
        assert!(matches!(
            files.save(weights(9)),
            Err(StateError::Uncertain { .. })
        ));
        assert!(files.behind);
        fs::remove_dir(&block).unwrap();
        files.fold_if_needed().unwrap();
        assert_eq!(blue_at_next_start(files), 2);
    }

    /// A graceful stop folds the journal's acknowledged records into the state file also when the
    /// journal has become unusable since (an append failed): the state file alone is then current.
    #[test]
    fn a_fold_after_the_journal_failed_still_writes_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, block) = files_with_journal(dir.path());
        files.save(weights(2)).unwrap();
        files.journal.as_mut().unwrap().failing_syncs = 1;
        fs::create_dir(&block).unwrap();
        assert!(files.save(weights(9)).is_err());
        assert!(files.journal.is_none());
        fs::remove_dir(&block).unwrap();
        files.fold_if_needed().unwrap();
        let snapshot = parse(&fs::read(files.store.path()).unwrap(), files.store.path()).unwrap();
        assert_eq!(blue(&snapshot), 2);
    }

    /// A new state file whose journal can neither be retired nor replaced nor removed is not
    /// reported as "old state still in place": the state file holds the change.
    #[test]
    fn a_state_file_written_with_its_journal_stuck_is_reported_as_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, _) = files_with_journal(dir.path());
        // The journal's path becomes a directory that is not empty: no rename onto it, no removal.
        let journal = files.store.journal_path().to_path_buf();
        files.journal = None;
        fs::remove_file(&journal).unwrap();
        fs::create_dir(&journal).unwrap();
        fs::write(journal.join("keep"), b"x").unwrap();
        match files.save(weights(4)) {
            Err(e @ StateError::Unsettled { .. }) => {
                assert!(e.to_string().contains("may take effect"), "{e}")
            }
            other => panic!("expected Unsettled, got {other:?}"),
        }
        let snapshot = parse(&fs::read(files.store.path()).unwrap(), files.store.path()).unwrap();
        assert_eq!(blue(&snapshot), 4);
    }

    /// A state-file write that fails after the new file is in place (its directory's fsync, say:
    /// here the file is replaced by hand and the write then fails) leaves a journal whose records
    /// no longer follow the file on disk: it takes no more records, which the next start would
    /// drop, and the answer says the change may be in effect.
    #[test]
    fn a_journal_takes_no_records_once_the_state_file_changed_under_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let (mut files, block) = files_with_journal(dir.path());
        files.save(weights(2)).unwrap();
        replace_state_file(&files.store, &weights(5));
        fs::create_dir(&block).unwrap();
        match files.fold(&weights(5)) {
            Err(e @ StateError::Unsettled { .. }) => {
                assert!(e.to_string().contains("may take effect"), "{e}")
            }
            other => panic!("expected Unsettled, got {other:?}"),
        }
        assert!(files.journal.is_none(), "the journal still takes records");
        assert!(files.behind);
        fs::remove_dir(&block).unwrap();
        files.save(weights(6)).unwrap();
        assert_eq!(blue_at_next_start(files), 6);
    }

    /// An older version's journal whose records apply but cannot be folded at start (the state
    /// file cannot be written then) still takes the next changes, which apply at the start after.
    #[tokio::test]
    async fn an_older_journal_that_cannot_be_folded_at_start_still_takes_changes() {
        let dir = tempfile::tempdir().unwrap();
        let store = older_version_journal(dir.path()).await;
        // The next writer's temporary state file cannot be created.
        let block = temp_path(&store);
        fs::create_dir(&block).unwrap();
        let (writer, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 2);
        writer.save(weights(3)).await.unwrap();
        drop(writer);
        fs::remove_dir(&block).unwrap();
        let (_, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 3);
    }

    /// A lock file this process can open for reading only (another user's, or here a directory,
    /// which also root cannot open for writing) is locked all the same: a second gateway on the
    /// same state file refuses to start, and the running one's journal stays where it is.
    #[tokio::test]
    async fn a_lock_file_that_cannot_be_written_still_locks() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        store.save(&weights(1)).unwrap();
        let lock = journal::with_suffix(store.path(), ".lock");
        fs::create_dir(&lock).unwrap();
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        writer.save(weights(2)).await.unwrap();
        assert!(
            store.journal_path().exists(),
            "the locked writer keeps a journal"
        );
        match StateWriter::open(store.clone()) {
            Err(StateError::InUse { .. }) => {}
            Err(other) => panic!("expected InUse, got {other}"),
            Ok(_) => panic!("a second writer opened the state in use"),
        }
        assert!(
            store.journal_path().exists(),
            "the running writer's journal is kept"
        );
        drop(writer);
        let (_, loaded) = reopen(&store).await;
        assert_eq!(blue(&loaded.unwrap()), 2);
    }

    /// Temporary files a crash left (a state file or a journal being written) are removed at the
    /// next start; other files in the directory are not touched.
    #[tokio::test]
    async fn temporaries_left_by_a_crash_are_removed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let stale = [
            dir.path().join(".state.json.tmp.4242"),
            dir.path().join("state.json.journal.tmp.4242"),
        ];
        let kept = [
            dir.path().join("state.json.tmp.notes"),
            dir.path().join("other.json.journal.tmp.1"),
        ];
        for f in stale.iter().chain(&kept) {
            fs::write(f, b"partial").unwrap();
        }
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        for f in &stale {
            assert!(!f.exists(), "{} left", f.display());
        }
        for f in &kept {
            assert!(f.exists(), "{} removed", f.display());
        }
        writer.save(weights(1)).await.unwrap();
        assert_eq!(blue(&store.load().unwrap().unwrap()), 1);
    }

    /// A full journal is folded into the state file and starts over; a state too large for it
    /// gets a larger journal.
    #[tokio::test]
    async fn a_full_journal_is_folded_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let (writer, _) = StateWriter::open(store.clone()).unwrap();
        let per_journal = journal::MIN_CAPACITY / journal::BLOCK - 1;
        for n in 0..per_journal as u32 + 10 {
            writer.save(weights(n)).await.unwrap();
        }
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), per_journal as u32, "folded when full");
        let contents = journal::read(store.journal_path()).unwrap().unwrap();
        assert_eq!(contents.epoch, 2);
        assert_eq!(
            blue(&store.load().unwrap().unwrap()),
            per_journal as u32 + 9
        );

        let mut big = weights(7);
        for n in 0..20_000 {
            big.shards.entry(format!("shard-{n}")).or_default();
        }
        writer.save(big.clone()).await.unwrap();
        writer.save(big).await.unwrap();
        let len = fs::metadata(store.journal_path()).unwrap().len();
        assert!(len > journal::MIN_CAPACITY, "{len}");
        assert_eq!(store.load().unwrap().unwrap().shards.len(), 20_001);
    }

    /// A journal record that is valid but not a state document stops the start, like a corrupt
    /// state file, naming the journal.
    #[test]
    fn a_corrupt_journal_record_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let mut j = journal::Journal::create(
            store.journal_path(),
            journal::MIN_CAPACITY,
            journal::follows(None),
        )
        .unwrap();
        j.append(b"{\"version\": 1, \"shards\": 3}").unwrap();
        let e = StateWriter::open(store.clone()).unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("state.json.journal"), "{e}");
    }

    /// A journal whose header is damaged stops the start, naming the journal, and is left as it
    /// was: its records may hold acknowledged changes.
    #[test]
    fn a_damaged_journal_header_refuses_and_keeps_the_journal() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let snapshot = store.save(&weights(1)).unwrap();
        let mut j = journal::Journal::create(store.journal_path(), journal::MIN_CAPACITY, snapshot)
            .unwrap();
        j.append(&serde_json::to_vec(&weights(2)).unwrap()).unwrap();
        drop(j);
        fs::OpenOptions::new()
            .write(true)
            .open(store.journal_path())
            .unwrap()
            .write_all_at(b"\xff", 9)
            .unwrap();
        let before = fs::read(store.journal_path()).unwrap();
        let e = StateWriter::open(store.clone()).unwrap_err();
        assert!(matches!(e, StateError::Read { .. }), "{e}");
        let message = e.to_string();
        assert!(
            message.contains("state.json.journal") && message.contains("damaged header"),
            "{message}"
        );
        assert_eq!(
            fs::read(store.journal_path()).unwrap(),
            before,
            "journal changed"
        );
        let snapshot = parse(&fs::read(store.path()).unwrap(), store.path()).unwrap();
        assert_eq!(blue(&snapshot), 1);
    }

    #[test]
    fn corrupt_and_unknown_version_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::new(&path);
        fs::write(&path, b"{\"version\": 1, \"shards\": ").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("corrupt"), "{e}");
        fs::write(&path, b"{\"version\": 7, \"shards\": {}}").unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Version { found: 7, .. }), "{e}");
    }

    /// A policy edited by hand to a value the API would refuse (`step_percent: 0` would step
    /// forever without moving) stops the load, naming the key.
    #[test]
    fn a_hand_edited_invalid_policy_refuses() {
        use crate::shift::{Shift, ShiftPolicy, Target};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let store = StateStore::new(&path);
        let mut state = State::new();
        state.shards.entry("s".into()).or_default().shift = Some(Shift::new(
            Target::Cluster("green".into()),
            vec!["green".into()],
            ShiftPolicy::default(),
            BTreeMap::from([("blue".into(), 100), ("green".into(), 0)]),
        ));
        let text = serde_json::to_string_pretty(&state).unwrap();
        fs::write(&path, &text).unwrap();
        assert!(store.load().is_ok());
        fs::write(
            &path,
            text.replace("\"step_percent\": 10", "\"step_percent\": 0"),
        )
        .unwrap();
        let e = store.load().unwrap_err();
        assert!(matches!(e, StateError::Invalid { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("shards.s.shift.policy.step_percent: expected an integer 1-100"),
            "{e}"
        );
    }

    #[test]
    fn unwritable_directory_reports_and_keeps_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("missing-dir").join("state.json"));
        let e = store.save(&State::new()).unwrap_err();
        assert!(matches!(e, StateError::Write { .. }), "{e}");
    }
}
