//! Round trips and hostile inputs for the index encoder/decoder.

use std::collections::BTreeMap;

use stoker_format::*;

fn meta(permissions: u32) -> Meta {
    Meta {
        permissions,
        uid: 1000,
        gid: 100,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 5,
        xattrs: BTreeMap::new(),
    }
}

fn chunk(table: &mut ChunkTable, blob: u32, offset: u64, bytes: &[u8]) -> ChunkId {
    table.insert(ChunkRecord {
        digest: Digest::of(bytes),
        blob,
        compressed_offset: offset,
        compressed_len: 10,
        uncompressed_len: bytes.len() as u32,
    })
}

/// A tree with every kind of node, a hardlink, xattrs, a hole and a non-UTF-8 name.
fn sample() -> (Tree, ChunkTable) {
    let mut table = ChunkTable::default();
    let blob = table.add_blob(BlobInfo {
        digest: Digest::of(b"blob"),
        size: 1000,
    });
    let a = chunk(&mut table, blob, 0, &[1u8; 100]);
    let b = chunk(&mut table, blob, 10, &[2u8; 50]);
    let again = chunk(&mut table, blob, 20, &[1u8; 100]);
    assert_eq!(a, again, "identical chunks are stored once");
    let unused = chunk(&mut table, blob, 30, &[3u8; 7]);
    assert_eq!(unused, 2);

    let mut tree = Tree::default();
    let etc = tree.add(Node {
        kind: NodeKind::Dir(BTreeMap::new()),
        meta: meta(0o755),
    });
    tree.link(Tree::ROOT, b"etc", etc);
    let mut file_meta = meta(0o4755);
    file_meta
        .xattrs
        .insert(b"security.capability".to_vec(), vec![1, 0, 0, 2]);
    let file = tree.add(Node {
        kind: NodeKind::File {
            size: 400,
            pieces: vec![
                FilePiece {
                    offset: 0,
                    chunk: a,
                },
                FilePiece {
                    offset: 300,
                    chunk: b,
                },
            ],
        },
        meta: file_meta,
    });
    tree.link(etc, b"passwd", file);
    tree.link(Tree::ROOT, b"hardlink", file);
    let link = tree.add(Node {
        kind: NodeKind::Symlink(b"etc/passwd".to_vec()),
        meta: meta(0o777),
    });
    tree.link(Tree::ROOT, b"link", link);
    let dev = tree.add(Node {
        kind: NodeKind::CharDevice { major: 1, minor: 3 },
        meta: meta(0o666),
    });
    tree.link(etc, b"null", dev);
    let fifo = tree.add(Node {
        kind: NodeKind::Fifo,
        meta: meta(0o600),
    });
    tree.link(etc, b"\xff\xfe-not-utf8", fifo);
    let empty = tree.add(Node {
        kind: NodeKind::File {
            size: 0,
            pieces: vec![],
        },
        meta: meta(0o644),
    });
    tree.link(Tree::ROOT, b"empty", empty);
    // An orphan: not reachable, so not encoded.
    tree.add(Node {
        kind: NodeKind::Fifo,
        meta: meta(0),
    });
    (tree, table)
}

fn encoded() -> (Index, Vec<u8>) {
    let (tree, table) = sample();
    let enc = tree.encode(&table, Chunking::default()).unwrap();
    (
        Index::decode_verified(&enc.compressed, &enc.digest).unwrap(),
        enc.compressed,
    )
}

