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
//! index blob, verified against its digest) and kept for the next plan of the
//! same image, and the repository gets a fetcher of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use stoker_cache::ChunkCache;
use stoker_convert::ImageStore;
use stoker_fetch::{BlobSource, FetchConfig, Fetcher, RegistrySource};
use stoker_format::{Digest, Index};
use stoker_registry::RegistryClient;
use tracing::info;

use crate::AgentError;

/// Indexes loaded from the registry that are kept (mounted ones are kept while
/// they are mounted, whatever their number).
const LOADED_INDEXES_KEPT: usize = 8;

/// Finds a mounted image's index and fetcher by index digest.
pub type MountLookup = Box<dyn Fn(&Digest) -> Option<(Arc<Index>, Fetcher)> + Send + Sync>;

pub struct NodeImages {
    /// `None`: only fetchers and indexes added by hand (tests).
    client: Option<RegistryClient>,
    mounts: Option<MountLookup>,
    cache: ChunkCache,
    fetch_config: FetchConfig,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By `registry/repository`.
    fetchers: HashMap<String, Fetcher>,
    /// Indexes of mounted images.
    mounted: HashMap<Digest, Arc<Index>>,
    /// Indexes loaded for plans, oldest first.
    loaded: Vec<(Digest, Arc<Index>)>,
}

impl NodeImages {
    /// Images reached through `client`, cached in `cache`.
    pub fn new(client: RegistryClient, cache: ChunkCache, fetch_config: FetchConfig) -> Self {
        NodeImages {
            client: Some(client),
            mounts: None,
            cache,
            fetch_config,
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
            state: Mutex::new(State::default()),
        }
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
        let mut state = self.lock();
        if let Some(index) = state.mounted.remove(digest) {
            remember_loaded(&mut state, *digest, index);
        }
    }

    /// The index `digest`, if mounted or loaded already.
    pub fn index(&self, digest: &Digest) -> Option<Arc<Index>> {
        if let Some((index, _)) = self.mounts.as_ref().and_then(|lookup| lookup(digest)) {
            return Some(index);
        }
        let state = self.lock();
        state.mounted.get(digest).cloned().or_else(|| {
            state
                .loaded
                .iter()
                .find(|(d, _)| d == digest)
                .map(|(_, index)| Arc::clone(index))
        })
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
                remember_loaded(&mut self.lock(), *digest, Arc::clone(&index));
                return Ok(index);
            }
        }
        Err(remote(format!(
            "the image has no Stoker artifact with index {digest}"
        )))
    }
}

fn remember_loaded(state: &mut State, digest: Digest, index: Arc<Index>) {
    state.loaded.retain(|(d, _)| *d != digest);
    state.loaded.push((digest, index));
    if state.loaded.len() > LOADED_INDEXES_KEPT {
        state.loaded.remove(0);
    }
}

/// `registry/repository` of an image reference, and the parsed reference.
fn repository_key(image_ref: &str) -> Result<(String, stoker_registry::Reference), AgentError> {
    let reference = stoker_registry::parse_reference(image_ref).map_err(|e| {
        AgentError::InvalidArgument(format!("{image_ref:?} is not an image reference: {e}"))
    })?;
    let key = format!("{}/{}", reference.registry(), reference.repository());
    Ok((key, reference))
}
