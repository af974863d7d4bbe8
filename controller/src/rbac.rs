//! Every Kubernetes API call the controller and the agent make, in one list.
//!
//! `manifests/` grants RBAC from this list, and a test there checks the rules
//! with [`uncovered`]. When code starts making a new kind of call, add it here.

use k8s_openapi::api::rbac::v1::PolicyRule;

/// Who makes the call (which ServiceAccount needs the permission).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Controller,
    Agent,
}

/// Where the permission is needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// All namespaces, or a cluster-scoped resource: a ClusterRole.
    Cluster,
    /// Only the component's own namespace (`stoker-system`): a Role suffices.
    OwnNamespace,
}

/// One kind of API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub component: Component,
    pub verb: &'static str,
    /// API group; "" is the core group.
    pub group: &'static str,
    /// Resource, with "/subresource" where one is used.
    pub resource: &'static str,
    pub scope: Scope,
    /// What the call is for.
    pub why: &'static str,
}

const fn call(
    component: Component,
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    scope: Scope,
    why: &'static str,
) -> ApiCall {
    ApiCall {
        component,
        verb,
        group,
        resource,
        scope,
        why,
    }
}

use Component::{Agent, Controller};
use Scope::{Cluster, OwnNamespace};

/// Every API call Stoker's components make.
pub const REQUIRED: &[ApiCall] = &[
    call(
        Controller,
        "list",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "reflector of ImagePrefetch objects",
    ),
    call(
        Controller,
        "watch",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "reflector of ImagePrefetch objects",
    ),
    call(
        Controller,
        "create",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "default ImagePrefetch of an annotated Deployment",
    ),
    call(
        Controller,
        "patch",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "add and remove the stoker.dev/cleanup finalizer",
    ),
    call(
        Controller,
        "patch",
        "stoker.dev",
        "imageprefetches/status",
        Cluster,
        "record plans, node counts and conditions",
    ),
    call(
        Controller,
        "list",
        "apps",
        "deployments",
        Cluster,
        "reflector of Deployments (workloads, replicas, annotation)",
    ),
    call(
        Controller,
        "watch",
        "apps",
        "deployments",
        Cluster,
        "reflector of Deployments (workloads, replicas, annotation)",
    ),
    call(
        Controller,
        "list",
        "apps",
        "replicasets",
        Cluster,
        "metadata-only reflector: Pod -> ReplicaSet -> Deployment",
    ),
    call(
        Controller,
        "watch",
        "apps",
        "replicasets",
        Cluster,
        "metadata-only reflector: Pod -> ReplicaSet -> Deployment",
    ),
    call(
        Controller,
        "list",
        "",
        "pods",
        Cluster,
        "metadata-only watch of pods; the workload's pods when learning; agent pods",
    ),
    call(
        Controller,
        "watch",
        "",
        "pods",
        Cluster,
        "metadata-only watch of pods; agent pods (node -> pod IP)",
    ),
    call(
        Controller,
        "list",
        "",
        "nodes",
        Cluster,
        "reflector of Nodes (labels, taints) for candidate selection",
    ),
    call(
        Controller,
        "watch",
        "",
        "nodes",
        Cluster,
        "reflector of Nodes (labels, taints) for candidate selection",
    ),
    call(
        Controller,
        "patch",
        "",
        "nodes",
        Cluster,
        "write the stoker.dev/warm-target annotation on gated nodes",
    ),
    call(
        Controller,
        "create",
        "events.k8s.io",
        "events",
        Cluster,
        "Events on ImagePrefetch objects and Deployments",
    ),
    call(
        Controller,
        "patch",
        "events.k8s.io",
        "events",
        Cluster,
        "repeated Events become series",
    ),
    call(
        Controller,
        "get",
        "",
        "serviceaccounts",
        Cluster,
        "the image pull secrets of a workload's ServiceAccount (pods without their own)",
    ),
    call(
        Controller,
        "get",
        "",
        "secrets",
        Cluster,
        "the image pull secrets a workload names, for the registry credentials sent to \
         the agents warming it (get by name only: never list or watch)",
    ),
    call(
        Controller,
        "get",
        "coordination.k8s.io",
        "leases",
        OwnNamespace,
        "leader election",
    ),
    call(
        Controller,
        "create",
        "coordination.k8s.io",
        "leases",
        OwnNamespace,
        "leader election",
    ),
    call(
        Controller,
        "update",
        "coordination.k8s.io",
        "leases",
        OwnNamespace,
        "leader election",
    ),
    call(
        Agent,
        "get",
        "",
        "nodes",
        Cluster,
        "read its node's startup taint and warm target",
    ),
    call(
        Agent,
        "list",
        "",
        "nodes",
        Cluster,
        "watch its own node (field-selected on metadata.name): initial list",
    ),
    call(
        Agent,
        "watch",
        "",
        "nodes",
        Cluster,
        "watch its own node (field-selected on metadata.name) for its warm target",
    ),
    call(
        Agent,
        "patch",
        "",
        "nodes",
        Cluster,
        "remove its node's startup taint",
    ),
    call(
        Agent,
        "patch",
        "",
        "nodes/status",
        Cluster,
        "set its node's StokerWarm condition",
    ),
];

