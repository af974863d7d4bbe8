//! The decoded index: one buffer of fixed-size records, checked once when it is
//! loaded, then read in place. Lookups are binary searches; nothing is allocated
//! per file.

use std::io::Read;
use std::ops::Range;

use crate::layout::{self, *};
use crate::{Chunking, Digest, FormatError};

/// Index of an inode in the index; the root is 0. FUSE inode numbers are this + 1.
pub type InodeId = u32;

/// Where to fetch a chunk from and how to check it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkLocation {
    /// SHA-256 of the uncompressed bytes: the chunk's identity.
    pub digest: Digest,
    /// The data blob holding the compressed bytes.
    pub blob: Digest,
    pub compressed_offset: u64,
    pub compressed_len: u32,
    pub uncompressed_len: u32,
}

impl ChunkLocation {
    pub fn compressed_range(&self) -> Range<u64> {
        self.compressed_offset..self.compressed_offset + self.compressed_len as u64
    }
}

/// A chunk as part of a file: file bytes `file_offset..file_offset+len` are chunk `chunk`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileChunk {
    pub chunk: u32,
    pub file_offset: u64,
    pub len: u32,
}

/// File types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// One inode's attributes, copied out of the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inode {
    pub id: InodeId,
    pub kind: FileKind,
    /// Full `st_mode`: type bits and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub size: u64,
    pub parent: InodeId,
}

/// Counts for `stoker inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct IndexSummary {
    pub inodes: u64,
    pub directories: u64,
    pub regular_files: u64,
    pub symlinks: u64,
    pub other_files: u64,
    pub hardlinked_files: u64,
    pub file_bytes: u64,
    pub chunk_refs: u64,
    pub chunks: u64,
    pub chunk_bytes: u64,
    pub compressed_chunk_bytes: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
}

/// A decoded, validated index.
#[derive(Clone)]
pub struct Index {
    raw: Vec<u8>,
    chunking: Chunking,
    blobs: Section,
    chunks: Section,
    inodes: Section,
    dirents: Section,
    filerefs: Section,
    xattrs: Section,
    strings: Range<usize>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("inodes", &self.inodes.count)
            .field("chunks", &self.chunks.count)
            .field("blobs", &self.blobs.count)
            .finish()
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Section {
    start: usize,
    count: u32,
    record: usize,
}

impl Section {
    fn record(&self, i: u32) -> Range<usize> {
        let start = self.start + i as usize * self.record;
        start..start + self.record
    }
}

/// The raw index may be at most this many times larger than its compressed
/// form; the decoder stops there, so a small hostile blob cannot make it
/// allocate without bound.
pub const MAX_EXPANSION: usize = 1024;
/// And never more than this, whatever the input.
pub const MAX_RAW_LEN: usize = 4 << 30;

impl Index {
    /// Decompresses and validates an index blob.
    pub fn decode(compressed: &[u8]) -> Result<Index, FormatError> {
        let limit = compressed
            .len()
            .saturating_mul(MAX_EXPANSION)
            .min(MAX_RAW_LEN) as u64;
        let mut decoder = zstd::stream::read::Decoder::new(compressed).map_err(corrupt_zstd)?;
        // zstd allocates its window up front, as large as the frame header asks
        // (128 MiB by default): a 10-byte blob could ask for that much.
        decoder
            .window_log_max(window_log_for(limit))
            .map_err(corrupt_zstd)?;
        // The frame header gives the raw size (the encoder writes it): reserving it
        // (never past the limit) keeps `read_to_end` from doubling the buffer, which
        // held up to twice the index while decoding. Pages are only touched as read.
        let stated = zstd::zstd_safe::get_frame_content_size(compressed)
            .ok()
            .flatten()
            .unwrap_or(0)
            .min(limit);
        let mut raw = Vec::new();
        // A header that lies only costs address space; one that cannot be had is
        // ignored (the buffer then grows as it is read, up to the limit).
        let _ = raw.try_reserve_exact(stated as usize);
        decoder
            .take(limit + 1)
            .read_to_end(&mut raw)
            .map_err(corrupt_zstd)?;
        if raw.len() as u64 > limit {
            return Err(FormatError::Invalid(format!(
                "index expands past {limit} bytes ({MAX_EXPANSION}x its compressed size)"
            )));
        }
        // Without a stated size `read_to_end` doubles the buffer and fills part of the
        // spare room before reading into it: a 89 MiB index kept 16 MiB more resident.
        raw.shrink_to_fit();
        Index::from_raw(raw)
    }

