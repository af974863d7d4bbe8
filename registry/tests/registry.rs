//! The client against a real `docker-registry` (distribution 2.8) on loopback: pushes,
//! manifests, blob streams, ranged reads, the referrers tag fallback, and plain-HTTP
//! fallback for loopback registries.

mod common;

use bytes::Bytes;
use futures::TryStreamExt;
use stoker_registry::{Digest, OCI_INDEX, OCI_MANIFEST, RegistryError, referrers_fallback_tag};

use common::{artifact_manifest, client, config, push_image, repo, start_registry, test_bytes};

#[tokio::test]
async fn pushes_and_pulls_back_blobs_and_manifests() {
    let Some(registry) = start_registry("pushes_and_pulls_back_blobs_and_manifests") else {
        return;
    };
    let client = client(config());
    let repo = repo(&registry.host(), "stoker/app");
    let layer = test_bytes(3 * 1024 * 1024 + 17, 1);

    let (manifest_digest, layer_digest) = push_image(&client, &repo, "v1", layer.clone()).await;
    assert_eq!(layer_digest, Digest::of(&layer));
    assert!(client.blob_exists(&repo, &layer_digest).await.unwrap());
    assert!(
        !client
            .blob_exists(&repo, &Digest::of(b"absent"))
            .await
            .unwrap()
    );

    // By tag and by digest, the bytes and media type come back.
    let by_tag = client
        .fetch_manifest(&format!("{}/stoker/app:v1", registry.host()))
        .await
        .unwrap();
    assert_eq!(by_tag.digest, manifest_digest);
    assert_eq!(by_tag.media_type, OCI_MANIFEST);
    assert!(!by_tag.is_index());
    let by_digest = client
        .fetch_manifest(&format!("{}/stoker/app@{manifest_digest}", registry.host()))
        .await
        .unwrap();
    assert_eq!(by_digest.bytes, by_tag.bytes);
    let image = by_digest.image_manifest().unwrap();
    assert_eq!(
        image.layers()[0].digest().to_string(),
        layer_digest.to_string()
    );

    // Pushing a blob that exists is skipped: no upload session is opened.
    registry.clear_requests();
    client.push_blob(&repo, layer.clone()).await.unwrap();
    let (requests, _) = registry.wait_for_requests(std::time::Duration::from_secs(5), |r| {
        r.iter().any(|r| r.method == "HEAD")
    });
    assert!(
        requests
            .iter()
            .all(|r| r.method != "POST" && r.method != "PATCH"),
        "{requests:?}"
    );

    // The whole blob streams back, verified.
    let streamed: Vec<Bytes> = client
        .blob_stream(&repo, &layer_digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), layer.to_vec());

    // A streamed upload (several 4 MiB PATCH chunks) hashes on the way.
    let big = test_bytes(9 * 1024 * 1024 + 3, 2);
    let chunks: Vec<std::io::Result<Bytes>> = big
        .chunks(1_000_000)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let (digest, size) = client
        .push_blob_stream(&repo, futures::stream::iter(chunks))
        .await
        .unwrap();
    assert_eq!((digest, size), (Digest::of(&big), big.len() as u64));
    let tail = client
        .read_range(&repo, &digest, size - 100..size)
        .await
        .unwrap();
    assert_eq!(&tail[..], &big[big.len() - 100..]);

    // The empty blob can be pushed from an empty stream.
    let (empty, size) = client
        .push_blob_stream(&repo, futures::stream::empty())
        .await
        .unwrap();
    assert_eq!((empty, size), (Digest::of(b""), 0));
}

#[tokio::test]
async fn ranged_reads_return_exact_bytes() {
    let Some(registry) = start_registry("ranged_reads_return_exact_bytes") else {
        return;
    };
    let client = client(config());
    let repo = repo(&registry.host(), "ranges");
    let blob = test_bytes(2 * 1024 * 1024 + 5, 3);
    let (digest, _) = client.push_blob(&repo, blob.clone()).await.unwrap();
    let len = blob.len() as u64;

    for range in [
        0..1,
        0..4096,
        1000..5000,
        len - 10..len,
        0..len,
        12345..12346,
    ] {
        let bytes = client
            .read_range(&repo, &digest, range.clone())
            .await
            .unwrap();
        assert_eq!(
            &bytes[..],
            &blob[range.start as usize..range.end as usize],
            "{range:?}"
        );
    }
    assert!(
        client
            .read_range(&repo, &digest, 7..7)
            .await
            .unwrap()
            .is_empty()
    );

    // The registry logs 206 answers with exactly the requested sizes.
    let (requests, _) = registry.wait_for_requests(std::time::Duration::from_secs(5), |r| {
        r.iter().filter(|r| r.is_blob_get()).count() >= 6
    });
    let blob_gets: Vec<_> = requests.iter().filter(|r| r.is_blob_get()).collect();
    assert!(blob_gets.iter().all(|r| r.status == 206), "{blob_gets:?}");
    assert!(blob_gets.iter().any(|r| r.response_bytes == 4000));

    // Past the end: a clear, permanent error.
    let error = client
        .read_range(&repo, &digest, len..len + 10)
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains(&digest.to_string()), "{error}");

    // An unknown blob: not found, at once.
    let missing = Digest::of(b"missing");
    let error = client.read_range(&repo, &missing, 0..10).await.unwrap_err();
    assert!(error.is_not_found(), "{error}");
}