/// The calls of `component` that the given rules do not allow. Cluster-scoped
/// calls must be allowed by `cluster_rules` (ClusterRoles bound with a
/// ClusterRoleBinding); own-namespace calls by either list.
pub fn uncovered(
    component: Component,
    cluster_rules: &[PolicyRule],
    namespace_rules: &[PolicyRule],
) -> Vec<ApiCall> {
    REQUIRED
        .iter()
        .filter(|c| c.component == component)
        .filter(|c| {
            let allowed = |rules: &[PolicyRule]| rules.iter().any(|r| allows(r, c));
            match c.scope {
                Cluster => !allowed(cluster_rules),
                OwnNamespace => !allowed(cluster_rules) && !allowed(namespace_rules),
            }
        })
        .copied()
        .collect()
}

/// True if `rule` allows `call` on every object (rules limited to
/// `resourceNames` do not count).
pub fn allows(rule: &PolicyRule, call: &ApiCall) -> bool {
    let has = |list: Option<&Vec<String>>, want: &str| {
        list.is_some_and(|l| l.iter().any(|x| x == "*" || x == want))
    };
    rule.resource_names.as_ref().is_none_or(|n| n.is_empty())
        && has(rule.api_groups.as_ref(), call.group)
        && has(rule.resources.as_ref(), call.resource)
        && has(Some(&rule.verbs), call.verb)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        let strings = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        PolicyRule {
            api_groups: Some(strings(groups)),
            resources: Some(strings(resources)),
            verbs: strings(verbs),
            ..PolicyRule::default()
        }
    }

    #[test]
    fn agent_rules_cover_the_agent_calls() {
        let rules = [
            rule(&[""], &["nodes"], &["get", "list", "watch", "patch"]),
            rule(&[""], &["nodes/status"], &["patch"]),
        ];
        assert_eq!(uncovered(Agent, &rules, &[]), []);
        // Missing the status subresource is reported.
        let missing = uncovered(Agent, &rules[..1], &[]);
        assert_eq!(missing.len(), 1);
        assert_eq!(missing[0].resource, "nodes/status");
    }

    #[test]
    fn namespace_rules_satisfy_only_own_namespace_calls() {
        let leases = rule(
            &["coordination.k8s.io"],
            &["leases"],
            &["get", "create", "update"],
        );
        let missing = uncovered(Controller, &[], &[leases]);
        assert!(missing.iter().all(|c| c.resource != "leases"));
        assert!(missing.iter().any(|c| c.resource == "nodes"));
    }

    #[test]
    fn wildcards_count_resource_names_do_not() {
        let everything = rule(&["*"], &["*"], &["*"]);
        assert_eq!(
            uncovered(Controller, std::slice::from_ref(&everything), &[]),
            []
        );
        let mut named = everything;
        named.resource_names = Some(vec!["one".into()]);
        assert_eq!(
            uncovered(Controller, &[named], &[]).len(),
            REQUIRED
                .iter()
                .filter(|c| c.component == Controller)
                .count()
        );
    }
}
