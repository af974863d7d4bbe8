//! Startup traces and prefetch plans.
//!
//! A [`Trace`] is what the agent records while a container starts: the first
//! access of each chunk, in order. A [`Plan`] is what a node warms: an ordered
//! list of chunk positions in one index, merged from traces. Plans are small
//! enough to live in a Kubernetes object: positions are run-length encoded
//! varints, zstd-compressed, bound to the index by its digest.
//!
//! Plan encoding (before zstd), version 1:
//! `b"STKPLAN1"`, the index digest (32 bytes), then LEB128 varints: the number
//! of runs, then for each run the zigzag delta of its first position from the
//! end of the previous run, and its length. A run is consecutive ascending
//! positions.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::{Digest, FormatError};

const PLAN_MAGIC: &[u8; 8] = b"STKPLAN1";
/// Plans longer than this many chunks are refused when decoding (a 20 GB image
/// of 4 KiB chunks has 5 million).
pub const MAX_PLAN_CHUNKS: usize = 16 << 20;

/// One first access of a chunk during startup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceEntry {
    /// Position of the chunk in the index's chunk table.
    pub chunk: u32,
    /// Uncompressed length of the chunk.
    pub len: u32,
    /// Position in [`Trace::files`] of the file being read.
    pub file: u32,
    /// Offset of the chunk in that file.
    pub file_offset: u64,
    /// Microseconds since the container (or mount) started.
    pub micros: u64,
}

/// The ordered first accesses of chunks by one container start.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trace {
    /// The index the chunk positions refer to.
    pub index_digest: String,
    /// The image the container ran, for people.
    pub image: String,
    /// Container (or mount) the trace belongs to.
    pub container: String,
    /// Paths of the files read, referred to by [`TraceEntry::file`].
    pub files: Vec<String>,
    pub entries: Vec<TraceEntry>,
    /// True when recording stopped because the entry cap was reached.
    pub truncated: bool,
}

impl Trace {
    /// zstd-compressed JSON, the on-disk and on-wire form.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let json = serde_json::to_vec(self).map_err(|e| FormatError::Encode(e.to_string()))?;
        zstd::bulk::compress(&json, 3).map_err(|e| FormatError::Encode(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Trace, FormatError> {
        let json = bounded_decompress(bytes, "trace")?;
        serde_json::from_slice(&json).map_err(|e| FormatError::Invalid(format!("trace: {e}")))
    }

    pub fn hot_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.len as u64).sum()
    }
}

/// An ordered list of chunks to warm, for one index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub index_digest: Digest,
    /// Positions in the index's chunk table, most useful first.
    pub chunks: Vec<u32>,
}

