//! The client against a real `docker-registry` behind the fault proxy: retries, rate
//! limits, token expiry, redirects, outages, broken bodies, and credentials that must
//! never reach the logs.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use stoker_registry::{
    Digest, OCI_MANIFEST, Reference, RegistryClient, RegistryConfig, RegistryError,
};
use stoker_testkit::registry::TestRegistry;

use common::fault_proxy::{Fault, FaultProxy, Listener, ProxyAuth, Scope};
use common::{client, config, push_image, repo, start_registry, test_bytes};

const USER: &str = "stoker-user";
const PASSWORD: &str = "pw-9f8e7d6c-never-logged";
const IDENTITY_TOKEN: &str = "identity-5a4b3c2d-never-logged";

/// A registry with one blob in `faults/app`, and a proxy in front of it.
struct Setup {
    registry: TestRegistry,
    proxy: FaultProxy,
    blob: Bytes,
    digest: Digest,
}

impl Setup {
    async fn new(test: &str) -> Option<Setup> {
        let registry = start_registry(test)?;
        let blob = test_bytes(1024 * 1024 + 333, 42);
        let direct = client(config());
        let (digest, _) = direct
            .push_blob(&repo(&registry.host(), "faults/app"), blob.clone())
            .await
            .expect("seeding the registry");
        let proxy = FaultProxy::start(&registry.host())
            .await
            .expect("starting the fault proxy");
        Some(Setup {
            registry,
            proxy,
            blob,
            digest,
        })
    }

    fn repo(&self) -> Reference {
        repo(&self.proxy.host(), "faults/app")
    }

    fn expect(&self, range: std::ops::Range<u64>) -> &[u8] {
        &self.blob[range.start as usize..range.end as usize]
    }

    fn blob_statuses(&self, listener: Listener) -> Vec<u16> {
        self.proxy
            .requests()
            .iter()
            .filter(|r| r.listener == listener && r.is_blob_get())
            .map(|r| r.status)
            .collect()
    }
}

fn with_password() -> RegistryConfig {
    RegistryConfig {
        basic_auth: Some((USER.into(), PASSWORD.into())),
        ..config()
    }
}

fn proxy_auth() -> ProxyAuth {
    ProxyAuth {
        basic: Some((USER.into(), PASSWORD.into())),
        identity_token: Some(IDENTITY_TOKEN.into()),
        token_max_uses: None,
    }
}

#[tokio::test]
async fn ranged_read_through_the_proxy_sends_the_exact_range() {
    let Some(setup) = Setup::new("ranged_read_through_the_proxy_sends_the_exact_range").await
    else {
        return;
    };
    let client = client(config());
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 1000..5000)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(1000..5000));
    let ranges: Vec<Option<String>> = setup
        .proxy
        .requests()
        .iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.range.clone())
        .collect();
    assert_eq!(ranges, vec![Some("bytes=1000-4999".to_string())]);
}

#[tokio::test]
async fn retries_through_flapping_503s() {
    let Some(setup) = Setup::new("retries_through_flapping_503s").await else {
        return;
    };
    let client = client(config());
    setup
        .proxy
        .set_fault_with(Fault::Status(503), Scope::Blobs, Some(3));
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 0..4096)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..4096));
    assert_eq!(
        setup.blob_statuses(Listener::Main),
        vec![503, 503, 503, 206]
    );
    assert_eq!(client.stats().retries(), 3);

    // The same for manifests and pushes through oci-client.
    setup.proxy.set_fault_with(
        Fault::Status(500),
        Scope::PathPrefix("/v2/faults/app/manifests".into()),
        Some(2),
    );
    let (manifest, _) = push_image(&client, &setup.repo(), "v1", test_bytes(10, 1)).await;
    let fetched = client
        .fetch_manifest(&format!("{}/faults/app:v1", setup.proxy.host()))
        .await
        .unwrap();
    assert_eq!(fetched.digest, manifest);

    // A 5xx that does not stop runs out of attempts and says what failed.
    setup.proxy.set_fault(Fault::Status(502));
    let error = client
        .fetch_manifest(&format!("{}/faults/app:v1", setup.proxy.host()))
        .await
        .unwrap_err();
    assert!(error.is_transient(), "{error}");
    assert!(
        error.to_string().contains("502") && error.to_string().contains("faults/app"),
        "{error}"
    );
}

