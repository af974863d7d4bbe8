//! Serving the agent's gRPC services on unix sockets.

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use stoker_snapshotter::Snapshotter;
use stoker_snapshotter::service::SnapshotsService;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::AgentError;

/// Binds a unix socket at `path` for root only: creates the parent directory (mode
/// 0700 when it is new), replaces a stale socket file left by a previous process,
/// and sets the socket's mode to 0600.
pub fn bind_unix_socket(path: &Path) -> Result<UnixListener, AgentError> {
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| AgentError::io(format!("creating {}", parent.display()), e))?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| AgentError::io(format!("chmod {}", parent.display()), e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => tracing::debug!(socket = %path.display(), "removed stale socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(AgentError::io(format!("removing {}", path.display()), e)),
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| AgentError::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| AgentError::io(format!("chmod {}", path.display()), e))?;
    Ok(listener)
}

/// Serves containerd's snapshots API for `snapshotter` on `listener` until `shutdown`
/// completes.
pub async fn serve_snapshotter(
    listener: UnixListener,
    snapshotter: Arc<Snapshotter>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    tonic::transport::Server::builder()
        .add_service(SnapshotsService::new(snapshotter).into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| AgentError::io("serving the snapshots API", std::io::Error::other(e)))
}
