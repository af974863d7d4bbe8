//! Learning: from the agents' startup traces to the plan kept in status.
//!
//! Pure logic. [`pick_trace`] finds the trace a pod's container left on its
//! node, [`trace_from_agent`] converts it to stoker-format's [`Trace`],
//! [`fold_trace`] merges it into the plan learned so far, and
//! [`encode_for_status`] encodes the plan within the status size budget.
//!
//! The status keeps only the merged plan, not the traces (agents may drop a
//! trace once collected). A new trace is therefore merged with the plan so far
//! standing in for the earlier traces: it counts as `pods_learned` traces whose
//! first accesses come in plan order, spread over the new trace's time span.
//! Chunks every start read stay first; what only the new start read goes after
//! what the earlier starts agreed on.

use std::collections::HashMap;

use base64::Engine;
use stoker_api::agent::{GetTraceResponse, TraceSummary};
use stoker_format::{Plan, Trace, TraceEntry};

use crate::Error;

/// Chunk length assumed when an agent does not report one (Stoker's default
/// chunk size).
pub const ASSUMED_CHUNK_LEN: u32 = 1 << 20;

/// What [`pick_trace`] found for a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TracePick {
    /// A complete trace: fetch it with GetTrace.
    Complete(String),
    /// The startup window is still open; look again later.
    Recording(String),
    /// The node has no trace for this container (yet).
    Missing,
}

/// Finds the trace of one container among a node's traces: by containerd
/// container ID, or, for a mount shared by several containers (empty container
/// ID), the earliest trace of the same image that opened at or after
/// `started_after_ms` (the pod's creation time).
pub fn pick_trace(
    traces: &[TraceSummary],
    container_id: &str,
    image: &str,
    started_after_ms: i64,
) -> TracePick {
    let by_container = traces
        .iter()
        .find(|t| !container_id.is_empty() && t.container_id == container_id);
    let by_image = || {
        traces
            .iter()
            .filter(|t| {
                t.container_id.is_empty()
                    && t.image_ref == image
                    && t.started_at_unix_ms >= started_after_ms
            })
            .min_by_key(|t| t.started_at_unix_ms)
    };
    match by_container.or_else(by_image) {
        Some(t) if t.complete => TracePick::Complete(t.trace_id.clone()),
        Some(t) => TracePick::Recording(t.trace_id.clone()),
        None => TracePick::Missing,
    }
}

/// Converts an agent's trace into stoker-format's [`Trace`].
pub fn trace_from_agent(response: &GetTraceResponse) -> Result<Trace, Error> {
    let summary = response
        .summary
        .as_ref()
        .ok_or_else(|| Error::BadTrace("GetTrace response without a summary".into()))?;
    stoker_format::Digest::parse(&summary.index_digest).map_err(|e| {
        Error::BadTrace(format!(
            "trace {} names index {:?}: {e}",
            summary.trace_id, summary.index_digest
        ))
    })?;
    let mut files: Vec<String> = Vec::new();
    let mut file_ids: HashMap<&str, u32> = HashMap::new();
    let mut entries = Vec::with_capacity(response.entries.len());
    for entry in &response.entries {
        let file = *file_ids.entry(entry.path.as_str()).or_insert_with(|| {
            files.push(entry.path.clone());
            (files.len() - 1) as u32
        });
        entries.push(TraceEntry {
            chunk: entry.chunk_index,
            len: if entry.chunk_length == 0 {
                ASSUMED_CHUNK_LEN
            } else {
                entry.chunk_length
            },
            file,
            file_offset: entry.file_offset,
            micros: entry.micros_since_start,
        });
    }
    Ok(Trace {
        index_digest: summary.index_digest.clone(),
        image: summary.image_ref.clone(),
        container: summary.container_id.clone(),
        files,
        entries,
        truncated: summary.truncated,
    })
}

/// The plan learned so far for one image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearnedPlan {
    pub plan: Plan,
    /// Pod starts merged into it.
    pub pods_learned: u32,
    /// Uncompressed bytes of its chunks.
    pub hot_bytes: u64,
}

