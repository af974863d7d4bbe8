//! Warming: which node needs which plan, the pushes to the agents, and their
//! progress.
//!
//! The warmer holds the cluster's Nodes (pruned to name, labels, taints and the
//! warm-target annotation) and, per ImagePrefetch, a [`Target`]: where its
//! pods may run and the plans to push. For each target it keeps the set of
//! candidate nodes as a bitset over small node ids, and for each (node, plan)
//! pair the push state.
//!
//! Work is proportional to the event:
//! - a node joins or changes: one candidate check per target, pushes for that
//!   node only ([`Warmer::node_applied`]);
//! - a plan or a placement changes, or the workload scales up: one scan of
//!   the nodes for that target ([`Warmer::set_target`], [`Warmer::retry_failed`]);
//! - an agent becomes reachable: that node's waiting pushes
//!   ([`Warmer::agent_appeared`]).
//!
//! Each push is a task that calls `Prefetch` on the node's agent and follows
//! the progress stream, retrying failures with exponential backoff. When a
//! push finishes or fails, the ImagePrefetch objects that want it are
//! reported through [`Warmer::changed`] so their status is refreshed.
//!
//! Registry credentials from the workload's image pull secrets
//! ([`Target::credentials`], read by [`crate::pull_secrets`]) go to a node's agent
//! with `SetCredentials` before each Prefetch, stamped to expire after
//! [`WarmerConfig::credentials_lifetime`], and to every candidate node even before a
//! plan exists (the first pods of a private image must be mounted lazily to teach
//! one). Candidates get them again when they change, at the latest
//! [`WarmerConfig::credentials_refresh`] after the last send (checked at each
//! [`Warmer::set_target`], which every reconcile calls), and when their agent
//! reappears (it may have restarted and forgotten them).
//!
//! Gated nodes (those with the startup taint) get their warm target, the
//! plans they must hold before the agent lifts the taint, computed by
//! [`Warmer::gate_target`]; the nodes whose target may have changed are
//! collected for the gate writer ([`Warmer::take_dirty_gates`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::ObjectRef;
use stoker_api::agent::{PrefetchRequest, PrefetchState, RegistryCredential};
use stoker_crds::warm_gate::{STARTUP_TAINT_KEY, WARM_TARGET_ANNOTATION, WarmTarget};
use stoker_crds::{ImagePrefetch, NodeCounts};
use tokio::sync::{Notify, Semaphore};

use crate::Error;
use crate::agents::AgentApi;
use crate::candidates::{PodScheduling, is_candidate};

/// Identifies the ImagePrefetch a target belongs to.
pub type TargetKey = ObjectRef<ImagePrefetch>;
type NodeId = u32;

/// One plan to push: an image's learned plan, encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanPush {
    pub image: String,
    pub index_digest: String,
    /// stoker-format's compact plan encoding.
    pub plan: Arc<[u8]>,
    pub background_rest: bool,
    /// The controller has learned all the starts it wants from this image: the
    /// agent stops tracing it (`PrefetchRequest.learning_complete`).
    pub learning_complete: bool,
}

impl PlanPush {
    /// Identifies this exact plan (digest, bytes and options).
    pub fn revision(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (
            &self.index_digest,
            &self.plan[..],
            self.background_rest,
            self.learning_complete,
        )
            .hash(&mut hasher);
        hasher.finish()
    }
}

/// What one ImagePrefetch wants warmed, and where.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Target {
    /// The workload's pod templates; a node is a candidate if pods of any of
    /// them may run there. Explicit images without a workload use one default
    /// (unconstrained) entry.
    pub placements: Vec<PodScheduling>,
    /// The ImagePrefetch's own node selector.
    pub node_selector: BTreeMap<String, String>,
    pub plans: Vec<PlanPush>,
    /// Gate new nodes on these plans.
    pub gate: bool,
    pub warm_timeout_seconds: u32,
    /// Registry credentials for the plans' images, from the workload's image pull
    /// secrets; `expires_at_unix` is stamped when they are sent.
    pub credentials: Vec<RegistryCredential>,
}

impl Target {
    fn accepts(&self, node: &Node) -> bool {
        self.placements
            .iter()
            .any(|p| is_candidate(p, &self.node_selector, node))
    }
}

