//! images/certgen/stoker-certgen.sh (the install-time certificate Job) makes
//! certificates that rustls, which tonic uses on both ends, accepts for mutual
//! TLS between the controller and an agent, and refuses where it must. Run with
//! `--local DIR`, the script's storage is a directory instead of Secrets; the
//! certificate logic is the same.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};
use stoker_deploy_check::workspace_root;

const AGENT_NAME: &str = "stoker-agent.stoker-system.svc";

fn script() -> PathBuf {
    workspace_root().join("images/certgen/stoker-certgen.sh")
}

fn openssl_present() -> bool {
    let present = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !present {
        eprintln!(
            "SKIPPED: openssl not found; the certgen script needs it (Debian package openssl)"
        );
    }
    present
}

fn run_certgen(dir: &Path, env: &[(&str, &str)]) -> String {
    let output = Command::new("sh")
        .arg(script())
        .arg("--local")
        .arg(dir)
        .envs(env.iter().copied())
        .output()
        .expect("run sh");
    let log = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "stoker-certgen failed:\n{log}");
    log
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("open certificate")
        .collect::<Result<_, _>>()
        .expect("parse certificate")
}

fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("parse key")
}

fn roots(ca: &Path) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certs(ca) {
        roots.add(cert).expect("add CA");
    }
    Arc::new(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's side: its certificate, and only clients signed by `client_ca`.
fn agent_config(dir: &Path, client_ca: &Path) -> Arc<ServerConfig> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(client_ca), provider())
        .build()
        .expect("client verifier");
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certs(&dir.join("stoker-agent-tls/tls.crt")),
            key(&dir.join("stoker-agent-tls/tls.key")),
        )
        .expect("agent certificate");
    Arc::new(config)
}

/// The controller's side: trusts `server_ca`, presents `client` if given.
fn controller_config(server_ca: &Path, client: Option<&Path>) -> Arc<ClientConfig> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocols")
        .with_root_certificates(roots(server_ca));
    let config = match client {
        Some(dir) => builder
            .with_client_auth_cert(certs(&dir.join("tls.crt")), key(&dir.join("tls.key")))
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

/// Runs a TLS handshake in memory; Ok once both sides are done.
fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    server_name: &str,
) -> Result<(), String> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| e.to_string())?;
    let mut client = ClientConnection::new(client, name).map_err(|e| e.to_string())?;
    let mut server = ServerConnection::new(server).map_err(|e| e.to_string())?;
    // A TLS 1.3 handshake with client authentication takes a few flights; the
    // bound only stops a broken exchange from looping.
    for _ in 0..20 {
        let mut to_server = Vec::new();
        while client.wants_write() {
            client
                .write_tls(&mut to_server)
                .map_err(|e| e.to_string())?;
        }
        let mut reader = &to_server[..];
        while !reader.is_empty() {
            server.read_tls(&mut reader).map_err(|e| e.to_string())?;
            server
                .process_new_packets()
                .map_err(|e| format!("agent: {e}"))?;
        }
        let mut to_client = Vec::new();
        while server.wants_write() {
            server
                .write_tls(&mut to_client)
                .map_err(|e| e.to_string())?;
        }
        let mut reader = &to_client[..];
        while !reader.is_empty() {
            client.read_tls(&mut reader).map_err(|e| e.to_string())?;
            client
                .process_new_packets()
                .map_err(|e| format!("controller: {e}"))?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            // The server only fails a bad client certificate once it has read
            // the client's last flight; make sure nothing is left in flight.
            if !client.wants_write() && !server.wants_write() {
                return Ok(());
            }
        }
    }
    Err("handshake did not finish".into())
}

