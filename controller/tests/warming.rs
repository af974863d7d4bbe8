//! The warmer's event handling with in-process agents: which nodes get which
//! plans when nodes join, change, lose or gain their agent, when plans change,
//! when pushes fail, and when an ImagePrefetch goes away.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, node};
use kube::runtime::reflector::ObjectRef;
use stoker_controller::candidates::PodScheduling;
use stoker_controller::fake_agents::FakeAgents;
use stoker_controller::warmer::{PlanPush, PushState, Target, Warmer, WarmerConfig};
use stoker_crds::ImagePrefetch;

fn warmer(agents: &Arc<FakeAgents>) -> Arc<Warmer> {
    Warmer::new(
        agents.clone(),
        WarmerConfig {
            retry_base: Duration::from_millis(5),
            max_attempts: 3,
            ..WarmerConfig::default()
        },
    )
}

fn gpu_pods() -> PodScheduling {
    PodScheduling {
        node_selector: [("pool".to_string(), "gpu".to_string())].into(),
        ..PodScheduling::default()
    }
}

fn plan(digest: &str, bytes: &[u8]) -> PlanPush {
    PlanPush {
        image: "registry.example/app:1".into(),
        index_digest: digest.into(),
        plan: bytes.to_vec().into(),
        background_rest: false,
        learning_complete: false,
    }
}

fn target(plans: Vec<PlanPush>) -> Target {
    Target {
        placements: vec![gpu_pods()],
        plans,
        gate: true,
        warm_timeout_seconds: 600,
        ..Target::default()
    }
}

fn key(name: &str) -> ObjectRef<ImagePrefetch> {
    ObjectRef::new(name).within("ml")
}

fn pushed_nodes(agents: &FakeAgents) -> Vec<String> {
    let mut nodes: Vec<String> = agents.pushes().into_iter().map(|p| p.node).collect();
    nodes.sort();
    nodes
}

#[tokio::test]
async fn a_joining_candidate_node_gets_the_plan_others_do_not() {
    let agents = Arc::new(FakeAgents::new());
    let w = warmer(&agents);
    w.node_applied(&node("gpu-1", "gpu", false));
    w.node_applied(&node("cpu-1", "cpu", false));
    w.set_target(&key("app"), target(vec![plan("sha256:a", b"p1")]));
    eventually("gpu-1 warm", || w.counts(&key("app")).warm == 1).await;
    assert_eq!(pushed_nodes(&agents), ["gpu-1"]);

    // A new GPU node joins: only it is pushed to.
    w.node_applied(&node("gpu-2", "gpu", false));
    eventually("gpu-2 warm", || w.counts(&key("app")).warm == 2).await;
    assert_eq!(pushed_nodes(&agents), ["gpu-1", "gpu-2"]);

    // Updates that change nothing relevant push nothing again.
    w.node_applied(&node("gpu-2", "gpu", false));
    w.set_target(&key("app"), target(vec![plan("sha256:a", b"p1")]));
    assert_eq!(agents.push_count(), 2);

    // A relabelled node leaves the candidates; a deleted one too.
    w.node_applied(&node("gpu-2", "cpu", false));
    assert_eq!(w.counts(&key("app")).total, 1);
    w.node_applied(&node("gpu-3", "gpu", false));
    eventually("gpu-3 warm", || w.counts(&key("app")).warm == 2).await;
    w.node_deleted("gpu-3");
    let counts = w.counts(&key("app"));
    assert_eq!((counts.total, counts.warm), (1, 1));
    // A relist forgets nodes that are gone.
    w.retain_nodes(&HashSet::from(["cpu-1".to_string(), "gpu-2".to_string()]));
    assert_eq!(w.counts(&key("app")).total, 0);
    assert_eq!(w.node_count(), 2);
}

#[tokio::test]
async fn pushes_wait_for_the_agent_to_appear() {
    let agents = Arc::new(FakeAgents::new());
    agents.set_absent("gpu-1", true);
    let w = warmer(&agents);
    let p = plan("sha256:a", b"p1");
    w.node_applied(&node("gpu-1", "gpu", true));
    w.set_target(&key("app"), target(vec![p.clone()]));
    eventually("waiting for the agent", || {
        w.push_state("gpu-1", p.revision()) == Some(PushState::NoAgent)
    })
    .await;
    assert_eq!(w.counts(&key("app")).warming, 1);

    agents.set_absent("gpu-1", false);
    w.agent_appeared("gpu-1");
    eventually("warm once the agent is there", || {
        w.push_state("gpu-1", p.revision()) == Some(PushState::Warm)
    })
    .await;
    assert_eq!(agents.push_count(), 1);
}

