//! Snapshot metadata in redb: one table of records keyed by snapshot name, one counter.
//!
//! Every call is one redb transaction, so a crash leaves either the old or the new
//! state, never half of one. Records are JSON (small, readable with `redb` tools, easy
//! to extend with `#[serde(default)]` fields).
//!
//! The store checks the rules containerd's own metadata storage checks: keys are
//! unique, a parent must exist and be committed, only active snapshots are committed,
//! and a snapshot with children cannot be removed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::SnapshotterError;

/// name → JSON-encoded [`SnapshotRecord`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters; `next_id` is the id the next snapshot gets.
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
const NEXT_ID: &str = "next_id";

/// containerd's three snapshot kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Read-only view of a committed parent.
    View,
    /// Writable snapshot, e.g. a container's rootfs or a layer being unpacked.
    Active,
    /// Immutable snapshot, e.g. an unpacked image layer. Only these can be parents.
    Committed,
}

impl SnapshotKind {
    /// The name containerd's filters use (`kind==active`).
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::View => "view",
            SnapshotKind::Active => "active",
            SnapshotKind::Committed => "committed",
        }
    }
}

/// A layer served by a lazily mounted Stoker image instead of an unpacked directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    /// Image reference from the CRI labels, e.g. `registry:5000/app:1.0`.
    pub image_ref: String,
    /// The image manifest's digest.
    pub manifest_digest: String,
    /// The digest of this layer (compressed blob, as in the manifest).
    pub layer_digest: String,
    /// Digest of the Stoker index; the lazy mount of the whole image is keyed by it.
    pub index_digest: String,
    /// True for the image's top layer: its snapshot holds the image's lazy mount.
    /// Lower layers are content-less placeholders for containerd's chain.
    pub top: bool,
}

/// One snapshot as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Unique, never reused; names the snapshot's directory `snapshots/<id>`.
    pub id: u64,
    /// containerd's key (active, view) or name (committed).
    pub name: String,
    /// Name of the parent snapshot; empty for none.
    pub parent: String,
    pub kind: SnapshotKind,
    /// Nanoseconds since the Unix epoch.
    pub created_unix_nanos: i64,
    pub updated_unix_nanos: i64,
    pub labels: BTreeMap<String, String>,
    /// Disk usage measured at commit (bytes, inodes); zero for other kinds.
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub inodes: u64,
    /// Set for layers served by a lazy mount.
    #[serde(default)]
    pub remote: Option<RemoteLayer>,
}

/// What [`SnapshotStore::create`] needs to make a record.
#[derive(Debug, Clone)]
pub struct NewSnapshot {
    pub name: String,
    pub parent: String,
    pub kind: SnapshotKind,
    pub labels: BTreeMap<String, String>,
    pub remote: Option<RemoteLayer>,
}

/// The redb database holding every snapshot record.
/// How long [`SnapshotStore::open`] waits for another process to close the store.
const LOCKED_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const LOCKED_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Debug)]
pub struct SnapshotStore {
    db: Database,
    path: PathBuf,
}

