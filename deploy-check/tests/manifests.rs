//! `manifests/`: every variant renders, every object matches its schema, and the
//! objects fit together (names, ports, selectors, volumes, the agent's config).

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use serde_json::Value;
use stoker_deploy_check::{object_id, schema, workspace_root};

#[test]
fn every_variant_renders_and_matches_its_schema() {
    for variant in renderable_variants() {
        let objects = render(variant);
        assert!(!objects.is_empty(), "manifests/{variant} renders nothing");
        let errors: Vec<String> = objects
            .iter()
            .filter_map(|object| schema::validate(object).err())
            .map(|e| e.to_string())
            .collect();
        assert!(
            errors.is_empty(),
            "manifests/{variant}:\n{}",
            errors.join("\n")
        );
    }
}

#[test]
fn rendering_matches_kubectl_kustomize() {
    for variant in renderable_variants() {
        let dir = manifests_dir().join(variant);
        let Some(theirs) = kubectl_kustomize(&dir) else {
            eprintln!(
                "SKIPPED: kubectl with kustomize v4+ not found; manifests/{variant} is checked \
                 with deploy-check's renderer only"
            );
            return;
        };
        let theirs =
            theirs.unwrap_or_else(|e| panic!("kubectl kustomize manifests/{variant}: {e}"));
        let key = |o: &Value| {
            format!(
                "{} {}",
                o.get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
                object_id(o)
            )
        };
        let ours: BTreeMap<String, Value> =
            render(variant).into_iter().map(|o| (key(&o), o)).collect();
        let theirs: BTreeMap<String, Value> = theirs.into_iter().map(|o| (key(&o), o)).collect();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "manifests/{variant}: different objects"
        );
        for (id, object) in &ours {
            if let Some(difference) = first_difference("", object, &theirs[id]) {
                panic!(
                    "manifests/{variant}: {id} differs from kubectl's rendering at {difference}"
                );
            }
        }
    }
}

/// The first place two objects differ; numbers compare by value (`20.0` = `20`).
fn first_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(p), Some(q)) => first_difference(&format!("{path}.{k}"), p, q),
                _ => Some(format!("{path}.{k} (present on one side only)")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (p, q))| first_difference(&format!("{path}[{i}]"), p, q)),
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => None,
        (x, y) if x == y => None,
        (x, y) => Some(format!("{path}: {x} vs {y}")),
    }
}

#[test]
fn namespaced_objects_are_in_the_stoker_namespace() {
    for variant in renderable_variants() {
        for object in render(variant) {
            let namespace = str_at(&object, "/metadata/namespace");
            if stoker_deploy_check::kustomize::is_cluster_scoped(kind(&object)) {
                assert!(
                    namespace.is_empty(),
                    "{}: cluster-scoped with a namespace",
                    object_id(&object)
                );
            } else {
                assert_eq!(
                    namespace,
                    NAMESPACE,
                    "{} in manifests/{variant}",
                    object_id(&object)
                );
            }
        }
    }
}

