//! Byte layout of the raw (decompressed) index: record sizes and field offsets,
//! shared by the encoder and the decoder. `docs/FORMAT.md` is the prose version.

/// First 8 bytes of every raw index.
pub const MAGIC: [u8; 8] = *b"STKINDEX";
/// Version of the layout described here.
pub const VERSION: u32 = 1;

pub const HEADER_SIZE: usize = 64;
pub const BLOB_SIZE: usize = 40;
pub const CHUNK_SIZE: usize = 52;
pub const INODE_SIZE: usize = 64;
pub const DIRENT_SIZE: usize = 12;
pub const FILEREF_SIZE: usize = 12;
pub const XATTR_SIZE: usize = 16;

/// Header field offsets.
pub mod header {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const FLAGS: usize = 12;
    pub const INODES: usize = 16;
    pub const DIRENTS: usize = 20;
    pub const CHUNKS: usize = 24;
    pub const FILEREFS: usize = 28;
    pub const BLOBS: usize = 32;
    pub const XATTRS: usize = 36;
    pub const STRINGS_LEN: usize = 40;
    pub const CHUNKING: usize = 48;
    pub const CHUNK_SIZE: usize = 52;
}

/// Inode record field offsets.
pub mod inode {
    pub const MODE: usize = 0;
    pub const UID: usize = 4;
    pub const GID: usize = 8;
    pub const NLINK: usize = 12;
    pub const MTIME_SEC: usize = 16;
    pub const MTIME_NSEC: usize = 24;
    pub const RDEV_MAJOR: usize = 28;
    pub const RDEV_MINOR: usize = 32;
    pub const SIZE: usize = 36;
    pub const PARENT: usize = 44;
    pub const DATA_START: usize = 48;
    pub const DATA_LEN: usize = 52;
    pub const XATTR_START: usize = 56;
    pub const XATTR_COUNT: usize = 60;
}

/// Chunk record field offsets.
pub mod chunk {
    pub const DIGEST: usize = 0;
    pub const BLOB: usize = 32;
    pub const COMPRESSED_OFFSET: usize = 36;
    pub const COMPRESSED_LEN: usize = 44;
    pub const UNCOMPRESSED_LEN: usize = 48;
}

/// File types, as in `st_mode & S_IFMT`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFBLK: u32 = 0o060000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFIFO: u32 = 0o010000;

/// The largest chunk the format allows (uncompressed), so readers can bound buffers.
pub const MAX_CHUNK_LEN: u32 = 64 << 20;

/// Little-endian readers that never panic: out-of-range reads give 0.
/// The decoder validates every range first, so the 0 is never observed on a valid index.
#[inline]
pub fn u32_at(buf: &[u8], off: usize) -> u32 {
    buf.get(off..off + 4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .unwrap_or(0)
}

#[inline]
pub fn u64_at(buf: &[u8], off: usize) -> u64 {
    buf.get(off..off + 8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

#[inline]
pub fn i64_at(buf: &[u8], off: usize) -> i64 {
    u64_at(buf, off) as i64
}
