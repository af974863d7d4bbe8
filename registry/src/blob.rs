//! Whole blobs: verified, resumable download streams, and uploads.

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use oci_client::Reference;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use stoker_format::{Digest, Hasher};

use crate::client::{Access, status_error};
use crate::range::parse_content_range;
use crate::{RegistryClient, RegistryError, Target};

impl RegistryClient {
    /// Streams blob `digest` of repository `repo`, for consumers that read whole blobs
    /// (the converter reads layers this way). Memory use is one network chunk.
    ///
    /// A transient failure, before or in the middle of the body, is retried with the retry
    /// policy, resuming with a `Range` request where the stream stopped (progress resets
    /// the attempt count). After the last byte the blob's sha256 is checked: on a mismatch
    /// the stream's last item is a [`RegistryError::DigestMismatch`] naming the blob, so a
    /// consumer must not trust what it read before it has seen the end of the stream.
    pub fn blob_stream(
        &self,
        repo: &Reference,
        digest: &Digest,
    ) -> BoxStream<'static, Result<Bytes, RegistryError>> {
        let client = self.clone();
        let repo = repo.clone();
        let digest = *digest;
        let target = Self::target(&repo, format!("blob {digest}"));
        let max_attempts = self.inner.config.retry.max_attempts.max(1);
        async_stream::stream! {
            let mut hasher = Hasher::new();
            let mut offset = 0u64;
            // Consecutive failed attempts; reset whenever bytes arrive.
            let mut failures = 0u32;
            loop {
                let error = match client.open_blob_at(&repo, &digest, offset, &target).await {
                    Err(error) => error,
                    Ok((mut body, mut skip)) => {
                        let mut broke = None;
                        while let Some(chunk) = body.next().await {
                            match chunk {
                                Ok(mut chunk) => {
                                    if skip > 0 {
                                        let dropped = skip.min(chunk.len() as u64);
                                        let _ = chunk.split_to(dropped as usize);
                                        skip -= dropped;
                                    }
                                    if chunk.is_empty() {
                                        continue;
                                    }
                                    failures = 0;
                                    offset += chunk.len() as u64;
                                    hasher.update(&chunk);
                                    yield Ok(chunk);
                                }
                                Err(error) => {
                                    broke = Some(RegistryError::transport(&target, error));
                                    break;
                                }
                            }
                        }
                        match broke {
                            None => break,
                            Some(error) => error,
                        }
                    }
                };
                failures += 1;
                if !error.is_transient() || failures >= max_attempts {
                    yield Err(error);
                    return;
                }
                let wait = error
                    .retry_after()
                    .unwrap_or_else(|| client.inner.config.retry.backoff(failures));
                tracing::debug!(%error, offset, ?wait, "blob stream failed; resuming");
                client.inner.stats.count_retry();
                tokio::time::sleep(wait).await;
            }
            let actual = hasher.finish();
            if actual != digest {
                yield Err(RegistryError::DigestMismatch { target, actual });
            }
        }
        .boxed()
    }

    /// Sends `GET` for the blob from `offset` on. Returns the body and how many leading
    /// bytes of it to drop (when the registry ignored the `Range` and sent everything).
    async fn open_blob_at(
        &self,
        repo: &Reference,
        digest: &Digest,
        offset: u64,
        target: &Target,
    ) -> Result<(BoxStream<'static, Result<Bytes, reqwest::Error>>, u64), RegistryError> {
        let path = format!("/v2/{}/blobs/{digest}", repo.repository());
        let response = self
            .send(repo, Access::Pull, target, |http, base| {
                let request = http.get(format!("{base}{path}"));
                if offset > 0 {
                    request.header(RANGE, format!("bytes={offset}-"))
                } else {
                    request
                }
            })
            .await?;
        let skip = match response.status() {
            StatusCode::OK => offset,
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                match parse_content_range(response.headers().get(CONTENT_RANGE)) {
                    Some((start, _, _)) if start == offset => 0,
                    other => {
                        return Err(RegistryError::BadResponse {
                            target: Box::new(target.clone()),
                            reason: format!(
                                "asked for bytes from {offset}, got Content-Range {other:?}"
                            ),
                        });
                    }
                }
            }
            _ => return Err(status_error(target, response).await),
        };
        Ok((response.bytes_stream().boxed(), skip))
    }

    /// True if `repo` has blob `digest`.
    pub async fn blob_exists(
        &self,
        repo: &Reference,
        digest: &Digest,
    ) -> Result<bool, RegistryError> {
        let target = Self::target(repo, format!("blob {digest}"));
        let digest_text = digest.to_string();
        let digest_text = &digest_text;
        self.oci_call(repo, Access::Pull, &target, |oci| async move {
            oci.blob_exists(repo, digest_text).await
        })
        .await
    }

    /// Uploads `data` as a blob unless `repo` already has it; returns its digest and size.
    pub async fn push_blob(
        &self,
        repo: &Reference,
        data: Bytes,
    ) -> Result<(Digest, u64), RegistryError> {
        let digest = Digest::of(&data);
        let size = data.len() as u64;
        if self.blob_exists(repo, &digest).await? {
            tracing::debug!(repository = repo.repository(), %digest, "blob already present");
            return Ok((digest, size));
        }
        let target = Self::target(repo, format!("blob {digest} upload"));
        let digest_text = digest.to_string();
        let digest_text = &digest_text;
        self.oci_call(repo, Access::Push, &target, |oci| {
            let data = data.clone();
            async move { oci.push_blob(repo, data, digest_text).await }
        })
        .await?;
        tracing::debug!(repository = repo.repository(), %digest, size, "pushed blob");
        Ok((digest, size))
    }

    /// Uploads a blob from a stream, hashing it on the way (chunked upload); returns its
    /// digest and size. A stream cannot be replayed, so a failure is not retried: the
    /// caller starts again. An empty stream uploads the empty blob.
    pub async fn push_blob_stream<S>(
        &self,
        repo: &Reference,
        data: S,
    ) -> Result<(Digest, u64), RegistryError>
    where
        S: Stream<Item = std::io::Result<Bytes>> + Send + 'static,
    {
        let mut data = Box::pin(data);
        // oci-client refuses empty streams; find the first non-empty chunk.
        let first = loop {
            match data.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => break chunk,
                Some(Err(e)) => {
                    return Err(RegistryError::Oci {
                        target: Self::target(repo, "blob upload"),
                        source: e.into(),
                    });
                }
                None => return self.push_blob(repo, Bytes::new()).await,
            }
        };
        let target = Self::target(repo, "blob upload");
        let oci = self.oci_ready(repo, Access::Push, &target).await?;
        // Fetch the push token up front, so a first 401 does not waste the stream.
        self.auth_header(repo, Access::Push, &target).await?;
        self.inner.stats.count_request();
        let stream = futures::stream::once(async move { Ok(first) })
            .chain(data)
            .map(|item| item.map_err(oci_client::errors::OciDistributionError::from));
        let pushed = oci
            .push_blob_stream_chunked(repo, stream)
            .await
            .map_err(|e| RegistryError::from_oci(&target, e))?;
        let digest =
            Digest::parse(&pushed.blob_digest).map_err(|_| RegistryError::BadResponse {
                target: target.clone(),
                reason: format!("unexpected blob digest {:?}", pushed.blob_digest),
            })?;
        tracing::debug!(repository = repo.repository(), %digest, size = pushed.size, "pushed blob stream");
        Ok((digest, pushed.size))
    }
}
