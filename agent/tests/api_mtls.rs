//! The agent API on TCP with mutual TLS: a client with a certificate from the
//! configured CA gets answers; a client without one, with one from another CA, or
//! speaking plain HTTP/2, is refused; rotated certificate files are used from
//! the next connection on, without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use stoker_agent::api_server::{AgentService, serve_tcp_mtls};
use stoker_agent::prefetch::{NodeImages, PrefetchOptions, Prefetches};
use stoker_agent::tls::{ReloadingTls, TlsFiles};
use stoker_agent::trace::{TraceOptions, Traces};
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{ListTracesRequest, StatusRequest};
use stoker_cache::ChunkCache;
use stoker_fetch::FetchConfig;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The name in the agent's serving certificate; clients check it instead of the IP.
const SERVER_NAME: &str = "stoker-agent.stoker-system.svc";

struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A PEM certificate and its key.
struct Pem {
    cert: String,
    key: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Ca {
            issuer: CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    fn issue(&self, common_name: &str, dns_names: &[&str]) -> Pem {
        let names: Vec<String> = dns_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pem {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

struct Agent {
    address: SocketAddr,
    files: TlsFiles,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), stoker_agent::AgentError>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// Starts the API on a free loopback port with `server` as its certificate
    /// and `client_ca` as the CA clients must chain to.
    async fn start(server: &Pem, client_ca: &Ca) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let files = TlsFiles {
            cert: dir.path().join("tls.crt"),
            key: dir.path().join("tls.key"),
            client_ca: dir.path().join("ca.crt"),
        };
        write_tls_files(&files, server, client_ca);
        let tls = Arc::new(ReloadingTls::new(files.clone()).expect("TLS files load"));
        let cache = ChunkCache::open(dir.path().join("cache"), 1 << 20).unwrap();
        let images = Arc::new(NodeImages::offline(cache, FetchConfig::default()));
        let prefetches = Prefetches::new(images, PrefetchOptions::default());
        let traces =
            Arc::new(Traces::open(&dir.path().join("traces"), TraceOptions::default()).unwrap());
        let service = AgentService::new(traces, prefetches, None);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_tcp_mtls(listener, tls, service, async {
            let _ = stopped.await;
        }));
        Agent {
            address,
            files,
            stop: Some(stop),
            server,
            _dir: dir,
        }
    }

    /// A fresh connection (so each call below makes its own handshake).
    async fn connect(
        &self,
        tls: Option<ClientTlsConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", self.address))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        endpoint.connect().await
    }

    /// Whether a Status call over a new connection with `tls` succeeds.
    async fn answers(&self, tls: Option<ClientTlsConfig>) -> Result<(), String> {
        let channel = self
            .connect(tls)
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        let mut client = AgentClient::new(channel);
        client
            .status(StatusRequest {})
            .await
            .map(|_| ())
            .map_err(|status| format!("status: {status:?}"))
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.server.await.unwrap().unwrap();
    }
}

fn write_tls_files(files: &TlsFiles, server: &Pem, client_ca: &Ca) {
    // Written the way the kubelet updates a Secret volume: new files, then renamed.
    let write = |path: &Path, text: &str| {
        let temporary = path.with_extension("new");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, path).unwrap();
    };
    write(&files.cert, &server.cert);
    write(&files.key, &server.key);
    write(&files.client_ca, &client_ca.pem());
}

/// A client that trusts `server_ca` and presents `identity`, if any.
fn client_tls(server_ca: &Ca, identity: Option<&Pem>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_ca.pem()))
        .domain_name(SERVER_NAME);
    if let Some(identity) = identity {
        tls = tls.identity(Identity::from_pem(&identity.cert, &identity.key));
    }
    tls
}

