//! The access-tracing hook: reports the first read of each chunk, for startup
//! traces and prefetch plans (recorded by the agent, not here).
//!
//! Cost on the read path when tracing is off: one relaxed atomic load per read.
//! When on: one atomic bit test per chunk the read touches; only a chunk's first
//! access takes a lock and sends one event with `try_send`, so a slow consumer
//! never blocks a reader. When the channel is full the event is dropped, the chunk
//! stays "unseen" (it is reported on a later access if there is room then) and
//! [`FsCounters::trace_dropped`](crate::FsCounters::trace_dropped) counts it.
//!
//! Limits, inherent to FUSE: reads answered by the kernel page cache or by a
//! passthrough file never reach the filesystem. While a trace is recorded, only a
//! file that is one whole chunk is passed through, and its open reports that chunk
//! (any read of it would touch exactly that chunk); a chunk whose pages were
//! already cached by an earlier reader of the mount is not seen again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use stoker_format::InodeId;

/// The first read of one chunk since the trace started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkAccess {
    /// Position of the chunk in the index (what plans refer to).
    pub chunk: u32,
    /// The file that was read (index inode id; `Index::path_of` names it).
    pub inode: InodeId,
    /// Where the chunk starts in that file.
    pub file_offset: u64,
    /// When the read arrived.
    pub at: Instant,
}

/// Outcome of offering an event, for the caller's counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Not tracing, or already reported.
    Skipped,
    Sent,
    Dropped,
}

pub(crate) struct AccessTrace {
    active: AtomicBool,
    chunk_count: u32,
    /// One bit per chunk of the index: reported in the current trace.
    seen: Vec<AtomicU64>,
    sender: Mutex<Option<SyncSender<ChunkAccess>>>,
}

impl AccessTrace {
    pub(crate) fn new(chunk_count: u32) -> Self {
        AccessTrace {
            active: AtomicBool::new(false),
            chunk_count,
            seen: (0..chunk_count.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
            sender: Mutex::new(None),
        }
    }

    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts a new trace: every chunk is unseen again and events go to `sender`.
    pub(crate) fn start(&self, sender: SyncSender<ChunkAccess>) {
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        for word in &self.seen {
            word.store(0, Ordering::Relaxed);
        }
        *slot = Some(sender);
        self.active.store(true, Ordering::Release);
    }

    pub(crate) fn stop(&self) {
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = None;
        self.active.store(false, Ordering::Release);
    }

    /// Reports `chunk` if this is its first access in the current trace.
    pub(crate) fn offer(&self, chunk: u32, inode: InodeId, file_offset: u64) -> Offered {
        if !self.is_active() || chunk >= self.chunk_count {
            return Offered::Skipped;
        }
        let Some(word) = self.seen.get(chunk as usize / 64) else {
            return Offered::Skipped;
        };
        let bit = 1u64 << (chunk % 64);
        if word.load(Ordering::Relaxed) & bit != 0
            || word.fetch_or(bit, Ordering::AcqRel) & bit != 0
        {
            return Offered::Skipped;
        }
        let event = ChunkAccess {
            chunk,
            inode,
            file_offset,
            at: Instant::now(),
        };
        let mut slot = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = slot.as_ref() else {
            return Offered::Skipped;
        };
        match sender.try_send(event) {
            Ok(()) => Offered::Sent,
            Err(TrySendError::Full(_)) => {
                word.fetch_and(!bit, Ordering::AcqRel);
                Offered::Dropped
            }
            Err(TrySendError::Disconnected(_)) => {
                // The consumer went away: stop tracing (and let passthrough resume).
                *slot = None;
                self.active.store(false, Ordering::Release);
                Offered::Skipped
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    #[test]
    fn each_chunk_is_reported_once_per_trace() {
        let trace = AccessTrace::new(130);
        assert_eq!(trace.offer(3, 1, 0), Offered::Skipped, "not tracing yet");
        let (tx, rx) = sync_channel(16);
        trace.start(tx);
        assert_eq!(trace.offer(3, 1, 0), Offered::Sent);
        assert_eq!(trace.offer(3, 2, 0), Offered::Skipped);
        assert_eq!(trace.offer(129, 1, 4096), Offered::Sent);
        assert_eq!(trace.offer(130, 1, 0), Offered::Skipped, "out of range");
        let got: Vec<_> = rx
            .try_iter()
            .map(|e| (e.chunk, e.inode, e.file_offset))
            .collect();
        assert_eq!(got, vec![(3, 1, 0), (129, 1, 4096)]);

        let (tx, rx) = sync_channel(16);
        trace.start(tx);
        assert_eq!(
            trace.offer(3, 1, 0),
            Offered::Sent,
            "a new trace starts unseen"
        );
        assert_eq!(rx.try_iter().count(), 1);
    }

    #[test]
    fn a_full_channel_drops_and_retries_later_and_a_closed_one_stops_tracing() {
        let trace = AccessTrace::new(8);
        let (tx, rx) = sync_channel(1);
        trace.start(tx);
        assert_eq!(trace.offer(0, 1, 0), Offered::Sent);
        assert_eq!(trace.offer(1, 1, 0), Offered::Dropped);
        assert_eq!(rx.recv().map(|e| e.chunk), Ok(0));
        assert_eq!(
            trace.offer(1, 1, 0),
            Offered::Sent,
            "dropped chunks stay unseen"
        );
        drop(rx);
        assert_eq!(trace.offer(2, 1, 0), Offered::Skipped);
        assert!(!trace.is_active());
    }
}
