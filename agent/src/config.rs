//! The agent's configuration: one YAML file, every setting optional with a documented
//! default (agent/README.md lists them all), and `STOKER_*` environment overrides.
//!
//! Precedence: defaults < YAML file (`--config PATH`) < environment variables.
//! Unknown keys in the file are an error, so a typo does not silently keep a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::AgentError;

/// Everything the agent can be configured with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Unix socket serving containerd's snapshots API; containerd's
    /// `[proxy_plugins.stoker] address` must name it.
    pub snapshotter_socket: PathBuf,
    /// Unix socket serving the agent API (`stoker.agent.v1`) locally.
    pub api_socket: PathBuf,
    /// Where the agent keeps its state: snapshot metadata and directories under
    /// `snapshotter/`, lazy mounts, traces.
    pub state_dir: PathBuf,
    pub cache: CacheConfig,
    pub registry: RegistryConfig,
    pub timeouts: TimeoutConfig,
    pub prefetch: PrefetchConfig,
    pub reads: ReadConfig,
    /// Address of the Prometheus endpoint (`/metrics`, `/healthz`), e.g.
    /// `0.0.0.0:9102`; no endpoint when not set.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub trace: TraceConfig,
    pub api: ApiConfig,
    /// The Node this agent runs on (the DaemonSet sets `STOKER_NODE_NAME` from
    /// `spec.nodeName`). With it and a Kubernetes API client, the agent runs the
    /// warm gate on that Node; without it, the gate is off.
    pub node_name: Option<String>,
    /// How long a node carrying the startup taint waits for the controller's
    /// warm target before the agent lifts the taint anyway, in seconds. The
    /// target carries its own timeout once written.
    pub warm_gate_timeout_secs: u64,
}

/// Startup trace recording (traces are kept under `<state_dir>/traces`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// Entries per trace; a trace that reaches it stops and is marked truncated
    /// (32 bytes of memory per entry while recording).
    pub max_entries: u64,
    /// Startup window: recording stops this long after the mount, or earlier when
    /// the container is reported ready.
    pub window_secs: u64,
    /// Finished traces kept on disk until collected; the oldest go first.
    pub max_kept: u64,
}

/// The agent API on TCP, with mutual TLS, for the controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// `HOST:PORT` to listen on, e.g. `0.0.0.0:9500`; no TCP listener when not set
    /// (the unix socket `api_socket` is always served).
    pub listen: Option<std::net::SocketAddr>,
    /// Server certificate (PEM), re-read on each new connection.
    pub tls_cert: PathBuf,
    /// Its private key (PEM).
    pub tls_key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub tls_client_ca: PathBuf,
}

/// The on-disk chunk cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Directory of the chunk cache; `<state_dir>/cache` when not set.
    pub dir: Option<PathBuf>,
    /// Upper bound of the cache's size on disk, in bytes.
    pub max_bytes: u64,
}

/// How registries are reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Mirrors per registry host, tried in order before the registry itself, e.g.
    /// `docker.io: ["https://mirror.example"]`.
    pub mirrors: BTreeMap<String, Vec<String>>,
    /// Registry hosts (`HOST[:PORT]`) reached over plain HTTP. Loopback hosts
    /// (`localhost`, `127.0.0.0/8`, `[::1]`) fall back to plain HTTP when HTTPS fails
    /// without being listed, as containerd does.
    pub insecure: Vec<String>,
    /// Docker config file with registry credentials (`auths`).
    pub docker_config: Option<PathBuf>,
}

/// Network timeouts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutConfig {
    /// TCP + TLS connection setup to a registry, in seconds.
    pub connect_secs: u64,
    /// One registry request (a manifest, or one ranged chunk read), in seconds.
    pub request_secs: u64,
    /// Looking up whether an image has a Stoker artifact, in seconds. On timeout the
    /// image is unpacked normally.
    pub resolve_secs: u64,
    /// How long "this image has no Stoker artifact" is remembered, in seconds.
    pub negative_cache_secs: u64,
}