    /// Decodes and checks the digest first: the trust chain's index step.
    pub fn decode_verified(compressed: &[u8], expected: &Digest) -> Result<Index, FormatError> {
        let actual = Digest::of(compressed);
        if &actual != expected {
            return Err(FormatError::DigestMismatch {
                what: "index".into(),
                expected: *expected,
                actual,
            });
        }
        Index::decode(compressed)
    }

    /// Validates raw (uncompressed) index bytes.
    pub fn from_raw(raw: Vec<u8>) -> Result<Index, FormatError> {
        if raw.len() < HEADER_SIZE || raw[..8] != layout::MAGIC {
            return Err(invalid("not a Stoker index (bad magic)"));
        }
        let version = u32_at(&raw, header::VERSION);
        if version != layout::VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let count = |off| u32_at(&raw, off);
        let chunking = Chunking::decode(count(header::CHUNKING), count(header::CHUNK_SIZE))
            .ok_or_else(|| invalid("unknown chunking kind"))?;
        let mut cursor = HEADER_SIZE;
        let mut section = |count: u32, record: usize| -> Result<Section, FormatError> {
            let len = (count as usize)
                .checked_mul(record)
                .ok_or_else(|| invalid("section size overflows"))?;
            let s = Section {
                start: cursor,
                count,
                record,
            };
            cursor = cursor
                .checked_add(len)
                .filter(|end| *end <= raw.len())
                .ok_or_else(|| invalid("section runs past the end of the index"))?;
            Ok(s)
        };
        let blobs = section(count(header::BLOBS), BLOB_SIZE)?;
        let chunks = section(count(header::CHUNKS), CHUNK_SIZE)?;
        let inodes = section(count(header::INODES), INODE_SIZE)?;
        let dirents = section(count(header::DIRENTS), DIRENT_SIZE)?;
        let filerefs = section(count(header::FILEREFS), FILEREF_SIZE)?;
        let xattrs = section(count(header::XATTRS), XATTR_SIZE)?;
        let strings_len = usize::try_from(u64_at(&raw, header::STRINGS_LEN))
            .map_err(|_| invalid("string table too large"))?;
        let strings = cursor..cursor.saturating_add(strings_len);
        if strings.end != raw.len() {
            return Err(invalid("string table does not end the index"));
        }
        let index = Index {
            raw,
            chunking,
            blobs,
            chunks,
            inodes,
            dirents,
            filerefs,
            xattrs,
            strings,
        };
        index.validate()?;
        Ok(index)
    }