#[tokio::test]
async fn honours_retry_after_on_429() {
    let Some(setup) = Setup::new("honours_retry_after_on_429").await else {
        return;
    };
    let client = client(config());
    setup.proxy.set_fault_with(
        Fault::TooManyRequests {
            retry_after_secs: 1,
        },
        Scope::Blobs,
        Some(1),
    );
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 10..20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(10..20));
    assert_eq!(setup.blob_statuses(Listener::Main), vec![429, 206]);
    assert_eq!(client.stats().retries(), 1);

    // A Retry-After beyond the deadline fails the read at once instead of sleeping.
    let short = client_with_deadline(Duration::from_secs(2));
    setup.proxy.set_fault_with(
        Fault::TooManyRequests {
            retry_after_secs: 3600,
        },
        Scope::Blobs,
        None,
    );
    let error = short
        .read_range(&setup.repo(), &setup.digest, 0..10)
        .await
        .unwrap_err();
    match error {
        RegistryError::DeadlineExceeded {
            attempts,
            last_error,
            ..
        } => {
            assert_eq!(attempts, 1);
            assert!(
                matches!(*last_error, RegistryError::RateLimited { .. }),
                "{last_error}"
            );
        }
        other => panic!("expected DeadlineExceeded, got {other}"),
    }
}

fn client_with_deadline(deadline: Duration) -> RegistryClient {
    client(RegistryConfig {
        read_deadline: deadline,
        request_timeout: Duration::from_millis(500),
        ..config()
    })
}

#[tokio::test]
async fn reauthenticates_when_the_token_expires() {
    let Some(setup) = Setup::new("reauthenticates_when_the_token_expires").await else {
        return;
    };
    setup.proxy.require_auth(proxy_auth());
    let client = client(with_password());
    let repo = setup.repo();

    let bytes = client
        .read_range(&repo, &setup.digest, 0..100)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..100));
    assert_eq!(setup.proxy.tokens_issued(), 1);

    setup.proxy.expire_tokens();
    let bytes = client
        .read_range(&repo, &setup.digest, 100..200)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(100..200));
    assert_eq!(client.stats().reauthentications(), 1);
    assert_eq!(setup.proxy.tokens_issued(), 2);
    // The 401 was answered by re-authenticating, not by retrying later.
    assert_eq!(client.stats().retries(), 0);

    // Pushes and manifests (through oci-client) re-authenticate too.
    let (manifest, _) = push_image(&client, &repo, "v1", test_bytes(10, 2)).await;
    setup.proxy.expire_tokens();
    let fetched = client
        .fetch_manifest(&format!("{}/faults/app:v1", setup.proxy.host()))
        .await
        .unwrap();
    assert_eq!(fetched.digest, manifest);

    // Tokens that wear out after a few uses are replaced as they go.
    setup.proxy.require_auth(ProxyAuth {
        token_max_uses: Some(2),
        ..proxy_auth()
    });
    setup.proxy.expire_tokens();
    for i in 0..6u64 {
        let range = i * 10..i * 10 + 10;
        let bytes = client
            .read_range(&repo, &setup.digest, range.clone())
            .await
            .unwrap();
        assert_eq!(&bytes[..], setup.expect(range));
    }
}

