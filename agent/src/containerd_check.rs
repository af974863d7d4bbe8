//! Checks containerd's configuration at start and says exactly what is missing.
//!
//! The agent only works once containerd is configured for it (registry → … →
//! **snapshotter** → container: containerd must send its snapshot calls here):
//!
//! - a proxy plugin of type `snapshot` whose `address` is the agent's snapshotter
//!   socket, e.g. `[proxy_plugins.stoker] type = "snapshot", address = "/run/stoker/snapshotter.sock"`;
//! - for Kubernetes, CRI set to use that snapshotter — as its default, or in a
//!   runtime handler's table for the pods of one RuntimeClass (what kind-config
//!   does) — and to pass the image labels remote snapshotters need:
//!   `snapshotter = "stoker"` and
//!   `disable_snapshot_annotations = false` (containerd's default is `true`), under
//!   `[plugins."io.containerd.grpc.v1.cri".containerd]` (config version 2, containerd
//!   1.x) or `[plugins."io.containerd.cri.v1.images"]` (version 3, containerd 2.x);
//! - CRI not disabled (`disabled_plugins`).
//!
//! [`check_config`] reads the file (default [`DEFAULT_CONTAINERD_CONFIG`], or
//! `STOKER_CONTAINERD_CONFIG`) and the files it `imports` (later files replace a
//! plugin's whole table, as containerd merges them), and returns one [`Finding`] per
//! problem, each with the TOML that fixes it. [`log_containerd_config`] logs them at
//! start; it never stops the agent (containerd may be configured by other means, or
//! its file not be mounted into the agent's container).

use std::path::{Path, PathBuf};

use toml_edit::{Item, Table};

/// Where containerd reads its configuration by default.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";
/// Environment variable naming another containerd configuration file to check.
pub const CONTAINERD_CONFIG_ENV: &str = "STOKER_CONTAINERD_CONFIG";

/// The CRI plugin's table in config version 2 (containerd 1.x) and 1.
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
/// The CRI image plugin's table in config version 3 (containerd 2.x).
const CRI_IMAGES_V3: &str = "io.containerd.cri.v1.images";
/// The CRI runtime plugin's table in config version 3 (runtime handlers).
const CRI_RUNTIME_V3: &str = "io.containerd.cri.v1.runtime";

/// One thing missing or wrong in containerd's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// What is wrong, naming the file and the setting.
    pub problem: String,
    /// The TOML that fixes it.
    pub fix: String,
}

/// What the agent needs from containerd.
#[derive(Clone, Debug)]
pub struct Expected<'a> {
    /// The agent's snapshotter socket (`snapshotter_socket`).
    pub socket: &'a Path,
    /// Whether CRI (the kubelet) is meant to use the snapshotter.
    pub cri: bool,
}

/// Checks the containerd configuration at `path` (and its imports) against `expected`.
pub fn check_config(path: &Path, expected: &Expected<'_>) -> Vec<Finding> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return vec![Finding {
                problem: format!(
                    "cannot read containerd's configuration {}: {e} (mount it into the agent, or set \
                     {CONTAINERD_CONFIG_ENV})",
                    path.display()
                ),
                fix: proxy_plugin_toml("stoker", expected.socket),
            }];
        }
    };
    let mut findings = Vec::new();
    let mut config = match parse(&text, path) {
        Ok(config) => config,
        Err(finding) => return vec![finding],
    };
    for import in imports(&config, path) {
        match std::fs::read_to_string(&import).map_err(|e| e.to_string()) {
            Ok(text) => match parse(&text, &import) {
                Ok(imported) => merge(&mut config, &imported),
                Err(finding) => findings.push(finding),
            },
            Err(e) => findings.push(Finding {
                problem: format!(
                    "{} imports {}, which cannot be read: {e}",
                    path.display(),
                    import.display()
                ),
                fix: String::new(),
            }),
        }
    }
    findings.extend(check_text_config(
        &config,
        &path.display().to_string(),
        expected,
    ));
    findings
}

/// Checks configuration text (one file, imports not followed); `name` names it in
/// the findings.
pub fn check_config_text(text: &str, name: &str, expected: &Expected<'_>) -> Vec<Finding> {
    match parse(text, Path::new(name)) {
        Ok(config) => check_text_config(&config, name, expected),
        Err(finding) => vec![finding],
    }
}

/// Logs what [`check_config`] finds in the file named by `STOKER_CONTAINERD_CONFIG`
/// (default [`DEFAULT_CONTAINERD_CONFIG`]): a warning per problem with its fix, or
/// one line saying the configuration is right. Returns the findings.
pub fn log_containerd_config(socket: &Path) -> Vec<Finding> {
    let path = std::env::var_os(CONTAINERD_CONFIG_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_CONTAINERD_CONFIG), PathBuf::from);
    let findings = check_config(&path, &Expected { socket, cri: true });
    if findings.is_empty() {
        tracing::info!(
            config = %path.display(),
            socket = %socket.display(),
            "containerd is configured for Stoker (proxy snapshotter and CRI)"
        );
    }
    for finding in &findings {
        tracing::warn!(
            config = %path.display(),
            fix = %finding.fix,
            "containerd configuration: {}",
            finding.problem
        );
    }
    findings
}

