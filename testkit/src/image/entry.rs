//! What goes into a test layer: [`Entry`] (one tar entry) and [`Generator`] (file content
//! that is produced on demand, so 100 MB files cost no memory).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// mtime given to entries unless set otherwise (2023-11-14T22:13:20Z).
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// File content computed from its offset, so large files are streamed, never held.
///
/// `fill(offset, buf)` must write the bytes at `offset..offset + buf.len()`, and give the
/// same bytes every time (the content is read once for the tar and again for digests).
#[derive(Clone)]
pub struct Generator {
    size: u64,
    fill: Arc<FillFn>,
}

/// `fill(offset, buf)`: writes the content bytes at `offset..offset + buf.len()`.
type FillFn = dyn Fn(u64, &mut [u8]) + Send + Sync;

impl fmt::Debug for Generator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generator")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl Generator {
    /// Content of `size` bytes produced by `fill(offset, buf)`.
    pub fn new(size: u64, fill: impl Fn(u64, &mut [u8]) + Send + Sync + 'static) -> Self {
        Generator {
            size,
            fill: Arc::new(fill),
        }
    }

    /// `size` zero bytes.
    pub fn zeros(size: u64) -> Self {
        Generator::new(size, |_, buf| buf.fill(0))
    }

    /// Reproducible pseudo-random bytes: the same `seed` always gives the same content,
    /// on every machine (a counter-based splitmix64, not a library RNG that may change).
    pub fn random(size: u64, seed: u64) -> Self {
        Generator::new(size, move |offset, buf| fill_random(seed, offset, buf))
    }

    /// A mostly-zero file: random 4 KiB blocks at the start, the middle and the end,
    /// zeros elsewhere. Written as a plain (not GNU-sparse) tar entry.
    pub fn sparse(size: u64, seed: u64) -> Self {
        const BLOCK: u64 = 4096;
        let islands = [0, (size / 2) & !(BLOCK - 1), size.saturating_sub(BLOCK)];
        Generator::new(size, move |offset, buf| {
            buf.fill(0);
            let end = offset + buf.len() as u64;
            for island in islands {
                let (lo, hi) = (island.max(offset), (island + BLOCK).min(end).min(size));
                if lo < hi {
                    let range = (lo - offset) as usize..(hi - offset) as usize;
                    fill_random(seed ^ island, lo, &mut buf[range]);
                }
            }
        })
    }

    /// This content with `len` bytes at `offset` replaced by other random bytes
    /// (same size: an in-place change).
    pub fn with_region_changed(self, offset: u64, len: u64, seed: u64) -> Self {
        let base = self.clone();
        Generator::new(self.size, move |at, buf| {
            base.fill(at, buf);
            let end = at + buf.len() as u64;
            let (lo, hi) = (offset.max(at), (offset + len).min(end));
            if lo < hi {
                let range = (lo - at) as usize..(hi - at) as usize;
                fill_random(seed, lo, &mut buf[range]);
            }
        })
    }

    /// This content with one byte `inserted` before `offset` (size grows by one).
    pub fn with_byte_inserted(self, offset: u64, inserted: u8) -> Self {
        let base = self.clone();
        Generator::new(self.size + 1, move |at, buf| {
            let end = at + buf.len() as u64;
            if end <= offset {
                base.fill(at, buf);
            } else if at > offset {
                base.fill(at - 1, buf);
            } else {
                let split = (offset - at) as usize;
                let (before, rest) = buf.split_at_mut(split);
                base.fill(at, before);
                rest[0] = inserted;
                base.fill(offset, &mut rest[1..]);
            }
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Writes the bytes at `offset..offset + buf.len()` into `buf`.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        (self.fill)(offset, buf)
    }

    /// A reader over the whole content.
    pub fn reader(&self) -> GeneratorReader {
        GeneratorReader {
            generator: self.clone(),
            offset: 0,
        }
    }

    /// The whole content in memory (for small files and assertions).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = vec![0; self.size as usize];
        self.fill(0, &mut bytes);
        bytes
    }

    /// sha256 of the whole content.
    pub fn sha256(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut offset = 0;
        while offset < self.size {
            let n = (self.size - offset).min(buf.len() as u64) as usize;
            self.fill(offset, &mut buf[..n]);
            hasher.update(&buf[..n]);
            offset += n as u64;
        }
        hasher.finalize().into()
    }
}

