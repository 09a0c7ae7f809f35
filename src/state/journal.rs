//! The state journal: between two snapshots of the state file, each change is one record written
//! into `<state_file>.journal` and made durable with a single `fdatasync`.
//!
//! Rewriting the state file for every change costs a file creation, a rename and two fsyncs (file
//! and directory): metadata the filesystem must commit to its own journal each time. The journal
//! file's blocks are written (zero-filled) when it is created, so a record overwrites blocks that
//! already exist, changes no metadata, and `fdatasync` flushes only the data (BENCHMARKS.md, Churn).
//!
//! Layout, in blocks of [`BLOCK`] bytes. Block 0 is the header: magic `RSJRNL01`, the epoch
//! (`u64` LE) and an XXH3-64 of both; then magic `RSJFLW01`, the [`follows`] hash of the state
//! file the records follow, the epoch again and an XXH3-64 of those three (journals of versions
//! before it end the header after the first part, and their epoch bumps leave a stale second
//! part: either way the journal then follows an unknown state file). Records follow from block 1, each starting on a block
//! boundary: magic `RSRC`, the epoch, the payload length (`u32` LE), an XXH3-64 of epoch, length
//! and payload, then the payload, the whole state as compact JSON. The journal's state is the last
//! record of the chain of valid records (right magic, the header's epoch, matching checksum)
//! starting at block 1: a torn write, never acknowledged, ends the chain. Bumping the header's
//! epoch retires every record at once; that is done after the state was written as a new snapshot,
//! and names that snapshot as the one the journal now follows.
//!
//! Records apply only on top of the state file they follow: after a crash between writing a new
//! snapshot and retiring the records, or when the state file was restored from a backup or
//! rewritten by a version without a journal, the state file beside the journal is another one,
//! and its records are older than it (see [`crate::state`]).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::Xxh3;

/// Journal block size: the header and every record start on a multiple of it.
pub const BLOCK: u64 = 4096;
/// Smallest journal (256 blocks: the header and up to 255 small records between snapshots).
pub const MIN_CAPACITY: u64 = 1 << 20;
const HEADER_MAGIC: &[u8; 8] = b"RSJRNL01";
const FOLLOWS_MAGIC: &[u8; 8] = b"RSJFLW01";
/// The header: magic, epoch, checksum; follows magic, follows hash, epoch, checksum.
const HEADER_LEN: usize = 24 + 32;
const RECORD_MAGIC: &[u8; 4] = b"RSRC";
/// Magic, epoch, payload length, checksum.
const RECORD_HEAD: usize = 4 + 8 + 4 + 8;

/// The journal that goes with state file `state_file`: the same path with `.journal` appended.
pub fn path_for(state_file: &Path) -> PathBuf {
    with_suffix(state_file, ".journal")
}

/// `file` with `suffix` appended to its name (`state.json` -> `state.json.lock`).
pub fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// A new journal (and a new state file) is written to `<name>` + `TEMP_SUFFIX` + the writer's pid
/// before it is renamed into place.
pub(crate) const TEMP_SUFFIX: &str = ".tmp.";

/// The directory `file` is in (`.` for a bare file name).
pub fn dir_of(file: &Path) -> &Path {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The hash that names a state file's contents in a journal header: XXH3-64 of its bytes, of no
/// bytes for a missing state file.
pub fn follows(snapshot: Option<&[u8]>) -> u64 {
    xxhash_rust::xxh3::xxh3_64(snapshot.unwrap_or_default())
}

/// What a journal file holds.
#[derive(Debug)]
pub struct Contents {
    /// The header's epoch.
    pub epoch: u64,
    /// The [`follows`] hash of the state file the records apply to; `None` when the header does
    /// not say (written by a version before it).
    pub follows: Option<u64>,
    /// Payload of the newest valid record of the epoch, if any.
    pub newest: Option<Vec<u8>>,
    /// Offset after the newest record (where the next one goes).
    pub end: u64,
}

/// Reads the journal at `path`. `Ok(None)`: there is no journal file. A file whose header is not
/// valid is an error (`InvalidData`): the header is written whole (at creation, through a rename)
/// or as 24 bytes within one sector (retiring), so a damaged one means a damaged file, whose
/// records may hold acknowledged changes; the start stops instead of dropping them silently.
pub fn read(path: &Path) -> io::Result<Option<Contents>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some((epoch, follows)) = parse_header(&bytes) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a valid rayshift state journal (damaged header); remove it to start from the \
             state file alone, which drops the changes the journal held",
        ));
    };
    let mut at = BLOCK as usize;
    let mut newest = None;
    while let Some((payload, next)) = parse_record(&bytes, at, epoch) {
        newest = Some(payload);
        at = next;
    }
    // Records are appended in order, each durable before the next is written, so only the last
    // can be torn. A valid record of the epoch after the end of the chain means a record before
    // it was damaged after it was acknowledged (a bad sector, bit rot): stopping here would fold
    // the older state and lose the later, acknowledged ones without a word.
    if let Some(later) = (at + BLOCK as usize..bytes.len())
        .step_by(BLOCK as usize)
        .find(|&off| parse_record(&bytes, off, epoch).is_some())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the record at block {} is damaged but the one at block {} is valid: acknowledged \
                 changes would be lost; restore the file, or remove it to start from the state \
                 file alone, which drops the changes the journal held",
                at / BLOCK as usize,
                later / BLOCK as usize
            ),
        ));
    }
    Ok(Some(Contents {
        epoch,
        follows,
        newest: newest.map(<[u8]>::to_vec),
        end: at as u64,
    }))
}

