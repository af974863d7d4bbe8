//! Mutual TLS for the agent API's TCP listener, with certificates that can be
//! rotated without a restart.
//!
//! The server certificate, its key and the CA that client certificates must chain
//! to are PEM files (in Kubernetes, mounted from a Secret, which the kubelet
//! updates in place). Every new connection re-reads the three files (a few KiB)
//! and rebuilds the TLS configuration when their bytes changed, so a rotated
//! certificate is used from the next connection on. Files that cannot be read or
//! parsed leave the last good configuration in use, with a warning.
//!
//! A client must present a certificate that chains to the client CA; without one
//! the handshake fails and the connection is closed before any request is read.
//! Handshakes run in their own tasks (bounded by [`HANDSHAKE_TIMEOUT`]), so a
//! slow client does not hold up others.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::Stream;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::AgentError;

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The PEM files of the TCP listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Private key of the server certificate.
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// A TLS server configuration that follows its files.
pub struct ReloadingTls {
    files: TlsFiles,
    current: Mutex<Loaded>,
}

struct Loaded {
    pem: [Vec<u8>; 3],
    acceptor: TlsAcceptor,
}

impl ReloadingTls {
    /// Loads the files; fails if any cannot be read or used.
    pub fn new(files: TlsFiles) -> Result<ReloadingTls, AgentError> {
        let pem = read_files(&files)?;
        let acceptor = build_acceptor(&files, &pem)?;
        Ok(ReloadingTls {
            files,
            current: Mutex::new(Loaded { pem, acceptor }),
        })
    }

    /// The acceptor for a new connection, rebuilt if the files changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        let pem = match read_files(&self.files) {
            Ok(pem) => pem,
            Err(e) => {
                warn!(error = %e, "cannot read the API's TLS files; keeping the last good ones");
                return current.acceptor.clone();
            }
        };
        if pem != current.pem {
            match build_acceptor(&self.files, &pem) {
                Ok(acceptor) => {
                    info!(cert = %self.files.cert.display(), "API TLS certificates changed; reloaded");
                    *current = Loaded { pem, acceptor };
                }
                Err(e) => {
                    warn!(error = %e, "the API's new TLS files are unusable; keeping the last good ones")
                }
            }
        }
        current.acceptor.clone()
    }
}

/// Accepts TCP connections on `listener` and yields those whose mutual TLS
/// handshake succeeded, for `tonic`'s `serve_with_incoming`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> + Send + 'static {
    let (sender, mut receiver) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    warn!(error = %e, "accepting an API connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if sender.is_closed() {
                return;
            }
            let acceptor = tls.acceptor();
            let sender = sender.clone();
            tokio::spawn(async move {
                if let Some(stream) = handshake(acceptor, tcp, peer).await {
                    let _ = sender.send(Ok(stream)).await;
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

async fn handshake(
    acceptor: TlsAcceptor,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            debug!(%peer, "API client authenticated");
            Some(stream)
        }
        Ok(Err(e)) => {
            info!(%peer, error = %e, "API connection refused: TLS handshake failed");
            None
        }
        Err(_) => {
            info!(%peer, "API connection refused: TLS handshake timed out");
            None
        }
    }
}

fn read_files(files: &TlsFiles) -> Result<[Vec<u8>; 3], AgentError> {
    let read = |path: &PathBuf| {
        std::fs::read(path).map_err(|e| AgentError::io(format!("reading {}", path.display()), e))
    };
    Ok([
        read(&files.cert)?,
        read(&files.key)?,
        read(&files.client_ca)?,
    ])
}

fn build_acceptor(files: &TlsFiles, pem: &[Vec<u8>; 3]) -> Result<TlsAcceptor, AgentError> {
    let [cert_pem, key_pem, ca_pem] = pem;
    let bad =
        |path: &PathBuf, what: String| AgentError::Config(format!("{}: {what}", path.display()));
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&files.cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(bad(&files.cert, "no certificate in the file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| bad(&files.key, format!("no usable PEM private key: {e}")))?;
    let mut roots = RootCertStore::empty();
    let mut cas = 0;
    for ca in CertificateDer::pem_slice_iter(ca_pem) {
        let ca = ca.map_err(|e| bad(&files.client_ca, format!("not a PEM certificate: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| bad(&files.client_ca, format!("unusable CA certificate: {e}")))?;
        cas += 1;
    }
    if cas == 0 {
        return Err(bad(
            &files.client_ca,
            "no CA certificate in the file".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
            .build()
            .map_err(|e| {
                bad(
                    &files.client_ca,
                    format!("cannot verify clients with it: {e}"),
                )
            })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| AgentError::Config(format!("TLS protocol versions: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| {
            bad(
                &files.key,
                format!("does not match the certificate or is unusable: {e}"),
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