#[tokio::test]
async fn credentials_from_a_docker_config() {
    let Some(setup) = Setup::new("credentials_from_a_docker_config").await else {
        return;
    };
    setup.proxy.require_auth(proxy_auth());
    let dir = tempfile::tempdir().unwrap();
    let write_config = |name: &str, entry: serde_json::Value| {
        let path = dir.path().join(name);
        let config = serde_json::json!({"auths": {setup.proxy.host(): entry}});
        std::fs::write(&path, config.to_string()).unwrap();
        path
    };
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));

    // `auth` (base64 user:password).
    let client = client(RegistryConfig {
        docker_config: Some(write_config(
            "basic.json",
            serde_json::json!({"auth": encoded}),
        )),
        ..config()
    });
    let (manifest, _) = push_image(&client, &setup.repo(), "v1", test_bytes(10, 3)).await;
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 5..50)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(5..50));

    // `identitytoken` (exchanged at the token service).
    let with_identity = common::client(RegistryConfig {
        docker_config: Some(write_config(
            "identity.json",
            serde_json::json!({"auth": base64::engine::general_purpose::STANDARD.encode("<token>:"), "identitytoken": IDENTITY_TOKEN}),
        )),
        ..config()
    });
    let fetched = with_identity
        .fetch_manifest(&format!("{}/faults/app:v1", setup.proxy.host()))
        .await
        .unwrap();
    assert_eq!(fetched.digest, manifest);
    let bytes = with_identity
        .read_range(&setup.repo(), &setup.digest, 0..10)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..10));

    // A wrong password is a permanent error naming the registry, without the password.
    let wrong = common::client(RegistryConfig {
        docker_config: Some(write_config(
            "wrong.json",
            serde_json::json!({"username": USER, "password": "not-the-password"}),
        )),
        ..config()
    });
    let error = wrong
        .read_range(&setup.repo(), &setup.digest, 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error}"
    );
    assert!(!error.is_transient());
    assert!(error.to_string().contains(&setup.proxy.host()), "{error}");
    assert!(!error.to_string().contains("not-the-password"), "{error}");

    // No credentials at all: also unauthorized.
    let anonymous = common::client(config());
    let error = anonymous
        .read_range(&setup.repo(), &setup.digest, 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error}"
    );
}

#[tokio::test]
async fn redirects_keep_the_range_and_drop_authorization() {
    let Some(setup) = Setup::new("redirects_keep_the_range_and_drop_authorization").await else {
        return;
    };
    setup.proxy.require_auth(proxy_auth());
    setup.proxy.redirect_blobs(true);
    let client = client(with_password());
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 4096..8192)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(4096..8192));

    let requests = setup.proxy.requests();
    let main: Vec<_> = requests
        .iter()
        .filter(|r| r.listener == Listener::Main && r.is_blob_get())
        .collect();
    let storage: Vec<_> = requests
        .iter()
        .filter(|r| r.listener == Listener::Redirect)
        .collect();
    assert_eq!(main.len(), 1);
    assert_eq!(main[0].status, 307);
    assert!(main[0].authorization);
    assert_eq!(storage.len(), 1);
    assert_eq!(storage[0].range.as_deref(), Some("bytes=4096-8191"));
    assert_eq!(storage[0].status, 206);
    assert!(
        !storage[0].authorization,
        "the token must not follow the redirect"
    );

    // The storage server failing is retried from the registry.
    setup.proxy.clear_requests();
    setup.proxy.set_redirect_fault(Fault::Status(500), Some(2));
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 0..10)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..10));
    assert_eq!(setup.blob_statuses(Listener::Redirect), vec![500, 500, 206]);
    assert_eq!(setup.blob_statuses(Listener::Main), vec![307, 307, 307]);

    // A 403 from storage (an expired signed URL) is retried too.
    setup.proxy.set_redirect_fault(Fault::Status(403), Some(1));
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 10..20)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(10..20));

    // The whole-blob stream follows the redirect as well.
    let streamed: Vec<Bytes> = client
        .blob_stream(&setup.repo(), &setup.digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), setup.blob.to_vec());
}

