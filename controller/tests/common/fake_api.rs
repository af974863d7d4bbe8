//! A stateful, in-process Kubernetes API server for tests that run the whole
//! controller ([`stoker_controller::run`]) without a cluster.
//!
//! Several kube [`Client`]s (one per controller replica, see
//! [`FakeApi::client`]) share one store, so replicas really race: every
//! object has a `resourceVersion`, a replace or patch carrying a stale one is
//! answered 409 Conflict, a create of an existing name 409 AlreadyExists.
//!
//! What it serves, for any resource (core `/api/v1/...` and `/apis/g/v/...`,
//! namespaced or cluster-scoped, main resource and `/status`):
//! - GET of one object (404 NotFound), LIST (namespace and equality-based
//!   label selectors; metadata-only when the client asks for
//!   `PartialObjectMetadataList`), WATCH from a resourceVersion (the changes
//!   after it are replayed from the store's history, then streamed);
//! - POST (create; `generateName` honoured), PUT (replace), PATCH (JSON merge
//!   patch; strategic merge patch treated as a merge patch; JSON patch with
//!   add/replace/remove/test; server-side apply treated as "replace every
//!   top-level field the patch names", which is what a forced apply of a
//!   whole `status` does), DELETE (finalizers respected).
//!
//! Not modelled: admission, field managers and apply conflicts, defaulting,
//! schema validation, pagination, bookmarks. Writes to `/status` change only
//! `status`; writes to the main resource keep the stored `status`.
//!
//! Every request is recorded ([`FakeApi::requests`]) with the client that made
//! it, in the order it took effect, and the object as stored after each
//! successful write. The requests of one client can be held
//! ([`FakeApi::set_held`]): they are neither answered nor applied until
//! released, as when the network path from a replica to the API server is
//! cut and later heals (its open watches keep delivering).

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{Method, Request, Response, StatusCode};
use hyper::body::{Body as HttpBody, Bytes, Frame};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::client::Body;
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The client name of requests made through [`FakeApi`]'s own helpers.
pub const TEST_CLIENT: &str = "test";

/// One request, as the fake API server answered it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Order in which requests took effect (starts at 1).
    pub seq: u64,
    /// Who made it (the name given to [`FakeApi::client`]).
    pub client: String,
    pub method: Method,
    /// `group/version/plural`, e.g. `coordination.k8s.io/v1/leases`, `v1/nodes`.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub watch: bool,
    pub status: u16,
    /// When it took effect, on the monotonic and on the wall clock.
    pub at: Instant,
    pub wall: Timestamp,
    /// The object as stored after a successful write.
    pub stored: Option<Value>,
}

impl RecordedRequest {
    /// A request that changes state (anything but GET).
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }

    pub fn succeeded(&self) -> bool {
        self.status < 300
    }

    pub fn is_resource(&self, resource: &str) -> bool {
        self.resource == resource
    }
}

/// See the module documentation. Clones share the same store.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    /// Clients whose requests are held.
    held: Arc<watch::Sender<HashSet<String>>>,
}

