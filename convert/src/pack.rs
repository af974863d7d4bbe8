//! Packing file contents into data blobs: chunks are hashed, deduplicated and
//! zstd-compressed on all cores, then appended in order to the current blob.
//!
//! The packer runs on its own thread, fed through a bounded channel, so that
//! reading and decompressing the source layer overlaps with hashing and
//! compressing. Output order depends only on input order (and the hot list):
//! conversion is reproducible.
//!
//! **Trace-ordered layout.** Given a hot list (the chunk digests of a prefetch
//! plan, in plan order), the packer reserves blob 0 for the *hot blob*: new chunks
//! on the list go to a side file instead of their layer's blob, and when every
//! layer is done the hot blob is written from it in list order. The plan's chunks
//! then lie back to back at the front of one blob, so warming them takes a few
//! large ranged requests.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
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
    /// With a non-empty `hot` list (distinct chunk digests, in plan order), blob 0
    /// of the table is the hot blob holding exactly those chunks, in that order;
    /// every digest on the list must turn up in the image.
    pub fn start(
        staging_dir: &Path,
        zstd_level: i32,
        known_chunks: ChunkTable,
        hot: Vec<Digest>,
        on_blob: impl FnMut(StagedBlob) + Send + 'static,
    ) -> Result<PackerHandle, ConvertError> {
        let (sender, receiver) = sync_channel(1024);
        let staging_dir = staging_dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("stoker-pack".into())
            .spawn(move || {
                run(
                    receiver,
                    staging_dir,
                    zstd_level,
                    known_chunks,
                    hot,
                    on_blob,
                )
            })
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

impl BlobWriter {
    fn create(path: PathBuf) -> Result<BlobWriter, ConvertError> {
        let file = File::create(&path).map_err(|e| ConvertError::io(&path, e))?;
        Ok(BlobWriter {
            path,
            out: BufWriter::with_capacity(1 << 20, file),
            hasher: Hasher::new(),
            size: 0,
        })
    }

    /// Appends a frame; returns its offset.
    fn write(&mut self, frame: &[u8]) -> Result<u64, ConvertError> {
        self.out
            .write_all(frame)
            .map_err(|e| ConvertError::io(&self.path, e))?;
        self.hasher.update(frame);
        let offset = self.size;
        self.size += frame.len() as u64;
        Ok(offset)
    }

    /// Flushes and renames the file to its digest.
    fn finish(mut self, staging_dir: &Path) -> Result<StagedBlob, ConvertError> {
        self.out
            .flush()
            .map_err(|e| ConvertError::io(&self.path, e))?;
        let digest = self.hasher.finish();
        let path = staging_dir.join(digest.hex());
        std::fs::rename(&self.path, &path).map_err(|e| ConvertError::io(&path, e))?;
        Ok(StagedBlob {
            path,
            digest,
            size: self.size,
        })
    }
}

/// The hot blob in the making: hot frames wait in a side file, in the order they
/// were met, until every layer is done.
struct HotBlob {
    /// Position in the blob table reserved for the hot blob.
    blob_index: u32,
    /// Plan rank of each hot digest.
    rank: HashMap<Digest, usize>,
    digests: Vec<Digest>,
    side: BlobWriter,
    /// By rank: (offset in the side file, frame length, chunk id) once met.
    frames: Vec<Option<(u64, u32, u32)>>,
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
    hot: Option<HotBlob>,
}

fn run(
    receiver: Receiver<Message>,
    staging_dir: PathBuf,
    zstd_level: i32,
    mut known_chunks: ChunkTable,
    hot: Vec<Digest>,
    mut on_blob: impl FnMut(StagedBlob),
) -> Result<Packed, ConvertError> {
    let hot = if hot.is_empty() {
        None
    } else {
        // Filled in by `finish_hot` once its bytes are known.
        let blob_index = known_chunks.add_blob(BlobInfo {
            digest: Digest([0; 32]),
            size: 0,
        });
        Some(HotBlob {
            blob_index,
            rank: hot.iter().enumerate().map(|(i, d)| (*d, i)).collect(),
            frames: vec![None; hot.len()],
            digests: hot,
            side: BlobWriter::create(staging_dir.join("hot-frames.partial"))?,
        })
    };
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
        hot,
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
    if let Some(blob) = packer.finish_hot()? {
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
        if let Some(hot) = self.hot.as_mut()
            && let Some(&rank) = hot.rank.get(&digest)
        {
            // Its offset in the hot blob is set by `finish_hot`.
            let side_offset = hot.side.write(frame)?;
            let id = self.table.insert(ChunkRecord {
                digest,
                blob: hot.blob_index,
                compressed_offset: 0,
                compressed_len: frame.len() as u32,
                uncompressed_len,
            });
            hot.frames[rank] = Some((side_offset, frame.len() as u32, id));
            return Ok(id);
        }
        if self.blob.is_none() {
            let path = self
                .staging_dir
                .join(format!("blob-{}.partial", self.blobs_written));
            self.blob = Some(BlobWriter::create(path)?);
        }
        let blob_index = self.table.blobs.len() as u32;
        let Some(blob) = self.blob.as_mut() else {
            return Err(ConvertError::Internal("no open blob".into()));
        };
        let offset = blob.write(frame)?;
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
        let Some(blob) = self.blob.take() else {
            return Ok(None);
        };
        let staged = blob.finish(&self.staging_dir)?;
        let index = self.table.add_blob(BlobInfo {
            digest: staged.digest,
            size: staged.size,
        });
        debug_assert_eq!(index as usize, self.table.blobs.len() - 1);
        self.blobs_written += 1;
        Ok(Some(staged))
    }

    /// Writes the hot blob from the side file in plan order, and fixes the hot
    /// chunks' offsets and the reserved blob record.
    fn finish_hot(&mut self) -> Result<Option<StagedBlob>, ConvertError> {
        let Some(hot) = self.hot.take() else {
            return Ok(None);
        };
        let missing: Vec<&Digest> = hot
            .frames
            .iter()
            .zip(&hot.digests)
            .filter(|(frame, _)| frame.is_none())
            .map(|(_, digest)| digest)
            .collect();
        if let Some(first) = missing.first() {
            return Err(ConvertError::Plan(format!(
                "{} of the plan's {} chunks are not in this image (first: {first}); \
                 was the plan made for another image or chunking?",
                missing.len(),
                hot.digests.len()
            )));
        }
        let mut side = hot.side;
        side.out
            .flush()
            .map_err(|e| ConvertError::io(&side.path, e))?;
        let mut side_file = File::open(&side.path).map_err(|e| ConvertError::io(&side.path, e))?;
        let mut out = BlobWriter::create(self.staging_dir.join("hot.partial"))?;
        let mut frame = Vec::new();
        for (side_offset, len, id) in hot.frames.into_iter().flatten() {
            frame.resize(len as usize, 0);
            side_file
                .seek(SeekFrom::Start(side_offset))
                .and_then(|_| side_file.read_exact(&mut frame))
                .map_err(|e| ConvertError::io(&side.path, e))?;
            let offset = out.write(&frame)?;
            let record = self
                .table
                .chunks
                .get_mut(id as usize)
                .ok_or_else(|| ConvertError::Internal(format!("hot chunk {id} vanished")))?;
            record.compressed_offset = offset;
        }
        drop(side_file);
        drop(side.out);
        let _ = std::fs::remove_file(&side.path);
        let staged = out.finish(&self.staging_dir)?;
        let slot = self
            .table
            .blobs
            .get_mut(hot.blob_index as usize)
            .ok_or_else(|| ConvertError::Internal("hot blob slot vanished".into()))?;
        *slot = BlobInfo {
            digest: staged.digest,
            size: staged.size,
        };
        Ok(Some(staged))
    }
}
