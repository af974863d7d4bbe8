//! The fetchers and indexes of the images this node uses, shared by the lazy
//! mounts and the prefetch executor.
//!
//! One [`Fetcher`] per registry repository, all over the node's one chunk cache.
//! Sharing a repository's fetcher between its mounts and its prefetches is what
//! puts containers' reads ahead of prefetch work: the fetcher gives on-demand
//! reads priority only over prefetches that go through it.
//!
//! A mounted image's index and fetcher come from its mount (see
//! [`NodeImages::with_mounts`]), so a plan warms the very fetcher the container
//! reads through. Otherwise the index is loaded from the registry (artifact →
//! index blob, verified against its digest) and kept, with the artifact found on
//! the way, in the node's [`KnownImages`]: the next plan of the image, and the
//! pull of the image that usually follows its plan (the snapshotter's resolver
//! and the lazy mount), take them from there instead of asking the registry
//! again. The repository gets a fetcher of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stoker_cache::ChunkCache;
use stoker_convert::ImageStore;
use stoker_fetch::{BlobSource, FetchConfig, Fetcher, RegistrySource};
use stoker_format::{Digest, Index};
use stoker_registry::RegistryClient;
use stoker_snapshotter::StokerArtifact;
use tracing::{debug, info};

use crate::AgentError;
use crate::resolver::KnownImages;

/// Finds a mounted image's index and fetcher by index digest.
pub type MountLookup = Box<dyn Fn(&Digest) -> Option<(Arc<Index>, Fetcher)> + Send + Sync>;

pub struct NodeImages {
    /// `None`: only fetchers and indexes added by hand (tests).
    client: Option<RegistryClient>,
    mounts: Option<MountLookup>,
    cache: ChunkCache,
    fetch_config: FetchConfig,
    /// Indexes loaded for plans (a few), and the artifacts they were found by.
    known: Arc<KnownImages>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By `registry/repository`.
    fetchers: HashMap<String, Fetcher>,
    /// Indexes of mounted images.
    mounted: HashMap<Digest, Arc<Index>>,
}

impl NodeImages {
    /// Images reached through `client`, cached in `cache`.
    pub fn new(client: RegistryClient, cache: ChunkCache, fetch_config: FetchConfig) -> Self {
        NodeImages {
            client: Some(client),
            mounts: None,
            cache,
            fetch_config,
            known: Arc::new(KnownImages::default()),
            state: Mutex::new(State::default()),
        }
    }

    /// Without a registry: every fetcher and index must be added by hand.
    pub fn offline(cache: ChunkCache, fetch_config: FetchConfig) -> Self {
        NodeImages {
            client: None,
            mounts: None,
            cache,
            fetch_config,
            known: Arc::new(KnownImages::default()),
            state: Mutex::new(State::default()),
        }
    }

    /// Keeps loaded indexes and the artifacts found for them in `known`, shared
    /// with the snapshotter's resolver and the lazy mounts.
    pub fn with_known_images(mut self, known: Arc<KnownImages>) -> Self {
        self.known = known;
        self
    }

    /// Mounted images are found with `lookup` (index and fetcher of the mount).
    pub fn with_mounts(
        mut self,
        lookup: impl Fn(&Digest) -> Option<(Arc<Index>, Fetcher)> + Send + Sync + 'static,
    ) -> Self {
        self.mounts = Some(Box::new(lookup));
        self
    }

    pub fn cache(&self) -> &ChunkCache {
        &self.cache
    }