impl Default for FakeApi {
    fn default() -> Self {
        FakeApi {
            state: Arc::default(),
            held: Arc::new(watch::Sender::new(HashSet::new())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct ObjectKey {
    resource: String,
    namespace: Option<String>,
    name: String,
}

/// One change, kept forever so that a watch from any resourceVersion can be
/// replayed (tests are small).
struct Change {
    resource_version: u64,
    key: ObjectKey,
    kind: &'static str,
    object: Value,
}

struct Watch {
    client: String,
    resource: String,
    namespace: Option<String>,
    selector: Selector,
    metadata_only: bool,
    sender: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    resource_version: u64,
    uids: u64,
    objects: BTreeMap<ObjectKey, Value>,
    history: Vec<Change>,
    watches: Vec<Watch>,
    requests: Vec<RecordedRequest>,
    /// (client, method, path) of every request that arrived while held.
    held: Vec<(String, Method, String)>,
}

/// What a request path names.
struct Target {
    resource: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// An answer: an error Status, or a JSON object, or a watch stream.
enum Answer {
    Json(StatusCode, Value),
    Watch(mpsc::UnboundedReceiver<Bytes>),
}

fn status_error(code: StatusCode, reason: &str, message: String) -> Answer {
    Answer::Json(
        code,
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code.as_u16()
        }),
    )
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A kube client whose requests this server answers, recorded under
    /// `who`. Must be called inside a tokio runtime (kube's client spawns its
    /// request buffer there); its requests are then served on that runtime.
    pub fn client(&self, who: &str) -> Client {
        let api = self.clone();
        let who = who.to_string();
        let service = tower::service_fn(move |request: Request<Body>| {
            let (api, who) = (api.clone(), who.clone());
            async move {
                let (parts, body) = request.into_parts();
                let body = body.collect_bytes().await.unwrap_or_default();
                // Held: the request arrives when its client is released.
                let mut held = api.held.subscribe();
                if held.borrow().contains(&who) {
                    api.lock().held.push((
                        who.clone(),
                        parts.method.clone(),
                        parts.uri.path().to_string(),
                    ));
                }
                let _ = held.wait_for(|held| !held.contains(&who)).await;
                let accept = parts
                    .headers
                    .get(http::header::ACCEPT)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let content_type = parts
                    .headers
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let answer = api.handle(
                    &who,
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or_default(),
                    &accept,
                    &content_type,
                    &body,
                );
                Ok::<_, Infallible>(into_response(answer))
            }
        });
        Client::new(service, "default")
    }

    /// Holds the requests of `who` (unanswered, unapplied), or releases
    /// them: the held ones then take effect, in the order they were made.
    pub fn set_held(&self, who: &str, held: bool) {
        self.held.send_modify(|set| {
            if held {
                set.insert(who.to_string());
            } else {
                set.remove(who);
            }
        });
    }

    /// Every request answered so far, in the order they took effect.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.lock().requests.clone()
    }

    /// (client, method, path) of every request that arrived while its client
    /// was held, whether or not it was answered later.
    pub fn held_requests(&self) -> Vec<(String, Method, String)> {
        self.lock().held.clone()
    }

    /// The sequence number the next request will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().requests.len() as u64 + 1
    }

    /// Creates an object as the test (client [`TEST_CLIENT`]); panics if the
    /// server refuses it.
    pub fn create<K>(&self, object: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let path = K::url_path(&(), object.meta().namespace.as_deref());
        let body = serde_json::to_vec(object).expect("serialize");
        match self.handle(
            TEST_CLIENT,
            &Method::POST,
            &path,
            "",
            "application/json",
            "application/json",
            &body,
        ) {
            Answer::Json(code, value) if code.is_success() => {
                serde_json::from_value(value).expect("created object")
            }
            Answer::Json(code, value) => panic!("create {path}: {code}: {value}"),
            Answer::Watch(_) => unreachable!("a create is not a watch"),
        }
    }

    /// Replaces an object (a PUT carrying its resourceVersion) as the test;
    /// panics if the server refuses it.
    pub fn replace<K>(&self, object: &K) -> K
    where
        K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
    {
        let meta = object.meta();
        let path = format!(
            "{}/{}",
            K::url_path(&(), meta.namespace.as_deref()),
            meta.name.as_deref().unwrap_or_default()
        );
        let body = serde_json::to_vec(object).expect("serialize");
        match self.handle(
            TEST_CLIENT,
            &Method::PUT,
            &path,
            "",
            "application/json",
            "application/json",
            &body,
        ) {
            Answer::Json(code, value) if code.is_success() => {
                serde_json::from_value(value).expect("replaced object")
            }
            Answer::Json(code, value) => panic!("replace {path}: {code}: {value}"),
            Answer::Watch(_) => unreachable!("a replace is not a watch"),
        }
    }

    /// Sets an object's `status` (a merge patch of `/status`) as the test.
    pub fn patch_status<K>(&self, namespace: Option<&str>, name: &str, status: &impl Serialize)
    where
        K: Resource<DynamicType = ()>,
    {
        let path = format!("{}/{name}/status", K::url_path(&(), namespace));
        let body = serde_json::to_vec(&json!({ "status": status })).expect("serialize");
        match self.handle(
            TEST_CLIENT,
            &Method::PATCH,
            &path,
            "",
            "application/json",
            "application/merge-patch+json",
            &body,
        ) {
            Answer::Json(code, _) if code.is_success() => {}
            Answer::Json(code, value) => panic!("patch {path}: {code}: {value}"),
            Answer::Watch(_) => unreachable!("a patch is not a watch"),
        }
    }

    /// The stored object, if any.
    pub fn get<K>(&self, namespace: Option<&str>, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let key = ObjectKey {
            resource: resource_of::<K>(),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        };
        let value = self.lock().objects.get(&key).cloned()?;
        Some(serde_json::from_value(value).expect("stored object deserializes"))
    }

    /// Answers one request. Applies its effect, records it, and notifies
    /// watches, all under one lock, so the recorded order is the real one.
    #[allow(clippy::too_many_arguments)]
    fn handle(
        &self,
        who: &str,
        method: &Method,
        path: &str,
        query: &str,
        accept: &str,
        content_type: &str,
        body: &[u8],
    ) -> Answer {
        let query = parse_query(query);
        let mut state = self.lock();
        let Some(target) = parse_path(path) else {
            return status_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no such path {path}"),
            );
        };
        let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
        let body: Option<Value> = if body.is_empty() {
            None
        } else {
            match serde_json::from_slice(body) {
                Ok(v) => Some(v),
                Err(e) => {
                    return status_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("body is not JSON: {e}"),
                    );
                }
            }
        };
        let answer = state.answer(
            who,
            method,
            &target,
            &query,
            watch,
            accept,
            content_type,
            body,
        );
        let (status, stored) = match &answer {
            Answer::Json(code, value) => (
                code.as_u16(),
                (*method != Method::GET && code.is_success()).then(|| value.clone()),
            ),
            Answer::Watch(_) => (200, None),
        };
        let seq = state.requests.len() as u64 + 1;
        state.requests.push(RecordedRequest {
            seq,
            client: who.to_string(),
            method: method.clone(),
            resource: target.resource,
            namespace: target.namespace,
            name: target.name,
            subresource: target.subresource,
            watch,
            status,
            at: Instant::now(),
            wall: Timestamp::now(),
            stored,
        });
        answer
    }
}

