//! Ranged blob reads, the node's data path: exact bytes or a clear error, within a
//! deadline.

use std::ops::Range;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use oci_client::Reference;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, HeaderValue, RANGE};
use stoker_format::Digest;

use crate::client::{Access, Budget, status_error};
use crate::{RegistryClient, RegistryError, Target};

/// A registry that ignores `Range` and answers 200 with a blob up to this size is
/// tolerated: the body is read, verified against the blob digest and sliced. Larger
/// whole-blob answers are an error rather than a surprise download.
pub const WHOLE_BLOB_FALLBACK_LIMIT: u64 = 4 * 1024 * 1024;

impl RegistryClient {
    /// Reads bytes `range` (end exclusive) of blob `blob` in repository `repo`.
    ///
    /// Sends `Range: bytes=a-b` and follows redirects to blob storage with the range kept
    /// (the `Authorization` header is dropped when the redirect leaves the registry host).
    /// The answer must be a 206 with exactly the requested bytes; a 200 is accepted only
    /// for blobs up to [`WHOLE_BLOB_FALLBACK_LIMIT`], after checking the blob's digest.
    ///
    /// Each attempt is cut at `request_timeout`. Connection errors, timeouts, broken
    /// bodies, 429 (waiting for `Retry-After`) and 5xx are retried with exponential
    /// back-off and full jitter; a 401 triggers one re-authentication per attempt. All of
    /// it happens within `read_deadline`: when that runs out the read fails with
    /// [`RegistryError::DeadlineExceeded`]. Other errors (404, 416, …) fail at once.
    pub async fn read_range(
        &self,
        repo: &Reference,
        blob: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        self.with_mirrors(repo, |at| {
            let range = range.clone();
            async move { self.read_range_direct(&at, blob, range).await }
        })
        .await
    }

    /// [`read_range`](Self::read_range) from one registry or mirror.
    async fn read_range_direct(
        &self,
        repo: &Reference,
        blob: &Digest,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let mut target = Self::target(repo, format!("blob {blob}"));
        target.range = Some(range.clone());
        if range.start > range.end {
            return Err(RegistryError::BadResponse {
                target,
                reason: "the range ends before it starts".into(),
            });
        }
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let deadline_length = self.inner.config.read_deadline;
        let deadline = Instant::now() + deadline_length;
        let result = self
            .retrying(&target, Budget::Deadline(deadline), || {
                self.read_range_once(repo, blob, range.clone(), &target)
            })
            .await;
        match result {
            Ok(bytes) => Ok(bytes),
            Err(gave_up) if gave_up.out_of_time => Err(RegistryError::DeadlineExceeded {
                target,
                blob: *blob,
                range,
                deadline: deadline_length,
                attempts: gave_up.attempts,
                last_error: Box::new(gave_up.error),
            }),
            Err(gave_up) => Err(gave_up.error),
        }
    }

