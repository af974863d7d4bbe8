//! Where the node keeps per-file backing files for FUSE passthrough
//! ([`stoker_lazyfs::AssemblyOptions`]), one directory per image index under
//! `<cache dir>/assembled/`, and how many bytes each image may use there.
//!
//! A file of several chunks can only be passed through to the kernel from one
//! local file holding all its bytes: the lazy filesystem assembles it from the
//! cached chunks. Mounts do it in the background after a file's chunks are all
//! cached (the next open passes through); a node warmed from a plan of an image
//! the controller has learned does it before the image's containers start
//! ([`crate::prefetch`]), so their first opens pass through. The bytes are on
//! disk twice meanwhile (chunk cache + copy): at most
//! `reads.assembly_max_bytes` per image, outside the chunk cache's own bound,
//! and removed when the image is unmounted.

use std::path::PathBuf;

use stoker_format::Digest;
use stoker_lazyfs::{AssemblyOptions, VerifiedAssemblies};
use tracing::warn;

/// The node's assembled backing files, shared by its mounts and prefetches.
#[derive(Clone, Debug)]
pub struct Assembly {
    dir: PathBuf,
    max_bytes_per_image: u64,
    verified: VerifiedAssemblies,
}

impl Assembly {
    /// Assembled files under `dir`, at most `max_bytes_per_image` per image;
    /// `None` (no assembly, only single-chunk files pass through) for 0.
    pub fn new(dir: PathBuf, max_bytes_per_image: u64) -> Option<Assembly> {
        (max_bytes_per_image > 0).then(|| Assembly {
            dir,
            max_bytes_per_image,
            verified: VerifiedAssemblies::default(),
        })
    }

    /// The options for mounting (or warming) the image with index `index_digest`.
    pub fn options_for(&self, index_digest: &Digest) -> AssemblyOptions {
        AssemblyOptions {
            dir: self.dir.join(index_digest.hex()),
            max_bytes: self.max_bytes_per_image,
            verified: self.verified.clone(),
        }
    }

    /// Deletes the image's assembled files (it was unmounted).
    pub fn remove(&self, index_digest: &Digest) {
        let dir = self.dir.join(index_digest.hex());
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot delete assembled passthrough files")
            }
        }
    }
}
