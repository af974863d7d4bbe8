//! Writes the seed corpora under `fuzz/corpus/<target>/`: small, valid inputs
//! made by the project's own code, so the fuzzers start from real indexes,
//! plans, traces, layers and label sets. Deterministic: running it again
//! rewrites the same files.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example make_seeds

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use stoker_convert::ConvertOptions;
use stoker_convert::layer::Compression;
use stoker_convert::source::read_layer_into;
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, FilePiece, NodeId, NodeKind, Plan, Trace,
    TraceEntry, Tree,
};
use stoker_testkit::image::{self, Entry, Generator, file_capability, layer_tar};

fn main() -> io::Result<()> {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    tar_layer_seeds(&corpus.join("tar_layer"))?;
    index_seeds(&corpus.join("index_decode"))?;
    plan_seeds(&corpus.join("plan_decode"))?;
    label_seeds(&corpus.join("snapshot_labels"))?;
    println!("seeds written under {}", corpus.display());
    Ok(())
}

/// A base layer with every kind of entry and attribute the converter keeps.
fn base_layer() -> Vec<Entry> {
    vec![
        Entry::dir("etc"),
        Entry::file("etc/passwd", "root:x:0:0::/root:/bin/sh\n").owner(0, 0),
        Entry::file("etc/shadow", "root:*:19000::::::\n").mode(0o600),
        Entry::hardlink("etc/passwd.bak", "etc/passwd"),
        Entry::symlink("etc/localtime", "/usr/share/zoneinfo/UTC"),
        Entry::dir("usr/bin"),
        Entry::generated_file("usr/bin/tool", Generator::random(10_000, 1))
            .mode(0o4755)
            .xattr("security.capability", file_capability(10)),
        Entry::file(b"usr/caf\xe9", "not UTF-8\n").mtime(1_700_000_000),
        Entry::file(format!("opt/{}/deep", "d".repeat(120)), "long path\n"),
        Entry::dir("dev"),
        Entry::char_device("dev/null", 1, 3),
        Entry::block_device("dev/loop0", 7, 0),
        Entry::fifo("run/initctl"),
        Entry::file("var/empty", Vec::new()).xattr("user.note", b"\x00\xff".to_vec()),
    ]
}

/// An upper layer: whiteouts, an opaque directory, a file replaced by a
/// directory and a directory replaced by a file.
fn upper_layer() -> Vec<Entry> {
    vec![
        Entry::whiteout("etc/shadow"),
        Entry::opaque("usr/bin"),
        Entry::file("usr/bin/new", "#!/bin/sh\n").mode(0o755),
        Entry::dir("var/empty"),
        Entry::file("var/empty/now-a-dir", "x"),
        Entry::file("dev", "dev is a file now"),
        Entry::hardlink("etc/link-across", "etc/passwd"),
    ]
}

/// The first byte picks how `tar_layer` reads the rest (its `Mode`).
const TAR: u8 = 0;
const TAR_IN_GZIP: u8 = 1;
const TAR_IN_ZSTD: u8 = 2;
const RAW_GZIP: u8 = 3;
const RAW_ZSTD: u8 = 4;

fn tar_layer_seeds(dir: &Path) -> io::Result<()> {
    let base = layer_tar(&base_layer())?;
    let upper = layer_tar(&upper_layer())?;
    let seed = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    write(dir, "base.tar", &seed(TAR, &base))?;
    write(dir, "upper.tar", &seed(TAR, &upper))?;
    write(dir, "upper.tar-in-gzip", &seed(TAR_IN_GZIP, &upper))?;
    write(dir, "upper.tar-in-zstd", &seed(TAR_IN_ZSTD, &upper))?;
    let gzip = image::Compression::Gzip.compress(&base)?;
    write(dir, "base.tar.gz", &seed(RAW_GZIP, &gzip))?;
    let zstd = image::Compression::Zstd.compress(&base)?;
    write(dir, "base.tar.zst", &seed(RAW_ZSTD, &zstd))?;
    write(dir, "empty.tar", &seed(TAR, &layer_tar(&[])?))?;
    let dotdot = layer_tar(&[Entry::file("a/../../escaped", "evil")])?;
    write(dir, "dotdot.tar", &seed(TAR, &dotdot))?;
    write(dir, "truncated.tar", &seed(TAR, &base[..base.len() / 2]))?;
    Ok(())
}

/// Indexes built the way the converter builds them: layers read by
/// `read_layer_into`, chunks recorded, the tree encoded.
fn index_seeds(dir: &Path) -> io::Result<()> {
    let fixed = Chunking::Fixed { size: 4096 };
    let cdc = Chunking::Cdc { avg_size: 16 << 10 };
    for (name, layers, chunking) in [
        ("base", vec![base_layer()], fixed),
        ("two-layers", vec![base_layer(), upper_layer()], fixed),
        ("cdc", vec![base_layer()], cdc),
        ("empty", vec![], fixed),
    ] {
        let (tree, table) = convert(&layers, chunking)?;
        let encoded = tree.encode(&table, chunking).map_err(io::Error::other)?;
        let raw = tree.encode_raw(&table, chunking).map_err(io::Error::other)?;
        write(dir, &format!("{name}.index.zst"), &encoded.compressed)?;
        write(dir, &format!("{name}.index.raw"), &raw)?;
    }
    Ok(())
}

