//! Packing file contents into data blobs: chunks are hashed, deduplicated and
//! zstd-compressed on all cores, then appended in order to the current blob.
//!
//! The packer runs on its own thread, fed through a bounded channel, so that
//! reading and decompressing the source layer overlaps with hashing and
//! compressing. Output order depends only on input order: conversion is
//! reproducible.

use std::cell::RefCell;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rayon::prelude::*;
use stoker_format::{BlobInfo, ChunkRecord, ChunkTable, Digest, FilePiece, Hasher, NodeId};

use crate::ConvertError;

/// Chunks are handed to the cores in batches of about this many bytes.
const BATCH_BYTES: usize = 32 << 20;

/// A blob written to the staging directory, ready to upload.
#[derive(Clone, Debug)]
pub struct StagedBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// Counts for the conversion summary.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PackStats {
    /// Chunks cut from file contents, duplicates and zero chunks included.
    pub chunks_seen: u64,
    /// Bytes of file content seen.
    pub bytes_seen: u64,
    /// Chunks and bytes that were already stored and were not stored again.
    pub duplicate_chunks: u64,
    pub duplicate_bytes: u64,
    /// Bytes of all-zero chunks, stored as holes.
    pub zero_bytes: u64,
}

/// What the packer produced once every layer is done.
pub struct Packed {
    pub table: ChunkTable,
    pub pieces: Vec<(NodeId, FilePiece)>,
    pub stats: PackStats,
}

enum Message {
    Chunk {
        node: NodeId,
        offset: u64,
        data: Vec<u8>,
    },
    EndLayer,
}

/// The sending side, used by the layer reader.
pub struct PackerHandle {
    sender: SyncSender<Message>,
    thread: JoinHandle<Result<Packed, ConvertError>>,
}

impl PackerHandle {
    /// Starts the packer thread. Each finished blob is passed to `on_blob`.
    pub fn start(
        staging_dir: &Path,
        zstd_level: i32,
        known_chunks: ChunkTable,
        on_blob: impl FnMut(StagedBlob) + Send + 'static,
    ) -> Result<PackerHandle, ConvertError> {
        let (sender, receiver) = sync_channel(1024);
        let staging_dir = staging_dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("stoker-pack".into())
            .spawn(move || run(receiver, staging_dir, zstd_level, known_chunks, on_blob))
            .map_err(|e| ConvertError::Internal(format!("cannot start the packer thread: {e}")))?;
        Ok(PackerHandle { sender, thread })
    }

    /// Queues one chunk of file `node` at `offset`.
    pub fn chunk(&self, node: NodeId, offset: u64, data: Vec<u8>) -> Result<(), ConvertError> {
        self.sender
            .send(Message::Chunk { node, offset, data })
            .map_err(|_| ConvertError::Internal("packer stopped early".into()))
    }

    /// Ends the current blob (one per source layer).
    pub fn end_layer(&self) -> Result<(), ConvertError> {
        self.sender
            .send(Message::EndLayer)
            .map_err(|_| ConvertError::Internal("packer stopped early".into()))
    }

    pub fn finish(self) -> Result<Packed, ConvertError> {
        drop(self.sender);
        self.thread
            .join()
            .map_err(|_| ConvertError::Internal("packer thread panicked".into()))?
    }
}

struct Pending {
    node: NodeId,
    offset: u64,
    data: Vec<u8>,
}

struct BlobWriter {
    path: PathBuf,
    out: BufWriter<File>,
    hasher: Hasher,
    size: u64,
}

struct Packer {
    staging_dir: PathBuf,
    zstd_level: i32,
    table: ChunkTable,
    pieces: Vec<(NodeId, FilePiece)>,
    stats: PackStats,
    batch: Vec<Pending>,
    batch_bytes: usize,
    blob: Option<BlobWriter>,
    blobs_written: usize,
}

fn run(
    receiver: Receiver<Message>,
    staging_dir: PathBuf,
    zstd_level: i32,
    known_chunks: ChunkTable,
    mut on_blob: impl FnMut(StagedBlob),
) -> Result<Packed, ConvertError> {
    let mut packer = Packer {
        staging_dir,
        zstd_level,
        table: known_chunks,
        pieces: Vec::new(),
        stats: PackStats::default(),
        batch: Vec::new(),
        batch_bytes: 0,
        blob: None,
        blobs_written: 0,
    };
    for message in receiver {
        match message {
            Message::Chunk { node, offset, data } => {
                packer.batch_bytes += data.len();
                packer.batch.push(Pending { node, offset, data });
                if packer.batch_bytes >= BATCH_BYTES {
                    packer.flush()?;
                }
            }
            Message::EndLayer => {
                packer.flush()?;
                if let Some(blob) = packer.end_blob()? {
                    on_blob(blob);
                }
            }
        }
    }
    packer.flush()?;
    if let Some(blob) = packer.end_blob()? {
        on_blob(blob);
    }
    Ok(Packed {
        table: packer.table,
        pieces: packer.pieces,
        stats: packer.stats,
    })
}

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
}