/// Service accounts, ConfigMaps, Secrets, ports and selectors that one object
/// names exist in another.
#[test]
fn references_resolve() {
    for variant in ["base", "overlays/kind", "overlays/cert-manager"] {
        let objects = render(variant);
        let names_of = |kind_name: &str| -> BTreeSet<String> {
            objects
                .iter()
                .filter(|o| kind(o) == kind_name)
                .map(|o| name(o).to_string())
                .collect()
        };
        let service_accounts = names_of("ServiceAccount");
        let config_maps = names_of("ConfigMap");
        // Secrets are made at install time, by the certgen script or cert-manager.
        let secret_makers: BTreeSet<String> = if variant == "overlays/cert-manager" {
            objects
                .iter()
                .filter(|o| kind(o) == "Certificate")
                .map(|o| str_at(o, "/spec/secretName").to_string())
                .collect()
        } else {
            let script =
                std::fs::read_to_string(workspace_root().join("images/certgen/stoker-certgen.sh"))
                    .expect("certgen script");
            ["stoker-ca", "stoker-agent-tls", "stoker-controller-tls"]
                .into_iter()
                .filter(|secret| {
                    script.contains(&format!("ensure_leaf {secret}"))
                        || script.contains(&format!("load_secret {secret}"))
                })
                .map(str::to_string)
                .collect()
        };
        for object in &objects {
            let Some(template) = pod_template(object) else {
                continue;
            };
            let id = object_id(object);
            let account = str_at(template, "/spec/serviceAccountName");
            assert!(
                service_accounts.contains(account),
                "{id}: ServiceAccount `{account}` is not defined"
            );
            for volume in array(template, "/spec/volumes") {
                if let Some(config_map) = volume.pointer("/configMap/name").and_then(Value::as_str)
                {
                    assert!(
                        config_maps.contains(config_map),
                        "{id}: ConfigMap {config_map} is not defined"
                    );
                }
                if let Some(secret) = volume.pointer("/secret/secretName").and_then(Value::as_str) {
                    assert!(
                        secret_makers.contains(secret),
                        "{id}: nothing creates Secret {secret} in {variant}"
                    );
                }
            }
            let containers = array(template, "/spec/containers");
            let port_names: BTreeSet<&str> = containers
                .iter()
                .flat_map(|c| array(c, "/ports"))
                .filter_map(|p| p.get("name").and_then(Value::as_str))
                .collect();
            for container in containers {
                for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                    for kind_of_probe in ["httpGet", "tcpSocket", "grpc"] {
                        if let Some(port) = container
                            .pointer(&format!("/{probe}/{kind_of_probe}/port"))
                            .and_then(Value::as_str)
                        {
                            assert!(
                                port_names.contains(port),
                                "{id}: {probe} uses port `{port}`, which no container names"
                            );
                        }
                    }
                }
                let mounts: BTreeSet<&str> = array(container, "/volumeMounts")
                    .iter()
                    .map(|m| str_at(m, "/name"))
                    .collect();
                let volumes: BTreeSet<&str> = array(template, "/spec/volumes")
                    .iter()
                    .map(|v| str_at(v, "/name"))
                    .collect();
                assert!(
                    mounts.is_subset(&volumes),
                    "{id}: mounts {mounts:?} but volumes are {volumes:?}"
                );
                if mounts_bidirectional(container) {
                    assert_eq!(
                        container.pointer("/securityContext/privileged"),
                        Some(&Value::Bool(true)),
                        "{id}: Bidirectional mount propagation needs a privileged container"
                    );
                }
            }
        }
        for service in objects.iter().filter(|o| kind(o) == "Service") {
            let selector = service
                .pointer("/spec/selector")
                .and_then(Value::as_object)
                .expect("selector");
            let pods: Vec<&Value> = objects
                .iter()
                .filter_map(pod_template)
                .filter(|t| {
                    selector.iter().all(|(k, v)| {
                        t.pointer(&format!("/metadata/labels/{}", k.replace('/', "~1"))) == Some(v)
                    })
                })
                .collect();
            assert!(!pods.is_empty(), "{}: selects no pods", object_id(service));
            for port in array(service, "/spec/ports") {
                assert!(
                    port.get("name").is_some(),
                    "{}: unnamed port (ServiceMonitors select ports by name)",
                    object_id(service)
                );
                if let Some(target) = port.get("targetPort").and_then(Value::as_str) {
                    let found = pods.iter().any(|t| {
                        array(t, "/spec/containers")
                            .iter()
                            .flat_map(|c| array(c, "/ports"))
                            .any(|p| str_at(p, "/name") == target)
                    });
                    assert!(
                        found,
                        "{}: targetPort `{target}` is no port of the selected pods",
                        object_id(service)
                    );
                }
            }
        }
    }
}

fn mounts_bidirectional(container: &Value) -> bool {
    array(container, "/volumeMounts")
        .iter()
        .any(|m| str_at(m, "/mountPropagation") == "Bidirectional")
}

#[test]
fn agent_daemonset_runs_everywhere_it_must() {
    let objects = render("base");
    let agent = find(&objects, "DaemonSet", "stoker-agent");
    let spec = agent.pointer("/spec/template/spec").expect("pod spec");
    let tolerations = array(spec, "/tolerations");
    let tolerates = |key: Option<&str>| {
        tolerations.iter().any(|t| {
            str_at(t, "/effect") == "NoSchedule"
                && str_at(t, "/operator") == "Exists"
                && t.get("key").and_then(Value::as_str) == key
        })
    };
    assert!(
        tolerates(Some(
            "startup-taint.cluster-autoscaler.kubernetes.io/stoker-warming"
        )),
        "the agent must tolerate the startup taint it removes"
    );
    assert!(
        tolerates(None),
        "the agent must tolerate every NoSchedule taint (GPU pools)"
    );
    let container = &array(spec, "/containers")[0];
    assert_eq!(
        container.pointer("/securityContext/privileged"),
        Some(&Value::Bool(true))
    );
    for path in ["/var/lib/stoker", "/run/stoker"] {
        let mount = array(container, "/volumeMounts")
            .iter()
            .find(|m| str_at(m, "/mountPath") == path)
            .unwrap_or_else(|| panic!("{path} is not mounted"));
        assert_eq!(
            str_at(mount, "/mountPropagation"),
            "Bidirectional",
            "{path}"
        );
        let volume = array(spec, "/volumes")
            .iter()
            .find(|v| str_at(v, "/name") == str_at(mount, "/name"))
            .expect("volume");
        assert_eq!(
            str_at(volume, "/hostPath/path"),
            path,
            "{path} is a hostPath"
        );
    }
    let host_paths: BTreeSet<&str> = array(spec, "/volumes")
        .iter()
        .filter_map(|v| v.pointer("/hostPath/path").and_then(Value::as_str))
        .collect();
    for needed in ["/dev/fuse", "/run/containerd"] {
        assert!(host_paths.contains(needed), "hostPath {needed} missing");
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(container.get(probe).is_some(), "agent has no {probe}");
    }
    assert!(container.pointer("/resources/requests/memory").is_some());
    assert!(container.pointer("/resources/limits/memory").is_some());
}

