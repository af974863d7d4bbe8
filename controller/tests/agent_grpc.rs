//! The controller's agent client against a real agent (`common::agent_node`):
//! `stoker-agent`'s API service served on TCP with mutual TLS (certificates
//! generated there), its prefetch executor fetching from a real
//! docker-registry on loopback, and its trace store. The controller pushes a plan through its warmer and watches
//! the progress, collects a trace and learns a plan from it, and a client
//! without a certificate is refused.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::agent_node::{AgentNode, Pki, SERVER_NAME, registry_image};
use futures::StreamExt;
use stoker_agent::trace::TraceSubject;
use stoker_api::agent::{PrefetchRequest, PrefetchState};
use stoker_controller::agents::{AgentApi, AgentDirectory, AgentTlsFiles, GrpcAgents};
use stoker_controller::candidates::PodScheduling;
use stoker_controller::learning::{self, TracePick};
use stoker_controller::warmer::{PlanPush, PushState, Target, Warmer, WarmerConfig};
use stoker_format::{Index, Plan};
use stoker_lazyfs::ChunkAccess;

const NODE: &str = "node-a";

fn agents_for(node: &AgentNode, tls: Option<tonic::transport::ClientTlsConfig>) -> Arc<GrpcAgents> {
    let directory = Arc::new(AgentDirectory::new());
    directory.insert(NODE, IpAddr::V4(Ipv4Addr::LOCALHOST));
    Arc::new(GrpcAgents::new(directory, node.port, tls))
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A regular file of the index with at least `n` chunks: (inode, its chunks).
fn file_with_chunks(index: &Index, n: usize) -> (u32, Vec<stoker_format::FileChunk>) {
    (0..index.inode_count())
        .map(|id| (id, index.file_chunks(id).collect::<Vec<_>>()))
        .find(|(_, chunks)| chunks.len() >= n)
        .expect("a file with enough chunks")
}

fn node_object() -> k8s_openapi::api::core::v1::Node {
    serde_json::from_value(serde_json::json!({"metadata": {"name": NODE}})).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_pushes_plans_and_collects_traces_over_mutual_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let Some(image) = registry_image().await else {
        return;
    };
    let pki = Pki::generate();
    let node = AgentNode::start(&pki, image.client.clone()).await;
    let agents = agents_for(&node, Some(pki.client_files().load().unwrap()));

    // 1. Push a plan through the warmer, as a node joining would: every chunk.
    let index = node
        .images
        .load_index(&image.reference, &image.index_digest)
        .await
        .expect("index");
    let plan = Plan {
        index_digest: image.index_digest,
        chunks: (0..index.chunk_count()).collect(),
    };
    let push = PlanPush {
        image: image.reference.clone(),
        index_digest: image.index_digest.to_string(),
        plan: plan.encode().unwrap().into(),
        background_rest: false,
        learning_complete: false,
    };
    let warmer = Warmer::new(agents.clone(), WarmerConfig::default());
    warmer.node_applied(&node_object());
    let key = kube::runtime::reflector::ObjectRef::new("app").within("ml");
    warmer.set_target(
        &key,
        Target {
            placements: vec![PodScheduling::default()],
            plans: vec![push.clone()],
            gate: true,
            warm_timeout_seconds: 600,
            ..Target::default()
        },
    );
    eventually("the node to be warm", || {
        warmer.push_state(NODE, push.revision()) == Some(PushState::Warm)
    })
    .await;
    let counts = warmer.counts(&key);
    assert_eq!((counts.total, counts.warm, counts.failed), (1, 1, 0));
    for location in index.chunks() {
        assert!(
            node.cache.contains(&location.digest),
            "chunk {} is not on the node",
            location.digest
        );
    }

    // 2. Watch the progress of a prefetch directly: counts only grow, the last
    // message is final. (Everything is cached now, so it completes at once.)
    let mut stream = agents
        .prefetch(
            NODE,
            PrefetchRequest {
                image_ref: image.reference.clone(),
                index_digest: image.index_digest.to_string(),
                plan: push.plan.to_vec(),
                background_rest: false,
                learning_complete: false,
            },
        )
        .await
        .unwrap();
    let mut messages = Vec::new();
    while let Some(message) = stream.next().await {
        messages.push(message.unwrap());
    }
    let last = messages.last().expect("progress");
    assert_eq!(last.state, PrefetchState::Done as i32);
    assert_eq!(last.chunks_done, u64::from(index.chunk_count()));
    assert!(
        messages
            .windows(2)
            .all(|w| w[0].chunks_done <= w[1].chunks_done)
    );

    // 3. A container starts and reads three chunks of a file; its pod turns
    // Ready, the controller closes the window and collects the trace.
    let (inode, chunks) = file_with_chunks(&index, 3);
    let started = node
        .traces
        .record(TraceSubject {
            image_ref: image.reference.clone(),
            index_digest: image.index_digest,
            index: index.clone(),
            container_id: "ctr-1".into(),
        })
        .unwrap();
    let read_order = [chunks[2], chunks[0], chunks[1]];
    for chunk in read_order {
        started
            .events
            .send(ChunkAccess {
                chunk: chunk.chunk,
                inode,
                file_offset: chunk.file_offset,
                at: std::time::Instant::now(),
            })
            .unwrap();
    }
    assert!(
        agents.container_ready(NODE, "ctr-1").await.unwrap(),
        "the window closes on readiness"
    );
    let traces = agents.list_traces(NODE).await.unwrap();
    let TracePick::Complete(trace_id) = learning::pick_trace(&traces, "ctr-1", &image.reference, 0)
    else {
        panic!("no complete trace for ctr-1 in {traces:?}");
    };
    let trace =
        learning::trace_from_agent(&agents.get_trace(NODE, &trace_id).await.unwrap()).unwrap();
    let got: Vec<(u32, u32, u64)> = trace
        .entries
        .iter()
        .map(|e| (e.chunk, e.len, e.file_offset))
        .collect();
    let want: Vec<(u32, u32, u64)> = read_order
        .iter()
        .map(|c| (c.chunk, c.len, c.file_offset))
        .collect();
    assert_eq!(got, want);
    let path = String::from_utf8(index.path_of(inode)).unwrap();
    assert_eq!(trace.files, [format!("/{}", path.trim_start_matches('/'))]);
    let learned = learning::fold_trace(None, &trace, 2 << 30).unwrap();
    assert_eq!(learned.plan.chunks, read_order.map(|c| c.chunk));
    assert_eq!(
        learned.hot_bytes,
        read_order.iter().map(|c| u64::from(c.len)).sum::<u64>()
    );

    // 4. Errors are clear: an unknown trace, a bad plan.
    let missing = agents.get_trace(NODE, "no-such-trace").await.unwrap_err();
    assert!(missing.to_string().contains("NotFound"), "{missing}");
    let bad = agents
        .prefetch(
            NODE,
            PrefetchRequest {
                image_ref: image.reference.clone(),
                index_digest: image.index_digest.to_string(),
                plan: b"not a plan".to_vec(),
                background_rest: false,
                learning_complete: false,
            },
        )
        .await
        .err()
        .expect("a bad plan is refused");
    assert!(bad.to_string().contains("InvalidArgument"), "{bad}");

    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_from_the_ca_are_refused() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let pki = Pki::generate();
    let other = Pki::generate();
    let client =
        stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig::default()).unwrap();
    let node = AgentNode::start(&pki, client).await;

    // No client certificate at all.
    let ca_only = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(pki.path("ca.crt")).unwrap(),
        ))
        .domain_name(SERVER_NAME)
        .assume_http2(true);
    let error = agents_for(&node, Some(ca_only))
        .list_traces(NODE)
        .await
        .unwrap_err();
    assert!(
        matches!(error, stoker_controller::Error::Agent { .. }),
        "{error}"
    );

    // A certificate from another CA.
    let mut foreign = other.client_files();
    foreign.ca = pki.path("ca.crt");
    let error = agents_for(&node, Some(foreign.load().unwrap()))
        .list_traces(NODE)
        .await
        .unwrap_err();
    assert!(
        matches!(error, stoker_controller::Error::Agent { .. }),
        "{error}"
    );

    // Plain HTTP/2.
    assert!(agents_for(&node, None).list_traces(NODE).await.is_err());

    // The right certificate works.
    let ok = agents_for(&node, Some(pki.client_files().load().unwrap()))
        .list_traces(NODE)
        .await
        .unwrap();
    assert!(ok.is_empty());
    node.stop().await;
}

#[test]
fn missing_certificate_files_are_named() {
    let files = AgentTlsFiles {
        ca: Path::new("/nonexistent/ca.crt").into(),
        cert: Path::new("/nonexistent/tls.crt").into(),
        key: Path::new("/nonexistent/tls.key").into(),
        server_name: SERVER_NAME.into(),
    };
    let error = files.load().unwrap_err().to_string();
    assert!(error.contains("/nonexistent/ca.crt"), "{error}");
}
