//! Helpers shared by Stoker's fuzz targets (see `fuzz/README.md`): an allocator
//! that measures peak heap use, and a walk over a decoded index that checks
//! every accessor against the guarantees `Index::decode` makes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use stoker_format::{Digest, FileKind, Index, Plan};

/// The system allocator, counting live bytes and their peak, so a target can
/// assert that a decoder's allocations are bounded by its input.
pub struct PeakAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to `System`; the counters are only
// statistics and never affect what is allocated.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as ours.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grow(new_size);
        }
        new
    }
}

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

/// Runs `f` and returns its result and the most heap (bytes) it had allocated
/// at any moment beyond what was live when it started. Only meaningful in a
/// binary whose `#[global_allocator]` is [`PeakAlloc`]; libFuzzer runs one
/// input at a time on one thread.
pub fn peak_heap_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = f();
    let peak = PEAK.load(Ordering::Relaxed);
    (result, peak.saturating_sub(before))
}

/// Directories whose paths are resolved back in [`check_index`]: resolving is
/// O(depth × directory size), so a hostile index must not make it quadratic.
const RESOLVED_DIRS: usize = 256;

/// Exercises every accessor of a decoded index and asserts what validation
/// promises: every inode decodes, every directory is sorted and every entry in
/// it can be looked up, every file's chunks lie inside the file and name real
/// chunks, every chunk names a real blob, and the directories reachable from
/// the root form a tree.
pub fn check_index(index: &Index) {
    let inodes = index.inode_count();
    let chunks = index.chunk_count();
    let summary = index.summary();
    assert_eq!(summary.inodes, u64::from(inodes));
    assert!(index.inode(inodes).is_none());
    assert!(index.chunk(chunks).is_none());
    assert!(index.blob(index.blob_count()).is_none());
    assert_eq!(index.lookup(inodes, b"x"), None);
    assert_eq!(index.file_chunks(inodes).count(), 0);
    assert_eq!(index.xattrs(inodes).count(), 0);
    assert_eq!(index.chunks_covering(inodes, 0..u64::MAX).count(), 0);

    for id in 0..inodes {
        let inode = index.inode(id).expect("a validated inode decodes");
        assert_eq!(inode.id, id);
        assert!(inode.parent < inodes, "inode {id}: parent out of range");
        for (name, _) in index.xattrs(id) {
            assert!(index.xattr(id, name).is_some(), "inode {id}: xattr lookup");
        }
        match inode.kind {
            FileKind::Dir => check_dir(index, id),
            FileKind::File => check_file(index, id, inode.size),
            FileKind::Symlink => {
                assert!(index.symlink_target(id).is_some(), "symlink {id}");
            }
            _ => {}
        }
    }

    for i in 0..chunks {
        let chunk = index.chunk(i).expect("chunk in range");
        assert!(chunk.compressed_len > 0 && chunk.uncompressed_len > 0);
        let range = chunk.compressed_range();
        assert!(range.start < range.end);
    }
    assert_eq!(index.chunks().count(), chunks as usize);
    for i in 0..index.blob_count() {
        assert!(index.blob(i).is_some());
    }

    // A plan over every chunk fits this index; one chunk more does not.
    let digest = Digest::of(b"fuzzed index");
    let mut plan = Plan {
        index_digest: digest,
        chunks: (0..chunks).collect(),
    };
    assert!(plan.check_against(index, &digest).is_ok());
    plan.chunks.push(chunks);
    assert!(plan.check_against(index, &digest).is_err());

    check_reachable_tree(index);
}

fn check_dir(index: &Index, dir: u32) {
    let mut previous: Option<&[u8]> = None;
    let mut count = 0u32;
    for (name, child) in index.dir_entries(dir) {
        assert!(child < index.inode_count());
        assert!(previous.is_none_or(|p| p < name), "dir {dir} not sorted");
        assert_eq!(index.lookup(dir, name), Some(child), "dir {dir}: lookup");
        previous = Some(name);
        count += 1;
    }
    assert_eq!(count, index.dir_len(dir));
    assert!(index.dir_entry(dir, count).is_none());
}

fn check_file(index: &Index, id: u32, size: u64) {
    let mut end = 0u64;
    let mut pieces = 0usize;
    for piece in index.chunks_covering(id, 0..size) {
        let chunk = index.chunk(piece.chunk).expect("file names a real chunk");
        assert_eq!(piece.len, chunk.uncompressed_len);
        assert!(piece.file_offset >= end, "file {id}: pieces overlap");
        end = piece
            .file_offset
            .checked_add(u64::from(piece.len))
            .expect("piece end fits in u64");
        assert!(end <= size, "file {id}: piece past the end");
        pieces += 1;
    }
    assert_eq!(pieces, index.file_chunks(id).count());
    // One byte is covered by at most one piece, and that piece holds it.
    for at in [0, size / 2, size.saturating_sub(1)] {
        let covering: Vec<_> = index.chunks_covering(id, at..at.saturating_add(1)).collect();
        assert!(covering.len() <= 1, "file {id}: byte {at} in two pieces");
        if let Some(piece) = covering.first() {
            assert!(piece.file_offset <= at && at < piece.file_offset + u64::from(piece.len));
        }
    }
    assert_eq!(index.chunks_covering(id, size..u64::MAX).count(), 0);
}

/// Walks the directories reachable from the root: each is met once, names its
/// parent correctly, and (for the first few) its path resolves back to it.
fn check_reachable_tree(index: &Index) {
    let mut seen = HashSet::new();
    let mut stack = vec![0u32];
    let mut resolved = 0;
    while let Some(dir) = stack.pop() {
        assert!(seen.insert(dir), "directory {dir} reachable twice");
        if resolved < RESOLVED_DIRS {
            let path = index.path_of(dir);
            assert_eq!(index.resolve(&path), Some(dir), "path of directory {dir}");
            resolved += 1;
        }
        for (_, child) in index.dir_entries(dir) {
            let inode = index.inode(child).expect("entry names an inode");
            if inode.kind == FileKind::Dir {
                assert_eq!(inode.parent, dir, "directory {child}: parent");
                stack.push(child);
            }
        }
    }
}
