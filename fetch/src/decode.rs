//! Compressed bytes from the registry → verified chunk bytes.

use bytes::Bytes;
use stoker_cache::{CacheError, VerifiedChunk};
use stoker_format::ChunkLocation;

/// Decompresses one zstd chunk into exactly `uncompressed_len` bytes (allocating
/// no more than that) and checks its sha256. The error says what was wrong.
pub(crate) fn decode_chunk(
    loc: &ChunkLocation,
    compressed: &[u8],
) -> Result<VerifiedChunk, String> {
    let expected_len = loc.uncompressed_len as usize;
    let data = zstd::bulk::decompress(compressed, expected_len)
        .map_err(|e| format!("zstd decompression failed: {e}"))?;
    if data.len() != expected_len {
        return Err(format!(
            "decompressed to {} bytes, index says {expected_len}",
            data.len()
        ));
    }
    VerifiedChunk::new(loc.digest, Bytes::from(data)).map_err(|e| match e {
        CacheError::DigestMismatch { actual, .. } => format!("content hashes to {actual}"),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_format::Digest;

    fn location(data: &[u8], compressed: &[u8]) -> ChunkLocation {
        ChunkLocation {
            digest: Digest::of(data),
            blob: Digest::default(),
            compressed_offset: 0,
            compressed_len: compressed.len() as u32,
            uncompressed_len: data.len() as u32,
        }
    }

    #[test]
    fn accepts_only_the_exact_chunk() {
        let data = b"hello hello hello hello".repeat(100);
        let compressed = zstd::bulk::compress(&data, 3).unwrap();
        let loc = location(&data, &compressed);
        assert_eq!(
            decode_chunk(&loc, &compressed).unwrap().bytes()[..],
            data[..]
        );

        let mut flipped = compressed.clone();
        let last = flipped.len() - 5;
        flipped[last] ^= 1;
        assert!(decode_chunk(&loc, &flipped).is_err());

        let short = ChunkLocation {
            uncompressed_len: loc.uncompressed_len - 1,
            ..loc
        };
        assert!(
            decode_chunk(&short, &compressed)
                .unwrap_err()
                .contains("zstd")
        );
        let long = ChunkLocation {
            uncompressed_len: loc.uncompressed_len + 1,
            ..loc
        };
        assert!(
            decode_chunk(&long, &compressed)
                .unwrap_err()
                .contains("index says")
        );

        let other = ChunkLocation {
            digest: Digest::of(b"x"),
            ..loc
        };
        assert!(
            decode_chunk(&other, &compressed)
                .unwrap_err()
                .contains("hashes to")
        );
        assert!(decode_chunk(&loc, b"not zstd").is_err());
    }
}