fn parse(text: &str, path: &Path) -> Result<Table, Finding> {
    let document = toml_edit::Document::parse(text.to_string()).map_err(|e| Finding {
        problem: format!(
            "containerd's configuration {} is not valid TOML: {}",
            path.display(),
            e.to_string().trim()
        ),
        fix: String::new(),
    })?;
    Ok(document.as_table().clone())
}

/// The files `imports` names, relative ones against the file's directory, with `*`
/// in file names expanded.
fn imports(config: &Table, path: &Path) -> Vec<PathBuf> {
    let base = path.parent().unwrap_or(Path::new("/"));
    let patterns = config
        .get("imports")
        .and_then(Item::as_array)
        .map(|array| array.iter().filter_map(|v| v.as_str()).map(PathBuf::from));
    let mut files = Vec::new();
    for pattern in patterns.into_iter().flatten() {
        let pattern = base.join(pattern);
        let name = pattern
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match (name.split_once('*'), pattern.parent()) {
            (Some((prefix, suffix)), Some(dir)) => {
                let mut matched: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|entry| entry.path())
                    .filter(|p| {
                        p.file_name().is_some_and(|n| {
                            let n = n.to_string_lossy();
                            n.len() >= prefix.len() + suffix.len()
                                && n.starts_with(prefix)
                                && n.ends_with(suffix)
                        })
                    })
                    .collect();
                matched.sort();
                files.extend(matched);
            }
            _ => files.push(pattern),
        }
    }
    files
}

/// Merges an imported file as containerd 1.x does: each plugin and proxy plugin
/// table the import defines replaces the one before; other top-level keys are set.
fn merge(config: &mut Table, imported: &Table) {
    for (key, item) in imported.iter() {
        if key == "imports" {
            continue;
        }
        let existing = config.get_mut(key).and_then(Item::as_table_like_mut);
        let merged = match (key, item.as_table_like(), existing) {
            ("plugins" | "proxy_plugins", Some(entries), Some(existing)) => {
                for (name, entry) in entries.iter() {
                    existing.insert(name, entry.clone());
                }
                true
            }
            _ => false,
        };
        if !merged {
            config.insert(key, item.clone());
        }
    }
}

