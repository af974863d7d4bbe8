//! images/certgen/stoker-certgen.sh in its in-cluster mode, writing Secrets
//! through the Kubernetes API. No API server runs here, so the test serves the
//! few Secret endpoints the script uses (GET, POST, PUT under
//! /api/v1/namespaces/stoker-system/secrets) over HTTPS on loopback, with
//! Kubernetes' semantics: 404 for a missing Secret, 409 for a create of an
//! existing one or an update with a stale resourceVersion, 401 without the
//! token. The script runs with real curl, jq and openssl.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use stoker_deploy_check::workspace_root;

const TOKEN: &str = "test-token";
const PREFIX: &str = "/api/v1/namespaces/stoker-system/secrets";

#[derive(Default)]
struct ApiState {
    secrets: BTreeMap<String, Value>,
    next_version: u64,
    requests: Vec<String>,
}

/// Answers one request; returns the status and the JSON body.
fn answer(state: &mut ApiState, method: &str, path: &str, auth: &str, body: &[u8]) -> (u16, Value) {
    state.requests.push(format!("{method} {path}"));
    if auth != format!("Bearer {TOKEN}") {
        return (401, json!({"kind": "Status", "reason": "Unauthorized"}));
    }
    let name = path
        .strip_prefix(PREFIX)
        .unwrap_or("?")
        .trim_start_matches('/');
    let store = |state: &mut ApiState, mut secret: Value| {
        state.next_version += 1;
        secret["metadata"]["resourceVersion"] = json!(state.next_version.to_string());
        state.secrets.insert(
            secret["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            secret.clone(),
        );
        secret
    };
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match (method, name, parsed) {
        ("GET", name, _) if !name.is_empty() => match state.secrets.get(name) {
            Some(secret) => (200, secret.clone()),
            None => (404, json!({"kind": "Status", "reason": "NotFound"})),
        },
        ("POST", "", Some(secret)) => {
            let name = secret["metadata"]["name"].as_str().unwrap_or_default();
            if state.secrets.contains_key(name)
                || secret["metadata"].get("resourceVersion").is_some()
            {
                (409, json!({"kind": "Status", "reason": "AlreadyExists"}))
            } else {
                (201, store(state, secret))
            }
        }
        ("PUT", name, Some(secret)) if !name.is_empty() => {
            let current = state
                .secrets
                .get(name)
                .map(|s| s["metadata"]["resourceVersion"].clone());
            if current.is_none() || current.as_ref() != secret["metadata"].get("resourceVersion") {
                (409, json!({"kind": "Status", "reason": "Conflict"}))
            } else {
                (200, store(state, secret))
            }
        }
        _ => (400, json!({"kind": "Status", "reason": "BadRequest"})),
    }
}

/// Serves HTTPS on loopback until the process ends; returns the port.
fn serve(state: Arc<Mutex<ApiState>>, cert: &Path, key: &Path) -> u16 {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(
        CertificateDer::pem_file_iter(cert)
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("cert"),
        PrivateKeyDer::from_pem_file(key).expect("key"),
    )
    .expect("server config");
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let Ok(connection) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(connection, stream);
            let mut reader = BufReader::new(&mut tls);
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap_or("").to_string(),
                parts.next().unwrap_or("").to_string(),
            );
            let (mut length, mut auth) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some((name, value)) = line.split_once(':') {
                    match name.to_ascii_lowercase().as_str() {
                        "content-length" => length = value.trim().parse().unwrap_or(0),
                        "authorization" => auth = value.trim().to_string(),
                        _ => {}
                    }
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let (status, response) = match state.lock() {
                Ok(mut state) => answer(&mut state, &method, &path, &auth, &body),
                Err(_) => (500, json!({})),
            };
            let text = response.to_string();
            let _ = write!(
                tls,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    port
}

fn tools_present() -> bool {
    for tool in ["openssl", "curl", "jq"] {
        if !Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
            && !Command::new(tool)
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        {
            eprintln!(
                "SKIPPED: {tool} not found; the in-cluster certgen path needs openssl, curl and jq"
            );
            return false;
        }
    }
    true
}

struct Api {
    state: Arc<Mutex<ApiState>>,
    port: u16,
    sa_dir: tempfile::TempDir,
}

fn start_api() -> Api {
    let sa_dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (
        sa_dir.path().join("ca.crt"),
        sa_dir.path().join("server.key"),
    );
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    std::fs::write(sa_dir.path().join("token"), TOKEN).expect("token");
    let state = Arc::new(Mutex::new(ApiState::default()));
    let port = serve(state.clone(), &cert, &key);
    Api {
        state,
        port,
        sa_dir,
    }
}

fn run(api: &Api, env: &[(&str, &str)]) -> Output {
    Command::new("sh")
        .arg(workspace_root().join("images/certgen/stoker-certgen.sh"))
        .env("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        .env("KUBERNETES_SERVICE_PORT", api.port.to_string())
        .env("STOKER_SA_DIR", api.sa_dir.path())
        .env("TMPDIR", api.sa_dir.path())
        .envs(env.iter().copied())
        .output()
        .expect("run sh")
}

fn take_requests(api: &Api) -> Vec<String> {
    std::mem::take(&mut api.state.lock().expect("state").requests)
}

fn secret(api: &Api, name: &str) -> Value {
    api.state
        .lock()
        .expect("state")
        .secrets
        .get(name)
        .cloned()
        .unwrap_or_else(|| panic!("no Secret {name}"))
}

fn data(secret: &Value, key: &str) -> Vec<u8> {
    let encoded = secret["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no key {key}"));
    base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64")
}

#[test]
fn certgen_writes_renews_and_keeps_secrets_through_the_api() {
    if !tools_present() {
        return;
    }
    let api = start_api();

    let first = run(&api, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let s = |n: &str| format!("{PREFIX}/{n}");
    let post = format!("POST {PREFIX}");
    assert_eq!(
        take_requests(&api),
        vec![
            format!("GET {}", s("stoker-ca")),
            post.clone(),
            format!("GET {}", s("stoker-agent-tls")),
            post.clone(),
            format!("GET {}", s("stoker-controller-tls")),
            post,
        ]
    );
    let ca = secret(&api, "stoker-ca");
    assert_eq!(ca["type"], "Opaque");
    assert!(ca["data"]["ca.key"].is_string());
    for name in ["stoker-agent-tls", "stoker-controller-tls"] {
        let leaf = secret(&api, name);
        assert_eq!(leaf["type"], "kubernetes.io/tls", "{name}");
        assert_eq!(leaf["metadata"]["namespace"], "stoker-system");
        assert_eq!(
            leaf["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "stoker-certgen"
        );
        assert_eq!(
            data(&leaf, "ca.crt"),
            data(&ca, "ca.crt"),
            "{name} carries the CA"
        );
        assert!(String::from_utf8_lossy(&data(&leaf, "tls.crt")).contains("BEGIN CERTIFICATE"));
        assert!(String::from_utf8_lossy(&data(&leaf, "tls.key")).contains("PRIVATE KEY"));
    }

    // Current certificates: only reads.
    let agent_before = data(&secret(&api, "stoker-agent-tls"), "tls.crt");
    let again = run(&api, &[]);
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(
        take_requests(&api).iter().all(|r| r.starts_with("GET ")),
        "a current install was rewritten"
    );

    // Due for renewal: both leaves replaced with PUT (with their resourceVersion), the CA kept.
    let renew = run(&api, &[("STOKER_CERT_RENEW_DAYS", "100")]);
    assert!(
        renew.status.success(),
        "{}",
        String::from_utf8_lossy(&renew.stderr)
    );
    let requests = take_requests(&api);
    assert!(
        requests.contains(&format!("PUT {}", s("stoker-agent-tls"))),
        "{requests:?}"
    );
    assert!(
        requests.contains(&format!("PUT {}", s("stoker-controller-tls"))),
        "{requests:?}"
    );
    assert!(
        !requests.contains(&format!("PUT {}", s("stoker-ca"))),
        "{requests:?}"
    );
    assert_ne!(
        data(&secret(&api, "stoker-agent-tls"), "tls.crt"),
        agent_before
    );
    assert_eq!(
        data(&secret(&api, "stoker-ca"), "ca.crt"),
        data(&ca, "ca.crt")
    );

    // A wrong token: the script stops and says why.
    std::fs::write(api.sa_dir.path().join("token"), "wrong").expect("token");
    let refused = run(&api, &[]);
    assert!(!refused.status.success());
    let log = String::from_utf8_lossy(&refused.stderr);
    assert!(log.contains("HTTP 401"), "{log}");
}
