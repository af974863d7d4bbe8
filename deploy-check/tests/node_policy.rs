//! The ValidatingAdmissionPolicy `stoker-agent-own-node`, evaluated with a CEL
//! interpreter against the admission requests an agent could send: its own
//! Node's startup taint and StokerWarm condition pass, everything else is denied.
//!
//! This runs the policy's own expressions (from the rendered manifests) the way
//! the API server does: match conditions, then variables, then validations.
//! The API server also type-checks them against the Node schema, which only a
//! cluster can do (the e2e).

mod common;

use std::sync::Arc;

use cel::{Context, Env, Value as CelValue};
use common::*;
use serde_json::{Value, json};

const AGENT_USER: &str = "system:serviceaccount:stoker-system:stoker-agent";
const STARTUP_TAINT: &str = "startup-taint.cluster-autoscaler.kubernetes.io/stoker-warming";

#[derive(Debug, PartialEq)]
enum Decision {
    NotMatched,
    Allowed,
    Denied(Vec<String>),
}

fn policy() -> Value {
    let objects = render("base");
    find(
        &objects,
        "ValidatingAdmissionPolicy",
        "stoker-agent-own-node",
    )
    .clone()
}

fn evaluate(policy: &Value, request: &Value, object: &Value, old_object: &Value) -> Decision {
    let env = Arc::new(Env::stdlib());
    let mut context = Context::with_env(env.clone());
    let add = |context: &mut Context, name: &str, value: &Value| {
        let value = cel::to_value(value).expect("CEL value");
        context.add_variable_from_value(name, value);
    };
    add(&mut context, "request", request);
    add(&mut context, "object", object);
    add(&mut context, "oldObject", old_object);
    let run = |context: &Context, expression: &str| -> Result<CelValue, String> {
        let program = env
            .compile(expression)
            .map_err(|e| format!("`{expression}` does not compile: {e}"))?;
        program
            .execute(context)
            .map_err(|e| format!("`{expression}` failed: {e}"))
    };

    for condition in array(policy, "/spec/matchConditions") {
        match run(&context, str_at(condition, "/expression")) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => return Decision::NotMatched,
            other => panic!("match condition: {other:?}"),
        }
    }
    // Variables are evaluated lazily by the API server; an error in one only
    // matters to a validation that reads it. Keep the errors and let the
    // validation fail.
    let mut variables = std::collections::HashMap::new();
    for variable in array(policy, "/spec/variables") {
        let name = str_at(variable, "/name").to_string();
        let mut scope = Context::with_env(env.clone());
        add(&mut scope, "request", request);
        add(&mut scope, "object", object);
        add(&mut scope, "oldObject", old_object);
        scope.add_variable_from_value("variables", CelValue::Map(variables_map(&variables)));
        if let Ok(value) = run(&scope, str_at(variable, "/expression")) {
            variables.insert(name, value);
        }
    }
    context.add_variable_from_value("variables", CelValue::Map(variables_map(&variables)));

    let mut denials = Vec::new();
    for validation in array(policy, "/spec/validations") {
        let expression = str_at(validation, "/expression");
        let passed = matches!(run(&context, expression), Ok(CelValue::Bool(true)));
        if !passed {
            let message = match validation.get("messageExpression").and_then(Value::as_str) {
                Some(message) => match run(&context, message) {
                    Ok(CelValue::String(text)) => text.to_string(),
                    other => format!("(messageExpression: {other:?})"),
                },
                None => str_at(validation, "/message").to_string(),
            };
            denials.push(message);
        }
    }
    if denials.is_empty() {
        Decision::Allowed
    } else {
        Decision::Denied(denials)
    }
}

fn variables_map(variables: &std::collections::HashMap<String, CelValue>) -> cel::objects::Map {
    cel::objects::Map::from(variables.clone())
}

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, "nvidia.com/gpu.present": "true"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"}
        },
        "spec": {
            "providerID": format!("kind://docker/stoker/{name}"),
            "podCIDRs": ["10.244.1.0/24"],
            "taints": [
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"},
                {"key": STARTUP_TAINT, "effect": "NoSchedule"}
            ]
        },
        "status": {
            "capacity": {"cpu": "8", "nvidia.com/gpu": "1"},
            "allocatable": {"cpu": "8", "nvidia.com/gpu": "1"},
            "addresses": [{"type": "InternalIP", "address": "172.18.0.4"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": "v1.33.0"},
            "conditions": [
                {"type": "Ready", "status": "True", "reason": "KubeletReady"}
            ]
        }
    })
}

fn request(user: &str, node_claim: Option<&str>, operation: &str, sub_resource: &str) -> Value {
    let extra = match node_claim {
        Some(node) => json!({
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/pod-name": ["stoker-agent-abcde"]
        }),
        None => json!({}),
    };
    json!({
        "operation": operation,
        "subResource": sub_resource,
        "userInfo": {"username": user, "extra": extra}
    })
}

fn without_startup_taint(mut node: Value) -> Value {
    let taints = node["spec"]["taints"].as_array_mut().expect("taints");
    taints.retain(|t| t["key"] != STARTUP_TAINT);
    node
}

fn with_warm_condition(mut node: Value) -> Value {
    node["status"]["conditions"]
        .as_array_mut()
        .expect("conditions")
        .push(json!({"type": "StokerWarm", "status": "True", "reason": "PlansVerified"}));
    node
}