#[test]
fn round_trip_keeps_every_attribute() {
    let (index, _) = encoded();
    assert_eq!(index.inode_count(), 7);
    assert_eq!(index.chunk_count(), 2, "unused chunks are dropped");
    let root: Vec<_> = index.dir_entries(0).map(|(n, _)| n.to_vec()).collect();
    assert_eq!(
        root,
        vec![
            b"empty".to_vec(),
            b"etc".to_vec(),
            b"hardlink".to_vec(),
            b"link".to_vec()
        ]
    );

    let passwd = index.resolve(b"/etc/passwd").unwrap();
    assert_eq!(index.resolve(b"hardlink"), Some(passwd));
    let inode = index.inode(passwd).unwrap();
    assert_eq!(inode.kind, FileKind::File);
    assert_eq!(inode.mode, 0o104755);
    assert_eq!(
        (inode.uid, inode.gid, inode.nlink, inode.size),
        (1000, 100, 2, 400)
    );
    assert_eq!((inode.mtime_sec, inode.mtime_nsec), (1_700_000_000, 5));
    assert_eq!(
        index.xattr(passwd, b"security.capability"),
        Some(&[1u8, 0, 0, 2][..])
    );

    let etc = index.resolve(b"etc").unwrap();
    assert_eq!(index.inode(etc).unwrap().nlink, 2);
    assert_eq!(index.inode(0).unwrap().nlink, 3);
    assert_eq!(index.inode(passwd).unwrap().parent, etc);

    let link = index.resolve(b"link").unwrap();
    assert_eq!(index.symlink_target(link), Some(&b"etc/passwd"[..]));
    let null = index.inode(index.resolve(b"etc/null").unwrap()).unwrap();
    assert_eq!(
        (null.kind, null.rdev_major, null.rdev_minor),
        (FileKind::CharDevice, 1, 3)
    );
    assert!(index.resolve(b"etc/\xff\xfe-not-utf8").is_some());
    assert_eq!(index.lookup(etc, b"missing"), None);
    assert_eq!(index.path_of(passwd), b"/etc/passwd".to_vec());
}

#[test]
fn chunks_covering_finds_pieces_and_skips_holes() {
    let (index, _) = encoded();
    let passwd = index.resolve(b"etc/passwd").unwrap();
    let offsets = |r: std::ops::Range<u64>| -> Vec<u64> {
        index
            .chunks_covering(passwd, r)
            .map(|c| c.file_offset)
            .collect()
    };
    assert_eq!(offsets(0..400), vec![0, 300]);
    assert_eq!(offsets(99..101), vec![0]);
    assert_eq!(offsets(100..300), Vec::<u64>::new(), "a hole has no chunks");
    assert_eq!(offsets(349..351), vec![300]);
    assert_eq!(offsets(350..400), Vec::<u64>::new(), "the tail is a hole");
    assert_eq!(offsets(400..500), Vec::<u64>::new());
    let c = index.chunks_covering(passwd, 300..301).next().unwrap();
    let loc = index.chunk(c.chunk).unwrap();
    assert_eq!(loc.digest, Digest::of(&[2u8; 50]));
    assert_eq!(loc.uncompressed_len, 50);
}

#[test]
fn encoding_is_reproducible() {
    let (a, _) = encoded();
    let (tree, table) = sample();
    let b = tree.encode(&table, Chunking::default()).unwrap();
    assert_eq!(Digest::of(&encoded().1), b.digest);
    assert_eq!(a.summary().regular_files, 2);
}

#[test]
fn a_wrong_digest_is_refused() {
    let (_, bytes) = encoded();
    let err = Index::decode_verified(&bytes, &Digest::of(b"other")).unwrap_err();
    assert!(err.to_string().contains("index digest mismatch"), "{err}");
}

#[test]
fn truncated_and_garbage_input_is_an_error() {
    let (tree, table) = sample();
    let raw = tree.encode_raw(&table, Chunking::default()).unwrap();
    for cut in 0..raw.len() {
        assert!(
            Index::from_raw(raw[..cut].to_vec()).is_err(),
            "truncated at {cut}"
        );
    }
    assert!(Index::decode(b"not zstd at all").is_err());
    let mut bad_magic = raw.clone();
    bad_magic[0] = b'X';
    assert!(
        Index::from_raw(bad_magic)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
}

#[test]
fn every_single_byte_corruption_is_either_caught_or_harmless() {
    let (tree, table) = sample();
    let raw = tree.encode_raw(&table, Chunking::default()).unwrap();
    for pos in 0..raw.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bytes = raw.clone();
            bytes[pos] ^= flip;
            if let Ok(index) = Index::from_raw(bytes) {
                // Whatever survives validation must be safe to walk.
                walk(&index);
            }
        }
    }
}

