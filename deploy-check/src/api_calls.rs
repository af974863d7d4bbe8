//! The Kubernetes API calls each Stoker component makes: the one list that
//! `manifests/` RBAC is checked against (tests/rbac.rs), in both directions:
//! every call is allowed, and every permission is used by a call.
//!
//! Kept here until the components export their own lists
//! (`stoker_controller::rbac::REQUIRED`, and the agent's); then these become
//! re-exports. A call added to the code without a line here fails in the
//! cluster with 403, so add the line in the same change.

/// Where a call applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// A cluster-scoped resource, or a namespaced one across all namespaces.
    Cluster,
    /// A namespaced resource in the component's own namespace (stoker-system).
    OwnNamespace,
}

/// One API call: `verb` on `group`/`resource` (with a `/subresource` if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiCall {
    pub verb: &'static str,
    /// API group; "" is the core group.
    pub group: &'static str,
    /// Plural resource name, with `/subresource` when it is one.
    pub resource: &'static str,
    pub scope: Scope,
    /// The one object the call names, when RBAC can restrict it by name.
    pub name: Option<&'static str>,
    /// What the call is for.
    pub why: &'static str,
}

const fn call(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    scope: Scope,
    why: &'static str,
) -> ApiCall {
    ApiCall {
        verb,
        group,
        resource,
        scope,
        name: None,
        why,
    }
}

const fn named(
    verb: &'static str,
    group: &'static str,
    resource: &'static str,
    name: &'static str,
    why: &'static str,
) -> ApiCall {
    ApiCall {
        verb,
        group,
        resource,
        scope: Scope::OwnNamespace,
        name: Some(name),
        why,
    }
}

use Scope::{Cluster, OwnNamespace};

/// The node agent (ServiceAccount stoker-system/stoker-agent). Every write is
/// further limited to its own Node by the ValidatingAdmissionPolicy
/// `stoker-agent-own-node`.
pub const AGENT: &[ApiCall] = &[
    call("get", "", "nodes", Cluster, "read its own Node at start"),
    call(
        "list",
        "",
        "nodes",
        Cluster,
        "watch its own Node (metadata.name field selector)",
    ),
    call(
        "watch",
        "",
        "nodes",
        Cluster,
        "watch its own Node (metadata.name field selector)",
    ),
    call(
        "patch",
        "",
        "nodes",
        Cluster,
        "remove the startup taint once warm",
    ),
    call(
        "patch",
        "",
        "nodes/status",
        Cluster,
        "set the StokerWarm condition",
    ),
];

/// The controller (ServiceAccount stoker-system/stoker-controller), from issue 6.
pub const CONTROLLER: &[ApiCall] = &[
    call("get", "stoker.dev", "imageprefetches", Cluster, "reconcile"),
    call(
        "list",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "watch ImagePrefetch",
    ),
    call(
        "watch",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "watch ImagePrefetch",
    ),
    call(
        "create",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "default ImagePrefetch for an annotated Deployment",
    ),
    call(
        "update",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "finalizers",
    ),
    call(
        "patch",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "finalizers, ownership",
    ),
    call(
        "delete",
        "stoker.dev",
        "imageprefetches",
        Cluster,
        "annotation removed from a Deployment",
    ),
    call(
        "get",
        "stoker.dev",
        "imageprefetches/status",
        Cluster,
        "read status before a patch",
    ),
    call(
        "update",
        "stoker.dev",
        "imageprefetches/status",
        Cluster,
        "status with resourceVersion",
    ),
    call(
        "patch",
        "stoker.dev",
        "imageprefetches/status",
        Cluster,
        "plan, summary, node counts",
    ),
    call(
        "update",
        "stoker.dev",
        "imageprefetches/finalizers",
        Cluster,
        "blockOwnerDeletion on owned objects",
    ),
    call(
        "get",
        "apps",
        "deployments",
        Cluster,
        "the workload an ImagePrefetch serves",
    ),
    call(
        "list",
        "apps",
        "deployments",
        Cluster,
        "watch Deployments (annotation, replicas, image)",
    ),
    call(
        "watch",
        "apps",
        "deployments",
        Cluster,
        "watch Deployments (annotation, replicas, image)",
    ),
    call(
        "update",
        "apps",
        "deployments/finalizers",
        Cluster,
        "an ImagePrefetch owned by its Deployment",
    ),
    call(
        "get",
        "apps",
        "replicasets",
        Cluster,
        "pods of a Deployment",
    ),
    call("list", "apps", "replicasets", Cluster, "watch ReplicaSets"),
    call("watch", "apps", "replicasets", Cluster, "watch ReplicaSets"),
    call("get", "", "pods", Cluster, "a pod that started (learning)"),
    call(
        "list",
        "",
        "pods",
        Cluster,
        "reflector over selected and Pending pods, and the agent pods",
    ),
    call(
        "watch",
        "",
        "pods",
        Cluster,
        "reflector over selected and Pending pods, and the agent pods",
    ),
    call("get", "", "nodes", Cluster, "candidate nodes"),
    call(
        "list",
        "",
        "nodes",
        Cluster,
        "metadata-only reflector over Nodes",
    ),
    call(
        "watch",
        "",
        "nodes",
        Cluster,
        "metadata-only reflector over Nodes",
    ),
    call(
        "patch",
        "",
        "nodes",
        Cluster,
        "finalizer cleanup of the startup taint",
    ),
    call(
        "patch",
        "",
        "nodes/status",
        Cluster,
        "finalizer cleanup of the StokerWarm condition",
    ),
    call(
        "create",
        "events.k8s.io",
        "events",
        Cluster,
        "Events on ImagePrefetch and Deployments",
    ),
    call("patch", "events.k8s.io", "events", Cluster, "Event series"),
    call(
        "create",
        "coordination.k8s.io",
        "leases",
        OwnNamespace,
        "leader election: first replica creates the Lease",
    ),
    named(
        "get",
        "coordination.k8s.io",
        "leases",
        "stoker-controller",
        "leader election",
    ),
    named(
        "update",
        "coordination.k8s.io",
        "leases",
        "stoker-controller",
        "leader election: renew",
    ),
    named(
        "patch",
        "coordination.k8s.io",
        "leases",
        "stoker-controller",
        "leader election: take over",
    ),
];

/// The certificate Job and CronJob (ServiceAccount stoker-system/stoker-certgen),
/// from images/certgen/stoker-certgen.sh.
pub const CERTGEN: &[ApiCall] = &[
    call(
        "create",
        "",
        "secrets",
        OwnNamespace,
        "first issue of a Secret",
    ),
    named("get", "", "secrets", "stoker-ca", "load the CA"),
    named("update", "", "secrets", "stoker-ca", "replace the CA"),
    named(
        "get",
        "",
        "secrets",
        "stoker-agent-tls",
        "check the agent certificate",
    ),
    named(
        "update",
        "",
        "secrets",
        "stoker-agent-tls",
        "renew the agent certificate",
    ),
    named(
        "get",
        "",
        "secrets",
        "stoker-controller-tls",
        "check the controller certificate",
    ),
    named(
        "update",
        "",
        "secrets",
        "stoker-controller-tls",
        "renew the controller certificate",
    ),
];

/// ServiceAccount name → the calls it makes.
pub const COMPONENTS: &[(&str, &[ApiCall])] = &[
    ("stoker-agent", AGENT),
    ("stoker-controller", CONTROLLER),
    ("stoker-certgen", CERTGEN),
];
