//! Splitting file contents into chunks: fixed-size, or content-defined (FastCDC)
//! so that an insertion in a large file moves only the chunks around it.

use std::io::{self, Read};

use crate::FormatError;

/// How file contents are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Every chunk is `size` bytes except a file's last one.
    Fixed { size: u32 },
    /// FastCDC (2020) with the given average size; min = avg/4, max = avg*4.
    Cdc { avg_size: u32 },
}

impl Default for Chunking {
    fn default() -> Self {
        Chunking::Fixed { size: 1 << 20 }
    }
}

impl Chunking {
    pub fn validate(&self) -> Result<(), FormatError> {
        match *self {
            Chunking::Fixed { size } if !(4096..=crate::layout::MAX_CHUNK_LEN).contains(&size) => {
                Err(FormatError::BadChunking(format!(
                    "fixed chunk size {size} is outside 4 KiB..64 MiB"
                )))
            }
            Chunking::Cdc { avg_size }
                if !(16 << 10..=fastcdc::v2020::AVERAGE_MAX as u32).contains(&avg_size) =>
            {
                Err(FormatError::BadChunking(format!(
                    "CDC average chunk size {avg_size} is outside 16 KiB..4 MiB"
                )))
            }
            _ => Ok(()),
        }
    }

    /// The largest chunk this chunking can produce.
    pub fn max_chunk_len(&self) -> u32 {
        match *self {
            Chunking::Fixed { size } => size,
            Chunking::Cdc { avg_size } => avg_size * 4,
        }
    }

    /// (kind, nominal size) as stored in the index header.
    pub(crate) fn encode(&self) -> (u32, u32) {
        match *self {
            Chunking::Fixed { size } => (0, size),
            Chunking::Cdc { avg_size } => (1, avg_size),
        }
    }

    pub(crate) fn decode(kind: u32, size: u32) -> Option<Chunking> {
        match kind {
            0 => Some(Chunking::Fixed { size }),
            1 => Some(Chunking::Cdc { avg_size: size }),
            _ => None,
        }
    }

    /// Cuts everything `reader` yields into chunks, calling `sink` with each
    /// chunk's offset and bytes, in order. Memory use is one chunk (fixed) or
    /// one maximum-size window (CDC).
    pub fn split<R: Read>(
        &self,
        mut reader: R,
        mut sink: impl FnMut(u64, Vec<u8>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        match *self {
            Chunking::Fixed { size } => {
                let mut offset = 0u64;
                loop {
                    let mut chunk = Vec::with_capacity(size as usize);
                    (&mut reader).take(size as u64).read_to_end(&mut chunk)?;
                    if chunk.is_empty() {
                        return Ok(());
                    }
                    let len = chunk.len() as u64;
                    sink(offset, chunk)?;
                    offset += len;
                }
            }
            Chunking::Cdc { avg_size } => {
                // The cut points of fastcdc's StreamCDC (each cut sees at least
                // `max` bytes, or the rest of the input), without its copy of
                // the whole window after every chunk: the window holds several
                // maximum chunks, and only the tail moves before each refill.
                let avg = avg_size as usize;
                let (min, max) = (avg / 4, avg * 4);
                let window = max * 4;
                let mut buffer: Vec<u8> = Vec::new();
                let mut start = 0usize;
                let mut offset = 0u64;
                let mut eof = false;
                loop {
                    if !eof && buffer.len() - start < max {
                        buffer.drain(..start);
                        start = 0;
                        let want = window - buffer.len();
                        let read = (&mut reader).take(want as u64).read_to_end(&mut buffer)?;
                        eof = read < want;
                    }
                    if start == buffer.len() {
                        return Ok(());
                    }
                    let cutter = fastcdc::v2020::FastCDC::new(&buffer, min, avg, max);
                    let (_, end) = cutter.cut(start, buffer.len() - start);
                    sink(offset, buffer[start..end].to_vec())?;
                    offset += (end - start) as u64;
                    start = end;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn cut(chunking: Chunking, data: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        chunking
            .split(data, |off, bytes| {
                out.push((off, bytes));
                Ok(())
            })
            .unwrap();
        out
    }

    #[test]
    fn fixed_chunks_cover_the_input_exactly() {
        let data = pseudo_random(10_000, 1);
        let chunks = cut(Chunking::Fixed { size: 4096 }, &data);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].0, 8192);
        assert_eq!(chunks.concat_bytes(), data);
        assert!(cut(Chunking::Fixed { size: 4096 }, &[]).is_empty());
    }

    #[test]
    fn cdc_resynchronises_after_an_insertion() {
        let data = pseudo_random(4 << 20, 7);
        let mut shifted = data.clone();
        shifted.insert(100_000, 0xAB);
        let chunking = Chunking::Cdc { avg_size: 64 << 10 };
        let a = cut(chunking, &data);
        let b = cut(chunking, &shifted);
        assert_eq!(b.concat_bytes(), shifted);
        let a_set: std::collections::HashSet<_> = a.iter().map(|(_, d)| d.clone()).collect();
        let shared = b.iter().filter(|(_, d)| a_set.contains(d)).count();
        assert!(shared + 3 >= b.len(), "shared {shared} of {}", b.len());
    }

    #[test]
    fn cdc_cuts_where_fastcdc_stream_cuts() {
        // Many windows, a partial last window, exactly one window, tiny inputs.
        for len in [0, 1000, 16 << 10, 300_000, 1 << 20, (9 << 20) + 12_345] {
            let data = pseudo_random(len, len as u64 + 3);
            let ours: Vec<(u64, usize)> = cut(Chunking::Cdc { avg_size: 64 << 10 }, &data)
                .iter()
                .map(|(offset, bytes)| (*offset, bytes.len()))
                .collect();
            let stream = fastcdc::v2020::StreamCDC::new(&data[..], 16 << 10, 64 << 10, 256 << 10);
            let theirs: Vec<(u64, usize)> = stream
                .map(|chunk| chunk.map(|c| (c.offset, c.length)).unwrap())
                .collect();
            assert_eq!(ours, theirs, "input of {len} bytes");
        }
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(Chunking::Fixed { size: 10 }.validate().is_err());
        assert!(Chunking::Cdc { avg_size: 1 << 30 }.validate().is_err());
    }

    trait Concat {
        fn concat_bytes(&self) -> Vec<u8>;
    }
    impl Concat for Vec<(u64, Vec<u8>)> {
        fn concat_bytes(&self) -> Vec<u8> {
            self.iter().flat_map(|(_, d)| d.iter().copied()).collect()
        }
    }
}
