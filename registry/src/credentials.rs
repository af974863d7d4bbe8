//! Registry credentials: from a [`CredentialSource`] asked per repository (the node agent's
//! store of credentials pushed from Kubernetes image pull secrets), from
//! [`RegistryConfig::basic_auth`](crate::RegistryConfig), or from a docker `config.json`
//! (`auths` entries with a base64 `auth`, `username`/`password`, or an `identitytoken`),
//! matched by registry host, in that order.
//!
//! Credential helpers (`credsStore`, `credHelpers`) are not run; a registry that only has
//! one gets a warning and anonymous access.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;

use crate::RegistryError;

/// What to authenticate with. `Debug` never shows a secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// Username and password: sent as HTTP Basic, or to the token service.
    Basic { username: String, password: String },
    /// An OAuth2 refresh token (docker's `identitytoken`), exchanged at the token service.
    IdentityToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::IdentityToken(_) => f.write_str("IdentityToken(<redacted>)"),
        }
    }
}

/// Credentials that can change while the client runs, asked for on every authentication
/// (and checked against the ones a cached token came from, see
/// [`RegistryClient`](crate::RegistryClient)): the node agent's in-memory store of
/// credentials pushed from Kubernetes image pull secrets. Consulted before
/// `basic_auth` and the docker config.
pub trait CredentialSource: Send + Sync {
    /// The credentials for `repository` (e.g. `team/app`, `library/nginx`) at `registry`
    /// (as [`canonical_registry_host`] writes it, e.g. `registry.example:5000`,
    /// `docker.io`), if the source has any that are still valid.
    fn credentials_for(&self, registry: &str, repository: &str) -> Option<Credentials>;
}

/// Credentials for each registry host.
#[derive(Debug, Default)]
pub(crate) struct CredentialStore {
    /// From `basic_auth`: used for every registry.
    everywhere: Option<Credentials>,
    /// From the docker config, keyed by [`canonical_host`].
    by_host: HashMap<String, Credentials>,
    /// Hosts the docker config hands to a credential helper, which we do not run.
    helper_hosts: Vec<String>,
    helper_for_all: bool,
}

impl CredentialStore {
    pub(crate) fn load(
        basic_auth: Option<&(String, String)>,
        docker_config: Option<&Path>,
    ) -> Result<Self, RegistryError> {
        let mut store = CredentialStore {
            everywhere: basic_auth.map(|(username, password)| Credentials::Basic {
                username: username.clone(),
                password: password.clone(),
            }),
            ..CredentialStore::default()
        };
        if let Some(path) = docker_config {
            match std::fs::read(path) {
                Ok(bytes) => store.add_docker_config(path, &bytes)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tracing::debug!(path = %path.display(), "no docker config, no stored credentials");
                }
                Err(e) => {
                    return Err(RegistryError::DockerConfig {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(store)
    }

    fn add_docker_config(&mut self, path: &Path, bytes: &[u8]) -> Result<(), RegistryError> {
        let bad = |reason: String| RegistryError::DockerConfig {
            path: path.to_path_buf(),
            reason,
        };
        // serde_json's messages name the line and column, never the content.
        let file: DockerConfigFile =
            serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        for (key, entry) in file.auths {
            let host = canonical_host(&key);
            match entry.credentials() {
                Ok(Some(credentials)) => {
                    self.by_host.insert(host, credentials);
                }
                Ok(None) => {}
                Err(reason) => return Err(bad(format!("auths entry {key:?}: {reason}"))),
            }
        }
        self.helper_hosts = file
            .cred_helpers
            .keys()
            .map(|k| canonical_host(k))
            .collect();
        self.helper_for_all = file.creds_store.is_some_and(|s| !s.is_empty());
        Ok(())
    }

    /// The credentials to use for `registry` (as written in the reference).
    pub(crate) fn for_registry(&self, registry: &str) -> Option<Credentials> {
        if let Some(credentials) = &self.everywhere {
            return Some(credentials.clone());
        }
        let host = canonical_host(registry);
        if let Some(credentials) = self.by_host.get(&host) {
            return Some(credentials.clone());
        }
        if self.helper_for_all || self.helper_hosts.contains(&host) {
            tracing::warn!(
                registry = %host,
                "the docker config names a credential helper for this registry; \
                 helpers are not supported, using anonymous access"
            );
        }
        None
    }
}

#[derive(Deserialize, Default)]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, DockerAuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct DockerAuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl DockerAuthEntry {
    fn credentials(&self) -> Result<Option<Credentials>, String> {
        if let Some(token) = self.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::IdentityToken(token.to_string())));
        }
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "`auth` is not valid base64".to_string())?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| "`auth` is not UTF-8".to_string())?;
            let (username, password) = decoded
                .split_once(':')
                .ok_or_else(|| "`auth` does not decode to user:password".to_string())?;
            return Ok(Some(Credentials::Basic {
                username: username.to_string(),
                password: password.to_string(),
            }));
        }
        match (&self.username, &self.password) {
            (Some(username), Some(password)) if !username.is_empty() => {
                Ok(Some(Credentials::Basic {
                    username: username.clone(),
                    password: password.clone(),
                }))
            }
            _ => Ok(None),
        }
    }
}

