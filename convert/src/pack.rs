//! Packing file contents into data blobs: chunks are hashed, deduplicated and
//! zstd-compressed on all cores, then appended in order to the current blob.
//!
//! Three stages run at once, so that decompressing the source, compressing
//! chunks and writing blobs overlap:
//! 1. the layer reader cuts a chunk and hands it to the rayon pool
//!    ([`PackerHandle::chunk`]); it blocks only when [`CHUNKS_IN_FLIGHT`]
//!    chunks wait, which bounds memory;
//! 2. a pool task hashes the chunk and, unless it is all zeros or a chunk
//!    with the same digest was already claimed, compresses it;
//! 3. the packer thread takes the results in input order, decides which
//!    chunks are new, and appends their frames to the current blob: a
//!    staging file, or an upload streamed to the registry while it is written
//!    ([`BlobSink`]).
//!
//! Output order depends only on input order (and the hot list), and a frame
//! only on its chunk's bytes and the zstd level, whichever thread compressed
//! it: conversion is reproducible.
//!
//! **Trace-ordered layout.** Given a hot list (the chunk digests of a prefetch
//! plan, in plan order), the packer reserves blob 0 for the *hot blob*: new chunks
//! on the list go to a side file instead of their layer's blob, and when every
//! layer is done the hot blob is written from it in list order. The plan's chunks
//! then lie back to back at the front of one blob, so warming them takes a few
//! large ranged requests.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use stoker_format::{BlobInfo, ChunkRecord, ChunkTable, Digest, FilePiece, Hasher, NodeId};
use tokio_util::bytes::Bytes;

use crate::ConvertError;

/// Chunks cut by the reader and not yet appended, at most. Each holds its
/// bytes (up to the largest chunk), and a few per core keep the pool busy.
pub const CHUNKS_IN_FLIGHT: usize = 64;

/// A streamed blob goes to the registry in pieces of this size (one request each).
const UPLOAD_PIECE_BYTES: usize = 4 << 20;

/// A blob written to the staging directory, ready to upload.
#[derive(Clone, Debug)]
pub struct StagedBlob {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// Where finished blobs go.
pub enum BlobSink {
    /// Each blob is written to a staging file, hashed on the way, and passed
    /// to the function once complete.
    Staged(Box<dyn FnMut(StagedBlob) -> Result<(), ConvertError> + Send>),
    /// Each blob is streamed while it is written: the function starts one
    /// upload, which hashes the bytes it sends and reports the digest.
    Streamed(Box<dyn FnMut() -> BlobUpload + Send>),
}

/// One streamed blob upload, as started by a [`BlobSink::Streamed`] function.
pub struct BlobUpload {
    /// `Some(piece)` for the blob's bytes in order, then `None` once it is
    /// complete. A channel closed before `None` means the conversion stopped:
    /// the upload must then be abandoned, never committed.
    pub pieces: tokio::sync::mpsc::Sender<Option<Bytes>>,
    /// The uploaded blob's digest and size, or why the upload failed.
    pub done: tokio::sync::oneshot::Receiver<Result<(Digest, u64), ConvertError>>,
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

/// A chunk after its pool task: digest (`None`: all zeros) and, if this task
/// claimed the digest, its zstd frame.
struct Prepared {
    data: Vec<u8>,
    digest: Option<Digest>,
    frame: Option<std::io::Result<Vec<u8>>>,
}

enum Message {
    Chunk {
        node: NodeId,
        offset: u64,
        prepared: Receiver<Prepared>,
    },
    EndLayer,
    /// Every layer was read: close the last blob and the hot blob.
    Finish,
}

/// The sending side, used by the layer reader.
pub struct PackerHandle {
    sender: SyncSender<Message>,
    thread: JoinHandle<Result<Option<Packed>, ConvertError>>,
    zstd_level: i32,
    /// Digests some pool task has compressed (or that were known), so that
    /// identical chunks are compressed once.
    claimed: Arc<Mutex<HashSet<Digest>>>,
    /// One thread per core, for this conversion's chunks.
    pool: rayon::ThreadPool,
}

impl PackerHandle {
    /// Starts the packer thread; finished blobs go to `sink`.
    /// With a non-empty `hot` list (distinct chunk digests, in plan order), blob 0
    /// of the table is the hot blob holding exactly those chunks, in that order;
    /// every digest on the list must turn up in the image.
    pub fn start(
        staging_dir: &Path,
        zstd_level: i32,
        known_chunks: ChunkTable,
        hot: Vec<Digest>,
        sink: BlobSink,
    ) -> Result<PackerHandle, ConvertError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("stoker-chunk-{i}"))
            .build()
            .map_err(|e| ConvertError::Internal(format!("cannot start the chunk pool: {e}")))?;
        let (sender, receiver) = sync_channel(CHUNKS_IN_FLIGHT);
        let claimed = Arc::new(Mutex::new(
            known_chunks.chunks.iter().map(|c| c.digest).collect(),
        ));
        let staging_dir = staging_dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("stoker-pack".into())
            .spawn(move || run(receiver, staging_dir, zstd_level, known_chunks, hot, sink))
            .map_err(|e| ConvertError::Internal(format!("cannot start the packer thread: {e}")))?;
        Ok(PackerHandle {
            sender,
            thread,
            zstd_level,
            claimed,
            pool,
        })
    }

