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
//! and removed when the image is unmounted. At start, the agent removes the
//! files of every image it did not mount again
//! ([`Assembly::remove_all_but`]): a crash or a reboot skips the unmounts.

use std::path::{Path, PathBuf};

use stoker_format::Digest;
use stoker_lazyfs::{AssemblyOptions, VerifiedAssemblies};
use tracing::{info, warn};

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
        remove_dir(&self.dir.join(index_digest.hex()));
    }

    /// Deletes the assembled files of every image but those `keep` says yes to
    /// (the images mounted again after a restart); returns how many images'
    /// files went. Anything else in the directory is left alone.
    pub fn remove_all_but(&self, keep: impl Fn(&Digest) -> bool) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0; // nothing assembled yet
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(digest) = name.to_str().and_then(|hex| Digest::parse(hex).ok()) else {
                continue;
            };
            if !keep(&digest) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dir(&entry.path());
                removed += 1;
            }
        }
        if removed > 0 {
            info!(images = removed, dir = %self.dir.display(), "removed the assembled files of images no longer mounted");
        }
        removed
    }
}

fn remove_dir(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot delete assembled passthrough files")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_all_but_deletes_the_files_of_images_not_kept_and_nothing_else() {
        let root = tempfile::tempdir().expect("tempdir");
        let assembly = Assembly::new(root.path().join("assembled"), 1 << 20).expect("assembly");
        assert_eq!(assembly.remove_all_but(|_| false), 0, "no directory yet");
        let (kept, stale) = (Digest::of(b"kept"), Digest::of(b"stale"));
        for digest in [&kept, &stale] {
            let dir = assembly.options_for(digest).dir;
            std::fs::create_dir_all(&dir).expect("image dir");
            std::fs::write(dir.join("file"), b"bytes").expect("assembled file");
        }
        let stranger = root.path().join("assembled").join("not-an-image");
        std::fs::create_dir_all(&stranger).expect("stranger");

        assert_eq!(assembly.remove_all_but(|d| *d == kept), 1);
        assert!(assembly.options_for(&kept).dir.join("file").is_file());
        assert!(!assembly.options_for(&stale).dir.exists());
        assert!(stranger.is_dir(), "not an image's directory: left alone");
    }
}
