//! Where finished traces wait until the controller collects them.
//!
//! ```text
//! <dir>/<id>.trace   the trace (stoker-format's zstd JSON)
//! <dir>/<id>.json    its summary, written last: its presence means "complete"
//! <dir>/.<name>.tmp  a file being written (removed at open)
//! ```
//!
//! Both files are written to a temporary name, fsynced and renamed, so a crash
//! leaves either a whole trace or nothing that [`TraceStore::open`] keeps.

use std::io::Write;
use std::path::{Path, PathBuf};

use stoker_format::Trace;
use tracing::warn;

use super::TraceSummary;
use crate::AgentError;

pub(crate) struct TraceStore {
    dir: PathBuf,
}

impl TraceStore {
    /// Opens (creating) `dir`, removes what a crash left half-written and returns
    /// the summaries of the traces kept there.
    pub(crate) fn open(dir: &Path) -> Result<(TraceStore, Vec<TraceSummary>), AgentError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| AgentError::io(format!("creating {}", dir.display()), e))?;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| AgentError::io(format!("listing {}", dir.display()), e))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry =
                entry.map_err(|e| AgentError::io(format!("listing {}", dir.display()), e))?;
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
        let store = TraceStore {
            dir: dir.to_path_buf(),
        };
        let mut summaries = Vec::new();
        for name in &names {
            if name.ends_with(".tmp") {
                store.remove_file(name);
            } else if let Some(id) = name.strip_suffix(".trace") {
                if !names.iter().any(|n| n == &format!("{id}.json")) {
                    warn!(
                        trace = id,
                        "removing a trace without a summary (written when the agent stopped)"
                    );
                    store.remove_file(name);
                }
            } else if let Some(id) = name.strip_suffix(".json") {
                match store.read_summary(id) {
                    Ok(summary) => summaries.push(summary),
                    Err(e) => {
                        warn!(trace = id, error = %e, "removing an unreadable trace");
                        store.remove(id);
                    }
                }
            }
        }
        summaries.sort_by(|a, b| a.id.cmp(&b.id));
        Ok((store, summaries))
    }

    /// Writes `trace` and then its summary.
    pub(crate) fn save(&self, summary: &TraceSummary, trace: &Trace) -> Result<(), AgentError> {
        let encoded = trace.encode().map_err(|e| {
            AgentError::io(
                format!("encoding trace {}", summary.id),
                std::io::Error::other(e),
            )
        })?;
        self.write_atomically(&format!("{}.trace", summary.id), &encoded)?;
        let json = serde_json::to_vec(summary).map_err(|e| {
            AgentError::io(
                format!("encoding trace summary {}", summary.id),
                std::io::Error::other(e),
            )
        })?;
        self.write_atomically(&format!("{}.json", summary.id), &json)
    }

    pub(crate) fn load(&self, id: &str) -> Result<Trace, AgentError> {
        let path = self.dir.join(format!("{id}.trace"));
        let bytes = std::fs::read(&path)
            .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
        Trace::decode(&bytes).map_err(|e| {
            AgentError::io(
                format!("decoding {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })
    }

    /// Removes a trace: its summary first, so a crash in between leaves a trace
    /// without summary, which the next open removes.
    pub(crate) fn remove(&self, id: &str) {
        self.remove_file(&format!("{id}.json"));
        self.remove_file(&format!("{id}.trace"));
    }

    fn read_summary(&self, id: &str) -> Result<TraceSummary, AgentError> {
        let path = self.dir.join(format!("{id}.json"));
        let bytes = std::fs::read(&path)
            .map_err(|e| AgentError::io(format!("reading {}", path.display()), e))?;
        let summary: TraceSummary = serde_json::from_slice(&bytes).map_err(|e| {
            AgentError::io(
                format!("decoding {}", path.display()),
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?;
        if summary.id != id || !self.dir.join(format!("{id}.trace")).is_file() {
            return Err(AgentError::io(
                format!("{}", path.display()),
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "summary names another trace, or the trace file is missing",
                ),
            ));
        }
        Ok(summary)
    }

    fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<(), AgentError> {
        let path = self.dir.join(name);
        let temporary = self.dir.join(format!(".{name}.tmp"));
        let written = (|| {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        })();
        written.map_err(|e| {
            let _ = std::fs::remove_file(&temporary);
            AgentError::io(format!("writing {}", path.display()), e)
        })
    }

    fn remove_file(&self, name: &str) {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "cannot remove"),
        }
    }
}