fn convert(layers: &[Vec<Entry>], chunking: Chunking) -> io::Result<(Tree, ChunkTable)> {
    let options = ConvertOptions {
        chunking,
        ..ConvertOptions::default()
    };
    let mut tree = Tree::default();
    let mut table = ChunkTable::default();
    let mut pieces: Vec<(NodeId, FilePiece)> = Vec::new();
    for (i, entries) in layers.iter().enumerate() {
        let tar = layer_tar(entries)?;
        let blob = table.add_blob(BlobInfo {
            digest: Digest::of(format!("blob {i}").as_bytes()),
            size: 0,
        });
        let mut offset_in_blob = 0u64;
        read_layer_into(
            &mut tree,
            &Digest::of(&tar),
            tar.as_slice(),
            Compression::None,
            &options,
            |node, offset, data| {
                let len = data.len() as u32;
                let compressed_len = (len / 2).max(1);
                let chunk = table.insert(ChunkRecord {
                    digest: Digest::of(&data),
                    blob,
                    compressed_offset: offset_in_blob,
                    compressed_len,
                    uncompressed_len: len,
                });
                offset_in_blob += u64::from(compressed_len);
                pieces.push((node, FilePiece { offset, chunk }));
                Ok(())
            },
        )
        .map_err(io::Error::other)?;
        table.blobs[blob as usize].size = offset_in_blob;
    }
    for (node, piece) in pieces {
        if let Some(NodeKind::File { pieces, .. }) = tree.node_mut(node).map(|n| &mut n.kind) {
            pieces.push(piece);
        }
    }
    Ok((tree, table))
}

fn plan_seeds(dir: &Path) -> io::Result<()> {
    let index_digest = Digest::of(b"seed index");
    let plan = Plan {
        index_digest,
        chunks: (0..100).chain(200..210).chain([5, 3, 70_000]).collect(),
    };
    let encoded = plan.encode().map_err(io::Error::other)?;
    write(dir, "plan.zst", &encoded)?;
    write(dir, "plan.raw", &zstd::decode_all(encoded.as_slice())?)?;
    let empty = Plan {
        index_digest,
        chunks: Vec::new(),
    };
    write(dir, "empty-plan.zst", &empty.encode().map_err(io::Error::other)?)?;

    let trace = Trace {
        index_digest: index_digest.to_string(),
        image: "registry.local/ml/app:1".into(),
        container: "k8s.io/abc123".into(),
        files: vec!["/usr/bin/python3".into(), "/opt/model/weights.bin".into()],
        entries: [(0, 0, 0), (7, 1, 0), (8, 1, 1 << 20), (3, 0, 4096)]
            .iter()
            .enumerate()
            .map(|(i, &(chunk, file, file_offset))| TraceEntry {
                chunk,
                len: 1 << 20,
                file,
                file_offset,
                micros: 1000 * i as u64,
            })
            .collect(),
        truncated: false,
    };
    let encoded = trace.encode().map_err(io::Error::other)?;
    write(dir, "trace.zst", &encoded)?;
    write(dir, "trace.json", &zstd::decode_all(encoded.as_slice())?)?;
    Ok(())
}

/// First line: a filter; then `KEY=VALUE` labels, as containerd sends them.
fn label_seeds(dir: &Path) -> io::Result<()> {
    let chain = "sha256:6b3a7d2c9e6f1a0b4c5d8e9f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3";
    let manifest = "sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let layer = "sha256:a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
    let cri = format!(
        "containerd.io/snapshot.ref={chain}\n\
         containerd.io/snapshot/cri.image-ref=registry.local:5000/ml/app:1\n\
         containerd.io/snapshot/cri.manifest-digest={manifest}\n\
         containerd.io/snapshot/cri.layer-digest={layer}\n\
         containerd.io/snapshot/cri.image-layers={layer},{manifest}\n\
         containerd.io/gc.root=2024-01-01T00:00:00Z\n"
    );
    write(
        dir,
        "cri-prepare",
        format!("labels.\"containerd.io/snapshot.ref\"=={chain},parent==\"k8s.io/3/{layer}\"\n{cri}")
            .as_bytes(),
    )?;
    write(
        dir,
        "cri-missing-ref",
        format!("kind==committed\n{}", cri.replace("containerd.io/snapshot.ref=", "x=")).as_bytes(),
    )?;
    write(
        dir,
        "quoted-filter",
        b"name!=\"a,b\",labels.\"stoker.dev/index-digest\",labels.\"q\\\"uote\"==\"v\\\\\"\n\
          stoker.dev/index-digest=sha256:00\n\
          q\"uote=v\\\n",
    )?;
    write(dir, "regex-filter", b"name~=^k8s\\.io/\nname=x\n")?;
    Ok(())
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::write(dir.join(name), bytes)
}