#[tokio::test]
async fn only_clients_with_a_certificate_from_the_ca_are_served() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("stoker agent API CA");
    let server = ca.issue("stoker-agent", &[SERVER_NAME]);
    let controller = ca.issue("stoker-controller", &[]);
    let agent = Agent::start(&server, &ca).await;

    // With the controller's certificate: served.
    agent
        .answers(Some(client_tls(&ca, Some(&controller))))
        .await
        .expect("a client with a valid certificate is served");
    let channel = agent
        .connect(Some(client_tls(&ca, Some(&controller))))
        .await
        .unwrap();
    let traces = AgentClient::new(channel)
        .list_traces(ListTracesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(traces.traces.is_empty());

    // Without a client certificate: refused.
    let refused = agent.answers(Some(client_tls(&ca, None))).await;
    let error = refused.expect_err("a client without a certificate was served");
    assert!(error.contains("CertificateRequired"), "{error}");

    // With a certificate from another CA: refused.
    let rogue_ca = Ca::new("someone else");
    let rogue = rogue_ca.issue("stoker-controller", &[]);
    let refused = agent.answers(Some(client_tls(&ca, Some(&rogue)))).await;
    let error = refused.expect_err("a client with a foreign certificate was served");
    assert!(
        error.contains("UnknownCA"),
        "refused by the TLS handshake: {error}"
    );

    // Plain HTTP/2 without TLS: refused.
    let refused = agent.answers(None).await;
    let error = refused.expect_err("a plaintext client was served");
    assert!(error.contains("transport error"), "{error}");

    agent.stop().await;
}

#[tokio::test]
async fn rotated_certificates_are_used_without_a_restart() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let old_ca = Ca::new("CA 2024");
    let agent = Agent::start(&old_ca.issue("agent", &[SERVER_NAME]), &old_ca).await;
    let old_client = old_ca.issue("controller", &[]);
    agent
        .answers(Some(client_tls(&old_ca, Some(&old_client))))
        .await
        .expect("served before the rotation");

    // The Secret rotates to a new CA, a new serving certificate and new client certificates.
    let new_ca = Ca::new("CA 2025");
    write_tls_files(
        &agent.files,
        &new_ca.issue("agent", &[SERVER_NAME]),
        &new_ca,
    );
    let new_client = new_ca.issue("controller", &[]);
    agent
        .answers(Some(client_tls(&new_ca, Some(&new_client))))
        .await
        .expect("new certificates are used for new connections");
    // A client certificate of the old CA is refused now (the client trusts the new
    // server certificate, so the refusal is the agent's).
    let stale = agent
        .answers(Some(client_tls(&new_ca, Some(&old_client))))
        .await;
    let error = stale.expect_err("the old CA's client is refused after the rotation");
    assert!(error.contains("UnknownCA"), "{error}");

    // A broken file (half-written rotation) keeps the last good configuration.
    std::fs::write(&agent.files.cert, "not a certificate").unwrap();
    agent
        .answers(Some(client_tls(&new_ca, Some(&new_client))))
        .await
        .expect("still served with the last good certificates");

    agent.stop().await;
}

#[test]
fn unusable_tls_files_are_named_at_startup() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("ca");
    let server = ca.issue("agent", &[SERVER_NAME]);
    let files = TlsFiles {
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        client_ca: dir.path().join("ca.crt"),
    };
    let missing = ReloadingTls::new(files.clone())
        .err()
        .expect("missing files refused");
    assert!(missing.to_string().contains("tls.crt"), "{missing}");

    write_tls_files(&files, &server, &ca);
    std::fs::write(&files.client_ca, "").unwrap();
    let no_ca = ReloadingTls::new(files.clone())
        .err()
        .expect("empty CA refused");
    assert!(no_ca.to_string().contains("ca.crt"), "{no_ca}");

    write_tls_files(&files, &server, &ca);
    std::fs::write(&files.key, ca.issue("other", &[]).key).unwrap();
    let mismatch = ReloadingTls::new(files.clone())
        .err()
        .expect("wrong key refused");
    assert!(mismatch.to_string().contains("tls.key"), "{mismatch}");

    write_tls_files(&files, &server, &ca);
    assert!(ReloadingTls::new(files).is_ok());
}
