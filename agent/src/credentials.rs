//! Registry credentials pushed to the agent (`SetCredentials` on the agent API) by the
//! controller, from the Kubernetes image pull secrets of the workloads it warms on this
//! node.
//!
//! [`PushedCredentials`] keeps them in memory only: never written to disk, never logged
//! (its `Debug` shows registries and prefixes, not secrets), never put in metrics. It is
//! the node's [`CredentialSource`]: the one registry client every part of the agent
//! shares (the artifact resolver, the lazy mounts' fetchers, the prefetch executor) asks
//! it per image, before the docker config file, whenever it authenticates; a token
//! obtained with credentials that have since changed or expired is not used again.
//!
//! Entries are keyed by registry and repository prefix; the most specific prefix that
//! covers an image's repository wins. Each entry carries an expiry set by the controller,
//! which re-sends before it: an entry past its expiry is never used and is dropped at the
//! next change. Under the agent's supervisor, accepted entries are also handed to its
//! [fd keeper](crate::fd_keeper), which gives them back to the next worker after a
//! restart; without a supervisor a restart forgets them until the controller's next
//! refresh.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use stoker_api::agent::RegistryCredential;
use stoker_registry::{CredentialSource, Credentials, canonical_registry_host};

use crate::AgentError;
use crate::fd_keeper::KeeperClient;

/// Entries held at most; a request that would hold more is refused.
pub const MAX_ENTRIES: usize = 4096;

/// `(registry, repository prefix)`: the canonical registry host and the prefix without
/// leading or trailing slashes ("" for the whole registry).
type Key = (String, String);

/// Entries by registry, then by prefix: a lookup borrows, never allocates.
type Entries = HashMap<String, HashMap<String, Entry>>;

struct Entry {
    credentials: Credentials,
    expires_at_unix: i64,
}

/// See the module documentation.
pub struct PushedCredentials {
    entries: Mutex<Entries>,
    /// Seconds since the Unix epoch; a parameter so that tests can move time.
    clock: fn() -> i64,
    /// Where accepted entries are also kept across worker restarts.
    keeper: OnceLock<Arc<KeeperClient>>,
}

impl Default for PushedCredentials {
    fn default() -> Self {
        PushedCredentials::with_clock(unix_now)
    }
}

/// Registries and prefixes only.
impl fmt::Debug for PushedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries = self.lock();
        let mut keys: Vec<String> = entries
            .iter()
            .flat_map(|(registry, prefixes)| {
                prefixes
                    .keys()
                    .map(move |prefix| format!("{registry}/{prefix}"))
            })
            .collect();
        keys.sort();
        f.debug_struct("PushedCredentials")
            .field("entries", &keys)
            .finish()
    }
}

impl PushedCredentials {
    pub fn new() -> Self {
        PushedCredentials::default()
    }

    /// A store that reads the time from `clock` (seconds since the Unix epoch).
    pub fn with_clock(clock: fn() -> i64) -> Self {
        PushedCredentials {
            entries: Mutex::new(HashMap::new()),
            clock,
            keeper: OnceLock::new(),
        }
    }

