//! OCI layer semantics: applying a layer's entries, in order, to the merged tree.
//!
//! - An entry replaces whatever its path named in lower layers; a directory
//!   over a directory only updates the attributes and keeps the children.
//! - `.wh.NAME` deletes `NAME` from lower layers; `.wh..wh..opq` hides every
//!   lower-layer entry of its directory. Neither touches entries that the same
//!   layer adds, whatever their order in the tar stream.
//! - A hardlink names the node its target names in the merged tree, within the
//!   layer or across layers.
//! - Paths never follow symlinks: a directory in an upper layer replaces a
//!   symlink of the same name, as overlayfs does.

use std::collections::{BTreeMap, HashSet};

use stoker_format::{Meta, Node, NodeId, NodeKind, Tree};

use crate::layer::{EntryKind, LayerEntry};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// What applying one entry did, so the caller knows where file data goes.
pub enum Applied {
    /// A new regular file node: its chunks are to be attached to it.
    File(NodeId),
    /// Nothing that carries data.
    Other,
}

/// Applies one layer's entries to a tree.
pub struct LayerMerger<'a> {
    tree: &'a mut Tree,
    /// (directory, name) pairs this layer created: whiteouts and opaque
    /// markers of the same layer leave them alone.
    added: HashSet<(NodeId, Vec<u8>)>,
    /// Opaque markers seen, applied when the layer ends.
    opaque_dirs: Vec<NodeId>,
    /// Whiteouts seen, applied when the layer ends.
    whiteouts: Vec<(NodeId, Vec<u8>)>,
}

impl<'a> LayerMerger<'a> {
    pub fn new(tree: &'a mut Tree) -> Self {
        LayerMerger {
            tree,
            added: HashSet::new(),
            opaque_dirs: Vec::new(),
            whiteouts: Vec::new(),
        }
    }

    pub fn apply(&mut self, entry: LayerEntry) -> Result<Applied, String> {
        let meta = Meta {
            permissions: entry.permissions,
            uid: entry.uid,
            gid: entry.gid,
            mtime_sec: entry.mtime_sec,
            mtime_nsec: entry.mtime_nsec,
            xattrs: entry.xattrs,
        };
        let Some((name, parents)) = entry.path.split_last() else {
            // The root itself: keep its children, take its attributes.
            if entry.kind != EntryKind::Dir {
                return Err("the root must be a directory".into());
            }
            if let Some(root) = self.tree.node_mut(Tree::ROOT) {
                root.meta = meta;
            }
            return Ok(Applied::Other);
        };
        let dir = self.make_parents(parents)?;

        if name.as_slice() == OPAQUE_MARKER {
            self.opaque_dirs.push(dir);
            return Ok(Applied::Other);
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err("whiteout names no entry".into());
            }
            self.whiteouts.push((dir, hidden.to_vec()));
            return Ok(Applied::Other);
        }

        let existing = self.tree.lookup(dir, name);
        let is_file = matches!(entry.kind, EntryKind::File { .. });
        let node = match entry.kind {
            EntryKind::Dir => {
                if let Some(id) = existing.filter(|&id| self.tree.children(id).is_some()) {
                    if let Some(node) = self.tree.node_mut(id) {
                        node.meta = meta;
                    }
                    self.added.insert((dir, name.clone()));
                    return Ok(Applied::Other);
                }
                self.tree.add(Node {
                    kind: NodeKind::Dir(BTreeMap::new()),
                    meta,
                })
            }
            EntryKind::Hardlink { target } => {
                let id = self
                    .tree
                    .resolve(target.iter().map(|c| c.as_slice()))
                    .ok_or_else(|| "hardlink target does not exist".to_string())?;
                if self.tree.children(id).is_some() {
                    return Err("hardlink to a directory".into());
                }
                id
            }
            EntryKind::File { size } => self.tree.add(Node {
                kind: NodeKind::File {
                    size,
                    pieces: Vec::new(),
                },
                meta,
            }),
            EntryKind::Symlink { target } => self.tree.add(Node {
                kind: NodeKind::Symlink(target),
                meta,
            }),
            EntryKind::CharDevice { major, minor } => self.tree.add(Node {
                kind: NodeKind::CharDevice { major, minor },
                meta,
            }),
            EntryKind::BlockDevice { major, minor } => self.tree.add(Node {
                kind: NodeKind::BlockDevice { major, minor },
                meta,
            }),
            EntryKind::Fifo => self.tree.add(Node {
                kind: NodeKind::Fifo,
                meta,
            }),
        };
        self.tree.link(dir, name, node);
        self.added.insert((dir, name.clone()));
        Ok(if is_file {
            Applied::File(node)
        } else {
            Applied::Other
        })
    }

    /// Applies the layer's whiteouts and opaque markers. Call once, after the
    /// last entry.
    pub fn finish(self) {
        for dir in self.opaque_dirs {
            let keep: Vec<(Vec<u8>, NodeId)> = self
                .tree
                .children(dir)
                .map(|children| {
                    children
                        .iter()
                        .filter(|(name, _)| self.added.contains(&(dir, name.to_vec())))
                        .map(|(name, id)| (name.clone(), *id))
                        .collect()
                })
                .unwrap_or_default();
            self.tree.clear_dir(dir);
            for (name, id) in keep {
                self.tree.link(dir, &name, id);
            }
        }
        for (dir, name) in self.whiteouts {
            if !self.added.contains(&(dir, name.clone())) {
                self.tree.unlink(dir, &name);
            }
        }
    }

    /// Finds or creates the directories above an entry. A non-directory in the
    /// way is replaced by a new directory, as an upper layer's directory would.
    fn make_parents(&mut self, parents: &[Vec<u8>]) -> Result<NodeId, String> {
        let mut dir = Tree::ROOT;
        for name in parents {
            if name.starts_with(WHITEOUT_PREFIX) {
                return Err("whiteout used as a directory".into());
            }
            dir = match self.tree.lookup(dir, name) {
                Some(id) if self.tree.children(id).is_some() => id,
                _ => {
                    let id = self.tree.add(Node {
                        kind: NodeKind::Dir(BTreeMap::new()),
                        meta: Meta {
                            permissions: 0o755,
                            ..Meta::default()
                        },
                    });
                    self.tree.link(dir, name, id);
                    self.added.insert((dir, name.clone()));
                    id
                }
            };
        }
        Ok(dir)
    }
}
