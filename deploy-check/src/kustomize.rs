//! Renders a kustomization the way `kubectl kustomize` does, for the subset of
//! kustomize that `manifests/` uses. Anything outside that subset is an error
//! naming the field, so the manifests cannot quietly grow past what is checked.
//!
//! Supported: `resources` (files, and directories holding a kustomization),
//! `namespace`, `labels` (metadata labels only), `images`, and `patches` given
//! as JSON 6902 operations with a `target`, or as a strategic-merge patch whose
//! only content is `$patch: delete`. Transformers run in kustomize's order:
//! patches, namespace, labels, images.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::{DeployCheckError, object_id};

const KUSTOMIZATION_FILES: &[&str] = &["kustomization.yaml", "kustomization.yml", "Kustomization"];

const SUPPORTED_FIELDS: &[&str] = &[
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "images",
    "patches",
];

/// Kinds that live outside namespaces: the namespace transformer leaves them
/// alone (and renames a Namespace object to the target namespace).
const CLUSTER_SCOPED_KINDS: &[&str] = &[
    "APIService",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "MutatingWebhookConfiguration",
    "Namespace",
    "Node",
    "PersistentVolume",
    "PriorityClass",
    "RuntimeClass",
    "StorageClass",
    "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding",
    "ValidatingWebhookConfiguration",
];

