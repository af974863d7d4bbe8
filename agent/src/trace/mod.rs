//! Startup traces: which chunks a container reads while it starts, in the order
//! it first reads them.
//!
//! Where it sits: registry → fetch → verify → cache → **filesystem** → snapshotter →
//! container. The lazy filesystem reports each chunk's first read
//! ([`ChunkAccess`], through a bounded channel that never blocks a reader); a
//! recording turns those events into a [`Trace`] (chunk position and length, file
//! path and offset, microseconds since the window opened). Traces become
//! prefetch plans (`stoker plan`, or the controller).
//!
//! How the lazy mount side uses it:
//!
//! 1. When an image is mounted, [`Traces::record`] opens a startup window and
//!    returns the sender to give the mount (`MountOptions::access_trace`, or
//!    `MountHandle::start_access_trace` for a mount that exists already).
//!    [`TracingMounter`] does this for every mount the snapshotter makes.
//! 2. When the snapshotter learns which container the mount is for (the active
//!    snapshot's key, which CRI sets to the container ID), it calls
//!    [`Traces::claim_for_container`]; if no window is open for the image (a later
//!    container on a shared mount), it opens one with [`Traces::record`] and starts
//!    the mount's access trace again. Reads the kernel answers from its page cache
//!    never reach the filesystem, so a later container's trace lacks what earlier
//!    ones already read.
//!
//! A window closes after [`TraceOptions::window`], earlier on
//! [`Traces::close_for_container`] (the container is ready) or when the trace
//! reaches [`TraceOptions::max_entries`] (it is then marked truncated). The trace
//! is then written under the traces directory (see [`store`]) and kept until
//! [`TraceOptions::max_kept`] newer ones push it out, collected ones first.
//! Dropping the recording's receiver ends the mount's tracing at its next read.

mod mount_hook;
mod recorder;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use stoker_format::{Digest, Index, Trace};
use stoker_lazyfs::ChunkAccess;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::AgentError;
pub use mount_hook::TracingMounter;
use recorder::Control;
use store::TraceStore;

/// Limits of trace recording.
#[derive(Clone, Debug)]
pub struct TraceOptions {
    /// Entries per trace; a trace that reaches it stops and is marked truncated.
    /// 1,000,000 entries is 32 MB of memory at most (plus one bit per chunk of the
    /// index); at the default 1 MiB chunk size it covers 1 TB of reads.
    pub max_entries: usize,
    /// How long after the window opens recording stops on its own.
    pub window: Duration,
    /// Finished traces kept on disk; past it the oldest collected (then the
    /// oldest) trace is removed.
    pub max_kept: usize,
    /// First-access events the filesystem may queue before it drops them (a
    /// dropped chunk is reported again at its next read).
    pub event_queue: usize,
}

impl Default for TraceOptions {
    fn default() -> Self {
        TraceOptions {
            max_entries: 1_000_000,
            window: Duration::from_secs(60),
            max_kept: 100,
            event_queue: 16_384,
        }
    }
}

/// What a recording is about.
#[derive(Clone)]
pub struct TraceSubject {
    pub image_ref: String,
    pub index_digest: Digest,
    /// The mounted index: chunk lengths and file paths come from it.
    pub index: Arc<Index>,
    /// The container, when known (empty: the mount's first container, to be
    /// claimed with [`Traces::claim_for_container`]).
    pub container_id: String,
}

/// A trace without its entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceSummary {
    /// Unique on the node; sorts by start time.
    pub id: String,
    pub image_ref: String,
    pub index_digest: String,
    pub container_id: String,
    pub started_at_unix_ms: i64,
    pub entries: u64,
    /// The window has closed; the trace is on disk and will not change.
    pub complete: bool,
    pub truncated: bool,
}

/// A recording just started: give `events` to the mount.
#[derive(Debug)]
pub struct StartedTrace {
    pub id: String,
    pub events: SyncSender<ChunkAccess>,
}

/// Every trace of the node: recordings under way and traces kept on disk.
pub struct Traces {
    shared: Arc<Shared>,
    options: TraceOptions,
    sequence: AtomicU64,
    /// Indexes whose starts are no longer traced, with the chunks of their plan
    /// in order: the controller has learned what it wants from them
    /// (`PrefetchRequest.learning_complete`). In memory: after an agent
    /// restart, the next start is traced again.
    learned: Mutex<HashMap<Digest, Arc<[u32]>>>,
}

struct Shared {
    store: TraceStore,
    max_kept: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    active: HashMap<String, Active>,
    kept: BTreeMap<String, Kept>,
}

struct Active {
    summary: TraceSummary,
    control: Arc<Control>,
    /// Wakes the recording thread when it is asked to stop.
    wake: SyncSender<ChunkAccess>,
    done: watch::Receiver<bool>,
}

struct Kept {
    summary: TraceSummary,
    collected: bool,
}

