//! Behaviour docker-registry 2.8 cannot show, against a tiny registry written here: the
//! OCI referrers API (distribution 2.8 lacks it) and a server that ignores `Range`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use stoker_registry::{
    Digest, OCI_INDEX, OCI_MANIFEST, RegistryClient, RegistryConfig, RegistryError,
    WHOLE_BLOB_FALLBACK_LIMIT, parse_reference,
};

/// Manifests and blobs in memory; a referrers API that does not filter; blobs always
/// served whole (200), whatever the `Range`.
#[derive(Default)]
struct TinyRegistry {
    manifests: HashMap<String, Bytes>,
    blobs: HashMap<String, Bytes>,
    log: Vec<String>,
}

async fn start_tiny_registry() -> (String, Arc<Mutex<TinyRegistry>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let state = Arc::new(Mutex::new(TinyRegistry::default()));
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(answer(&state, request).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (host, state)
}

async fn answer(state: &Mutex<TinyRegistry>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or_default().to_string();
    state
        .lock()
        .unwrap()
        .log
        .push(format!("{method} {path}?{query}"));
    let body = request.into_body().collect().await.unwrap().to_bytes();
    let respond = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response
    };
    if path == "/v2/" {
        return respond(StatusCode::OK, Bytes::new());
    }
    let parts: Vec<&str> = path.trim_start_matches("/v2/").rsplitn(3, '/').collect();
    let [reference, kind, _name] = parts[..] else {
        return respond(StatusCode::NOT_FOUND, Bytes::new());
    };
    let mut state = state.lock().unwrap();
    match (method, kind) {
        (Method::PUT, "manifests") => {
            let digest = Digest::of(&body).to_string();
            state.manifests.insert(reference.to_string(), body.clone());
            state.manifests.insert(digest.clone(), body.clone());
            let mut response = respond(StatusCode::CREATED, Bytes::new());
            let headers = response.headers_mut();
            headers.insert("location", path.parse().unwrap());
            headers.insert("docker-content-digest", digest.parse().unwrap());
            let document: serde_json::Value = serde_json::from_slice(&body).unwrap();
            if let Some(subject) = document["subject"]["digest"].as_str() {
                headers.insert("oci-subject", subject.parse().unwrap());
            }
            response
        }
        (Method::GET, "manifests") => match state.manifests.get(reference) {
            Some(bytes) => respond(StatusCode::OK, bytes.clone()),
            None => respond(StatusCode::NOT_FOUND, Bytes::new()),
        },
        (Method::GET, "referrers") => {
            let mut seen = Vec::new();
            let mut manifests = Vec::new();
            for bytes in state.manifests.values() {
                let document: serde_json::Value = serde_json::from_slice(bytes).unwrap();
                let digest = Digest::of(bytes).to_string();
                if document["subject"]["digest"].as_str() == Some(reference)
                    && !seen.contains(&digest)
                {
                    seen.push(digest.clone());
                    manifests.push(serde_json::json!({
                        "mediaType": OCI_MANIFEST,
                        "digest": digest,
                        "size": bytes.len(),
                        "artifactType": document["artifactType"],
                    }));
                }
            }
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests});
            respond(StatusCode::OK, Bytes::from(index.to_string()))
        }
        (Method::GET, "blobs") => match state.blobs.get(reference) {
            Some(bytes) => respond(StatusCode::OK, bytes.clone()),
            None => respond(StatusCode::NOT_FOUND, Bytes::new()),
        },
        _ => respond(StatusCode::NOT_FOUND, Bytes::new()),
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..RegistryConfig::default()
    })
    .unwrap()
}

fn artifact(subject: &Digest, artifact_type: &str) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": Digest::of(b"{}").to_string(), "size": 2},
            "layers": [],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject.to_string(), "size": 1},
        })
        .to_string(),
    )
}

#[tokio::test]
async fn uses_the_referrers_api_where_the_registry_has_it() {
    let (host, state) = start_tiny_registry().await;
    let client = client();
    let repo = parse_reference(&format!("{host}/app")).unwrap();
    let subject = Digest::of(b"the image manifest");

    let index = client
        .attach_referrer(
            &repo,
            artifact(&subject, "application/vnd.stoker.index.v1"),
            &subject,
        )
        .await
        .unwrap();
    client
        .attach_referrer(&repo, artifact(&subject, "application/x-sbom"), &subject)
        .await
        .unwrap();

    // No fallback tag was read or written.
    let log = state.lock().unwrap().log.clone();
    assert!(log.iter().all(|line| !line.contains("sha256-")), "{log:#?}");

    // The server does not filter; the client does.
    let found = client
        .find_referrers(&repo, &subject, "application/vnd.stoker.index.v1")
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].digest().to_string(), index.to_string());
    let log = state.lock().unwrap().log.clone();
    assert!(
        log.iter().any(|line| line.contains(&format!(
            "/referrers/{subject}?artifactType=application%2Fvnd.stoker.index.v1"
        ))),
        "{log:#?}"
    );
}

#[tokio::test]
async fn a_server_ignoring_range_is_sliced_only_for_small_blobs() {
    let (host, state) = start_tiny_registry().await;
    let client = client();
    let repo = parse_reference(&format!("{host}/app")).unwrap();
    let small = Bytes::from((0..5000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let large = Bytes::from(vec![7u8; WHOLE_BLOB_FALLBACK_LIMIT as usize + 1]);
    let liar = Bytes::from_static(b"these bytes do not match the digest they are served under");
    let liar_digest = Digest::of(b"something else");
    {
        let mut state = state.lock().unwrap();
        state
            .blobs
            .insert(Digest::of(&small).to_string(), small.clone());
        state
            .blobs
            .insert(Digest::of(&large).to_string(), large.clone());
        state.blobs.insert(liar_digest.to_string(), liar);
    }

    let bytes = client
        .read_range(&repo, &Digest::of(&small), 100..200)
        .await
        .unwrap();
    assert_eq!(bytes, small.slice(100..200));

    let error = client
        .read_range(&repo, &Digest::of(&large), 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::RangeIgnored { .. }),
        "{error}"
    );
    assert!(!error.is_transient());

    let error = client
        .read_range(&repo, &liar_digest, 0..10)
        .await
        .unwrap_err();
    assert!(
        matches!(error, RegistryError::DigestMismatch { .. }),
        "{error}"
    );
}