/// Tuning knobs.
#[derive(Clone, Debug)]
pub struct WarmerConfig {
    /// Prefetch streams open at once, over all agents.
    pub max_streams: usize,
    /// Attempts per (node, plan) before it stays failed until the plan
    /// changes, the workload scales up or the node changes.
    pub max_attempts: u32,
    /// First retry delay; doubles per attempt.
    pub retry_base: Duration,
    /// Warm timeout of gated nodes that no gating plan applies to.
    pub default_warm_timeout_seconds: u32,
    /// How long an agent may use the pull-secret credentials it was sent.
    pub credentials_lifetime: Duration,
    /// Credentials are sent again this long after the last send (at the next
    /// reconcile); kept below half the lifetime.
    pub credentials_refresh: Duration,
}

impl Default for WarmerConfig {
    fn default() -> Self {
        WarmerConfig {
            max_streams: 2048,
            max_attempts: 5,
            retry_base: Duration::from_secs(2),
            default_warm_timeout_seconds: 600,
            credentials_lifetime: Duration::from_secs(30 * 60),
            credentials_refresh: Duration::from_secs(10 * 60),
        }
    }
}

/// Push state of one plan on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushState {
    /// A push task owns it (queued for a stream slot, or streaming progress).
    Running { chunks_done: u64, chunks_total: u64 },
    /// The node has no reachable agent yet; pushed when it appears.
    NoAgent,
    /// Every chunk of the plan is verified on the node's disk.
    Warm,
    /// The last attempt failed.
    Failed {
        attempts: u32,
        message: String,
        retrying: bool,
    },
}

struct NodeSlot {
    name: Arc<str>,
    node: Arc<Node>,
}

#[derive(Default)]
struct TargetEntry {
    target: Target,
    candidates: NodeSet,
    /// Fingerprint of the credentials last sent to the nodes, and when.
    credentials_sent: Option<(u64, Instant)>,
}

#[derive(Default)]
struct State {
    node_ids: HashMap<Arc<str>, NodeId>,
    nodes: Vec<Option<NodeSlot>>,
    free_ids: Vec<NodeId>,
    targets: HashMap<TargetKey, TargetEntry>,
    /// Which targets want each plan revision.
    wanted_by: HashMap<u64, Vec<TargetKey>>,
    pushes: HashMap<(NodeId, u64), PushState>,
    /// Every ImagePrefetch has been reconciled once since start: gate targets
    /// are complete and may be written.
    synced: bool,
    dirty_gates: HashSet<Arc<str>>,
    changed: HashSet<TargetKey>,
}

/// See the module documentation.
pub struct Warmer {
    state: Mutex<State>,
    agents: Arc<dyn AgentApi>,
    streams: Arc<Semaphore>,
    config: WarmerConfig,
    changed_notify: Notify,
    gates_notify: Notify,
}

/// A push to start, decided under the lock and started after it.
struct StartPush {
    node: NodeId,
    name: Arc<str>,
    plan: PlanPush,
    revision: u64,
    /// Sent with SetCredentials before the plan; none: not called.
    credentials: Vec<RegistryCredential>,
}

/// A SetCredentials outside a push, decided under the lock and sent after it.
struct SendCredentials {
    name: Arc<str>,
    credentials: Vec<RegistryCredential>,
}