#[tokio::test]
async fn registry_down_exceeds_the_deadline_then_recovers() {
    let Some(mut setup) = Setup::new("registry_down_exceeds_the_deadline_then_recovers").await
    else {
        return;
    };
    let client = client_with_deadline(Duration::from_secs(2));
    let direct_repo = repo(&setup.registry.host(), "faults/app");
    // Warm up: connections and scheme are established.
    client
        .read_range(&direct_repo, &setup.digest, 0..1)
        .await
        .unwrap();

    setup.registry.stop();
    let error = client
        .read_range(&direct_repo, &setup.digest, 0..100)
        .await
        .unwrap_err();
    match &error {
        RegistryError::DeadlineExceeded {
            blob,
            range,
            attempts,
            last_error,
            ..
        } => {
            assert_eq!(blob, &setup.digest);
            assert_eq!(range, &(0..100));
            assert!(*attempts >= 1);
            assert!(last_error.is_transient(), "{last_error}");
        }
        other => panic!("expected DeadlineExceeded, got {other}"),
    }
    let text = error.to_string();
    assert!(
        text.contains(&setup.digest.to_string()) && text.contains("0..100"),
        "{text}"
    );

    setup.registry.restart().unwrap();
    let bytes = client
        .read_range(&direct_repo, &setup.digest, 0..100)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..100));

    // The same with the proxy refusing connections, as a fresh client would see it.
    setup.proxy.set_down(true).unwrap();
    let fresh = client_with_deadline(Duration::from_secs(2));
    let error = fresh
        .read_range(&setup.repo(), &setup.digest, 0..100)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::DeadlineExceeded { .. }),
        "{error}"
    );
    setup.proxy.set_down(false).unwrap();
    let bytes = fresh
        .read_range(&setup.repo(), &setup.digest, 0..100)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..100));
}

#[tokio::test]
async fn broken_bodies_are_retried_and_never_returned() {
    let Some(setup) = Setup::new("broken_bodies_are_retried_and_never_returned").await else {
        return;
    };
    let client = client(RegistryConfig {
        request_timeout: Duration::from_secs(1),
        ..config()
    });
    let repo = setup.repo();
    let range = 1000..300_000;

    // Cut after 10 000 bytes: the attempt fails, the retry gets it all.
    setup.proxy.set_fault_with(
        Fault::TruncateBody {
            after_bytes: 10_000,
        },
        Scope::Blobs,
        Some(1),
    );
    let bytes = client
        .read_range(&repo, &setup.digest, range.clone())
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(range.clone()));

    // A body that stalls: the attempt times out, the retry gets it all.
    setup
        .proxy
        .set_fault_with(Fault::StallBody { after_bytes: 10 }, Scope::Blobs, Some(1));
    let bytes = client
        .read_range(&repo, &setup.digest, range.clone())
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(range.clone()));

    // Latency alone is no error.
    setup.proxy.set_fault_with(
        Fault::Latency(Duration::from_millis(50)),
        Scope::Blobs,
        Some(1),
    );
    let bytes = client
        .read_range(&repo, &setup.digest, 0..10)
        .await
        .unwrap();
    assert_eq!(&bytes[..], setup.expect(0..10));
    assert_eq!(client.stats().retries(), 2);

    // The whole-blob stream resumes where it broke, with a Range request. (A stall,
    // because after a cut connection the bytes in flight may or may not arrive.)
    setup.proxy.clear_requests();
    setup.proxy.set_fault_with(
        Fault::StallBody {
            after_bytes: 200_000,
        },
        Scope::Blobs,
        Some(1),
    );
    let streamed: Vec<Bytes> = client
        .blob_stream(&repo, &setup.digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), setup.blob.to_vec());
    let ranges: Vec<Option<String>> = setup
        .proxy
        .requests()
        .into_iter()
        .filter(|r| r.is_blob_get())
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, vec![None, Some("bytes=200000-".to_string())]);
}

