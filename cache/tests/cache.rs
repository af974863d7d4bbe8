//! Behaviour of the on-disk chunk cache, against a real file system in temp dirs.

use std::fs::{self, File, FileTimes, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use stoker_cache::{CacheError, ChunkCache, Digest};

/// Deterministic, distinct chunk contents.
fn chunk(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn disk_bytes(dir: &Path) -> u64 {
    files_under(&dir.join("chunks"))
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    byte[0] ^= 0xff;
    file.write_all_at(&byte, offset).unwrap();
}

#[test]
fn insert_then_get_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let data = chunk(1, 10_000);
    let digest = Digest::of(&data);

    assert!(cache.get(&digest).is_none());
    cache.insert(&digest, &data).unwrap();
    cache.insert(&digest, &data).unwrap(); // idempotent
    assert!(cache.contains(&digest));

    let got = cache.get(&digest).expect("hit");
    assert_eq!(got.len(), 10_000);
    assert_eq!(got.read_all().unwrap(), data);
    let mut buf = vec![0u8; 300];
    assert_eq!(got.read_at(9_900, &mut buf).unwrap(), 100);
    assert_eq!(&buf[..100], &data[9_900..]);
    assert_eq!(got.read_at(10_000, &mut buf).unwrap(), 0);
    assert_eq!(got.read_at(500, &mut buf).unwrap(), 300);
    assert_eq!(&buf[..], &data[500..800]);
    assert_eq!(
        got.path(),
        dir.path()
            .join("chunks")
            .join(&digest.hex()[..2])
            .join(digest.hex())
    );
    drop(got);

    let usage = cache.usage();
    assert_eq!((usage.bytes, usage.chunks), (10_000, 1));
    assert_eq!((usage.hits, usage.misses), (1, 1));
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

#[test]
fn insert_refuses_bytes_that_do_not_match_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let data = chunk(2, 1000);
    let wrong = Digest::of(b"something else");

    let err = cache.insert(&wrong, &data).unwrap_err();
    assert!(
        matches!(err, CacheError::DigestMismatch { expected, .. } if expected == wrong),
        "{err}"
    );
    assert!(!cache.contains(&wrong));
    assert_eq!(cache.usage().bytes, 0);
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn corrupted_file_is_detected_dropped_and_reported_as_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    let good = chunk(3, 5000);
    let truncated = chunk(4, 5000);
    let (good_digest, truncated_digest) = (Digest::of(&good), Digest::of(&truncated));
    {
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        cache.insert(&good_digest, &good).unwrap();
        cache.insert(&truncated_digest, &truncated).unwrap();
    }
    // Damage both on disk while no cache is running: one bit flip, one torn write.
    let cache_for_paths = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    flip_byte(&cache_for_paths.chunk_path(&good_digest), 4321);
    let torn = OpenOptions::new()
        .write(true)
        .open(cache_for_paths.chunk_path(&truncated_digest))
        .unwrap();
    torn.set_len(1000).unwrap();
    drop(cache_for_paths);

    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert!(cache.contains(&good_digest), "not hashed at open");
    assert!(cache.get(&good_digest).is_none(), "bit flip detected");
    assert!(
        cache.get(&truncated_digest).is_none(),
        "torn write detected"
    );
    assert!(!cache.contains(&good_digest));
    assert!(!cache.chunk_path(&good_digest).exists(), "bad file deleted");
    let usage = cache.usage();
    assert_eq!(usage.corrupt_dropped, 2);
    assert_eq!(usage.misses, 2);
    assert_eq!((usage.bytes, usage.chunks), (0, 0));

    // Fetched again, it is served normally.
    cache.insert(&good_digest, &good).unwrap();
    assert_eq!(cache.get(&good_digest).unwrap().read_all().unwrap(), good);
}

#[test]
fn a_file_this_process_wrote_is_not_hashed_again_until_the_cache_is_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let data = chunk(5, 3000);
    let digest = Digest::of(&data);
    cache.insert(&digest, &data).unwrap();
    // Changed behind the cache's back: the process that wrote it trusts it (the
    // documented trade-off; a warm open must not read and hash the file)...
    flip_byte(&cache.chunk_path(&digest), 0);
    let served = cache
        .get(&digest)
        .expect("written by this process: not re-hashed");
    assert_eq!(served.len(), 3000);
    drop(served);
    assert_eq!(cache.usage().corrupt_dropped, 0);
    drop(cache);
    // ...and the next process catches it on its first read.
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert!(cache.get(&digest).is_none());
    assert_eq!(cache.usage().corrupt_dropped, 1);
}

