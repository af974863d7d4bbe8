//! HTTPS with a private CA: trusted through `ca_bundle`, refused without it (and never
//! downgraded to plain HTTP, since the server does not speak it).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::Arc;

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use stoker_registry::{Digest, OCI_MANIFEST, RegistryClient, RegistryConfig, parse_reference};

const MANIFEST: &str = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;

/// A CA certificate (PEM) and a server certificate for `localhost` signed by it.
fn private_pki() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "stoker test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&server_key, &ca)
        .unwrap();
    (
        ca.pem(),
        server.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
}

/// A one-connection-at-a-time HTTPS registry serving `MANIFEST` as `app:v1`; every other
/// path is 404. Returns its port.
fn start_https_registry(certificate: CertificateDer<'static>, key: PrivateKeyDer<'static>) -> u16 {
    let config = Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![certificate], key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut request = Vec::new();
            let mut buffer = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buffer[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request);
            let path = request.split(' ').nth(1).unwrap_or_default();
            let (status, body, content_type) = match path {
                "/v2/" => ("200 OK", "{}".to_string(), "application/json"),
                "/v2/app/manifests/v1" => ("200 OK", MANIFEST.to_string(), OCI_MANIFEST),
                _ => ("404 Not Found", String::new(), "text/plain"),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tls.write_all(response.as_bytes());
            let _ = tls.flush();
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

#[tokio::test]
async fn trusts_a_private_ca_from_the_bundle_and_only_then() {
    stoker_registry::install_crypto_provider();
    let (ca_pem, certificate, key) = private_pki();
    let port = start_https_registry(certificate, key);
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("ca.pem");
    std::fs::write(&bundle, &ca_pem).unwrap();
    let reference = format!("localhost:{port}/app:v1");

    let trusting = RegistryClient::new(RegistryConfig {
        ca_bundle: Some(bundle),
        docker_config: None,
        ..RegistryConfig::default()
    })
    .unwrap();
    // oci-client (manifests) and the shared client (referrers API) both trust the CA.
    let manifest = trusting.fetch_manifest(&reference).await.unwrap();
    assert_eq!(manifest.bytes, Bytes::from_static(MANIFEST.as_bytes()));
    let repo = parse_reference(&format!("localhost:{port}/app")).unwrap();
    let referrers = trusting
        .find_referrers(&repo, &manifest.digest, "application/x-anything")
        .await
        .unwrap();
    assert!(referrers.is_empty());

    let untrusting = RegistryClient::new(RegistryConfig {
        docker_config: None,
        retry: stoker_registry::RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        },
        ..RegistryConfig::default()
    })
    .unwrap();
    let error = untrusting.fetch_manifest(&reference).await.unwrap_err();
    assert!(
        error.to_string().contains(&format!("localhost:{port}")),
        "{error}"
    );
    let error = untrusting
        .read_range(&repo, &Digest::of(b"x"), 0..1)
        .await
        .unwrap_err();
    assert!(error.to_string().contains("localhost"), "{error}");
    // An untrusted certificate is not retried until the deadline: it fails at once.
    assert!(!error.is_transient(), "{error:?}");
    assert!(
        !matches!(
            error,
            stoker_registry::RegistryError::DeadlineExceeded { .. }
        ),
        "{error}"
    );

    // A bundle without certificates is a configuration error.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "no certificates here").unwrap();
    let error = RegistryClient::new(RegistryConfig {
        ca_bundle: Some(empty),
        ..RegistryConfig::default()
    })
    .err()
    .expect("an empty bundle is refused");
    assert!(error.to_string().contains("empty.pem"), "{error}");
}