/// Merges `trace` into the plan learned so far (see the module docs), capped
/// at `max_bytes`. A previous plan of a different index is discarded: the
/// image was rebuilt and learning starts over.
pub fn fold_trace(
    previous: Option<&LearnedPlan>,
    trace: &Trace,
    max_bytes: u64,
) -> Result<LearnedPlan, Error> {
    let previous = previous.filter(|p| p.plan.index_digest.to_string() == trace.index_digest);
    let mut lengths: HashMap<u32, u32> = trace.entries.iter().map(|e| (e.chunk, e.len)).collect();
    let mut traces = Vec::new();
    let mut pods_learned = 1;
    if let Some(previous) = previous.filter(|p| !p.plan.chunks.is_empty()) {
        let chunk_count = previous.plan.chunks.len() as u64;
        let average_len = (previous.hot_bytes / chunk_count).clamp(1, u32::MAX as u64) as u32;
        let span = trace
            .entries
            .iter()
            .map(|e| e.micros)
            .max()
            .unwrap_or(0)
            .max(chunk_count);
        let pseudo = Trace {
            index_digest: trace.index_digest.clone(),
            entries: previous
                .plan
                .chunks
                .iter()
                .enumerate()
                .map(|(rank, &chunk)| TraceEntry {
                    chunk,
                    len: *lengths.entry(chunk).or_insert(average_len),
                    file: 0,
                    file_offset: 0,
                    micros: rank as u64 * span / chunk_count,
                })
                .collect(),
            ..Trace::default()
        };
        for _ in 0..previous.pods_learned.max(1) {
            traces.push(pseudo.clone());
        }
        pods_learned += previous.pods_learned;
    }
    traces.push(trace.clone());
    let plan = Plan::merge(&traces, Some(max_bytes))?;
    let hot_bytes = plan
        .chunks
        .iter()
        .map(|c| lengths.get(c).copied().unwrap_or(ASSUMED_CHUNK_LEN) as u64)
        .sum();
    Ok(LearnedPlan {
        plan,
        pods_learned,
        hot_bytes,
    })
}

/// A plan encoded for the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusPlan {
    /// Base64 of the compact plan encoding.
    pub base64: String,
    /// Chunks kept: all of the plan's, unless it was truncated.
    pub chunks: usize,
    pub truncated: bool,
}

/// Encodes `plan` as base64 of its compact encoding in at most `budget` bytes,
/// keeping the longest prefix that fits (the plan is ordered most useful first).
pub fn encode_for_status(plan: &Plan, budget: usize) -> Result<StatusPlan, Error> {
    let encode = |chunks: usize| -> Result<String, Error> {
        let prefix = Plan {
            index_digest: plan.index_digest,
            chunks: plan.chunks[..chunks].to_vec(),
        };
        Ok(base64::engine::general_purpose::STANDARD.encode(prefix.encode()?))
    };
    let full = encode(plan.chunks.len())?;
    if full.len() <= budget {
        return Ok(StatusPlan {
            base64: full,
            chunks: plan.chunks.len(),
            truncated: false,
        });
    }
    // Binary search for the longest prefix that fits; an empty plan always does
    // for any budget the controller uses (it is ~60 bytes).
    let (mut fits, mut too_big) = (0usize, plan.chunks.len());
    let mut best = encode(0)?;
    while too_big - fits > 1 {
        let middle = fits + (too_big - fits) / 2;
        let candidate = encode(middle)?;
        if candidate.len() <= budget {
            fits = middle;
            best = candidate;
        } else {
            too_big = middle;
        }
    }
    Ok(StatusPlan {
        base64: best,
        chunks: fits,
        truncated: true,
    })
}

