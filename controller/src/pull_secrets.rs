//! Image pull secrets → registry credentials for the node agents.
//!
//! containerd 1.6 does not hand the credentials kubelet pulls with (CRI `PullImage`'s
//! auth) to snapshotters, so the agent cannot see them. Instead the controller does
//! what kubelet does for the workload's pods, and pushes the result to the agents it
//! warms (`SetCredentials`, see [`crate::warmer`]):
//!
//! 1. the pull secrets a pod of the template gets: the template's `imagePullSecrets`,
//!    or, when it has none, those of its ServiceAccount (what the ServiceAccount
//!    admission plugin adds) — one `get` of the ServiceAccount;
//! 2. each Secret, with one `get` (never `list` or `watch`: the controller reads only
//!    secrets a workload names), of type `kubernetes.io/dockerconfigjson`
//!    (`.dockerconfigjson`) or `kubernetes.io/dockercfg` (`.dockercfg`);
//! 3. for each image of the workload, the entries whose key matches the image's registry
//!    (host and port; `*` matches one DNS label, as in kubelet) and whose path, if
//!    any, is a prefix of its repository. Secrets are tried in order and the first
//!    entry for a registry and prefix wins.
//!
//! A malformed, missing or forbidden secret is a [`Problem`] naming it (and the
//! ImagePrefetch turns Degraded, with an Event); its content is never put in a message,
//! a log or a metric. A ServiceAccount the controller may not read counts as one
//! without pull secrets (RBAC without them is the documented opt-out).
//! Secrets are read again on every reconcile, so a changed Secret reaches the nodes
//! within one reconcile period.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PodSpec, Secret, ServiceAccount};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use stoker_api::agent::RegistryCredential;

use crate::Error;
use crate::status::Problem;

/// `type` of a Secret holding a docker `config.json`.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";
/// `type` of a Secret holding a legacy `.dockercfg` (the `auths` map alone).
pub const DOCKER_CFG_TYPE: &str = "kubernetes.io/dockercfg";
pub const DOCKER_CFG_KEY: &str = ".dockercfg";

/// One usable entry of a docker config. `Debug` never shows the secrets.
#[derive(Clone, PartialEq, Eq)]
pub struct DockerAuth {
    /// Canonical host, with port; may hold `*` labels (`*.registry.example`).
    pub host: String,
    /// Repository prefix the entry is limited to ("" for the whole registry).
    pub path: String,
    pub username: String,
    pub password: String,
    pub identity_token: String,
}

impl fmt::Debug for DockerAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerAuth")
            .field("host", &self.host)
            .field("path", &self.path)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the workload's pull secrets give for its images.
#[derive(Debug, Default)]
pub struct PullCredentials {
    /// For the agents; `expires_at_unix` is left 0 for the warmer to stamp.
    pub credentials: Vec<RegistryCredential>,
    pub problems: Vec<Problem>,
}

/// Reads the pull secrets of `deployments` (all in `namespace`) and picks the
/// credentials for `images`. Missing, forbidden and malformed secrets are problems;
/// other API errors (server errors, throttling, transport) are returned, to retry.
pub async fn read(
    client: &Client,
    namespace: &str,
    deployments: &[Arc<Deployment>],
    images: &[&str],
) -> Result<PullCredentials, Error> {
    let mut found = PullCredentials::default();
    if images.is_empty() {
        return Ok(found);
    }
    let service_accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut secret_names: Vec<String> = Vec::new();
    let mut accounts_read = HashSet::new();
    for deployment in deployments {
        let Some(pod) = deployment.spec.template.spec.as_ref() else {
            continue;
        };
        let names = match template_secrets(pod) {
            Some(names) => names,
            None => {
                let account = service_account_name(pod);
                if !accounts_read.insert(account.clone()) {
                    continue;
                }
                match service_accounts.get_opt(&account).await {
                    Ok(Some(sa)) => sa
                        .image_pull_secrets
                        .iter()
                        .flatten()
                        .map(|r| r.name.clone())
                        .filter(|n| !n.is_empty())
                        .collect(),
                    // The pods cannot be created either; the ReplicaSet says so.
                    Ok(None) => Vec::new(),
                    // RBAC without serviceaccounts (the opt-out in docs/SECURITY.md):
                    // the workload names no secret itself, so it misses nothing it
                    // asked for.
                    Err(e) if crate::http_status(&e) == Some(403) => {
                        tracing::debug!(
                            service_account = %format!("{namespace}/{account}"),
                            "cannot read the ServiceAccount's pull secrets: forbidden"
                        );
                        Vec::new()
                    }
                    Err(e) => {
                        return Err(Error::kube(format!(
                            "get ServiceAccount {namespace}/{account} of Deployment {namespace}/{}",
                            deployment.name_any()
                        ))(e));
                    }
                }
            }
        };
        for name in names {
            if !secret_names.contains(&name) {
                secret_names.push(name);
            }
        }
    }

    let mut auths = Vec::new();
    for name in &secret_names {
        let what = format!("image pull secret {namespace}/{name}");
        match secrets.get_opt(name).await {
            Ok(Some(secret)) => match parse_secret(&secret) {
                Ok(entries) => auths.extend(entries),
                Err(reason) => {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), %reason, "unusable image pull secret");
                    found.problems.push(Problem {
                        reason: "InvalidPullSecret",
                        message: format!("{what}: {reason}"),
                    });
                }
            },
            Ok(None) => found.problems.push(Problem {
                reason: "PullSecretNotFound",
                message: format!("{what} not found"),
            }),
            Err(e) if crate::http_status(&e) == Some(403) => found.problems.push(forbidden(&what)),
            Err(e) => return Err(Error::kube(format!("get {what}"))(e)),
        }
    }
    found.credentials = credentials_for_images(&auths, images);
    Ok(found)
}

