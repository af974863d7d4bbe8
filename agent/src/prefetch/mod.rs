//! The prefetch executor: warms this node's chunk cache from prefetch plans so
//! that a workload's hot chunks are local before its pods arrive.
//!
//! Where it sits: registry → **fetch** → verify → cache, driven by plans instead of
//! reads. [`Prefetches`] runs at most one job per index (a second request for the
//! same index follows the running one), at most [`PrefetchOptions::plans_at_once`]
//! jobs at a time (the others wait as `Queued`), each one:
//!
//! 1. finds the index ([`NodeImages`]: mounted, or loaded from the registry);
//! 2. executes the plan ([`execute_plan`]) through the repository's shared
//!    fetcher, so containers' reads go first;
//! 3. optionally fetches the rest of the image in the background ([`execute_rest`]),
//!    within the cache's free space; off by default.
//!
//! Progress is a [`watch`] channel per job: the latest state, ending with a final
//! one. Cancelling stops the job between requests; chunks already verified stay
//! cached.

mod execute;
mod images;
mod passthrough;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stoker_format::{Digest, Plan};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::AgentError;
use crate::assembly::Assembly;
pub use execute::{Outcome, PrefetchState, Progress, execute_plan, execute_rest};
pub use images::NodeImages;
pub use passthrough::{PassthroughPrep, PrepReport, prepare_passthrough};

/// Limits of the executor.
#[derive(Clone, Debug)]
pub struct PrefetchOptions {
    /// Plans executed at the same time on the node.
    pub plans_at_once: usize,
    /// Fetch the rest of every image after its plan, whatever the request says.
    pub background_rest: bool,
    /// Where per-file backing files for passthrough go; `None`: plans do not
    /// prepare files for passthrough.
    pub assembly: Option<Assembly>,
    /// Uncompressed bytes outside a plan that may be fetched to complete the
    /// plan's files for passthrough ([`prepare_passthrough`]).
    pub complete_files_max_bytes: u64,
}

impl Default for PrefetchOptions {
    fn default() -> Self {
        PrefetchOptions {
            plans_at_once: 2,
            background_rest: false,
            assembly: None,
            complete_files_max_bytes: 0,
        }
    }
}

/// One plan to execute.
#[derive(Clone, Debug)]
pub struct PrefetchRequest {
    /// The image the plan is for; chunks come from its repository.
    pub image_ref: String,
    pub index_digest: Digest,
    pub plan: Plan,
    /// After the plan, fetch the rest of the image (within the cache's free space).
    pub background_rest: bool,
    /// Starts of the image are not traced: make the plan's files ready for
    /// passthrough before reporting the plan done ([`prepare_passthrough`]).
    pub prepare_passthrough: bool,
}

/// The node's prefetch jobs.
pub struct Prefetches {
    images: Arc<NodeImages>,
    slots: Arc<Semaphore>,
    background_rest: bool,
    assembly: Option<Assembly>,
    complete_files_max_bytes: u64,
    jobs: Mutex<HashMap<Digest, Job>>,
    next_job: AtomicU64,
    /// Indexes whose plan finished `Done` since the agent started.
    done: watch::Sender<HashSet<Digest>>,
}

struct Job {
    id: u64,
    plan: watch::Receiver<Progress>,
    /// The background fetch of the rest of the image, once the plan is done.
    rest: Option<watch::Receiver<Progress>>,
    cancel: CancellationToken,
}

impl Prefetches {
    pub fn new(images: Arc<NodeImages>, options: PrefetchOptions) -> Arc<Prefetches> {
        Arc::new(Prefetches {
            images,
            slots: Arc::new(Semaphore::new(options.plans_at_once.max(1))),
            background_rest: options.background_rest,
            assembly: options.assembly,
            complete_files_max_bytes: options.complete_files_max_bytes,
            jobs: Mutex::new(HashMap::new()),
            next_job: AtomicU64::new(0),
            done: watch::Sender::new(HashSet::new()),
        })
    }

    pub fn images(&self) -> &Arc<NodeImages> {
        &self.images
    }