fn check_text_config(config: &Table, name: &str, expected: &Expected<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let version = config
        .get("version")
        .and_then(Item::as_integer)
        .unwrap_or(1);
    let socket = expected.socket.display().to_string();

    // The proxy plugin.
    let proxies = config.get("proxy_plugins").and_then(Item::as_table_like);
    let ours = proxies.and_then(|proxies| {
        proxies.iter().find(|(_, plugin)| {
            plugin
                .get("address")
                .and_then(Item::as_str)
                .is_some_and(|address| same_socket(address, &socket))
        })
    });
    let snapshotter = match ours {
        Some((plugin, item)) => {
            let kind = item.get("type").and_then(Item::as_str).unwrap_or("");
            if kind != "snapshot" {
                findings.push(Finding {
                    problem: format!(
                        "{name}: [proxy_plugins.{plugin}] points at the agent's socket {socket} but has \
                         type = {kind:?}; it must be \"snapshot\""
                    ),
                    fix: proxy_plugin_toml(plugin, expected.socket),
                });
            }
            plugin.to_string()
        }
        None => {
            let stoker = proxies
                .and_then(|p| p.get("stoker"))
                .and_then(|p| p.get("address"))
                .and_then(Item::as_str);
            let problem = match stoker {
                Some(address) => format!(
                    "{name}: [proxy_plugins.stoker] has address = {address:?}, but the agent serves \
                     its snapshotter on {socket}"
                ),
                None => format!(
                    "{name}: no proxy plugin points at the agent's snapshotter socket {socket} \
                     (containerd will never call the agent)"
                ),
            };
            findings.push(Finding {
                problem,
                fix: proxy_plugin_toml("stoker", expected.socket),
            });
            "stoker".to_string()
        }
    };
    if !expected.cri {
        return findings;
    }

    // CRI: enabled, using the snapshotter, passing the image labels.
    let (cri_plugin, table_path) = match version {
        3 => (CRI_IMAGES_V3, format!("plugins.\"{CRI_IMAGES_V3}\"")),
        2 => (CRI_V2, format!("plugins.\"{CRI_V2}\".containerd")),
        _ => ("cri", "plugins.cri.containerd".to_string()),
    };
    let disabled = config
        .get("disabled_plugins")
        .and_then(Item::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .find(|p| *p == "cri" || *p == CRI_V2 || p.starts_with("io.containerd.cri."));
    if let Some(plugin) = disabled {
        findings.push(Finding {
            problem: format!(
                "{name}: disabled_plugins lists {plugin:?}: CRI is off, so the kubelet cannot use the \
                 Stoker snapshotter"
            ),
            fix: format!("remove {plugin:?} from disabled_plugins"),
        });
    }
    let plugins = config.get("plugins").and_then(Item::as_table_like);
    let cri = plugins.and_then(|p| p.get(cri_plugin));
    let cri = if version == 3 {
        cri
    } else {
        cri.and_then(|c| c.get("containerd"))
    };
    let configured = cri
        .and_then(|c| c.get("snapshotter"))
        .and_then(Item::as_str);
    // Or per runtime handler (containerd 1.7+): pods of a RuntimeClass with that
    // handler use it, others keep the default snapshotter.
    let runtimes = if version == 3 {
        plugins
            .and_then(|p| p.get(CRI_RUNTIME_V3))
            .and_then(|r| r.get("containerd"))
    } else {
        cri
    }
    .and_then(|c| c.get("runtimes"))
    .and_then(Item::as_table_like);
    let handlers: Vec<&str> = runtimes
        .into_iter()
        .flat_map(|r| r.iter())
        .filter(|(_, runtime)| {
            runtime.get("snapshotter").and_then(Item::as_str) == Some(snapshotter.as_str())
        })
        .map(|(handler, _)| handler)
        .collect();
    if configured != Some(snapshotter.as_str()) && handlers.is_empty() {
        findings.push(Finding {
            problem: format!(
                "{name}: CRI uses the snapshotter {:?} and no runtime handler uses {snapshotter:?}: \
                 pods would not start lazily",
                configured.unwrap_or("overlayfs (the default)")
            ),
            fix: format!(
                "[{table_path}]\n  snapshotter = \"{snapshotter}\"\n(or, for pods of one \
                 RuntimeClass, snapshotter = \"{snapshotter}\" in its runtime handler's table)"
            ),
        });
    }
    let annotations_off = cri
        .and_then(|c| c.get("disable_snapshot_annotations"))
        .and_then(Item::as_bool);
    if annotations_off != Some(false) {
        findings.push(Finding {
            problem: format!(
                "{name}: CRI's disable_snapshot_annotations is {}: CRI does not pass the image \
                 reference and layer digests (containerd.io/snapshot/cri.* labels) the Stoker \
                 snapshotter needs",
                match annotations_off {
                    Some(true) => "true",
                    _ => "not set (containerd's default is true)",
                }
            ),
            fix: format!("[{table_path}]\n  disable_snapshot_annotations = false"),
        });
    }
    findings
}

/// Both name the same unix socket (`unix://` prefixes and trailing slashes aside).
fn same_socket(address: &str, socket: &str) -> bool {
    let clean = |s: &str| {
        s.trim()
            .trim_start_matches("unix://")
            .trim_end_matches('/')
            .to_string()
    };
    clean(address) == clean(socket)
}

fn proxy_plugin_toml(name: &str, socket: &Path) -> String {
    format!(
        "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"",
        socket.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOCKET: &str = "/run/stoker/snapshotter.sock";

    fn expected() -> Expected<'static> {
        Expected {
            socket: Path::new(SOCKET),
            cri: true,
        }
    }

    fn problems(text: &str) -> Vec<String> {
        check_config_text(text, "config.toml", &expected())
            .into_iter()
            .map(|f| f.problem)
            .collect()
    }

    const GOOD_V2: &str = r#"
version = 2
[proxy_plugins]
  [proxy_plugins.stoker]
    type = "snapshot"
    address = "/run/stoker/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "stoker"
  disable_snapshot_annotations = false
"#;

    #[test]
    fn a_complete_version_2_config_passes() {
        assert_eq!(problems(GOOD_V2), Vec::<String>::new());
    }

    #[test]
    fn a_complete_version_3_config_passes() {
        let text = r#"
version = 3
[proxy_plugins.lazy]
  type = "snapshot"
  address = "unix:///run/stoker/snapshotter.sock"
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "lazy"
  disable_snapshot_annotations = false
"#;
        assert_eq!(problems(text), Vec::<String>::new());
    }

    #[test]
    fn containerds_default_config_misses_everything() {
        // What `containerd config default` writes, in the parts that matter.
        let text = r#"
version = 2
disabled_plugins = []
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"
"#;
        let findings = check_config_text(text, "config.toml", &expected());
        assert_eq!(findings.len(), 3, "{findings:#?}");
        assert!(findings[0].problem.contains("no proxy plugin points at"));
        assert!(findings[0].problem.contains(SOCKET));
        assert_eq!(
            findings[0].fix,
            "[proxy_plugins.stoker]\n  type = \"snapshot\"\n  address = \"/run/stoker/snapshotter.sock\""
        );
        assert!(
            findings[1]
                .problem
                .contains("\"overlayfs\" and no runtime handler uses \"stoker\"")
        );
        assert!(
            findings[1]
                .fix
                .contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd]")
        );
        assert!(
            findings[2]
                .problem
                .contains("not set (containerd's default is true)")
        );
        assert!(
            findings[2]
                .fix
                .contains("disable_snapshot_annotations = false")
        );
    }

    #[test]
    fn a_wrong_address_type_and_annotations_are_named() {
        let text = r#"
version = 2
[proxy_plugins.stoker]
  type = "snapshot"
  address = "/run/other.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "stoker"
  disable_snapshot_annotations = true
"#;
        let found = problems(text);
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].contains("address = \"/run/other.sock\""));
        assert!(found[1].contains("disable_snapshot_annotations is true"));

        let text = GOOD_V2.replace("type = \"snapshot\"", "type = \"content\"");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("type = \"content\""), "{found:?}");
    }

    #[test]
    fn cri_disabled_or_not_wanted() {
        let text = format!("disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n{GOOD_V2}");
        let found = problems(&text);
        assert_eq!(found.len(), 1, "{found:#?}");
        assert!(found[0].contains("CRI is off"));

        let proxy_only = r#"
[proxy_plugins.stoker]
  type = "snapshot"
  address = "/run/stoker/snapshotter.sock"
"#;
        let without_cri = Expected {
            socket: Path::new(SOCKET),
            cri: false,
        };
        assert!(check_config_text(proxy_only, "c", &without_cri).is_empty());
        // Version 1 (no `version`): CRI lives under plugins.cri.
        let found = problems(proxy_only);
        assert_eq!(found.len(), 2);
        assert!(
            check_config_text(proxy_only, "c", &expected())[0]
                .fix
                .contains("[plugins.cri.containerd]")
        );
    }

    #[test]
    fn bad_toml_and_missing_files_are_reported() {
        let found = problems("version = 2\n[proxy_plugins.stoker\n");
        assert_eq!(found.len(), 1);
        assert!(found[0].contains("not valid TOML"), "{found:?}");

        let findings = check_config(Path::new("/nonexistent/config.toml"), &expected());
        assert_eq!(findings.len(), 1);
        assert!(findings[0].problem.contains("/nonexistent/config.toml"));
        assert!(findings[0].problem.contains(CONTAINERD_CONFIG_ENV));
    }

    #[test]
    fn imports_are_followed_and_replace_plugin_tables() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            &main,
            r#"