impl SnapshotStore {
    /// Opens (or creates) the database at `path`. While another process has it open
    /// (a previous agent still exiting) it waits, up to [`LOCKED_WAIT`].
    pub fn open(path: &Path) -> Result<SnapshotStore, SnapshotterError> {
        let locked_since = std::time::Instant::now();
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen)
                    if locked_since.elapsed() < LOCKED_WAIT =>
                {
                    tracing::warn!(path = %path.display(), "snapshot store is open in another process (a previous agent still exiting?); waiting");
                    std::thread::sleep(LOCKED_RETRY);
                }
                other => break other.map_err(|e| store_error(path, e))?,
            }
        };
        let store = SnapshotStore {
            db,
            path: path.to_path_buf(),
        };
        // Create the tables so that read transactions always find them.
        store.write(|_, _| Ok(()))?;
        Ok(store)
    }

    /// The record named `name`, if any.
    pub fn get(&self, name: &str) -> Result<Option<SnapshotRecord>, SnapshotterError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.error(e))?;
        let value = table.get(name).map_err(|e| self.error(e))?;
        value.map(|v| decode(name, v.value())).transpose()
    }

    /// The record named `name`, or [`SnapshotterError::NotFound`].
    pub fn require(&self, name: &str) -> Result<SnapshotRecord, SnapshotterError> {
        self.get(name)?
            .ok_or_else(|| SnapshotterError::NotFound(name.to_string()))
    }

    /// Every record, ordered by name.
    pub fn list(&self) -> Result<Vec<SnapshotRecord>, SnapshotterError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(SNAPSHOTS).map_err(|e| self.error(e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (name, value) = entry.map_err(|e| self.error(e))?;
            records.push(decode(name.value(), value.value())?);
        }
        Ok(records)
    }

    /// The parent chain of `record`, nearest parent first.
    pub fn ancestors(
        &self,
        record: &SnapshotRecord,
    ) -> Result<Vec<SnapshotRecord>, SnapshotterError> {
        let mut chain = Vec::new();
        let mut parent = record.parent.clone();
        while !parent.is_empty() {
            let next = self.get(&parent)?.ok_or_else(|| {
                SnapshotterError::FailedPrecondition(format!(
                    "snapshot {:?} has a missing ancestor {parent:?}",
                    record.name
                ))
            })?;
            parent = next.parent.clone();
            chain.push(next);
        }
        Ok(chain)
    }

    /// Creates a record. Fails with `AlreadyExists` if the name is taken, `NotFound` if
    /// the parent is missing and `InvalidArgument` if the parent is not committed.
    pub fn create(&self, new: NewSnapshot) -> Result<SnapshotRecord, SnapshotterError> {
        self.write(|snapshots, counters| {
            if snapshots.get(new.name.as_str())?.is_some() {
                return Err(SnapshotterError::AlreadyExists(new.name.clone()).into());
            }
            if !new.parent.is_empty() {
                let parent = match snapshots.get(new.parent.as_str())? {
                    Some(value) => decode(&new.parent, value.value())?,
                    None => return Err(SnapshotterError::NotFound(new.parent.clone()).into()),
                };
                if parent.kind != SnapshotKind::Committed {
                    return Err(SnapshotterError::InvalidArgument(format!(
                        "parent {:?} is not a committed snapshot",
                        new.parent
                    ))
                    .into());
                }
            }
            let id = counters.get(NEXT_ID)?.map_or(1, |v| v.value());
            counters.insert(NEXT_ID, id + 1)?;
            let now = now_nanos();
            let record = SnapshotRecord {
                id,
                name: new.name,
                parent: new.parent,
                kind: new.kind,
                created_unix_nanos: now,
                updated_unix_nanos: now,
                labels: new.labels,
                size: 0,
                inodes: 0,
                remote: new.remote,
            };
            put(snapshots, &record)?;
            Ok(record)
        })
    }

    /// Turns the active snapshot `key` into the committed snapshot `name`, keeping its
    /// id (and so its directory), with the given labels and measured usage.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        usage: (u64, u64),
    ) -> Result<SnapshotRecord, SnapshotterError> {
        self.write(|snapshots, _| {
            let active = match snapshots.get(key)? {
                Some(value) => decode(key, value.value())?,
                None => return Err(SnapshotterError::NotFound(key.to_string()).into()),
            };
            if active.kind != SnapshotKind::Active {
                return Err(SnapshotterError::FailedPrecondition(format!(
                    "snapshot {key:?} is {}, only active snapshots can be committed",
                    active.kind.as_str()
                ))
                .into());
            }
            if snapshots.get(name)?.is_some() {
                return Err(SnapshotterError::AlreadyExists(name.to_string()).into());
            }
            snapshots.remove(key)?;
            let now = now_nanos();
            let committed = SnapshotRecord {
                name: name.to_string(),
                kind: SnapshotKind::Committed,
                created_unix_nanos: now,
                updated_unix_nanos: now,
                labels,
                size: usage.0,
                inodes: usage.1,
                ..active
            };
            put(snapshots, &committed)?;
            Ok(committed)
        })
    }

    /// Deletes the record `name`. Fails with `FailedPrecondition` while it has children.
    pub fn remove(&self, name: &str) -> Result<SnapshotRecord, SnapshotterError> {
        self.write(|snapshots, _| {
            let record = match snapshots.get(name)? {
                Some(value) => decode(name, value.value())?,
                None => return Err(SnapshotterError::NotFound(name.to_string()).into()),
            };
            for entry in snapshots.iter()? {
                let (child_name, value) = entry?;
                let child = decode(child_name.value(), value.value())?;
                if child.parent == name {
                    return Err(SnapshotterError::FailedPrecondition(format!(
                        "cannot remove snapshot {name:?}: snapshot {:?} is its child",
                        child.name
                    ))
                    .into());
                }
            }
            snapshots.remove(name)?;
            Ok(record)
        })
    }

    /// Replaces the labels of `name` (the only mutable field) and bumps its update time.
    pub fn set_labels(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, SnapshotterError> {
        self.write(|snapshots, _| {
            let mut record = match snapshots.get(name)? {
                Some(value) => decode(name, value.value())?,
                None => return Err(SnapshotterError::NotFound(name.to_string()).into()),
            };
            record.labels = labels;
            record.updated_unix_nanos = now_nanos();
            put(snapshots, &record)?;
            Ok(record)
        })
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds.
    fn write<T>(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>, &mut redb::Table<&str, u64>) -> Result<T, TxError>,
    ) -> Result<T, SnapshotterError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let result = {
            let mut snapshots = txn.open_table(SNAPSHOTS).map_err(|e| self.error(e))?;
            let mut counters = txn.open_table(COUNTERS).map_err(|e| self.error(e))?;
            f(&mut snapshots, &mut counters)
        };
        match result {
            Ok(value) => {
                txn.commit().map_err(|e| self.error(e))?;
                Ok(value)
            }
            Err(TxError::Agent(error)) => Err(error),
            Err(TxError::Storage(error)) => Err(self.error(error)),
        }
    }

    fn error(&self, error: impl Into<redb::Error>) -> SnapshotterError {
        store_error(&self.path, error)
    }
}