impl Warmer {
    pub fn new(agents: Arc<dyn AgentApi>, mut config: WarmerConfig) -> Arc<Self> {
        config.credentials_refresh = config
            .credentials_refresh
            .min(config.credentials_lifetime / 2);
        Arc::new(Warmer {
            state: Mutex::new(State::default()),
            agents,
            streams: Arc::new(Semaphore::new(config.max_streams.max(1))),
            config,
            changed_notify: Notify::new(),
            gates_notify: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A node was added or changed.
    pub fn node_applied(self: &Arc<Self>, node: &Node) {
        let Some(name) = node.metadata.name.as_deref() else {
            return;
        };
        let pruned = Arc::new(prune_node(node));
        let mut starts = Vec::new();
        let mut sends = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            let id = state.upsert_node(name, pruned.clone());
            let name: Arc<str> = state.name_of(id);
            let gated = is_gated(&pruned);
            for (key, entry) in state.targets.iter_mut() {
                let was = entry.candidates.contains(id);
                let is = entry.target.accepts(&pruned);
                if is {
                    entry.candidates.insert(id);
                    let credentials = &entry.target.credentials;
                    let starting = starts.len();
                    for plan in &entry.target.plans {
                        state_want(&mut state.pushes, &mut starts, id, &name, plan, credentials);
                    }
                    // A new candidate gets the credentials even without a plan to
                    // push yet: its first pods are mounted lazily and teach the plan.
                    if !was && starts.len() == starting && !credentials.is_empty() {
                        sends.push(SendCredentials {
                            name: name.clone(),
                            credentials: credentials.clone(),
                        });
                    }
                } else {
                    entry.candidates.remove(id);
                }
                if was != is {
                    state.changed.insert(key.clone());
                }
            }
            if gated {
                state.dirty_gates.insert(name);
            }
        }
        self.after_change(starts);
        self.send_credentials(sends);
    }

    /// A node was deleted.
    pub fn node_deleted(&self, name: &str) {
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(id) = state.node_ids.remove(name) else {
                return;
            };
            state.nodes[id as usize] = None;
            state.free_ids.push(id);
            for (key, entry) in state.targets.iter_mut() {
                if entry.candidates.remove(id) {
                    state.changed.insert(key.clone());
                }
            }
            state.pushes.retain(|(node, _), _| *node != id);
            state.dirty_gates.remove(name);
        }
        self.changed_notify.notify_one();
    }

    /// After a relist of the nodes: forgets the nodes that are gone.
    pub fn retain_nodes(&self, present: &HashSet<String>) {
        let gone: Vec<String> = self
            .lock()
            .node_ids
            .keys()
            .filter(|n| !present.contains(&***n))
            .map(|n| n.to_string())
            .collect();
        for name in gone {
            self.node_deleted(&name);
        }
    }

    /// The node's agent became reachable: pushes waiting for it go ahead.
    pub fn agent_appeared(self: &Arc<Self>, node: &str) {
        let mut starts = Vec::new();
        let mut sends = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            let Some(&id) = state.node_ids.get(node) else {
                return;
            };
            let name = state.name_of(id);
            for entry in state.targets.values() {
                if entry.candidates.contains(id) {
                    let credentials = &entry.target.credentials;
                    for plan in &entry.target.plans {
                        let key = (id, plan.revision());
                        if matches!(state.pushes.get(&key), Some(PushState::NoAgent)) {
                            state.pushes.remove(&key);
                        }
                        state_want(&mut state.pushes, &mut starts, id, &name, plan, credentials);
                    }
                    // A restarted agent has forgotten them.
                    if !credentials.is_empty() {
                        sends.push(SendCredentials {
                            name: name.clone(),
                            credentials: credentials.clone(),
                        });
                    }
                }
            }
        }
        self.after_change(starts);
        self.send_credentials(sends);
    }

