//! Image pull secrets against a scripted API server (kube `Client` over `tower-test`)
//! and in-process fake agents: the controller reads the pull secrets a workload's pods
//! get (the template's, else its ServiceAccount's), sends the matching registry
//! credentials to each agent before the plan, re-sends them when the Secret changes,
//! on the refresh period and when an agent reappears, and reports malformed and
//! missing secrets by name without their content.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use http::{Method, StatusCode};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::LocalObjectReference;
use kube::runtime::controller::Action;
use stoker_api::agent::RegistryCredential;
use stoker_controller::fake_agents::FakeAgents;
use stoker_controller::warmer::{PlanPush, Target, Warmer, WarmerConfig};
use stoker_controller::{learning, reconcile};
use stoker_crds::{ImagePrefetch, ImagePrefetchStatus, ImageStatus, Phase};
use stoker_format::{Digest, Plan};

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/ml/events";
const SECRETS: &str = "/api/v1/namespaces/ml/secrets";
const PASSWORD: &str = "regcred-pw-0a1b2c";
const NEW_PASSWORD: &str = "regcred-pw-rotated-3d4e5f";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A Secret as the API server returns it: `data` values base64-encoded.
fn secret_json(name: &str, type_: &str, key: &str, content: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "type": type_,
        "data": {key: b64(content.as_bytes())}
    })
}

/// A `kubernetes.io/dockerconfigjson` Secret with `user:password` for `registry`.
fn docker_config_secret(
    name: &str,
    registry: &str,
    user: &str,
    password: &str,
) -> serde_json::Value {
    let auth = b64(format!("{user}:{password}").as_bytes());
    secret_json(
        name,
        "kubernetes.io/dockerconfigjson",
        ".dockerconfigjson",
        &format!(
            r#"{{"auths": {{"{registry}": {{"auth": "{auth}"}},
                            "unrelated.example": {{"auth": "{}"}}}}}}"#,
            b64(b"someone:else")
        ),
    )
}

/// `deployment("web")` whose pods name `secrets` as pull secrets, or run as
/// `service_account` when it names none.
fn web(secrets: &[&str], service_account: Option<&str>) -> Deployment {
    let mut web = deployment("web", 2, true);
    let pod = web.spec.template.spec.as_mut().expect("pod spec");
    pod.image_pull_secrets = (!secrets.is_empty()).then(|| {
        secrets
            .iter()
            .map(|name| LocalObjectReference {
                name: name.to_string(),
            })
            .collect()
    });
    pod.service_account_name = service_account.map(str::to_string);
    web
}

/// An ImagePrefetch that has learned its plan: reconciles go straight to warming.
fn learned_prefetch(web: &Deployment) -> ImagePrefetch {
    let mut prefetch = prefetch_for(web);
    prefetch.spec.policy.learn_from_starts = 1;
    let plan = Plan {
        index_digest: Digest::of(b"index"),
        chunks: vec![1, 2, 3],
    };
    prefetch.status = Some(ImagePrefetchStatus {
        images: vec![ImageStatus {
            image: IMAGE.into(),
            index_digest: Some(Digest::of(b"index").to_string()),
            pods_learned: 1,
            plan: Some(
                learning::encode_for_status(&plan, 10_000)
                    .expect("plan")
                    .base64,
            ),
            ..Default::default()
        }],
        phase: Phase::Warming,
        ..Default::default()
    });
    prefetch
}

/// In `objects`: answer 403.
fn forbidden() -> serde_json::Value {
    serde_json::json!("forbidden")
}

/// What a reconcile asked the API server, in order, with the bodies it sent.
#[derive(Default)]
struct Served {
    requests: Vec<(Method, String)>,
    bodies: String,
}

