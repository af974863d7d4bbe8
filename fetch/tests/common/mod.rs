//! Test data shared by the fetch tests: data blobs laid out as the converter
//! writes them.

use bytes::Bytes;
use stoker_fetch::{ChunkLocation, Digest};

/// A data blob of independently zstd-compressed chunks, as the converter writes it.
pub struct TestBlob {
    pub digest: Digest,
    pub bytes: Bytes,
    pub chunks: Vec<Vec<u8>>,
    pub locs: Vec<ChunkLocation>,
}

fn chunk_bytes(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(7);
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            // Half random, half repetitive: compresses, but not to nothing.
            if i % 2 == 0 { state as u8 } else { b'x' }
        })
        .collect()
}

/// `count` chunks of `len` bytes, with `gap` junk bytes between them.
pub fn make_blob(seed: u32, count: u32, len: usize, gap: usize) -> TestBlob {
    let chunks: Vec<Vec<u8>> = (0..count)
        .map(|i| chunk_bytes(seed * 1000 + i, len))
        .collect();
    let mut bytes = Vec::new();
    let mut placed = Vec::new();
    for chunk in &chunks {
        if !bytes.is_empty() {
            bytes.extend(std::iter::repeat_n(0xAA, gap));
        }
        let compressed = zstd::bulk::compress(chunk, 3).unwrap();
        placed.push((bytes.len() as u64, compressed.len() as u32, chunk));
        bytes.extend_from_slice(&compressed);
    }
    let digest = Digest::of(&bytes);
    let locs = placed
        .into_iter()
        .map(|(offset, compressed_len, chunk)| ChunkLocation {
            digest: Digest::of(chunk),
            blob: digest,
            compressed_offset: offset,
            compressed_len,
            uncompressed_len: chunk.len() as u32,
        })
        .collect();
    TestBlob {
        digest,
        bytes: Bytes::from(bytes),
        chunks,
        locs,
    }
}