/// The header of `epoch` for records that follow the state file of hash `follows`. Both parts lie
/// in the first 512 bytes, so the one write of a retirement replaces them together.
fn header(epoch: u64, follows: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(HEADER_MAGIC);
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..16]);
    h[16..24].copy_from_slice(&sum.to_le_bytes());
    h[24..32].copy_from_slice(FOLLOWS_MAGIC);
    h[32..40].copy_from_slice(&follows.to_le_bytes());
    h[40..48].copy_from_slice(&epoch.to_le_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&h[24..48]);
    h[48..56].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The header's epoch, and the state file its records follow when the header says (a second
/// part of the same epoch).
fn parse_header(bytes: &[u8]) -> Option<(u64, Option<u64>)> {
    let h = bytes.get(..24)?;
    let epoch = u64::from_le_bytes(h[8..16].try_into().ok()?);
    if *h != header(epoch, 0)[..24] {
        return None;
    }
    let follows = bytes.get(24..HEADER_LEN).and_then(|f| {
        let hash = u64::from_le_bytes(f[8..16].try_into().ok()?);
        (f == &header(epoch, hash)[24..]).then_some(hash)
    });
    Some((epoch, follows))
}

fn record_checksum(epoch: u64, payload: &[u8]) -> u64 {
    let mut sum = Xxh3::new();
    sum.update(&epoch.to_le_bytes());
    sum.update(&(payload.len() as u32).to_le_bytes());
    sum.update(payload);
    sum.digest()
}

/// Bytes a record of a `len`-byte payload occupies (whole blocks).
fn record_size(len: usize) -> u64 {
    (RECORD_HEAD + len).div_ceil(BLOCK as usize) as u64 * BLOCK
}

/// The valid record at `at` of `epoch`: its payload and the offset after it.
fn parse_record(bytes: &[u8], at: usize, epoch: u64) -> Option<(&[u8], usize)> {
    let head = bytes.get(at..at.checked_add(RECORD_HEAD)?)?;
    if &head[..4] != RECORD_MAGIC || u64::from_le_bytes(head[4..12].try_into().ok()?) != epoch {
        return None;
    }
    let len = u32::from_le_bytes(head[12..16].try_into().ok()?) as usize;
    let sum = u64::from_le_bytes(head[16..24].try_into().ok()?);
    let start = at + RECORD_HEAD;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    (record_checksum(epoch, payload) == sum).then(|| (payload, at + record_size(len) as usize))
}

/// The capacity a journal needs so that a state of `len` bytes fits at least 16 times.
pub fn capacity_for(len: usize) -> u64 {
    (record_size(len) * 16 + BLOCK).max(MIN_CAPACITY)
}

/// An open journal, appended to by the state writer thread.
#[derive(Debug)]
pub struct Journal {
    file: File,
    epoch: u64,
    /// The state file the records follow, as the header names it (`None`: a journal of a version
    /// that did not name it).
    follows: Option<u64>,
    next: u64,
    capacity: u64,
    /// Tests: this many of the next `fdatasync`s fail, as on a failing disk.
    #[cfg(test)]
    pub(crate) failing_syncs: u32,
}

/// An append failed and its record could not be withdrawn either: the record may be durable and
/// take effect at the next start, although the change was reported as not made.
#[derive(Debug, thiserror::Error)]
#[error(
    "{write}; withdrawing the record failed too ({withdraw}): it may take effect at the next start"
)]
pub struct NotWithdrawn {
    /// Why the append failed.
    pub write: io::Error,
    /// Why zeroing its block failed.
    pub withdraw: io::Error,
}