/// Streams a [`Generator`]'s content.
#[derive(Debug)]
pub struct GeneratorReader {
    generator: Generator,
    offset: u64,
}

impl Read for GeneratorReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.generator.size - self.offset;
        let n = (buf.len() as u64).min(left) as usize;
        self.generator.fill(self.offset, &mut buf[..n]);
        self.offset += n as u64;
        Ok(n)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Byte `i` of the stream is byte `i % 8` of `splitmix64(seed * K + i / 8)`.
fn fill_random(seed: u64, offset: u64, buf: &mut [u8]) {
    let stream = seed.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut pos = offset;
    let mut out = buf;
    while !out.is_empty() {
        let word = splitmix64(stream.wrapping_add(pos / 8)).to_le_bytes();
        let skip = (pos % 8) as usize;
        let n = (8 - skip).min(out.len());
        out[..n].copy_from_slice(&word[skip..skip + n]);
        out = &mut out[n..];
        pos += n as u64;
    }
}

/// Content of a regular file.
#[derive(Debug, Clone)]
pub enum FileContent {
    /// Literal bytes.
    Bytes(Vec<u8>),
    /// Bytes produced on demand.
    Generated(Generator),
}

impl FileContent {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            FileContent::Bytes(bytes) => bytes.len() as u64,
            FileContent::Generated(generator) => generator.size(),
        }
    }

    /// sha256 of the content.
    pub fn sha256(&self) -> [u8; 32] {
        match self {
            FileContent::Bytes(bytes) => Sha256::digest(bytes).into(),
            FileContent::Generated(generator) => generator.sha256(),
        }
    }

    /// A reader over the content.
    pub fn reader(&self) -> Box<dyn Read + '_> {
        match self {
            FileContent::Bytes(bytes) => Box::new(bytes.as_slice()),
            FileContent::Generated(generator) => Box::new(generator.reader()),
        }
    }
}

/// What kind of tar entry an [`Entry`] is.
#[derive(Debug, Clone)]
pub enum EntryKind {
    Dir,
    File(FileContent),
    /// A symlink to this target (stored as given, may dangle or be absolute).
    Symlink(Vec<u8>),
    /// A hardlink to this path (relative to the image root, as in the tar).
    Hardlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// Deletes `path` from lower layers: written as `dir/.wh.NAME` for `path` = `dir/NAME`.
    Whiteout,
    /// Hides everything lower layers put inside directory `path`: written as
    /// `path/.wh..wh..opq`.
    OpaqueWhiteout,
}

/// One entry of a layer. Paths are raw bytes, relative, without a leading `/`, and are
/// written to the tar exactly as given (no checks), so malformed layers can be built too.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch.
    pub mtime: u64,
    /// Extended attributes, written as PAX `SCHILY.xattr.NAME` records.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    fn new(path: impl AsRef<[u8]>, kind: EntryKind, mode: u32) -> Self {
        Entry {
            path: path.as_ref().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: BTreeMap::new(),
        }
    }

    /// A directory, mode 0755.
    pub fn dir(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Dir, 0o755)
    }

    /// A regular file with these bytes, mode 0644.
    pub fn file(path: impl AsRef<[u8]>, content: impl Into<Vec<u8>>) -> Self {
        Entry::new(
            path,
            EntryKind::File(FileContent::Bytes(content.into())),
            0o644,
        )
    }

    /// A regular file whose content is generated on demand, mode 0644.
    pub fn generated_file(path: impl AsRef<[u8]>, generator: Generator) -> Self {
        Entry::new(
            path,
            EntryKind::File(FileContent::Generated(generator)),
            0o644,
        )
    }

    /// A symlink, mode 0777.
    pub fn symlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Symlink(target.as_ref().to_vec()), 0o777)
    }

    /// A hardlink to `target` (a path in this or a lower layer).
    pub fn hardlink(path: impl AsRef<[u8]>, target: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Hardlink(target.as_ref().to_vec()), 0o644)
    }

    /// A character device, mode 0666.
    pub fn char_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Entry::new(path, EntryKind::CharDevice { major, minor }, 0o666)
    }

    /// A block device, mode 0660.
    pub fn block_device(path: impl AsRef<[u8]>, major: u32, minor: u32) -> Self {
        Entry::new(path, EntryKind::BlockDevice { major, minor }, 0o660)
    }

    /// A named pipe, mode 0644.
    pub fn fifo(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Fifo, 0o644)
    }

    /// A whiteout deleting `path` (and everything under it) from lower layers.
    pub fn whiteout(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::Whiteout, 0o600)
    }

    /// An opaque marker for directory `path`: lower layers' content of it is hidden.
    pub fn opaque(path: impl AsRef<[u8]>) -> Self {
        Entry::new(path, EntryKind::OpaqueWhiteout, 0o600)
    }

    /// Sets the permission and special bits.
    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    /// Sets the owner.
    pub fn owner(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Sets the modification time (seconds since the epoch).
    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// Adds an extended attribute.
    pub fn xattr(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.insert(name.to_string(), value.into());
        self
    }

    /// The path this entry has in the tar stream (whiteouts get their `.wh.` names).
    pub fn tar_path(&self) -> Vec<u8> {
        match self.kind {
            EntryKind::Whiteout => {
                let (parent, name) = split_parent(&self.path);
                join(parent, &[b".wh.".as_slice(), name].concat())
            }
            EntryKind::OpaqueWhiteout => join(&self.path, b".wh..wh..opq"),
            _ => self.path.clone(),
        }
    }
}