    /// Queues one chunk of file `node` at `offset`: it is hashed and compressed
    /// on the pool at once, and appended in the order of these calls.
    pub fn chunk(&self, node: NodeId, offset: u64, data: Vec<u8>) -> Result<(), ConvertError> {
        let (result, prepared) = sync_channel(1);
        let claimed = Arc::clone(&self.claimed);
        let level = self.zstd_level;
        self.pool.spawn_fifo(move || {
            let _ = result.send(prepare(data, &claimed, level));
        });
        self.send(Message::Chunk {
            node,
            offset,
            prepared,
        })
    }

    /// Ends the current blob (one per source layer).
    pub fn end_layer(&self) -> Result<(), ConvertError> {
        self.send(Message::EndLayer)
    }

    fn send(&self, message: Message) -> Result<(), ConvertError> {
        self.sender
            .send(message)
            .map_err(|_| ConvertError::Internal("packer stopped early".into()))
    }

    /// Closes the last blob (and the hot blob) and returns what was packed.
    pub fn finish(self) -> Result<Packed, ConvertError> {
        self.send(Message::Finish)?;
        self.join()?
            .ok_or_else(|| ConvertError::Internal("packer stopped without finishing".into()))
    }

    /// Stops the packer after the reader failed with `reader_error`: the open
    /// blob is not completed, and its upload has stopped when this returns.
    /// Returns the error to report: the packer's own, if it failed first (the
    /// reader then only saw it stop), else `reader_error`.
    pub fn abort(self, reader_error: ConvertError) -> ConvertError {
        drop(self.sender);
        match self.thread.join() {
            Ok(Err(packer_error)) => packer_error,
            _ => reader_error,
        }
    }

    fn join(self) -> Result<Option<Packed>, ConvertError> {
        drop(self.sender);
        self.thread
            .join()
            .map_err(|_| ConvertError::Internal("packer thread panicked".into()))?
    }
}

/// A pool task: hash the chunk and compress it if no other task claimed its digest.
fn prepare(data: Vec<u8>, claimed: &Mutex<HashSet<Digest>>, level: i32) -> Prepared {
    if data.iter().all(|&b| b == 0) {
        return Prepared {
            data,
            digest: None,
            frame: None,
        };
    }
    let digest = Digest::of(&data);
    // A poisoned set only costs a duplicate compression.
    let first = claimed.lock().map_or(true, |mut set| set.insert(digest));
    let frame = first.then(|| compress(&data, level));
    Prepared {
        data,
        digest: Some(digest),
        frame,
    }
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

/// A staging file, hashed as it is written.
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

/// A blob streamed to an upload in [`UPLOAD_PIECE_BYTES`] pieces.
struct UploadWriter {
    pieces: tokio::sync::mpsc::Sender<Option<Bytes>>,
    done: Option<tokio::sync::oneshot::Receiver<Result<(Digest, u64), ConvertError>>>,
    piece: Vec<u8>,
    size: u64,
}

impl UploadWriter {
    fn new(upload: BlobUpload) -> UploadWriter {
        UploadWriter {
            pieces: upload.pieces,
            done: Some(upload.done),
            piece: Vec::with_capacity(UPLOAD_PIECE_BYTES),
            size: 0,
        }
    }

    /// Appends a frame; returns its offset.
    fn write(&mut self, frame: &[u8]) -> Result<u64, ConvertError> {
        let offset = self.size;
        let mut rest = frame;
        while !rest.is_empty() {
            let n = (UPLOAD_PIECE_BYTES - self.piece.len()).min(rest.len());
            self.piece.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.piece.len() == UPLOAD_PIECE_BYTES {
                self.send_piece()?;
            }
        }
        self.size += frame.len() as u64;
        Ok(offset)
    }

    fn send_piece(&mut self) -> Result<(), ConvertError> {
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(UPLOAD_PIECE_BYTES));
        if self.pieces.blocking_send(Some(piece.into())).is_err() {
            return Err(self.upload_result().err().unwrap_or_else(|| {
                ConvertError::Internal("blob upload ended before its last byte".into())
            }));
        }
        Ok(())
    }

    fn upload_result(&mut self) -> Result<(Digest, u64), ConvertError> {
        self.done
            .take()
            .ok_or_else(|| ConvertError::Internal("blob upload already finished".into()))?
            .blocking_recv()
            .map_err(|_| ConvertError::Internal("blob upload stopped".into()))?
    }

    /// Ends the upload without its last piece, so it is not committed, and
    /// waits until the upload task has stopped.
    fn abandon(self) {
        let UploadWriter { pieces, done, .. } = self;
        drop(pieces);
        if let Some(done) = done {
            let _ = done.blocking_recv();
        }
    }

    /// Sends the rest, waits until the registry has the blob, returns its info.
    fn finish(mut self) -> Result<BlobInfo, ConvertError> {
        if !self.piece.is_empty() {
            self.send_piece()?;
        }
        if self.pieces.blocking_send(None).is_err() {
            return Err(self.upload_result().err().unwrap_or_else(|| {
                ConvertError::Internal("blob upload ended before its last byte".into())
            }));
        }
        let (digest, size) = self.upload_result()?;
        if size != self.size {
            return Err(ConvertError::Internal(format!(
                "blob upload took {size} bytes of {}",
                self.size
            )));
        }
        Ok(BlobInfo { digest, size })
    }
}

