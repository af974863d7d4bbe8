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
//! This crate is pure: it encodes, decodes and validates, and does no I/O.

pub mod digest;

pub use digest::{Digest, Hasher};

/// Everything that can be wrong with format data.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("malformed digest {0:?}: expected sha256:<64 hex characters>")]
    BadDigest(String),
}
