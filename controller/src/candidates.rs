//! Candidate node selection: can a workload's pods be scheduled on a node?
//!
//! Pure logic over the pod template's `nodeSelector`, required node affinity
//! and tolerations, and a node's labels, name and taints. It answers the
//! question the scheduler's filters answer (NodeAffinity, TaintToleration,
//! NodeUnschedulable), without resources or pod affinity: warming a node that
//! ends up full is cheap, missing one that gets the pod is not.
//!
//! Taints that only mean "this node is still starting" do not exclude a node,
//! because warming must begin exactly then: the Stoker startup taint, other
//! Cluster Autoscaler startup/ignore taints, `not-ready`,
//! `network-unavailable` and the cloud provider's `uninitialized`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint, Toleration,
};

/// Taint key prefixes that mark a node as still starting up.
const TRANSIENT_TAINT_PREFIXES: &[&str] = &[
    "startup-taint.cluster-autoscaler.kubernetes.io/",
    "ignore-taint.cluster-autoscaler.kubernetes.io/",
];
/// Taint keys that mark a node as still starting up.
const TRANSIENT_TAINT_KEYS: &[&str] = &[
    "node.kubernetes.io/not-ready",
    "node.kubernetes.io/network-unavailable",
    "node.cloudprovider.kubernetes.io/uninitialized",
];
/// The taint the node lifecycle controller puts on cordoned nodes.
const UNSCHEDULABLE_TAINT: &str = "node.kubernetes.io/unschedulable";

/// The parts of a pod template that decide where its pods may run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodScheduling {
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: a node must match at least one term. `None`
    /// means no required affinity.
    pub required_terms: Option<Vec<NodeSelectorTerm>>,
    pub tolerations: Vec<Toleration>,
}

impl PodScheduling {
    /// Extracts the scheduling constraints of a pod spec.
    pub fn from_pod_spec(spec: &PodSpec) -> Self {
        let required_terms = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|na| {
                na.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|selector| selector.node_selector_terms.clone());
        PodScheduling {
            node_selector: spec.node_selector.clone().unwrap_or_default(),
            required_terms,
            tolerations: spec.tolerations.clone().unwrap_or_default(),
        }
    }
}

/// True if pods with `scheduling` may run on `node`, and the node carries every
/// label of `extra_selector` (the ImagePrefetch's own node selector).
pub fn is_candidate(
    scheduling: &PodScheduling,
    extra_selector: &BTreeMap<String, String>,
    node: &Node,
) -> bool {
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
    let spec = node.spec.as_ref();
    let node = NodeView {
        name: node.metadata.name.as_deref().unwrap_or_default(),
        labels,
        taints: spec.and_then(|s| s.taints.as_deref()).unwrap_or_default(),
        unschedulable: spec.and_then(|s| s.unschedulable).unwrap_or(false),
    };
    labels_match(&scheduling.node_selector, node.labels)
        && labels_match(extra_selector, node.labels)
        && scheduling
            .required_terms
            .as_ref()
            .is_none_or(|terms| terms.iter().any(|t| term_matches(t, &node)))
        && taints_tolerated(&scheduling.tolerations, &node)
}

/// The parts of a node that candidate selection looks at.
struct NodeView<'a> {
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
    taints: &'a [Taint],
    unschedulable: bool,
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A node selector term matches when all its expressions and fields match. A
/// term with neither matches nothing (Kubernetes semantics).
fn term_matches(term: &NodeSelectorTerm, node: &NodeView) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions
        .iter()
        .all(|r| requirement_matches(r, node.labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            // `metadata.name` is the only field Kubernetes supports here.
            r.key == "metadata.name" && requirement_matches(r, Some(node.name))
        })
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(actual), [bound]) = (value.and_then(|v| v.parse::<i64>().ok()), values)
            else {
                return false;
            };
            let Ok(bound) = bound.parse::<i64>() else {
                return false;
            };
            if requirement.operator == "Gt" {
                actual > bound
            } else {
                actual < bound
            }
        }
        _ => false,
    }
}