/// `group/version/plural` of a resource type, as [`parse_path`] names it.
pub fn resource_of<K: Resource<DynamicType = ()>>() -> String {
    format!("{}/{}", K::api_version(&()), K::plural(&()))
}

impl State {
    #[allow(clippy::too_many_arguments)]
    fn answer(
        &mut self,
        who: &str,
        method: &Method,
        target: &Target,
        query: &BTreeMap<String, String>,
        watch: bool,
        accept: &str,
        content_type: &str,
        body: Option<Value>,
    ) -> Answer {
        let metadata_only = accept.contains("as=PartialObjectMetadata");
        let key = target.name.as_ref().map(|name| ObjectKey {
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            name: name.clone(),
        });
        match (method.clone(), key) {
            (Method::GET, Some(key)) => match self.objects.get(&key) {
                Some(object) => Answer::Json(StatusCode::OK, object.clone()),
                None => not_found(&key),
            },
            (Method::GET, None) => {
                let selector =
                    match Selector::parse(query.get("labelSelector").map_or("", String::as_str)) {
                        Ok(s) => s,
                        Err(message) => {
                            return status_error(StatusCode::BAD_REQUEST, "BadRequest", message);
                        }
                    };
                if watch {
                    self.start_watch(who, target, selector, metadata_only, query)
                } else {
                    self.list(target, &selector, metadata_only)
                }
            }
            (Method::POST, None) => match body {
                Some(object) => self.create(target, object),
                None => status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body".into()),
            },
            (Method::PUT, Some(key)) => match body {
                Some(object) => self.replace(&key, target.subresource.as_deref(), object),
                None => status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body".into()),
            },
            (Method::PATCH, Some(key)) => match body {
                Some(patch) => self.patch(&key, target.subresource.as_deref(), content_type, patch),
                None => status_error(StatusCode::BAD_REQUEST, "BadRequest", "no body".into()),
            },
            (Method::DELETE, Some(key)) => self.delete(&key),
            (method, _) => status_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{method} is not served here"),
            ),
        }
    }

    fn list(&self, target: &Target, selector: &Selector, metadata_only: bool) -> Answer {
        let items: Vec<Value> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                k.resource == target.resource
                    && (target.namespace.is_none() || k.namespace == target.namespace)
                    && selector.matches(v)
            })
            .map(|(_, v)| {
                if metadata_only {
                    metadata_of(v)
                } else {
                    v.clone()
                }
            })
            .collect();
        let (api_version, kind) = if metadata_only {
            ("meta.k8s.io/v1".to_string(), "PartialObjectMetadataList")
        } else {
            (group_version(&target.resource), "List")
        };
        Answer::Json(
            StatusCode::OK,
            json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": self.resource_version.to_string()},
                "items": items,
            }),
        )
    }

    fn start_watch(
        &mut self,
        who: &str,
        target: &Target,
        selector: Selector,
        metadata_only: bool,
        query: &BTreeMap<String, String>,
    ) -> Answer {
        let (sender, receiver) = mpsc::unbounded_channel();
        let watch = Watch {
            client: who.to_string(),
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            selector,
            metadata_only,
            sender,
        };
        let from: u64 = query
            .get("resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if from == 0 {
            // "Any": the current state as ADDED events, then changes.
            for (key, object) in &self.objects {
                watch.send(key, "ADDED", object);
            }
        } else {
            for change in self.history.iter().filter(|c| c.resource_version > from) {
                watch.send(&change.key, change.kind, &change.object);
            }
        }
        self.watches.push(watch);
        Answer::Watch(receiver)
    }

    fn create(&mut self, target: &Target, mut object: Value) -> Answer {
        let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) else {
            return status_error(StatusCode::BAD_REQUEST, "BadRequest", "no metadata".into());
        };
        if let Some(namespace) = &target.namespace {
            meta.insert("namespace".into(), json!(namespace));
        }
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) => name.to_string(),
            None => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) => format!("{prefix}{:05}", self.uids + 1),
                None => {
                    return status_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        "metadata.name or generateName is required".into(),
                    );
                }
            },
        };
        meta.insert("name".into(), json!(name));
        let key = ObjectKey {
            resource: target.resource.clone(),
            namespace: target.namespace.clone(),
            name,
        };
        if self.objects.contains_key(&key) {
            return status_error(
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!(
                    "{} {:?}/{} already exists",
                    key.resource, key.namespace, key.name
                ),
            );
        }
        self.uids += 1;
        meta.insert("uid".into(), json!(format!("fake-uid-{}", self.uids)));
        meta.insert("generation".into(), json!(1));
        meta.insert(
            "creationTimestamp".into(),
            serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null),
        );
        meta.remove("resourceVersion");
        // As for a resource with a status subresource: status is not created.
        if let Some(o) = object.as_object_mut() {
            o.remove("status");
        }
        let stored = self.store(key, "ADDED", object);
        Answer::Json(StatusCode::CREATED, stored)
    }

    fn replace(&mut self, key: &ObjectKey, subresource: Option<&str>, object: Value) -> Answer {
        let Some(current) = self.objects.get(key).cloned() else {
            return not_found(key);
        };
        if let Some(conflict) = stale(&current, &object, key) {
            return conflict;
        }
        self.update(key, subresource, current, object)
    }

    fn patch(
        &mut self,
        key: &ObjectKey,
        subresource: Option<&str>,
        content_type: &str,
        patch: Value,
    ) -> Answer {
        let apply = content_type.starts_with("application/apply-patch");
        let current = match self.objects.get(key).cloned() {
            Some(current) => current,
            None if apply && subresource.is_none() => {
                let target = Target {
                    resource: key.resource.clone(),
                    namespace: key.namespace.clone(),
                    name: None,
                    subresource: None,
                };
                let mut object = patch;
                if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
                    meta.insert("name".into(), json!(key.name));
                }
                return self.create(&target, object);
            }
            None => return not_found(key),
        };
        if let Some(conflict) = stale(&current, &patch, key) {
            return conflict;
        }
        let mut patched = current.clone();
        if apply {
            for (field, value) in patch.as_object().into_iter().flatten() {
                match field.as_str() {
                    "apiVersion" | "kind" => {}
                    "metadata" => merge_patch(&mut patched["metadata"], value),
                    _ => patched[field] = value.clone(),
                }
            }
        } else if content_type.starts_with("application/json-patch") {
            if let Err(message) = json_patch(&mut patched, &patch) {
                return status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", message);
            }
        } else {
            // Merge patch; a strategic merge patch is treated as one.
            merge_patch(&mut patched, &patch);
        }
        self.update(key, subresource, current, patched)
    }

    /// Stores `new` over `current`: `/status` writes change only `status`,
    /// main-resource writes keep the stored `status`; identity fields are
    /// the server's; `generation` moves when `spec` changes.
    fn update(
        &mut self,
        key: &ObjectKey,
        subresource: Option<&str>,
        current: Value,
        new: Value,
    ) -> Answer {
        let mut object = current.clone();
        match subresource {
            Some("status") => match new.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    if let Some(o) = object.as_object_mut() {
                        o.remove("status");
                    }
                }
            },
            Some(other) => {
                return status_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("subresource {other} is not served"),
                );
            }
            None => {
                object = new;
                match current.get("status") {
                    Some(status) => object["status"] = status.clone(),
                    None => {
                        if let Some(o) = object.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                for field in ["uid", "creationTimestamp", "namespace", "name"] {
                    object["metadata"][field] = current["metadata"][field].clone();
                }
                let generation = current["metadata"]["generation"].as_i64().unwrap_or(1);
                let spec_changed = current.get("spec") != object.get("spec");
                object["metadata"]["generation"] = json!(generation + i64::from(spec_changed));
            }
        }
        let deleting = object["metadata"].get("deletionTimestamp").is_some();
        let finalizers_left = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if deleting && !finalizers_left {
            self.objects.remove(key);
            let stored = self.record(key.clone(), "DELETED", object);
            return Answer::Json(StatusCode::OK, stored);
        }
        let stored = self.store(key.clone(), "MODIFIED", object);
        Answer::Json(StatusCode::OK, stored)
    }

    fn delete(&mut self, key: &ObjectKey) -> Answer {
        let Some(mut object) = self.objects.get(key).cloned() else {
            return not_found(key);
        };
        let has_finalizers = object["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            if object["metadata"].get("deletionTimestamp").is_none() {
                object["metadata"]["deletionTimestamp"] =
                    serde_json::to_value(Time(Timestamp::now())).unwrap_or(Value::Null);
                let stored = self.store(key.clone(), "MODIFIED", object);
                return Answer::Json(StatusCode::OK, stored);
            }
            return Answer::Json(StatusCode::OK, object);
        }
        self.objects.remove(key);
        let stored = self.record(key.clone(), "DELETED", object);
        Answer::Json(StatusCode::OK, stored)
    }

    /// Stamps a new resourceVersion, stores, records and notifies.
    fn store(&mut self, key: ObjectKey, kind: &'static str, object: Value) -> Value {
        let stored = self.record(key.clone(), kind, object);
        self.objects.insert(key, stored.clone());
        stored
    }

    fn record(&mut self, key: ObjectKey, kind: &'static str, mut object: Value) -> Value {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
        self.watches.retain(|w| w.notify(&key, kind, &object));
        self.history.push(Change {
            resource_version: self.resource_version,
            key,
            kind,
            object: object.clone(),
        });
        object
    }
}

