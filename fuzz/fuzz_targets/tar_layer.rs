//! The converter's layer reader on hostile layer blobs:
//! `stoker_convert::source::read_layer_into`. The first input byte chooses how
//! the rest is read (see [`Mode`]): as a plain tar, as a tar the harness wraps
//! in gzip or zstd (so mutations reach the tar parser and the merge through
//! the decompressors), or as if the bytes themselves were gzip or zstd (so
//! they reach the decompressors' error paths). Nothing may panic. A layer the
//! reader accepts must report its real digests, encode into an index the
//! decoder accepts, and decode into the same tree.
#![no_main]

use std::io::Write;

use libfuzzer_sys::fuzz_target;
use stoker_convert::ConvertOptions;
use stoker_convert::layer::Compression;
use stoker_convert::source::read_layer_into;
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, FilePiece, Index, NodeId, NodeKind, Tree,
};
use stoker_fuzz::check_index;

/// Small chunks, so even small inputs make files of several chunks.
const CHUNK: u32 = 4096;

/// How the bytes after the first are read; the first byte modulo 5 picks one.
#[derive(Clone, Copy)]
enum Mode {
    Tar = 0,
    TarInGzip = 1,
    TarInZstd = 2,
    RawGzip = 3,
    RawZstd = 4,
}

impl Mode {
    fn of(byte: u8) -> Mode {
        match byte % 5 {
            0 => Mode::Tar,
            1 => Mode::TarInGzip,
            2 => Mode::TarInZstd,
            3 => Mode::RawGzip,
            _ => Mode::RawZstd,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    match Mode::of(first) {
        Mode::Tar => read(rest, Compression::None),
        Mode::TarInGzip => read(&gzip(rest), Compression::Gzip),
        Mode::TarInZstd => {
            if let Ok(zstd) = zstd::bulk::compress(rest, 1) {
                read(&zstd, Compression::Zstd);
            }
        }
        Mode::RawGzip => read(rest, Compression::Gzip),
        Mode::RawZstd => read(rest, Compression::Zstd),
    }
});

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("gzip to memory");
    encoder.finish().expect("gzip to memory")
}

fn read(blob: &[u8], compression: Compression) {
    let options = ConvertOptions {
        chunking: Chunking::Fixed { size: CHUNK },
        ..ConvertOptions::default()
    };
    let mut tree = Tree::default();
    let mut table = ChunkTable::default();
    let mut pieces: Vec<(NodeId, FilePiece)> = Vec::new();
    let mut blob_size = 0u64;
    let layer = Digest::of(b"fuzzed layer");
    let result = read_layer_into(
        &mut tree,
        &layer,
        blob,
        compression,
        &options,
        |node, offset, data| {
            assert!(!data.is_empty() && data.len() <= CHUNK as usize);
            let len = data.len() as u32;
            let chunk = table.insert(ChunkRecord {
                digest: Digest::of(&data),
                blob: 0,
                compressed_offset: blob_size,
                compressed_len: len,
                uncompressed_len: len,
            });
            blob_size += u64::from(len);
            pieces.push((node, FilePiece { offset, chunk }));
            Ok(())
        },
    );
    let Ok(digests) = result else {
        return;
    };
    assert_eq!(digests.compressed, Digest::of(blob));
    if compression == Compression::None {
        assert_eq!(digests.diff_id, digests.compressed);
    }

    // What the converter does next: attach the chunks, encode, and the node decodes.
    table.add_blob(BlobInfo {
        digest: Digest::of(b"fuzzed blob"),
        size: blob_size,
    });
    for (node, piece) in pieces {
        if let Some(NodeKind::File { pieces, .. }) = tree.node_mut(node).map(|n| &mut n.kind) {
            pieces.push(piece);
        }
    }
    let raw = tree
        .encode_raw(&table, options.chunking)
        .expect("a tree built from a layer encodes");
    let index = Index::from_raw(raw).expect("an encoded layer tree decodes");
    check_index(&index);
    compare(&tree, Tree::ROOT, &index, 0);
}

/// The decoded index says what the tree says, node by node from the root.
fn compare(tree: &Tree, node: NodeId, index: &Index, ino: u32) {
    let expected = tree.node(node).expect("reachable node exists");
    let inode = index.inode(ino).expect("inode exists");
    assert_eq!(inode.mode & 0o7777, expected.meta.permissions & 0o7777);
    assert_eq!(inode.mode & 0o170000, expected.kind.type_bits());
    assert_eq!((inode.uid, inode.gid), (expected.meta.uid, expected.meta.gid));
    assert_eq!(
        (inode.mtime_sec, inode.mtime_nsec),
        (expected.meta.mtime_sec, expected.meta.mtime_nsec)
    );
    let xattrs: Vec<(&[u8], &[u8])> = index.xattrs(ino).collect();
    let expected_xattrs: Vec<(&[u8], &[u8])> = expected
        .meta
        .xattrs
        .iter()
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    assert_eq!(xattrs, expected_xattrs);
    match &expected.kind {
        NodeKind::Dir(children) => {
            let entries: Vec<(&[u8], u32)> = index.dir_entries(ino).collect();
            assert_eq!(entries.len(), children.len());
            for ((name, child), (expected_name, expected_child)) in entries.iter().zip(children) {
                assert_eq!(*name, expected_name.as_slice());
                compare(tree, *expected_child, index, *child);
            }
        }
        NodeKind::File { size, pieces } => {
            assert_eq!(inode.size, *size);
            let chunks: Vec<_> = index.file_chunks(ino).collect();
            assert_eq!(chunks.len(), pieces.len());
            for (chunk, piece) in chunks.iter().zip(pieces) {
                assert_eq!(chunk.file_offset, piece.offset);
            }
        }
        NodeKind::Symlink(target) => {
            assert_eq!(index.symlink_target(ino), Some(target.as_slice()));
        }
        NodeKind::CharDevice { major, minor } | NodeKind::BlockDevice { major, minor } => {
            assert_eq!((inode.rdev_major, inode.rdev_minor), (*major, *minor));
        }
        NodeKind::Fifo | NodeKind::Socket => {}
    }
}