#[tokio::test]
async fn referrers_fallback_tag_round_trip_with_two_artifacts() {
    let Some(registry) = start_registry("referrers_fallback_tag_round_trip_with_two_artifacts")
    else {
        return;
    };
    let client = client(config());
    let repo = repo(&registry.host(), "with/referrers");
    let (subject, _) = push_image(&client, &repo, "latest", test_bytes(1000, 4)).await;
    let subject_size = client
        .fetch_manifest(&format!("{}/with/referrers@{subject}", registry.host()))
        .await
        .unwrap()
        .bytes
        .len() as u64;
    let stoker_type = "application/vnd.stoker.index.v1";

    assert!(
        client
            .find_referrers(&repo, &subject, stoker_type)
            .await
            .unwrap()
            .is_empty()
    );

    let first = artifact_manifest(&client, &repo, &subject, subject_size, stoker_type, "one").await;
    let second =
        artifact_manifest(&client, &repo, &subject, subject_size, stoker_type, "two").await;
    let other = artifact_manifest(
        &client,
        &repo,
        &subject,
        subject_size,
        "application/x-sbom",
        "sbom",
    )
    .await;
    let first_digest = client
        .attach_referrer(&repo, first.clone(), &subject)
        .await
        .unwrap();
    let second_digest = client
        .attach_referrer(&repo, second, &subject)
        .await
        .unwrap();
    client
        .attach_referrer(&repo, other, &subject)
        .await
        .unwrap();
    // Attaching again does not duplicate the entry.
    assert_eq!(
        client
            .attach_referrer(&repo, first, &subject)
            .await
            .unwrap(),
        first_digest
    );

    let found = client
        .find_referrers(&repo, &subject, stoker_type)
        .await
        .unwrap();
    let digests: Vec<String> = found.iter().map(|d| d.digest().to_string()).collect();
    assert_eq!(
        digests,
        vec![first_digest.to_string(), second_digest.to_string()]
    );
    assert_eq!(
        found[1].annotations().as_ref().unwrap()["org.example.name"],
        "two"
    );
    assert_eq!(
        found[0].artifact_type().as_ref().unwrap().to_string(),
        stoker_type
    );

    // The fallback tag holds one index with the three referrers.
    let index = client
        .fetch_manifest(&format!(
            "{}/with/referrers:{}",
            registry.host(),
            referrers_fallback_tag(&subject)
        ))
        .await
        .unwrap();
    assert_eq!(index.media_type, OCI_INDEX);
    assert_eq!(index.image_index().unwrap().manifests().len(), 3);

    // A manifest whose subject is another image is refused before anything is pushed.
    let wrong = Digest::of(b"another image");
    let error = client
        .attach_referrer(&repo, Bytes::from(index.bytes.to_vec()), &wrong)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::InvalidManifest { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn loopback_registry_without_tls_falls_back_to_plain_http() {
    let Some(registry) = start_registry("loopback_registry_without_tls_falls_back_to_plain_http")
    else {
        return;
    };
    let plain = client(config());
    let repo = repo(&registry.host(), "fallback");
    let (manifest, _) = push_image(&plain, &repo, "v1", test_bytes(100, 5)).await;

    let https_first = client(stoker_registry::RegistryConfig {
        plain_http: false,
        ..config()
    });
    let fetched = https_first
        .fetch_manifest(&format!("{}/fallback:v1", registry.host()))
        .await
        .unwrap();
    assert_eq!(fetched.digest, manifest);
}

#[tokio::test]
async fn digest_references_are_verified() {
    let Some(registry) = start_registry("digest_references_are_verified") else {
        return;
    };
    let client = client(config());
    let repo = repo(&registry.host(), "verify");
    push_image(&client, &repo, "v1", test_bytes(10, 6)).await;
    // A digest that no manifest has: not found, not a wrong manifest.
    let error = client
        .fetch_manifest(&format!(
            "{}/verify@{}",
            registry.host(),
            Digest::of(b"nope")
        ))
        .await
        .unwrap_err();
    assert!(error.is_not_found(), "{error}");
    // Pushing bytes under a digest they do not have is refused locally.
    let error = client
        .push_manifest(
            &format!("{}/verify@{}", registry.host(), Digest::of(b"nope")),
            Bytes::from_static(b"{}"),
            OCI_MANIFEST,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::InvalidReference { .. }),
        "{error}"
    );
}
