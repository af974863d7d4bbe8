//! One recording: turns the lazy filesystem's first-access events into a
//! [`Trace`], on its own thread, until the startup window closes.
//!
//! Memory is bounded by the index and the entry cap: one bit per chunk of the
//! index (seen or not), the entries (32 bytes each, at most `max_entries`) and
//! one path per distinct file read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use stoker_format::{Index, InodeId, Trace, TraceEntry};
use stoker_lazyfs::ChunkAccess;

/// What the recording thread shares with the rest of the agent.
pub(crate) struct Control {
    /// Set to end the recording early (the container is ready, or the agent stops).
    pub(crate) stop: AtomicBool,
    /// Entries recorded so far, for listings of traces under way.
    pub(crate) entries: AtomicU64,
    /// The container the trace belongs to; may be learnt after recording started.
    pub(crate) container: Mutex<String>,
}

impl Control {
    pub(crate) fn new(container: String) -> Control {
        Control {
            stop: AtomicBool::new(false),
            entries: AtomicU64::new(0),
            container: Mutex::new(container),
        }
    }

    pub(crate) fn container(&self) -> String {
        self.container
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_container(&self, container: &str) {
        *self
            .container
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = container.to_string();
    }
}

/// An event that only wakes the recording thread (no index has this chunk).
pub(crate) const WAKE_UP: u32 = u32::MAX;

pub(crate) fn wake_up_event() -> ChunkAccess {
    ChunkAccess {
        chunk: WAKE_UP,
        inode: 0,
        file_offset: 0,
        at: Instant::now(),
    }
}

/// Records events until the window (`started + window`) closes, `control.stop` is
/// set, the sender side goes away, or `max_entries` entries are recorded (then the
/// trace is marked truncated). Events that arrived before the end are kept.
pub(crate) fn record(
    events: Receiver<ChunkAccess>,
    index: &Index,
    control: &Control,
    started: Instant,
    window: Duration,
    max_entries: usize,
) -> RecordedTrace {
    let deadline = started + window;
    let mut recorder = Recorder::new(index, started, max_entries);
    let mut full = false;
    loop {
        if control.stop.load(Ordering::Acquire) {
            break;
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        match events.recv_timeout(left) {
            Ok(event) => {
                if !recorder.add(&event, control) {
                    full = true;
                    break;
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    // Reads that happened before the end but were still queued.
    let end = Instant::now().min(deadline);
    if !full {
        for event in events.try_iter() {
            if event.at > end {
                continue;
            }
            if !recorder.add(&event, control) {
                full = true;
                break;
            }
        }
    }
    recorder.finish(full)
}

/// The entries and files of a finished recording.
pub(crate) struct RecordedTrace {
    pub(crate) files: Vec<String>,
    pub(crate) entries: Vec<TraceEntry>,
    pub(crate) truncated: bool,
}

impl RecordedTrace {
    pub(crate) fn into_trace(
        self,
        index_digest: String,
        image: String,
        container: String,
    ) -> Trace {
        Trace {
            index_digest,
            image,
            container,
            files: self.files,
            entries: self.entries,
            truncated: self.truncated,
        }
    }
}

struct Recorder<'a> {
    index: &'a Index,
    started: Instant,
    max_entries: usize,
    /// One bit per chunk of the index: recorded already.
    seen: Vec<u64>,
    entries: Vec<TraceEntry>,
    files: Vec<String>,
    file_of_inode: HashMap<InodeId, u32>,
}

impl<'a> Recorder<'a> {
    fn new(index: &'a Index, started: Instant, max_entries: usize) -> Self {
        Recorder {
            index,
            started,
            max_entries,
            seen: vec![0; index.chunk_count().div_ceil(64) as usize],
            entries: Vec::new(),
            files: Vec::new(),
            file_of_inode: HashMap::new(),
        }
    }

    /// Records `event` if it is a chunk's first access. False when the entry cap
    /// is reached and the event could not be recorded.
    fn add(&mut self, event: &ChunkAccess, control: &Control) -> bool {
        let Some(location) = self.index.chunk(event.chunk) else {
            return true; // a wake-up, or a chunk this index does not have
        };
        let (word, bit) = (event.chunk as usize / 64, 1u64 << (event.chunk % 64));
        if self.seen[word] & bit != 0 {
            return true;
        }
        if self.entries.len() >= self.max_entries {
            return false;
        }
        self.seen[word] |= bit;
        let file = match self.file_of_inode.get(&event.inode) {
            Some(&file) => file,
            None => {
                let path = String::from_utf8_lossy(&self.index.path_of(event.inode)).into_owned();
                self.files.push(path);
                let file = (self.files.len() - 1) as u32;
                self.file_of_inode.insert(event.inode, file);
                file
            }
        };
        let micros = event.at.saturating_duration_since(self.started).as_micros();
        self.entries.push(TraceEntry {
            chunk: event.chunk,
            len: location.uncompressed_len,
            file,
            file_offset: event.file_offset,
            micros: u64::try_from(micros).unwrap_or(u64::MAX),
        });
        control.entries.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn finish(self, truncated: bool) -> RecordedTrace {
        RecordedTrace {
            files: self.files,
            entries: self.entries,
            truncated,
        }
    }
}
