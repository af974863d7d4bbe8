//! The mutable filesystem tree the converter builds while it applies layers, and
//! the chunk table its files point into. [`Tree::encode`] turns both into an index.

use std::collections::{BTreeMap, HashMap};

use crate::Digest;

/// Position of a node in [`Tree`]'s arena. Several directory entries may name
/// the same node: that is a hardlink.
pub type NodeId = usize;

/// Position of a chunk in a [`ChunkTable`].
pub type ChunkId = u32;

/// Attributes every node has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Permission and special bits (`st_mode & 0o7777`); the type comes from [`NodeKind`].
    pub permissions: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// Extended attributes, `security.capability` included.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// A piece of a regular file: bytes `offset..offset+len` of the file are chunk `chunk`.
/// Ranges a file has no piece for are holes and read as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilePiece {
    pub offset: u64,
    pub chunk: ChunkId,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File { size: u64, pieces: Vec<FilePiece> },
    Symlink(Vec<u8>),
    CharDevice { major: u32, minor: u32 },
    BlockDevice { major: u32, minor: u32 },
    Fifo,
    Socket,
}

impl NodeKind {
    /// The `S_IFMT` bits for this kind.
    pub fn type_bits(&self) -> u32 {
        use crate::layout::*;
        match self {
            NodeKind::Dir(_) => S_IFDIR,
            NodeKind::File { .. } => S_IFREG,
            NodeKind::Symlink(_) => S_IFLNK,
            NodeKind::CharDevice { .. } => S_IFCHR,
            NodeKind::BlockDevice { .. } => S_IFBLK,
            NodeKind::Fifo => S_IFIFO,
            NodeKind::Socket => S_IFSOCK,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub kind: NodeKind,
    pub meta: Meta,
}

/// An arena of nodes; node 0 is the root directory.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(Meta {
            permissions: 0o755,
            ..Meta::default()
        })
    }
}

impl Tree {
    pub const ROOT: NodeId = 0;

    pub fn new(root_meta: Meta) -> Self {
        Tree {
            nodes: vec![Node {
                kind: NodeKind::Dir(BTreeMap::new()),
                meta: root_meta,
            }],
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(id)
    }

    pub fn node_mut(&mut self, id: NodeId) -> Option<&mut Node> {
        self.nodes.get_mut(id)
    }

    /// Adds a node that no entry names yet; [`Tree::link`] gives it a name.
    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The entries of `dir`, or `None` if it is not a directory.
    pub fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        match &self.nodes.get(dir)?.kind {
            NodeKind::Dir(children) => Some(children),
            _ => None,
        }
    }

    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.children(dir)?.get(name).copied()
    }

    /// Names `node` as `name` in `dir`, returning the node the name used to point at.
    /// Does nothing and returns `None` if `dir` is not a directory.
    pub fn link(&mut self, dir: NodeId, name: &[u8], node: NodeId) -> Option<NodeId> {
        match &mut self.nodes.get_mut(dir)?.kind {
            NodeKind::Dir(children) => children.insert(name.to_vec(), node),
            _ => None,
        }
    }

    /// Removes the entry `name` from `dir`, returning the node it named.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.nodes.get_mut(dir)?.kind {
            NodeKind::Dir(children) => children.remove(name),
            _ => None,
        }
    }

    /// Removes every entry of `dir` (an opaque directory).
    pub fn clear_dir(&mut self, dir: NodeId) {
        if let Some(Node {
            kind: NodeKind::Dir(children),
            ..
        }) = self.nodes.get_mut(dir)
        {
            children.clear();
        }
    }

    /// Follows `components` from the root without following symlinks.
    pub fn resolve<'a>(&self, components: impl IntoIterator<Item = &'a [u8]>) -> Option<NodeId> {
        components
            .into_iter()
            .try_fold(Self::ROOT, |dir, name| self.lookup(dir, name))
    }

    /// Number of nodes in the arena, reachable or not.
    pub fn arena_len(&self) -> usize {
        self.nodes.len()
    }
}

/// One data blob of the artifact: concatenated zstd frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

/// Where a chunk is stored: blob position in the table, byte range, lengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRecord {
    pub digest: Digest,
    pub blob: u32,
    pub compressed_offset: u64,
    pub compressed_len: u32,
    pub uncompressed_len: u32,
}

/// Every chunk the converter wrote, each once (deduplicated by digest).
#[derive(Clone, Debug, Default)]
pub struct ChunkTable {
    pub blobs: Vec<BlobInfo>,
    pub chunks: Vec<ChunkRecord>,
    by_digest: HashMap<Digest, ChunkId>,
}

impl ChunkTable {
    pub fn find(&self, digest: &Digest) -> Option<ChunkId> {
        self.by_digest.get(digest).copied()
    }

    /// Records a chunk, or returns the id of the identical chunk already recorded.
    pub fn insert(&mut self, record: ChunkRecord) -> ChunkId {
        if let Some(id) = self.find(&record.digest) {
            return id;
        }
        let id = self.chunks.len() as ChunkId;
        self.by_digest.insert(record.digest, id);
        self.chunks.push(record);
        id
    }

    pub fn add_blob(&mut self, blob: BlobInfo) -> u32 {
        self.blobs.push(blob);
        (self.blobs.len() - 1) as u32
    }

    pub fn get(&self, id: ChunkId) -> Option<&ChunkRecord> {
        self.chunks.get(id as usize)
    }
}