/// Every `NoSchedule`/`NoExecute` taint must be tolerated, except the
/// transient start-up ones. A cordoned node is never a candidate unless the
/// pods tolerate the unschedulable taint.
fn taints_tolerated(tolerations: &[Toleration], node: &NodeView) -> bool {
    if node.unschedulable {
        let cordon = Taint {
            key: UNSCHEDULABLE_TAINT.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        if !tolerations.iter().any(|t| tolerates(t, &cordon)) {
            return false;
        }
    }
    node.taints
        .iter()
        .filter(|taint| taint.effect == "NoSchedule" || taint.effect == "NoExecute")
        .filter(|taint| !is_transient(&taint.key))
        .all(|taint| tolerations.iter().any(|t| tolerates(t, taint)))
}

fn is_transient(key: &str) -> bool {
    TRANSIENT_TAINT_KEYS.contains(&key)
        || TRANSIENT_TAINT_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Kubernetes' `Toleration.ToleratesTaint`.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{Affinity, NodeAffinity, NodeSelector, NodeSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn node(labels: &[(&str, &str)], taints: &[(&str, &str, &str)]) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some(
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                taints: Some(
                    taints
                        .iter()
                        .map(|(k, v, e)| Taint {
                            key: k.to_string(),
                            value: (!v.is_empty()).then(|| v.to_string()),
                            effect: e.to_string(),
                            ..Taint::default()
                        })
                        .collect(),
                ),
                ..NodeSpec::default()
            }),
            status: None,
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn requirement(key: &str, op: &str, values: &[&str]) -> NodeSelectorRequirement {
        NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    fn term(expressions: Vec<NodeSelectorRequirement>) -> NodeSelectorTerm {
        NodeSelectorTerm {
            match_expressions: Some(expressions),
            match_fields: None,
        }
    }

    fn affinity(terms: Vec<NodeSelectorTerm>) -> PodScheduling {
        PodScheduling {
            required_terms: Some(terms),
            ..PodScheduling::default()
        }
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(op),
            value: opt(value),
            effect: opt(effect),
            toleration_seconds: None,
        }
    }

    const NONE: &BTreeMap<String, String> = &BTreeMap::new();

    #[test]
    fn no_constraints_means_every_untainted_node() {
        assert!(is_candidate(
            &PodScheduling::default(),
            NONE,
            &node(&[], &[])
        ));
    }

    #[test]
    fn node_selector_needs_every_label_with_the_same_value() {
        let pods = PodScheduling {
            node_selector: selector(&[("gpu", "a100"), ("zone", "z1")]),
            ..PodScheduling::default()
        };
        assert!(is_candidate(
            &pods,
            NONE,
            &node(&[("gpu", "a100"), ("zone", "z1"), ("x", "y")], &[])
        ));
        assert!(!is_candidate(&pods, NONE, &node(&[("gpu", "a100")], &[])));
        assert!(!is_candidate(
            &pods,
            NONE,
            &node(&[("gpu", "h100"), ("zone", "z1")], &[])
        ));
    }

    #[test]
    fn the_prefetch_objects_own_selector_narrows_further() {
        let extra = selector(&[("pool", "gpu")]);
        assert!(is_candidate(
            &PodScheduling::default(),
            &extra,
            &node(&[("pool", "gpu")], &[])
        ));
        assert!(!is_candidate(
            &PodScheduling::default(),
            &extra,
            &node(&[("pool", "cpu")], &[])
        ));
    }

    #[test]
    fn required_affinity_terms_are_ored_and_expressions_anded() {
        let pods = affinity(vec![
            term(vec![
                requirement("gpu", "In", &["a100", "h100"]),
                requirement("spot", "DoesNotExist", &[]),
            ]),
            term(vec![requirement("pool", "In", &["big"])]),
        ]);
        assert!(is_candidate(&pods, NONE, &node(&[("gpu", "h100")], &[])));
        assert!(!is_candidate(
            &pods,
            NONE,
            &node(&[("gpu", "h100"), ("spot", "true")], &[])
        ));
        assert!(is_candidate(
            &pods,
            NONE,
            &node(&[("gpu", "t4"), ("pool", "big")], &[])
        ));
        assert!(!is_candidate(&pods, NONE, &node(&[("gpu", "t4")], &[])));
    }

    #[test]
    fn affinity_operators() {
        let one = |r| affinity(vec![term(vec![r])]);
        let n = node(&[("gpus", "8"), ("arch", "amd64")], &[]);
        assert!(is_candidate(
            &one(requirement("arch", "NotIn", &["arm64"])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("arch", "NotIn", &["amd64"])),
            NONE,
            &n
        ));
        // NotIn matches nodes without the label, as in Kubernetes.
        assert!(is_candidate(
            &one(requirement("absent", "NotIn", &["x"])),
            NONE,
            &n
        ));
        assert!(is_candidate(
            &one(requirement("arch", "Exists", &[])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("absent", "Exists", &[])),
            NONE,
            &n
        ));
        assert!(is_candidate(
            &one(requirement("gpus", "Gt", &["4"])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("gpus", "Gt", &["8"])),
            NONE,
            &n
        ));
        assert!(is_candidate(
            &one(requirement("gpus", "Lt", &["9"])),
            NONE,
            &n
        ));
        // Non-numeric labels or bounds, or several bounds, never match Gt/Lt.
        assert!(!is_candidate(
            &one(requirement("arch", "Gt", &["1"])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("gpus", "Gt", &["x"])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("gpus", "Gt", &["1", "2"])),
            NONE,
            &n
        ));
        assert!(!is_candidate(
            &one(requirement("arch", "Bogus", &["amd64"])),
            NONE,
            &n
        ));
    }

    #[test]
    fn empty_terms_match_nothing_and_match_fields_select_by_name() {
        assert!(!is_candidate(
            &affinity(vec![term(vec![])]),
            NONE,
            &node(&[], &[])
        ));
        assert!(!is_candidate(&affinity(vec![]), NONE, &node(&[], &[])));
        let by_name = |op: &str, key: &str| {
            affinity(vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![requirement(key, op, &["node-a"])]),
            }])
        };
        assert!(is_candidate(
            &by_name("In", "metadata.name"),
            NONE,
            &node(&[], &[])
        ));
        assert!(!is_candidate(
            &by_name("NotIn", "metadata.name"),
            NONE,
            &node(&[], &[])
        ));
        assert!(!is_candidate(
            &by_name("In", "spec.podCIDR"),
            NONE,
            &node(&[], &[])
        ));
    }

    #[test]
    fn untolerated_hard_taints_exclude_a_node_soft_ones_do_not() {
        let pods = PodScheduling::default();
        assert!(!is_candidate(
            &pods,
            NONE,
            &node(&[], &[("nvidia.com/gpu", "present", "NoSchedule")])
        ));
        assert!(!is_candidate(
            &pods,
            NONE,
            &node(&[], &[("dedicated", "x", "NoExecute")])
        ));
        assert!(is_candidate(
            &pods,
            NONE,
            &node(&[], &[("dedicated", "x", "PreferNoSchedule")])
        ));
    }

    #[test]
    fn tolerations_follow_kubernetes_matching() {
        let gpu = node(&[], &[("nvidia.com/gpu", "present", "NoSchedule")]);
        let with = |t: Toleration| PodScheduling {
            tolerations: vec![t],
            ..PodScheduling::default()
        };
        assert!(is_candidate(
            &with(toleration("nvidia.com/gpu", "Exists", "", "")),
            NONE,
            &gpu
        ));
        assert!(is_candidate(
            &with(toleration(
                "nvidia.com/gpu",
                "Equal",
                "present",
                "NoSchedule"
            )),
            NONE,
            &gpu
        ));
        // The operator defaults to Equal.
        assert!(is_candidate(
            &with(toleration("nvidia.com/gpu", "", "present", "")),
            NONE,
            &gpu
        ));
        assert!(!is_candidate(
            &with(toleration("nvidia.com/gpu", "Equal", "absent", "")),
            NONE,
            &gpu
        ));
        assert!(!is_candidate(
            &with(toleration("nvidia.com/gpu", "Exists", "", "NoExecute")),
            NONE,
            &gpu
        ));
        // An empty key with Exists tolerates everything.
        assert!(is_candidate(
            &with(toleration("", "Exists", "", "")),
            NONE,
            &gpu
        ));
        assert!(!is_candidate(
            &with(toleration("other", "Exists", "", "")),
            NONE,
            &gpu
        ));
        assert!(!is_candidate(
            &with(toleration("nvidia.com/gpu", "Lt", "1", "")),
            NONE,
            &gpu
        ));
    }

    #[test]
    fn every_taint_needs_its_own_toleration() {
        let n = node(&[], &[("a", "", "NoSchedule"), ("b", "", "NoSchedule")]);
        let one = PodScheduling {
            tolerations: vec![toleration("a", "Exists", "", "")],
            ..PodScheduling::default()
        };
        assert!(!is_candidate(&one, NONE, &n));
        let both = PodScheduling {
            tolerations: vec![
                toleration("a", "Exists", "", ""),
                toleration("b", "Exists", "", ""),
            ],
            ..PodScheduling::default()
        };
        assert!(is_candidate(&both, NONE, &n));
    }

    #[test]
    fn starting_up_taints_do_not_exclude_a_node() {
        let starting = node(
            &[],
            &[
                (stoker_crds::warm_gate::STARTUP_TAINT_KEY, "", "NoSchedule"),
                (
                    "startup-taint.cluster-autoscaler.kubernetes.io/gpu-driver",
                    "",
                    "NoSchedule",
                ),
                ("node.kubernetes.io/not-ready", "", "NoSchedule"),
                ("node.kubernetes.io/network-unavailable", "", "NoSchedule"),
                (
                    "node.cloudprovider.kubernetes.io/uninitialized",
                    "true",
                    "NoSchedule",
                ),
            ],
        );
        assert!(is_candidate(&PodScheduling::default(), NONE, &starting));
    }

    #[test]
    fn cordoned_nodes_are_excluded_unless_tolerated() {
        let mut cordoned = node(&[], &[]);
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert!(!is_candidate(&PodScheduling::default(), NONE, &cordoned));
        let tolerant = PodScheduling {
            tolerations: vec![toleration(UNSCHEDULABLE_TAINT, "Exists", "", "NoSchedule")],
            ..PodScheduling::default()
        };
        assert!(is_candidate(&tolerant, NONE, &cordoned));
    }

    #[test]
    fn constraints_are_read_from_a_pod_spec() {
        let spec = PodSpec {
            node_selector: Some(selector(&[("gpu", "yes")])),
            tolerations: Some(vec![toleration("nvidia.com/gpu", "Exists", "", "")]),
            affinity: Some(Affinity {
                node_affinity: Some(NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                        node_selector_terms: vec![term(vec![requirement("zone", "In", &["z1"])])],
                    }),
                    ..NodeAffinity::default()
                }),
                ..Affinity::default()
            }),
            ..PodSpec::default()
        };
        let pods = PodScheduling::from_pod_spec(&spec);
        let good = node(
            &[("gpu", "yes"), ("zone", "z1")],
            &[("nvidia.com/gpu", "present", "NoSchedule")],
        );
        assert!(is_candidate(&pods, NONE, &good));
        let wrong_zone = node(&[("gpu", "yes"), ("zone", "z2")], &[]);
        assert!(!is_candidate(&pods, NONE, &wrong_zone));
    }
}
