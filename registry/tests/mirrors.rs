//! Registry mirrors against real registries: manifest, referrer and ranged reads go
//! to the configured mirror first, and to the registry itself when the mirror lacks
//! the content or is down.

mod common;

use std::time::Duration;

use stoker_testkit::registry::TestRegistry;

use common::{client, config, push_image, repo, start_registry, test_bytes};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn reads_go_to_the_mirror_first_and_fall_back_to_the_registry() {
    let Some(mut origin) =
        start_registry("reads_go_to_the_mirror_first_and_fall_back_to_the_registry")
    else {
        return;
    };
    let mut mirror = TestRegistry::start().expect("starting the mirror registry");
    let direct = client(config());
    let origin_repo = repo(&origin.host(), "team/app");
    let mirror_repo = repo(&mirror.host(), "team/app");

    // Both hold image v1 (the mirror as a pull-through cache would); one blob is only
    // at the origin.
    let layer = test_bytes(1 << 20, 7);
    let (manifest_digest, layer_digest) =
        push_image(&direct, &mirror_repo, "v1", layer.clone()).await;
    push_image(&direct, &origin_repo, "v1", layer.clone()).await;
    let only_at_origin = test_bytes(4096, 8);
    let (only_digest, _) = direct
        .push_blob(&origin_repo, only_at_origin.clone())
        .await
        .expect("push a blob to the origin");

    let mut with_mirror = config();
    with_mirror
        .mirrors
        .insert(origin.host(), vec![format!("http://{}", mirror.host())]);
    let client = client(with_mirror);
    origin.clear_requests();
    mirror.clear_requests();

    // The manifest and a range come from the mirror; the origin is not asked.
    let fetched = client
        .fetch_manifest(&format!("{}/team/app:v1", origin.host()))
        .await
        .expect("manifest through the mirror");
    assert_eq!(fetched.digest, manifest_digest);
    let bytes = client
        .read_range(&origin_repo, &layer_digest, 100..5000)
        .await
        .expect("range through the mirror");
    assert_eq!(&bytes[..], &layer[100..5000]);
    let (at_mirror, _) = mirror.wait_for_requests(DEADLINE, |requests| {
        requests.iter().any(|r| r.is_blob_get())
            && requests.iter().any(|r| r.path.contains("/manifests/v1"))
    });
    assert!(
        at_mirror.iter().any(|r| r.path.contains("/manifests/v1")),
        "{at_mirror:?}"
    );
    assert!(origin.requests().is_empty(), "{:?}", origin.requests());

    // A blob the mirror lacks (404) comes from the registry.
    let bytes = client
        .read_range(&origin_repo, &only_digest, 0..4096)
        .await
        .expect("the origin serves what the mirror lacks");
    assert_eq!(bytes, only_at_origin);

    // With the mirror down, reads fall back to the registry, and keep working.
    mirror.stop();
    for _ in 0..2 {
        let bytes = client
            .read_range(&origin_repo, &layer_digest, 0..10)
            .await
            .expect("the origin serves when the mirror is down");
        assert_eq!(&bytes[..], &layer[..10]);
    }
    let (at_origin, _) = origin.wait_for_requests(DEADLINE, |requests| {
        requests.iter().filter(|r| r.is_blob_get()).count() >= 3
    });
    assert!(
        at_origin
            .iter()
            .filter(|r| r.path.ends_with(&layer_digest.to_string()))
            .count()
            >= 2,
        "{at_origin:?}"
    );
    origin.stop();
}

#[test]
fn a_mirror_that_is_not_a_url_is_refused_by_name() {
    let mut bad = config();
    bad.mirrors.insert(
        "docker.io".into(),
        vec!["https://mirror.example/v2/library".into()],
    );
    let error = stoker_registry::RegistryClient::new(bad)
        .err()
        .expect("a path in a mirror URL is refused");
    assert!(
        error.to_string().contains("mirror.example/v2/library"),
        "{error}"
    );
}
