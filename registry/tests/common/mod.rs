//! Shared set-up for the integration tests: a real `docker-registry` (through
//! stoker-testkit), the fault proxy, client configurations and test content.

#![allow(dead_code)]

use std::time::Duration;

use bytes::Bytes;
use stoker_registry::{
    Digest, OCI_MANIFEST, Reference, RegistryClient, RegistryConfig, RetryPolicy, parse_reference,
};
use stoker_testkit::registry::TestRegistry;

// The proxy lives in stoker-testkit (testkit/src/fault_proxy.rs); it is compiled in here
// directly until testkit depends on hyper, http-body-util and bytes itself.
#[path = "../../../testkit/src/fault_proxy.rs"]
pub mod fault_proxy;

/// Starts a registry, or prints `SKIPPED` and returns `None` if `docker-registry` is not
/// installed.
pub fn start_registry(test: &str) -> Option<TestRegistry> {
    if !stoker_testkit::require_tool(test, "docker-registry") {
        return None;
    }
    Some(TestRegistry::start().expect("starting docker-registry"))
}

/// Plain HTTP, no docker config, short timeouts and back-off so fault tests run fast.
pub fn config() -> RegistryConfig {
    RegistryConfig {
        plain_http: true,
        docker_config: None,
        request_timeout: Duration::from_secs(5),
        read_deadline: Duration::from_secs(20),
        retry: RetryPolicy {
            max_attempts: 6,
            base_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(200),
        },
        ..RegistryConfig::default()
    }
}

pub fn client(config: RegistryConfig) -> RegistryClient {
    RegistryClient::new(config).expect("building the client")
}

pub fn repo(host: &str, name: &str) -> Reference {
    parse_reference(&format!("{host}/{name}")).expect("valid reference")
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
pub fn test_bytes(len: usize, seed: u64) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// Pushes a one-layer OCI image (config + layer + manifest, tagged `tag`) and returns
/// (manifest digest, layer digest).
pub async fn push_image(
    client: &RegistryClient,
    repo: &Reference,
    tag: &str,
    layer: Bytes,
) -> (Digest, Digest) {
    let config = Bytes::from_static(
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let (config_digest, config_size) = client.push_blob(repo, config).await.expect("push config");
    let (layer_digest, layer_size) = client.push_blob(repo, layer).await.expect("push layer");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest.to_string(), "size": layer_size}],
    });
    let reference = format!("{}/{}:{tag}", repo.registry(), repo.repository());
    let digest = client
        .push_manifest(&reference, Bytes::from(manifest.to_string()), OCI_MANIFEST)
        .await
        .expect("push manifest");
    (digest, layer_digest)
}

/// An artifact manifest (empty config) of `artifact_type` whose subject is `subject`.
pub async fn artifact_manifest(
    client: &RegistryClient,
    repo: &Reference,
    subject: &Digest,
    subject_size: u64,
    artifact_type: &str,
    annotation: &str,
) -> Bytes {
    let (empty, _) = client
        .push_blob(repo, Bytes::from_static(b"{}"))
        .await
        .expect("push the empty config");
    let payload = client
        .push_blob(repo, Bytes::from(format!("payload of {annotation}")))
        .await
        .expect("push payload");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.to_string(), "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": payload.0.to_string(), "size": payload.1}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": subject_size},
        "annotations": {"org.example.name": annotation},
    });
    Bytes::from(manifest.to_string())
}