/// Runs one reconcile of `prefetch`, answering every request: ServiceAccounts and
/// Secrets from `objects` by path (404 for others, 403 for [`forbidden`]), the status
/// patch with the object,
/// Events by echo.
async fn reconcile_serving(
    h: &mut Harness,
    prefetch: &ImagePrefetch,
    objects: &HashMap<String, serde_json::Value>,
) -> (Action, Served) {
    let mut task = tokio::spawn(reconcile::reconcile(
        Arc::new(prefetch.clone()),
        h.ctx.clone(),
    ));
    let mut served = Served::default();
    loop {
        let seen = tokio::select! {
            done = &mut task => {
                let action = done.expect("reconcile task").expect("reconcile");
                return (action, served);
            }
            seen = next(&mut h.api) => seen,
        };
        served
            .requests
            .push((seen.method.clone(), seen.path.clone()));
        served.bodies.push_str(&seen.body.to_string());
        if seen.method == Method::GET {
            match objects.get(&seen.path) {
                Some(object) if *object == forbidden() => seen.fail(403, "Forbidden"),
                Some(object) => seen.reply(StatusCode::OK, object.clone()),
                None => seen.fail(404, "NotFound"),
            }
        } else if seen.path.ends_with("/status") {
            seen.reply(
                StatusCode::OK,
                serde_json::to_value(prefetch).expect("prefetch"),
            );
        } else if seen.path.starts_with(EVENTS) {
            // A new Event, or a repeated one becoming a series.
            seen.echo(StatusCode::CREATED);
        } else {
            panic!("unexpected request {} {}", seen.method, seen.path);
        }
    }
}

fn secret_path(name: &str) -> String {
    format!("{SECRETS}/{name}")
}

#[tokio::test]
async fn the_templates_pull_secrets_reach_the_agents_before_the_plan_and_bad_ones_are_reported() {
    let mut h = Harness::new();
    let web = web(&["regcred", "legacy", "broken", "missing", "locked"], None);
    h.add_deployment(&web);
    let prefetch = learned_prefetch(&web);
    h.add_prefetch(&prefetch);
    for name in ["gpu-1", "gpu-2"] {
        h.warmer.node_applied(&node(name, "gpu", false));
    }
    let objects = HashMap::from([
        (secret_path("locked"), forbidden()),
        (
            secret_path("regcred"),
            docker_config_secret("regcred", "registry.example", "puller", PASSWORD),
        ),
        (
            secret_path("legacy"),
            secret_json(
                "legacy",
                "kubernetes.io/dockercfg",
                ".dockercfg",
                &format!(
                    r#"{{"https://registry.example/app": {{"username": "app-puller", "password": "{PASSWORD}-app"}}}}"#
                ),
            ),
        ),
        (
            secret_path("broken"),
            secret_json(
                "broken",
                "kubernetes.io/dockerconfigjson",
                ".dockerconfigjson",
                &format!(r#"{{"auths": {{"registry.example": {{"password": "{PASSWORD}-broken""#),
            ),
        ),
    ]);

    let (action, served) = reconcile_serving(&mut h, &prefetch, &objects).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(60)));
    // The template names its secrets: no ServiceAccount read; each Secret read once,
    // by name, in order; then the status and the Degraded events.
    let gets: Vec<&str> = served
        .requests
        .iter()
        .filter(|(m, _)| *m == Method::GET)
        .map(|(_, p)| p.as_str())
        .collect();
    assert_eq!(
        gets,
        ["regcred", "legacy", "broken", "missing", "locked"]
            .map(secret_path)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    // The bad secrets are named in the status and the Warning event; no secret
    // content is.
    for what in [
        "image pull secret ml/broken: .dockerconfigjson is not a docker config",
        "image pull secret ml/missing not found",
        "cannot read image pull secret ml/locked: forbidden",
    ] {
        assert!(served.bodies.contains(what), "{what} in {}", served.bodies);
    }
    assert!(
        served.bodies.contains("\"reason\":\"Degraded\"") && served.bodies.contains("Warning"),
        "{}",
        served.bodies
    );
    assert!(
        !served.bodies.contains(PASSWORD),
        "a password is in a status or an event"
    );

    // Each node's agent got the credentials for the image's registry, then the plan.
    eventually("pushes to both gpu nodes", || h.agents.push_count() == 2).await;
    let calls = h.agents.credential_calls();
    let mut nodes: Vec<&str> = calls.iter().map(|c| c.node.as_str()).collect();
    nodes.sort();
    assert_eq!(nodes, ["gpu-1", "gpu-2"]);
    let pushes = h.agents.pushes();
    let now = unix_now();
    for call in &calls {
        let push = pushes
            .iter()
            .find(|p| p.node == call.node)
            .expect("a push to the node");
        assert!(
            call.at <= push.at,
            "credentials before the plan on {}",
            call.node
        );
        let got: Vec<(&str, &str, &str, &str)> = call
            .credentials
            .iter()
            .map(|c| {
                (
                    c.registry.as_str(),
                    c.repository_prefix.as_str(),
                    c.username.as_str(),
                    c.password.as_str(),
                )
            })
            .collect();
        let app_password = format!("{PASSWORD}-app");
        assert_eq!(
            got,
            [
                ("registry.example", "", "puller", PASSWORD),
                (
                    "registry.example",
                    "app",
                    "app-puller",
                    app_password.as_str()
                ),
            ]
        );
        for credential in &call.credentials {
            let lifetime = credential.expires_at_unix - now;
            assert!(
                (25 * 60..=31 * 60).contains(&lifetime),
                "expires in {lifetime} s, the 30 minute lifetime"
            );
        }
    }
}