impl Journal {
    /// Creates an empty journal of `capacity` bytes at `path` whose records follow the state file
    /// of hash `follows`, replacing any journal there: written in full to a temporary file,
    /// synced, renamed into place, and the directory synced.
    pub fn create(path: &Path, capacity: u64, follows: u64) -> io::Result<Journal> {
        let capacity = capacity.max(MIN_CAPACITY).div_ceil(BLOCK) * BLOCK;
        let tmp = with_suffix(path, &format!("{TEMP_SUFFIX}{}", std::process::id()));
        let result = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)?;
            // Real zeros, not a sparse file or fallocate's unwritten extents: a record must land
            // in blocks that exist and are written, or its fdatasync would commit metadata.
            let zeros = vec![0u8; 64 * BLOCK as usize];
            let mut at = 0;
            while at < capacity {
                let n = (capacity - at).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], at)?;
                at += n as u64;
            }
            file.write_all_at(&header(1, follows), 0)?;
            file.sync_all()?;
            fs::rename(&tmp, path)?;
            sync_dir(path)?;
            Ok(file)
        })();
        match result {
            Ok(file) => Ok(Journal {
                file,
                epoch: 1,
                follows: Some(follows),
                next: BLOCK,
                capacity,
                #[cfg(test)]
                failing_syncs: 0,
            }),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Opens the journal at `path` that [`read`] returned `contents` for, to append after its
    /// newest record.
    pub fn reopen(path: &Path, contents: &Contents) -> io::Result<Journal> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let capacity = file.metadata()?.len() / BLOCK * BLOCK;
        Ok(Journal {
            file,
            epoch: contents.epoch,
            follows: contents.follows,
            next: contents.end,
            capacity,
            #[cfg(test)]
            failing_syncs: 0,
        })
    }

    /// The [`follows`] hash of the state file the records apply to (`None`: not named).
    pub fn follows(&self) -> Option<u64> {
        self.follows
    }

    /// Bytes the journal file holds.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// True when no record was written since the last [`Journal::retire`] (or creation).
    pub fn is_empty(&self) -> bool {
        self.next == BLOCK
    }

    /// Writes `payload` as the newest record and waits until it is durable. `Ok(false)`: it does
    /// not fit; nothing was written. On an error the record is withdrawn (its block zeroed and
    /// synced, so the journal ends before it at the next start); when that fails too, the error
    /// carries [`NotWithdrawn`].
    pub fn append(&mut self, payload: &[u8]) -> io::Result<bool> {
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("state too large for a journal record"))?;
        if self.file.metadata()?.nlink() == 0 {
            // The file was deleted (with its directory, say): appends would be lost.
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the journal file was removed",
            ));
        }
        let size = record_size(payload.len());
        if self.next + size > self.capacity {
            return Ok(false);
        }
        let mut record = Vec::with_capacity(size as usize);
        record.extend_from_slice(RECORD_MAGIC);
        record.extend_from_slice(&self.epoch.to_le_bytes());
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&record_checksum(self.epoch, payload).to_le_bytes());
        record.extend_from_slice(payload);
        record.resize(size as usize, 0);
        let written = self
            .file
            .write_all_at(&record, self.next)
            .and_then(|()| self.sync());
        if let Err(write) = written {
            // The record may be on disk, whole or torn, or in the page cache where the next start
            // would read it: the change was not made, so it must not take effect later.
            record.fill(0);
            let withdrawn = self
                .file
                .write_all_at(&record, self.next)
                .and_then(|()| self.sync());
            return Err(match withdrawn {
                Ok(()) => write,
                Err(withdraw) => io::Error::new(write.kind(), NotWithdrawn { write, withdraw }),
            });
        }
        self.next += size;
        Ok(true)
    }

    fn sync(&mut self) -> io::Result<()> {
        #[cfg(test)]
        if self.failing_syncs > 0 {
            self.failing_syncs -= 1;
            return Err(io::Error::other("fdatasync failed (injected)"));
        }
        self.file.sync_data()
    }

    /// Retires every record by moving the header to the next epoch, naming the state file of hash
    /// `follows` as the one new records follow, and waits until that is durable. Call only once
    /// the newest state is durable in that state file.
    pub fn retire(&mut self, follows: u64) -> io::Result<()> {
        let epoch = self.epoch + 1;
        self.file.write_all_at(&header(epoch, follows), 0)?;
        self.file.sync_data()?;
        self.epoch = epoch;
        self.follows = Some(follows);
        self.next = BLOCK;
        Ok(())
    }
}