/// Splits `a/b/c` into (`a/b`, `c`) and `c` into (``, `c`).
pub(crate) fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

/// A valid `security.capability` value (VFS_CAP_REVISION_2) granting `capability`
/// (a bit number, e.g. 10 = CAP_NET_BIND_SERVICE, 13 = CAP_NET_RAW) as permitted and
/// effective. The kernel rejects malformed values, so tests need a real one.
pub fn file_capability(capability: u32) -> Vec<u8> {
    const VFS_CAP_REVISION_2: u32 = 0x0200_0000;
    const VFS_CAP_FLAGS_EFFECTIVE: u32 = 0x1;
    let permitted = 1u64 << capability;
    let mut value = Vec::with_capacity(20);
    value.extend_from_slice(&(VFS_CAP_REVISION_2 | VFS_CAP_FLAGS_EFFECTIVE).to_le_bytes());
    value.extend_from_slice(&(permitted as u32).to_le_bytes());
    value.extend_from_slice(&0u32.to_le_bytes());
    value.extend_from_slice(&((permitted >> 32) as u32).to_le_bytes());
    value.extend_from_slice(&0u32.to_le_bytes());
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_reproducible_and_random_access() {
        let generator = Generator::random(10_000, 7);
        let whole = generator.to_vec();
        assert_eq!(whole, Generator::random(10_000, 7).to_vec());
        assert_ne!(whole, Generator::random(10_000, 8).to_vec());
        let mut part = vec![0; 333];
        generator.fill(4321, &mut part);
        assert_eq!(part, whole[4321..4321 + 333]);
    }

    #[test]
    fn insertion_and_change_do_what_they_say() {
        let base = Generator::random(5000, 1);
        let inserted = base.clone().with_byte_inserted(1234, 0xAB).to_vec();
        let original = base.to_vec();
        assert_eq!(inserted.len(), 5001);
        assert_eq!(inserted[..1234], original[..1234]);
        assert_eq!(inserted[1234], 0xAB);
        assert_eq!(inserted[1235..], original[1234..]);

        let changed = base.clone().with_region_changed(100, 50, 99).to_vec();
        assert_eq!(changed[..100], original[..100]);
        assert_ne!(changed[100..150], original[100..150]);
        assert_eq!(changed[150..], original[150..]);
    }

    #[test]
    fn sparse_is_mostly_zero() {
        let bytes = Generator::sparse(1 << 20, 3).to_vec();
        let nonzero = bytes.iter().filter(|&&b| b != 0).count();
        assert!(nonzero > 0 && nonzero <= 3 * 4096);
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(Entry::whiteout("a/b").tar_path(), b"a/.wh.b");
        assert_eq!(Entry::whiteout("b").tar_path(), b".wh.b");
        assert_eq!(Entry::opaque("a").tar_path(), b"a/.wh..wh..opq");
    }
}