#[tokio::test]
async fn failed_pushes_are_retried_then_reported_and_retried_again_on_scale_up() {
    let agents = Arc::new(FakeAgents::new());
    agents.set_failing("gpu-1", true);
    let w = warmer(&agents);
    let p = plan("sha256:a", b"p1");
    w.node_applied(&node("gpu-1", "gpu", false));
    w.set_target(&key("app"), target(vec![p.clone()]));
    eventually("gave up", || {
        matches!(
            w.push_state("gpu-1", p.revision()),
            Some(PushState::Failed {
                retrying: false,
                ..
            })
        )
    })
    .await;
    assert_eq!(agents.push_count(), 3, "three attempts");
    assert_eq!(w.counts(&key("app")).failed, 1);
    let failures = w.failures(&key("app"), 5);
    assert_eq!(failures.len(), 1);
    assert!(
        failures[0].starts_with("gpu-1: ") && failures[0].contains("registry returned 503"),
        "{failures:?}"
    );

    // Fixed; the workload scales up: the failed node is tried again.
    agents.set_failing("gpu-1", false);
    w.retry_failed(&key("app"));
    eventually("warm after the retry", || w.counts(&key("app")).warm == 1).await;
}

#[tokio::test]
async fn a_new_plan_is_pushed_to_nodes_warm_with_the_old_one() {
    let agents = Arc::new(FakeAgents::new());
    let w = warmer(&agents);
    w.node_applied(&node("gpu-1", "gpu", false));
    w.set_target(&key("app"), target(vec![plan("sha256:a", b"first")]));
    eventually("warm", || w.counts(&key("app")).warm == 1).await;
    // Learning merged another start: the plan grew.
    let grown = plan("sha256:a", b"first+more");
    w.set_target(&key("app"), target(vec![grown.clone()]));
    assert_eq!(
        w.counts(&key("app")).warm,
        0,
        "not warm for the new plan yet"
    );
    eventually("warm again", || {
        w.push_state("gpu-1", grown.revision()) == Some(PushState::Warm)
    })
    .await;
    let pushes = agents.pushes();
    assert_eq!(pushes.len(), 2);
    assert_eq!(pushes[1].plan_len, b"first+more".len());
}

#[tokio::test]
async fn removing_an_imageprefetch_cancels_what_only_it_wanted() {
    let agents = Arc::new(FakeAgents::new());
    agents.set_stalled("gpu-1", true);
    let w = warmer(&agents);
    w.node_applied(&node("gpu-1", "gpu", false));
    let shared = plan("sha256:shared", b"s");
    let own = plan("sha256:own", b"o");
    w.set_target(&key("a"), target(vec![shared.clone(), own.clone()]));
    w.set_target(&key("b"), target(vec![shared.clone()]));
    eventually("both pushes running", || agents.push_count() == 2).await;

    let cancel = w.remove_target(&key("a"));
    assert_eq!(cancel, [("gpu-1".to_string(), "sha256:own".to_string())]);
    assert_eq!(w.push_state("gpu-1", own.revision()), None);
    assert!(matches!(
        w.push_state("gpu-1", shared.revision()),
        Some(PushState::Running { .. })
    ));
}

#[tokio::test]
async fn gate_targets_list_the_gating_plans_of_a_node() {
    let agents = Arc::new(FakeAgents::new());
    agents.set_stalled("gpu-new", true);
    let w = warmer(&agents);
    w.node_applied(&node("gpu-new", "gpu", true));
    w.node_applied(&node("gpu-old", "gpu", false));
    w.set_target(
        &key("gated"),
        target(vec![plan("sha256:b", b"b"), plan("sha256:a", b"a")]),
    );
    let mut ungated = target(vec![plan("sha256:c", b"c")]);
    ungated.gate = false;
    w.set_target(&key("ungated"), ungated);
    assert_eq!(w.gate_target("gpu-new"), None, "nothing before sync");
    w.set_synced();
    let (target, current) = w.gate_target("gpu-new").unwrap();
    assert_eq!(target.index_digests, ["sha256:a", "sha256:b"]);
    assert_eq!((target.timeout_seconds, current), (600, None));
    assert_eq!(
        w.gate_target("gpu-old"),
        None,
        "ungated nodes have no target"
    );
    let mut dirty = w.take_dirty_gates();
    dirty.sort();
    assert_eq!(dirty, ["gpu-new"]);
}
