//! Where compressed chunk bytes come from: a [`BlobSource`] answers ranged reads
//! of data blobs. The registry client implements it for the agent; tests use
//! in-memory fakes.

use std::error::Error;
use std::ops::Range;

use bytes::Bytes;
use futures::future::BoxFuture;
use stoker_format::Digest;

/// Ranged reads of data blobs. Implementations do their own retries and deadline
/// (the registry client does); the fetcher does not retry a failed read.
pub trait BlobSource: Send + Sync + 'static {
    /// Returns exactly the bytes `range` of `blob`.
    fn read_range<'a>(
        &'a self,
        blob: &'a Digest,
        range: Range<u64>,
    ) -> BoxFuture<'a, Result<Bytes, FetchSourceError>>;
}

/// Why a [`BlobSource`] read failed, already rendered to text (it crosses the
/// trait boundary and is shared by every caller waiting on the read).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchSourceError {
    message: String,
    transient: bool,
}

impl FetchSourceError {
    /// `transient`: the same read may succeed later (network down, 5xx, deadline).
    pub fn new(message: impl Into<String>, transient: bool) -> Self {
        FetchSourceError {
            message: message.into(),
            transient,
        }
    }

    /// Renders `error` and its `source()` chain as `a: b: c`, skipping causes
    /// whose text the message already contains.
    pub fn from_error(error: &(dyn Error + 'static), transient: bool) -> Self {
        let mut message = error.to_string();
        let mut cause = error.source();
        while let Some(inner) = cause {
            let text = inner.to_string();
            if !message.contains(&text) {
                message.push_str(": ");
                message.push_str(&text);
            }
            cause = inner.source();
        }
        FetchSourceError::new(message, transient)
    }

    pub fn is_transient(&self) -> bool {
        self.transient
    }
}
