//! RBAC is exactly what the code needs: every API call in
//! `stoker_deploy_check::api_calls` is allowed for its ServiceAccount, and every
//! permission granted is used by one of them.

mod common;

use common::*;
use stoker_deploy_check::api_calls::components;
use stoker_deploy_check::rbac;

#[test]
fn rbac_covers_every_api_call_and_nothing_more() {
    for variant in ["base", "overlays/kind"] {
        let objects = render(variant);
        for (account, calls) in components() {
            let calls = &calls[..];
            let rules = rbac::rules_for(&objects, NAMESPACE, account)
                .unwrap_or_else(|e| panic!("manifests/{variant}: {e}"));
            let missing = rbac::uncovered(&rules, calls, NAMESPACE);
            assert!(
                missing.is_empty(),
                "manifests/{variant}: {account} may not make these calls: {missing:#?}"
            );
            let unused = rbac::unused(&rules, calls, NAMESPACE);
            assert!(
                unused.is_empty(),
                "manifests/{variant}: {account} is granted permissions no call uses \
                 (least privilege; add the call to api_calls.rs or drop the rule): {unused:#?}"
            );
            let wildcards = rbac::wildcards(&rules);
            assert!(
                wildcards.is_empty(),
                "{account}: wildcard rules in {wildcards:?}"
            );
        }
    }
}

/// With cert-manager the certgen account and its rights are gone.
#[test]
fn cert_manager_variant_drops_certgen_rights() {
    let objects = render("overlays/cert-manager");
    let rules = rbac::rules_for(&objects, NAMESPACE, "stoker-certgen").expect("rules");
    assert!(rules.is_empty(), "certgen still has rules: {rules:?}");
    assert!(!objects.iter().any(|o| name(o) == "stoker-certgen"));
}

/// The checker itself: a missing verb and an extra one are both found.
#[test]
fn coverage_check_finds_missing_and_extra_rights() {
    let mut objects = render("base");
    let role = objects
        .iter_mut()
        .find(|o| kind(o) == "ClusterRole" && name(o) == "stoker-agent")
        .expect("agent role");
    role["rules"][0]["verbs"] = serde_json::json!(["get", "delete"]);
    let rules = rbac::rules_for(&objects, NAMESPACE, "stoker-agent").expect("rules");
    let calls = &stoker_deploy_check::api_calls::from_controller_crate(
        stoker_controller::rbac::Component::Agent,
    );
    let missing = rbac::uncovered(&rules, calls, NAMESPACE);
    assert!(
        missing
            .iter()
            .any(|c| c.verb == "patch" && c.resource == "nodes"),
        "{missing:?}"
    );
    let unused = rbac::unused(&rules, calls, NAMESPACE);
    assert!(
        unused.iter().any(|u| u.starts_with("delete /nodes")),
        "{unused:?}"
    );
}