#[tokio::test]
async fn the_service_accounts_pull_secrets_are_used_and_a_changed_secret_is_sent_again() {
    let mut h = Harness::new();
    let web = web(&[], Some("puller"));
    h.add_deployment(&web);
    let prefetch = learned_prefetch(&web);
    h.add_prefetch(&prefetch);
    h.warmer.node_applied(&node("gpu-1", "gpu", false));
    let account = serde_json::json!({
        "apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "puller", "namespace": NAMESPACE},
        "imagePullSecrets": [{"name": "regcred"}]
    });
    let mut objects = HashMap::from([
        (
            "/api/v1/namespaces/ml/serviceaccounts/puller".to_string(),
            account,
        ),
        (
            secret_path("regcred"),
            docker_config_secret("regcred", "registry.example", "puller", PASSWORD),
        ),
    ]);

    let (_, served) = reconcile_serving(&mut h, &prefetch, &objects).await;
    assert_eq!(
        served.requests[..2],
        [
            (
                Method::GET,
                "/api/v1/namespaces/ml/serviceaccounts/puller".to_string()
            ),
            (Method::GET, secret_path("regcred")),
        ]
    );
    eventually("the push", || h.agents.push_count() == 1).await;
    let passwords = |agents: &FakeAgents| -> Vec<String> {
        agents
            .credential_calls()
            .iter()
            .map(|c| c.credentials[0].password.clone())
            .collect()
    };
    assert_eq!(passwords(&h.agents), [PASSWORD]);

    // The same secret at the next reconcile: nothing is sent (the refresh period has
    // not passed) and the plan is not pushed again.
    reconcile_serving(&mut h, &prefetch, &objects).await;
    assert_idle(&mut h.api).await;
    assert_eq!(passwords(&h.agents), [PASSWORD]);

    // The Secret changes (a rotated token): the node gets the new one at once.
    objects.insert(
        secret_path("regcred"),
        docker_config_secret("regcred", "registry.example", "puller", NEW_PASSWORD),
    );
    reconcile_serving(&mut h, &prefetch, &objects).await;
    eventually("the rotated password sent", || {
        passwords(&h.agents).len() == 2
    })
    .await;
    assert_eq!(passwords(&h.agents), [PASSWORD, NEW_PASSWORD]);
    assert_eq!(h.agents.push_count(), 1, "the plan was not pushed again");
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

fn credential(password: &str) -> RegistryCredential {
    RegistryCredential {
        registry: "registry.example".into(),
        username: "puller".into(),
        password: password.into(),
        ..RegistryCredential::default()
    }
}

fn target_with(password: &str) -> Target {
    Target {
        placements: vec![stoker_controller::candidates::PodScheduling::default()],
        plans: vec![PlanPush {
            image: IMAGE.into(),
            index_digest: Digest::of(b"index").to_string(),
            plan: vec![1, 2, 3].into(),
            background_rest: false,
            learning_complete: false,
        }],
        credentials: vec![credential(password)],
        ..Target::default()
    }
}

#[tokio::test]
async fn credentials_are_refreshed_on_the_period_and_when_an_agent_reappears() {
    // A refresh period of zero: every set_target is past it.
    let agents = Arc::new(FakeAgents::new());
    let warmer = Warmer::new(
        agents.clone(),
        WarmerConfig {
            credentials_refresh: Duration::ZERO,
            ..WarmerConfig::default()
        },
    );
    warmer.node_applied(&node("n1", "gpu", false));
    let key = kube::runtime::reflector::ObjectRef::new("app").within(NAMESPACE);
    warmer.set_target(&key, target_with("pw"));
    eventually("the push", || agents.push_count() == 1).await;
    assert_eq!(agents.credential_calls().len(), 1, "sent with the push");
    warmer.set_target(&key, target_with("pw"));
    eventually("the refresh", || agents.credential_calls().len() == 2).await;
    assert_eq!(agents.push_count(), 1);

    // The agent restarted (its pod became ready again): it gets them again.
    warmer.agent_appeared("n1");
    eventually("the re-send", || agents.credential_calls().len() == 3).await;

    let calls = agents.credential_calls();
    assert!(
        calls
            .iter()
            .all(|c| c.credentials.iter().all(|c| c.expires_at_unix > unix_now())),
        "every send carries an expiry in the future"
    );
    // Debug of what was sent never shows the password.
    assert!(!format!("{calls:?}").contains("\"pw\""));

    // With the default period, an unchanged target sends nothing new.
    let agents = Arc::new(FakeAgents::new());
    let warmer = Warmer::new(agents.clone(), WarmerConfig::default());
    warmer.node_applied(&node("n1", "gpu", false));
    warmer.set_target(&key, target_with("pw"));
    eventually("the push", || agents.push_count() == 1).await;
    warmer.set_target(&key, target_with("pw"));
    warmer.set_target(&key, target_with("new-pw"));
    eventually("the changed credentials", || {
        agents.credential_calls().len() == 2
    })
    .await;
    assert_eq!(
        agents.credential_calls()[1].credentials[0].password,
        "new-pw"
    );
}

#[tokio::test]
async fn candidates_get_the_credentials_before_any_plan_exists() {
    // The first pods of a private image must be mounted lazily to teach a plan: the
    // credentials go to every candidate node at once, and to nodes that join.
    let agents = Arc::new(FakeAgents::new());
    let warmer = Warmer::new(agents.clone(), WarmerConfig::default());
    warmer.node_applied(&node("gpu-1", "gpu", false));
    warmer.node_applied(&node("cpu-1", "cpu", false));
    let web = web(&[], None);
    let key = kube::runtime::reflector::ObjectRef::new("web").within(NAMESPACE);
    warmer.set_target(
        &key,
        Target {
            placements: vec![stoker_controller::candidates::PodScheduling::from_pod_spec(
                web.spec.template.spec.as_ref().expect("pod spec"),
            )],
            credentials: vec![credential("pw")],
            ..Target::default()
        },
    );
    eventually("credentials on gpu-1", || {
        agents.credential_calls().len() == 1
    })
    .await;
    warmer.node_applied(&node("gpu-2", "gpu", false));
    eventually("credentials on gpu-2", || {
        agents.credential_calls().len() == 2
    })
    .await;
    let mut nodes: Vec<String> = agents
        .credential_calls()
        .into_iter()
        .map(|c| c.node)
        .collect();
    nodes.sort();
    assert_eq!(nodes, ["gpu-1", "gpu-2"], "not the cpu node: no candidate");
    assert_eq!(agents.push_count(), 0, "no plan yet");

    // The placement widens to every node: only the new candidate gets them (the
    // others have them, and the refresh period has not passed).
    warmer.set_target(
        &key,
        Target {
            placements: vec![stoker_controller::candidates::PodScheduling::default()],
            credentials: vec![credential("pw")],
            ..Target::default()
        },
    );
    eventually("credentials on cpu-1", || {
        agents.credential_calls().iter().any(|c| c.node == "cpu-1")
    })
    .await;
    assert_eq!(agents.credential_calls().len(), 3);
}
