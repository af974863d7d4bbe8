//! Tree + chunk table → raw index bytes → zstd-compressed index blob.
//!
//! The output depends only on the tree's contents and the chunk table, never on
//! hash-map order or timing, so conversion is reproducible.

use std::collections::HashMap;

use crate::layout::{self, *};
use crate::tree::{ChunkTable, NodeId, NodeKind, Tree};
use crate::{Chunking, Digest, FormatError};

/// A finished index: the compressed bytes that go to the registry, and their digest.
#[derive(Clone, Debug)]
pub struct EncodedIndex {
    pub compressed: Vec<u8>,
    pub digest: Digest,
    pub raw_len: usize,
}

/// zstd level for the index. The index is small and fetched before anything
/// else, so it is worth compressing hard.
const INDEX_ZSTD_LEVEL: i32 = 12;

impl Tree {
    /// Encodes the part of the tree reachable from the root.
    pub fn encode(
        &self,
        table: &ChunkTable,
        chunking: Chunking,
    ) -> Result<EncodedIndex, FormatError> {
        let raw = self.encode_raw(table, chunking)?;
        let compressed = zstd::bulk::compress(&raw, INDEX_ZSTD_LEVEL)
            .map_err(|e| FormatError::Encode(format!("zstd: {e}")))?;
        Ok(EncodedIndex {
            digest: Digest::of(&compressed),
            raw_len: raw.len(),
            compressed,
        })
    }

    /// The uncompressed index bytes (see `docs/FORMAT.md`).
    pub fn encode_raw(
        &self,
        table: &ChunkTable,
        chunking: Chunking,
    ) -> Result<Vec<u8>, FormatError> {
        let order = self.number_inodes()?;
        let ino_of: HashMap<NodeId, u32> = order
            .iter()
            .enumerate()
            .map(|(ino, &(node, _))| (node, ino as u32))
            .collect();

        // Chunks that some reachable file uses, in chunk-table order.
        let mut used = vec![false; table.chunks.len()];
        for &(node, _) in &order {
            if let Some(NodeKind::File { pieces, .. }) = self.node(node).map(|n| &n.kind) {
                for piece in pieces {
                    let slot = used.get_mut(piece.chunk as usize).ok_or_else(|| {
                        FormatError::Encode(format!("unknown chunk id {}", piece.chunk))
                    })?;
                    *slot = true;
                }
            }
        }
        let mut new_chunk_id = vec![u32::MAX; table.chunks.len()];
        let mut chunk_count = 0u32;
        for (old, is_used) in used.iter().enumerate() {
            if *is_used {
                new_chunk_id[old] = chunk_count;
                chunk_count += 1;
            }
        }

        let mut link_counts: HashMap<NodeId, u32> = HashMap::new();
        for &(node, _) in &order {
            if let Some(children) = self.children(node) {
                for &child in children.values() {
                    *link_counts.entry(child).or_default() += 1;
                }
            }
        }

        let mut strings = Vec::new();
        let mut push_string = |bytes: &[u8]| -> Result<(u32, u32), FormatError> {
            let off = u32::try_from(strings.len()).map_err(|_| too_big("string table"))?;
            let len = u32::try_from(bytes.len()).map_err(|_| too_big("string"))?;
            strings.extend_from_slice(bytes);
            Ok((off, len))
        };

        let mut inodes = Vec::with_capacity(order.len() * INODE_SIZE);
        let mut dirents = Vec::new();
        let mut filerefs = Vec::new();
        let mut xattrs = Vec::new();
        let (mut dirent_count, mut fileref_count, mut xattr_count) = (0u32, 0u32, 0u32);

        for &(node_id, parent) in &order {
            let node = self
                .node(node_id)
                .ok_or_else(|| FormatError::Encode(format!("dangling node {node_id}")))?;
            let meta = &node.meta;
            let (mut data_start, mut data_len, mut size, mut rdev) =
                (0u32, 0u32, 0u64, (0u32, 0u32));
            let mut nlink = link_counts.get(&node_id).copied().unwrap_or(1).max(1);
            match &node.kind {
                NodeKind::Dir(children) => {
                    data_start = dirent_count;
                    data_len = u32::try_from(children.len()).map_err(|_| too_big("directory"))?;
                    let mut subdirs = 0u32;
                    for (name, child) in children {
                        let child_ino = ino_of[child];
                        if matches!(self.node(*child).map(|n| &n.kind), Some(NodeKind::Dir(_))) {
                            subdirs += 1;
                        }
                        let (off, len) = push_string(name)?;
                        put_u32(&mut dirents, off);
                        put_u32(&mut dirents, len);
                        put_u32(&mut dirents, child_ino);
                        dirent_count += 1;
                    }
                    nlink = 2 + subdirs;
                }
                NodeKind::File {
                    size: file_size,
                    pieces,
                } => {
                    size = *file_size;
                    data_start = fileref_count;
                    data_len = u32::try_from(pieces.len()).map_err(|_| too_big("file"))?;
                    for piece in pieces {
                        put_u32(&mut filerefs, new_chunk_id[piece.chunk as usize]);
                        put_u64(&mut filerefs, piece.offset);
                        fileref_count += 1;
                    }
                }
                NodeKind::Symlink(target) => {
                    (data_start, data_len) = push_string(target)?;
                    size = target.len() as u64;
                }
                NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
                    rdev = (*major, *minor);
                }
                NodeKind::Fifo | NodeKind::Socket => {}
            }
            let xattr_start = xattr_count;
            for (name, value) in &meta.xattrs {
                let (name_off, name_len) = push_string(name)?;
                let (value_off, value_len) = push_string(value)?;
                for v in [name_off, name_len, value_off, value_len] {
                    put_u32(&mut xattrs, v);
                }
                xattr_count += 1;
            }

            let mut record = [0u8; INODE_SIZE];
            let mode = node.kind.type_bits() | (meta.permissions & 0o7777);
            put_at(&mut record, inode::MODE, &mode.to_le_bytes());
            put_at(&mut record, inode::UID, &meta.uid.to_le_bytes());
            put_at(&mut record, inode::GID, &meta.gid.to_le_bytes());
            put_at(&mut record, inode::NLINK, &nlink.to_le_bytes());
            put_at(&mut record, inode::MTIME_SEC, &meta.mtime_sec.to_le_bytes());
            put_at(
                &mut record,
                inode::MTIME_NSEC,
                &meta.mtime_nsec.to_le_bytes(),
            );
            put_at(&mut record, inode::RDEV_MAJOR, &rdev.0.to_le_bytes());
            put_at(&mut record, inode::RDEV_MINOR, &rdev.1.to_le_bytes());
            put_at(&mut record, inode::SIZE, &size.to_le_bytes());
            put_at(&mut record, inode::PARENT, &ino_of[&parent].to_le_bytes());
            put_at(&mut record, inode::DATA_START, &data_start.to_le_bytes());
            put_at(&mut record, inode::DATA_LEN, &data_len.to_le_bytes());
            put_at(&mut record, inode::XATTR_START, &xattr_start.to_le_bytes());
            put_at(
                &mut record,
                inode::XATTR_COUNT,
                &(xattr_count - xattr_start).to_le_bytes(),
            );
            inodes.extend_from_slice(&record);
        }