fn walk(index: &Index) {
    let mut stack = vec![0u32];
    let mut visited = 0;
    while let Some(dir) = stack.pop() {
        visited += 1;
        assert!(
            visited <= index.inode_count(),
            "walk visits a directory twice"
        );
        for (name, child) in index.dir_entries(dir) {
            assert_eq!(index.lookup(dir, name), Some(child));
            let inode = index.inode(child).unwrap();
            let _ = index.xattrs(child).count();
            let _ = index.symlink_target(child);
            for piece in index.chunks_covering(child, 0..inode.size) {
                assert!(index.chunk(piece.chunk).is_some());
            }
            if inode.kind == FileKind::Dir {
                stack.push(child);
            }
        }
    }
}

#[test]
fn a_directory_linked_twice_cannot_be_encoded() {
    let mut tree = Tree::default();
    let dir = tree.add(Node {
        kind: NodeKind::Dir(BTreeMap::new()),
        meta: meta(0o755),
    });
    tree.link(Tree::ROOT, b"a", dir);
    tree.link(Tree::ROOT, b"b", dir);
    assert!(
        tree.encode(&ChunkTable::default(), Chunking::default())
            .is_err()
    );
}

/// Byte offset of inode `ino`'s record and of the fileref section in a raw index.
fn raw_offsets(raw: &[u8], ino: u32) -> (usize, usize) {
    use stoker_format::layout::{self, header};
    let count = |off: usize| u32::from_le_bytes(raw[off..off + 4].try_into().unwrap()) as usize;
    let inodes = layout::HEADER_SIZE
        + count(header::BLOBS) * layout::BLOB_SIZE
        + count(header::CHUNKS) * layout::CHUNK_SIZE;
    let filerefs = inodes
        + count(header::INODES) * layout::INODE_SIZE
        + count(header::DIRENTS) * layout::DIRENT_SIZE;
    (inodes + ino as usize * layout::INODE_SIZE, filerefs)
}

/// Found while writing the index_decode fuzz target: a chunk whose file offset
/// plus length overflows u64 passed the "ends within the file" check by
/// wrapping around (and panicked where overflow checks are on).
#[test]
fn a_chunk_offset_that_overflows_is_refused() {
    let (tree, table) = sample();
    let raw = tree.encode_raw(&table, Chunking::default()).unwrap();
    let index = Index::from_raw(raw.clone()).unwrap();
    let passwd = index.resolve(b"etc/passwd").unwrap();
    let first = index.file_chunks(passwd).next().unwrap();
    assert_eq!(first.file_offset, 0);
    let (record, filerefs) = raw_offsets(&raw, passwd);
    let start = u32::from_le_bytes(raw[record + 48..record + 52].try_into().unwrap()) as usize;
    // The second piece (50 bytes at 300) moves to u64::MAX - 10: its end wraps to 39.
    let offset_field = filerefs + (start + 1) * 12 + 4;
    let mut bad = raw.clone();
    bad[offset_field..offset_field + 8].copy_from_slice(&(u64::MAX - 10).to_le_bytes());
    let err = Index::from_raw(bad).unwrap_err().to_string();
    assert!(err.contains("run past its size"), "{err}");
}