/// The host a docker config key or a reference's registry names: no scheme, no path,
/// lower case, and every Docker Hub alias folded into `docker.io`. The form a
/// [`CredentialSource`] is asked with.
pub fn canonical_registry_host(key: &str) -> String {
    canonical_host(key)
}

pub(crate) fn canonical_host(key: &str) -> String {
    let key = key.trim();
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match host.as_str() {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store_from(json: &str) -> CredentialStore {
        let mut store = CredentialStore::default();
        store
            .add_docker_config(Path::new("config.json"), json.as_bytes())
            .unwrap();
        store
    }

    fn basic(username: &str, password: &str) -> Credentials {
        Credentials::Basic {
            username: username.into(),
            password: password.into(),
        }
    }

    #[test]
    fn reads_every_kind_of_auths_entry() {
        let store = store_from(
            r#"{"auths": {
                "127.0.0.1:5000": {"auth": "YWxpY2U6cGE6c3M="},
                "https://registry.example.com/v2/": {"username": "bob", "password": "pw"},
                "acr.example.io": {"auth": "MDAwMDAwMDAtMDAwMDo=", "identitytoken": "refresh-me"},
                "empty.example": {}
            }}"#,
        );
        assert_eq!(
            store.for_registry("127.0.0.1:5000"),
            Some(basic("alice", "pa:ss"))
        );
        assert_eq!(
            store.for_registry("registry.example.com"),
            Some(basic("bob", "pw"))
        );
        assert_eq!(
            store.for_registry("acr.example.io"),
            Some(Credentials::IdentityToken("refresh-me".into()))
        );
        assert_eq!(store.for_registry("empty.example"), None);
        assert_eq!(store.for_registry("127.0.0.1:5001"), None);
    }

    #[test]
    fn docker_hub_aliases_match_each_other() {
        let store = store_from(r#"{"auths": {"https://index.docker.io/v1/": {"auth": "dTpw"}}}"#);
        for registry in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
            assert_eq!(
                store.for_registry(registry),
                Some(basic("u", "p")),
                "{registry}"
            );
        }
    }

    #[test]
    fn basic_auth_wins_over_the_docker_config() {
        let mut store = CredentialStore::load(Some(&("cli".into(), "pw".into())), None).unwrap();
        store
            .add_docker_config(Path::new("c"), br#"{"auths": {"h:1": {"auth": "dTpw"}}}"#)
            .unwrap();
        assert_eq!(store.for_registry("h:1"), Some(basic("cli", "pw")));
    }

    #[test]
    fn bad_files_are_errors_that_do_not_leak_secrets() {
        let mut store = CredentialStore::default();
        let error = store
            .add_docker_config(
                Path::new("c.json"),
                br#"{"auths": {"h": {"auth": "%%%secret"}}}"#,
            )
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("c.json") && text.contains("base64"), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(
            store
                .add_docker_config(Path::new("c.json"), b"{not json")
                .is_err()
        );
    }

    #[test]
    fn missing_file_means_no_credentials() {
        let store = CredentialStore::load(None, Some(Path::new("/nonexistent/stoker/config.json")))
            .unwrap();
        assert_eq!(store.for_registry("anything"), None);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let text = format!(
            "{:?} {:?}",
            basic("alice", "hunter2"),
            Credentials::IdentityToken("tok-123".into())
        );
        assert!(
            !text.contains("hunter2") && !text.contains("tok-123"),
            "{text}"
        );
    }
}
