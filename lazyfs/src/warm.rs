//! Reading into the page cache, ahead of a start, the local files the start will
//! read: for a start on a warmed node, so that its opens and reads find the
//! files' inodes and bytes in memory instead of waiting on the disk one file at
//! a time.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use stoker_cache::ChunkCache;
use stoker_format::{FileKind, Index, InodeId};

use crate::assembly::{AssemblyOptions, content_key, needs_assembly};

/// Threads that open files and queue their reads for [`warm_page_cache`]: an
/// open after the page cache was dropped waits on the disk for the file's inode,
/// and the disk serves several at once.
const WARMING_THREADS: usize = 8;

/// Asks the kernel to read into the page cache, in the order of `chunks` (chunk
/// positions in `index`, e.g. a prefetch plan), the local files a start of the
/// image will read those chunks from: the ranges of an assembled backing file
/// (in `assembly`, written or verified by this process) for a multi-chunk file,
/// the chunk file otherwise. For a start on a warmed node, so that its opens and
/// reads find the files' inodes and bytes in memory instead of waiting on the
/// disk one file at a time. The reads are asked for (`POSIX_FADV_WILLNEED`)
/// from several threads (`WARMING_THREADS`) taking files in plan order; returns once
/// they are all queued, with the bytes asked for. Files that are gone are skipped.
pub fn warm_page_cache(
    index: &Index,
    cache: &ChunkCache,
    assembly: Option<&AssemblyOptions>,
    chunks: &[u32],
) -> u64 {
    let files = files_to_warm(index, cache, assembly, chunks);
    let next = AtomicUsize::new(0);
    let bytes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..WARMING_THREADS.min(files.len()) {
            scope.spawn(|| {
                while let Some(file) = files.get(next.fetch_add(1, Ordering::Relaxed)) {
                    bytes.fetch_add(file.warm(), Ordering::Relaxed);
                }
            });
        }
    });
    bytes.into_inner()
}

/// A local file a start will read, and the ranges it will read of it.
struct FileToWarm {
    path: PathBuf,
    ranges: Vec<(u64, u64)>,
}

impl FileToWarm {
    /// Opens the file and asks the kernel to read its ranges; the bytes asked for.
    fn warm(&self) -> u64 {
        let Ok(file) = File::open(&self.path) else {
            return 0;
        };
        let mut bytes = 0;
        for &(offset, len) in &self.ranges {
            let (Ok(offset_arg), Ok(len_arg)) = (i64::try_from(offset), i64::try_from(len)) else {
                continue;
            };
            let advised = nix::fcntl::posix_fadvise(
                &file,
                offset_arg,
                len_arg,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_WILLNEED,
            );
            if advised.is_ok() {
                bytes += len;
            }
        }
        bytes
    }
}

/// The files [`warm_page_cache`] reads, in the order `chunks` first needs them.
fn files_to_warm(
    index: &Index,
    cache: &ChunkCache,
    assembly: Option<&AssemblyOptions>,
    chunks: &[u32],
) -> Vec<FileToWarm> {
    // Which files use each wanted chunk, and where.
    let wanted: HashSet<u32> = chunks.iter().copied().collect();
    let mut users: HashMap<u32, Vec<(InodeId, u64, u32)>> = HashMap::new();
    for id in 0..index.inode_count() {
        if !index.inode(id).is_some_and(|i| i.kind == FileKind::File) {
            continue;
        }
        for piece in index.file_chunks(id) {
            if wanted.contains(&piece.chunk) {
                users
                    .entry(piece.chunk)
                    .or_default()
                    .push((id, piece.file_offset, piece.len));
            }
        }
    }
    let mut files: Vec<FileToWarm> = Vec::new();
    // Where each assembled file is in `files` (None: not assembled here).
    let mut assembled: HashMap<InodeId, Option<usize>> = HashMap::new();
    let mut chunk_files = HashSet::new();
    for &chunk in chunks {
        let Some(loc) = index.chunk(chunk) else {
            continue;
        };
        for &(id, offset, len) in users.get(&chunk).into_iter().flatten() {
            let backing = assembly
                .filter(|_| needs_assembly(index, id))
                .and_then(|a| {
                    *assembled.entry(id).or_insert_with(|| {
                        let (key, _) = content_key(index, id)?;
                        let path = a.dir.join(key.hex());
                        if !a.verified.contains(&path) {
                            return None;
                        }
                        files.push(FileToWarm {
                            path,
                            ranges: Vec::new(),
                        });
                        Some(files.len() - 1)
                    })
                });
            match backing {
                Some(at) => files[at].ranges.push((offset, u64::from(len))),
                None if chunk_files.insert(loc.digest) => files.push(FileToWarm {
                    path: cache.chunk_path(&loc.digest),
                    ranges: vec![(0, u64::from(loc.uncompressed_len))],
                }),
                None => {}
            }
        }
    }
    files
}