    /// Every check that lets the accessors trust the records. O(size of the index).
    fn validate(&self) -> Result<(), FormatError> {
        if self.inodes.count == 0 {
            return Err(invalid("no root inode"));
        }
        for i in 0..self.chunks.count {
            let c = self.chunk_unchecked(i);
            let blob_size = u64_at(&self.raw, self.blobs.record(c.blob).start + 32);
            if c.blob >= self.blobs.count
                || c.compressed_len == 0
                || c.uncompressed_len == 0
                || c.uncompressed_len > MAX_CHUNK_LEN
                || c.compressed_offset
                    .checked_add(c.compressed_len as u64)
                    .is_none_or(|end| end > blob_size)
            {
                return Err(invalid(format!("chunk {i} has an impossible location")));
            }
        }
        // Each directory other than the root is named by exactly one entry.
        let mut dir_refs = vec![0u8; self.inodes.count as usize];
        // Each inode's dirents, filerefs and xattrs directly follow the previous
        // inode's, as the encoder writes them: no record is checked twice, so
        // validation stays linear in the size of the index.
        let (mut next_dirent, mut next_fileref, mut next_xattr) = (0u32, 0u32, 0u32);
        for ino in 0..self.inodes.count {
            let rec = self.inodes.record(ino).start;
            let mode = u32_at(&self.raw, rec + inode::MODE);
            let kind =
                kind_of(mode).ok_or_else(|| invalid(format!("inode {ino} has mode {mode:o}")))?;
            let parent = u32_at(&self.raw, rec + inode::PARENT);
            if parent >= self.inodes.count {
                return Err(invalid(format!(
                    "inode {ino} has parent {parent} out of range"
                )));
            }
            let (start, len) = (
                u32_at(&self.raw, rec + inode::DATA_START),
                u32_at(&self.raw, rec + inode::DATA_LEN),
            );
            let (x_start, x_count) = (
                u32_at(&self.raw, rec + inode::XATTR_START),
                u32_at(&self.raw, rec + inode::XATTR_COUNT),
            );
            if !in_range(x_start, x_count, self.xattrs.count) {
                return Err(invalid(format!("inode {ino} has xattrs out of range")));
            }
            if x_start != next_xattr {
                return Err(invalid(format!(
                    "inode {ino} xattrs do not follow the previous inode's"
                )));
            }
            next_xattr = x_start + x_count;
            for x in x_start..x_start + x_count {
                let r = self.xattrs.record(x).start;
                for (off, len) in [(0, 4), (8, 12)] {
                    self.string(u32_at(&self.raw, r + off), u32_at(&self.raw, r + len))
                        .ok_or_else(|| invalid(format!("inode {ino} xattr {x} out of range")))?;
                }
            }
            match kind {
                FileKind::Dir => {
                    if !in_range(start, len, self.dirents.count) {
                        return Err(invalid(format!("directory {ino} has entries out of range")));
                    }
                    if start != next_dirent {
                        return Err(invalid(format!(
                            "directory {ino} entries do not follow the previous directory's"
                        )));
                    }
                    next_dirent = start + len;
                    let mut previous: Option<&[u8]> = None;
                    for d in start..start + len {
                        let (name, child) = self.dirent(d).ok_or_else(|| {
                            invalid(format!("directory {ino} entry {d} out of range"))
                        })?;
                        if name.is_empty()
                            || name == b"."
                            || name == b".."
                            || name.contains(&b'/')
                            || name.contains(&0)
                        {
                            return Err(invalid(format!(
                                "directory {ino} has an illegal entry name"
                            )));
                        }
                        if previous.is_some_and(|p| p >= name) {
                            return Err(invalid(format!("directory {ino} entries are not sorted")));
                        }
                        previous = Some(name);
                        if child == 0 || child >= self.inodes.count {
                            return Err(invalid(format!("directory {ino} names inode {child}")));
                        }
                        let child_rec = self.inodes.record(child).start;
                        if kind_of(u32_at(&self.raw, child_rec + inode::MODE))
                            == Some(FileKind::Dir)
                        {
                            if u32_at(&self.raw, child_rec + inode::PARENT) != ino {
                                return Err(invalid(format!(
                                    "directory {child} has the wrong parent"
                                )));
                            }
                            dir_refs[child as usize] = dir_refs[child as usize].saturating_add(1);
                        }
                    }
                }
                FileKind::File => {
                    if !in_range(start, len, self.filerefs.count) {
                        return Err(invalid(format!("file {ino} has chunks out of range")));
                    }
                    if start != next_fileref {
                        return Err(invalid(format!(
                            "file {ino} chunks do not follow the previous file's"
                        )));
                    }
                    next_fileref = start + len;
                    let size = u64_at(&self.raw, rec + inode::SIZE);
                    let mut end = 0u64;
                    for f in start..start + len {
                        let piece = self.file_chunk(f);
                        if piece.chunk >= self.chunks.count || piece.file_offset < end {
                            return Err(invalid(format!("file {ino} has a bad chunk list")));
                        }
                        end = piece
                            .file_offset
                            .checked_add(piece.len as u64)
                            .filter(|end| *end <= size)
                            .ok_or_else(|| {
                                invalid(format!("file {ino} chunks run past its size"))
                            })?;
                    }
                }
                FileKind::Symlink => {
                    self.string(start, len)
                        .ok_or_else(|| invalid(format!("symlink {ino} target out of range")))?;
                }
                _ => {}
            }
        }
        if let Some(ino) = (1..self.inodes.count)
            .find(|&i| self.kind_unchecked(i) == Some(FileKind::Dir) && dir_refs[i as usize] != 1)
        {
            return Err(invalid(format!(
                "directory {ino} is not named exactly once"
            )));
        }
        if self.kind_unchecked(0) != Some(FileKind::Dir) {
            return Err(invalid("root is not a directory"));
        }
        Ok(())
    }