impl Traces {
    /// Opens the trace directory `dir` (created if missing) with the traces a
    /// previous run left there.
    pub fn open(dir: &Path, options: TraceOptions) -> Result<Traces, AgentError> {
        let (store, summaries) = TraceStore::open(dir)?;
        let kept = summaries
            .into_iter()
            .map(|summary| {
                let kept = Kept {
                    summary,
                    collected: false,
                };
                (kept.summary.id.clone(), kept)
            })
            .collect();
        let traces = Traces {
            shared: Arc::new(Shared {
                store,
                max_kept: options.max_kept.max(1),
                state: Mutex::new(State {
                    active: HashMap::new(),
                    kept,
                }),
            }),
            options,
            sequence: AtomicU64::new(0),
            learned: Mutex::new(HashMap::new()),
        };
        traces.shared.evict(&mut traces.shared.lock());
        Ok(traces)
    }

    pub fn options(&self) -> &TraceOptions {
        &self.options
    }

    /// From now on, starts of `index_digest` are not traced; `plan` is what
    /// they read (the chunks of the image's plan, in order).
    pub fn stop_learning(&self, index_digest: Digest, plan: Arc<[u32]>) {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(index_digest, plan);
    }

    /// The plan of `index_digest` if its starts are no longer traced
    /// ([`Traces::stop_learning`]).
    pub fn learned_plan(&self, index_digest: &Digest) -> Option<Arc<[u32]>> {
        self.learned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(index_digest)
            .cloned()
    }

    /// Opens a startup window for `subject` now. The returned sender goes to the
    /// lazy mount; the recording ends when the window closes (see the module docs).
    pub fn record(&self, subject: TraceSubject) -> Result<StartedTrace, AgentError> {
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed);
        let digest_hex = subject.index_digest.to_string();
        let short = digest_hex
            .strip_prefix("sha256:")
            .unwrap_or(&digest_hex)
            .get(..12)
            .unwrap_or_default()
            .to_string();
        let id = format!("{started_at:013}-{short}-{sequence}");
        let summary = TraceSummary {
            id: id.clone(),
            image_ref: subject.image_ref.clone(),
            index_digest: digest_hex,
            container_id: subject.container_id.clone(),
            started_at_unix_ms: started_at,
            entries: 0,
            complete: false,
            truncated: false,
        };
        let (events, receiver) = sync_channel(self.options.event_queue.max(1));
        let control = Arc::new(Control::new(subject.container_id.clone()));
        let (done_sender, done) = watch::channel(false);
        self.shared.lock().active.insert(
            id.clone(),
            Active {
                summary: summary.clone(),
                control: Arc::clone(&control),
                wake: events.clone(),
                done,
            },
        );
        let shared = Arc::clone(&self.shared);
        let (window, max_entries) = (self.options.window, self.options.max_entries);
        let started = Instant::now();
        let spawned = std::thread::Builder::new()
            .name("stoker-trace".into())
            .spawn(move || {
                let recorded = recorder::record(
                    receiver,
                    &subject.index,
                    &control,
                    started,
                    window,
                    max_entries,
                );
                shared.finish(summary, &control, recorded);
                let _ = done_sender.send(true);
            });
        if let Err(e) = spawned {
            self.shared.lock().active.remove(&id);
            return Err(AgentError::io("starting a trace recording thread", e));
        }
        info!(trace = %id, image = %subject.image_ref, container = %subject.container_id, "startup trace recording");
        Ok(StartedTrace { id, events })
    }

    /// Gives the open window of `index_digest` that has no container yet to
    /// `container_id`. False when there is none.
    pub fn claim_for_container(&self, index_digest: &Digest, container_id: &str) -> bool {
        let digest = index_digest.to_string();
        let mut state = self.shared.lock();
        let unclaimed = state.active.values_mut().find(|active| {
            active.summary.index_digest == digest && active.control.container().is_empty()
        });
        match unclaimed {
            Some(active) => {
                active.control.set_container(container_id);
                active.summary.container_id = container_id.to_string();
                true
            }
            None => false,
        }
    }

    /// True while a startup window of `index_digest` is open.
    pub fn is_recording(&self, index_digest: &Digest) -> bool {
        let digest = index_digest.to_string();
        self.shared
            .lock()
            .active
            .values()
            .any(|active| active.summary.index_digest == digest)
    }

    /// The container is ready: closes its startup windows now and returns once
    /// their traces are on disk. False when no window of that container was open.
    pub async fn close_for_container(&self, container_id: &str) -> bool {
        if container_id.is_empty() {
            return false;
        }
        let ids: Vec<String> = self
            .shared
            .lock()
            .active
            .iter()
            .filter(|(_, active)| active.control.container() == container_id)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &ids {
            self.finish(id).await;
        }
        !ids.is_empty()
    }

    /// Closes the window of trace `id` now and waits until it is on disk. Returns
    /// its summary (None if there is no such trace or it could not be written).
    pub async fn finish(&self, id: &str) -> Option<TraceSummary> {
        let done = {
            let state = self.shared.lock();
            state.active.get(id).map(|active| {
                active.control.stop.store(true, Ordering::Release);
                let _ = active.wake.try_send(recorder::wake_up_event());
                active.done.clone()
            })
        };
        if let Some(mut done) = done {
            let _ = done.wait_for(|finished| *finished).await;
        }
        self.summary(id).filter(|s| s.complete)
    }

    /// Waits until trace `id` is complete (its window closes by itself).
    pub async fn wait(&self, id: &str) -> Option<TraceSummary> {
        let done = self.shared.lock().active.get(id).map(|a| a.done.clone());
        if let Some(mut done) = done {
            let _ = done.wait_for(|finished| *finished).await;
        }
        self.summary(id).filter(|s| s.complete)
    }

    /// Closes every open window (the agent is stopping) and waits for the traces.
    pub async fn finish_all(&self) {
        let ids: Vec<String> = self.shared.lock().active.keys().cloned().collect();
        for id in ids {
            self.finish(&id).await;
        }
    }

    /// Traces under way and kept, oldest first; only those of `index_digest` if given.
    pub fn list(&self, index_digest: Option<&str>) -> Vec<TraceSummary> {
        let state = self.shared.lock();
        let mut all: Vec<TraceSummary> = state
            .kept
            .values()
            .map(|kept| kept.summary.clone())
            .chain(state.active.values().map(Active::summary))
            .filter(|s| index_digest.is_none_or(|d| s.index_digest == d))
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    pub fn summary(&self, id: &str) -> Option<TraceSummary> {
        let state = self.shared.lock();
        state
            .kept
            .get(id)
            .map(|kept| kept.summary.clone())
            .or_else(|| state.active.get(id).map(Active::summary))
    }

    /// A complete trace with its entries (reads the disk). `Ok(None)` when there
    /// is no such trace; an error when it is still being recorded or unreadable.
    /// Marks it collected: it is the first to go when too many are kept.
    pub fn get(&self, id: &str) -> Result<Option<(TraceSummary, Trace)>, AgentError> {
        if !is_valid_id(id) {
            return Err(AgentError::InvalidArgument(format!(
                "{id:?} is not a trace id"
            )));
        }
        let summary = {
            let state = self.shared.lock();
            if state.active.contains_key(id) {
                return Err(AgentError::FailedPrecondition(format!(
                    "trace {id} is still being recorded; its startup window has not closed"
                )));
            }
            match state.kept.get(id) {
                Some(kept) => kept.summary.clone(),
                None => return Ok(None),
            }
        };
        let trace = self.shared.store.load(id)?;
        if let Some(kept) = self.shared.lock().kept.get_mut(id) {
            kept.collected = true;
        }
        Ok(Some((summary, trace)))
    }
}