/// How the lazy filesystem reads ahead of containers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadConfig {
    /// Bytes fetched ahead of a container reading through a file.
    pub readahead_bytes: u64,
    /// On a read that misses the cache, the compressed bytes of the chunks that
    /// follow it in the blob that are fetched in the same request (0: off).
    pub miss_readahead_bytes: u64,
    /// Per image, the bytes of per-file backing files assembled from cached
    /// chunks so that files of several chunks can pass through to the kernel
    /// (under `<cache dir>/assembled/`, outside `cache.max_bytes`; 0: only
    /// single-chunk files pass through).
    pub assembly_max_bytes: u64,
}

impl Default for ReadConfig {
    fn default() -> Self {
        let mount = stoker_lazyfs::MountOptions::default();
        ReadConfig {
            readahead_bytes: mount.readahead_bytes,
            miss_readahead_bytes: mount.miss_readahead_bytes,
            assembly_max_bytes: 4 << 30,
        }
    }
}

/// The prefetch executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefetchConfig {
    /// Chunk fetches in flight per prefetch plan.
    pub concurrency: u32,
    /// After a plan, fetch the rest of the image in the background.
    pub background_rest: bool,
    /// For an image whose starts are no longer traced, the uncompressed bytes
    /// outside its plan that may be fetched to complete the files the plan
    /// reads, so that they pass through to the kernel (0: none).
    pub complete_files_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            snapshotter_socket: PathBuf::from("/run/stoker/snapshotter.sock"),
            api_socket: PathBuf::from("/run/stoker/agent.sock"),
            state_dir: PathBuf::from("/var/lib/stoker"),
            cache: CacheConfig::default(),
            registry: RegistryConfig::default(),
            timeouts: TimeoutConfig::default(),
            prefetch: PrefetchConfig::default(),
            reads: ReadConfig::default(),
            metrics_addr: None,
            trace: TraceConfig::default(),
            api: ApiConfig::default(),
            node_name: None,
            warm_gate_timeout_secs: 600,
        }
    }
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            max_entries: 1_000_000,
            window_secs: 60,
            max_kept: 100,
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: None,
            tls_cert: PathBuf::from("/etc/stoker/tls/tls.crt"),
            tls_key: PathBuf::from("/etc/stoker/tls/tls.key"),
            tls_client_ca: PathBuf::from("/etc/stoker/tls/ca.crt"),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            dir: None,
            max_bytes: 20 * 1024 * 1024 * 1024,
        }
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect_secs: 5,
            request_secs: 30,
            resolve_secs: 10,
            negative_cache_secs: 60,
        }
    }
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            concurrency: 10,
            background_rest: false,
            complete_files_max_bytes: 1 << 30,
        }
    }
}

