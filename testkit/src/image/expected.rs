//! [`ImageBuilder::expected_tree`]: the merged root filesystem an image should give,
//! computed from the builder's entries with OCI layer semantics, independently of any
//! extractor. It is the reference that `umoci unpack`, a Stoker index and a FUSE mount
//! are all compared against.
//!
//! Semantics applied, per layer in order:
//! 1. whiteouts first (they apply to lower layers only): `DIR/.wh.NAME` removes
//!    `DIR/NAME` and everything under it; `DIR/.wh..wh..opq` removes everything under `DIR`;
//! 2. then the other entries in tar order: an entry replaces whatever was at its path
//!    (a whole subtree if that was a directory), except that a directory over a directory
//!    only takes the new metadata and keeps the children; a hardlink shares the inode of
//!    its target (its own header metadata is ignored, as extraction does).

use std::collections::BTreeMap;

use super::entry::{Entry, EntryKind, FileContent, split_parent};
use super::layout::{ImageBuilder, LayerContent};
use crate::TestkitError;
use crate::tree::{EntrySnapshot, FileKind, TreeSnapshot, is_ignored_xattr};

/// One inode of the merged tree.
struct Inode {
    entry: Entry,
}

#[derive(Default)]
struct MergedTree {
    /// path → index in `inodes`
    paths: BTreeMap<Vec<u8>, usize>,
    inodes: Vec<Inode>,
}

impl MergedTree {
    fn remove_subtree(&mut self, path: &[u8]) {
        self.paths.remove(path);
        self.remove_children(path);
    }

    fn remove_children(&mut self, dir: &[u8]) {
        let prefix = if dir.is_empty() {
            Vec::new()
        } else {
            [dir, b"/"].concat()
        };
        let children: Vec<Vec<u8>> = self
            .paths
            .range(prefix.clone()..)
            .take_while(|(path, _)| path.starts_with(&prefix))
            .map(|(path, _)| path.clone())
            .collect();
        for child in children {
            self.paths.remove(&child);
        }
    }

    fn is_dir(&self, path: &[u8]) -> bool {
        path.is_empty()
            || self
                .paths
                .get(path)
                .is_some_and(|&i| matches!(self.inodes[i].entry.kind, EntryKind::Dir))
    }
}

impl ImageBuilder {
    /// The tree this image should unpack to (see the module docs for the semantics).
    /// Fails for raw, tampered or malformed layers, which have no well-defined tree.
    pub fn expected_tree(&self) -> Result<TreeSnapshot, TestkitError> {
        let mut tree = MergedTree::default();
        for (index, layer) in self.layers.iter().enumerate() {
            if layer.corrupt_after_digest || layer.diff_id_override.is_some() {
                return Err(TestkitError::InvalidImage(format!(
                    "layer {index} is tampered with: no expected tree"
                )));
            }
            let LayerContent::Entries(entries) = &layer.content else {
                return Err(TestkitError::InvalidImage(format!(
                    "layer {index} is raw: no expected tree"
                )));
            };
            apply_layer(&mut tree, entries)
                .map_err(|reason| TestkitError::InvalidImage(format!("layer {index}: {reason}")))?;
        }
        Ok(snapshot(&tree))
    }
}

/// `./a/b/` → `a/b`; rejects absolute paths and `.`/`..`/empty components.
fn normalize(path: &[u8]) -> Result<Vec<u8>, String> {
    let mut rest = path;
    while let Some(stripped) = rest.strip_prefix(b"./") {
        rest = stripped;
    }
    while let Some(stripped) = rest.strip_suffix(b"/") {
        rest = stripped;
    }
    let bad = rest.is_empty()
        || rest.starts_with(b"/")
        || rest
            .split(|&b| b == b'/')
            .any(|part| part.is_empty() || part == b"." || part == b"..");
    if bad {
        return Err(format!("invalid path \"{}\"", path.escape_ascii()));
    }
    Ok(rest.to_vec())
}

fn apply_layer(tree: &mut MergedTree, entries: &[Entry]) -> Result<(), String> {
    // Whiteouts, recognised by their tar names whatever kind the entry was built as.
    let mut others = Vec::new();
    for entry in entries {
        let tar_path = normalize(&entry.tar_path())?;
        let (parent, name) = split_parent(&tar_path);
        if name == b".wh..wh..opq" {
            tree.remove_children(parent);
        } else if let Some(hidden) = name.strip_prefix(b".wh.") {
            let hidden_path = if parent.is_empty() {
                hidden.to_vec()
            } else {
                [parent, b"/", hidden].concat()
            };
            tree.remove_subtree(&normalize(&hidden_path)?);
        } else {
            others.push((tar_path, entry));
        }
    }

    for (path, entry) in others {
        let (parent, _) = split_parent(&path);
        if !tree.is_dir(parent) {
            return Err(format!(
                "\"{}\": parent directory missing",
                path.escape_ascii()
            ));
        }
        let existing = tree.paths.get(&path).copied();
        match (&entry.kind, existing) {
            (EntryKind::Dir, Some(i)) if matches!(tree.inodes[i].entry.kind, EntryKind::Dir) => {
                tree.inodes[i].entry = entry.clone();
                continue;
            }
            (_, Some(_)) => tree.remove_subtree(&path),
            (_, None) => {}
        }
        let inode = match &entry.kind {
            EntryKind::Hardlink(target) => {
                let target = normalize(target)?;
                match tree.paths.get(&target) {
                    Some(&i) if !matches!(tree.inodes[i].entry.kind, EntryKind::Dir) => i,
                    _ => {
                        return Err(format!(
                            "\"{}\": hardlink target \"{}\" missing or a directory",
                            path.escape_ascii(),
                            target.escape_ascii()
                        ));
                    }
                }
            }
            _ => {
                tree.inodes.push(Inode {
                    entry: entry.clone(),
                });
                tree.inodes.len() - 1
            }
        };
        tree.paths.insert(path, inode);
    }
    Ok(())
}