fn forbidden(what: &str) -> Problem {
    Problem {
        reason: "PullSecretsForbidden",
        message: format!(
            "cannot read {what}: forbidden; the controller needs get on secrets and \
             serviceaccounts (docs/SECURITY.md)"
        ),
    }
}

/// The template's own pull secrets, or `None` when it names none (its
/// ServiceAccount's are used then).
pub fn template_secrets(pod: &PodSpec) -> Option<Vec<String>> {
    let names: Vec<String> = pod
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.clone())
        .filter(|n| !n.is_empty())
        .collect();
    (!names.is_empty()).then_some(names)
}

/// The ServiceAccount the pods run as: `serviceAccountName`, the deprecated
/// `serviceAccount`, or `default`.
pub fn service_account_name(pod: &PodSpec) -> String {
    pod.service_account_name
        .clone()
        .or_else(|| pod.service_account.clone())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// The usable entries of a pull secret, or why it is unusable. The reason never
/// quotes the secret's content.
pub fn parse_secret(secret: &Secret) -> Result<Vec<DockerAuth>, String> {
    let type_ = secret.type_.as_deref().unwrap_or("Opaque");
    let key = match type_ {
        DOCKER_CONFIG_JSON_TYPE => DOCKER_CONFIG_JSON_KEY,
        DOCKER_CFG_TYPE => DOCKER_CFG_KEY,
        other => {
            return Err(format!(
                "type {other:?} is not {DOCKER_CONFIG_JSON_TYPE:?} or {DOCKER_CFG_TYPE:?}"
            ));
        }
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.as_slice())
        .ok_or_else(|| format!("no {key:?} key"))?;
    // serde_json's messages name a line and column, never the content.
    let auths = if key == DOCKER_CONFIG_JSON_KEY {
        serde_json::from_slice::<DockerConfigJson>(bytes)
            .map_err(|e| format!("{key} is not a docker config: {e}"))?
            .auths
    } else {
        serde_json::from_slice::<std::collections::BTreeMap<String, AuthEntry>>(bytes)
            .map_err(|e| format!("{key} is not a docker config: {e}"))?
    };
    let mut entries = Vec::new();
    for (registry_key, entry) in auths {
        let (host, path) =
            parse_key(&registry_key).ok_or_else(|| format!("entry {registry_key:?}: no host"))?;
        let Some((username, password, identity_token)) = entry
            .credentials()
            .map_err(|reason| format!("entry {registry_key:?}: {reason}"))?
        else {
            continue;
        };
        entries.push(DockerAuth {
            host,
            path,
            username,
            password,
            identity_token,
        });
    }
    Ok(entries)
}

#[derive(Deserialize)]
struct DockerConfigJson {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl AuthEntry {
    /// (username, password, identity token), or `None` for an entry with none.
    fn credentials(&self) -> Result<Option<(String, String, String)>, String> {
        let token = self.identitytoken.clone().unwrap_or_default();
        let (mut username, mut password) = (
            self.username.clone().unwrap_or_default(),
            self.password.clone().unwrap_or_default(),
        );
        if let Some(auth) = self.auth.as_deref().filter(|a| !a.is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| "`auth` is not valid base64".to_string())?;
            let decoded =
                String::from_utf8(decoded).map_err(|_| "`auth` is not UTF-8".to_string())?;
            let (user, pass) = decoded
                .split_once(':')
                .ok_or_else(|| "`auth` does not decode to user:password".to_string())?;
            (username, password) = (user.to_string(), pass.to_string());
        }
        if username.is_empty() && token.is_empty() {
            return Ok(None);
        }
        Ok(Some((username, password, token)))
    }
}

/// Host (canonical, with port) and repository prefix of a docker config key:
/// `registry.example:5000`, `https://registry.example/team/`, `*.example.com`,
/// `https://index.docker.io/v1/`.
pub fn parse_key(key: &str) -> Option<(String, String)> {
    let key = key.trim();
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if host.is_empty() {
        return None;
    }
    let host = canonical_host(host);
    let mut path = path.trim_matches('/').to_string();
    // `docker login`'s key for Docker Hub carries its API version, not a repository.
    if host == "docker.io" && (path == "v1" || path == "v2") {
        path.clear();
    }
    Some((host, path))
}

/// Lower case, with Docker Hub's aliases folded into `docker.io`.
fn canonical_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// Registry (canonical host, with port) and repository of an image reference, with
/// Docker's defaults: `nginx` is `docker.io` `library/nginx`.
pub fn image_location(image: &str) -> Option<(String, String)> {
    let name = image.split('@').next().unwrap_or(image);
    // A tag follows the last ':' after the last '/'.
    let name = match name.rfind(':') {
        Some(colon) if !name[colon..].contains('/') => &name[..colon],
        _ => name,
    };
    let (first, rest) = match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (canonical_host(first), rest.to_string())
        }
        _ => ("docker.io".to_string(), name.to_string()),
    };
    let repository = if first == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    (!repository.is_empty()).then_some((first, repository))
}