/// Renders the kustomization in `dir` into its objects, in the order they were
/// accumulated.
pub fn render(dir: &Path) -> Result<Vec<Value>, DeployCheckError> {
    let dir = dir
        .canonicalize()
        .map_err(|source| DeployCheckError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
    let objects = build(&dir)?;
    let mut seen = BTreeSet::new();
    for object in &objects {
        let id = format!("{} {}", api_version(object), object_id(object));
        if !seen.insert(id.clone()) {
            return Err(DeployCheckError::Kustomization {
                path: dir.clone(),
                message: format!("object {id} is defined twice"),
            });
        }
    }
    Ok(objects)
}

/// True when `kind` is cluster-scoped.
pub fn is_cluster_scoped(kind: &str) -> bool {
    CLUSTER_SCOPED_KINDS.contains(&kind)
}

fn build(dir: &Path) -> Result<Vec<Value>, DeployCheckError> {
    let (path, kustomization) = read_kustomization(dir)?;
    let bad = |message: String| DeployCheckError::Kustomization {
        path: path.clone(),
        message,
    };
    let Some(fields) = kustomization.as_object() else {
        return Err(bad("not a mapping".into()));
    };
    for key in fields.keys() {
        if !SUPPORTED_FIELDS.contains(&key.as_str()) {
            return Err(bad(format!(
                "field `{key}` is not in the kustomize subset deploy-check renders ({})",
                SUPPORTED_FIELDS.join(", ")
            )));
        }
    }

    let mut objects = Vec::new();
    for entry in string_list(fields.get("resources"), "resources").map_err(bad)? {
        let resource = dir.join(&entry);
        let resource = resource
            .canonicalize()
            .map_err(|source| DeployCheckError::Read {
                path: resource.clone(),
                source,
            })?;
        if resource.is_dir() {
            objects.extend(build(&resource)?);
        } else if resource.starts_with(dir) {
            objects.extend(read_objects(&resource)?);
        } else {
            return Err(bad(format!(
                "resource {entry} is a file outside the kustomization's directory, which kustomize refuses"
            )));
        }
    }

    if let Some(patches) = fields.get("patches") {
        let Some(patches) = patches.as_array() else {
            return Err(bad("`patches` is not a list".into()));
        };
        for patch in patches {
            apply_patch_entry(dir, patch, &mut objects).map_err(|e| match e {
                DeployCheckError::Patch { object, message } => DeployCheckError::Kustomization {
                    path: path.clone(),
                    message: format!("patch on {object}: {message}"),
                },
                other => other,
            })?;
        }
    }
    if let Some(namespace) = fields.get("namespace") {
        let Some(namespace) = namespace.as_str() else {
            return Err(bad("`namespace` is not a string".into()));
        };
        for object in &mut objects {
            set_namespace(object, namespace);
        }
    }
    if let Some(labels) = fields.get("labels") {
        apply_labels(labels, &mut objects).map_err(bad)?;
    }
    if let Some(images) = fields.get("images") {
        apply_images(images, &mut objects).map_err(bad)?;
    }
    Ok(objects)
}

fn read_kustomization(dir: &Path) -> Result<(PathBuf, Value), DeployCheckError> {
    let Some(path) = KUSTOMIZATION_FILES
        .iter()
        .map(|name| dir.join(name))
        .find(|path| path.is_file())
    else {
        return Err(DeployCheckError::Kustomization {
            path: dir.to_path_buf(),
            message: "no kustomization.yaml in this directory".into(),
        });
    };
    let text = std::fs::read_to_string(&path).map_err(|source| DeployCheckError::Read {
        path: path.clone(),
        source,
    })?;
    let value: Value = serde_yaml::from_str(&text).map_err(|source| DeployCheckError::Yaml {
        path: path.clone(),
        source,
    })?;
    Ok((path, value))
}

/// Every YAML document of a file that is not empty.
pub fn read_objects(path: &Path) -> Result<Vec<Value>, DeployCheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| DeployCheckError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_documents(&text).map_err(|source| DeployCheckError::Yaml {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses a multi-document YAML stream; empty documents are skipped.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, serde_yaml::Error> {
    let mut objects = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(objects)
}

fn string_list(value: Option<&Value>, field: &str) -> Result<Vec<String>, String> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Some(items) = value.as_array() else {
        return Err(format!("`{field}` is not a list"));
    };
    items
        .iter()
        .map(|item| {
            item.as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{field}` has a non-string entry {item}"))
        })
        .collect()
}

fn api_version(object: &Value) -> &str {
    object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn str_field<'a>(object: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut value = object;
    for key in path {
        value = value.get(key)?;
    }
    value.as_str()
}

// --- patches -----------------------------------------------------------------

fn apply_patch_entry(
    dir: &Path,
    entry: &Value,
    objects: &mut Vec<Value>,
) -> Result<(), DeployCheckError> {
    let entry_error = |message: String| DeployCheckError::Patch {
        object: "(patch entry)".into(),
        message,
    };
    let text = match (
        entry.get("patch").and_then(Value::as_str),
        entry.get("path").and_then(Value::as_str),
    ) {
        (Some(inline), None) => inline.to_string(),
        (None, Some(file)) => {
            let path = dir.join(file);
            std::fs::read_to_string(&path)
                .map_err(|source| DeployCheckError::Read { path, source })?
        }
        _ => return Err(entry_error("needs exactly one of `patch` or `path`".into())),
    };
    let patch: Value = serde_yaml::from_str(&text)
        .map_err(|e| entry_error(format!("the patch is not valid YAML: {e}")))?;
    match &patch {
        Value::Array(operations) => {
            let target = entry
                .get("target")
                .ok_or_else(|| entry_error("a JSON 6902 patch needs a `target`".into()))?;
            let mut matched = 0;
            for object in objects.iter_mut() {
                if target_matches(target, object) {
                    matched += 1;
                    for operation in operations {
                        apply_json6902(object, operation).map_err(|message| {
                            DeployCheckError::Patch {
                                object: object_id(object),
                                message,
                            }
                        })?;
                    }
                }
            }
            if matched == 0 {
                return Err(entry_error(format!("target {target} matches no object")));
            }
            Ok(())
        }
        Value::Object(fields) => {
            let is_delete = fields.get("$patch").and_then(Value::as_str) == Some("delete");
            let only_identity = fields
                .keys()
                .all(|k| ["apiVersion", "kind", "metadata", "$patch"].contains(&k.as_str()));
            if !is_delete || !only_identity {
                return Err(entry_error(
                    "strategic-merge patches are supported only as `$patch: delete`; use JSON 6902 operations".into(),
                ));
            }
            let before = objects.len();
            objects.retain(|object| !same_identity(&patch, object));
            if objects.len() == before {
                return Err(entry_error(format!(
                    "`$patch: delete` of {} matches no object",
                    object_id(&patch)
                )));
            }
            Ok(())
        }
        _ => Err(entry_error(
            "a patch is a list of operations or a mapping".into(),
        )),
    }
}

fn same_identity(patch: &Value, object: &Value) -> bool {
    str_field(patch, &["kind"]) == str_field(object, &["kind"])
        && str_field(patch, &["metadata", "name"]) == str_field(object, &["metadata", "name"])
        && api_version(patch) == api_version(object)
        && match str_field(patch, &["metadata", "namespace"]) {
            Some(namespace) => str_field(object, &["metadata", "namespace"]) == Some(namespace),
            None => true,
        }
}

fn target_matches(target: &Value, object: &Value) -> bool {
    let (group, version) = match api_version(object).split_once('/') {
        Some((group, version)) => (group, version),
        None => ("", api_version(object)),
    };
    let wanted = |key: &str, actual: Option<&str>| match target.get(key).and_then(Value::as_str) {
        Some(expected) => actual == Some(expected),
        None => true,
    };
    wanted("group", Some(group))
        && wanted("version", Some(version))
        && wanted("kind", str_field(object, &["kind"]))
        && wanted("name", str_field(object, &["metadata", "name"]))
        && wanted("namespace", str_field(object, &["metadata", "namespace"]))
}

/// Applies one RFC 6902 operation (add, remove, replace, test).
pub fn apply_json6902(object: &mut Value, operation: &Value) -> Result<(), String> {
    let op = operation
        .get("op")
        .and_then(Value::as_str)
        .ok_or("operation without `op`")?;
    let path = operation
        .get("path")
        .and_then(Value::as_str)
        .ok_or("operation without `path`")?;
    let tokens = pointer_tokens(path)?;
    let Some((last, parents)) = tokens.split_last() else {
        return Err(format!("{op} on the whole document is not supported"));
    };
    let mut parent = &mut *object;
    for token in parents {
        parent = match parent {
            Value::Object(map) => map.get_mut(token.as_str()),
            Value::Array(items) => token.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("{op} {path}: `{token}` does not exist"))?;
    }
    let value = || {
        operation
            .get("value")
            .cloned()
            .ok_or_else(|| format!("{op} {path}: no `value`"))
    };
    match (op, parent) {
        ("add", Value::Object(map)) => {
            map.insert(last.clone(), value()?);
        }
        ("add", Value::Array(items)) => {
            let index = if last == "-" {
                items.len()
            } else {
                array_index(last, items.len() + 1, op, path)?
            };
            items.insert(index, value()?);
        }
        ("replace", Value::Object(map)) => {
            let slot = map
                .get_mut(last.as_str())
                .ok_or_else(|| format!("replace {path}: nothing to replace"))?;
            *slot = value()?;
        }
        ("replace", Value::Array(items)) => {
            let index = array_index(last, items.len(), op, path)?;
            items[index] = value()?;
        }
        ("remove", Value::Object(map)) => {
            map.remove(last.as_str())
                .ok_or_else(|| format!("remove {path}: nothing to remove"))?;
        }
        ("remove", Value::Array(items)) => {
            let index = array_index(last, items.len(), op, path)?;
            items.remove(index);
        }
        ("test", parent) => {
            let actual = match parent {
                Value::Object(map) => map.get(last.as_str()),
                Value::Array(items) => last.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            if actual != Some(&value()?) {
                return Err(format!("test {path}: value differs"));
            }
        }
        ("add" | "replace" | "remove", _) => {
            return Err(format!(
                "{op} {path}: the parent is not a mapping or a list"
            ));
        }
        (other, _) => return Err(format!("operation `{other}` is not supported")),
    }
    Ok(())
}

fn array_index(token: &str, len: usize, op: &str, path: &str) -> Result<usize, String> {
    match token.parse::<usize>() {
        Ok(index) if index < len => Ok(index),
        _ => Err(format!("{op} {path}: index `{token}` out of range")),
    }
}

fn pointer_tokens(path: &str) -> Result<Vec<String>, String> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(format!("path `{path}` does not start with /"));
    };
    Ok(rest
        .split('/')
        .map(|token| token.replace("~1", "/").replace("~0", "~"))
        .collect())
}

// --- namespace, labels, images -------------------------------------------------

fn set_namespace(object: &mut Value, namespace: &str) {
    let kind = str_field(object, &["kind"]).unwrap_or_default().to_string();
    let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    if kind == "Namespace" {
        metadata.insert("name".into(), Value::String(namespace.into()));
    } else if !is_cluster_scoped(&kind) {
        metadata.insert("namespace".into(), Value::String(namespace.into()));
    }
}

fn apply_labels(labels: &Value, objects: &mut [Value]) -> Result<(), String> {
    let Some(entries) = labels.as_array() else {
        return Err("`labels` is not a list".into());
    };
    for entry in entries {
        for flag in ["includeSelectors", "includeTemplates"] {
            if entry.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(format!("labels with `{flag}: true` are not supported"));
            }
        }
        let Some(pairs) = entry.get("pairs").and_then(Value::as_object) else {
            return Err("a `labels` entry without `pairs`".into());
        };
        for object in objects.iter_mut() {
            let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
                continue;
            };
            let labels = metadata
                .entry("labels")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(labels) = labels.as_object_mut() {
                for (key, value) in pairs {
                    labels.insert(key.clone(), value.clone());
                }
            }
        }
    }
    Ok(())
}

struct ImageRule {
    name: String,
    new_name: Option<String>,
    new_tag: Option<String>,
    digest: Option<String>,
}

fn apply_images(images: &Value, objects: &mut [Value]) -> Result<(), String> {
    let Some(entries) = images.as_array() else {
        return Err("`images` is not a list".into());
    };
    let mut rules = Vec::new();
    for entry in entries {
        let text = |key: &str| entry.get(key).and_then(Value::as_str).map(str::to_string);
        let name = text("name").ok_or("an `images` entry without `name`")?;
        rules.push(ImageRule {
            name,
            new_name: text("newName"),
            new_tag: text("newTag"),
            digest: text("digest"),
        });
    }
    for object in objects.iter_mut() {
        rewrite_images(object, &rules);
    }
    Ok(())
}

/// Rewrites `image` of every container and init container, wherever a pod spec
/// sits in the object (Deployment, DaemonSet, Job, CronJob, ...).
fn rewrite_images(value: &mut Value, rules: &[ImageRule]) {
    match value {
        Value::Object(map) => {
            for (key, child) in map.iter_mut() {
                if key == "containers" || key == "initContainers" {
                    if let Value::Array(containers) = child {
                        for container in containers {
                            if let Some(Value::String(image)) = container.get_mut("image") {
                                *image = rewrite_image(image, rules);
                            }
                        }
                    }
                } else {
                    rewrite_images(child, rules);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite_images(item, rules)),
        _ => {}
    }
}

/// Splits `name[:tag][@digest]`; a colon before the last `/` belongs to a
/// registry port.
pub fn split_image(image: &str) -> (&str, Option<&str>, Option<&str>) {
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    let slash = rest.rfind('/').map_or(0, |i| i + 1);
    match rest[slash..].rfind(':') {
        Some(colon) => (
            &rest[..slash + colon],
            Some(&rest[slash + colon + 1..]),
            digest,
        ),
        None => (rest, None, digest),
    }
}

fn rewrite_image(image: &str, rules: &[ImageRule]) -> String {
    let (name, tag, digest) = split_image(image);
    let Some(rule) = rules.iter().find(|rule| rule.name == name) else {
        return image.to_string();
    };
    let name = rule.new_name.as_deref().unwrap_or(name);
    if let Some(digest) = rule.digest.as_deref() {
        return format!("{name}@{digest}");
    }
    match (rule.new_tag.as_deref().or(tag), digest) {
        (_, Some(digest)) if rule.new_tag.is_none() => format!("{name}@{digest}"),
        (Some(tag), _) => format!("{name}:{tag}"),
        (None, _) => name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn image_names_keep_registry_ports() {
        assert_eq!(
            split_image("localhost:5001/stoker-agent:e2e"),
            ("localhost:5001/stoker-agent", Some("e2e"), None)
        );
        assert_eq!(split_image("stoker-agent"), ("stoker-agent", None, None));
        assert_eq!(
            split_image("r:5000/a/b@sha256:00"),
            ("r:5000/a/b", None, Some("sha256:00"))
        );
    }

    #[test]
    fn json6902_add_replace_remove_test() {
        let mut object = json!({"spec": {"list": [1, 2], "a/b": {"x": 1}}});
        for operation in [
            json!({"op": "add", "path": "/spec/list/-", "value": 3}),
            json!({"op": "add", "path": "/spec/list/0", "value": 0}),
            json!({"op": "replace", "path": "/spec/a~1b/x", "value": 2}),
            json!({"op": "remove", "path": "/spec/list/1"}),
            json!({"op": "test", "path": "/spec/list", "value": [0, 2, 3]}),
            json!({"op": "add", "path": "/spec/new", "value": true}),
        ] {
            apply_json6902(&mut object, &operation).expect("applies");
        }
        assert_eq!(
            object,
            json!({"spec": {"list": [0, 2, 3], "a/b": {"x": 2}, "new": true}})
        );
        let error = apply_json6902(
            &mut object,
            &json!({"op": "replace", "path": "/spec/missing/x", "value": 1}),
        )
        .expect_err("missing parent");
        assert!(error.contains("missing"), "{error}");
        let error = apply_json6902(&mut object, &json!({"op": "move", "path": "/spec/new"}))
            .expect_err("move is not supported");
        assert!(error.contains("move"), "{error}");
    }

    #[test]
    fn unsupported_fields_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            "resources: []\nconfigMapGenerator: []\n",
        )
        .expect("write");
        let error = render(dir.path()).expect_err("generator is outside the subset");
        assert!(error.to_string().contains("configMapGenerator"), "{error}");
    }
}
