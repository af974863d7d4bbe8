//! A real node agent for controller tests: `stoker-agent`'s API service
//! served on 127.0.0.1 with mutual TLS (certificates generated here), its
//! prefetch executor fetching from a real docker-registry, and its trace
//! store; and a converted image in that registry.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use stoker_agent::api_server::{AgentService, serve_tcp_mtls};
use stoker_agent::prefetch::{NodeImages, PrefetchOptions, Prefetches};
use stoker_agent::tls::{ReloadingTls, TlsFiles};
use stoker_agent::trace::{TraceOptions, Traces};
use stoker_cache::ChunkCache;
use stoker_controller::agents::AgentTlsFiles;
use stoker_fetch::FetchConfig;
use stoker_format::Digest;

/// The DNS name in the agent's serving certificate.
pub const SERVER_NAME: &str = "stoker-agent.stoker-system.svc";

/// A CA, the agent's serving certificate and the controller's client
/// certificate, written as PEM files.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

impl Pki {
    pub fn generate() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        };
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec![SERVER_NAME.into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            vec!["stoker-controller".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        for (name, pem) in [
            ("ca.crt", ca.pem()),
            ("server.crt", server_cert),
            ("server.key", server_key),
            ("client.crt", client_cert),
            ("client.key", client_key),
        ] {
            std::fs::write(dir.path().join(name), pem).unwrap();
        }
        Pki { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn client_files(&self) -> AgentTlsFiles {
        AgentTlsFiles {
            ca: self.path("ca.crt"),
            cert: self.path("client.crt"),
            key: self.path("client.key"),
            server_name: SERVER_NAME.into(),
        }
    }
}

/// A converted image in a real registry.
pub struct RegistryImage {
    pub registry: stoker_testkit::registry::TestRegistry,
    _work: tempfile::TempDir,
    pub reference: String,
    pub index_digest: Digest,
    pub client: stoker_registry::RegistryClient,
}

/// `None` (after a loud SKIPPED) when docker-registry or skopeo is missing.
pub async fn registry_image() -> Option<RegistryImage> {
    for tool in ["docker-registry", "skopeo"] {
        if !stoker_testkit::require_tool("agent_grpc", tool) {
            return None;
        }
    }
    use stoker_testkit::image::{StandardImageSizes, push_layout, standard_test_image_with};
    let registry = stoker_testkit::registry::TestRegistry::start().expect("registry");
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    standard_test_image_with(StandardImageSizes::SMALL)
        .write_layout(&layout, "v1")
        .unwrap();
    push_layout(&layout, "v1", &registry.host(), "ml/app:v1").unwrap();
    let reference = format!("{}/ml/app:v1", registry.host());
    let client = stoker_registry::RegistryClient::new(stoker_registry::RegistryConfig {
        plain_http: true,
        docker_config: None,
        ..stoker_registry::RegistryConfig::default()
    })
    .unwrap();
    let (store, selector) =
        stoker_convert::ImageStore::registry(client.clone(), &reference).unwrap();
    let reports = stoker_convert::convert(
        &store,
        &selector,
        &stoker_convert::ConvertOptions::default(),
    )
    .await
    .expect("convert");
    let index_digest = Digest::parse(&reports[0].index_digest).unwrap();
    Some(RegistryImage {
        registry,
        _work: work,
        reference,
        index_digest,
        client,
    })
}

/// A node's agent API on 127.0.0.1 with mutual TLS.
pub struct AgentNode {
    pub port: u16,
    pub cache: ChunkCache,
    pub images: Arc<NodeImages>,
    pub traces: Arc<Traces>,
    _dirs: Vec<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), stoker_agent::AgentError>>>,
}

impl AgentNode {
    pub async fn start(pki: &Pki, client: stoker_registry::RegistryClient) -> AgentNode {
        let cache_dir = tempfile::tempdir().unwrap();
        let trace_dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::open(cache_dir.path(), 1 << 30).unwrap();
        let images = Arc::new(NodeImages::new(
            client,
            cache.clone(),
            FetchConfig::default(),
        ));
        let prefetches = Prefetches::new(images.clone(), PrefetchOptions::default());
        let traces = Arc::new(Traces::open(trace_dir.path(), TraceOptions::default()).unwrap());
        let service = AgentService::new(traces.clone(), prefetches, None);
        let tls = Arc::new(
            ReloadingTls::new(TlsFiles {
                cert: pki.path("server.crt"),
                key: pki.path("server.key"),
                client_ca: pki.path("ca.crt"),
            })
            .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_tcp_mtls(listener, tls, service, async {
            let _ = stopped.await;
        }));
        AgentNode {
            port,
            cache,
            images,
            traces,
            _dirs: vec![cache_dir, trace_dir],
            stop: Some(stop),
            server: Some(server),
        }
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.await.unwrap().unwrap();
        }
    }
}