/// Makes a rename or removal in `file`'s directory durable.
pub fn sync_dir(file: &Path) -> io::Result<()> {
    File::open(dir_of(file))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal_in(dir: &Path) -> (PathBuf, Journal) {
        let path = dir.join("s.json.journal");
        let journal = Journal::create(&path, MIN_CAPACITY, follows(None)).unwrap();
        (path, journal)
    }

    #[test]
    fn newest_valid_record_wins_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        let fresh = read(&path).unwrap().unwrap();
        assert_eq!((fresh.epoch, fresh.newest, fresh.end), (1, None, BLOCK));
        assert_eq!(fresh.follows, Some(follows(None)));
        assert!(journal.is_empty());
        for n in 0..5 {
            assert!(journal.append(format!("state {n}").as_bytes()).unwrap());
        }
        // A 5,000-byte record spans two blocks.
        let big = vec![b'x'; 5000];
        assert!(journal.append(&big).unwrap());
        let contents = read(&path).unwrap().unwrap();
        assert_eq!(contents.newest.as_deref(), Some(&big[..]));
        assert_eq!(contents.end, BLOCK * 8);
        let mut reopened = Journal::reopen(&path, &contents).unwrap();
        assert!(reopened.append(b"after reopen").unwrap());
        assert_eq!(
            read(&path).unwrap().unwrap().newest.as_deref(),
            Some(&b"after reopen"[..])
        );
    }

    #[test]
    fn a_torn_record_ends_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        journal.append(b"acknowledged").unwrap();
        journal.append(b"torn by a crash").unwrap();
        // Damage one payload byte of the second record (block 2).
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", 2 * BLOCK + RECORD_HEAD as u64 + 3)
            .unwrap();
        let contents = read(&path).unwrap().unwrap();
        assert_eq!(contents.newest.as_deref(), Some(&b"acknowledged"[..]));
        assert_eq!(contents.end, 2 * BLOCK);
    }

    #[test]
    fn a_damaged_record_before_valid_ones_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        for record in [&b"a"[..], b"b", b"c"] {
            journal.append(record).unwrap();
        }
        // Damage the middle record (block 2): "c", acknowledged after it, is still valid.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"X", 2 * BLOCK + RECORD_HEAD as u64)
            .unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            e.to_string()
                .contains("block 2 is damaged but the one at block 3 is valid"),
            "{e}"
        );
    }

    #[test]
    fn retire_hides_every_record_and_reuses_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        for n in 0..3 {
            journal.append(format!("old {n}").as_bytes()).unwrap();
        }
        journal.retire(follows(Some(b"snapshot"))).unwrap();
        let contents = read(&path).unwrap().unwrap();
        assert_eq!((contents.epoch, contents.newest), (2, None));
        assert_eq!(contents.follows, Some(follows(Some(b"snapshot"))));
        // The new epoch's first record overwrites block 1; old records after it stay hidden.
        journal.append(b"new").unwrap();
        let contents = read(&path).unwrap().unwrap();
        assert_eq!(contents.newest.as_deref(), Some(&b"new"[..]));
        assert_eq!(contents.end, 2 * BLOCK);
    }

    #[test]
    fn a_header_of_an_older_version_names_no_state_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        journal.append(b"state").unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        // An older version's epoch bump writes the first part only: the second is epoch 1's.
        file.write_all_at(&header(2, 0)[..24], 0).unwrap();
        let contents = read(&path).unwrap().unwrap();
        assert_eq!((contents.epoch, contents.follows), (2, None));
        // An older version's new journal: zeros after the first part.
        file.write_all_at(&[0u8; 32], 24).unwrap();
        let contents = read(&path).unwrap().unwrap();
        assert_eq!((contents.epoch, contents.follows), (2, None));
        let mut reopened = Journal::reopen(&path, &contents).unwrap();
        assert_eq!(reopened.follows(), None);
        reopened.retire(follows(None)).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().follows, Some(follows(None)));
    }

    #[test]
    fn a_full_journal_refuses_without_writing() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        let records = MIN_CAPACITY / BLOCK - 1;
        for n in 0..records {
            assert!(journal.append(format!("{n}").as_bytes()).unwrap(), "{n}");
        }
        assert!(!journal.append(b"one too many").unwrap());
        let contents = read(&path).unwrap().unwrap();
        assert_eq!(
            contents.newest.as_deref(),
            Some(format!("{}", records - 1).as_bytes())
        );
        assert_eq!(fs::metadata(&path).unwrap().len(), MIN_CAPACITY);
    }

    #[test]
    fn a_bad_header_is_an_error_and_a_missing_file_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        journal.append(b"state").unwrap();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"\xff", 9).unwrap();
        let e = read(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("damaged header"), "{e}");
        assert!(read(&dir.path().join("absent")).unwrap().is_none());
    }

    #[test]
    fn appending_to_a_removed_journal_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut journal) = journal_in(dir.path());
        fs::remove_file(&path).unwrap();
        let e = journal.append(b"lost").unwrap_err();
        assert!(e.to_string().contains("removed"), "{e}");
    }

    #[test]
    fn capacity_grows_with_the_state() {
        assert_eq!(capacity_for(100), MIN_CAPACITY);
        let big = 200_000;
        assert!(capacity_for(big) >= 16 * big as u64);
        assert_eq!(capacity_for(big) % BLOCK, 0);
    }
}