/// Decodes a plan from the status.
pub fn decode_from_status(base64_plan: &str) -> Result<Plan, Error> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64_plan)
        .map_err(|e| Error::BadPlan(format!("status plan is not base64: {e}")))?;
    Ok(Plan::decode(&bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use stoker_api::agent::TraceEntry as AgentEntry;
    use stoker_format::Digest;

    fn digest() -> String {
        Digest::of(b"index").to_string()
    }

    fn summary(
        id: &str,
        container: &str,
        image: &str,
        started: i64,
        complete: bool,
    ) -> TraceSummary {
        TraceSummary {
            trace_id: id.into(),
            image_ref: image.into(),
            index_digest: digest(),
            container_id: container.into(),
            started_at_unix_ms: started,
            entries: 1,
            complete,
            truncated: false,
        }
    }

    fn trace(chunks: &[(u32, u64)]) -> Trace {
        Trace {
            index_digest: digest(),
            entries: chunks
                .iter()
                .map(|&(chunk, micros)| TraceEntry {
                    chunk,
                    len: 1000,
                    file: 0,
                    file_offset: 0,
                    micros,
                })
                .collect(),
            ..Trace::default()
        }
    }

    #[test]
    fn picks_the_trace_by_container_id_then_by_image_and_time() {
        let traces = [
            summary("t1", "c-old", "app:1", 100, true),
            summary("t2", "c-new", "app:1", 200, false),
            summary("t3", "", "app:1", 50, true),
            summary("t4", "", "app:1", 300, true),
            summary("t5", "", "app:1", 250, true),
        ];
        assert_eq!(
            pick_trace(&traces, "c-old", "app:1", 0),
            TracePick::Complete("t1".into())
        );
        assert_eq!(
            pick_trace(&traces, "c-new", "app:1", 0),
            TracePick::Recording("t2".into())
        );
        // Shared mount: earliest trace of the image after the pod was created.
        assert_eq!(
            pick_trace(&traces, "c-x", "app:1", 240),
            TracePick::Complete("t5".into())
        );
        assert_eq!(pick_trace(&traces, "c-x", "app:2", 0), TracePick::Missing);
        assert_eq!(pick_trace(&traces, "c-x", "app:1", 400), TracePick::Missing);
    }

    #[test]
    fn converts_agent_traces_and_rejects_bad_ones() {
        let response = GetTraceResponse {
            summary: Some(summary("t", "c", "app:1", 0, true)),
            entries: vec![
                AgentEntry {
                    chunk_index: 4,
                    chunk_digest: String::new(),
                    path: "/usr/lib/a.so".into(),
                    file_offset: 0,
                    micros_since_start: 10,
                    chunk_length: 4096,
                },
                AgentEntry {
                    chunk_index: 9,
                    chunk_digest: String::new(),
                    path: "/bin/app".into(),
                    file_offset: 8192,
                    micros_since_start: 20,
                    chunk_length: 0,
                },
                AgentEntry {
                    chunk_index: 5,
                    chunk_digest: String::new(),
                    path: "/usr/lib/a.so".into(),
                    file_offset: 4096,
                    micros_since_start: 30,
                    chunk_length: 4096,
                },
            ],
        };
        let trace = trace_from_agent(&response).unwrap();
        assert_eq!(trace.files, ["/usr/lib/a.so", "/bin/app"]);
        let got: Vec<(u32, u32, u32)> = trace
            .entries
            .iter()
            .map(|e| (e.chunk, e.len, e.file))
            .collect();
        assert_eq!(got, [(4, 4096, 0), (9, ASSUMED_CHUNK_LEN, 1), (5, 4096, 0)]);

        let mut bad = response.clone();
        bad.summary.as_mut().unwrap().index_digest = "sha256:nope".into();
        assert!(
            matches!(trace_from_agent(&bad), Err(Error::BadTrace(m)) if m.contains("sha256:nope"))
        );
        assert!(trace_from_agent(&GetTraceResponse::default()).is_err());
    }

    #[test]
    fn folding_keeps_what_every_start_read_first() {
        let first = fold_trace(None, &trace(&[(1, 10), (2, 20), (3, 30)]), u64::MAX).unwrap();
        assert_eq!(first.plan.chunks, [1, 2, 3]);
        assert_eq!((first.pods_learned, first.hot_bytes), (1, 3000));
        // The second start reads 3 and 4: 3 was read by both starts and goes first;
        // the first start's 1 and 2 come before the new 4.
        let second = fold_trace(Some(&first), &trace(&[(3, 5), (4, 15)]), u64::MAX).unwrap();
        assert_eq!(second.plan.chunks, [3, 1, 2, 4]);
        assert_eq!((second.pods_learned, second.hot_bytes), (2, 4000));
        // A third start that agrees with the first: 1 and 2 were now read by
        // all three starts, 3 and 4 by two.
        let third = fold_trace(Some(&second), &trace(&[(1, 1), (2, 2)]), u64::MAX).unwrap();
        assert_eq!(third.plan.chunks, [1, 2, 3, 4]);
        assert_eq!(third.pods_learned, 3);
    }

    #[test]
    fn folding_respects_the_byte_budget() {
        let learned = fold_trace(None, &trace(&[(1, 1), (2, 2), (3, 3)]), 2500).unwrap();
        assert_eq!(learned.plan.chunks, [1, 2]);
        assert_eq!(learned.hot_bytes, 2000);
    }

    #[test]
    fn a_new_index_starts_learning_over() {
        let first = fold_trace(None, &trace(&[(1, 10)]), u64::MAX).unwrap();
        let mut rebuilt = trace(&[(7, 10)]);
        rebuilt.index_digest = Digest::of(b"rebuilt").to_string();
        let learned = fold_trace(Some(&first), &rebuilt, u64::MAX).unwrap();
        assert_eq!(learned.plan.chunks, [7]);
        assert_eq!(learned.pods_learned, 1);
    }

    /// `count` pseudo-random positions below `limit` (xorshift, deterministic).
    pub(crate) fn scattered(count: usize, limit: u32) -> Vec<u32> {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        (0..count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % limit as u64) as u32
            })
            .collect()
    }

    #[test]
    fn status_plans_round_trip_and_are_cut_to_the_budget() {
        let plan = Plan {
            index_digest: Digest::of(b"i"),
            // Scattered positions compress badly: a worst case.
            chunks: scattered(20_000, 1_000_000),
        };
        let whole = encode_for_status(&plan, usize::MAX).unwrap();
        assert!(!whole.truncated);
        assert_eq!(decode_from_status(&whole.base64).unwrap(), plan);

        let cut = encode_for_status(&plan, 4096).unwrap();
        assert!(cut.truncated, "{} bytes", whole.base64.len());
        assert!(
            cut.base64.len() <= 4096 && cut.chunks > 0,
            "{} bytes, {} chunks",
            cut.base64.len(),
            cut.chunks
        );
        let decoded = decode_from_status(&cut.base64).unwrap();
        assert_eq!(decoded.chunks, plan.chunks[..cut.chunks]);
        assert!(decode_from_status("not base64!").is_err());
    }
}
