//! The durable state file: weights (and shifts) are written here before they take effect.
//!
//! Writes are atomic: the new content goes to a temporary file in the same directory, is fsynced, and
//! renamed over the old file, and the directory is fsynced; a crash leaves either the old or the new
//! state, never a torn one. A file that cannot be read or has an unknown version stops the gateway
//! at start: it never silently resets an operator's weights.

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
    /// The Kubernetes API refused or failed a read or write of the state object.
    #[error("state object {path}: {message}")]
    Kube {
        /// The object.
        path: PathBuf,
        /// What went wrong.
        message: String,
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
    /// The newest revision an automatic shift was started for, so a rolled-back revision is not
    /// retried in a loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_shift_revision: Option<String>,
}

impl StateError {
    /// An error of the same kind and message, for answering every change of a failed group write.
    pub fn same_kind(&self, message: &str) -> StateError {
        match self {
            StateError::Conflict(path) => StateError::Conflict(path.clone()),
            StateError::Kube { path, .. } => StateError::Kube {
                path: path.clone(),
                message: message.to_string(),
            },
            StateError::Read { path, source } | StateError::Write { path, source } => {
                StateError::Write {
                    path: path.clone(),
                    source: std::io::Error::new(source.kind(), source.to_string()),
                }
            }
            StateError::Corrupt { path, .. } | StateError::Version { path, .. } => {
                StateError::Write {
                    path: path.clone(),
                    source: std::io::Error::other(message.to_string()),
                }
            }
        }
    }
}

impl State {
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
    serde_json::from_slice(bytes).map_err(|source| StateError::Corrupt {
        path: origin.to_path_buf(),
        source,
    })
}

/// The state file on disk.
#[derive(Debug, Clone)]
pub struct StateStore {
    path: PathBuf,
}

impl StateStore {
    /// A store at `path` (nothing is read or written yet).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the state; a missing file is a fresh start (`Ok(None)`), anything unreadable is an error.
    pub fn load(&self) -> Result<Option<State>, StateError> {
        let bytes = match fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        parse(&bytes, &self.path).map(Some)
    }

    /// Writes `state` atomically and durably (temp file, fsync, rename, fsync of the directory).
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let err = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let mut body = serde_json::to_vec_pretty(state).map_err(|e| err(e.into()))?;
        body.push(b'\n');
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "rayshift-state.json".into());
        let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            // The rename is durable only once the directory entry is.
            fs::File::open(&dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(err)
    }
}

/// One write for [`StateWriter`]: the state, and where its outcome goes.
type WriteJob = (State, tokio::sync::oneshot::Sender<Result<(), StateError>>);

/// Writes the state file on a thread of its own, one write at a time, at a lower CPU priority than
/// request handling (nice +10 on Linux). A durable write sleeps in fsync twice; woken at the
/// proxy's own priority, the writer would preempt request handling on a busy core each time
/// (BENCHMARKS.md, Churn). The thread ends when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct StateWriter {
    path: PathBuf,
    jobs: std::sync::mpsc::Sender<WriteJob>,
}

impl StateWriter {
    /// Starts the writer thread for `store`.
    pub fn spawn(store: StateStore) -> Result<Self, StateError> {
        let path = store.path().to_path_buf();
        let (jobs, pending) = std::sync::mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("rayshift-state".into())
            .spawn(move || {
                lower_thread_priority();
                while let Ok((state, reply)) = pending.recv() {
                    let _ = reply.send(store.save(&state));
                }
            })
            .map_err(|source| StateError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, jobs })
    }

    /// Path of the state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `state` atomically and durably (see [`StateStore::save`]) and waits for it.
    pub async fn save(&self, state: State) -> Result<(), StateError> {
        let gone = || StateError::Write {
            path: self.path.clone(),
            source: std::io::Error::other("the state writer thread has stopped"),
        };
        let (reply, outcome) = tokio::sync::oneshot::channel();
        self.jobs.send((state, reply)).map_err(|_| gone())?;
        outcome.await.map_err(|_| gone())?
    }
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

    #[tokio::test]
    async fn the_writer_thread_saves_in_order_below_request_priority() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("state.json"));
        let writer = StateWriter::spawn(store.clone()).unwrap();
        for weight in [10, 20, 30] {
            let mut state = State::new();
            state.shards.entry("s".into()).or_default().weights =
                BTreeMap::from([("blue".into(), weight)]);
            writer.save(state).await.unwrap();
            let loaded = store.load().unwrap().unwrap();
            assert_eq!(loaded.shards["s"].weights["blue"], weight);
        }
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
        // A failed write is reported, not lost.
        let gone = StateWriter::spawn(StateStore::new(
            dir.path().join("missing").join("state.json"),
        ))
        .unwrap();
        assert!(gone.save(State::new()).await.is_err());
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

    #[test]
    fn unwritable_directory_reports_and_keeps_old_state() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("missing-dir").join("state.json"));
        let e = store.save(&State::new()).unwrap_err();
        assert!(matches!(e, StateError::Write { .. }), "{e}");
    }
}
