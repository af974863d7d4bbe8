//! The open-state file: how the opens still alive on a mount were answered
//! (cached or passthrough, and with which backing id), kept in a file so that a
//! process resuming the mount ([`crate::resume`]) answers new opens the way the
//! kernel will accept.
//!
//! ## Format
//!
//! One 16-byte record per inode, at offset `inode id * 16`, four little-endian
//! `u32`s: opens in cached mode, opens in passthrough mode, the passthrough
//! backing id (0 if none), and 0 (reserved). A record of zeros (or a hole, or a
//! record past the end of the file) is an inode without opens. The file is
//! sparse: only the pages of inodes ever opened take memory, at most 16 bytes
//! per inode of the image (16 MiB for a million inodes). It belongs to one
//! mount of one image: [`crate::mount`] truncates it, [`crate::resume`] reads it
//! and goes on writing it, and unmounting deletes it. It should live on a tmpfs
//! (it is written at every open and release, and means nothing after a reboot).
//!
//! ## When it is written, and what a crash leaves
//!
//! A record is written with one `pwrite(2)` under the lock of the per-inode open
//! modes ([`crate::passthrough`]):
//!
//! - at an open, *before* the reply: a process killed after the write but before
//!   the reply leaves a count one too high (the kernel resends the open to the
//!   next process, which counts it again). The inode then keeps its mode (and its
//!   backing id stays registered) until the mount ends: harmless;
//! - at a release, *after* the reply: a process killed before the reply leaves
//!   the count as it was and the kernel resends the release, which is then
//!   counted once; killed after the reply but before the write, the count is one
//!   too high, harmless as above. Never too low, which would let an inode change
//!   mode while the kernel still holds an open in the old one.
//!
//! A process killed after registering a backing file but before recording the
//! open leaves that backing id registered, unknown, until the mount ends (the
//! resent open registers another): one kernel reference to a cache file, no
//! wrong answer.
//!
//! If a write fails (a full tmpfs), the file is deleted and not written again, and
//! the mount stops passing new files through: a resumed mount without the file
//! answers every open in cached mode, which the kernel accepts except for files
//! still open in passthrough mode, so having fewer of those limits the damage.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use stoker_format::InodeId;
use tracing::{error, warn};

/// Bytes per inode record.
const RECORD: u64 = 16;

/// The opens of one inode, as recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct OpenRecord {
    pub(crate) cached: u32,
    pub(crate) passthrough: u32,
    /// The kernel's backing id of the passthrough opens; 0 if none.
    pub(crate) backing: u32,
}

impl OpenRecord {
    fn encode(self) -> [u8; RECORD as usize] {
        let mut bytes = [0u8; RECORD as usize];
        bytes[0..4].copy_from_slice(&self.cached.to_le_bytes());
        bytes[4..8].copy_from_slice(&self.passthrough.to_le_bytes());
        bytes[8..12].copy_from_slice(&self.backing.to_le_bytes());
        bytes
    }

    fn decode(bytes: &[u8]) -> OpenRecord {
        let word = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map_or(0, u32::from_le_bytes)
        };
        OpenRecord {
            cached: word(0),
            passthrough: word(4),
            backing: word(8),
        }
    }
}

/// An open-state file being written.
pub(crate) struct OpenStateFile {
    path: PathBuf,
    /// `None` after a failed write (the file is gone then).
    file: Option<File>,
}

impl OpenStateFile {
    /// Creates the file for a new mount, empty.
    pub(crate) fn create(path: &Path) -> io::Result<OpenStateFile> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(OpenStateFile {
            path: path.to_path_buf(),
            file: Some(file),
        })
    }

    /// Opens the file a mount's earlier process wrote and reads its records: the
    /// inodes with opens, each checked against `inode_count`. An error if the file
    /// is missing or any record is impossible (both modes at once, passthrough
    /// without a backing id, an inode past the image).
    pub(crate) fn resume(
        path: &Path,
        inode_count: u32,
    ) -> io::Result<(OpenStateFile, Vec<(InodeId, OpenRecord)>)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let bytes = std::fs::read(path)?;
        let mut records = Vec::new();
        for (at, chunk) in bytes.chunks(RECORD as usize).enumerate() {
            let record = OpenRecord::decode(chunk);
            if record == OpenRecord::default() {
                continue;
            }
            let bad = |what: &str| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: record {at} {what}: {record:?}", path.display()),
                )
            };
            let id = InodeId::try_from(at)
                .ok()
                .filter(|id| *id < inode_count)
                .ok_or_else(|| bad("is past the image's inodes"))?;
            if record.cached > 0 && record.passthrough > 0 {
                return Err(bad("has opens in both modes"));
            }
            if record.passthrough > 0 && record.backing == 0 {
                return Err(bad("has passthrough opens without a backing id"));
            }
            records.push((id, record));
        }
        Ok((
            OpenStateFile {
                path: path.to_path_buf(),
                file: Some(file),
            },
            records,
        ))
    }

    /// Records the opens of inode `id`. Returns false if the file cannot be
    /// written (now or before): it is deleted then (see the module docs).
    pub(crate) fn write(&mut self, id: InodeId, record: OpenRecord) -> bool {
        let Some(file) = &self.file else {
            return false;
        };
        let offset = u64::from(id) * RECORD;
        match file.write_all_at(&record.encode(), offset) {
            Ok(()) => true,
            Err(e) => {
                error!(path = %self.path.display(), error = %e, "cannot write the open-state file; deleting it: after an agent restart this mount answers opens without passthrough");
                self.file = None;
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "cannot delete the open-state file");
                }
                false
            }
        }
    }

    /// Deletes the file (the mount has ended).
    pub(crate) fn remove(&mut self) {
        if self.file.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(path = %self.path.display(), error = %e, "cannot delete the open-state file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_records_are_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("state");
        let mut state = OpenStateFile::create(&path).expect("create");
        let passed = OpenRecord {
            cached: 0,
            passthrough: 2,
            backing: 7,
        };
        let cached = OpenRecord {
            cached: 1,
            ..OpenRecord::default()
        };
        assert!(state.write(3, passed));
        assert!(state.write(1, cached));
        assert!(state.write(5, cached));
        assert!(state.write(5, OpenRecord::default()));
        let (_, records) = OpenStateFile::resume(&path, 10).expect("resume");
        assert_eq!(records, vec![(1, cached), (3, passed)]);
        assert!(OpenStateFile::resume(&path, 3).is_err(), "inode 3 of 3");
        assert!(state.write(
            2,
            OpenRecord {
                cached: 1,
                ..passed
            }
        ));
        assert!(OpenStateFile::resume(&path, 10).is_err(), "both modes");
        state.remove();
        assert!(!path.exists());
        assert!(OpenStateFile::resume(&path, 10).is_err(), "no file");
    }
}