/// The blob being written.
enum BlobOut {
    Staged(BlobWriter),
    Streamed(UploadWriter),
}

impl BlobOut {
    fn write(&mut self, frame: &[u8]) -> Result<u64, ConvertError> {
        match self {
            BlobOut::Staged(writer) => writer.write(frame),
            BlobOut::Streamed(writer) => writer.write(frame),
        }
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
    side_path: PathBuf,
    side: BufWriter<File>,
    side_size: u64,
    /// By rank: (offset in the side file, frame length, chunk id) once met.
    frames: Vec<Option<(u64, u32, u32)>>,
}

struct Packer {
    staging_dir: PathBuf,
    zstd_level: i32,
    table: ChunkTable,
    pieces: Vec<(NodeId, FilePiece)>,
    stats: PackStats,
    sink: BlobSink,
    blob: Option<BlobOut>,
    blobs_written: usize,
    hot: Option<HotBlob>,
}

/// The packer thread. `Ok(None)`: the reader went away without finishing
/// (it failed). After a failure the open blob is given up: a streamed upload
/// is abandoned, never committed, before this returns.
fn run(
    receiver: Receiver<Message>,
    staging_dir: PathBuf,
    zstd_level: i32,
    mut known_chunks: ChunkTable,
    hot: Vec<Digest>,
    sink: BlobSink,
) -> Result<Option<Packed>, ConvertError> {
    let hot = if hot.is_empty() {
        None
    } else {
        // Filled in by `finish_hot` once its bytes are known.
        let blob_index = known_chunks.add_blob(BlobInfo {
            digest: Digest([0; 32]),
            size: 0,
        });
        let side_path = staging_dir.join("hot-frames.partial");
        let side = File::create(&side_path).map_err(|e| ConvertError::io(&side_path, e))?;
        Some(HotBlob {
            blob_index,
            rank: hot.iter().enumerate().map(|(i, d)| (*d, i)).collect(),
            frames: vec![None; hot.len()],
            digests: hot,
            side_path,
            side: BufWriter::with_capacity(1 << 20, side),
            side_size: 0,
        })
    };
    let mut packer = Packer {
        staging_dir,
        zstd_level,
        table: known_chunks,
        pieces: Vec::new(),
        stats: PackStats::default(),
        sink,
        blob: None,
        blobs_written: 0,
        hot,
    };
    match packer.take_all(&receiver) {
        Ok(true) => {}
        Ok(false) => {
            packer.abandon_blob();
            return Ok(None);
        }
        Err(e) => {
            packer.abandon_blob();
            return Err(e);
        }
    }
    Ok(Some(Packed {
        table: packer.table,
        pieces: packer.pieces,
        stats: packer.stats,
    }))
}

impl Packer {
    /// Takes messages until `Finish` (true: closes the last blob and the hot
    /// blob) or until the reader goes away without it (false).
    fn take_all(&mut self, receiver: &Receiver<Message>) -> Result<bool, ConvertError> {
        loop {
            match receiver.recv() {
                Ok(Message::Chunk {
                    node,
                    offset,
                    prepared,
                }) => {
                    let prepared = prepared
                        .recv()
                        .map_err(|_| ConvertError::Internal("a chunk task panicked".into()))?;
                    self.add(node, offset, prepared)?;
                }
                Ok(Message::EndLayer) => self.end_blob()?,
                Ok(Message::Finish) => break,
                Err(_) => return Ok(false),
            }
        }
        self.end_blob()?;
        self.finish_hot()?;
        Ok(true)
    }