/// Every environment variable the agent reads, with what it sets. All but the
/// first two override settings of the file.
pub const ENV_OVERRIDES: &[(&str, &str)] = &[
    ("STOKER_CONFIG", "the configuration file (--config)"),
    (
        "STOKER_LOG",
        "the log filter (tracing EnvFilter syntax, default info)",
    ),
    ("STOKER_SNAPSHOTTER_SOCKET", "snapshotter_socket"),
    ("STOKER_API_SOCKET", "api_socket"),
    ("STOKER_STATE_DIR", "state_dir"),
    ("STOKER_CACHE_DIR", "cache.dir"),
    ("STOKER_CACHE_MAX_BYTES", "cache.max_bytes"),
    (
        "STOKER_INSECURE_REGISTRIES",
        "registry.insecure (comma-separated)",
    ),
    ("STOKER_DOCKER_CONFIG", "registry.docker_config"),
    ("STOKER_CONNECT_TIMEOUT_SECS", "timeouts.connect_secs"),
    ("STOKER_REQUEST_TIMEOUT_SECS", "timeouts.request_secs"),
    ("STOKER_RESOLVE_TIMEOUT_SECS", "timeouts.resolve_secs"),
    ("STOKER_NEGATIVE_CACHE_SECS", "timeouts.negative_cache_secs"),
    ("STOKER_PREFETCH_CONCURRENCY", "prefetch.concurrency"),
    ("STOKER_READAHEAD_BYTES", "reads.readahead_bytes"),
    ("STOKER_MISS_READAHEAD_BYTES", "reads.miss_readahead_bytes"),
    ("STOKER_ASSEMBLY_MAX_BYTES", "reads.assembly_max_bytes"),
    (
        "STOKER_COMPLETE_FILES_MAX_BYTES",
        "prefetch.complete_files_max_bytes",
    ),
    ("STOKER_METRICS_LISTEN", "metrics_addr (HOST:PORT)"),
    (
        "STOKER_METRICS_ADDR",
        "metrics_addr (HOST:PORT; older name of STOKER_METRICS_LISTEN)",
    ),
    (
        "STOKER_PREFETCH_BACKGROUND_REST",
        "prefetch.background_rest (true/false)",
    ),
    ("STOKER_TRACE_MAX_ENTRIES", "trace.max_entries"),
    ("STOKER_TRACE_WINDOW_SECS", "trace.window_secs"),
    ("STOKER_TRACE_MAX_KEPT", "trace.max_kept"),
    ("STOKER_GRPC_LISTEN", "api.listen (HOST:PORT)"),
    ("STOKER_GRPC_TLS_CERT", "api.tls_cert"),
    ("STOKER_GRPC_TLS_KEY", "api.tls_key"),
    ("STOKER_GRPC_TLS_CLIENT_CA", "api.tls_client_ca"),
    ("STOKER_NODE_NAME", "node_name"),
    ("STOKER_WARM_GATE_TIMEOUT_SECS", "warm_gate_timeout_secs"),
];