/// Errors inside a write transaction: either a rule was broken or redb failed.
enum TxError {
    Agent(SnapshotterError),
    Storage(redb::StorageError),
}

impl From<SnapshotterError> for TxError {
    fn from(error: SnapshotterError) -> Self {
        TxError::Agent(error)
    }
}

impl From<redb::StorageError> for TxError {
    fn from(error: redb::StorageError) -> Self {
        TxError::Storage(error)
    }
}

fn put(table: &mut redb::Table<&str, &[u8]>, record: &SnapshotRecord) -> Result<(), TxError> {
    let bytes = serde_json::to_vec(record).map_err(|source| SnapshotterError::CorruptRecord {
        name: record.name.clone(),
        source,
    })?;
    table.insert(record.name.as_str(), bytes.as_slice())?;
    Ok(())
}

fn decode(name: &str, bytes: &[u8]) -> Result<SnapshotRecord, SnapshotterError> {
    serde_json::from_slice(bytes).map_err(|source| SnapshotterError::CorruptRecord {
        name: name.to_string(),
        source,
    })
}

fn store_error(path: &Path, error: impl Into<redb::Error>) -> SnapshotterError {
    SnapshotterError::Store {
        path: path.to_path_buf(),
        source: Box::new(error.into()),
    }
}

/// Now, in nanoseconds since the Unix epoch.
pub fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new(name: &str, parent: &str, kind: SnapshotKind) -> NewSnapshot {
        NewSnapshot {
            name: name.into(),
            parent: parent.into(),
            kind,
            labels: BTreeMap::new(),
            remote: None,
        }
    }

    #[test]
    fn enforces_containerd_rules_and_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("meta.redb");
        {
            let store = SnapshotStore::open(&path).expect("open");
            let a = store.create(new("a", "", SnapshotKind::Active)).expect("a");
            assert!(matches!(
                store.create(new("a", "", SnapshotKind::Active)),
                Err(SnapshotterError::AlreadyExists(_))
            ));
            assert!(matches!(
                store.create(new("b", "a", SnapshotKind::Active)),
                Err(SnapshotterError::InvalidArgument(_))
            ));
            assert!(matches!(
                store.create(new("b", "missing", SnapshotKind::Active)),
                Err(SnapshotterError::NotFound(_))
            ));
            let c = store
                .commit("a", "layer1", BTreeMap::new(), (10, 2))
                .expect("commit");
            assert_eq!(c.id, a.id);
            assert_eq!(c.kind, SnapshotKind::Committed);
            assert!(store.get("a").expect("get").is_none());
            let v = store
                .create(new("view", "layer1", SnapshotKind::View))
                .expect("view");
            assert!(matches!(
                store.commit("view", "x", BTreeMap::new(), (0, 0)),
                Err(SnapshotterError::FailedPrecondition(_))
            ));
            assert!(matches!(
                store.remove("layer1"),
                Err(SnapshotterError::FailedPrecondition(_))
            ));
            assert_eq!(
                store.ancestors(&v).expect("ancestors")[0].name,
                "layer1".to_string()
            );
        }
        let store = SnapshotStore::open(&path).expect("reopen");
        let names: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, vec!["layer1".to_string(), "view".to_string()]);
        store.remove("view").expect("remove view");
        store.remove("layer1").expect("remove layer");
        let next = store.create(new("z", "", SnapshotKind::Active)).expect("z");
        assert_eq!(next.id, 3, "ids are never reused");
    }
}