impl Watch {
    fn wants(&self, key: &ObjectKey, object: &Value) -> bool {
        key.resource == self.resource
            && (self.namespace.is_none() || key.namespace == self.namespace)
            && self.selector.matches(object)
    }

    /// Sends the event if the watch wants it; false once the client is gone.
    fn notify(&self, key: &ObjectKey, kind: &str, object: &Value) -> bool {
        !self.wants(key, object) || self.send_line(kind, object)
    }

    fn send(&self, key: &ObjectKey, kind: &str, object: &Value) {
        if self.wants(key, object) {
            self.send_line(kind, object);
        }
    }

    fn send_line(&self, kind: &str, object: &Value) -> bool {
        let object = if self.metadata_only {
            metadata_of(object)
        } else {
            object.clone()
        };
        let mut line =
            serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
        line.push(b'\n');
        self.sender.send(Bytes::from(line)).is_ok()
    }
}

fn not_found(key: &ObjectKey) -> Answer {
    status_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!(
            "{} {:?}/{} not found",
            key.resource, key.namespace, key.name
        ),
    )
}

/// 409 Conflict if `write` carries a resourceVersion other than `current`'s.
fn stale(current: &Value, write: &Value, key: &ObjectKey) -> Option<Answer> {
    let wanted = write["metadata"]["resourceVersion"].as_str()?;
    let have = current["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or_default();
    (wanted != have).then(|| {
        status_error(
            StatusCode::CONFLICT,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} {:?}/{}: the object has been modified \
                 (resourceVersion {wanted} is stale, current is {have})",
                key.resource, key.namespace, key.name
            ),
        )
    })
}