    /// The indexes whose plan finished `Done` (every chunk of the plan verified
    /// and on local disk) since the agent started; changes as plans finish.
    /// The node's warm gate waits on it.
    pub fn done_plans(&self) -> watch::Receiver<HashSet<Digest>> {
        self.done.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Digest, Job>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts executing `request` (or follows the job already running for its
    /// index) and returns its progress. Must be called inside a tokio runtime.
    pub fn start(
        self: &Arc<Self>,
        request: PrefetchRequest,
    ) -> Result<watch::Receiver<Progress>, AgentError> {
        if request.plan.index_digest != request.index_digest {
            return Err(AgentError::InvalidArgument(format!(
                "the plan is for index {}, the request names {}",
                request.plan.index_digest, request.index_digest
            )));
        }
        let digest = request.index_digest;
        let mut jobs = self.lock();
        if let Some(job) = jobs.get(&digest) {
            if !job.plan.borrow().state.is_final() {
                return Ok(job.plan.clone());
            }
            // Only the background fetch of an older plan is left: a new plan wins.
            job.cancel.cancel();
        }
        let id = self.next_job.fetch_add(1, Ordering::Relaxed);
        let (progress, receiver) = watch::channel(Progress::queued(digest));
        let cancel = CancellationToken::new();
        jobs.insert(
            digest,
            Job {
                id,
                plan: receiver.clone(),
                rest: None,
                cancel: cancel.clone(),
            },
        );
        drop(jobs);
        info!(image = %request.image_ref, index = %digest, chunks = request.plan.chunks.len(), "prefetch plan accepted");
        tokio::spawn(Arc::clone(self).run(id, request, progress, cancel));
        Ok(receiver)
    }

    /// Cancels the job of `index_digest`. False when none was running.
    pub fn cancel(&self, index_digest: &Digest) -> bool {
        match self.lock().get(index_digest) {
            Some(job) if !job.cancel.is_cancelled() => {
                job.cancel.cancel();
                true
            }
            _ => false,
        }
    }

    /// The latest progress of every job not finished yet (a plan, or the
    /// background fetch after it).
    pub fn in_progress(&self) -> Vec<Progress> {
        let jobs = self.lock();
        let mut all: Vec<Progress> = jobs
            .values()
            .filter_map(|job| {
                let plan = job.plan.borrow().clone();
                if !plan.state.is_final() {
                    return Some(plan);
                }
                let rest = job.rest.as_ref()?.borrow().clone();
                (!rest.state.is_final()).then_some(rest)
            })
            .collect();
        all.sort_by_key(|p| p.index_digest.to_string());
        all
    }

    async fn run(
        self: Arc<Self>,
        id: u64,
        request: PrefetchRequest,
        progress: watch::Sender<Progress>,
        cancel: CancellationToken,
    ) {
        let digest = request.index_digest;
        let outcome = self.run_plan(&request, &progress, &cancel).await;
        match &outcome {
            Outcome::Done => {
                info!(index = %digest, chunks = progress.borrow().chunks_total, bytes = progress.borrow().bytes_total, "prefetch plan done");
                self.done.send_modify(|done| {
                    done.insert(digest);
                });
            }
            Outcome::Failed(reason) => warn!(index = %digest, reason, "prefetch plan failed"),
            Outcome::Cancelled => info!(index = %digest, "prefetch plan cancelled"),
        }
        let background_rest = request.background_rest || self.background_rest;
        if outcome == Outcome::Done && background_rest && !cancel.is_cancelled() {
            self.run_rest(id, &request, &cancel).await;
        }
        let mut jobs = self.lock();
        if jobs.get(&digest).is_some_and(|job| job.id == id) {
            jobs.remove(&digest);
        }
    }

    async fn run_plan(
        &self,
        request: &PrefetchRequest,
        progress: &watch::Sender<Progress>,
        cancel: &CancellationToken,
    ) -> Outcome {
        let failed = |reason: String| {
            progress.send_modify(|p| {
                p.state = PrefetchState::Failed;
                p.error = Some(reason.clone());
            });
            Outcome::Failed(reason)
        };
        let cancelled = || {
            progress.send_modify(|p| p.state = PrefetchState::Cancelled);
            Outcome::Cancelled
        };
        let _slot = tokio::select! {
            () = cancel.cancelled() => return cancelled(),
            slot = Arc::clone(&self.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return failed("the prefetch executor is shutting down".into()),
            },
        };
        let opened = tokio::select! {
            () = cancel.cancelled() => return cancelled(),
            opened = self.images.open(&request.image_ref, &request.index_digest) => opened,
        };
        let (index, fetcher) = match opened {
            Ok(opened) => opened,
            Err(e) => return failed(e.to_string()),
        };
        let prepare = match &self.assembly {
            Some(assembly) if request.prepare_passthrough => Some(PassthroughPrep {
                assembly: assembly.options_for(&request.index_digest),
                max_extra_bytes: self.complete_files_max_bytes,
            }),
            _ => None,
        };
        execute_plan(
            &fetcher,
            &index,
            &request.index_digest,
            &request.plan,
            prepare.as_ref(),
            progress,
            cancel,
        )
        .await
    }

    async fn run_rest(&self, id: u64, request: &PrefetchRequest, cancel: &CancellationToken) {
        let digest = request.index_digest;
        let Ok((index, fetcher)) = self.images.open(&request.image_ref, &digest).await else {
            return;
        };
        let (progress, receiver) = watch::channel(Progress::queued(digest));
        match self.lock().get_mut(&digest) {
            Some(job) if job.id == id => job.rest = Some(receiver),
            _ => return,
        }
        let outcome = execute_rest(&fetcher, &index, &request.plan, &progress, cancel).await;
        let p = progress.borrow().clone();
        info!(index = %digest, ?outcome, chunks = p.chunks_done, bytes = p.bytes_done, "background fetch of the rest of the image ended");
    }
}