impl Plan {
    /// Merges traces of the same image into a plan: chunks seen in more traces
    /// first, ties by earliest median first access, then by position. The plan
    /// stops before the chunk that would take it past `max_bytes`.
    pub fn merge(traces: &[Trace], max_bytes: Option<u64>) -> Result<Plan, FormatError> {
        let Some(first) = traces.first() else {
            return Err(FormatError::Invalid("no traces to merge".into()));
        };
        if let Some(other) = traces.iter().find(|t| t.index_digest != first.index_digest) {
            return Err(FormatError::Invalid(format!(
                "traces are of different images: {} and {}",
                first.index_digest, other.index_digest
            )));
        }
        let index_digest = Digest::parse(&first.index_digest)?;
        struct Seen {
            traces: u32,
            times: Vec<u64>,
            len: u32,
        }
        let mut seen: HashMap<u32, Seen> = HashMap::new();
        for trace in traces {
            let mut in_this_trace = std::collections::HashSet::new();
            for entry in &trace.entries {
                if !in_this_trace.insert(entry.chunk) {
                    continue;
                }
                let s = seen.entry(entry.chunk).or_insert(Seen {
                    traces: 0,
                    times: Vec::new(),
                    len: entry.len,
                });
                s.traces += 1;
                s.times.push(entry.micros);
            }
        }
        let mut ranked: Vec<(u32, u32, u64, u32)> = seen
            .into_iter()
            .map(|(chunk, mut s)| {
                s.times.sort_unstable();
                let median = s.times[(s.times.len() - 1) / 2];
                (chunk, s.traces, median, s.len)
            })
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.2.cmp(&b.2)).then(a.0.cmp(&b.0)));
        let mut budget = max_bytes.unwrap_or(u64::MAX);
        let mut chunks = Vec::with_capacity(ranked.len());
        for (chunk, _, _, len) in ranked {
            if len as u64 > budget {
                break;
            }
            budget -= len as u64;
            chunks.push(chunk);
        }
        Ok(Plan {
            index_digest,
            chunks,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let mut raw = Vec::with_capacity(64 + self.chunks.len());
        raw.extend_from_slice(PLAN_MAGIC);
        raw.extend_from_slice(&self.index_digest.0);
        let runs = runs(&self.chunks);
        put_varint(&mut raw, runs.len() as u64);
        let mut previous_end = 0i64;
        for (start, len) in runs {
            put_varint(&mut raw, zigzag(start as i64 - previous_end));
            put_varint(&mut raw, len as u64);
            previous_end = start as i64 + len as i64;
        }
        zstd::bulk::compress(&raw, 19).map_err(|e| FormatError::Encode(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<Plan, FormatError> {
        let raw = bounded_decompress(bytes, "plan")?;
        let bad = |why: &str| FormatError::Invalid(format!("plan: {why}"));
        if raw.len() < 40 || &raw[..8] != PLAN_MAGIC {
            return Err(bad("not a Stoker plan (bad magic)"));
        }
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&raw[8..40]);
        let mut cursor = &raw[40..];
        let run_count = get_varint(&mut cursor).ok_or_else(|| bad("truncated"))?;
        let mut chunks = Vec::new();
        let mut previous_end = 0i64;
        for _ in 0..run_count {
            let delta = unzigzag(get_varint(&mut cursor).ok_or_else(|| bad("truncated"))?);
            let len = get_varint(&mut cursor).ok_or_else(|| bad("truncated"))?;
            let start = previous_end
                .checked_add(delta)
                .filter(|s| *s >= 0)
                .ok_or_else(|| bad("position out of range"))?;
            // A run length past i64::MAX would turn negative (and make the count
            // below overflow): it is as out of range as any end past u32::MAX + 1.
            let end = i64::try_from(len)
                .ok()
                .and_then(|len| start.checked_add(len))
                .filter(|e| *e <= u32::MAX as i64 + 1)
                .ok_or_else(|| bad("position out of range"))?;
            if chunks.len() as u64 + len > MAX_PLAN_CHUNKS as u64 {
                return Err(bad("too many chunks"));
            }
            chunks.extend((start..end).map(|c| c as u32));
            previous_end = end;
        }
        if !cursor.is_empty() {
            return Err(bad("trailing bytes"));
        }
        Ok(Plan {
            index_digest: Digest(digest),
            chunks,
        })
    }

    /// Checks the plan against the index it is for.
    pub fn check_against(
        &self,
        index: &crate::Index,
        index_digest: &Digest,
    ) -> Result<(), FormatError> {
        if &self.index_digest != index_digest {
            return Err(FormatError::Invalid(format!(
                "plan is for index {}, not {index_digest}",
                self.index_digest
            )));
        }
        if let Some(bad) = self.chunks.iter().find(|&&c| c >= index.chunk_count()) {
            return Err(FormatError::Invalid(format!(
                "plan names chunk {bad}, the index has {}",
                index.chunk_count()
            )));
        }
        Ok(())
    }
}

fn runs(chunks: &[u32]) -> Vec<(u32, u32)> {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &c in chunks {
        match runs.last_mut() {
            Some((start, len)) if start.checked_add(*len) == Some(c) => *len += 1,
            _ => runs.push((c, 1)),
        }
    }
    runs
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(input: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first()?;
        *input = rest;
        value |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Decompresses at most 256 MiB, so a hostile plan or trace cannot exhaust memory.
fn bounded_decompress(bytes: &[u8], what: &str) -> Result<Vec<u8>, FormatError> {
    use std::io::Read;
    const LIMIT: u64 = 256 << 20;
    let decoder = zstd::stream::read::Decoder::new(bytes)
        .map_err(|e| FormatError::Invalid(format!("{what}: not zstd: {e}")))?;
    let mut out = Vec::new();
    decoder
        .take(LIMIT + 1)
        .read_to_end(&mut out)
        .map_err(|e| FormatError::Invalid(format!("{what}: not zstd: {e}")))?;
    if out.len() as u64 > LIMIT {
        return Err(FormatError::Invalid(format!(
            "{what} larger than {LIMIT} bytes"
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(entries: &[(u32, u64)]) -> Trace {
        Trace {
            index_digest: Digest::of(b"index").to_string(),
            entries: entries
                .iter()
                .map(|&(chunk, micros)| TraceEntry {
                    chunk,
                    len: 100,
                    file: 0,
                    file_offset: 0,
                    micros,
                })
                .collect(),
            files: vec!["/f".into()],
            ..Trace::default()
        }
    }

    #[test]
    fn merge_orders_by_frequency_then_median_time_and_respects_the_budget() {
        // Chunk 7 is in all three traces; 3 and 5 in two; 9 and 1 in one.
        let traces = [
            trace(&[(7, 10), (3, 20), (9, 30)]),
            trace(&[(3, 5), (7, 50), (5, 60)]),
            trace(&[(5, 1), (7, 40), (1, 70)]),
        ];
        let plan = Plan::merge(&traces, None).unwrap();
        // 7: 3 traces. 3: median(5,20)=5; 5: median(1,60)=1 → 5 before 3. Then 9 (30), 1 (70).
        assert_eq!(plan.chunks, vec![7, 5, 3, 9, 1]);
        let capped = Plan::merge(&traces, Some(350)).unwrap();
        assert_eq!(capped.chunks, vec![7, 5, 3]);
    }

    #[test]
    fn plans_round_trip_and_stay_small() {
        let chunks: Vec<u32> = (0..2048).chain(5000..5100).chain([3, 1, 99_999]).collect();
        let plan = Plan {
            index_digest: Digest::of(b"i"),
            chunks,
        };
        let bytes = plan.encode().unwrap();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        assert_eq!(Plan::decode(&bytes).unwrap(), plan);
        assert!(Plan::decode(b"junk").is_err());
    }

    /// Found by the `plan_decode` fuzz target: a run of 2^64 - 1 chunks was read as
    /// a negative length and overflowed the chunk count.
    #[test]
    fn a_run_length_past_i64_max_is_out_of_range() {
        let mut raw = PLAN_MAGIC.to_vec();
        raw.extend_from_slice(&[0; 32]);
        put_varint(&mut raw, 1); // one run
        put_varint(&mut raw, zigzag(0)); // starting at chunk 0
        put_varint(&mut raw, u64::MAX); // of 2^64 - 1 chunks
        let bytes = zstd::bulk::compress(&raw, 1).unwrap();
        let error = Plan::decode(&bytes).unwrap_err().to_string();
        assert!(error.contains("position out of range"), "{error}");
    }

    #[test]
    fn traces_of_different_images_do_not_merge() {
        let mut other = trace(&[(1, 1)]);
        other.index_digest = Digest::of(b"other").to_string();
        assert!(Plan::merge(&[trace(&[(1, 1)]), other], None).is_err());
    }
}