    /// Sets what an ImagePrefetch wants. Rescans the nodes when its placement
    /// changed; pushes any plan a candidate does not have yet.
    pub fn set_target(self: &Arc<Self>, key: &TargetKey, target: Target) {
        let mut starts = Vec::new();
        let mut sends = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            let previous = state.targets.remove(key);
            let placement_same = previous.as_ref().is_some_and(|p| {
                p.target.placements == target.placements
                    && p.target.node_selector == target.node_selector
            });
            let gates_changed = previous.as_ref().is_none_or(|p| {
                p.target.gate != target.gate
                    || p.target.warm_timeout_seconds != target.warm_timeout_seconds
                    || p.target
                        .plans
                        .iter()
                        .map(|x| &x.index_digest)
                        .ne(target.plans.iter().map(|x| &x.index_digest))
            });
            let old_candidates = previous
                .as_ref()
                .map(|p| p.candidates.clone())
                .unwrap_or_default();
            let candidates = if placement_same {
                old_candidates.clone()
            } else {
                let mut set = NodeSet::default();
                for (id, slot) in state.nodes.iter().enumerate() {
                    if let Some(slot) = slot
                        && target.accepts(&slot.node)
                    {
                        set.insert(id as NodeId);
                    }
                }
                set
            };
            if let Some(previous) = &previous {
                for plan in &previous.target.plans {
                    unwant(&mut state.wanted_by, plan.revision(), key);
                }
            }
            for plan in &target.plans {
                state
                    .wanted_by
                    .entry(plan.revision())
                    .or_default()
                    .push(key.clone());
            }
            for id in candidates.iter() {
                let name = state.name_of(id);
                for plan in &target.plans {
                    let credentials = &target.credentials;
                    state_want(&mut state.pushes, &mut starts, id, &name, plan, credentials);
                }
            }
            let credentials_sent = self.credentials_to_refresh(
                state,
                previous.as_ref(),
                &target,
                &candidates,
                &starts,
                &mut sends,
            );
            if gates_changed || !placement_same {
                for id in candidates.iter().chain(old_candidates.iter()) {
                    if let Some(slot) = &state.nodes[id as usize]
                        && is_gated(&slot.node)
                    {
                        state.dirty_gates.insert(slot.name.clone());
                    }
                }
            }
            state.forget_unwanted_pushes();
            state.targets.insert(
                key.clone(),
                TargetEntry {
                    target,
                    candidates,
                    credentials_sent,
                },
            );
        }
        self.after_change(starts);
        self.send_credentials(sends);
    }

    /// The nodes to send a target's credentials to outside a push: every candidate
    /// not being pushed to now, when the credentials changed or the last send is
    /// `credentials_refresh` old; otherwise the candidates that were not candidates
    /// before. Candidates get them before any plan exists, so that their first
    /// pods of a private image are mounted lazily and traced. Returns what to
    /// record as the last send.
    fn credentials_to_refresh(
        &self,
        state: &State,
        previous: Option<&TargetEntry>,
        target: &Target,
        candidates: &NodeSet,
        starts: &[StartPush],
        sends: &mut Vec<SendCredentials>,
    ) -> Option<(u64, Instant)> {
        if target.credentials.is_empty() {
            return None;
        }
        let fingerprint = credentials_fingerprint(&target.credentials);
        let last = previous.and_then(|p| p.credentials_sent);
        let current = last.filter(|(sent, at)| {
            *sent == fingerprint && at.elapsed() < self.config.credentials_refresh
        });
        for id in candidates.iter() {
            let has_them = current.is_some() && previous.is_some_and(|p| p.candidates.contains(id));
            if !has_them && !starts.iter().any(|s| s.node == id) {
                sends.push(SendCredentials {
                    name: state.name_of(id),
                    credentials: target.credentials.clone(),
                });
            }
        }
        current.or(Some((fingerprint, Instant::now())))
    }

    /// Forgets an ImagePrefetch. Returns the (node, index digest) pushes that
    /// were still running and no other ImagePrefetch wants, to be cancelled.
    pub fn remove_target(&self, key: &TargetKey) -> Vec<(String, String)> {
        let cancel = self.remove_target_locked(key);
        self.gates_notify.notify_one();
        cancel
    }

    fn remove_target_locked(&self, key: &TargetKey) -> Vec<(String, String)> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(entry) = state.targets.remove(key) else {
            return Vec::new();
        };
        let mut cancel = Vec::new();
        for plan in &entry.target.plans {
            let revision = plan.revision();
            unwant(&mut state.wanted_by, revision, key);
            if state.wanted_by.contains_key(&revision) {
                continue;
            }
            for id in entry.candidates.iter() {
                if let Some(PushState::Running { .. }) = state.pushes.get(&(id, revision)) {
                    cancel.push((state.name_of(id).to_string(), plan.index_digest.clone()));
                }
            }
        }
        for id in entry.candidates.iter() {
            if let Some(slot) = &state.nodes[id as usize]
                && is_gated(&slot.node)
            {
                state.dirty_gates.insert(slot.name.clone());
            }
        }
        state.forget_unwanted_pushes();
        cancel
    }

    /// The workload scaled up: pushes that gave up are tried again.
    pub fn retry_failed(self: &Arc<Self>, key: &TargetKey) {
        let mut starts = Vec::new();
        {
            let mut state = self.lock();
            let state = &mut *state;
            let Some(entry) = state.targets.get(key) else {
                return;
            };
            for id in entry.candidates.iter() {
                let name = state.name_of(id);
                let credentials = &entry.target.credentials;
                for plan in &entry.target.plans {
                    let k = (id, plan.revision());
                    if matches!(
                        state.pushes.get(&k),
                        Some(PushState::Failed {
                            retrying: false,
                            ..
                        })
                    ) {
                        state.pushes.remove(&k);
                    }
                    state_want(&mut state.pushes, &mut starts, id, &name, plan, credentials);
                }
            }
        }
        self.after_change(starts);
    }

    /// Candidate nodes of an ImagePrefetch by warm state. A node is warm when
    /// every plan is; failed when a plan failed; warming otherwise.
    pub fn counts(&self, key: &TargetKey) -> NodeCounts {
        let state = self.lock();
        let Some(entry) = state.targets.get(key) else {
            return NodeCounts::default();
        };
        let revisions: Vec<u64> = entry.target.plans.iter().map(PlanPush::revision).collect();
        let mut counts = NodeCounts::default();
        for id in entry.candidates.iter() {
            counts.total += 1;
            if revisions.is_empty() {
                continue;
            }
            let states = revisions.iter().map(|r| state.pushes.get(&(id, *r)));
            let mut all_warm = true;
            let mut any_failed = false;
            for push in states {
                all_warm &= matches!(push, Some(PushState::Warm));
                any_failed |= matches!(push, Some(PushState::Failed { .. }));
            }
            if all_warm {
                counts.warm += 1;
            } else if any_failed {
                counts.failed += 1;
            } else {
                counts.warming += 1;
            }
        }
        counts
    }

    /// Up to `limit` failed pushes of an ImagePrefetch, as "node: message".
    pub fn failures(&self, key: &TargetKey, limit: usize) -> Vec<String> {
        let state = self.lock();
        let Some(entry) = state.targets.get(key) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for id in entry.candidates.iter() {
            for plan in &entry.target.plans {
                if let Some(PushState::Failed { message, .. }) =
                    state.pushes.get(&(id, plan.revision()))
                {
                    out.push(format!("{}: {message}", state.name_of(id)));
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// The push state of one plan revision on one node.
    pub fn push_state(&self, node: &str, revision: u64) -> Option<PushState> {
        let state = self.lock();
        let id = *state.node_ids.get(node)?;
        state.pushes.get(&(id, revision)).cloned()
    }

    /// Names of the candidate nodes of an ImagePrefetch.
    pub fn candidates(&self, key: &TargetKey) -> Vec<String> {
        let state = self.lock();
        state
            .targets
            .get(key)
            .map(|e| {
                e.candidates
                    .iter()
                    .map(|id| state.name_of(id).to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn node_count(&self) -> usize {
        self.lock().node_ids.len()
    }

    /// Marks the targets complete (every ImagePrefetch was reconciled once):
    /// gate targets may be written from now on.
    pub fn set_synced(&self) {
        let mut state = self.lock();
        state.synced = true;
        let gated: Vec<Arc<str>> = state
            .nodes
            .iter()
            .flatten()
            .filter(|slot| is_gated(&slot.node))
            .map(|slot| slot.name.clone())
            .collect();
        state.dirty_gates.extend(gated);
        drop(state);
        self.gates_notify.notify_one();
    }

    pub fn is_synced(&self) -> bool {
        self.lock().synced
    }

    /// For a gated node: the warm target it should carry and the one it
    /// carries now. None for ungated or unknown nodes, or before sync.
    pub fn gate_target(&self, node: &str) -> Option<(WarmTarget, Option<String>)> {
        let state = self.lock();
        if !state.synced {
            return None;
        }
        let id = *state.node_ids.get(node)?;
        let slot = state.nodes[id as usize].as_ref()?;
        if !is_gated(&slot.node) {
            return None;
        }
        let mut digests = Vec::new();
        let mut timeout = 0;
        for entry in state.targets.values() {
            if entry.target.gate && !entry.target.plans.is_empty() && entry.candidates.contains(id)
            {
                digests.extend(entry.target.plans.iter().map(|p| p.index_digest.clone()));
                timeout = timeout.max(entry.target.warm_timeout_seconds);
            }
        }
        if digests.is_empty() {
            timeout = self.config.default_warm_timeout_seconds;
        }
        let current = slot
            .node
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(WARM_TARGET_ANNOTATION))
            .cloned();
        Some((WarmTarget::new(digests, timeout), current))
    }

    /// Gated nodes whose warm target may have changed since the last call.
    pub fn take_dirty_gates(&self) -> Vec<String> {
        let mut state = self.lock();
        if !state.synced {
            return Vec::new();
        }
        state.dirty_gates.drain().map(|n| n.to_string()).collect()
    }

    /// Marks a gated node's warm target to be written again.
    pub fn mark_gate_dirty(&self, node: &str) {
        let mut state = self.lock();
        if let Some(&id) = state.node_ids.get(node) {
            let name = state.name_of(id);
            state.dirty_gates.insert(name);
        }
    }

    pub fn has_dirty_gates(&self) -> bool {
        let state = self.lock();
        state.synced && !state.dirty_gates.is_empty()
    }

    /// True once an ImagePrefetch's target was set.
    pub fn has_target(&self, key: &TargetKey) -> bool {
        self.lock().targets.contains_key(key)
    }

    /// Waits until some gate may have changed.
    pub async fn gates_changed(&self) {
        self.gates_notify.notified().await
    }

    /// Waits for and returns the ImagePrefetch objects whose warm state changed.
    pub async fn changed(&self) -> Vec<TargetKey> {
        loop {
            let notified = self.changed_notify.notified();
            let keys: Vec<TargetKey> = self.lock().changed.drain().collect();
            if !keys.is_empty() {
                return keys;
            }
            notified.await;
        }
    }

    fn after_change(self: &Arc<Self>, starts: Vec<StartPush>) {
        for start in starts {
            let warmer = self.clone();
            tokio::spawn(async move { warmer.push(start).await });
        }
        self.changed_notify.notify_one();
        self.gates_notify.notify_one();
    }

    /// Sends credentials outside pushes, each in a task of its own, as many at once
    /// as prefetch streams. A failure is logged: the next push or refresh sends
    /// them again.
    fn send_credentials(self: &Arc<Self>, sends: Vec<SendCredentials>) {
        for send in sends {
            let warmer = self.clone();
            tokio::spawn(async move {
                let Ok(_permit) = warmer.streams.clone().acquire_owned().await else {
                    return;
                };
                match warmer.set_credentials(&send.name, &send.credentials).await {
                    Ok(()) => {}
                    // Sent when the agent appears.
                    Err(Error::NoAgent(_)) => {}
                    Err(error) => {
                        tracing::warn!(node = %send.name, %error, "sending pull-secret credentials failed");
                    }
                }
            });
        }
    }

    /// SetCredentials on `node`, with the expiry stamped now.
    async fn set_credentials(
        &self,
        node: &str,
        credentials: &[RegistryCredential],
    ) -> Result<(), Error> {
        let expires_at_unix = unix_now().saturating_add(
            i64::try_from(self.config.credentials_lifetime.as_secs()).unwrap_or(i64::MAX),
        );
        let stamped = credentials
            .iter()
            .map(|c| RegistryCredential {
                expires_at_unix,
                ..c.clone()
            })
            .collect();
        match self.agents.set_credentials(node, stamped).await {
            Ok(_) => Ok(()),
            Err(Error::Agent { node, message }) => Err(Error::Agent {
                node,
                message: format!("sending pull-secret credentials: {message}"),
            }),
            Err(other) => Err(other),
        }
    }

    /// Pushes one plan to one node, with retries.
    async fn push(self: Arc<Self>, start: StartPush) {
        let StartPush {
            node,
            name,
            plan,
            revision,
            credentials,
        } = start;
        let request = PrefetchRequest {
            image_ref: plan.image.clone(),
            index_digest: plan.index_digest.clone(),
            plan: plan.plan.to_vec(),
            background_rest: plan.background_rest,
            learning_complete: plan.learning_complete,
        };
        for attempt in 1..=self.config.max_attempts.max(1) {
            let outcome = {
                let Ok(_permit) = self.streams.clone().acquire_owned().await else {
                    return;
                };
                if !self.still_wanted(node, &name, revision) {
                    return;
                }
                // The agent needs the credentials to read the image.
                if credentials.is_empty() {
                    self.follow(node, &name, revision, request.clone()).await
                } else {
                    match self.set_credentials(&name, &credentials).await {
                        Ok(()) => self.follow(node, &name, revision, request.clone()).await,
                        Err(error) => Err(error),
                    }
                }
            };
            let final_state = match outcome {
                Ok(()) => PushState::Warm,
                Err(Error::NoAgent(_)) => PushState::NoAgent,
                Err(error) => {
                    tracing::warn!(node = %name, image = %plan.image, attempt, %error, "prefetch failed");
                    PushState::Failed {
                        attempts: attempt,
                        message: error.to_string(),
                        retrying: attempt < self.config.max_attempts,
                    }
                }
            };
            let retry = matches!(final_state, PushState::Failed { retrying: true, .. });
            if !self.set_push(node, &name, revision, final_state) || !retry {
                return;
            }
            tokio::time::sleep(self.config.retry_base * 2u32.saturating_pow(attempt - 1)).await;
        }
    }

    /// One attempt: calls Prefetch and follows the progress to a final state.
    async fn follow(
        &self,
        node: NodeId,
        name: &Arc<str>,
        revision: u64,
        request: PrefetchRequest,
    ) -> Result<(), Error> {
        let mut stream = self.agents.prefetch(name, request).await?;
        while let Some(progress) = stream.next().await {
            let progress = progress?;
            match PrefetchState::try_from(progress.state).unwrap_or(PrefetchState::Unspecified) {
                PrefetchState::Done => return Ok(()),
                PrefetchState::Failed => {
                    return Err(Error::Agent {
                        node: name.to_string(),
                        message: format!(
                            "prefetch of {} failed: {}",
                            progress.index_digest, progress.error
                        ),
                    });
                }
                PrefetchState::Cancelled => {
                    return Err(Error::Agent {
                        node: name.to_string(),
                        message: format!("prefetch of {} was cancelled", progress.index_digest),
                    });
                }
                _ => {
                    let running = PushState::Running {
                        chunks_done: progress.chunks_done,
                        chunks_total: progress.chunks_total,
                    };
                    if !self.set_push(node, name, revision, running) {
                        return Ok(());
                    }
                }
            }
        }
        Err(Error::Agent {
            node: name.to_string(),
            message: "progress stream ended without a final state".into(),
        })
    }

    fn still_wanted(&self, node: NodeId, name: &Arc<str>, revision: u64) -> bool {
        let state = self.lock();
        state.pushes.contains_key(&(node, revision)) && state.node_ids.get(name) == Some(&node)
    }

    /// Records a push state if the push is still wanted; reports the targets
    /// that want it when the state is final. False if no longer wanted.
    fn set_push(&self, node: NodeId, name: &Arc<str>, revision: u64, push: PushState) -> bool {
        let mut state = self.lock();
        let state = &mut *state;
        if state.node_ids.get(name) != Some(&node) {
            return false;
        }
        let Some(slot) = state.pushes.get_mut(&(node, revision)) else {
            return false;
        };
        let report = !matches!(push, PushState::Running { .. });
        *slot = push;
        if report {
            if let Some(keys) = state.wanted_by.get(&revision) {
                state.changed.extend(keys.iter().cloned());
            }
            self.changed_notify.notify_one();
        }
        true
    }
}

impl State {
    fn upsert_node(&mut self, name: &str, node: Arc<Node>) -> NodeId {
        if let Some(&id) = self.node_ids.get(name) {
            if let Some(slot) = self.nodes[id as usize].as_mut() {
                slot.node = node;
            }
            return id;
        }
        let name: Arc<str> = Arc::from(name);
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                self.nodes.push(None);
                (self.nodes.len() - 1) as NodeId
            }
        };
        self.nodes[id as usize] = Some(NodeSlot {
            name: name.clone(),
            node,
        });
        self.node_ids.insert(name, id);
        id
    }

    fn name_of(&self, id: NodeId) -> Arc<str> {
        self.nodes[id as usize]
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Drops push states of plans no target wants any more.
    fn forget_unwanted_pushes(&mut self) {
        let wanted = &self.wanted_by;
        self.pushes
            .retain(|(_, revision), _| wanted.contains_key(revision));
    }
}

/// Starts a push of `plan` (after `credentials`) to node `id` unless one exists
/// (running, warm, waiting for the agent or failed).
fn state_want(
    pushes: &mut HashMap<(NodeId, u64), PushState>,
    starts: &mut Vec<StartPush>,
    id: NodeId,
    name: &Arc<str>,
    plan: &PlanPush,
    credentials: &[RegistryCredential],
) {
    let revision = plan.revision();
    if let std::collections::hash_map::Entry::Vacant(slot) = pushes.entry((id, revision)) {
        slot.insert(PushState::Running {
            chunks_done: 0,
            chunks_total: 0,
        });
        starts.push(StartPush {
            node: id,
            name: name.clone(),
            plan: plan.clone(),
            revision,
            credentials: credentials.to_vec(),
        });
    }
}

/// Identifies a set of credentials (their expiry is stamped later, and is 0 here).
fn credentials_fingerprint(credentials: &[RegistryCredential]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    credentials.hash(&mut hasher);
    hasher.finish()
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn unwant(wanted_by: &mut HashMap<u64, Vec<TargetKey>>, revision: u64, key: &TargetKey) {
    if let Some(keys) = wanted_by.get_mut(&revision) {
        keys.retain(|k| k != key);
        if keys.is_empty() {
            wanted_by.remove(&revision);
        }
    }
}

/// True if the node carries the Stoker startup taint, or the label that gates it
/// on the `StokerWarm` condition alone.
pub fn is_gated(node: &Node) -> bool {
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == STARTUP_TAINT_KEY));
    tainted || stoker_crds::warm_gate::has_condition_gate_label(node.metadata.labels.as_ref())
}

/// Keeps what the controller needs of a Node: name, labels, taints,
/// unschedulable, and its own annotation. Status (images, conditions…),
/// managed fields and other annotations are dropped: they are most of a
/// Node's size.
pub fn prune_node(node: &Node) -> Node {
    let annotations = node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WARM_TARGET_ANNOTATION))
        .map(|v| BTreeMap::from([(WARM_TARGET_ANNOTATION.to_string(), v.clone())]));
    let spec = node.spec.as_ref();
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name.clone(),
            labels: node.metadata.labels.clone(),
            annotations,
            resource_version: node.metadata.resource_version.clone(),
            ..ObjectMeta::default()
        },
        spec: Some(NodeSpec {
            taints: spec.and_then(|s| s.taints.clone()),
            unschedulable: spec.and_then(|s| s.unschedulable),
            ..NodeSpec::default()
        }),
        status: None,
    }
}

