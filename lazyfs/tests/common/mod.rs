//! Shared test harness: builds images in memory (index + one zstd blob), serves
//! the blob from a fake [`BlobSource`] that counts and can tamper with requests,
//! mounts them for real, and describes what a mount must show as a
//! [`TreeSnapshot`] computed from the index alone ([`snapshot_of_index`], reusable
//! by any test that has an index and the chunk bytes).

#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::future::BoxFuture;
use sha2::{Digest as _, Sha256};
use stoker_cache::ChunkCache;
use stoker_fetch::{BlobSource, FetchConfig, FetchSourceError, Fetcher};
use stoker_format::{
    BlobInfo, ChunkId, ChunkRecord, ChunkTable, Chunking, Digest, FileKind, FilePiece, Index, Meta,
    Node, NodeId, NodeKind, Tree,
};
use stoker_lazyfs::{MountHandle, MountOptions};
use stoker_testkit::tree::{EntrySnapshot, FileKind as SnapKind, TreeSnapshot, is_ignored_xattr};
use tempfile::TempDir;

/// True if real FUSE mounts can run here; otherwise says loudly why not.
pub fn fuse_available(test: &str) -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED: {test}: /dev/fuse is absent");
        return false;
    }
    stoker_testkit::require_root(test)
}

pub fn meta(permissions: u32, uid: u32, gid: u32) -> Meta {
    Meta {
        permissions,
        uid,
        gid,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 123_456_789,
        xattrs: BTreeMap::new(),
    }
}

/// Deterministic, poorly compressible bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Builds a tree and its one data blob (independently zstd-compressed chunks).
pub struct ImageBuilder {
    pub tree: Tree,
    table: ChunkTable,
    blob: Vec<u8>,
    /// Uncompressed bytes of every chunk, by digest.
    chunk_bytes: HashMap<Digest, Vec<u8>>,
}

impl Default for ImageBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ImageBuilder {
    pub fn new() -> Self {
        let mut table = ChunkTable::default();
        // The digest and size are filled in by `finish`.
        table.add_blob(BlobInfo {
            digest: Digest::default(),
            size: 0,
        });
        ImageBuilder {
            tree: Tree::new(meta(0o755, 0, 0)),
            table,
            blob: Vec::new(),
            chunk_bytes: HashMap::new(),
        }
    }

    pub fn chunk(&mut self, bytes: &[u8]) -> ChunkId {
        let digest = Digest::of(bytes);
        if let Some(id) = self.table.find(&digest) {
            return id;
        }
        let compressed = zstd::bulk::compress(bytes, 3).expect("zstd compress");
        let record = ChunkRecord {
            digest,
            blob: 0,
            compressed_offset: self.blob.len() as u64,
            compressed_len: compressed.len() as u32,
            uncompressed_len: bytes.len() as u32,
        };
        self.blob.extend_from_slice(&compressed);
        self.chunk_bytes.insert(digest, bytes.to_vec());
        self.table.insert(record)
    }

    pub fn add(&mut self, dir: NodeId, name: &[u8], kind: NodeKind, meta: Meta) -> NodeId {
        let node = self.tree.add(Node { kind, meta });
        self.tree.link(dir, name, node);
        node
    }

    pub fn dir(&mut self, parent: NodeId, name: &[u8], meta: Meta) -> NodeId {
        self.add(parent, name, NodeKind::Dir(BTreeMap::new()), meta)
    }

    /// A regular file cut into `chunk_size` chunks.
    pub fn file(
        &mut self,
        dir: NodeId,
        name: &[u8],
        content: &[u8],
        chunk_size: usize,
        meta: Meta,
    ) -> NodeId {
        let mut pieces = Vec::new();
        for (i, part) in content.chunks(chunk_size.max(1)).enumerate() {
            pieces.push(FilePiece {
                offset: (i * chunk_size) as u64,
                chunk: self.chunk(part),
            });
        }
        let kind = NodeKind::File {
            size: content.len() as u64,
            pieces,
        };
        self.add(dir, name, kind, meta)
    }

    /// A file of `size` bytes with data only at the given offsets (holes elsewhere).
    pub fn sparse_file(
        &mut self,
        dir: NodeId,
        name: &[u8],
        size: u64,
        data: &[(u64, Vec<u8>)],
        meta: Meta,
    ) -> NodeId {
        let pieces = data
            .iter()
            .map(|(offset, bytes)| FilePiece {
                offset: *offset,
                chunk: self.chunk(bytes),
            })
            .collect();
        self.add(dir, name, NodeKind::File { size, pieces }, meta)
    }

    pub fn finish(self) -> TestImage {
        self.finish_with_index_blob().0
    }

