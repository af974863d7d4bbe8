//! Mounts a small in-memory image, reads it through the kernel, prints the
//! filesystem's counters and unmounts.
//!
//! ```text
//! sudo cargo run -p stoker-lazyfs --example mount -- /mnt/demo          # mount, read, unmount
//! sudo cargo run -p stoker-lazyfs --example mount -- /mnt/demo --wait   # ... and wait for Enter first
//! ```
//!
//! The image's one data blob lives in memory here; the agent uses
//! `stoker_fetch::RegistrySource` to read blobs from a registry instead.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use stoker_cache::ChunkCache;
use stoker_fetch::{BlobSource, FetchConfig, FetchSourceError, Fetcher};
use stoker_format::{
    BlobInfo, ChunkRecord, ChunkTable, Chunking, Digest, FilePiece, Index, Meta, Node, NodeKind,
    Tree,
};
use stoker_lazyfs::MountOptions;

/// Serves one blob from memory.
struct MemoryBlob {
    digest: Digest,
    bytes: Bytes,
}

impl BlobSource for MemoryBlob {
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        Box::pin(async move {
            if *blob != self.digest || range.end > self.bytes.len() as u64 {
                return Err(FetchSourceError::new("no such blob range", false));
            }
            Ok(self.bytes.slice(range.start as usize..range.end as usize))
        })
    }
}

/// An index with `/hello.txt` and `/bin/tool` (two chunks), and its data blob.
fn demo_image() -> Result<(Index, MemoryBlob), Box<dyn std::error::Error>> {
    let meta = |permissions| Meta {
        permissions,
        uid: 0,
        gid: 0,
        mtime_sec: 1_700_000_000,
        mtime_nsec: 0,
        xattrs: BTreeMap::new(),
    };
    let mut table = ChunkTable::default();
    let mut blob = Vec::new();
    let mut chunk = |bytes: &[u8]| -> Result<u32, std::io::Error> {
        let compressed = zstd::bulk::compress(bytes, 3)?;
        let id = table.insert(ChunkRecord {
            digest: Digest::of(bytes),
            blob: 0,
            compressed_offset: blob.len() as u64,
            compressed_len: compressed.len() as u32,
            uncompressed_len: bytes.len() as u32,
        });
        blob.extend_from_slice(&compressed);
        Ok(id)
    };
    let hello = b"hello from a lazily fetched, verified chunk\n";
    let part = vec![b'x'; 1 << 20];
    let (c0, c1, c2) = (chunk(hello)?, chunk(&part)?, chunk(b"tail")?);

    let mut tree = Tree::default();
    let file = tree.add(Node {
        kind: NodeKind::File {
            size: hello.len() as u64,
            pieces: vec![FilePiece {
                offset: 0,
                chunk: c0,
            }],
        },
        meta: meta(0o644),
    });
    tree.link(Tree::ROOT, b"hello.txt", file);
    let bin = tree.add(Node {
        kind: NodeKind::Dir(BTreeMap::new()),
        meta: meta(0o755),
    });
    tree.link(Tree::ROOT, b"bin", bin);
    let tool = tree.add(Node {
        kind: NodeKind::File {
            size: (1 << 20) + 4,
            pieces: vec![
                FilePiece {
                    offset: 0,
                    chunk: c1,
                },
                FilePiece {
                    offset: 1 << 20,
                    chunk: c2,
                },
            ],
        },
        meta: meta(0o755),
    });
    tree.link(bin, b"tool", tool);

    let blob = Bytes::from(blob);
    let digest = Digest::of(&blob);
    table.add_blob(BlobInfo {
        digest,
        size: blob.len() as u64,
    });
    let encoded = tree.encode(&table, Chunking::default())?;
    let index = Index::decode_verified(&encoded.compressed, &encoded.digest)?;
    Ok((
        index,
        MemoryBlob {
            digest,
            bytes: blob,
        },
    ))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut args = std::env::args().skip(1);
    let mountpoint = PathBuf::from(args.next().ok_or("usage: mount MOUNTPOINT [--wait]")?);
    let wait = args.next().as_deref() == Some("--wait");

    let (index, source) = demo_image()?;
    let cache_dir = tempfile::tempdir()?;
    let cache = ChunkCache::open(cache_dir.path(), 256 << 20)?;
    let fetcher = Fetcher::new(Arc::new(source), cache, FetchConfig::default());
    std::fs::create_dir_all(&mountpoint)?;
    let mount = stoker_lazyfs::mount(
        Arc::new(index),
        fetcher,
        &mountpoint,
        MountOptions::default(),
    )?;

    for entry in std::fs::read_dir(&mountpoint)? {
        let entry = entry?;
        println!("{:?} {:?}", entry.file_name(), entry.metadata()?.len());
    }
    print!("{}", std::fs::read_to_string(mountpoint.join("hello.txt"))?);
    let tool = std::fs::read(mountpoint.join("bin/tool"))?;
    println!(
        "bin/tool: {} bytes, ends with {:?}",
        tool.len(),
        &tool[tool.len() - 4..]
    );
    println!("{:#?}", mount.counters());

    if wait {
        println!(
            "mounted at {}; press Enter to unmount",
            mountpoint.display()
        );
        std::io::stdin().read_line(&mut String::new())?;
    }
    mount.unmount()?;
    Ok(())
}