fn snapshot(tree: &MergedTree) -> TreeSnapshot {
    let mut hashes: BTreeMap<usize, [u8; 32]> = BTreeMap::new();
    let mut result = TreeSnapshot::default();
    for (path, &i) in &tree.paths {
        let entry = &tree.inodes[i].entry;
        let (kind, size, rdev, symlink_target, sha256) = match &entry.kind {
            EntryKind::Dir => (FileKind::Dir, 0, None, None, None),
            EntryKind::File(content) => {
                let hash = *hashes.entry(i).or_insert_with(|| content.sha256());
                (FileKind::File, content.size(), None, None, Some(hash))
            }
            EntryKind::Symlink(target) => (
                FileKind::Symlink,
                target.len() as u64,
                None,
                Some(target.clone()),
                None,
            ),
            EntryKind::CharDevice { major, minor } => {
                (FileKind::CharDevice, 0, Some((*major, *minor)), None, None)
            }
            EntryKind::BlockDevice { major, minor } => {
                (FileKind::BlockDevice, 0, Some((*major, *minor)), None, None)
            }
            EntryKind::Fifo => (FileKind::Fifo, 0, None, None, None),
            // Hardlinks point at other inodes and whiteouts were applied: neither is stored.
            EntryKind::Hardlink(_) | EntryKind::Whiteout | EntryKind::OpaqueWhiteout => {
                let empty = FileContent::Bytes(Vec::new());
                (FileKind::File, 0, None, None, Some(empty.sha256()))
            }
        };
        let xattrs = entry
            .xattrs
            .iter()
            .filter(|(name, _)| !is_ignored_xattr(name.as_bytes()))
            .map(|(name, value)| (name.as_bytes().to_vec(), value.clone()))
            .collect();
        result.entries.insert(
            path.clone(),
            EntrySnapshot {
                kind,
                mode: entry.mode & 0o7777,
                uid: entry.uid,
                gid: entry.gid,
                size,
                mtime: entry.mtime as i64,
                rdev,
                xattrs,
                symlink_target,
                sha256,
                hardlink_group: None,
            },
        );
    }
    result.assign_hardlink_groups(&tree.paths);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_semantics() {
        let image = ImageBuilder::new()
            .layer(vec![
                Entry::dir("a"),
                Entry::file("a/f", "1"),
                Entry::dir("gone"),
                Entry::file("gone/x", "x"),
                Entry::dir("opq"),
                Entry::file("opq/old", "o"),
                Entry::file("to_dir", "f"),
                Entry::dir("to_file"),
                Entry::file("to_file/child", "c"),
                Entry::file("keep", "k"),
            ])
            .layer(vec![
                Entry::whiteout("gone"),
                Entry::opaque("opq"),
                Entry::dir("opq").mode(0o700),
                Entry::file("opq/new", "n"),
                Entry::dir("to_dir"),
                Entry::file("to_file", "now a file"),
                Entry::hardlink("a/link", "keep"),
            ]);
        let tree = image.expected_tree().expect("tree");
        let paths: Vec<String> = tree
            .entries
            .keys()
            .map(|p| p.escape_ascii().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "a", "a/f", "a/link", "keep", "opq", "opq/new", "to_dir", "to_file"
            ]
        );
        assert_eq!(tree.get("opq").map(|e| e.mode), Some(0o700));
        assert_eq!(tree.get("to_dir").map(|e| e.kind), Some(FileKind::Dir));
        assert_eq!(tree.get("to_file").map(|e| e.kind), Some(FileKind::File));
        assert_eq!(
            tree.get("a/link").and_then(|e| e.hardlink_group.clone()),
            Some(b"a/link".to_vec())
        );
        assert_eq!(
            tree.get("keep").and_then(|e| e.hardlink_group.clone()),
            Some(b"a/link".to_vec())
        );
    }

    #[test]
    fn bad_paths_are_rejected() {
        for bad in ["../x", "/x", "a/../b"] {
            let image = ImageBuilder::new().layer(vec![Entry::file(bad, "x")]);
            assert!(image.expected_tree().is_err(), "{bad}");
        }
    }
}