    /// The index `digest` of `image_ref` and the fetcher to warm it with: the
    /// mount's if the image is mounted, else the repository's.
    pub async fn open(
        &self,
        image_ref: &str,
        digest: &Digest,
    ) -> Result<(Arc<Index>, Fetcher), AgentError> {
        if let Some(mounted) = self.mounts.as_ref().and_then(|lookup| lookup(digest)) {
            return Ok(mounted);
        }
        let index = self.load_index(image_ref, digest).await?;
        Ok((index, self.fetcher_for(image_ref)?))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The fetcher for `image_ref`'s repository, created on first use.
    pub fn fetcher_for(&self, image_ref: &str) -> Result<Fetcher, AgentError> {
        let (key, reference) = repository_key(image_ref)?;
        let mut state = self.lock();
        if let Some(fetcher) = state.fetchers.get(&key) {
            return Ok(fetcher.clone());
        }
        let Some(client) = &self.client else {
            return Err(AgentError::Remote {
                image: image_ref.to_string(),
                message: "no registry client to fetch it with".into(),
            });
        };
        let source: Arc<dyn BlobSource> = Arc::new(RegistrySource::new(client.clone(), reference));
        let fetcher = Fetcher::new(source, self.cache.clone(), self.fetch_config.clone());
        state.fetchers.insert(key, fetcher.clone());
        Ok(fetcher)
    }

    /// Uses `fetcher` for `image_ref`'s repository from now on.
    pub fn add_fetcher(&self, image_ref: &str, fetcher: Fetcher) -> Result<(), AgentError> {
        let (key, _) = repository_key(image_ref)?;
        self.lock().fetchers.insert(key, fetcher);
        Ok(())
    }

    /// Records the index of a mounted image.
    pub fn add_index(&self, digest: Digest, index: Arc<Index>) {
        self.lock().mounted.insert(digest, index);
    }

    /// Forgets a mounted image's index (it stays among the loaded ones).
    pub fn remove_index(&self, digest: &Digest) {
        let removed = self.lock().mounted.remove(digest);
        if let Some(index) = removed {
            self.known.remember_index(*digest, index);
        }
    }

    /// The index `digest`, if mounted or loaded already.
    pub fn index(&self, digest: &Digest) -> Option<Arc<Index>> {
        if let Some((index, _)) = self.mounts.as_ref().and_then(|lookup| lookup(digest)) {
            return Some(index);
        }
        let mounted = self.lock().mounted.get(digest).cloned();
        mounted.or_else(|| self.known.index(digest))
    }

    /// The index `digest` of image `image_ref`: known already, or found through
    /// the image's Stoker artifacts (every platform) and verified.
    pub async fn load_index(
        &self,
        image_ref: &str,
        digest: &Digest,
    ) -> Result<Arc<Index>, AgentError> {
        if let Some(index) = self.index(digest) {
            return Ok(index);
        }
        let remote = |message: String| AgentError::Remote {
            image: image_ref.to_string(),
            message,
        };
        let Some(client) = &self.client else {
            return Err(remote(format!(
                "index {digest} is not mounted and there is no registry client to load it"
            )));
        };
        let (store, selector) =
            ImageStore::registry(client.clone(), image_ref).map_err(|e| remote(e.to_string()))?;
        let manifests = store
            .platform_manifests(&selector, &[])
            .await
            .map_err(|e| remote(e.to_string()))?;
        for (platform, manifest) in manifests {
            let artifacts = store
                .referrers(&manifest.digest)
                .await
                .map_err(|e| remote(e.to_string()))?;
            let newest = artifacts.last().copied();
            for artifact in artifacts {
                let found = stoker_convert::artifact::read_artifact(
                    &store,
                    &manifest.digest,
                    platform.clone(),
                    &artifact,
                )
                .await
                .map_err(|e| remote(e.to_string()))?;
                if found.index_digest != *digest {
                    continue;
                }
                let index = stoker_convert::load_index(&store, &found)
                    .await
                    .map_err(|e| remote(format!("loading index {digest}: {e}")))?;
                info!(image = image_ref, index = %digest, "index loaded for a prefetch plan");
                let index = Arc::new(index);
                self.known.remember_index(*digest, Arc::clone(&index));
                // The snapshotter's resolver takes the newest artifact of an
                // image: only that one may answer it.
                if newest == Some(artifact) {
                    self.remember_artifact(image_ref, &manifest, digest);
                }
                return Ok(index);
            }
        }
        Err(remote(format!(
            "the image has no Stoker artifact with index {digest}"
        )))
    }
}

impl NodeImages {
    /// Remembers that the image manifest `manifest` has the artifact of index
    /// `index_digest`, for the snapshotter's resolver (it needs the layers).
    fn remember_artifact(
        &self,
        image_ref: &str,
        manifest: &stoker_convert::source::Manifest,
        index_digest: &Digest,
    ) {
        match layer_digests(&manifest.bytes) {
            Ok(layer_digests) => self.known.remember_artifact(
                image_ref,
                &manifest.digest.to_string(),
                StokerArtifact {
                    index_digest: index_digest.to_string(),
                    layer_digests,
                },
            ),
            Err(e) => {
                debug!(image = image_ref, manifest = %manifest.digest, error = %e, "image manifest without readable layers; the pull will look the artifact up itself")
            }
        }
    }
}

/// The layer digests of an image manifest, bottom to top.
fn layer_digests(manifest: &[u8]) -> Result<Vec<String>, serde_json::Error> {
    let manifest: stoker_registry::ImageManifest = serde_json::from_slice(manifest)?;
    Ok(manifest
        .layers()
        .iter()
        .map(|layer| layer.digest().to_string())
        .collect())
}

/// `registry/repository` of an image reference, and the parsed reference.
fn repository_key(image_ref: &str) -> Result<(String, stoker_registry::Reference), AgentError> {
    let reference = stoker_registry::parse_reference(image_ref).map_err(|e| {
        AgentError::InvalidArgument(format!("{image_ref:?} is not an image reference: {e}"))
    })?;
    let key = format!("{}/{}", reference.registry(), reference.repository());
    Ok((key, reference))
}