/// The PartialObjectMetadata view of an object.
fn metadata_of(object: &Value) -> Value {
    json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": object.get("metadata").cloned().unwrap_or(Value::Null),
    })
}

fn group_version(resource: &str) -> String {
    resource
        .rsplit_once('/')
        .map_or(String::new(), |(gv, _)| gv.to_string())
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Some(patch) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Some(target) = target.as_object_mut() {
        for (k, v) in patch {
            if v.is_null() {
                target.remove(k);
            } else {
                merge_patch(target.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// RFC 6902 JSON patch: add, replace, remove and test (what kube-runtime's
/// finalizer helper sends).
fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let mut result = target.clone();
    for op in patch.as_array().ok_or("a JSON patch is an array")? {
        let path = op["path"].as_str().ok_or("op without path")?;
        let (parent, last) = match path.rsplit_once('/') {
            Some((parent, last)) => (parent, last.replace("~1", "/").replace("~0", "~")),
            None => return Err(format!("bad path {path:?}")),
        };
        match op["op"].as_str() {
            Some("test") => {
                if result.pointer(path) != Some(&op["value"]) {
                    return Err(format!("test of {path} failed"));
                }
            }
            Some("remove") => {
                let container = result.pointer_mut(parent).ok_or(format!("no {parent}"))?;
                match container {
                    Value::Object(o) => {
                        o.remove(&last).ok_or(format!("no {path}"))?;
                    }
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index {path}"))?;
                        if i >= a.len() {
                            return Err(format!("no {path}"));
                        }
                        a.remove(i);
                    }
                    _ => return Err(format!("{parent} is not a container")),
                }
            }
            Some(kind @ ("add" | "replace")) => {
                let value = op["value"].clone();
                let container = result.pointer_mut(parent).ok_or(format!("no {parent}"))?;
                match container {
                    Value::Object(o) => {
                        if kind == "replace" && !o.contains_key(&last) {
                            return Err(format!("no {path} to replace"));
                        }
                        o.insert(last, value);
                    }
                    Value::Array(a) if last == "-" && kind == "add" => a.push(value),
                    Value::Array(a) => {
                        let i: usize = last.parse().map_err(|_| format!("bad index {path}"))?;
                        match kind {
                            "add" if i <= a.len() => a.insert(i, value),
                            "replace" if i < a.len() => a[i] = value,
                            _ => return Err(format!("index out of range: {path}")),
                        }
                    }
                    _ => return Err(format!("{parent} is not a container")),
                }
            }
            other => return Err(format!("unsupported op {other:?}")),
        }
    }
    *target = result;
    Ok(())
}

/// `/api/v1/[namespaces/NS/]PLURAL[/NAME[/SUB]]` or the same under
/// `/apis/GROUP/VERSION/`.
fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => (version.to_string(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", namespace, rest @ ..] if !rest.is_empty() => {
            (Some(namespace.to_string()), rest)
        }
        _ => (None, rest),
    };
    let (plural, rest) = rest.split_first()?;
    Some(Target {
        resource: format!("{group_version}/{plural}"),
        namespace,
        name: rest.first().map(|s| s.to_string()),
        subresource: rest.get(1).map(|s| s.to_string()),
    })
}

fn parse_query(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'+', _, _) => out.push(b' '),
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 2;
            }
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An equality-based label selector: `k=v`, `k==v`, `k!=v`, `k`, `!k`.
#[derive(Default)]
struct Selector(Vec<(String, Requirement)>);

enum Requirement {
    Equals(String),
    NotEquals(String),
    Exists,
    NotExists,
}

impl Selector {
    fn parse(text: &str) -> Result<Selector, String> {
        let mut requirements = Vec::new();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let requirement = if let Some((k, v)) = term.split_once("!=") {
                (k, Requirement::NotEquals(v.into()))
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k, Requirement::Equals(v.into()))
            } else if let Some(k) = term.strip_prefix('!') {
                (k, Requirement::NotExists)
            } else if term.contains(' ') || term.contains('(') {
                return Err(format!("set-based selector {term:?} is not served"));
            } else {
                (term, Requirement::Exists)
            };
            requirements.push((requirement.0.trim().to_string(), requirement.1));
        }
        Ok(Selector(requirements))
    }

    fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|(key, requirement)| {
            let value = labels.get(key).and_then(Value::as_str);
            match requirement {
                Requirement::Equals(v) => value == Some(v.as_str()),
                Requirement::NotEquals(v) => value != Some(v.as_str()),
                Requirement::Exists => value.is_some(),
                Requirement::NotExists => value.is_none(),
            }
        })
    }
}

fn into_response(answer: Answer) -> Response<FakeBody> {
    let (status, body) = match answer {
        Answer::Json(status, value) => (
            status,
            FakeBody::Full(Some(Bytes::from(
                serde_json::to_vec(&value).unwrap_or_default(),
            ))),
        ),
        Answer::Watch(receiver) => (StatusCode::OK, FakeBody::Stream(receiver)),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// A response body: one JSON document, or watch events as they happen.
enum FakeBody {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl HttpBody for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Stream(receiver) => receiver
                .poll_recv(cx)
                .map(|line| line.map(|b| Ok(Frame::data(b)))),
        }
    }
}
