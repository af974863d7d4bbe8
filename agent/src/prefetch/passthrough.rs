//! Making a warmed image's files ready for passthrough before its containers
//! start, when the controller has learned the image and its starts are no
//! longer traced (`PrefetchRequest.learning_complete`).
//!
//! An untraced start can pass every file whose bytes are all local to the
//! kernel. A file of one chunk needs nothing more; a file of several needs one
//! backing file with all its bytes ([`crate::assembly`]). The plan holds the
//! chunks earlier starts read, and for large files (libraries mapped and faulted
//! in piece by piece) that is often only part of the file. So after the plan:
//!
//! 1. the multi-chunk files the plan reads are taken in plan order (by their
//!    first planned chunk), as long as the chunks they lack fit in
//!    `max_extra_bytes` (uncompressed) and the files fit in the image's assembly
//!    bound. A file the plan holds less than a quarter of is left out: its start
//!    reads too little of it (the head of a large data file, say) for fetching
//!    and copying the rest to pay off;
//! 2. the chunks they lack are fetched, verified and cached like the plan's;
//! 3. their backing files are assembled, so their first open passes through.
//!
//! Nothing here fails the plan: a file that cannot be completed or assembled is
//! read through the lazy filesystem as before.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use stoker_fetch::{ChunkLocation, Fetcher};
use stoker_format::{Index, InodeId, Plan};
use stoker_lazyfs::{AssemblyOptions, assemble_files, needs_assembly};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::execute::{Outcome, Progress, warm};

/// A file is completed only if the plan holds at least 1/this of its bytes.
const MIN_PLANNED_SHARE: u64 = 4;

/// How to prepare a plan's files for passthrough.
#[derive(Clone, Debug)]
pub struct PassthroughPrep {
    /// Where the image's backing files go, and their bound.
    pub assembly: AssemblyOptions,
    /// Uncompressed bytes of chunks outside the plan that may be fetched to
    /// complete the plan's files.
    pub max_extra_bytes: u64,
}

/// What [`prepare_passthrough`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrepReport {
    /// Multi-chunk files the plan reads.
    pub files_in_plan: u64,
    /// Of those, files chosen (within the byte bounds).
    pub files_chosen: u64,
    /// Chunks fetched to complete them, and their uncompressed bytes.
    pub extra_chunks: u64,
    pub extra_bytes: u64,
    /// Backing files assembled now, or found assembled already.
    pub assembled: u64,
    pub present: u64,
}

/// Completes and assembles the multi-chunk files `plan` reads (see the module
/// docs). Call after the plan's chunks are cached.
pub async fn prepare_passthrough(
    fetcher: &Fetcher,
    index: &Arc<Index>,
    plan: &Plan,
    prep: &PassthroughPrep,
    cancel: &CancellationToken,
) -> PrepReport {
    let cache = fetcher.cache();
    let chosen = choose_files(index, plan, prep, |chunk| cache.contains(&chunk.digest));
    let mut report = PrepReport {
        files_in_plan: chosen.files_in_plan,
        files_chosen: chosen.files.len() as u64,
        extra_chunks: chosen.missing.len() as u64,
        extra_bytes: chosen
            .missing
            .iter()
            .map(|c| u64::from(c.uncompressed_len))
            .sum(),
        ..PrepReport::default()
    };
    if chosen.files.is_empty() {
        return report;
    }
    if !chosen.missing.is_empty() {
        let (progress, _receiver) = watch::channel(Progress::queued(plan.index_digest));
        match warm(fetcher, chosen.missing, &progress, cancel).await {
            Outcome::Done => {}
            outcome => {
                // Files still lacking a chunk are skipped by the assembly.
                warn!(
                    ?outcome,
                    "completing the plan's files for passthrough stopped"
                );
            }
        }
    }
    if cancel.is_cancelled() {
        return report;
    }
    let (index, cache, assembly) = (Arc::clone(index), cache.clone(), prep.assembly.clone());
    let files = chosen.files;
    match tokio::task::spawn_blocking(move || assemble_files(&index, &cache, &assembly, files))
        .await
    {
        Ok(Ok(assembled)) => {
            report.assembled = assembled.assembled;
            report.present = assembled.present;
        }
        Ok(Err(e)) => warn!(error = %e, "cannot assemble the plan's files for passthrough"),
        Err(e) => warn!(error = %e, "the assembly task failed"),
    }
    report
}

/// The files to prepare and the chunks they lack.
#[derive(Debug, Default)]
struct Chosen {
    files_in_plan: u64,
    files: Vec<InodeId>,
    missing: Vec<ChunkLocation>,
}

/// The multi-chunk regular files `plan` reads, in plan order, while the chunks
/// they lack (`cached` says which are local) fit in `prep.max_extra_bytes` and
/// the files in `prep.assembly.max_bytes`.
fn choose_files(
    index: &Index,
    plan: &Plan,
    prep: &PassthroughPrep,
    cached: impl Fn(&ChunkLocation) -> bool,
) -> Chosen {
    let rank: HashMap<u32, usize> = plan
        .chunks
        .iter()
        .enumerate()
        .rev()
        .map(|(rank, &chunk)| (chunk, rank))
        .collect();
    let mut in_plan: Vec<(usize, InodeId)> = (0..index.inode_count())
        .filter(|&id| needs_assembly(index, id))
        .filter_map(|id| {
            let first_rank = index
                .file_chunks(id)
                .filter_map(|p| rank.get(&p.chunk))
                .min()?;
            Some((*first_rank, id))
        })
        .collect();
    in_plan.sort_unstable();
    let mut chosen = Chosen {
        files_in_plan: in_plan.len() as u64,
        ..Chosen::default()
    };
    let (mut file_bytes, mut extra_bytes) = (0u64, 0u64);
    let mut taken = HashSet::new();
    for (_, id) in in_plan {
        let size = index.inode(id).map_or(0, |i| i.size);
        let planned_bytes: u64 = index
            .file_chunks(id)
            .filter(|p| rank.contains_key(&p.chunk))
            .map(|p| u64::from(p.len))
            .sum();
        if planned_bytes.saturating_mul(MIN_PLANNED_SHARE) < size {
            continue;
        }
        // Distinct chunks of the file neither cached nor taken for an earlier file.
        let mut seen = HashSet::new();
        let lacking: Vec<ChunkLocation> = index
            .file_chunks(id)
            .filter_map(|p| index.chunk(p.chunk))
            .filter(|c| !cached(c) && !taken.contains(&c.digest) && seen.insert(c.digest))
            .collect();
        let lacking_bytes: u64 = lacking.iter().map(|c| u64::from(c.uncompressed_len)).sum();
        if file_bytes + size > prep.assembly.max_bytes
            || extra_bytes + lacking_bytes > prep.max_extra_bytes
        {
            continue;
        }
        file_bytes += size;
        extra_bytes += lacking_bytes;
        taken.extend(seen);
        chosen.missing.extend(lacking);
        chosen.files.push(id);
    }
    chosen
}