/// Inodes may not share dirent, fileref or xattr records: with sharing, a small
/// index (N inodes all naming the same M records) made validation take N × M
/// steps, seconds of CPU for an 11 KB blob.
#[test]
fn inodes_sharing_records_are_refused() {
    let (tree, table) = sample();
    let raw = tree.encode_raw(&table, Chunking::default()).unwrap();
    let index = Index::from_raw(raw.clone()).unwrap();
    let passwd = index.resolve(b"etc/passwd").unwrap();
    let empty = index.resolve(b"empty").unwrap();
    let (passwd_record, _) = raw_offsets(&raw, passwd);
    let (empty_record, _) = raw_offsets(&raw, empty);

    // `empty` claims passwd's chunks (and its size, so they fit).
    let mut shared_chunks = raw.clone();
    for (from, len) in [(36, 8), (48, 8)] {
        let field = raw[passwd_record + from..passwd_record + from + len].to_vec();
        shared_chunks[empty_record + from..empty_record + from + len].copy_from_slice(&field);
    }
    let err = Index::from_raw(shared_chunks).unwrap_err().to_string();
    assert!(err.contains("do not follow"), "{err}");

    // `empty` claims passwd's xattrs.
    let mut shared_xattrs = raw.clone();
    let field = raw[passwd_record + 56..passwd_record + 64].to_vec();
    shared_xattrs[empty_record + 56..empty_record + 64].copy_from_slice(&field);
    let err = Index::from_raw(shared_xattrs).unwrap_err().to_string();
    assert!(err.contains("do not follow"), "{err}");
}

/// Found by fuzzing with a malloc limit: a 10-byte zstd frame whose header asks
/// for a 128 MiB window made the decoder allocate 128 MiB before reading any data.
#[test]
fn a_frame_asking_for_a_huge_window_is_refused() {
    // Magic, no content size, window 2^27, one raw block holding "A".
    let blob = [0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x88, 0x09, 0x00, 0x00, b'A'];
    let err = Index::decode(&blob).unwrap_err().to_string();
    assert!(err.contains("not valid zstd"), "{err}");
    assert!(!err.contains("magic"), "the frame was decoded: {err}");
}

/// Found by the index_decode fuzz target under a 64 MB malloc limit: a 12-byte
/// frame in zstd's legacy v0.6 format, whose decoder ignores the window limit,
/// made it allocate past the limit. Legacy frames are not zstd as Stoker writes
/// it (the `legacy` feature is off): refused like any other bad blob.
#[test]
fn a_legacy_zstd_frame_is_refused() {
    let blob = [38, 181, 47, 253, 30, 0, 0, 92, 1, 0, 36, 46];
    let err = Index::decode(&blob).unwrap_err().to_string();
    assert!(err.contains("not valid zstd"), "{err}");
}

/// The window cap still lets through indexes compressed as a stream, without
/// their size in the frame header (as `zstd` does from a pipe).
#[test]
fn an_index_compressed_without_a_known_size_decodes() {
    use std::io::Write;
    let (tree, table) = sample();
    let raw = tree.encode_raw(&table, Chunking::default()).unwrap();
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
    encoder.write_all(&raw).unwrap();
    let streamed = encoder.finish().unwrap();
    assert_eq!(Index::decode(&streamed).unwrap().inode_count(), 7);
}

/// Found by the index_decode fuzz target: file sizes that add up past u64
/// made `summary` overflow (a panic where overflow checks are on).
#[test]
fn summary_of_huge_files_saturates() {
    let mut tree = Tree::default();
    for (name, size) in [(&b"a"[..], u64::MAX), (b"b", 10)] {
        let file = tree.add(Node {
            kind: NodeKind::File {
                size,
                pieces: vec![],
            },
            meta: meta(0o644),
        });
        tree.link(Tree::ROOT, name, file);
    }
    let mut table = ChunkTable::default();
    for size in [u64::MAX, 10] {
        table.add_blob(BlobInfo {
            digest: Digest::of(&size.to_le_bytes()),
            size,
        });
    }
    let encoded = tree.encode(&table, Chunking::default()).unwrap();
    let summary = Index::decode(&encoded.compressed).unwrap().summary();
    assert_eq!(summary.file_bytes, u64::MAX);
    assert_eq!(summary.blob_bytes, u64::MAX);
}