fn agent_update(old: &Value, new: &Value, sub_resource: &str) -> Decision {
    evaluate(
        &policy(),
        &request(AGENT_USER, Some("gpu-1"), "UPDATE", sub_resource),
        new,
        old,
    )
}

#[test]
fn agent_may_remove_its_own_startup_taint() {
    let old = node("gpu-1");
    assert_eq!(
        agent_update(&old, &without_startup_taint(old.clone()), ""),
        Decision::Allowed
    );
}

#[test]
fn agent_may_set_its_own_warm_condition() {
    let old = node("gpu-1");
    assert_eq!(
        agent_update(&old, &with_warm_condition(old.clone()), "status"),
        Decision::Allowed
    );
}

#[test]
fn agent_may_not_touch_another_node() {
    let old = node("gpu-2");
    let Decision::Denied(messages) = agent_update(&old, &without_startup_taint(old.clone()), "")
    else {
        panic!("another node's taint was allowed");
    };
    assert!(
        messages
            .iter()
            .any(|m| m.contains("gpu-1") && m.contains("gpu-2")),
        "{messages:?}"
    );
}

#[test]
fn a_token_without_a_node_claim_is_refused() {
    let old = node("gpu-1");
    let decision = evaluate(
        &policy(),
        &request(AGENT_USER, None, "UPDATE", ""),
        &without_startup_taint(old.clone()),
        &old,
    );
    let Decision::Denied(messages) = decision else {
        panic!("no node claim was allowed");
    };
    assert!(
        messages.iter().any(|m| m.contains("node-name")),
        "{messages:?}"
    );
}

#[test]
fn agent_may_change_nothing_else_on_its_node() {
    let old = node("gpu-1");
    let mut changes: Vec<(&str, Value, &str)> = Vec::new();

    let mut other_taint = old.clone();
    other_taint["spec"]["taints"]
        .as_array_mut()
        .expect("taints")
        .remove(0);
    changes.push(("removes the GPU taint", other_taint, ""));

    let mut label = old.clone();
    label["metadata"]["labels"]["nvidia.com/gpu.present"] = json!("false");
    changes.push(("changes a label", label, ""));

    let mut annotation = old.clone();
    annotation["metadata"]["annotations"]["x"] = json!("y");
    changes.push(("adds an annotation", annotation, ""));

    let mut cordon = old.clone();
    cordon["spec"]["unschedulable"] = json!(true);
    changes.push(("cordons the node", cordon, ""));

    let mut no_execute = old.clone();
    no_execute["spec"]["taints"][1]["effect"] = json!("NoExecute");
    changes.push(("turns the startup taint into NoExecute", no_execute, ""));

    let mut ready = old.clone();
    ready["status"]["conditions"][0]["status"] = json!("False");
    changes.push(("marks the node not Ready", ready, "status"));

    let mut capacity = old.clone();
    capacity["status"]["capacity"]["nvidia.com/gpu"] = json!("8");
    changes.push(("inflates GPU capacity", capacity, "status"));

    let mut address = old.clone();
    address["status"]["addresses"][0]["address"] = json!("10.0.0.66");
    changes.push(("redirects the node address", address, "status"));

    for (what, new, sub_resource) in changes {
        assert!(
            matches!(agent_update(&old, &new, sub_resource), Decision::Denied(_)),
            "the agent {what}, and the policy allowed it"
        );
    }
}

#[test]
fn agent_may_not_create_or_delete_nodes() {
    let old = node("gpu-1");
    for operation in ["CREATE", "DELETE"] {
        let decision = evaluate(
            &policy(),
            &request(AGENT_USER, Some("gpu-1"), operation, ""),
            &old,
            &Value::Null,
        );
        assert!(
            matches!(decision, Decision::Denied(_)),
            "{operation} was allowed"
        );
    }
}

#[test]
fn other_users_are_not_matched() {
    let old = node("gpu-1");
    let decision = evaluate(
        &policy(),
        &request("system:node:gpu-1", None, "UPDATE", "status"),
        &with_warm_condition(old.clone()),
        &old,
    );
    assert_eq!(decision, Decision::NotMatched);
}

/// The policy names the ServiceAccount the DaemonSet actually runs as, in every
/// variant: a renamed account would silently switch the policy off.
#[test]
fn policy_names_the_agents_service_account() {
    for variant in ["base", "overlays/kind", "overlays/cert-manager"] {
        let objects = render(variant);
        let agent = find(&objects, "DaemonSet", "stoker-agent");
        let user = format!(
            "system:serviceaccount:{}:{}",
            str_at(agent, "/metadata/namespace"),
            str_at(agent, "/spec/template/spec/serviceAccountName")
        );
        let policy = find(
            &objects,
            "ValidatingAdmissionPolicy",
            "stoker-agent-own-node",
        );
        let condition = str_at(&array(policy, "/spec/matchConditions")[0], "/expression");
        assert!(
            condition.contains(&format!("'{user}'")),
            "manifests/{variant}: {condition}"
        );
        let binding = find(
            &objects,
            "ValidatingAdmissionPolicyBinding",
            "stoker-agent-own-node",
        );
        assert_eq!(str_at(binding, "/spec/policyName"), "stoker-agent-own-node");
        assert!(
            array(binding, "/spec/validationActions")
                .iter()
                .any(|a| a == "Deny")
        );
    }
}
