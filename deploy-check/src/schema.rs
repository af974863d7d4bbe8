//! Schema checks: every rendered object must parse into its typed struct
//! (k8s-openapi for Kubernetes kinds, small local structs for cert-manager and
//! the Prometheus Operator), and every field it carries must survive the round
//! trip. The typed structs ignore unknown fields when they deserialize, so a
//! field that is missing after serializing back is a field Kubernetes would not
//! know: `mountPropogation`, a `port` under the wrong parent, and so on.

use k8s_openapi::api::{
    admissionregistration::v1 as admission, apps::v1 as apps, batch::v1 as batch, core::v1 as core,
    node::v1 as node, policy::v1 as policy, rbac::v1 as rbac,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DeployCheckError, object_id};

/// Checks one object against the schema of its `apiVersion` and `kind`.
pub fn validate(object: &Value) -> Result<(), DeployCheckError> {
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let result = match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<core::Namespace>(object),
        ("v1", "ServiceAccount") => round_trip::<core::ServiceAccount>(object),
        ("v1", "ConfigMap") => round_trip::<core::ConfigMap>(object),
        ("v1", "Secret") => round_trip::<core::Secret>(object),
        ("v1", "Service") => round_trip::<core::Service>(object),
        ("apps/v1", "DaemonSet") => round_trip::<apps::DaemonSet>(object),
        ("apps/v1", "Deployment") => round_trip::<apps::Deployment>(object),
        ("batch/v1", "Job") => round_trip::<batch::Job>(object),
        ("batch/v1", "CronJob") => round_trip::<batch::CronJob>(object),
        ("policy/v1", "PodDisruptionBudget") => round_trip::<policy::PodDisruptionBudget>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<rbac::ClusterRole>(object),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<rbac::ClusterRoleBinding>(object)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::Role>(object),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<rbac::RoleBinding>(object),
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => {
            round_trip::<admission::ValidatingAdmissionPolicy>(object)
        }
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => {
            round_trip::<admission::ValidatingAdmissionPolicyBinding>(object)
        }
        ("node.k8s.io/v1", "RuntimeClass") => round_trip::<node::RuntimeClass>(object),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<CustomResourceDefinition>(object)
        }
        ("cert-manager.io/v1", "Issuer") => round_trip::<cert_manager::Issuer>(object),
        ("cert-manager.io/v1", "Certificate") => round_trip::<cert_manager::Certificate>(object),
        ("monitoring.coreos.com/v1", "ServiceMonitor") => {
            round_trip::<prometheus::ServiceMonitor>(object)
        }
        _ => Err(format!(
            "no schema known for {api_version} {kind}; add its type to deploy-check/src/schema.rs"
        )),
    };
    result.map_err(|message| DeployCheckError::Schema {
        object: object_id(object),
        message,
    })
}

/// Parses `object` as `T` and reports every field lost or changed on the way
/// back to JSON.
fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<(), String> {
    let typed: T = serde_json::from_value(object.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    compare("", object, &back, &mut problems);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

fn compare(path: &str, original: &Value, back: &Value, problems: &mut Vec<String>) {
    match (original, back) {
        (Value::Object(original), Value::Object(back)) => {
            for (key, value) in original {
                let child = format!("{path}.{key}");
                match back.get(key) {
                    Some(round_tripped) => compare(&child, value, round_tripped, problems),
                    None if value.is_null() => {}
                    None => problems.push(format!("unknown field {child}")),
                }
            }
        }
        (Value::Array(original), Value::Array(back)) if original.len() == back.len() => {
            for (index, (value, round_tripped)) in original.iter().zip(back).enumerate() {
                compare(&format!("{path}[{index}]"), value, round_tripped, problems);
            }
        }
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        (a, b) if a == b => {}
        (a, b) => problems.push(format!("{path}: {a} is read as {b}")),
    }
}

/// The cert-manager kinds of overlays/cert-manager, with the fields Stoker uses
/// (cert-manager.io/v1 API reference); anything else is refused.
pub mod cert_manager {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Issuer {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: IssuerSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerSpec {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub self_signed: Option<Empty>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub ca: Option<CaIssuer>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Empty {}

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CaIssuer {
        pub secret_name: String,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Certificate {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: CertificateSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct CertificateSpec {
        pub secret_name: String,
        pub issuer_ref: IssuerRef,
        #[serde(default, rename = "isCA", skip_serializing_if = "Option::is_none")]
        pub is_ca: Option<bool>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub common_name: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub dns_names: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub uris: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub usages: Option<Vec<Usage>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub duration: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub renew_before: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub private_key: Option<PrivateKey>,
    }

    /// The key usages this project asks for.
    #[derive(Serialize, Deserialize)]
    pub enum Usage {
        #[serde(rename = "digital signature")]
        DigitalSignature,
        #[serde(rename = "server auth")]
        ServerAuth,
        #[serde(rename = "client auth")]
        ClientAuth,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct IssuerRef {
        pub name: String,
        pub kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub group: Option<String>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct PrivateKey {
        pub algorithm: KeyAlgorithm,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub size: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub rotation_policy: Option<RotationPolicy>,
    }

    #[derive(Serialize, Deserialize)]
    pub enum KeyAlgorithm {
        #[serde(rename = "RSA")]
        Rsa,
        #[serde(rename = "ECDSA")]
        Ecdsa,
        Ed25519,
    }

    #[derive(Serialize, Deserialize)]
    pub enum RotationPolicy {
        Always,
        Never,
    }
}

/// The Prometheus Operator's ServiceMonitor, with the fields Stoker uses.
pub mod prometheus {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitor {
        pub api_version: String,
        pub kind: String,
        pub metadata: ObjectMeta,
        pub spec: ServiceMonitorSpec,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct ServiceMonitorSpec {
        pub selector: LabelSelector,
        pub endpoints: Vec<Endpoint>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Endpoint {
        pub port: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub path: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub interval: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub relabelings: Option<Vec<Relabeling>>,
    }

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    pub struct Relabeling {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub source_labels: Option<Vec<String>>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub target_label: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub action: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub regex: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub replacement: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_misspelt_field_is_reported_with_its_path() {
        let object = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "s"},
            "spec": {"selector": {"a": "b"}, "ports": [{"name": "m", "port": 1, "targtPort": "m"}]}
        });
        let error = validate(&object).expect_err("typo");
        assert!(
            error.to_string().contains(".spec.ports[0].targtPort"),
            "{error}"
        );
    }

    #[test]
    fn a_wrong_type_is_reported() {
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "d"},
            "spec": {"replicas": "two", "selector": {}, "template": {}}
        });
        assert!(validate(&object).is_err());
    }

    #[test]
    fn unknown_kinds_are_refused() {
        let object =
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}});
        let error = validate(&object).expect_err("unknown kind");
        assert!(error.to_string().contains("no schema known"), "{error}");
    }

    #[test]
    fn cert_manager_fields_are_checked() {
        let object = json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "c"},
            "spec": {"secretName": "s", "issuerRef": {"name": "i", "kind": "Issuer"}, "dnsName": ["x"]}
        });
        assert!(validate(&object).is_err());
    }
}