#[test]
fn capacity_is_respected_under_a_larger_workload_while_chunks_are_pinned() {
    const LEN: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 4 * LEN as u64).unwrap();
    let chunks: Vec<Vec<u8>> = (0..40).map(|i| chunk(100 + i, LEN)).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();

    for i in 0..2 {
        cache.insert(&digests[i], &chunks[i]).unwrap();
    }
    let pinned: Vec<_> = (0..2).map(|i| cache.get(&digests[i]).unwrap()).collect();

    for i in 2..40 {
        cache.insert(&digests[i], &chunks[i]).unwrap();
        let usage = cache.usage();
        assert!(usage.bytes <= usage.capacity, "over capacity: {usage:?}");
        assert!(cache.contains(&digests[i]), "just inserted chunk stays");
        for (p, guard) in pinned.iter().enumerate() {
            assert!(cache.contains(&digests[p]), "pinned chunk {p} evicted");
            assert_eq!(guard.read_all().unwrap(), chunks[p]);
        }
    }
    assert_eq!(cache.usage().evictions, 40 - 4);
    assert_eq!(disk_bytes(dir.path()), cache.usage().bytes);

    // The most recent unpinned chunks are the ones kept.
    assert!(cache.contains(&digests[38]) && cache.contains(&digests[39]));
    assert!(!cache.contains(&digests[37]));
    drop(pinned);
}

#[test]
fn insert_succeeds_when_everything_is_pinned_and_the_excess_goes_at_unpin() {
    const LEN: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 3 * LEN as u64).unwrap();
    let chunks: Vec<Vec<u8>> = (0..5).map(|i| chunk(200 + i, LEN)).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();

    let mut guards = Vec::new();
    for i in 0..3 {
        cache.insert(&digests[i], &chunks[i]).unwrap();
        guards.push(cache.get(&digests[i]).unwrap());
    }
    cache.insert(&digests[3], &chunks[3]).unwrap();
    guards.push(cache.get(&digests[3]).unwrap());
    cache.insert(&digests[4], &chunks[4]).unwrap();

    let usage = cache.usage();
    assert_eq!(usage.bytes, 5 * LEN as u64, "documented temporary excess");
    assert_eq!(usage.evictions, 0);
    for (i, guard) in guards.iter().enumerate() {
        assert_eq!(guard.read_all().unwrap(), chunks[i]);
    }

    drop(guards);
    let usage = cache.usage();
    assert!(usage.bytes <= usage.capacity, "{usage:?}");
    assert_eq!(usage.evictions, 2);
    assert_eq!(disk_bytes(dir.path()), usage.bytes);
}

#[test]
fn chunk_larger_than_the_whole_cache_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 100).unwrap();
    let data = chunk(6, 101);
    let err = cache.insert(&Digest::of(&data), &data).unwrap_err();
    assert!(
        matches!(err, CacheError::TooLarge { len: 101, .. }),
        "{err}"
    );
    assert!(files_under(dir.path()).is_empty());
}

#[test]
fn reopening_keeps_contents_and_accounting() {
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..10).map(|i| chunk(300 + i, 2000 + i as usize)).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    let bytes_before = {
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        for (d, c) in digests.iter().zip(&chunks) {
            cache.insert(d, c).unwrap();
        }
        cache.usage().bytes
    };

    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let usage = cache.usage();
    assert_eq!((usage.bytes, usage.chunks), (bytes_before, 10));
    for (d, c) in digests.iter().zip(&chunks) {
        assert_eq!(
            &cache
                .get(d)
                .expect("warm after restart")
                .read_all()
                .unwrap(),
            c
        );
    }
    assert_eq!(cache.usage().corrupt_dropped, 0);
}

#[test]
fn reopening_with_less_capacity_evicts_by_file_times() {
    const LEN: usize = 1000;
    let dir = tempfile::tempdir().unwrap();
    let chunks: Vec<Vec<u8>> = (0..4).map(|i| chunk(400 + i, LEN)).collect();
    let digests: Vec<Digest> = chunks.iter().map(|c| Digest::of(c)).collect();
    {
        let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
        for (d, c) in digests.iter().zip(&chunks) {
            cache.insert(d, c).unwrap();
        }
        // Chunk i last used i hours after the epoch, except chunk 0, read "now".
        let epoch = SystemTime::UNIX_EPOCH;
        for (i, d) in digests.iter().enumerate() {
            let at = if i == 0 {
                SystemTime::now()
            } else {
                epoch + Duration::from_secs(3600 * i as u64)
            };
            let file = File::options()
                .write(true)
                .open(cache.chunk_path(d))
                .unwrap();
            file.set_times(FileTimes::new().set_accessed(at).set_modified(at))
                .unwrap();
        }
    }

    let cache = ChunkCache::open(dir.path(), 2 * LEN as u64).unwrap();
    let kept: Vec<bool> = digests.iter().map(|d| cache.contains(d)).collect();
    assert_eq!(kept, vec![true, false, false, true]);
    assert_eq!(cache.usage().evictions, 2);
    assert_eq!(disk_bytes(dir.path()), 2 * LEN as u64);
}