    /// [`finish`](Self::finish), also returning the compressed index blob.
    pub fn finish_with_index_blob(mut self) -> (TestImage, Vec<u8>) {
        let blob = Bytes::from(self.blob);
        let blob_digest = Digest::of(&blob);
        self.table.blobs[0] = BlobInfo {
            digest: blob_digest,
            size: blob.len() as u64,
        };
        let encoded = self
            .tree
            .encode(&self.table, Chunking::Fixed { size: 1 << 20 })
            .expect("encode index");
        let index = Index::decode_verified(&encoded.compressed, &encoded.digest).expect("decode");
        let image = TestImage {
            index: Arc::new(index),
            blob_digest,
            blob,
            chunk_bytes: self.chunk_bytes,
        };
        (image, encoded.compressed)
    }
}

pub struct TestImage {
    pub index: Arc<Index>,
    pub blob_digest: Digest,
    pub blob: Bytes,
    pub chunk_bytes: HashMap<Digest, Vec<u8>>,
}

impl TestImage {
    /// The full content of regular file `path`, from the builder's chunk bytes.
    pub fn content(&self, path: &[u8]) -> Vec<u8> {
        let id = self.index.resolve(path).expect("path in index");
        file_content(&self.index, id, &|d| self.chunk_bytes[d].clone())
    }

    /// Puts every chunk of file `path` in `cache`.
    pub fn warm(&self, cache: &ChunkCache, path: &[u8]) {
        let id = self.index.resolve(path).expect("path in index");
        for piece in self.index.file_chunks(id) {
            let loc = self.index.chunk(piece.chunk).expect("chunk");
            cache
                .insert(&loc.digest, &self.chunk_bytes[&loc.digest])
                .expect("cache insert");
        }
    }
}

/// A file's bytes assembled from its chunks, holes as zeros.
pub fn file_content(index: &Index, id: u32, chunk: &dyn Fn(&Digest) -> Vec<u8>) -> Vec<u8> {
    let size = index.inode(id).map_or(0, |i| i.size) as usize;
    let mut content = vec![0u8; size];
    for piece in index.file_chunks(id) {
        let loc = index.chunk(piece.chunk).expect("chunk");
        let bytes = chunk(&loc.digest);
        let start = piece.file_offset as usize;
        content[start..start + bytes.len()].copy_from_slice(&bytes);
    }
    content
}

/// What a faithful mount of `index` shows, following [`TreeSnapshot`]'s conventions,
/// with file contents from `chunk` (uncompressed bytes by chunk digest).
pub fn snapshot_of_index(index: &Index, chunk: &dyn Fn(&Digest) -> Vec<u8>) -> TreeSnapshot {
    let mut snapshot = TreeSnapshot::default();
    let mut inode_of = BTreeMap::new();
    let mut pending = vec![(Vec::<u8>::new(), 0u32)];
    while let Some((dir_path, dir)) = pending.pop() {
        for (name, id) in index.dir_entries(dir) {
            let path = if dir_path.is_empty() {
                name.to_vec()
            } else {
                [dir_path.as_slice(), b"/", name].concat()
            };
            let inode = index.inode(id).expect("inode");
            let kind = match inode.kind {
                FileKind::Dir => SnapKind::Dir,
                FileKind::File => SnapKind::File,
                FileKind::Symlink => SnapKind::Symlink,
                FileKind::CharDevice => SnapKind::CharDevice,
                FileKind::BlockDevice => SnapKind::BlockDevice,
                FileKind::Fifo => SnapKind::Fifo,
                FileKind::Socket => SnapKind::Socket,
            };
            let symlink_target = index.symlink_target(id).map(<[u8]>::to_vec);
            let sha256 = (inode.kind == FileKind::File)
                .then(|| Sha256::digest(file_content(index, id, chunk)).into());
            let size = match inode.kind {
                FileKind::File | FileKind::Symlink => inode.size,
                _ => 0,
            };
            let rdev = matches!(inode.kind, FileKind::CharDevice | FileKind::BlockDevice)
                .then_some((inode.rdev_major, inode.rdev_minor));
            let xattrs = index
                .xattrs(id)
                .filter(|(n, _)| !is_ignored_xattr(n))
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect();
            if inode.kind == FileKind::Dir {
                pending.push((path.clone(), id));
            } else if inode.nlink > 1 {
                inode_of.insert(path.clone(), id);
            }
            snapshot.entries.insert(
                path,
                EntrySnapshot {
                    kind,
                    mode: inode.mode & 0o7777,
                    uid: inode.uid,
                    gid: inode.gid,
                    size,
                    mtime: inode.mtime_sec,
                    rdev,
                    xattrs,
                    symlink_target,
                    sha256,
                    hardlink_group: None,
                },
            );
        }
    }
    snapshot.assign_hardlink_groups(&inode_of);
    snapshot
}