/// A set of node ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NodeSet(Vec<u64>);

impl NodeSet {
    fn insert(&mut self, id: NodeId) -> bool {
        let (word, bit) = (id as usize / 64, id % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }

    fn remove(&mut self, id: NodeId) -> bool {
        let (word, bit) = (id as usize / 64, id % 64);
        match self.0.get_mut(word) {
            Some(w) if *w & (1 << bit) != 0 => {
                *w &= !(1 << bit);
                true
            }
            _ => false,
        }
    }

    fn contains(&self, id: NodeId) -> bool {
        let (word, bit) = (id as usize / 64, id % 64);
        self.0.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn iter(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.0.iter().enumerate().flat_map(|(word, &bits)| {
            (0..64)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| (word * 64 + bit) as NodeId)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_gated_by_the_startup_taint_or_the_condition_gate_label() {
        use k8s_openapi::api::core::v1::{NodeSpec, Taint};
        let mut node = Node::default();
        assert!(!is_gated(&node));
        node.metadata.labels = Some(
            [(
                stoker_crds::warm_gate::CONDITION_GATE_LABEL.to_string(),
                stoker_crds::warm_gate::CONDITION_GATE_VALUE.to_string(),
            )]
            .into(),
        );
        assert!(is_gated(&node), "condition-gated by label");
        node.metadata.labels = None;
        node.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: STARTUP_TAINT_KEY.into(),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        assert!(is_gated(&node), "tainted");
    }

    #[test]
    fn node_sets() {
        let mut set = NodeSet::default();
        assert!(set.insert(3) && set.insert(64) && set.insert(200));
        assert!(!set.insert(64));
        assert!(set.contains(200) && !set.contains(4));
        assert_eq!(set.iter().collect::<Vec<_>>(), [3, 64, 200]);
        assert!(set.remove(64) && !set.remove(64) && !set.remove(10_000));
        assert_eq!(set.iter().collect::<Vec<_>>(), [3, 200]);
    }
}
