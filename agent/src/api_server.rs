//! The agent API (`stoker.agent.v1`, see api/proto/stoker/agent/v1/agent.proto):
//! prefetch plans in, startup traces and status out. The controller is its
//! client.
//!
//! Served on a unix socket (mode 0600, root only) for local tools, and on TCP
//! with mutual TLS ([`crate::tls`]) for the controller: a client without a
//! certificate from the configured CA is refused at the handshake. Both matter
//! for `SetCredentials`, which hands the agent registry passwords and tokens
//! ([`crate::credentials`]); nothing of a request's secrets is logged.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use stoker_api::agent::agent_server::{Agent, AgentServer};
use stoker_api::agent::{
    CancelPrefetchRequest, CancelPrefetchResponse, ContainerReadyRequest, ContainerReadyResponse,
    GetTraceRequest, GetTraceResponse, ListTracesRequest, ListTracesResponse, MountedImage,
    PrefetchProgress, PrefetchRequest as PrefetchRequestMessage, SetCredentialsRequest,
    SetCredentialsResponse, StatusRequest, StatusResponse, TraceEntry as TraceEntryMessage,
    TraceSummary as TraceSummaryMessage,
};
use stoker_format::{Digest, Plan};
use stoker_snapshotter::Snapshotter;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};
use tracing::{debug, warn};

use crate::AgentError;
use crate::credentials::PushedCredentials;
use crate::prefetch::{PrefetchRequest, PrefetchState, Prefetches, Progress};
use crate::tls::{self, ReloadingTls};
use crate::trace::{TraceSummary, Traces};

/// The agent API over the node's traces, prefetch jobs and mounts.
#[derive(Clone)]
pub struct AgentService {
    traces: Arc<Traces>,
    prefetches: Arc<Prefetches>,
    /// Mounted images for `Status`; none without a snapshotter.
    snapshotter: Option<Arc<Snapshotter>>,
    /// Where `SetCredentials` puts registry credentials: the store the node's
    /// registry client asks ([`AgentService::with_credentials`]). None: refused.
    credentials: Option<Arc<PushedCredentials>>,
}

impl AgentService {
    pub fn new(
        traces: Arc<Traces>,
        prefetches: Arc<Prefetches>,
        snapshotter: Option<Arc<Snapshotter>>,
    ) -> AgentService {
        AgentService {
            traces,
            prefetches,
            snapshotter,
            credentials: None,
        }
    }

    /// Serves `SetCredentials` into `credentials`, the store given to the registry
    /// client as its [`stoker_registry::CredentialSource`].
    pub fn with_credentials(mut self, credentials: Arc<PushedCredentials>) -> AgentService {
        self.credentials = Some(credentials);
        self
    }

    /// The tonic service to add to a server. Traces can be large: responses are
    /// not limited in size (clients raise their own decoding limit).
    pub fn into_server(self) -> AgentServer<Self> {
        AgentServer::new(self).max_encoding_message_size(usize::MAX)
    }
}

/// Serves the API on a unix socket until `shutdown` completes.
pub async fn serve_unix(
    listener: UnixListener,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(|e| {
            AgentError::io(
                "serving the agent API on its unix socket",
                std::io::Error::other(e),
            )
        })
}

/// Serves the API on TCP with mutual TLS until `shutdown` completes.
pub async fn serve_tcp_mtls(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    service: AgentService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    tonic::transport::Server::builder()
        .add_service(service.into_server())
        .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
        .await
        .map_err(|e| AgentError::io("serving the agent API on TCP", std::io::Error::other(e)))
}

type ProgressStream = Pin<Box<dyn Stream<Item = Result<PrefetchProgress, Status>> + Send>>;

#[tonic::async_trait]
impl Agent for AgentService {
    type PrefetchStream = ProgressStream;

    async fn prefetch(
        &self,
        request: Request<PrefetchRequestMessage>,
    ) -> Result<Response<ProgressStream>, Status> {
        let r = request.into_inner();
        if r.image_ref.is_empty() {
            return Err(Status::invalid_argument("image_ref is empty"));
        }
        let index_digest = parse_digest(&r.index_digest)?;
        let plan =
            Plan::decode(&r.plan).map_err(|e| Status::invalid_argument(format!("plan: {e}")))?;
        debug!(image = %r.image_ref, index = %index_digest, learning_complete = r.learning_complete, "Prefetch");
        if r.learning_complete {
            self.traces
                .stop_learning(index_digest, plan.chunks.clone().into());
        }
        let progress = self
            .prefetches
            .start(PrefetchRequest {
                image_ref: r.image_ref,
                index_digest,
                plan,
                background_rest: r.background_rest,
                prepare_passthrough: r.learning_complete,
            })
            .map_err(Status::from)?;
        Ok(Response::new(progress_stream(progress)))
    }

    async fn cancel_prefetch(
        &self,
        request: Request<CancelPrefetchRequest>,
    ) -> Result<Response<CancelPrefetchResponse>, Status> {
        let digest = parse_digest(&request.into_inner().index_digest)?;
        Ok(Response::new(CancelPrefetchResponse {
            cancelled: self.prefetches.cancel(&digest),
        }))
    }

    async fn list_traces(
        &self,
        request: Request<ListTracesRequest>,
    ) -> Result<Response<ListTracesResponse>, Status> {
        let filter = request.into_inner().index_digest;
        let traces = self
            .traces
            .list((!filter.is_empty()).then_some(filter.as_str()))
            .into_iter()
            .map(summary_message)
            .collect();
        Ok(Response::new(ListTracesResponse { traces }))
    }

