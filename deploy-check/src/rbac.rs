//! RBAC coverage: which rules reach a ServiceAccount through the rendered
//! (Cluster)RoleBindings, whether they allow each [`ApiCall`], and which of
//! them no call needs.

use serde_json::Value;

use crate::api_calls::{ApiCall, Scope};

/// One rule as it applies to a ServiceAccount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GrantedRule {
    /// `None` for a ClusterRoleBinding (every namespace), the RoleBinding's
    /// namespace otherwise.
    pub namespace: Option<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub verbs: Vec<String>,
    pub resource_names: Vec<String>,
    /// Where the rule comes from, for messages.
    pub source: String,
}

fn strings(value: Option<&Value>) -> Vec<String> {
    value
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn text<'a>(object: &'a Value, path: &[&str]) -> &'a str {
    let mut value = object;
    for key in path {
        match value.get(key) {
            Some(next) => value = next,
            None => return "",
        }
    }
    value.as_str().unwrap_or_default()
}

/// The rules bound to ServiceAccount `namespace/name` in `objects`. A binding
/// that names a missing role is reported as an error.
pub fn rules_for(
    objects: &[Value],
    namespace: &str,
    name: &str,
) -> Result<Vec<GrantedRule>, String> {
    let mut granted = Vec::new();
    for binding in objects {
        let kind = text(binding, &["kind"]);
        if kind != "ClusterRoleBinding" && kind != "RoleBinding" {
            continue;
        }
        let binding_namespace = text(binding, &["metadata", "namespace"]);
        let binds_account = binding
            .get("subjects")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|subject| {
                text(subject, &["kind"]) == "ServiceAccount"
                    && text(subject, &["name"]) == name
                    && text(subject, &["namespace"]) == namespace
            });
        if !binds_account {
            continue;
        }
        let role_kind = text(binding, &["roleRef", "kind"]);
        let role_name = text(binding, &["roleRef", "name"]);
        let role = objects.iter().find(|object| {
            text(object, &["kind"]) == role_kind
                && text(object, &["metadata", "name"]) == role_name
                && (role_kind == "ClusterRole"
                    || text(object, &["metadata", "namespace"]) == binding_namespace)
        });
        let Some(role) = role else {
            return Err(format!(
                "{kind} {} refers to {role_kind} {role_name}, which the manifests do not define",
                text(binding, &["metadata", "name"])
            ));
        };
        let scope = (kind == "RoleBinding").then(|| binding_namespace.to_string());
        for rule in role
            .get("rules")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            granted.push(GrantedRule {
                namespace: scope.clone(),
                api_groups: strings(rule.get("apiGroups")),
                resources: strings(rule.get("resources")),
                verbs: strings(rule.get("verbs")),
                resource_names: strings(rule.get("resourceNames")),
                source: format!(
                    "{role_kind} {role_name} via {kind} {}",
                    text(binding, &["metadata", "name"])
                ),
            });
        }
    }
    Ok(granted)
}

/// True when `rule` allows `call` made from a component in `own_namespace`.
pub fn allows(rule: &GrantedRule, call: &ApiCall, own_namespace: &str) -> bool {
    let scope_ok = match (&rule.namespace, call.scope) {
        (None, _) => true,
        (Some(namespace), Scope::OwnNamespace) => namespace == own_namespace,
        (Some(_), Scope::Cluster) => false,
    };
    let name_ok = rule.resource_names.is_empty()
        || call
            .name
            .is_some_and(|name| rule.resource_names.iter().any(|n| n == name));
    scope_ok
        && name_ok
        && rule.api_groups.iter().any(|g| g == call.group)
        && rule.resources.iter().any(|r| r == call.resource)
        && rule.verbs.iter().any(|v| v == call.verb)
}

/// Calls that no rule allows.
pub fn uncovered<'a>(
    rules: &[GrantedRule],
    calls: &'a [ApiCall],
    own_namespace: &str,
) -> Vec<&'a ApiCall> {
    calls
        .iter()
        .filter(|call| !rules.iter().any(|rule| allows(rule, call, own_namespace)))
        .collect()
}

/// Permissions granted that no call uses: each as "verb group/resource (source)".
pub fn unused(rules: &[GrantedRule], calls: &[ApiCall], own_namespace: &str) -> Vec<String> {
    let mut unused = Vec::new();
    for rule in rules {
        for group in &rule.api_groups {
            for resource in &rule.resources {
                for verb in &rule.verbs {
                    let names: Vec<Option<&str>> = if rule.resource_names.is_empty() {
                        vec![None]
                    } else {
                        rule.resource_names
                            .iter()
                            .map(|n| Some(n.as_str()))
                            .collect()
                    };
                    for name in names {
                        let used = calls.iter().any(|call| {
                            call.group == group
                                && call.resource == resource
                                && call.verb == verb
                                && (name.is_none() || call.name == name)
                                && allows(rule, call, own_namespace)
                        });
                        if !used {
                            unused.push(format!(
                                "{verb} {group}/{resource}{} ({})",
                                name.map(|n| format!(" named {n}")).unwrap_or_default(),
                                rule.source
                            ));
                        }
                    }
                }
            }
        }
    }
    unused
}

/// Wildcards (`*`) anywhere in a rule.
pub fn wildcards(rules: &[GrantedRule]) -> Vec<String> {
    rules
        .iter()
        .filter(|rule| {
            rule.api_groups
                .iter()
                .chain(&rule.resources)
                .chain(&rule.verbs)
                .any(|s| s.contains('*'))
        })
        .map(|rule| rule.source.clone())
        .collect()
}
