//! `publish_prebuilt`: an index built directly (not converted from layers) is
//! published as the Stoker artifact of an image, found again like a converted one,
//! and refused when a blob it lists is missing.

mod common;

use std::collections::BTreeMap;

use common::{all_blobs, chunk_bytes};
use stoker_convert::layout::OciLayout;
use stoker_convert::{ConvertError, ImageStore, find_artifact, load_index, publish_prebuilt};
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, EncodedIndex, FilePiece, Meta, Node,
    NodeKind, Tree,
};
use stoker_testkit::image::{Entry, ImageBuilder};

fn meta(permissions: u32) -> Meta {
    Meta {
        permissions,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    }
}

/// An index of one file, `hello`, whose one chunk is in the returned blob.
fn one_file_index(content: &[u8]) -> (EncodedIndex, Vec<u8>) {
    let blob = zstd::bulk::compress(content, 3).expect("zstd");
    let mut table = ChunkTable::default();
    table.add_blob(BlobInfo {
        digest: Digest::of(&blob),
        size: blob.len() as u64,
    });
    let chunk = table.insert(ChunkRecord {
        digest: Digest::of(content),
        blob: 0,
        compressed_offset: 0,
        compressed_len: blob.len() as u32,
        uncompressed_len: content.len() as u32,
    });
    let mut tree = Tree::new(meta(0o755));
    let file = tree.add(Node {
        kind: NodeKind::File {
            size: content.len() as u64,
            pieces: vec![FilePiece { offset: 0, chunk }],
        },
        meta: meta(0o644),
    });
    tree.link(Tree::ROOT, b"hello", file);
    let index = tree
        .encode(&table, Chunking::Fixed { size: 1 << 20 })
        .expect("encode");
    (index, blob)
}

#[tokio::test]
async fn a_prebuilt_index_is_found_like_a_converted_one_and_a_missing_blob_is_refused() {
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("layout");
    ImageBuilder::new()
        .layer(vec![Entry::file(
            "subject",
            "the image the artifact is for\n",
        )])
        .write_layout(&dir, "v1")
        .expect("layout");
    let store = ImageStore::Layout(OciLayout::open(&dir).expect("open layout"));
    let content = b"a file that no layer of the image holds\n";
    let (index, blob) = one_file_index(content);

    let missing = publish_prebuilt(&store, "v1", index.clone(), &[])
        .await
        .expect_err("a blob the index lists is missing");
    assert!(
        matches!(&missing, ConvertError::Source(m) if m.contains(&Digest::of(&blob).to_string())),
        "{missing}"
    );
    assert!(
        store
            .referrers(&store.manifest("v1").await.expect("manifest").digest)
            .await
            .expect("referrers")
            .is_empty(),
        "a refused publish leaves no artifact"
    );

    let report = publish_prebuilt(&store, "v1", index.clone(), std::slice::from_ref(&blob))
        .await
        .expect("publish");
    assert_eq!(report.index_digest, index.digest.to_string());
    assert_eq!(report.index_raw_bytes, index.raw_len as u64);
    let found = find_artifact(&store, "v1", None).await.expect("artifact");
    assert_eq!(found.artifact.to_string(), report.artifact);
    assert_eq!(found.index_digest, index.digest);
    assert_eq!(found.blobs, vec![(Digest::of(&blob), blob.len() as u64)]);
    let loaded = load_index(&store, &found).await.expect("index");
    let file = loaded.resolve(b"hello").expect("hello in the index");
    let chunk = loaded.file_chunks(file).next().expect("a chunk").chunk;
    let blobs = all_blobs(&store, &loaded).await;
    assert_eq!(chunk_bytes(&loaded, &blobs, chunk), content);
}
