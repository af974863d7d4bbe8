//! Credentials from a [`CredentialSource`] that change while the client runs (the node
//! agent's store of credentials pushed from Kubernetes image pull secrets), against a real
//! `docker-registry` behind the fault proxy's token service: none means no access, new
//! ones are used at the next 401, and credentials the source no longer gives (expired)
//! are not used any more, not even through a token still cached from them.

mod common;

use std::sync::{Arc, Mutex};

use stoker_registry::{CredentialSource, Credentials, OCI_MANIFEST, RegistryConfig, RegistryError};

use common::fault_proxy::{FaultProxy, ProxyAuth};
use common::{client, config, push_image, repo, start_registry, test_bytes};

const USER: &str = "pushed-user";
const PASSWORD: &str = "pushed-pw-1";
const NEW_PASSWORD: &str = "pushed-pw-2";

/// A source whose answer the test sets; it records what it was asked.
#[derive(Default)]
struct Swappable {
    current: Mutex<Option<Credentials>>,
    asked: Mutex<Vec<(String, String)>>,
}

impl Swappable {
    fn set(&self, credentials: Option<(&str, &str)>) {
        *self.current.lock().unwrap() =
            credentials.map(|(username, password)| Credentials::Basic {
                username: username.into(),
                password: password.into(),
            });
    }
}

impl CredentialSource for Swappable {
    fn credentials_for(&self, registry: &str, repository: &str) -> Option<Credentials> {
        self.asked
            .lock()
            .unwrap()
            .push((registry.to_string(), repository.to_string()));
        self.current.lock().unwrap().clone()
    }
}

fn proxy_auth(password: &str) -> ProxyAuth {
    ProxyAuth {
        basic: Some((USER.into(), password.into())),
        identity_token: None,
        token_max_uses: None,
    }
}

#[tokio::test]
async fn credentials_from_the_source_are_used_replaced_and_dropped() {
    let test = "credentials_from_the_source_are_used_replaced_and_dropped";
    let Some(registry) = start_registry(test) else {
        return;
    };
    let direct = client(config());
    let seeded = repo(&registry.host(), "private/app");
    let (manifest, _) = push_image(&direct, &seeded, "v1", test_bytes(4096, 7)).await;
    let blob = test_bytes(64 * 1024, 9);
    let (digest, _) = direct.push_blob(&seeded, blob.clone()).await.unwrap();
    let proxy = FaultProxy::start(&registry.host()).await.unwrap();
    proxy.require_auth(proxy_auth(PASSWORD));

    let source = Arc::new(Swappable::default());
    let client = client(RegistryConfig {
        credential_source: Some(source.clone()),
        ..config()
    });
    let private = repo(&proxy.host(), "private/app");
    let reference = format!("{}/private/app:v1", proxy.host());

    // Nothing pushed yet: the registry refuses us.
    let error = client
        .read_range(&private, &digest, 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error}"
    );

    // Credentials arrive: reads and manifests work (oci-client's per-registry store still
    // holds the anonymous access it was first given; the client hands it a token).
    source.set(Some((USER, PASSWORD)));
    let bytes = client.read_range(&private, &digest, 0..10).await.unwrap();
    assert_eq!(&bytes[..], &blob[..10]);
    let fetched = client.fetch_manifest(&reference).await.unwrap();
    assert_eq!(fetched.media_type, OCI_MANIFEST);
    assert_eq!(fetched.digest, manifest);
    assert!(
        source
            .asked
            .lock()
            .unwrap()
            .iter()
            .all(|(r, p)| *r == proxy.host() && p == "private/app"),
        "the source is asked with the registry host and the repository"
    );

    // The password changes at the registry and the new one is pushed: the next 401
    // re-authenticates with it.
    proxy.require_auth(proxy_auth(NEW_PASSWORD));
    proxy.expire_tokens();
    source.set(Some((USER, NEW_PASSWORD)));
    let bytes = client.read_range(&private, &digest, 10..20).await.unwrap();
    assert_eq!(&bytes[..], &blob[10..20]);
    client.fetch_manifest(&reference).await.unwrap();

    // The credentials expire (the source gives none): the token obtained with them is
    // still good at the registry, but the client does not use it any more.
    let tokens_before = proxy.tokens_issued();
    source.set(None);
    proxy.clear_requests();
    let error = client
        .read_range(&private, &digest, 20..30)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error}"
    );
    let error = client.fetch_manifest(&reference).await.unwrap_err();
    assert!(
        matches!(error, RegistryError::Unauthorized { .. }),
        "{error}"
    );
    assert_eq!(proxy.tokens_issued(), tokens_before, "no token for nobody");
    assert!(
        !proxy
            .requests()
            .iter()
            .any(|r| r.path.starts_with("/v2/") && r.authorization && r.status < 300),
        "nothing was served with the expired credentials' token: {:?}",
        proxy.requests()
    );
}
