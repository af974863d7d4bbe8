//! The ImagePrefetch status stays under 64 KiB for a 20 GB image with 1 MiB
//! chunks, whatever the plan looks like: plans share a fixed budget and are
//! cut at the tail when they would not fit.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use stoker_controller::learning::{decode_from_status, encode_for_status};
use stoker_crds::image_prefetch::{MAX_IMAGES, MAX_LEARN_FROM_STARTS, MAX_STATUS_PLAN_BYTES};
use stoker_crds::{ImagePrefetchStatus, ImageStatus, NodeCounts, Phase, ScaleEvent};
use stoker_format::{Digest, Plan};

const LIMIT: usize = 64 << 10;
/// 20 GB of 1 MiB chunks.
const CHUNKS: u32 = 20 * 1024;

/// A permutation of `0..n` (Fisher–Yates with xorshift): the worst order for
/// the run-length encoding.
fn shuffled(n: u32) -> Vec<u32> {
    let mut v: Vec<u32> = (0..n).collect();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

/// A status as large as the controller makes it, around the given plans.
fn status_with(plans: &[Plan]) -> (ImagePrefetchStatus, Vec<bool>) {
    let budget = MAX_STATUS_PLAN_BYTES / plans.len();
    let now = Time(Timestamp::now());
    let mut truncated = Vec::new();
    let images = plans
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            let encoded = encode_for_status(plan, budget).unwrap();
            truncated.push(encoded.truncated);
            assert_eq!(decode_from_status(&encoded.base64).unwrap().chunks, plan.chunks[..encoded.chunks]);
            ImageStatus {
                image: format!("registry.example.com:5000/some-team/a-rather-long-image-name-{i}:v1.2.3-cuda12.4-py3.11"),
                index_digest: Some(plan.index_digest.to_string()),
                pods_learned: MAX_LEARN_FROM_STARTS,
                learned_from: (0..MAX_LEARN_FROM_STARTS).map(|p| format!("5f0c1b2e-8d4a-4f6b-9c3e-{p:012}")).collect(),
                hot_chunks: encoded.chunks as u64,
                hot_bytes: encoded.chunks as u64 * (1 << 20),
                plan: Some(encoded.base64),
                plan_truncated: encoded.truncated,
                updated_at: Some(now.clone()),
            }
        })
        .collect();
    let conditions = ["Ready", "Learning", "Warming", "Degraded"]
        .map(|t| Condition {
            type_: t.into(),
            status: "True".into(),
            reason: "SomeReasonThatIsLong".into(),
            message: "x".repeat(300),
            observed_generation: Some(12),
            last_transition_time: now.clone(),
        })
        .to_vec();
    let status = ImagePrefetchStatus {
        observed_generation: Some(12),
        phase: Phase::Warming,
        conditions,
        workload: Some("deployment/a-rather-long-deployment-name".into()),
        image_count: plans.len() as u32,
        hot_size: Some("20.0Gi".into()),
        warm_nodes: Some("4999/5000".into()),
        images,
        nodes: NodeCounts {
            total: 5000,
            warm: 4999,
            warming: 1,
            failed: 0,
        },
        last_scale_event: Some(ScaleEvent {
            time: now,
            from_replicas: 10,
            to_replicas: 500,
        }),
    };
    (status, truncated)
}

fn size(status: &ImagePrefetchStatus) -> usize {
    serde_json::to_vec(&serde_json::json!({ "status": status }))
        .unwrap()
        .len()
}

#[test]
fn a_two_gib_hot_set_of_a_20_gb_image_fits_whole() {
    // The default policy (maxHotSize 2Gi): 2048 chunks in the worst order.
    let chunks: Vec<u32> = shuffled(CHUNKS).into_iter().take(2048).collect();
    let plan = Plan {
        index_digest: Digest::of(b"20GB"),
        chunks,
    };
    let (status, truncated) = status_with(&[plan]);
    assert_eq!(truncated, [false], "a 2 GiB hot set is kept whole");
    let bytes = size(&status);
    assert!(bytes < LIMIT, "{bytes} bytes");
    eprintln!("20 GB image, 2 GiB hot set in random order: status {bytes} bytes");
}

#[test]
fn the_whole_20_gb_image_as_hot_set_is_cut_to_fit() {
    let plan = Plan {
        index_digest: Digest::of(b"20GB"),
        chunks: shuffled(CHUNKS),
    };
    let (status, truncated) = status_with(&[plan]);
    let bytes = size(&status);
    assert!(bytes < LIMIT, "{bytes} bytes");
    let kept = status.images[0].hot_chunks;
    eprintln!(
        "20 GB image, every chunk hot in random order: status {bytes} bytes, {kept} chunks kept, truncated {truncated:?}"
    );
    // In plan order, i.e. sequential reads, the whole image fits.
    let sequential = Plan {
        index_digest: Digest::of(b"20GB"),
        chunks: (0..CHUNKS).collect(),
    };
    let (status, truncated) = status_with(&[sequential]);
    assert_eq!(truncated, [false]);
    assert!(size(&status) < LIMIT);
}

#[test]
fn the_most_images_with_the_largest_plans_still_fit() {
    let plans: Vec<Plan> = (0..MAX_IMAGES)
        .map(|i| Plan {
            index_digest: Digest::of(&[i as u8]),
            chunks: shuffled(CHUNKS).into_iter().take(2048).collect(),
        })
        .collect();
    let (status, _) = status_with(&plans);
    let bytes = size(&status);
    assert!(bytes < LIMIT, "{bytes} bytes");
}
