//! The index decoder on hostile bytes: `Index::decode` (zstd + validation) and
//! `Index::from_raw` (validation alone, so mutations reach the record checks).
//! Nothing may panic, whatever decodes must answer every query consistently,
//! and the heap used while decoding stays within the decoder's bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stoker_format::Index;
use stoker_format::index::MAX_EXPANSION;
use stoker_fuzz::{PeakAlloc, check_index, peak_heap_of};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Slack over the raw index itself: `read_to_end` may double its buffer once
/// past the limit, validation keeps a byte per inode (at most raw / 64), and
/// the zstd stream decoder has a fixed input buffer (about 128 KiB).
fn heap_bound(raw_limit: usize) -> usize {
    2 * raw_limit + raw_limit / 32 + (256 << 10)
}

fuzz_target!(|data: &[u8]| {
    let (decoded, peak) = peak_heap_of(|| Index::decode(data));
    let bound = heap_bound(data.len() * MAX_EXPANSION);
    assert!(
        peak <= bound,
        "decoding {} bytes allocated {peak} bytes (bound {bound})",
        data.len()
    );
    if let Ok(index) = decoded {
        assert!(index.raw_len() <= data.len() * MAX_EXPANSION);
        check_index(&index);
    }

    let (raw, peak) = peak_heap_of(|| Index::from_raw(data.to_vec()));
    let bound = heap_bound(data.len());
    assert!(
        peak <= bound,
        "validating {} raw bytes allocated {peak} bytes (bound {bound})",
        data.len()
    );
    if let Ok(index) = raw {
        check_index(&index);
    }
});
