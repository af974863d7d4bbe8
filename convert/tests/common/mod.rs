//! Shared helpers for the converter's tests: a registry with a pushed image,
//! and a [`TreeSnapshot`] built from a Stoker index by decoding its chunks.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use sha2::{Digest as _, Sha256};
use stoker_convert::ImageStore;
use stoker_format::{Digest, FileKind, Index};
use stoker_registry::{RegistryClient, RegistryConfig};
use stoker_testkit::tree::{self, EntrySnapshot, TreeSnapshot};

/// A client for a loopback test registry: plain HTTP, no credentials.
pub fn plain_client() -> RegistryClient {
    stoker_registry::install_crypto_provider();
    RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })
    .expect("client")
}

/// True when the tools the registry tests need are here; prints SKIPPED otherwise.
pub fn have_registry_tools(test: &str) -> bool {
    stoker_testkit::require_tool(test, "docker-registry")
        && stoker_testkit::require_tool(test, "skopeo")
}

/// Reads every blob of the artifact into memory (test images are small).
pub async fn all_blobs(store: &ImageStore, index: &Index) -> HashMap<Digest, Vec<u8>> {
    let mut blobs = HashMap::new();
    for i in 0..index.blob_count() {
        let (digest, size) = index.blob(i).unwrap();
        let bytes = store.blob(&digest).await.expect("blob");
        assert_eq!(bytes.len() as u64, size);
        blobs.insert(digest, bytes);
    }
    blobs
}

/// Decodes one chunk from its blob and checks its digest.
pub fn chunk_bytes(index: &Index, blobs: &HashMap<Digest, Vec<u8>>, chunk: u32) -> Vec<u8> {
    let loc = index.chunk(chunk).unwrap();
    let blob = &blobs[&loc.blob];
    let frame = &blob[loc.compressed_offset as usize
        ..(loc.compressed_offset + loc.compressed_len as u64) as usize];
    let data = zstd::bulk::decompress(frame, loc.uncompressed_len as usize).expect("zstd frame");
    assert_eq!(data.len(), loc.uncompressed_len as usize);
    assert_eq!(Digest::of(&data), loc.digest, "chunk digest");
    data
}

/// The whole tree an index describes, with file contents read back from the chunks.
pub fn snapshot_of_index(index: &Index, blobs: &HashMap<Digest, Vec<u8>>) -> TreeSnapshot {
    let mut snapshot = TreeSnapshot::default();
    let mut inode_of = BTreeMap::new();
    let mut pending: Vec<(Vec<u8>, u32)> = vec![(Vec::new(), 0)];
    while let Some((dir_path, dir)) = pending.pop() {
        for (name, child) in index.dir_entries(dir) {
            let path = if dir_path.is_empty() {
                name.to_vec()
            } else {
                [dir_path.as_slice(), b"/", name].concat()
            };
            let inode = index.inode(child).unwrap();
            let kind = match inode.kind {
                FileKind::Dir => tree::FileKind::Dir,
                FileKind::File => tree::FileKind::File,
                FileKind::Symlink => tree::FileKind::Symlink,
                FileKind::CharDevice => tree::FileKind::CharDevice,
                FileKind::BlockDevice => tree::FileKind::BlockDevice,
                FileKind::Fifo => tree::FileKind::Fifo,
                FileKind::Socket => tree::FileKind::Socket,
            };
            let mut entry = EntrySnapshot {
                kind,
                mode: inode.mode & 0o7777,
                uid: inode.uid,
                gid: inode.gid,
                size: 0,
                mtime: inode.mtime_sec,
                rdev: None,
                xattrs: index
                    .xattrs(child)
                    .filter(|(n, _)| !tree::is_ignored_xattr(n))
                    .map(|(n, v)| (n.to_vec(), v.to_vec()))
                    .collect(),
                symlink_target: None,
                sha256: None,
                hardlink_group: None,
            };
            match inode.kind {
                FileKind::Dir => pending.push((path.clone(), child)),
                FileKind::File => {
                    entry.size = inode.size;
                    entry.sha256 = Some(file_sha256(index, blobs, child, inode.size));
                    if inode.nlink > 1 {
                        inode_of.insert(path.clone(), child);
                    }
                }
                FileKind::Symlink => {
                    let target = index.symlink_target(child).unwrap().to_vec();
                    entry.size = target.len() as u64;
                    entry.symlink_target = Some(target);
                }
                FileKind::CharDevice | FileKind::BlockDevice => {
                    entry.rdev = Some((inode.rdev_major, inode.rdev_minor));
                }
                _ => {
                    if inode.nlink > 1 {
                        inode_of.insert(path.clone(), child);
                    }
                }
            }
            snapshot.entries.insert(path, entry);
        }
    }
    snapshot.assign_hardlink_groups(&inode_of);
    snapshot
}

fn file_sha256(index: &Index, blobs: &HashMap<Digest, Vec<u8>>, id: u32, size: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut position = 0u64;
    let zeros = vec![0u8; 1 << 20];
    let fill_zeros = |hasher: &mut Sha256, mut n: u64| {
        while n > 0 {
            let step = n.min(zeros.len() as u64);
            hasher.update(&zeros[..step as usize]);
            n -= step;
        }
    };
    for piece in index.file_chunks(id) {
        fill_zeros(&mut hasher, piece.file_offset - position);
        hasher.update(chunk_bytes(index, blobs, piece.chunk));
        position = piece.file_offset + piece.len as u64;
    }
    fill_zeros(&mut hasher, size - position);
    hasher.finalize().into()
}

/// Pushes `tag` of the layout to the registry as `repo:tag` and returns the full reference.
pub fn push(
    layout: &Path,
    tag: &str,
    registry: &stoker_testkit::registry::TestRegistry,
    repo: &str,
) -> String {
    stoker_testkit::image::push_layout(layout, tag, &registry.host(), &format!("{repo}:{tag}"))
        .expect("skopeo push");
    format!("{}/{repo}:{tag}", registry.host())
}
