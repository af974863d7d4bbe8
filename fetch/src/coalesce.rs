//! Turning a set of wanted chunks into as few ranged requests as possible.

use std::ops::Range;

use stoker_format::{ChunkLocation, Digest};

/// One ranged read of one blob, and the chunks it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RangeRequest {
    pub blob: Digest,
    pub range: Range<u64>,
    /// Sorted by offset; each lies inside `range`.
    pub chunks: Vec<ChunkLocation>,
}

impl RangeRequest {
    pub fn len(&self) -> u64 {
        self.range.end - self.range.start
    }
}

/// Groups chunks (already distinct by digest) into ranged requests: chunks of the
/// same blob that are adjacent, or separated by at most `max_gap` bytes, share a
/// request as long as it stays within `max_bytes`. A single chunk larger than
/// `max_bytes` still gets a request of its own.
pub(crate) fn coalesce(
    mut chunks: Vec<ChunkLocation>,
    max_bytes: u64,
    max_gap: u64,
) -> Vec<RangeRequest> {
    chunks.sort_by_key(|c| (c.blob, c.compressed_offset, c.compressed_len));
    let mut requests: Vec<RangeRequest> = Vec::new();
    for chunk in chunks {
        let range = chunk.compressed_range();
        if let Some(last) = requests.last_mut() {
            let same_blob = last.blob == chunk.blob;
            let gap = range.start.saturating_sub(last.range.end);
            let merged_end = last.range.end.max(range.end);
            if same_blob && gap <= max_gap && merged_end - last.range.start <= max_bytes {
                last.range.end = merged_end;
                last.chunks.push(chunk);
                continue;
            }
        }
        requests.push(RangeRequest {
            blob: chunk.blob,
            range,
            chunks: vec![chunk],
        });
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(blob: u8, offset: u64, len: u32, id: u8) -> ChunkLocation {
        ChunkLocation {
            digest: Digest([id; 32]),
            blob: Digest([blob; 32]),
            compressed_offset: offset,
            compressed_len: len,
            uncompressed_len: len * 2,
        }
    }

    #[test]
    fn adjacent_chunks_share_one_request() {
        let wanted: Vec<_> = (0..10)
            .rev()
            .map(|i| loc(1, i * 100, 100, i as u8))
            .collect();
        let requests = coalesce(wanted, 1 << 20, 0);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].range, 0..1000);
        let offsets: Vec<u64> = requests[0]
            .chunks
            .iter()
            .map(|c| c.compressed_offset)
            .collect();
        assert_eq!(offsets, (0..10).map(|i| i * 100).collect::<Vec<_>>());
    }

    #[test]
    fn requests_stop_at_the_size_limit_blob_boundary_and_large_gaps() {
        let wanted = vec![
            loc(1, 0, 100, 1),
            loc(1, 100, 100, 2),
            loc(1, 200, 100, 3),  // would make 300 > 250
            loc(1, 310, 50, 4),   // gap 10 <= 16: bridged
            loc(1, 400, 50, 5),   // gap 40 > 16: new request
            loc(2, 450, 50, 6),   // other blob
            loc(2, 500, 1000, 7), // alone larger than the limit
        ];
        let requests = coalesce(wanted, 250, 16);
        let ranges: Vec<_> = requests
            .iter()
            .map(|r| (r.blob.0[0], r.range.clone()))
            .collect();
        assert_eq!(
            ranges,
            vec![
                (1, 0..200),
                (1, 200..360),
                (1, 400..450),
                (2, 450..500),
                (2, 500..1500)
            ]
        );
    }

    #[test]
    fn overlapping_chunks_do_not_shrink_a_request() {
        let wanted = vec![loc(1, 0, 300, 1), loc(1, 100, 50, 2)];
        let requests = coalesce(wanted, 1000, 0);
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].range, 0..300);
    }
}