impl Config {
    /// Defaults, then the YAML file at `path` if given, then the process environment.
    pub fn load(path: Option<&Path>) -> Result<Config, AgentError> {
        Config::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`load`](Self::load) with the environment given as a lookup function.
    pub fn load_with_env(
        path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, AgentError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| AgentError::Config(format!("reading {}: {e}", path.display())))?;
                Config::from_yaml(&text)
                    .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?
            }
            None => Config::default(),
        };
        config.apply_env(env)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a YAML document; missing settings keep their defaults.
    pub fn from_yaml(text: &str) -> Result<Config, AgentError> {
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        serde_yaml::from_str(text).map_err(|e| AgentError::Config(e.to_string()))
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), AgentError> {
        let path = |name: &str| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
        let number = |name: &str| -> Result<Option<u64>, AgentError> {
            env(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        AgentError::Config(format!("{name}={v:?} is not a non-negative integer"))
                    })
                })
                .transpose()
        };
        if let Some(p) = path("STOKER_SNAPSHOTTER_SOCKET") {
            self.snapshotter_socket = p;
        }
        if let Some(p) = path("STOKER_API_SOCKET") {
            self.api_socket = p;
        }
        if let Some(p) = path("STOKER_STATE_DIR") {
            self.state_dir = p;
        }
        if let Some(p) = path("STOKER_CACHE_DIR") {
            self.cache.dir = Some(p);
        }
        if let Some(n) = number("STOKER_CACHE_MAX_BYTES")? {
            self.cache.max_bytes = n;
        }
        if let Some(list) = env("STOKER_INSECURE_REGISTRIES") {
            self.registry.insecure = list
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(str::to_string)
                .collect();
        }
        if let Some(p) = path("STOKER_DOCKER_CONFIG") {
            self.registry.docker_config = Some(p);
        }
        if let Some(n) = number("STOKER_CONNECT_TIMEOUT_SECS")? {
            self.timeouts.connect_secs = n;
        }
        if let Some(n) = number("STOKER_REQUEST_TIMEOUT_SECS")? {
            self.timeouts.request_secs = n;
        }
        if let Some(n) = number("STOKER_RESOLVE_TIMEOUT_SECS")? {
            self.timeouts.resolve_secs = n;
        }
        if let Some(n) = number("STOKER_NEGATIVE_CACHE_SECS")? {
            self.timeouts.negative_cache_secs = n;
        }
        if let Some(n) = number("STOKER_PREFETCH_CONCURRENCY")? {
            self.prefetch.concurrency = u32::try_from(n).map_err(|_| {
                AgentError::Config(format!("STOKER_PREFETCH_CONCURRENCY={n} is too large"))
            })?;
        }
        if let Some(n) = number("STOKER_READAHEAD_BYTES")? {
            self.reads.readahead_bytes = n;
        }
        if let Some(n) = number("STOKER_MISS_READAHEAD_BYTES")? {
            self.reads.miss_readahead_bytes = n;
        }
        if let Some(n) = number("STOKER_ASSEMBLY_MAX_BYTES")? {
            self.reads.assembly_max_bytes = n;
        }
        if let Some(n) = number("STOKER_COMPLETE_FILES_MAX_BYTES")? {
            self.prefetch.complete_files_max_bytes = n;
        }
        let metrics = |name: &str| -> Result<Option<std::net::SocketAddr>, AgentError> {
            env(name)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.trim()
                        .parse()
                        .map_err(|_| AgentError::Config(format!("{name}={v:?} is not HOST:PORT")))
                })
                .transpose()
        };
        match (
            metrics("STOKER_METRICS_LISTEN")?,
            metrics("STOKER_METRICS_ADDR")?,
        ) {
            (Some(listen), Some(addr)) if listen != addr => {
                return Err(AgentError::Config(format!(
                    "STOKER_METRICS_LISTEN={listen} and STOKER_METRICS_ADDR={addr} disagree; set one"
                )));
            }
            (Some(addr), _) | (None, Some(addr)) => self.metrics_addr = Some(addr),
            (None, None) => {}
        }
        if let Some(v) = env("STOKER_PREFETCH_BACKGROUND_REST").filter(|v| !v.is_empty()) {
            self.prefetch.background_rest = match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(AgentError::Config(format!(
                        "STOKER_PREFETCH_BACKGROUND_REST={other:?} is not true or false"
                    )));
                }
            };
        }
        if let Some(n) = number("STOKER_TRACE_MAX_ENTRIES")? {
            self.trace.max_entries = n;
        }
        if let Some(n) = number("STOKER_TRACE_WINDOW_SECS")? {
            self.trace.window_secs = n;
        }
        if let Some(n) = number("STOKER_TRACE_MAX_KEPT")? {
            self.trace.max_kept = n;
        }
        if let Some(v) = env("STOKER_GRPC_LISTEN").filter(|v| !v.is_empty()) {
            self.api.listen = Some(v.trim().parse().map_err(|_| {
                AgentError::Config(format!("STOKER_GRPC_LISTEN={v:?} is not HOST:PORT"))
            })?);
        }
        if let Some(p) = path("STOKER_GRPC_TLS_CERT") {
            self.api.tls_cert = p;
        }
        if let Some(p) = path("STOKER_GRPC_TLS_KEY") {
            self.api.tls_key = p;
        }
        if let Some(p) = path("STOKER_GRPC_TLS_CLIENT_CA") {
            self.api.tls_client_ca = p;
        }
        if let Some(name) = env("STOKER_NODE_NAME").filter(|v| !v.trim().is_empty()) {
            self.node_name = Some(name.trim().to_string());
        }
        if let Some(n) = number("STOKER_WARM_GATE_TIMEOUT_SECS")? {
            self.warm_gate_timeout_secs = n;
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), AgentError> {
        for (name, path) in [
            ("snapshotter_socket", &self.snapshotter_socket),
            ("api_socket", &self.api_socket),
            ("state_dir", &self.state_dir),
        ] {
            if !path.is_absolute() {
                return Err(AgentError::Config(format!(
                    "{name} must be an absolute path, got {}",
                    path.display()
                )));
            }
        }
        if self.cache.max_bytes == 0 {
            return Err(AgentError::Config("cache.max_bytes must be above 0".into()));
        }
        if self.prefetch.concurrency == 0 {
            return Err(AgentError::Config(
                "prefetch.concurrency must be at least 1".into(),
            ));
        }
        for (name, value) in [
            ("trace.max_entries", self.trace.max_entries),
            ("trace.window_secs", self.trace.window_secs),
            ("trace.max_kept", self.trace.max_kept),
        ] {
            if value == 0 {
                return Err(AgentError::Config(format!("{name} must be above 0")));
            }
        }
        for (name, secs) in [
            ("timeouts.connect_secs", self.timeouts.connect_secs),
            ("timeouts.request_secs", self.timeouts.request_secs),
            ("timeouts.resolve_secs", self.timeouts.resolve_secs),
        ] {
            if secs == 0 {
                return Err(AgentError::Config(format!("{name} must be above 0")));
            }
        }
        Ok(())
    }

    /// Where the snapshotter keeps its metadata, snapshot directories and lazy mounts.
    pub fn snapshotter_root(&self) -> PathBuf {
        self.state_dir.join("snapshotter")
    }

    /// Where startup traces are kept until collected.
    pub fn trace_dir(&self) -> PathBuf {
        self.state_dir.join("traces")
    }

    /// Where lazy mounts keep the state a restarted agent needs and a reboot
    /// must not keep (their open-state files): `open-state/` next to the
    /// snapshotter socket, so on the tmpfs `/run/stoker` by default.
    pub fn open_state_dir(&self) -> PathBuf {
        self.snapshotter_socket
            .parent()
            .unwrap_or(Path::new("/run/stoker"))
            .join("open-state")
    }

    /// Trace recording limits.
    pub fn trace_options(&self) -> crate::trace::TraceOptions {
        crate::trace::TraceOptions {
            max_entries: usize::try_from(self.trace.max_entries).unwrap_or(usize::MAX),
            window: Duration::from_secs(self.trace.window_secs),
            max_kept: usize::try_from(self.trace.max_kept).unwrap_or(usize::MAX),
            ..crate::trace::TraceOptions::default()
        }
    }

    /// The TLS files of the API's TCP listener.
    pub fn api_tls_files(&self) -> crate::tls::TlsFiles {
        crate::tls::TlsFiles {
            cert: self.api.tls_cert.clone(),
            key: self.api.tls_key.clone(),
            client_ca: self.api.tls_client_ca.clone(),
        }
    }

    /// Settings of the warm gate on this node.
    pub fn gate_options(&self) -> crate::node_gate::GateOptions {
        crate::node_gate::GateOptions {
            default_timeout: Duration::from_secs(self.warm_gate_timeout_secs),
            ..crate::node_gate::GateOptions::default()
        }
    }

    /// Per-file backing files for passthrough, per image (see [`crate::assembly`]);
    /// `None` when `reads.assembly_max_bytes` is 0.
    pub fn assembly(&self) -> Option<crate::assembly::Assembly> {
        crate::assembly::Assembly::new(
            self.cache_dir().join("assembled"),
            self.reads.assembly_max_bytes,
        )
    }

    /// The chunk cache directory.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cache"))
    }

    /// How long "no Stoker artifact" answers are cached.
    pub fn negative_cache_ttl(&self) -> Duration {
        Duration::from_secs(self.timeouts.negative_cache_secs)
    }

    /// True when `host` (`HOST[:PORT]`) is listed as insecure or is a loopback address.
    pub fn allows_plain_http(&self, host: &str) -> bool {
        if self.registry.insecure.iter().any(|h| h == host) {
            return true;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        };
        let name = name.trim_start_matches('[').trim_end_matches(']');
        name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_file() {
        let config = Config::load_with_env(None, |_| None).expect("defaults");
        assert_eq!(
            config.snapshotter_socket,
            PathBuf::from("/run/stoker/snapshotter.sock")
        );
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/stoker"));
        assert_eq!(config.cache_dir(), PathBuf::from("/var/lib/stoker/cache"));
        assert_eq!(config.prefetch.concurrency, 10);
    }

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(
            &path,
            "state_dir: /srv/stoker\ncache:\n  max_bytes: 1000\nregistry:\n  insecure: [\"reg:5000\"]\n  mirrors:\n    docker.io: [\"https://m.example\"]\nprefetch:\n  concurrency: 4\nreads:\n  readahead_bytes: 65536\n",
        )
        .expect("write");
        let config = Config::load_with_env(Some(&path), |name| match name {
            "STOKER_PREFETCH_CONCURRENCY" => Some("7".into()),
            "STOKER_MISS_READAHEAD_BYTES" => Some("0".into()),
            "STOKER_SNAPSHOTTER_SOCKET" => Some("/tmp/s.sock".into()),
            _ => None,
        })
        .expect("loads");
        assert_eq!(config.state_dir, PathBuf::from("/srv/stoker"));
        assert_eq!(config.cache.max_bytes, 1000);
        assert_eq!(config.prefetch.concurrency, 7);
        assert_eq!(config.reads.readahead_bytes, 65536);
        assert_eq!(config.reads.miss_readahead_bytes, 0);
        assert_eq!(config.snapshotter_socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(
            config.registry.mirrors["docker.io"],
            vec!["https://m.example"]
        );
        assert!(config.allows_plain_http("reg:5000"));
        assert!(config.allows_plain_http("127.0.0.1:5000"));
        assert!(config.allows_plain_http("[::1]:5000"));
        assert!(config.allows_plain_http("localhost"));
        assert!(!config.allows_plain_http("registry.example:5000"));
    }

    #[test]
    fn trace_and_api_settings() {
        let defaults = Config::default();
        assert_eq!(
            defaults.api.listen, None,
            "no TCP listener without certificates"
        );
        assert_eq!(defaults.trace_options().window, Duration::from_secs(60));
        assert_eq!(
            defaults.trace_dir(),
            PathBuf::from("/var/lib/stoker/traces")
        );
        let config = Config::load_with_env(None, |name| match name {
            "STOKER_GRPC_LISTEN" => Some("0.0.0.0:9500".into()),
            "STOKER_GRPC_TLS_CLIENT_CA" => Some("/tls/ca.pem".into()),
            "STOKER_TRACE_WINDOW_SECS" => Some("30".into()),
            _ => None,
        })
        .expect("loads");
        assert_eq!(config.api.listen, Some("0.0.0.0:9500".parse().unwrap()));
        assert_eq!(
            config.api_tls_files().client_ca,
            PathBuf::from("/tls/ca.pem")
        );
        assert_eq!(config.trace.window_secs, 30);
        let bad = Config::load_with_env(None, |name| {
            (name == "STOKER_GRPC_LISTEN").then(|| "everywhere".to_string())
        })
        .expect_err("bad address");
        assert!(bad.to_string().contains("STOKER_GRPC_LISTEN"), "{bad}");
        assert!(
            Config::from_yaml("trace:\n  window_secs: 0\n")
                .and_then(|c| c.validate())
                .is_err()
        );
    }

    /// The DaemonSet's container environment: every `name:` under `env:`.
    fn daemonset_env_names(yaml: &str) -> Vec<String> {
        let manifest: serde_yaml::Value = serde_yaml::from_str(yaml).expect("DaemonSet YAML");
        let containers = manifest["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .expect("containers");
        let agent = containers
            .iter()
            .find(|c| c["name"].as_str() == Some("agent"))
            .expect("the agent container");
        agent["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .map(|v| v["name"].as_str().expect("env name").to_string())
            .collect()
    }

    #[test]
    fn every_daemonset_variable_is_read_by_the_agent() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/agent/daemonset.yaml");
        let yaml = std::fs::read_to_string(&path).expect("manifests/base/agent/daemonset.yaml");
        let names = daemonset_env_names(&yaml);
        assert!(names.iter().any(|n| n == "STOKER_NODE_NAME"), "{names:?}");
        let known: Vec<&str> = ENV_OVERRIDES.iter().map(|(name, _)| *name).collect();
        for name in &names {
            assert!(
                known.contains(&name.as_str()),
                "the DaemonSet sets {name}, which the agent does not read (ENV_OVERRIDES)"
            );
        }
        // And the values the DaemonSet gives are accepted and land where meant.
        let manifest: serde_yaml::Value = serde_yaml::from_str(&yaml).expect("yaml");
        let env: BTreeMap<String, String> =
            manifest["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_sequence()
                .expect("env")
                .iter()
                .filter_map(|v| Some((v["name"].as_str()?.into(), v["value"].as_str()?.into())))
                .collect();
        let config = Config::load_with_env(None, |name| {
            env.get(name).cloned().or_else(|| {
                // spec.nodeName, filled in by the kubelet.
                (name == "STOKER_NODE_NAME").then(|| "gpu-node-1".to_string())
            })
        })
        .expect("the DaemonSet's environment loads");
        assert_eq!(config.node_name.as_deref(), Some("gpu-node-1"));
        assert_eq!(config.metrics_addr, Some("0.0.0.0:9501".parse().unwrap()));
        assert_eq!(config.api.listen, Some("0.0.0.0:7443".parse().unwrap()));
    }

    #[test]
    fn every_listed_variable_is_applied() {
        // Each variable in ENV_OVERRIDES (but the two the binary reads) changes
        // the effective configuration.
        let value = |name: &str| -> String {
            match name {
                "STOKER_INSECURE_REGISTRIES" => "reg.example:5000".into(),
                "STOKER_PREFETCH_BACKGROUND_REST" => "true".into(),
                "STOKER_NODE_NAME" => "n1".into(),
                n if n.contains("LISTEN") || n.contains("METRICS") => "127.0.0.1:1".into(),
                n if n.ends_with("_SECS")
                    || n.ends_with("BYTES")
                    || n.ends_with("CONCURRENCY")
                    || n.ends_with("ENTRIES")
                    || n.ends_with("KEPT") =>
                {
                    "3".into()
                }
                _ => "/elsewhere/x".into(),
            }
        };
        let defaults = Config::default();
        for (name, _) in &ENV_OVERRIDES[2..] {
            let config = Config::load_with_env(None, |n| (n == *name).then(|| value(n)))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_ne!(config, defaults, "{name} changes nothing");
        }
        let both = Config::load_with_env(None, |n| match n {
            "STOKER_METRICS_LISTEN" => Some("0.0.0.0:1".into()),
            "STOKER_METRICS_ADDR" => Some("0.0.0.0:2".into()),
            _ => None,
        })
        .expect_err("two addresses");
        assert!(both.to_string().contains("disagree"), "{both}");
        assert_eq!(
            defaults.gate_options().default_timeout,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn bad_input_is_named() {
        let typo = Config::from_yaml("state_dri: /x\n").expect_err("unknown key");
        assert!(typo.to_string().contains("state_dri"), "{typo}");
        let bad_env = Config::load_with_env(None, |name| {
            (name == "STOKER_CACHE_MAX_BYTES").then(|| "lots".to_string())
        })
        .expect_err("bad number");
        assert!(
            bad_env.to_string().contains("STOKER_CACHE_MAX_BYTES"),
            "{bad_env}"
        );
        let relative =
            Config::from_yaml("state_dir: relative\n").and_then(|c| c.validate().map(|_| c));
        assert!(relative.is_err());
    }
}