    pub fn chunking(&self) -> Chunking {
        self.chunking
    }

    pub fn inode_count(&self) -> u32 {
        self.inodes.count
    }

    pub fn chunk_count(&self) -> u32 {
        self.chunks.count
    }

    pub fn blob_count(&self) -> u32 {
        self.blobs.count
    }

    /// Extended attributes in the whole image (0: no file has any).
    pub fn xattr_count(&self) -> u32 {
        self.xattrs.count
    }

    /// Size of the decoded index in memory.
    pub fn raw_len(&self) -> usize {
        self.raw.len()
    }

    pub fn inode(&self, id: InodeId) -> Option<Inode> {
        if id >= self.inodes.count {
            return None;
        }
        let rec = self.inodes.record(id).start;
        let raw = &self.raw;
        let mode = u32_at(raw, rec + inode::MODE);
        Some(Inode {
            id,
            kind: kind_of(mode)?,
            mode,
            uid: u32_at(raw, rec + inode::UID),
            gid: u32_at(raw, rec + inode::GID),
            nlink: u32_at(raw, rec + inode::NLINK),
            mtime_sec: i64_at(raw, rec + inode::MTIME_SEC),
            mtime_nsec: u32_at(raw, rec + inode::MTIME_NSEC),
            rdev_major: u32_at(raw, rec + inode::RDEV_MAJOR),
            rdev_minor: u32_at(raw, rec + inode::RDEV_MINOR),
            size: u64_at(raw, rec + inode::SIZE),
            parent: u32_at(raw, rec + inode::PARENT),
        })
    }

    /// The entry named `name` in directory `dir`: a binary search.
    pub fn lookup(&self, dir: InodeId, name: &[u8]) -> Option<InodeId> {
        let (start, len) = self.data_of(dir, FileKind::Dir)?;
        let (mut lo, mut hi) = (start, start + len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (entry, child) = self.dirent(mid)?;
            match entry.cmp(name) {
                std::cmp::Ordering::Equal => return Some(child),
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
            }
        }
        None
    }

    /// Follows a `/`-separated path from the root, without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Option<InodeId> {
        path.split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .try_fold(0, |dir, name| self.lookup(dir, name))
    }

    /// Number of entries in directory `dir` (without `.` and `..`).
    pub fn dir_len(&self, dir: InodeId) -> u32 {
        self.data_of(dir, FileKind::Dir).map_or(0, |(_, len)| len)
    }

    /// The `i`-th entry of directory `dir`, in name order.
    pub fn dir_entry(&self, dir: InodeId, i: u32) -> Option<(&[u8], InodeId)> {
        let (start, len) = self.data_of(dir, FileKind::Dir)?;
        if i >= len {
            return None;
        }
        self.dirent(start + i)
    }

