//! containerd's `containerd.services.snapshots.v1.Snapshots` gRPC service over a
//! [`Snapshotter`]. Errors become the gRPC codes containerd's proxy client maps back to
//! its `errdefs` errors (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument).

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use futures::Stream;
use stoker_api::snapshots::snapshots_server::Snapshots;
use stoker_api::snapshots::{
    CleanupRequest, CommitSnapshotRequest, Info, Kind, ListSnapshotsRequest, ListSnapshotsResponse,
    MountsRequest, MountsResponse, PrepareSnapshotRequest, PrepareSnapshotResponse,
    RemoveSnapshotRequest, StatSnapshotRequest, StatSnapshotResponse, UpdateSnapshotRequest,
    UpdateSnapshotResponse, UsageRequest, UsageResponse, ViewSnapshotRequest, ViewSnapshotResponse,
};
use tonic::{Request, Response, Status};

use crate::{SnapshotKind, SnapshotRecord, Snapshotter};

/// How many infos one List response message carries.
const LIST_BATCH: usize = 100;

/// The gRPC face of a [`Snapshotter`].
#[derive(Clone)]
pub struct SnapshotsService {
    snapshotter: Arc<Snapshotter>,
}

impl SnapshotsService {
    pub fn new(snapshotter: Arc<Snapshotter>) -> SnapshotsService {
        SnapshotsService { snapshotter }
    }

    /// The tonic service to add to a server.
    pub fn into_server(self) -> stoker_api::snapshots::snapshots_server::SnapshotsServer<Self> {
        stoker_api::snapshots::snapshots_server::SnapshotsServer::new(self)
    }
}

type ListStream = Pin<Box<dyn Stream<Item = Result<ListSnapshotsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Snapshots for SnapshotsService {
    async fn prepare(
        &self,
        request: Request<PrepareSnapshotRequest>,
    ) -> Result<Response<PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, labels = ?r.labels, "Prepare");
        let mounts = self
            .snapshotter
            .prepare(&r.key, &r.parent, sorted(r.labels))
            .await
            .map_err(|e| log_error("Prepare", &r.key, e))?;
        Ok(Response::new(PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<ViewSnapshotRequest>,
    ) -> Result<Response<ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, parent = %r.parent, "View");
        let mounts = self
            .snapshotter
            .view(&r.key, &r.parent, sorted(r.labels))
            .await
            .map_err(|e| log_error("View", &r.key, e))?;
        Ok(Response::new(ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<MountsRequest>,
    ) -> Result<Response<MountsResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .snapshotter
            .mounts(&r.key)
            .await
            .map_err(|e| log_error("Mounts", &r.key, e))?;
        Ok(Response::new(MountsResponse { mounts }))
    }

    async fn commit(
        &self,
        request: Request<CommitSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, name = %r.name, "Commit");
        self.snapshotter
            .commit(&r.name, &r.key, sorted(r.labels))
            .await
            .map_err(|e| log_error("Commit", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<RemoveSnapshotRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        tracing::debug!(key = %r.key, "Remove");
        self.snapshotter
            .remove(&r.key)
            .await
            .map_err(|e| log_error("Remove", &r.key, e))?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<StatSnapshotRequest>,
    ) -> Result<Response<StatSnapshotResponse>, Status> {
        let r = request.into_inner();
        let record = self.snapshotter.stat(&r.key).await?;
        Ok(Response::new(StatSnapshotResponse {
            info: Some(info(&record)),
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateSnapshotRequest>,
    ) -> Result<Response<UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let Some(new_info) = r.info else {
            return Err(Status::invalid_argument(
                "UpdateSnapshotRequest has no info",
            ));
        };
        let paths = r.update_mask.map(|mask| mask.paths).unwrap_or_default();
        let record = self
            .snapshotter
            .update(&new_info.name, sorted(new_info.labels), &paths)
            .await
            .map_err(|e| log_error("Update", &new_info.name, e))?;
        Ok(Response::new(UpdateSnapshotResponse {
            info: Some(info(&record)),
        }))
    }

    type ListStream = ListStream;

    async fn list(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let r = request.into_inner();
        let records = self
            .snapshotter
            .list(&r.filters)
            .await
            .map_err(|e| log_error("List", &r.filters.join(" | "), e))?;
        let batches: Vec<Result<ListSnapshotsResponse, Status>> = records
            .chunks(LIST_BATCH)
            .map(|chunk| {
                Ok(ListSnapshotsResponse {
                    info: chunk.iter().map(info).collect(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(batches))))
    }

    async fn usage(
        &self,
        request: Request<UsageRequest>,
    ) -> Result<Response<UsageResponse>, Status> {
        let r = request.into_inner();
        let usage = self.snapshotter.usage(&r.key).await?;
        Ok(Response::new(UsageResponse {
            size: i64::try_from(usage.size).unwrap_or(i64::MAX),
            inodes: i64::try_from(usage.inodes).unwrap_or(i64::MAX),
        }))
    }

    async fn cleanup(&self, _request: Request<CleanupRequest>) -> Result<Response<()>, Status> {
        self.snapshotter
            .cleanup()
            .await
            .map_err(|e| log_error("Cleanup", "", e))?;
        Ok(Response::new(()))
    }
}

/// containerd's view of a record.
pub fn info(record: &SnapshotRecord) -> Info {
    let kind = match record.kind {
        SnapshotKind::View => Kind::View,
        SnapshotKind::Active => Kind::Active,
        SnapshotKind::Committed => Kind::Committed,
    };
    Info {
        name: record.name.clone(),
        parent: record.parent.clone(),
        kind: kind as i32,
        created_at: Some(timestamp(record.created_unix_nanos)),
        updated_at: Some(timestamp(record.updated_unix_nanos)),
        labels: record.labels.clone().into_iter().collect(),
    }
}

fn timestamp(unix_nanos: i64) -> prost_types::Timestamp {
    let nanos = u64::try_from(unix_nanos).unwrap_or(0);
    prost_types::Timestamp::from(UNIX_EPOCH + Duration::from_nanos(nanos))
}

fn sorted(labels: HashMap<String, String>) -> BTreeMap<String, String> {
    labels.into_iter().collect()
}

/// Expected answers (AlreadyExists for remote layers, NotFound on probes) are logged
/// at debug level; everything else as a warning.
fn log_error(call: &str, key: &str, error: crate::SnapshotterError) -> Status {
    let status = Status::from(error);
    match status.code() {
        tonic::Code::AlreadyExists | tonic::Code::NotFound => {
            tracing::debug!(call, key, code = ?status.code(), message = status.message(), "snapshot call answered with an error")
        }
        _ => {
            tracing::warn!(call, key, code = ?status.code(), message = status.message(), "snapshot call failed")
        }
    }
    status
}