#[test]
fn controller_is_highly_available() {
    let objects = render("base");
    let deployment = find(&objects, "Deployment", "stoker-controller");
    assert_eq!(deployment.pointer("/spec/replicas"), Some(&Value::from(2)));
    let pdb = find(&objects, "PodDisruptionBudget", "stoker-controller");
    assert_eq!(pdb.pointer("/spec/minAvailable"), Some(&Value::from(1)));
    let labels = deployment
        .pointer("/spec/template/metadata/labels")
        .expect("labels");
    for (key, value) in pdb
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .expect("selector")
    {
        assert_eq!(
            labels.get(key),
            Some(value),
            "the PDB must select the controller pods"
        );
    }
    let container = &array(deployment, "/spec/template/spec/containers")[0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert!(container.get(probe).is_some(), "controller has no {probe}");
    }
    // The Lease the controller is told to use is the one its Role names.
    let args: Vec<&str> = array(container, "/args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let lease = args
        .windows(2)
        .find(|w| w[0] == "--lease-name")
        .map(|w| w[1])
        .expect("--lease-name");
    assert_eq!(lease, stoker_deploy_check::api_calls::CONTROLLER_LEASE);
    let role = find(&objects, "Role", "stoker-controller-leader-election");
    assert!(
        array(role, "/rules")
            .iter()
            .any(|r| array(r, "/resourceNames").iter().any(|n| n == lease)),
        "the leader-election Role does not name Lease {lease}"
    );
}

/// The agent's ConfigMap is a valid agent configuration, in every variant: the
/// agent's own parser rejects unknown keys.
#[test]
fn agent_config_is_accepted_by_the_agent() {
    for variant in ["base", "overlays/kind", "overlays/cert-manager"] {
        let objects = render(variant);
        let config_map = find(&objects, "ConfigMap", "stoker-agent-config");
        let text = str_at(config_map, "/data/agent.yaml");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.yaml");
        std::fs::write(&path, text).expect("write");
        let config =
            stoker_agent::Config::load_with_env(Some(&path), |_| None).unwrap_or_else(|e| {
                panic!("manifests/{variant}: agent.yaml is refused by the agent: {e}")
            });
        assert_eq!(
            config.snapshotter_socket,
            std::path::PathBuf::from("/run/stoker/snapshotter.sock")
        );
        assert!(
            config.state_dir.starts_with("/var/lib/stoker"),
            "state must be on the hostPath"
        );

        // The DaemonSet points --config at the mounted key.
        let agent = find(&objects, "DaemonSet", "stoker-agent");
        let container = &array(agent, "/spec/template/spec/containers")[0];
        let args: Vec<&str> = array(container, "/args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let config_arg = args
            .windows(2)
            .find(|w| w[0] == "--config")
            .map(|w| w[1])
            .expect("--config");
        let mount = array(container, "/volumeMounts")
            .iter()
            .find(|m| str_at(m, "/name") == "config")
            .expect("config mount");
        assert_eq!(
            config_arg,
            format!("{}/agent.yaml", str_at(mount, "/mountPath"))
        );
    }
}

/// Every STOKER_* variable the DaemonSet sets is one the agent reads.
#[test]
fn agent_environment_is_known_to_the_agent() {
    let known: BTreeSet<&str> = stoker_agent::config::ENV_OVERRIDES
        .iter()
        .map(|(name, _)| *name)
        .collect();
    let objects = render("base");
    let agent = find(&objects, "DaemonSet", "stoker-agent");
    let container = &array(agent, "/spec/template/spec/containers")[0];
    for variable in array(container, "/env") {
        let name = str_at(variable, "/name");
        assert!(
            known.contains(name),
            "the DaemonSet sets {name}, which the agent does not read (agent/src/config.rs ENV_OVERRIDES)"
        );
    }
}