    pub fn dir_entries(&self, dir: InodeId) -> impl Iterator<Item = (&[u8], InodeId)> + '_ {
        (0..self.dir_len(dir)).filter_map(move |i| self.dir_entry(dir, i))
    }

    pub fn symlink_target(&self, id: InodeId) -> Option<&[u8]> {
        let (start, len) = self.data_of(id, FileKind::Symlink)?;
        self.string(start, len)
    }

    pub fn xattrs(&self, id: InodeId) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let rec = self
            .inodes
            .record(id.min(self.inodes.count.saturating_sub(1)))
            .start;
        let (start, count) = if id < self.inodes.count {
            (
                u32_at(&self.raw, rec + inode::XATTR_START),
                u32_at(&self.raw, rec + inode::XATTR_COUNT),
            )
        } else {
            (0, 0)
        };
        (start..start.saturating_add(count)).filter_map(move |x| {
            let r = self.xattrs.record(x).start;
            let name = self.string(u32_at(&self.raw, r), u32_at(&self.raw, r + 4))?;
            let value = self.string(u32_at(&self.raw, r + 8), u32_at(&self.raw, r + 12))?;
            Some((name, value))
        })
    }

    pub fn xattr(&self, id: InodeId, name: &[u8]) -> Option<&[u8]> {
        self.xattrs(id).find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Every chunk of a regular file, in file order.
    pub fn file_chunks(&self, id: InodeId) -> impl Iterator<Item = FileChunk> + '_ {
        let (start, len) = self.data_of(id, FileKind::File).unwrap_or((0, 0));
        (start..start + len).map(move |f| self.file_chunk(f))
    }

    /// The chunks of file `id` that hold any byte of `range`: a binary search
    /// for the first, then a walk. Holes between chunks read as zeros.
    pub fn chunks_covering(
        &self,
        id: InodeId,
        range: Range<u64>,
    ) -> impl Iterator<Item = FileChunk> + '_ {
        let (start, len) = self.data_of(id, FileKind::File).unwrap_or((0, 0));
        // First piece whose end is after range.start.
        let (mut lo, mut hi) = (start, start + len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let piece = self.file_chunk(mid);
            if piece.file_offset + piece.len as u64 <= range.start {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo..start + len)
            .map(move |f| self.file_chunk(f))
            .take_while(move |piece| piece.file_offset < range.end)
    }

    pub fn chunk(&self, i: u32) -> Option<ChunkLocation> {
        (i < self.chunks.count).then(|| self.chunk_location(i))
    }

    /// Every chunk, in index order (the order plans refer to).
    pub fn chunks(&self) -> impl Iterator<Item = ChunkLocation> + '_ {
        (0..self.chunks.count).map(|i| self.chunk_location(i))
    }

    /// (digest, stored size) of data blob `i`.
    pub fn blob(&self, i: u32) -> Option<(Digest, u64)> {
        if i >= self.blobs.count {
            return None;
        }
        let r = self.blobs.record(i).start;
        Some((self.digest_at(r), u64_at(&self.raw, r + 32)))
    }

    pub fn summary(&self) -> IndexSummary {
        let mut s = IndexSummary {
            inodes: self.inodes.count as u64,
            chunks: self.chunks.count as u64,
            blobs: self.blobs.count as u64,
            ..IndexSummary::default()
        };
        for id in 0..self.inodes.count {
            let Some(inode) = self.inode(id) else {
                continue;
            };
            match inode.kind {
                FileKind::Dir => s.directories += 1,
                FileKind::File => {
                    s.regular_files += 1;
                    // Sizes come from the image: a hostile one may add up past u64.
                    s.file_bytes = s.file_bytes.saturating_add(inode.size);
                    s.hardlinked_files += (inode.nlink > 1) as u64;
                    s.chunk_refs += self.data_of(id, FileKind::File).map_or(0, |(_, n)| n) as u64;
                }
                FileKind::Symlink => s.symlinks += 1,
                _ => s.other_files += 1,
            }
        }
        for c in self.chunks() {
            s.chunk_bytes += c.uncompressed_len as u64;
            s.compressed_chunk_bytes += c.compressed_len as u64;
        }
        s.blob_bytes = (0..self.blobs.count)
            .filter_map(|i| self.blob(i))
            .map(|b| b.1)
            .fold(0u64, u64::saturating_add);
        s
    }

    /// Some path naming inode `id` (for traces and messages). O(depth × directory size).
    pub fn path_of(&self, id: InodeId) -> Vec<u8> {
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut current = id;
        while current != 0 && parts.len() < 4096 {
            let Some(parent) = self.inode(current).map(|i| i.parent) else {
                break;
            };
            match self
                .dir_entries(parent)
                .find(|(_, child)| *child == current)
            {
                Some((name, _)) => parts.push(name),
                None => break,
            }
            current = parent;
        }
        let mut path = Vec::new();
        for part in parts.iter().rev() {
            path.push(b'/');
            path.extend_from_slice(part);
        }
        if path.is_empty() {
            path.push(b'/');
        }
        path
    }

    // ---- record access (ranges validated at load) ----

    fn kind_unchecked(&self, id: InodeId) -> Option<FileKind> {
        kind_of(u32_at(
            &self.raw,
            self.inodes.record(id).start + inode::MODE,
        ))
    }

    fn data_of(&self, id: InodeId, kind: FileKind) -> Option<(u32, u32)> {
        if id >= self.inodes.count || self.kind_unchecked(id) != Some(kind) {
            return None;
        }
        let rec = self.inodes.record(id).start;
        Some((
            u32_at(&self.raw, rec + inode::DATA_START),
            u32_at(&self.raw, rec + inode::DATA_LEN),
        ))
    }

    fn dirent(&self, d: u32) -> Option<(&[u8], InodeId)> {
        if d >= self.dirents.count {
            return None;
        }
        let r = self.dirents.record(d).start;
        let name = self.string(u32_at(&self.raw, r), u32_at(&self.raw, r + 4))?;
        Some((name, u32_at(&self.raw, r + 8)))
    }

    fn file_chunk(&self, f: u32) -> FileChunk {
        let r = self.filerefs.record(f).start;
        let chunk = u32_at(&self.raw, r);
        let len = if chunk < self.chunks.count {
            u32_at(
                &self.raw,
                self.chunks.record(chunk).start + layout::chunk::UNCOMPRESSED_LEN,
            )
        } else {
            0
        };
        FileChunk {
            chunk,
            file_offset: u64_at(&self.raw, r + 4),
            len,
        }
    }

    fn chunk_unchecked(&self, i: u32) -> Record {
        let r = self.chunks.record(i).start;
        Record {
            blob: u32_at(&self.raw, r + layout::chunk::BLOB),
            compressed_offset: u64_at(&self.raw, r + layout::chunk::COMPRESSED_OFFSET),
            compressed_len: u32_at(&self.raw, r + layout::chunk::COMPRESSED_LEN),
            uncompressed_len: u32_at(&self.raw, r + layout::chunk::UNCOMPRESSED_LEN),
        }
    }

    fn chunk_location(&self, i: u32) -> ChunkLocation {
        let r = self.chunks.record(i).start;
        let c = self.chunk_unchecked(i);
        ChunkLocation {
            digest: self.digest_at(r),
            blob: self.digest_at(self.blobs.record(c.blob).start),
            compressed_offset: c.compressed_offset,
            compressed_len: c.compressed_len,
            uncompressed_len: c.uncompressed_len,
        }
    }

    fn digest_at(&self, off: usize) -> Digest {
        let mut d = [0u8; 32];
        if let Some(bytes) = self.raw.get(off..off + 32) {
            d.copy_from_slice(bytes);
        }
        Digest(d)
    }

    fn string(&self, off: u32, len: u32) -> Option<&[u8]> {
        let start = self.strings.start.checked_add(off as usize)?;
        let end = start.checked_add(len as usize)?;
        if end > self.strings.end {
            return None;
        }
        self.raw.get(start..end)
    }
}

