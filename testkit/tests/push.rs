//! Test images push to the test registry with skopeo, keep their digests, survive a
//! registry restart, and the registry logs the requests (including ranged blob reads).

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use stoker_testkit::image::{
    StandardImageSizes, malicious_layers, multi_platform_images, push_layout,
    standard_test_image_with, write_multi_platform_layout,
};
use stoker_testkit::registry::TestRegistry;
use stoker_testkit::require_tool;

/// Raw manifest bytes as the registry serves them, through skopeo.
fn fetch_manifest(host: &str, repo_tag: &str) -> Vec<u8> {
    let output = Command::new("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("docker://{host}/{repo_tag}"))
        .output()
        .expect("skopeo runs");
    assert!(
        output.status.success(),
        "skopeo inspect: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// `GET path` with a Range header over a plain socket: (status, body).
fn ranged_get(host: &str, path: &str, range: &str) -> (u16, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nRange: {range}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers end");
    let status = String::from_utf8_lossy(&response[9..12])
        .parse()
        .expect("status");
    (status, response[split + 4..].to_vec())
}

#[test]
fn standard_image_pushes_and_survives_a_restart() {
    let test = "standard_image_pushes_and_survives_a_restart";
    if !require_tool(test, "docker-registry") || !require_tool(test, "skopeo") {
        return;
    }
    let mut registry = TestRegistry::start().expect("registry starts");
    let work = tempfile::tempdir().expect("tempdir");
    let image = standard_test_image_with(StandardImageSizes::SMALL);
    let written = image.write_layout(work.path(), "v1").expect("layout");
    push_layout(work.path(), "v1", &registry.host(), "test/standard:v1").expect("push");

    let manifest = fetch_manifest(&registry.host(), "test/standard:v1");
    assert_eq!(
        sha256_digest(&manifest),
        written.manifest.digest,
        "digest preserved"
    );

    let (requests, all_logged) = registry.wait_for_requests(Duration::from_secs(10), |r| {
        r.iter()
            .any(|r| r.method == "PUT" && r.path == "/v2/test/standard/manifests/v1")
            && r.iter()
                .filter(|r| r.is_blob_get() || r.method == "GET")
                .count()
                > 0
    });
    assert!(all_logged, "manifest PUT and GET logged: {requests:#?}");
    let manifest_put = requests
        .iter()
        .find(|r| r.method == "PUT" && r.path == "/v2/test/standard/manifests/v1")
        .expect("manifest PUT");
    assert_eq!(manifest_put.status, 201);
    let blob_puts = requests
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/") && r.status == 201)
        .count();
    assert_eq!(blob_puts, 3, "two layers and the config uploaded");

    // A ranged read of the first layer: 206 with exactly the bytes asked for.
    registry.clear_requests();
    let layer = &written.layers[0].blob;
    let blob_path = format!("/v2/test/standard/blobs/{}", layer.digest);
    let (status, body) = ranged_get(&registry.host(), &blob_path, "bytes=10-109");
    assert_eq!(status, 206);
    let stored = std::fs::read(stoker_testkit::image::blob_path(work.path(), &layer.digest))
        .expect("layer blob");
    assert_eq!(body, stored[10..110]);
    let (requests, logged) = registry.wait_for_requests(Duration::from_secs(10), |r| {
        r.iter().any(|r| r.is_blob_get())
    });
    assert!(logged, "{requests:#?}");
    let blob_get = requests.iter().find(|r| r.is_blob_get()).expect("blob GET");
    assert_eq!(
        (
            blob_get.status,
            blob_get.response_bytes,
            blob_get.range.clone()
        ),
        (206, 100, None),
        "status and size are logged, the Range header is not"
    );

    registry.stop();
    registry.restart().expect("restart");
    let manifest_again = fetch_manifest(&registry.host(), "test/standard:v1");
    assert_eq!(manifest_again, manifest, "content survives a restart");
}

#[test]
fn multi_platform_index_pushes_with_all_platforms() {
    let test = "multi_platform_index_pushes_with_all_platforms";
    if !require_tool(test, "docker-registry") || !require_tool(test, "skopeo") {
        return;
    }
    let registry = TestRegistry::start().expect("registry starts");
    let work = tempfile::tempdir().expect("tempdir");
    let written = write_multi_platform_layout(work.path(), "multi", &multi_platform_images())
        .expect("layout");
    push_layout(work.path(), "multi", &registry.host(), "test/multi:v1").expect("push");
    let index = fetch_manifest(&registry.host(), "test/multi:v1");
    assert_eq!(sha256_digest(&index), written.index.digest);
    for image in &written.images {
        let manifest = fetch_manifest(
            &registry.host(),
            &format!("test/multi@{}", image.manifest.digest),
        );
        assert_eq!(sha256_digest(&manifest), image.manifest.digest);
    }
}

#[test]
fn pushable_malicious_images_reach_the_registry() {
    let test = "pushable_malicious_images_reach_the_registry";
    if !require_tool(test, "docker-registry") || !require_tool(test, "skopeo") {
        return;
    }
    let registry = TestRegistry::start().expect("registry starts");
    for bad in malicious_layers().into_iter().filter(|bad| bad.pushable) {
        let work = tempfile::tempdir().expect("tempdir");
        bad.image.write_layout(work.path(), "bad").expect("layout");
        push_layout(
            work.path(),
            "bad",
            &registry.host(),
            &format!("bad/{}:v1", bad.name),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", bad.name));
    }
}