/// True if `pattern` (a docker config host, `*` labels allowed) names `host`; ports
/// must be equal.
fn host_matches(pattern: &str, host: &str) -> bool {
    let split = |h: &str| -> (String, Option<String>) {
        match h.rsplit_once(':') {
            Some((name, port)) => (name.to_string(), Some(port.to_string())),
            None => (h.to_string(), None),
        }
    };
    let ((pattern, pattern_port), (name, port)) = (split(pattern), split(host));
    if pattern_port != port {
        return false;
    }
    let labels: Vec<&str> = pattern.split('.').collect();
    let wanted: Vec<&str> = name.split('.').collect();
    labels.len() == wanted.len() && labels.iter().zip(&wanted).all(|(p, h)| *p == "*" || p == h)
}

/// `prefix` is `repository` or one of its parent paths ("" covers every repository).
fn covers(prefix: &str, repository: &str) -> bool {
    prefix.is_empty()
        || repository == prefix
        || repository
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The credentials for `images` from `auths` (in secret order): for each image, each
/// matching entry as a credential for the image's own registry and the entry's
/// prefix, the first for each (registry, prefix) winning. Sorted, so that equal
/// inputs give equal lists.
pub fn credentials_for_images(auths: &[DockerAuth], images: &[&str]) -> Vec<RegistryCredential> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for image in images {
        let Some((registry, repository)) = image_location(image) else {
            continue;
        };
        for auth in auths {
            if !host_matches(&auth.host, &registry) || !covers(&auth.path, &repository) {
                continue;
            }
            if seen.insert((registry.clone(), auth.path.clone())) {
                out.push(RegistryCredential {
                    registry: registry.clone(),
                    repository_prefix: auth.path.clone(),
                    username: auth.username.clone(),
                    password: auth.password.clone(),
                    identity_token: auth.identity_token.clone(),
                    expires_at_unix: 0,
                });
            }
        }
    }
    out.sort_by(|a, b| {
        (&a.registry, &a.repository_prefix).cmp(&(&b.registry, &b.repository_prefix))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use std::collections::BTreeMap;

    fn secret(type_: &str, key: &str, content: &str) -> Secret {
        Secret {
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                key.to_string(),
                ByteString(content.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        }
    }

    fn b64(text: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(text)
    }

    #[test]
    fn image_references_get_docker_defaults() {
        let at = |i: &str| image_location(i).map(|(r, p)| format!("{r} {p}"));
        assert_eq!(at("nginx").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(at("nginx:1.25").as_deref(), Some("docker.io library/nginx"));
        assert_eq!(at("team/app").as_deref(), Some("docker.io team/app"));
        assert_eq!(
            at("index.docker.io/team/app@sha256:ab").as_deref(),
            Some("docker.io team/app")
        );
        assert_eq!(
            at("Registry.Example:5000/ml/train:v1").as_deref(),
            Some("registry.example:5000 ml/train")
        );
        assert_eq!(at("localhost/app:1").as_deref(), Some("localhost app"));
    }

    #[test]
    fn docker_config_keys() {
        let key = |k: &str| parse_key(k).map(|(h, p)| format!("{h} {p}"));
        assert_eq!(
            key("https://index.docker.io/v1/").as_deref(),
            Some("docker.io ")
        );
        assert_eq!(
            key("registry.example:5000").as_deref(),
            Some("registry.example:5000 ")
        );
        assert_eq!(
            key("https://registry.example/team/ml/").as_deref(),
            Some("registry.example team/ml")
        );
        assert_eq!(key("https://").as_deref(), None);
    }

    #[test]
    fn both_secret_types_are_read() {
        let json = secret(
            DOCKER_CONFIG_JSON_TYPE,
            DOCKER_CONFIG_JSON_KEY,
            &format!(
                r#"{{"auths": {{
                    "registry.example": {{"auth": "{}"}},
                    "acr.example": {{"username": "00000000-0000", "password": "", "identitytoken": "refresh"}},
                    "empty.example": {{}}
                }}}}"#,
                b64("alice:pa:ss")
            ),
        );
        let entries = parse_secret(&json).unwrap();
        assert_eq!(entries.len(), 2, "the empty entry is skipped");
        let alice = entries
            .iter()
            .find(|e| e.host == "registry.example")
            .unwrap();
        assert_eq!(
            (alice.username.as_str(), alice.password.as_str()),
            ("alice", "pa:ss")
        );
        let acr = entries.iter().find(|e| e.host == "acr.example").unwrap();
        assert_eq!(acr.identity_token, "refresh");

        let legacy = secret(
            DOCKER_CFG_TYPE,
            DOCKER_CFG_KEY,
            r#"{"https://old.example/": {"username": "bob", "password": "pw", "email": "b@x"}}"#,
        );
        let entries = parse_secret(&legacy).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(
            (entries[0].host.as_str(), entries[0].username.as_str()),
            ("old.example", "bob")
        );
    }

    #[test]
    fn malformed_secrets_say_why_without_their_content() {
        let cases = [
            (
                secret("Opaque", DOCKER_CONFIG_JSON_KEY, "{}"),
                "type \"Opaque\"",
            ),
            (
                secret(DOCKER_CONFIG_JSON_TYPE, DOCKER_CFG_KEY, "{}"),
                "no \".dockerconfigjson\" key",
            ),
            (
                secret(
                    DOCKER_CONFIG_JSON_TYPE,
                    DOCKER_CONFIG_JSON_KEY,
                    "{\"auths\": {\"r.example\": {\"password\": \"hunter2-secret\"",
                ),
                "is not a docker config",
            ),
            (
                secret(
                    DOCKER_CONFIG_JSON_TYPE,
                    DOCKER_CONFIG_JSON_KEY,
                    r#"{"auths": {"r.example": {"auth": "%%hunter2-secret"}}}"#,
                ),
                "not valid base64",
            ),
            (
                secret(
                    DOCKER_CONFIG_JSON_TYPE,
                    DOCKER_CONFIG_JSON_KEY,
                    &format!(
                        r#"{{"auths": {{"r.example": {{"auth": "{}"}}}}}}"#,
                        b64("hunter2-secret")
                    ),
                ),
                "does not decode to user:password",
            ),
        ];
        for (secret, why) in cases {
            let reason = parse_secret(&secret).unwrap_err();
            assert!(reason.contains(why), "{reason}");
            assert!(!reason.contains("hunter2"), "{reason}");
        }
        let no_data = Secret {
            type_: Some(DOCKER_CONFIG_JSON_TYPE.into()),
            ..Secret::default()
        };
        assert!(parse_secret(&no_data).is_err());
    }

    fn auth(host: &str, path: &str, user: &str) -> DockerAuth {
        DockerAuth {
            host: host.into(),
            path: path.into(),
            username: user.into(),
            password: format!("{user}-pw"),
            identity_token: String::new(),
        }
    }

    #[test]
    fn entries_are_picked_per_image_registry_and_path() {
        let auths = [
            auth("registry.example:5000", "", "first"),
            auth("registry.example:5000", "", "second"),
            auth("registry.example:5000", "ml", "ml"),
            auth("registry.example:5000", "mlx", "not-a-path-prefix"),
            auth("*.gcr.example", "", "wildcard"),
            auth("registry.example", "", "other-port"),
            auth("docker.io", "", "hub"),
        ];
        let picked = credentials_for_images(
            &auths,
            &[
                "registry.example:5000/ml/train:v1",
                "eu.gcr.example/p/app",
                "nginx:1",
                "unrelated.example/app",
            ],
        );
        let got: Vec<String> = picked
            .iter()
            .map(|c| format!("{} {:?} {}", c.registry, c.repository_prefix, c.username))
            .collect();
        assert_eq!(
            got,
            [
                "docker.io \"\" hub",
                "eu.gcr.example \"\" wildcard",
                "registry.example:5000 \"\" first",
                "registry.example:5000 \"ml\" ml",
            ]
        );
        assert!(picked.iter().all(|c| c.expires_at_unix == 0));
    }

    #[test]
    fn debug_hides_secrets() {
        let text = format!("{:?}", auth("r.example", "", "alice"));
        assert!(
            text.contains("alice") && !text.contains("alice-pw"),
            "{text}"
        );
    }
}