struct Record {
    blob: u32,
    compressed_offset: u64,
    compressed_len: u32,
    uncompressed_len: u32,
}

fn kind_of(mode: u32) -> Option<FileKind> {
    Some(match mode & S_IFMT {
        S_IFDIR => FileKind::Dir,
        S_IFREG => FileKind::File,
        S_IFLNK => FileKind::Symlink,
        S_IFCHR => FileKind::CharDevice,
        S_IFBLK => FileKind::BlockDevice,
        S_IFIFO => FileKind::Fifo,
        S_IFSOCK => FileKind::Socket,
        _ => return None,
    })
}

/// The zstd window (log2 bytes) an index of at most `limit` bytes may need:
/// enough for `limit`, and at least the 8 MiB window of streamed zstd output at
/// levels up to 19, so indexes compressed without a known size still decode.
fn window_log_for(limit: u64) -> u32 {
    (u64::BITS - limit.saturating_sub(1).leading_zeros()).clamp(23, 31)
}

fn in_range(start: u32, len: u32, count: u32) -> bool {
    start.checked_add(len).is_some_and(|end| end <= count)
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Invalid(msg.into())
}

fn corrupt_zstd(e: std::io::Error) -> FormatError {
    FormatError::Invalid(format!("index is not valid zstd: {e}"))
}
