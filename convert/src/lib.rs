//! # stoker-convert
//!
//! `stoker convert`: turns an OCI image into Stoker's lazy format and stores it
//! next to the image, as an OCI artifact whose `subject` is the image manifest.
//! This is where the data path begins (**convert** → registry → fetch → verify →
//! cache → filesystem → snapshotter → container).
//!
//! For each platform of the image:
//! 1. each layer blob is streamed and read ahead ([`source`]), its digest checked
//!    on the fly, decompressed and read as tar ([`layer`]); nothing is extracted
//!    to disk;
//! 2. entries are applied to one merged tree with OCI whiteout and hardlink
//!    semantics ([`merge`]);
//! 3. file contents are cut into chunks, hashed, deduplicated and compressed on
//!    all cores while the next ones are read, and appended to one data blob per
//!    layer ([`pack`]); a registry blob is uploaded while it is written;
//! 4. the tree is encoded as the index, and the artifact manifest is pushed
//!    last, so a failed conversion never leaves a visible artifact ([`artifact`]).
//!
//! With a prefetch plan ([`ConvertOptions::layout_plan`]), the plan's chunks go to
//! a *hot blob*, back to back in plan order, and the report carries the plan
//! re-bound to the new index ([`trace_layout`]).

pub mod artifact;
pub mod layer;
pub mod layout;
pub mod merge;
pub mod pack;
pub mod source;
pub mod trace_layout;

use std::path::{Path, PathBuf};

use stoker_format::{Chunking, Digest, FormatError, Plan};

pub use artifact::{ConvertReport, find_artifact, load_index, publish_prebuilt};
pub use source::{ImageStore, convert};

/// How to convert.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub chunking: Chunking,
    /// zstd level for chunks (1 = fastest; 3 is zstd's default).
    pub zstd_level: i32,
    /// `os/arch[/variant]` values to convert from a multi-platform image; all when empty.
    pub platforms: Vec<String>,
    /// Where blobs wait for their upload; the system temp dir by default.
    pub staging_dir: Option<PathBuf>,
    /// Show a progress bar (on a terminal).
    pub progress: bool,
    /// Refuse setuid/setgid files.
    pub deny_setuid: bool,
    /// Refuse character and block devices.
    pub deny_devices: bool,
    /// Lay the image out by this prefetch plan: its chunks first, in plan order,
    /// in one hot blob. The plan must be bound to the index of one of the
    /// image's Stoker artifacts; only that platform is converted.
    pub layout_plan: Option<Plan>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            chunking: Chunking::default(),
            zstd_level: 3,
            platforms: Vec::new(),
            staging_dir: None,
            progress: false,
            deny_setuid: false,
            deny_devices: false,
            layout_plan: None,
        }
    }
}

/// Everything that can stop a conversion. Each names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("layer {layer}, entry {entry:?}: {reason}")]
    Layer {
        layer: Digest,
        entry: String,
        reason: String,
    },
    #[error("{what}: digest mismatch: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("source image: {0}")]
    Source(String),
    #[error("layout plan: {0}")]
    Plan(String),
    #[error("no Stoker artifact found for {0}")]
    NoArtifact(String),
    #[error("registry: {0}")]
    Registry(#[from] stoker_registry::RegistryError),
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl ConvertError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