impl Active {
    fn summary(&self) -> TraceSummary {
        TraceSummary {
            entries: self.control.entries.load(Ordering::Relaxed),
            container_id: self.control.container(),
            ..self.summary.clone()
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a finished recording and moves it from "active" to "kept".
    fn finish(
        &self,
        mut summary: TraceSummary,
        control: &Control,
        recorded: recorder::RecordedTrace,
    ) {
        summary.container_id = control.container();
        summary.entries = recorded.entries.len() as u64;
        summary.truncated = recorded.truncated;
        summary.complete = true;
        let trace = recorded.into_trace(
            summary.index_digest.clone(),
            summary.image_ref.clone(),
            summary.container_id.clone(),
        );
        let saved = self.store.save(&summary, &trace);
        let mut state = self.lock();
        state.active.remove(&summary.id);
        match saved {
            Ok(()) => {
                info!(trace = %summary.id, entries = summary.entries, truncated = summary.truncated, "startup trace recorded");
                state.kept.insert(
                    summary.id.clone(),
                    Kept {
                        summary,
                        collected: false,
                    },
                );
                self.evict(&mut state);
            }
            Err(e) => {
                self.store.remove(&summary.id);
                warn!(trace = %summary.id, error = %e, "startup trace lost: cannot write it");
            }
        }
    }

    /// Removes kept traces past `max_kept`: the oldest collected first, then the oldest.
    fn evict(&self, state: &mut State) {
        while state.kept.len() > self.max_kept {
            let victim = state
                .kept
                .iter()
                .find(|(_, kept)| kept.collected)
                .or_else(|| state.kept.iter().next())
                .map(|(id, _)| id.clone());
            let Some(id) = victim else { break };
            state.kept.remove(&id);
            self.store.remove(&id);
        }
    }
}

/// Trace ids are made of ASCII letters, digits and `-` (they name files).
fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}