fn compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        match slot.as_mut() {
            Some((_, compressor)) => compressor.compress(data),
            None => zstd::bulk::compress(data, level),
        }
    })
}

impl Packer {
    /// Hashes the batch in parallel, drops zero and duplicate chunks, compresses
    /// the new ones in parallel, and appends them in input order.
    fn flush(&mut self) -> Result<(), ConvertError> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if batch.is_empty() {
            return Ok(());
        }
        let digests: Vec<Option<Digest>> = batch
            .par_iter()
            .map(|p| (!p.data.iter().all(|&b| b == 0)).then(|| Digest::of(&p.data)))
            .collect();

        // Decide, in order, which chunks are new. A chunk repeated inside the
        // batch is new only the first time.
        let mut new_in_batch = std::collections::HashSet::new();
        let is_new: Vec<bool> = digests
            .iter()
            .map(|d| match d {
                Some(d) => self.table.find(d).is_none() && new_in_batch.insert(*d),
                None => false,
            })
            .collect();
        let level = self.zstd_level;
        let compressed: Vec<Option<Vec<u8>>> = batch
            .par_iter()
            .zip(is_new.par_iter())
            .map(|(p, &new)| {
                if new {
                    compress(&p.data, level).map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect::<std::io::Result<_>>()
            .map_err(|e| ConvertError::Internal(format!("zstd: {e}")))?;

        for ((pending, digest), frame) in batch.iter().zip(digests).zip(compressed) {
            let len = pending.data.len() as u64;
            self.stats.chunks_seen += 1;
            self.stats.bytes_seen += len;
            let Some(digest) = digest else {
                self.stats.zero_bytes += len;
                continue;
            };
            let chunk = match frame {
                Some(frame) => self.append(digest, pending.data.len() as u32, &frame)?,
                None => {
                    self.stats.duplicate_chunks += 1;
                    self.stats.duplicate_bytes += len;
                    self.table.find(&digest).ok_or_else(|| {
                        ConvertError::Internal("deduplicated chunk vanished".into())
                    })?
                }
            };
            self.pieces.push((
                pending.node,
                FilePiece {
                    offset: pending.offset,
                    chunk,
                },
            ));
        }
        Ok(())
    }

    fn append(
        &mut self,
        digest: Digest,
        uncompressed_len: u32,
        frame: &[u8],
    ) -> Result<u32, ConvertError> {
        if self.blob.is_none() {
            let path = self
                .staging_dir
                .join(format!("blob-{}.partial", self.blobs_written));
            let file = File::create(&path).map_err(|e| ConvertError::io(&path, e))?;
            self.blob = Some(BlobWriter {
                path,
                out: BufWriter::with_capacity(1 << 20, file),
                hasher: Hasher::new(),
                size: 0,
            });
        }
        let blob_index = self.table.blobs.len() as u32;
        let Some(blob) = self.blob.as_mut() else {
            return Err(ConvertError::Internal("no open blob".into()));
        };
        blob.out
            .write_all(frame)
            .map_err(|e| ConvertError::io(&blob.path, e))?;
        blob.hasher.update(frame);
        let offset = blob.size;
        blob.size += frame.len() as u64;
        Ok(self.table.insert(ChunkRecord {
            digest,
            blob: blob_index,
            compressed_offset: offset,
            compressed_len: frame.len() as u32,
            uncompressed_len,
        }))
    }

    /// Closes the current blob and records it in the table.
    fn end_blob(&mut self) -> Result<Option<StagedBlob>, ConvertError> {
        let Some(mut blob) = self.blob.take() else {
            return Ok(None);
        };
        blob.out
            .flush()
            .map_err(|e| ConvertError::io(&blob.path, e))?;
        let digest = blob.hasher.finish();
        let path = self.staging_dir.join(digest.hex());
        std::fs::rename(&blob.path, &path).map_err(|e| ConvertError::io(&path, e))?;
        let index = self.table.add_blob(BlobInfo {
            digest,
            size: blob.size,
        });
        debug_assert_eq!(index as usize, self.table.blobs.len() - 1);
        self.blobs_written += 1;
        Ok(Some(StagedBlob {
            path,
            digest,
            size: blob.size,
        }))
    }
}