/// Serves one in-memory blob; counts requests; can fail or tamper on demand.
pub struct FakeSource {
    blob_digest: Digest,
    blob: Bytes,
    /// Every range requested, in order.
    pub requests: Mutex<Vec<Range<u64>>>,
    pub request_count: AtomicU64,
    /// Answer every read with an error (a registry that is down).
    pub down: AtomicBool,
    /// Flip one bit in the bytes of these compressed ranges (by start offset).
    pub tamper: Mutex<Vec<Range<u64>>>,
}

impl FakeSource {
    pub fn new(image: &TestImage) -> Arc<FakeSource> {
        Arc::new(FakeSource {
            blob_digest: image.blob_digest,
            blob: image.blob.clone(),
            requests: Mutex::new(Vec::new()),
            request_count: AtomicU64::new(0),
            down: AtomicBool::new(false),
            tamper: Mutex::new(Vec::new()),
        })
    }

    /// How many requests covered compressed range `range` (wholly).
    pub fn times_fetched(&self, range: &Range<u64>) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.start <= range.start && range.end <= r.end)
            .count()
    }
}

impl BlobSource for FakeSource {
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        Box::pin(async move {
            self.request_count.fetch_add(1, Ordering::SeqCst);
            self.requests.lock().unwrap().push(range.clone());
            if self.down.load(Ordering::SeqCst) {
                return Err(FetchSourceError::new("registry is down", true));
            }
            if *blob != self.blob_digest || range.end > self.blob.len() as u64 {
                return Err(FetchSourceError::new("no such blob range", false));
            }
            let mut body = self.blob[range.start as usize..range.end as usize].to_vec();
            for bad in self.tamper.lock().unwrap().iter() {
                // Flip a bit in the middle of every tampered range inside this response.
                let middle = (bad.start + bad.end) / 2;
                if range.start <= middle && middle < range.end {
                    body[(middle - range.start) as usize] ^= 0x10;
                }
            }
            Ok(Bytes::from(body))
        })
    }
}

/// A mounted test image. Fields drop in order: unmount first, then the directories.
pub struct Mounted {
    pub handle: MountHandle,
    pub source: Arc<FakeSource>,
    pub fetcher: Fetcher,
    pub mountpoint: TempDir,
    pub cache_dir: TempDir,
}

impl Mounted {
    pub fn path(&self, relative: &str) -> std::path::PathBuf {
        self.mountpoint.path().join(relative)
    }

    pub fn cache(&self) -> &ChunkCache {
        self.fetcher.cache()
    }
}

pub fn fetcher_for(image: &TestImage, cache: ChunkCache) -> (Arc<FakeSource>, Fetcher) {
    let source = FakeSource::new(image);
    let fetcher = Fetcher::new(
        Arc::clone(&source) as Arc<dyn BlobSource>,
        cache,
        FetchConfig::default(),
    );
    (source, fetcher)
}

/// Mounts `image` with a fresh cache of `cache_bytes` (prepared by `prepare`).
pub fn mount_image(
    image: &TestImage,
    cache_bytes: u64,
    options: MountOptions,
    prepare: impl FnOnce(&ChunkCache),
) -> Mounted {
    let cache_dir = tempfile::tempdir().expect("cache dir");
    let cache = ChunkCache::open(cache_dir.path(), cache_bytes).expect("open cache");
    prepare(&cache);
    let (source, fetcher) = fetcher_for(image, cache);
    let mountpoint = tempfile::tempdir().expect("mount point");
    let handle = stoker_lazyfs::mount(
        Arc::clone(&image.index),
        fetcher.clone(),
        mountpoint.path(),
        options,
    )
    .expect("mount");
    Mounted {
        handle,
        source,
        fetcher,
        mountpoint,
        cache_dir,
    }
}

/// True if `path` is a mount point in this process's mount table.
pub fn is_mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let path = path.to_string_lossy();
    table
        .lines()
        .any(|line| line.split(' ').nth(4) == Some(path.as_ref()))
}

/// A tmpfs of `bytes` mounted for a test (we are root); unmounted lazily when
/// dropped.
pub struct Tmpfs {
    dir: TempDir,
}

impl Tmpfs {
    pub fn mount(bytes: u64) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("tmpfs dir");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "stoker-test"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file there until the file system is full.
    pub fn fill(&self) {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join("filler")).expect("filler");
        let block = vec![0xA5u8; 4096];
        while let Ok(n) = file.write(&block) {
            if n == 0 {
                break;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
