//! # stoker-registry
//!
//! The OCI registry client of Stoker, the first network step of the data path
//! (**registry** → fetch → verify → cache → filesystem → snapshotter → container).
//!
//! It is built on `oci-client` and adds what a lazily-loading node needs:
//!
//! - **ranged blob reads** ([`RegistryClient::read_range`]) that return exactly the bytes
//!   asked for or an error, following redirects to blob storage with the `Range` kept,
//!   retrying connection errors, timeouts, 429 (`Retry-After`) and 5xx with exponential
//!   back-off and full jitter, re-authenticating when a token expires, all within a
//!   per-read deadline ([`RegistryError::DeadlineExceeded`]);
//! - **verified, resumable blob streams** ([`RegistryClient::blob_stream`]) for the
//!   converter, and blob and manifest **pushes**;
//! - **referrers**: [`RegistryClient::find_referrers`] and
//!   [`RegistryClient::attach_referrer`], through the referrers API or the `sha256-<hex>`
//!   tag fallback that registries without the API (distribution 2.8) need;
//! - **credentials** from a docker `config.json`, a username and password, or a
//!   [`CredentialSource`] asked per repository (credentials that change at run time, such
//!   as Kubernetes image pull secrets), with anonymous, basic and bearer-token auth; **TLS** with an extra CA bundle, plain HTTP
//!   when asked for (and for loopback registries that do not speak TLS).
//!
//! One [`RegistryClient`] (cheap to clone) shares its connections (keep-alive, HTTP/2
//! over TLS) and tokens. Credentials and tokens are never logged or put into errors.
//!
//! ```no_run
//! # async fn example() -> Result<(), stoker_registry::RegistryError> {
//! use stoker_registry::{RegistryClient, RegistryConfig, parse_reference};
//!
//! let client = RegistryClient::new(RegistryConfig { plain_http: true, ..Default::default() })?;
//! let manifest = client.fetch_manifest("127.0.0.1:5000/app:latest").await?;
//! let image = manifest.image_manifest()?;
//! let layer = image.layers()[0].digest().to_string().parse().expect("sha256 digest");
//! let repo = parse_reference("127.0.0.1:5000/app")?;
//! let first_kib = client.read_range(&repo, &layer, 0..1024).await?;
//! # let _ = first_kib;
//! # Ok(())
//! # }
//! ```

mod blob;
mod client;
mod config;
mod credentials;
mod error;
mod manifest;
mod mirrors;
mod range;
mod referrers;

pub use client::{RegistryClient, RequestStats, install_crypto_provider};
pub use config::{RegistryConfig, RetryPolicy, default_docker_config_path};
pub use credentials::{CredentialSource, Credentials, canonical_registry_host};
pub use error::{RegistryError, Target};
pub use manifest::{
    DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, FetchedManifest, OCI_INDEX, OCI_MANIFEST,
    parse_image_index, parse_image_manifest, parse_platform, parse_reference, platform_to_string,
    select_platforms,
};
pub use mirrors::MIRROR_RETRY_AFTER;
pub use range::WHOLE_BLOB_FALLBACK_LIMIT;
pub use referrers::referrers_fallback_tag;

/// Re-exported so callers need not depend on oci-client / oci-spec themselves.
pub use oci_client::Reference;
pub use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, Platform};
pub use stoker_format::Digest;