#[tokio::test]
async fn blob_stream_with_a_flipped_byte_ends_in_a_digest_error() {
    let Some(setup) = Setup::new("blob_stream_with_a_flipped_byte_ends_in_a_digest_error").await
    else {
        return;
    };
    let client = client(config());
    setup
        .proxy
        .set_fault_with(Fault::FlipByte { offset: 12345 }, Scope::Blobs, None);
    let items: Vec<Result<Bytes, RegistryError>> = client
        .blob_stream(&setup.repo(), &setup.digest)
        .collect()
        .await;
    let error = items
        .last()
        .expect("the stream yields items")
        .as_ref()
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::DigestMismatch { .. }),
        "{error}"
    );
    assert!(
        error.to_string().contains(&setup.digest.to_string()),
        "{error}"
    );
    assert!(!error.is_transient());

    // read_range returns what it was sent: chunk verification is the fetcher's job
    // (stoker-fetch checks every chunk's digest). The bytes differ, and only there.
    let bytes = client
        .read_range(&setup.repo(), &setup.digest, 0..20_000)
        .await
        .unwrap();
    let expected = setup.expect(0..20_000);
    let differing: Vec<usize> = (0..bytes.len())
        .filter(|&i| bytes[i] != expected[i])
        .collect();
    assert_eq!(differing, vec![12345]);

    // A flipped manifest fetched by digest is refused.
    setup.proxy.clear_faults();
    let (manifest, _) = push_image(&client, &setup.repo(), "v1", test_bytes(10, 4)).await;
    setup.proxy.set_fault_with(
        Fault::FlipByte { offset: 20 },
        Scope::PathPrefix("/v2/faults/app/manifests".into()),
        None,
    );
    let error = client
        .fetch_manifest(&format!("{}/faults/app@{manifest}", setup.proxy.host()))
        .await
        .unwrap_err();
    assert!(error.to_string().contains(&manifest.to_string()), "{error}");
    setup.proxy.clear_faults();
    let streamed: Vec<Bytes> = client
        .blob_stream(&setup.repo(), &setup.digest)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(streamed.concat(), setup.blob.to_vec());
}

/// Captures everything logged at TRACE level, from every crate.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn credentials_and_tokens_never_reach_the_logs() {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let Some(setup) = Setup::new("credentials_and_tokens_never_reach_the_logs").await else {
        return;
    };
    setup.proxy.require_auth(proxy_auth());
    let client = client(with_password());
    let repo = setup.repo();
    push_image(&client, &repo, "v1", test_bytes(100, 5)).await;
    client
        .read_range(&repo, &setup.digest, 0..10)
        .await
        .unwrap();
    setup.proxy.expire_tokens();
    client
        .read_range(&repo, &setup.digest, 0..10)
        .await
        .unwrap();
    client
        .fetch_manifest(&format!("{}/faults/app:v1", setup.proxy.host()))
        .await
        .unwrap();
    let _ = client
        .push_manifest(
            &format!("{}/faults/app:bad", setup.proxy.host()),
            Bytes::from_static(b"{\"schemaVersion\": 2}"),
            OCI_MANIFEST,
        )
        .await;
    let docker_config = tempfile::NamedTempFile::new().unwrap();
    let entry =
        serde_json::json!({"auths": {setup.proxy.host(): {"identitytoken": IDENTITY_TOKEN}}});
    std::fs::write(docker_config.path(), entry.to_string()).unwrap();
    let identity = common::client(RegistryConfig {
        docker_config: Some(docker_config.path().to_path_buf()),
        ..config()
    });
    identity
        .read_range(&repo, &setup.digest, 0..10)
        .await
        .unwrap();
    assert!(setup.proxy.tokens_issued() >= 3);

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.len() > 1000,
        "TRACE logging captured too little:\n{text}"
    );
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{USER}:{PASSWORD}"));
    for secret in [
        PASSWORD,
        IDENTITY_TOKEN,
        "faultproxy-token-",
        basic.as_str(),
    ] {
        assert!(!text.contains(secret), "{secret:?} appears in the logs");
    }
}
