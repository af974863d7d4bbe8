//! The production [`BlobSource`]: ranged reads from one repository of an OCI
//! registry, through [`stoker_registry::RegistryClient`] (which handles auth,
//! redirects, retries and the per-read deadline).

use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use stoker_format::Digest;
use stoker_registry::{Reference, RegistryClient};

use crate::{BlobSource, FetchSourceError};

/// Reads the data blobs of images stored in `repo`.
#[derive(Clone)]
pub struct RegistrySource {
    client: RegistryClient,
    repo: Reference,
}

impl RegistrySource {
    pub fn new(client: RegistryClient, repo: Reference) -> Self {
        RegistrySource { client, repo }
    }

    pub fn repo(&self) -> &Reference {
        &self.repo
    }
}

impl std::fmt::Debug for RegistrySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistrySource")
            .field("repo", &self.repo.whole())
            .finish_non_exhaustive()
    }
}

impl BlobSource for RegistrySource {
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>> {
        Box::pin(async move {
            self.client
                .read_range(&self.repo, blob, range)
                .await
                .map_err(|e| FetchSourceError::from_error(&e, e.is_transient()))
        })
    }
}