#[test]
fn certificates_give_mutual_tls_between_controller_and_agent() {
    if !openssl_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run_certgen(d, &[]);
    let ca = d.join("stoker-ca/ca.crt");
    let controller = d.join("stoker-controller-tls");

    handshake(
        controller_config(&ca, Some(&controller)),
        agent_config(d, &ca),
        AGENT_NAME,
    )
    .expect("the controller and an agent complete mutual TLS");
    // The ca.crt shipped in each Secret is the CA itself.
    assert_eq!(
        std::fs::read(&ca).expect("ca"),
        std::fs::read(d.join("stoker-agent-tls/ca.crt")).expect("agent ca.crt")
    );

    let no_cert = handshake(
        controller_config(&ca, None),
        agent_config(d, &ca),
        AGENT_NAME,
    );
    assert!(
        no_cert.is_err(),
        "an agent accepted a client without a certificate"
    );

    let wrong_name = handshake(
        controller_config(&ca, Some(&controller)),
        agent_config(d, &ca),
        "stoker-agent.other-namespace.svc",
    );
    assert!(
        wrong_name.is_err(),
        "the agent's certificate matched a name it does not carry"
    );

    // A client certificate from another CA (another install) is refused.
    let other = tempfile::tempdir().expect("tempdir");
    run_certgen(other.path(), &[]);
    let foreign = handshake(
        controller_config(&ca, Some(&other.path().join("stoker-controller-tls"))),
        agent_config(d, &ca),
        AGENT_NAME,
    );
    assert!(
        foreign.is_err(),
        "an agent accepted a controller certificate from another CA"
    );

    // The agent's server certificate cannot be used as a client certificate.
    let server_as_client = handshake(
        controller_config(&ca, Some(&d.join("stoker-agent-tls"))),
        agent_config(d, &ca),
        AGENT_NAME,
    );
    assert!(
        server_as_client.is_err(),
        "a serverAuth-only certificate was accepted as a client"
    );
}

#[test]
fn certgen_is_idempotent_and_renews_before_expiry() {
    if !openssl_present() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    run_certgen(d, &[]);
    let read = |p: &str| std::fs::read(d.join(p)).expect("read");
    let (ca, agent, controller) = (
        read("stoker-ca/ca.crt"),
        read("stoker-agent-tls/tls.crt"),
        read("stoker-controller-tls/tls.crt"),
    );

    let log = run_certgen(d, &[]);
    assert!(log.contains("stoker-agent-tls is current"), "{log}");
    assert_eq!(
        read("stoker-agent-tls/tls.crt"),
        agent,
        "a current certificate was re-issued"
    );
    assert_eq!(read("stoker-controller-tls/tls.crt"), controller);

    // Certificates due within the renewal window are re-issued under the same CA.
    let log = run_certgen(d, &[("STOKER_CERT_RENEW_DAYS", "100")]);
    assert!(log.contains("issuing stoker-agent-tls"), "{log}");
    assert_ne!(read("stoker-agent-tls/tls.crt"), agent);
    assert_ne!(read("stoker-controller-tls/tls.crt"), controller);
    assert_eq!(read("stoker-ca/ca.crt"), ca, "renewal must keep the CA");
    handshake(
        controller_config(
            &d.join("stoker-ca/ca.crt"),
            Some(&d.join("stoker-controller-tls")),
        ),
        agent_config(d, &d.join("stoker-ca/ca.crt")),
        AGENT_NAME,
    )
    .expect("renewed certificates still work together");

    // A leaf that does not chain to the current CA is replaced.
    std::fs::copy(
        d.join("stoker-ca/ca.crt"),
        d.join("stoker-agent-tls/tls.crt"),
    )
    .expect("corrupt");
    let log = run_certgen(d, &[]);
    assert!(log.contains("issuing stoker-agent-tls"), "{log}");
}

#[test]
fn certgen_refuses_bad_arguments() {
    let output = Command::new("sh")
        .arg(script())
        .arg("--bogus")
        .output()
        .expect("run sh");
    assert!(!output.status.success());
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(log.contains("unknown argument '--bogus'"), "{log}");
}