    async fn get_trace(
        &self,
        request: Request<GetTraceRequest>,
    ) -> Result<Response<GetTraceResponse>, Status> {
        let id = request.into_inner().trace_id;
        let traces = Arc::clone(&self.traces);
        let lookup_id = id.clone();
        let found = tokio::task::spawn_blocking(move || traces.get(&lookup_id))
            .await
            .map_err(|e| Status::internal(format!("reading trace: {e}")))?
            .map_err(Status::from)?;
        let Some((summary, trace)) = found else {
            return Err(Status::not_found(format!("no trace {id:?} on this node")));
        };
        let index = Digest::parse(&summary.index_digest)
            .ok()
            .and_then(|d| self.prefetches.images().index(&d));
        let entries = trace
            .entries
            .iter()
            .map(|e| TraceEntryMessage {
                chunk_index: e.chunk,
                chunk_digest: index
                    .as_ref()
                    .and_then(|index| index.chunk(e.chunk))
                    .map(|c| c.digest.to_string())
                    .unwrap_or_default(),
                path: trace
                    .files
                    .get(e.file as usize)
                    .cloned()
                    .unwrap_or_default(),
                file_offset: e.file_offset,
                micros_since_start: e.micros,
                chunk_length: e.len,
            })
            .collect();
        Ok(Response::new(GetTraceResponse {
            summary: Some(summary_message(summary)),
            entries,
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let images = match &self.snapshotter {
            Some(snapshotter) => snapshotter
                .mounted_images()
                .await
                .map_err(Status::from)?
                .into_iter()
                .map(|m| MountedImage {
                    image_ref: m.image.image_ref,
                    index_digest: m.image.index_digest,
                    mountpoint: m.mountpoint.display().to_string(),
                    users: m.users,
                })
                .collect(),
            None => Vec::new(),
        };
        let cache = self.prefetches.images().cache();
        Ok(Response::new(StatusResponse {
            images,
            cache_used_bytes: cache.usage().bytes,
            cache_limit_bytes: cache.capacity(),
            prefetches: self
                .prefetches
                .in_progress()
                .iter()
                .map(progress_message)
                .collect(),
        }))
    }

    async fn container_ready(
        &self,
        request: Request<ContainerReadyRequest>,
    ) -> Result<Response<ContainerReadyResponse>, Status> {
        let container = request.into_inner().container_id;
        if container.is_empty() {
            return Err(Status::invalid_argument("container_id is empty"));
        }
        Ok(Response::new(ContainerReadyResponse {
            trace_closed: self.traces.close_for_container(&container).await,
        }))
    }

    async fn set_credentials(
        &self,
        request: Request<SetCredentialsRequest>,
    ) -> Result<Response<SetCredentialsResponse>, Status> {
        let Some(store) = &self.credentials else {
            return Err(Status::unimplemented(
                "this agent has no store for pushed registry credentials",
            ));
        };
        let credentials = request.into_inner().credentials;
        let stored = store.set(&credentials).map_err(Status::from)?;
        // Registries and counts only: never a username, password or token.
        debug!(received = credentials.len(), stored, "SetCredentials");
        Ok(Response::new(SetCredentialsResponse {
            stored: u32::try_from(stored).unwrap_or(u32::MAX),
        }))
    }
}

fn parse_digest(text: &str) -> Result<Digest, Status> {
    Digest::parse(text).map_err(|e| Status::invalid_argument(format!("index_digest: {e}")))
}

/// The progress of a job: its current state, then every change, ending after
/// the final state.
fn progress_stream(receiver: watch::Receiver<Progress>) -> ProgressStream {
    let stream = futures::stream::unfold(Some((receiver, true)), |state| async move {
        let (mut receiver, first) = state?;
        if !first && receiver.changed().await.is_err() {
            // The job ended; its last value is final unless it died.
            let last = receiver.borrow().clone();
            if last.state.is_final() {
                return None;
            }
            warn!(index = %last.index_digest, "prefetch job stopped without a final state");
            let failed = Progress {
                state: PrefetchState::Failed,
                error: Some("the prefetch stopped unexpectedly".into()),
                ..last
            };
            return Some((Ok(progress_message(&failed)), None));
        }
        let progress = receiver.borrow_and_update().clone();
        let next = (!progress.state.is_final()).then_some((receiver, false));
        Some((Ok(progress_message(&progress)), next))
    });
    Box::pin(stream)
}

fn progress_message(p: &Progress) -> PrefetchProgress {
    use stoker_api::agent::PrefetchState as Wire;
    let state = match p.state {
        PrefetchState::Queued => Wire::Queued,
        PrefetchState::Running => Wire::Running,
        PrefetchState::Done => Wire::Done,
        PrefetchState::Failed => Wire::Failed,
        PrefetchState::Cancelled => Wire::Cancelled,
    };
    PrefetchProgress {
        index_digest: p.index_digest.to_string(),
        state: state as i32,
        chunks_done: p.chunks_done,
        chunks_total: p.chunks_total,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        error: p.error.clone().unwrap_or_default(),
    }
}

fn summary_message(s: TraceSummary) -> TraceSummaryMessage {
    TraceSummaryMessage {
        trace_id: s.id,
        image_ref: s.image_ref,
        index_digest: s.index_digest,
        container_id: s.container_id,
        started_at_unix_ms: s.started_at_unix_ms,
        entries: s.entries,
        complete: s.complete,
        truncated: s.truncated,
    }
}