    /// Gives up the open blob after a failure: a streamed upload ends without
    /// its last piece, so it is never committed; returns once it has stopped.
    fn abandon_blob(&mut self) {
        if let Some(BlobOut::Streamed(writer)) = self.blob.take() {
            writer.abandon();
        }
    }

    /// Takes one chunk, in input order: a zero chunk becomes a hole, a chunk
    /// already stored is referenced again, a new one is appended.
    fn add(&mut self, node: NodeId, offset: u64, prepared: Prepared) -> Result<(), ConvertError> {
        let len = prepared.data.len() as u64;
        self.stats.chunks_seen += 1;
        self.stats.bytes_seen += len;
        let Some(digest) = prepared.digest else {
            self.stats.zero_bytes += len;
            return Ok(());
        };
        let chunk = match self.table.find(&digest) {
            Some(id) => {
                self.stats.duplicate_chunks += 1;
                self.stats.duplicate_bytes += len;
                id
            }
            None => {
                // The first in input order. If a later identical chunk's task
                // claimed the digest first, compress here: the frame is the same.
                let frame = match prepared.frame {
                    Some(frame) => frame,
                    None => compress(&prepared.data, self.zstd_level),
                }
                .map_err(|e| ConvertError::Internal(format!("zstd: {e}")))?;
                self.append(digest, len as u32, &frame)?
            }
        };
        self.pieces.push((node, FilePiece { offset, chunk }));
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
            hot.side
                .write_all(frame)
                .map_err(|e| ConvertError::io(&hot.side_path, e))?;
            let side_offset = hot.side_size;
            hot.side_size += frame.len() as u64;
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
            let name = format!("blob-{}.partial", self.blobs_written);
            self.blob = Some(self.open_blob(&name)?);
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

    /// Starts a blob: a staging file named `name`, or an upload.
    fn open_blob(&mut self, name: &str) -> Result<BlobOut, ConvertError> {
        Ok(match &mut self.sink {
            BlobSink::Staged(_) => {
                BlobOut::Staged(BlobWriter::create(self.staging_dir.join(name))?)
            }
            BlobSink::Streamed(start_upload) => {
                BlobOut::Streamed(UploadWriter::new(start_upload()))
            }
        })
    }

    /// Completes a blob: the staging file is handed on, the upload committed.
    fn close_blob(&mut self, blob: BlobOut) -> Result<BlobInfo, ConvertError> {
        match blob {
            BlobOut::Staged(writer) => {
                let staged = writer.finish(&self.staging_dir)?;
                let info = BlobInfo {
                    digest: staged.digest,
                    size: staged.size,
                };
                if let BlobSink::Staged(deliver) = &mut self.sink {
                    deliver(staged)?;
                }
                Ok(info)
            }
            BlobOut::Streamed(writer) => writer.finish(),
        }
    }

    /// Closes the current blob and records it in the table.
    fn end_blob(&mut self) -> Result<(), ConvertError> {
        let Some(blob) = self.blob.take() else {
            return Ok(());
        };
        let info = self.close_blob(blob)?;
        self.table.add_blob(info);
        self.blobs_written += 1;
        Ok(())
    }

    /// Writes the hot blob from the side file in plan order, and fixes the hot
    /// chunks' offsets and the reserved blob record.
    fn finish_hot(&mut self) -> Result<(), ConvertError> {
        let Some(hot) = self.hot.take() else {
            return Ok(());
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
        let side_path = hot.side_path;
        let mut side = hot.side;
        side.flush().map_err(|e| ConvertError::io(&side_path, e))?;
        drop(side);
        let mut side_file = File::open(&side_path).map_err(|e| ConvertError::io(&side_path, e))?;
        let mut out = self.open_blob("hot.partial")?;
        let mut frame = Vec::new();
        for (side_offset, len, id) in hot.frames.into_iter().flatten() {
            frame.resize(len as usize, 0);
            side_file
                .seek(SeekFrom::Start(side_offset))
                .and_then(|_| side_file.read_exact(&mut frame))
                .map_err(|e| ConvertError::io(&side_path, e))?;
            let offset = out.write(&frame)?;
            let record = self
                .table
                .chunks
                .get_mut(id as usize)
                .ok_or_else(|| ConvertError::Internal(format!("hot chunk {id} vanished")))?;
            record.compressed_offset = offset;
        }
        drop(side_file);
        let _ = std::fs::remove_file(&side_path);
        let info = self.close_blob(out)?;
        let slot = self
            .table
            .blobs
            .get_mut(hot.blob_index as usize)
            .ok_or_else(|| ConvertError::Internal("hot blob slot vanished".into()))?;
        *slot = info;
        Ok(())
    }
}
