//! # stoker-format
//!
//! The lazy image format, the first step of Stoker's data path
//! (**format** → registry → fetch → verify → cache → filesystem → snapshotter → container).
//!
//! A converted image is a small **metadata index** (the merged filesystem tree
//! plus, for every regular file, the chunks that hold its bytes) and **data blobs**
//! of independently zstd-compressed chunks, each named by the SHA-256 of its
//! uncompressed bytes. `docs/FORMAT.md` specifies the bytes.
//!
//! - [`Tree`] and [`ChunkTable`] are what the converter builds; [`Tree::encode`]
//!   writes the index.
//! - [`Index`] is the decoded index the node reads: lookups, directory listings and
//!   "which chunks cover bytes X..Y" are binary searches over one buffer.
//! - [`Chunking`] cuts file contents into fixed-size or content-defined chunks.
//!
//! This crate is pure: it encodes, decodes and validates, and does no I/O.

pub mod artifact;
pub mod chunking;
pub mod digest;
mod encode;
pub mod index;
pub mod layout;
pub mod plan;
pub mod tree;

pub use chunking::Chunking;
pub use digest::{Digest, Hasher};
pub use encode::EncodedIndex;
pub use index::{ChunkLocation, FileChunk, FileKind, Index, IndexSummary, Inode, InodeId};
pub use plan::{Plan, Trace, TraceEntry};
pub use tree::{
    BlobInfo, ChunkId, ChunkRecord, ChunkTable, FilePiece, Meta, Node, NodeId, NodeKind, Tree,
};

/// Everything that can be wrong with format data.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("malformed digest {0:?}: expected sha256:<64 hex characters>")]
    BadDigest(String),
    #[error("invalid index: {0}")]
    Invalid(String),
    #[error("index format version {0} is not supported (this build reads version {v})", v = layout::VERSION)]
    UnsupportedVersion(u32),
    #[error("{what} digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("cannot encode index: {0}")]
    Encode(String),
    #[error("bad chunking: {0}")]
    BadChunking(String),
}