        let mut chunks = Vec::with_capacity(chunk_count as usize * CHUNK_SIZE);
        for (old, record) in table.chunks.iter().enumerate() {
            if !used[old] {
                continue;
            }
            chunks.extend_from_slice(&record.digest.0);
            put_u32(&mut chunks, record.blob);
            put_u64(&mut chunks, record.compressed_offset);
            put_u32(&mut chunks, record.compressed_len);
            put_u32(&mut chunks, record.uncompressed_len);
        }
        let mut blobs = Vec::with_capacity(table.blobs.len() * BLOB_SIZE);
        for blob in &table.blobs {
            blobs.extend_from_slice(&blob.digest.0);
            put_u64(&mut blobs, blob.size);
        }

        let mut header = [0u8; HEADER_SIZE];
        put_at(&mut header, header::MAGIC, &layout::MAGIC);
        put_at(&mut header, header::VERSION, &layout::VERSION.to_le_bytes());
        put_at(
            &mut header,
            header::INODES,
            &(order.len() as u32).to_le_bytes(),
        );
        put_at(&mut header, header::DIRENTS, &dirent_count.to_le_bytes());
        put_at(&mut header, header::CHUNKS, &chunk_count.to_le_bytes());
        put_at(&mut header, header::FILEREFS, &fileref_count.to_le_bytes());
        put_at(
            &mut header,
            header::BLOBS,
            &(table.blobs.len() as u32).to_le_bytes(),
        );
        put_at(&mut header, header::XATTRS, &xattr_count.to_le_bytes());
        put_at(
            &mut header,
            header::STRINGS_LEN,
            &(strings.len() as u64).to_le_bytes(),
        );
        let (kind, nominal) = chunking.encode();
        put_at(&mut header, header::CHUNKING, &kind.to_le_bytes());
        put_at(&mut header, header::CHUNK_SIZE, &nominal.to_le_bytes());

        let mut raw = Vec::with_capacity(
            HEADER_SIZE
                + blobs.len()
                + chunks.len()
                + inodes.len()
                + dirents.len()
                + filerefs.len()
                + xattrs.len()
                + strings.len(),
        );
        for section in [
            &header[..],
            &blobs,
            &chunks,
            &inodes,
            &dirents,
            &filerefs,
            &xattrs,
            &strings,
        ] {
            raw.extend_from_slice(section);
        }
        Ok(raw)
    }

    /// Numbers the reachable nodes depth-first, children in name order: the
    /// root is inode 0. Returns (node, parent node) in inode order. A directory
    /// reachable twice is an error: directories cannot be hardlinked.
    fn number_inodes(&self) -> Result<Vec<(NodeId, NodeId)>, FormatError> {
        let mut order = Vec::new();
        let mut seen = vec![false; self.arena_len()];
        let mut stack = vec![(Tree::ROOT, Tree::ROOT)];
        while let Some((node, parent)) = stack.pop() {
            let is_dir = self.children(node).is_some();
            if seen[node] {
                if is_dir {
                    return Err(FormatError::Encode(format!(
                        "directory node {node} is linked twice"
                    )));
                }
                continue;
            }
            seen[node] = true;
            order.push((node, parent));
            if let Some(children) = self.children(node) {
                // Reverse so that the smallest name is popped, and numbered, first.
                for &child in children.values().rev() {
                    if child >= self.arena_len() {
                        return Err(FormatError::Encode(format!("dangling node {child}")));
                    }
                    stack.push((child, node));
                }
            }
        }
        if order.len() > u32::MAX as usize {
            return Err(too_big("inode table"));
        }
        Ok(order)
    }
}

fn too_big(what: &str) -> FormatError {
    FormatError::Encode(format!("{what} exceeds the format's 32-bit limits"))
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_at(record: &mut [u8], off: usize, bytes: &[u8]) {
    record[off..off + bytes.len()].copy_from_slice(bytes);
}