#[test]
fn open_removes_temp_leftovers_and_ignores_strangers() {
    let dir = tempfile::tempdir().unwrap();
    drop(ChunkCache::open(dir.path(), 1 << 20).unwrap());
    fs::write(dir.path().join("tmp/abc.1.0"), b"half a chunk").unwrap();
    fs::create_dir(dir.path().join("tmp/stray-dir")).unwrap();
    fs::write(dir.path().join("chunks/ab/not-a-digest"), b"x").unwrap();

    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    assert!(
        fs::read_dir(dir.path().join("tmp"))
            .unwrap()
            .next()
            .is_none()
    );
    assert_eq!(cache.usage().chunks, 0);
    assert!(dir.path().join("chunks/ab/not-a-digest").exists());
}

#[test]
fn removed_or_vanished_chunks_are_misses_and_open_guards_keep_reading() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 1 << 20).unwrap();
    let (a, b) = (chunk(7, 4000), chunk(8, 4000));
    let (da, db) = (Digest::of(&a), Digest::of(&b));
    cache.insert(&da, &a).unwrap();
    cache.insert(&db, &b).unwrap();

    let guard = cache.get(&da).unwrap();
    assert!(cache.remove(&da));
    assert!(!cache.remove(&da));
    assert!(!cache.contains(&da));
    assert_eq!(guard.read_all().unwrap(), a, "open guard still reads");
    drop(guard);

    fs::remove_file(cache.chunk_path(&db)).unwrap();
    assert!(cache.get(&db).is_none());
    assert!(!cache.contains(&db));
    assert_eq!(cache.usage().bytes, 0);

    cache.insert(&da, &a).unwrap();
    assert_eq!(cache.get(&da).unwrap().read_all().unwrap(), a);
}

#[test]
fn concurrent_readers_and_writers_see_only_correct_bytes() {
    const LEN: usize = 4096;
    const CHUNKS: u32 = 64;
    let dir = tempfile::tempdir().unwrap();
    let cache = ChunkCache::open(dir.path(), 16 * LEN as u64).unwrap();
    let chunks: Arc<Vec<Vec<u8>>> = Arc::new((0..CHUNKS).map(|i| chunk(500 + i, LEN)).collect());

    let workers: Vec<_> = (0..8u32)
        .map(|t| {
            let cache = cache.clone();
            let chunks = Arc::clone(&chunks);
            thread::spawn(move || {
                let mut state = t + 1;
                let mut held = Vec::new();
                for _ in 0..400 {
                    state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let i = ((state >> 8) % CHUNKS) as usize;
                    let digest = Digest::of(&chunks[i]);
                    match cache.get(&digest) {
                        Some(guard) => {
                            assert_eq!(guard.read_all().unwrap(), chunks[i]);
                            // Hold a few guards for a while to exercise pinning.
                            held.push(guard);
                            if held.len() > 2 {
                                held.remove(0);
                            }
                        }
                        None => cache.insert(&digest, &chunks[i]).unwrap(),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }

    let usage = cache.usage();
    assert!(usage.bytes <= usage.capacity, "{usage:?}");
    assert_eq!(usage.corrupt_dropped, 0);
    assert_eq!(disk_bytes(dir.path()), usage.bytes);
    assert_eq!(
        files_under(&dir.path().join("chunks")).len() as u64,
        usage.chunks
    );
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

/// A small tmpfs, unmounted on drop.
struct TinyFs {
    dir: tempfile::TempDir,
}

impl TinyFs {
    fn mount(size: &str) -> Option<TinyFs> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status();
        match status {
            Ok(s) if s.success() => Some(TinyFs { dir }),
            other => {
                eprintln!("SKIPPED: cannot mount a tmpfs to fill the disk (need root): {other:?}");
                None
            }
        }
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[test]
fn full_disk_is_a_distinct_error_and_leaves_no_partial_files() {
    let Some(fs_) = TinyFs::mount("256k") else {
        return;
    };
    let root = fs_.dir.path();
    let cache = ChunkCache::open(root, 1 << 30).unwrap();
    let chunks: Vec<Vec<u8>> = (0..16).map(|i| chunk(600 + i, 40_000)).collect();

    let mut stored = Vec::new();
    let mut full = None;
    for c in &chunks {
        match cache.insert(&Digest::of(c), c) {
            Ok(()) => stored.push(c),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a 256 KiB file system fills up");
    assert!(matches!(err, CacheError::DiskFull { .. }), "{err}");
    assert!(!stored.is_empty());
    assert!(
        files_under(&root.join("tmp")).is_empty(),
        "no partial temp file"
    );
    assert_eq!(files_under(&root.join("chunks")).len(), stored.len());
    for c in &stored {
        assert_eq!(&cache.get(&Digest::of(c)).unwrap().read_all().unwrap(), *c);
    }
    assert_eq!(cache.usage().corrupt_dropped, 0);

    // Space freed: inserting works again.
    assert!(cache.remove(&Digest::of(stored[0])));
    let next = &chunks[stored.len()];
    cache.insert(&Digest::of(next), next).unwrap();
    drop(cache);
}