version = 2
imports = ["conf.d/*.toml"]
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-stoker.toml"),
            r#"
version = 2
[proxy_plugins.stoker]
  type = "snapshot"
  address = "/run/stoker/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "stoker"
  disable_snapshot_annotations = false
"#,
        )
        .unwrap();
        assert_eq!(check_config(&main, &expected()), Vec::new());

        std::fs::write(dir.path().join("conf.d/20-broken.toml"), "= nope").unwrap();
        let findings = check_config(&main, &expected());
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert!(findings[0].problem.contains("20-broken.toml"));
    }

    #[test]
    fn a_runtime_handler_with_the_snapshotter_is_enough() {
        // kind-config/cluster.yaml's patch: CRI's default stays overlayfs, the
        // `stoker` RuntimeClass handler uses the Stoker snapshotter.
        let text = r#"
version = 2
[proxy_plugins.stoker]
  type = "snapshot"
  address = "/run/stoker/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri".containerd]
  disable_snapshot_annotations = false
[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.stoker]
  runtime_type = "io.containerd.runc.v2"
  snapshotter = "stoker"
"#;
        assert_eq!(problems(text), Vec::<String>::new());
        let v3 = r#"
version = 3
[proxy_plugins.stoker]
  type = "snapshot"
  address = "/run/stoker/snapshotter.sock"
[plugins.'io.containerd.cri.v1.images']
  disable_snapshot_annotations = false
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.stoker]
  snapshotter = "stoker"
"#;
        assert_eq!(problems(v3), Vec::<String>::new());
    }

    #[test]
    fn the_test_harness_config_passes() {
        // The shape stoker-testkit's TestContainerd writes (and the kind overlay patches in).
        let text = r#"version = 2
root = "/tmp/x/root"
[proxy_plugins]
  [proxy_plugins.stoker]
    type = "snapshot"
    address = "/run/stoker/snapshotter.sock"
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    stats_collect_period = 10
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "stoker"
      disable_snapshot_annotations = false
      default_runtime_name = "runc"
"#;
        assert_eq!(problems(text), Vec::<String>::new());
    }
}