    /// Hands every entry accepted from now on to `keeper` as well.
    pub fn keep_in(&self, keeper: Arc<KeeperClient>) {
        let _ = self.keeper.set(keeper);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `credentials`, each replacing the entry with the same registry and prefix;
    /// one already past its expiry removes that entry. All or nothing: a malformed entry
    /// refuses the whole request, naming the entry (never its secrets). Returns the
    /// number of entries held afterwards.
    pub fn set(&self, credentials: &[RegistryCredential]) -> Result<usize, AgentError> {
        let mut parsed = Vec::with_capacity(credentials.len());
        for (i, credential) in credentials.iter().enumerate() {
            parsed.push(parse(credential).map_err(|reason| {
                AgentError::InvalidArgument(format!(
                    "credentials[{i}] (registry {:?}): {reason}",
                    credential.registry
                ))
            })?);
        }
        let now = (self.clock)();
        let mut entries = self.lock();
        for prefixes in entries.values_mut() {
            prefixes.retain(|_, entry| entry.expires_at_unix > now);
        }
        entries.retain(|_, prefixes| !prefixes.is_empty());
        let held = |entries: &Entries| entries.values().map(HashMap::len).sum::<usize>();
        let added = parsed
            .iter()
            .filter(|((registry, prefix), entry)| {
                entry.expires_at_unix > now
                    && !entries
                        .get(registry)
                        .is_some_and(|prefixes| prefixes.contains_key(prefix))
            })
            .count();
        if held(&entries) + added > MAX_ENTRIES {
            // The controller's fault: refuse rather than evict entries at random.
            return Err(AgentError::FailedPrecondition(format!(
                "the agent holds at most {MAX_ENTRIES} registry credentials"
            )));
        }
        for ((registry, prefix), entry) in parsed {
            if entry.expires_at_unix > now {
                entries.entry(registry).or_default().insert(prefix, entry);
            } else if let Some(prefixes) = entries.get_mut(&registry) {
                prefixes.remove(&prefix);
                if prefixes.is_empty() {
                    entries.remove(&registry);
                }
            }
        }
        let held = held(&entries);
        drop(entries);
        if let Some(keeper) = self.keeper.get()
            && let Err(e) = keeper.keep_credentials(credentials)
        {
            tracing::warn!(error = %e, "cannot hand pushed credentials to the supervisor; a worker restart will forget them");
        }
        Ok(held)
    }

    /// Entries held and not yet expired.
    pub fn len(&self) -> usize {
        let now = (self.clock)();
        self.lock()
            .values()
            .flat_map(HashMap::values)
            .filter(|e| e.expires_at_unix > now)
            .count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CredentialSource for PushedCredentials {
    /// The unexpired entry of `registry` whose prefix is the longest that covers
    /// `repository`.
    fn credentials_for(&self, registry: &str, repository: &str) -> Option<Credentials> {
        let now = (self.clock)();
        let entries = self.lock();
        let prefixes = entries.get(registry)?;
        // From the whole repository up to the registry: "a/b/c", "a/b", "a", "".
        let mut prefix = repository.trim_matches('/');
        loop {
            if let Some(entry) = prefixes.get(prefix)
                && entry.expires_at_unix > now
            {
                return Some(entry.credentials.clone());
            }
            if prefix.is_empty() {
                return None;
            }
            prefix = prefix.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
    }
}

/// Checks one wire entry and turns it into a key and an entry.
fn parse(credential: &RegistryCredential) -> Result<(Key, Entry), String> {
    let registry = credential.registry.trim();
    if registry.is_empty() {
        return Err("registry is empty".into());
    }
    if registry.contains("://") || registry.contains('/') || registry.contains(char::is_whitespace)
    {
        return Err("registry must be a host or host:port, without scheme or path".into());
    }
    let prefix = credential.repository_prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|part| part.is_empty() && !prefix.is_empty())
    {
        return Err(format!(
            "repository prefix {prefix:?} has an empty path component"
        ));
    }
    if credential.expires_at_unix <= 0 {
        return Err("expires_at_unix is required".into());
    }
    let credentials = if !credential.identity_token.is_empty() {
        Credentials::IdentityToken(credential.identity_token.clone())
    } else if !credential.username.is_empty() {
        Credentials::Basic {
            username: credential.username.clone(),
            password: credential.password.clone(),
        }
    } else {
        return Err("neither a username nor an identity token".into());
    };
    Ok((
        (canonical_registry_host(registry), prefix.to_string()),
        Entry {
            credentials,
            expires_at_unix: credential.expires_at_unix,
        },
    ))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    fn entry(registry: &str, prefix: &str, user: &str, expires: i64) -> RegistryCredential {
        RegistryCredential {
            registry: registry.into(),
            repository_prefix: prefix.into(),
            username: user.into(),
            password: format!("{user}-password"),
            identity_token: String::new(),
            expires_at_unix: expires,
        }
    }

    fn user(found: Option<Credentials>) -> Option<String> {
        match found? {
            Credentials::Basic { username, .. } => Some(username),
            Credentials::IdentityToken(token) => Some(format!("token:{token}")),
        }
    }

    static NOW: AtomicI64 = AtomicI64::new(1_000);
    fn test_clock() -> i64 {
        NOW.load(Ordering::SeqCst)
    }

    #[test]
    fn the_most_specific_prefix_wins() {
        let store = PushedCredentials::with_clock(|| 1_000);
        store
            .set(&[
                entry("registry.example:5000", "", "whole", 2_000),
                entry("registry.example:5000", "team", "team", 2_000),
                entry("registry.example:5000", "/team/ml/", "ml", 2_000),
            ])
            .unwrap();
        let at = |repo: &str| user(store.credentials_for("registry.example:5000", repo));
        assert_eq!(at("team/ml/train").as_deref(), Some("ml"));
        assert_eq!(at("team/ml").as_deref(), Some("ml"));
        assert_eq!(at("team/web").as_deref(), Some("team"));
        assert_eq!(at("team").as_deref(), Some("team"));
        assert_eq!(
            at("teamwork/app").as_deref(),
            Some("whole"),
            "not a path prefix"
        );
        assert_eq!(at("other").as_deref(), Some("whole"));
        assert_eq!(
            user(store.credentials_for("registry.example", "team/ml")),
            None
        );
    }

    #[test]
    fn registries_are_matched_in_canonical_form() {
        let store = PushedCredentials::with_clock(|| 1_000);
        store
            .set(&[entry("Index.Docker.IO", "library", "hub", 2_000)])
            .unwrap();
        assert_eq!(
            user(store.credentials_for("docker.io", "library/nginx")).as_deref(),
            Some("hub")
        );
    }

    #[test]
    fn identity_tokens_win_over_passwords() {
        let store = PushedCredentials::with_clock(|| 1_000);
        let mut with_token = entry("r.example", "", "u", 2_000);
        with_token.identity_token = "refresh".into();
        store.set(&[with_token]).unwrap();
        assert_eq!(
            user(store.credentials_for("r.example", "a")).as_deref(),
            Some("token:refresh")
        );
    }

    #[test]
    fn expired_entries_are_not_used_and_are_dropped() {
        NOW.store(1_000, Ordering::SeqCst);
        let store = PushedCredentials::with_clock(test_clock);
        store
            .set(&[
                entry("r.example", "", "short", 1_100),
                entry("r.example", "team", "long", 5_000),
            ])
            .unwrap();
        assert_eq!(
            user(store.credentials_for("r.example", "x")).as_deref(),
            Some("short")
        );
        NOW.store(1_100, Ordering::SeqCst);
        assert_eq!(
            user(store.credentials_for("r.example", "x")),
            None,
            "expired"
        );
        assert_eq!(
            user(store.credentials_for("r.example", "team/app")).as_deref(),
            Some("long")
        );
        assert_eq!(store.len(), 1);
        // The next change drops the expired entry for good.
        assert_eq!(store.set(&[]).unwrap(), 1);
        assert_eq!(store.lock().values().map(HashMap::len).sum::<usize>(), 1);
        // An entry sent already expired removes the one it replaces.
        assert_eq!(
            store
                .set(&[entry("r.example", "team", "long", 1_000)])
                .unwrap(),
            0
        );
        assert_eq!(user(store.credentials_for("r.example", "team/app")), None);
    }

    #[test]
    fn malformed_entries_refuse_the_request_without_naming_secrets() {
        let store = PushedCredentials::with_clock(|| 1_000);
        let good = entry("r.example", "", "u", 2_000);
        for (bad, why) in [
            (entry("", "", "u", 2_000), "registry is empty"),
            (entry("https://r.example", "", "u", 2_000), "without scheme"),
            (
                entry("r.example/v2", "", "u", 2_000),
                "without scheme or path",
            ),
            (
                entry("r.example", "a//b", "u", 2_000),
                "empty path component",
            ),
            (
                entry("r.example", "", "u", 0),
                "expires_at_unix is required",
            ),
            (entry("r.example", "", "", 2_000), "neither a username"),
        ] {
            let error = store.set(&[good.clone(), bad]).unwrap_err().to_string();
            assert!(
                error.contains("credentials[1]") && error.contains(why),
                "{error}"
            );
            assert!(!error.contains("password"), "{error}");
        }
        assert!(store.is_empty(), "nothing of a refused request is kept");
    }

    #[test]
    fn the_store_is_bounded() {
        let store = PushedCredentials::with_clock(|| 1_000);
        let many: Vec<RegistryCredential> = (0..=MAX_ENTRIES)
            .map(|i| entry("r.example", &format!("team-{i}"), "u", 2_000))
            .collect();
        let error = store.set(&many).unwrap_err().to_string();
        assert!(error.contains("at most"), "{error}");
        assert!(store.is_empty(), "a refused request changes nothing");
        assert_eq!(store.set(&many[..MAX_ENTRIES]).unwrap(), MAX_ENTRIES);
        // Replacing entries held does not count against the limit.
        assert_eq!(store.set(&many[..10]).unwrap(), MAX_ENTRIES);
    }

    #[test]
    fn debug_shows_no_secret() {
        let store = PushedCredentials::with_clock(|| 1_000);
        store
            .set(&[entry("r.example", "team", "alice", 2_000)])
            .unwrap();
        let text = format!("{store:?}");
        assert!(text.contains("r.example/team"), "{text}");
        assert!(
            !text.contains("alice-password") && !text.contains("alice"),
            "{text}"
        );
    }
}
