//! The Kubernetes API calls each Stoker component makes: the one list that
//! `manifests/` RBAC is checked against (tests/rbac.rs), in both directions:
//! every call is allowed, and every permission is used by a call.
//!
//! The agent's and the controller's calls come from the list the controller
//! crate keeps for both (`stoker_controller::rbac::REQUIRED`); the certgen
//! script's calls are listed here. A call added to the code without a line in
//! those lists fails in the cluster with 403: add the line in the same change.

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

use Scope::OwnNamespace;

/// The Lease the controller elects its leader on (`--lease-name`, set in
/// manifests/base/controller/deployment.yaml). Its Role names it, so the
/// controller's lease calls other than `create` carry this name.
pub const CONTROLLER_LEASE: &str = "stoker-controller";

/// The calls of the agent and the controller, from the list the controller
/// crate keeps for both (`stoker_controller::rbac::REQUIRED`).
pub fn from_controller_crate(component: stoker_controller::rbac::Component) -> Vec<ApiCall> {
    stoker_controller::rbac::REQUIRED
        .iter()
        .filter(|c| c.component == component)
        .map(|c| ApiCall {
            verb: c.verb,
            group: c.group,
            resource: c.resource,
            scope: match c.scope {
                stoker_controller::rbac::Scope::Cluster => Scope::Cluster,
                stoker_controller::rbac::Scope::OwnNamespace => Scope::OwnNamespace,
            },
            name: (c.group == "coordination.k8s.io"
                && c.resource == "leases"
                && c.verb != "create")
                .then_some(CONTROLLER_LEASE),
            why: c.why,
        })
        .collect()
}

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
pub fn components() -> Vec<(&'static str, Vec<ApiCall>)> {
    use stoker_controller::rbac::Component;
    vec![
        ("stoker-agent", from_controller_crate(Component::Agent)),
        (
            "stoker-controller",
            from_controller_crate(Component::Controller),
        ),
        ("stoker-certgen", CERTGEN.to_vec()),
    ]
}
