//! Disk usage of a directory tree with `du` semantics, as containerd's `fs.DiskUsage`:
//! every inode is counted once (hard links are not double-counted), its size is the
//! space allocated on disk (`st_blocks * 512`), and the walk never follows symlinks or
//! leaves the tree's filesystem.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::SnapshotterError;

/// Bytes allocated and number of distinct inodes under a directory (itself included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiskUsage {
    pub size: u64,
    pub inodes: u64,
}

/// Walks `root` and adds up each distinct inode's allocated bytes.
pub fn disk_usage(root: &Path) -> Result<DiskUsage, SnapshotterError> {
    let root_meta = std::fs::symlink_metadata(root)
        .map_err(|e| SnapshotterError::io(format!("stat {}", root.display()), e))?;
    let device = root_meta.dev();
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    let mut usage = DiskUsage::default();
    let mut pending: Vec<(PathBuf, std::fs::Metadata)> = vec![(root.to_path_buf(), root_meta)];
    while let Some((path, meta)) = pending.pop() {
        if seen.insert((meta.dev(), meta.ino())) {
            usage.size += meta.blocks() * 512;
            usage.inodes += 1;
        }
        if !meta.is_dir() || meta.dev() != device {
            continue;
        }
        let entries = std::fs::read_dir(&path)
            .map_err(|e| SnapshotterError::io(format!("reading {}", path.display()), e))?;
        for entry in entries {
            let entry = entry
                .map_err(|e| SnapshotterError::io(format!("reading {}", path.display()), e))?;
            let child = entry.path();
            let child_meta = std::fs::symlink_metadata(&child)
                .map_err(|e| SnapshotterError::io(format!("stat {}", child.display()), e))?;
            pending.push((child, child_meta));
        }
    }
    Ok(usage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hard_links_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(dir.path().join("sub/a"), vec![7u8; 100_000]).expect("write");
        std::fs::hard_link(dir.path().join("sub/a"), dir.path().join("b")).expect("link");
        std::os::unix::fs::symlink("/etc", dir.path().join("c")).expect("symlink");
        let usage = disk_usage(dir.path()).expect("du");
        // root, sub, a (= b), c
        assert_eq!(usage.inodes, 4);
        assert!(usage.size >= 100_000, "{usage:?}");
        assert!(usage.size < 200_000, "hard link counted twice: {usage:?}");
    }
}