    async fn read_range_once(
        &self,
        repo: &Reference,
        blob: &Digest,
        range: Range<u64>,
        target: &Target,
    ) -> Result<Bytes, RegistryError> {
        let path = format!("/v2/{}/blobs/{blob}", repo.repository());
        let range_header =
            HeaderValue::from_str(&format!("bytes={}-{}", range.start, range.end - 1)).map_err(
                |e| RegistryError::BadResponse {
                    target: Box::new(target.clone()),
                    reason: e.to_string(),
                },
            )?;
        let mut response = self
            .send(repo, Access::Pull, target, |http, base| {
                http.get(format!("{base}{path}"))
                    .header(RANGE, range_header.clone())
            })
            .await?;
        let status = response.status();
        let redirected_away = left_registry(response.url(), repo);
        let wanted = range.end - range.start;
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let content_range = parse_content_range(response.headers().get(CONTENT_RANGE));
                if let Some((start, end, _)) = content_range
                    && (start, end) != (range.start, range.end - 1)
                {
                    return Err(RegistryError::BadResponse {
                        target: Box::new(target.clone()),
                        reason: format!(
                            "asked for bytes {}-{}, got {start}-{end}",
                            range.start,
                            range.end - 1
                        ),
                    });
                }
                let body = read_body(&mut response, wanted, target).await?;
                if body.len() as u64 != wanted {
                    return Err(RegistryError::BadResponse {
                        target: Box::new(target.clone()),
                        reason: format!("got {} bytes, expected {wanted}", body.len()),
                    });
                }
                Ok(body)
            }
            StatusCode::OK => {
                let size = response.content_length();
                if size.is_none_or(|size| size > WHOLE_BLOB_FALLBACK_LIMIT) {
                    return Err(RegistryError::RangeIgnored {
                        target: Box::new(target.clone()),
                        size,
                    });
                }
                let whole = read_body(&mut response, WHOLE_BLOB_FALLBACK_LIMIT, target).await?;
                let actual = Digest::of(&whole);
                if actual != *blob {
                    return Err(RegistryError::DigestMismatch {
                        target: Box::new(target.clone()),
                        actual,
                    });
                }
                if range.end > whole.len() as u64 {
                    return Err(RegistryError::Status {
                        target: Box::new(target.clone()),
                        status: 416,
                        message: format!("the blob has only {} bytes", whole.len()),
                    });
                }
                Ok(whole.slice(range.start as usize..range.end as usize))
            }
            // Blob storage behind a redirect refusing or losing a (signed) URL: a new
            // attempt starts at the registry and gets a fresh one.
            status
                if redirected_away
                    && status.is_client_error()
                    && status != StatusCode::RANGE_NOT_SATISFIABLE =>
            {
                Err(RegistryError::BadResponse {
                    target: Box::new(target.clone()),
                    reason: format!(
                        "blob storage at {} answered {status}",
                        response.url().host_str().unwrap_or("?")
                    ),
                })
            }
            _ => Err(status_error(target, response).await),
        }
    }
}

/// Reads a response body, failing if it exceeds `limit` bytes.
async fn read_body(
    response: &mut reqwest::Response,
    limit: u64,
    target: &Target,
) -> Result<Bytes, RegistryError> {
    let capacity = response.content_length().unwrap_or(limit).min(limit);
    let mut body = BytesMut::with_capacity(capacity as usize);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| RegistryError::transport(target, e))?
    {
        if body.len() as u64 + chunk.len() as u64 > limit {
            return Err(RegistryError::BadResponse {
                target: Box::new(target.clone()),
                reason: format!("the body is longer than the {limit} bytes expected"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// True when `url` (after redirects) is not on `repo`'s registry: blob storage.
fn left_registry(url: &reqwest::Url, repo: &Reference) -> bool {
    let host = url.host_str().unwrap_or_default();
    let authority = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    !authority.eq_ignore_ascii_case(repo.resolve_registry())
}

/// `Content-Range: bytes a-b/total` → `(a, b, total)` (`total` is `None` for `*`).
pub(crate) fn parse_content_range(value: Option<&HeaderValue>) -> Option<(u64, u64, Option<u64>)> {
    let text = value?.to_str().ok()?.trim();
    let rest = text.strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let total = match total {
        "*" => None,
        total => Some(total.parse().ok()?),
    };
    Some((start.parse().ok()?, end.parse().ok()?, total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        let value = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(
            parse_content_range(Some(&value("bytes 0-9/100"))),
            Some((0, 9, Some(100)))
        );
        assert_eq!(
            parse_content_range(Some(&value("bytes 5-5/*"))),
            Some((5, 5, None))
        );
        assert_eq!(parse_content_range(Some(&value("items 0-9/100"))), None);
        assert_eq!(parse_content_range(Some(&value("bytes x-9/100"))), None);
        assert_eq!(parse_content_range(None), None);
    }

    #[test]
    fn redirects_to_storage() {
        let repo = "127.0.0.1:5000/a".parse::<Reference>().unwrap();
        let url = |s: &str| reqwest::Url::parse(s).unwrap();
        assert!(!left_registry(
            &url("http://127.0.0.1:5000/v2/a/blobs/x"),
            &repo
        ));
        assert!(left_registry(&url("http://127.0.0.1:5001/data"), &repo));
        assert!(left_registry(&url("https://s3.example.com/data"), &repo));
        let hub = "example.com/a".parse::<Reference>().unwrap();
        assert!(!left_registry(
            &url("https://example.com/v2/a/blobs/x"),
            &hub
        ));
    }
}
