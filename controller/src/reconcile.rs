//! The ImagePrefetch reconciler: resolve the workload, learn from pod starts,
//! hand the plans to the warmer, and record it all in status.
//!
//! Reconciles are idempotent: everything is recomputed from the object, the
//! Deployments, the Pods and the warmer's state, and the status is written
//! with server-side apply only when it changed. Failed reconciles are retried
//! with exponential backoff when the error is transient (conflicts, 429, 5xx,
//! unreachable agents) and after five minutes otherwise.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::Selector;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use stoker_crds::image_prefetch::{MAX_LEARN_FROM_STARTS, MAX_STATUS_PLAN_BYTES};
use stoker_crds::{
    CONTROLLER_NAME, FINALIZER, ImagePrefetch, ImagePrefetchStatus, ImageStatus, Phase, ScaleEvent,
    format_size, parse_size,
};

use crate::Error;
use crate::agents::AgentApi;
use crate::learning::{self, LearnedPlan, TracePick};
use crate::metrics::Metrics;
use crate::pull_secrets;
use crate::status::{self, Observed, Problem};
use crate::warmer::{PlanPush, Target, TargetKey, Warmer};
use crate::workload::{self, Workload};

/// Everything a reconcile needs.
pub struct Context {
    pub client: Client,
    pub prefetches: Store<ImagePrefetch>,
    pub deployments: Store<Deployment>,
    pub warmer: Arc<Warmer>,
    pub agents: Arc<dyn AgentApi>,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// Desired replicas last seen per ImagePrefetch, to spot scale-ups.
    replicas_seen: Mutex<HashMap<TargetKey, i32>>,
    /// Containers ("pod uid/image") whose trace never appeared; not asked again.
    given_up: Mutex<HashSet<String>>,
    /// Consecutive failed reconciles per object, for backoff.
    failures: Mutex<HashMap<TargetKey, u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        prefetches: Store<ImagePrefetch>,
        deployments: Store<Deployment>,
        warmer: Arc<Warmer>,
        agents: Arc<dyn AgentApi>,
        metrics: Arc<Metrics>,
        recorder: Recorder,
    ) -> Arc<Self> {
        Arc::new(Context {
            client,
            prefetches,
            deployments,
            warmer,
            agents,
            metrics,
            recorder,
            replicas_seen: Mutex::default(),
            given_up: Mutex::default(),
            failures: Mutex::default(),
        })
    }

    /// Publishes an Event; failures are logged, never fatal.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: reason.into(),
            secondary: None,
        };
        if let Err(error) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(%error, reason, object = ?regarding.name, "cannot publish event");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The kube-runtime reconcile function for ImagePrefetch objects.
pub async fn reconcile(prefetch: Arc<ImagePrefetch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile("imageprefetch");
    let namespace = prefetch.namespace().unwrap_or_default();
    let object = format!("{namespace}/{}", prefetch.name_any());
    let api: Api<ImagePrefetch> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = ObjectRef::from_obj(&*prefetch);
    let result = finalizer(&api, FINALIZER, prefetch, |event| async {
        match event {
            Finalizer::Apply(p) => apply(p, ctx.clone()).await,
            Finalizer::Cleanup(p) => cleanup(p, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| finalizer_error(&object, e));
    if result.is_ok() {
        lock(&ctx.failures).remove(&key);
    }
    result
}

fn finalizer_error(object: &str, error: kube::runtime::finalizer::Error<Error>) -> Error {
    use kube::runtime::finalizer::Error as E;
    match error {
        E::ApplyFailed(e) | E::CleanupFailed(e) => e,
        E::AddFinalizer(e) => Error::kube(format!("add finalizer to {object}"))(e),
        E::RemoveFinalizer(e) => Error::kube(format!("remove finalizer from {object}"))(e),
        other => Error::Finalizer {
            object: object.to_string(),
            message: other.to_string(),
        },
    }
}

/// Retries transient errors with exponential backoff (1 s doubling to 5 min);
/// others after 5 minutes.
pub fn error_policy(prefetch: Arc<ImagePrefetch>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed("imageprefetch", error);
    let key = ObjectRef::from_obj(&*prefetch);
    let mut failures = lock(&ctx.failures);
    let count = failures.entry(key).or_insert(0);
    *count = count.saturating_add(1);
    tracing::warn!(object = %prefetch.name_any(), namespace = ?prefetch.namespace(), %error, failures = *count, "reconcile failed");
    if error.is_transient() {
        Action::requeue(backoff(*count))
    } else {
        Action::requeue(Duration::from_secs(300))
    }
}

/// 1 s, 2 s, 4 s, … capped at 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// Deletion: withdraw the plans from the warmer (and so from node warm
/// targets) and cancel prefetches nobody else wants.
async fn cleanup(prefetch: Arc<ImagePrefetch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = ObjectRef::from_obj(&*prefetch);
    lock(&ctx.replicas_seen).remove(&key);
    for (node, digest) in ctx.warmer.remove_target(&key) {
        if let Err(error) = ctx.agents.cancel_prefetch(&node, &digest).await {
            tracing::info!(%node, %digest, %error, "cannot cancel prefetch (left to finish)");
        }
    }
    tracing::info!(object = %prefetch.name_any(), namespace = ?prefetch.namespace(), "cleaned up");
    Ok(Action::await_change())
}

async fn apply(prefetch: Arc<ImagePrefetch>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = prefetch.namespace().unwrap_or_default();
    let name = prefetch.name_any();
    let key = ObjectRef::from_obj(&*prefetch);
    let policy = &prefetch.spec.policy;
    let old_status = prefetch.status.clone().unwrap_or_default();
    let now = Timestamp::now();

    let in_namespace: Vec<Arc<Deployment>> = ctx
        .deployments
        .state()
        .into_iter()
        .filter(|d| d.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .collect();
    let workload = workload::resolve(&prefetch, &in_namespace);
    let mut problems = workload.problems.clone();
    let max_bytes = parse_size(&policy.max_hot_size).unwrap_or_else(|e| {
        problems.push(Problem {
            reason: "InvalidPolicy",
            message: e.to_string(),
        });
        2 << 30
    });
    let learn_target = policy.learn_from_starts.clamp(1, MAX_LEARN_FROM_STARTS);

    // Images: keep what was learned for images still in the workload; a new
    // image (the Deployment was updated) starts learning from scratch.
    let mut images: Vec<ImageStatus> = workload
        .images
        .iter()
        .map(|image| {
            old_status
                .images
                .iter()
                .find(|s| &s.image == image)
                .cloned()
                .unwrap_or_else(|| ImageStatus {
                    image: image.clone(),
                    ..ImageStatus::default()
                })
        })
        .collect();

    let mut look_again: Option<Duration> = None;
    let mut learned = Vec::new();
    if images.iter().any(|i| i.pods_learned < learn_target) && !workload.deployments.is_empty() {
        let budget = MAX_STATUS_PLAN_BYTES / images.len().max(1);
        let outcome = learn(
            &ctx,
            &prefetch,
            &workload,
            &mut images,
            learn_target,
            max_bytes,
            budget,
            now,
        )
        .await?;
        look_again = outcome.look_again;
        learned = outcome.learned;
        problems.extend(outcome.problems);
    }

    // Scale events.
    let mut last_scale_event = old_status.last_scale_event.clone();
    let seen = lock(&ctx.replicas_seen)
        .insert(key.clone(), workload.replicas)
        .or_else(|| last_scale_event.as_ref().map(|e| e.to_replicas));
    let scaled_up = match seen {
        Some(before) if before != workload.replicas && !workload.deployments.is_empty() => {
            last_scale_event = Some(ScaleEvent {
                time: Time(now),
                from_replicas: before,
                to_replicas: workload.replicas,
            });
            workload.replicas > before
        }
        _ => false,
    };

    // Warming.
    let mut plans = Vec::new();
    for image in &images {
        let (Some(plan), Some(digest)) = (&image.plan, &image.index_digest) else {
            continue;
        };
        match learning::decode_from_status(plan).and_then(|p| Ok(p.encode()?)) {
            Ok(bytes) => plans.push(PlanPush {
                image: image.image.clone(),
                index_digest: digest.clone(),
                plan: bytes.into(),
                background_rest: policy.background_fetch_rest,
                // Learned from enough starts: agents stop tracing the image, so
                // its starts can pass every local file through to the kernel.
                learning_complete: image.pods_learned >= learn_target,
            }),
            Err(e) => problems.push(Problem {
                reason: "BadPlan",
                message: format!("{}: {e}", image.image),
            }),
        }
    }
    // The images' registry credentials from the pods' pull secrets, for the agents
    // to read the images with (before any plan exists too: the first pods must be
    // mounted lazily to teach one); read again each reconcile, so changes are
    // picked up.
    let mut credentials = Vec::new();
    if !workload.deployments.is_empty() {
        let images: Vec<&str> = workload.images.iter().map(String::as_str).collect();
        let pulled =
            pull_secrets::read(&ctx.client, &namespace, &workload.deployments, &images).await?;
        problems.extend(pulled.problems);
        credentials = pulled.credentials;
    }
    ctx.warmer.set_target(
        &key,
        Target {
            placements: workload.placements.clone(),
            node_selector: prefetch.spec.nodes.node_selector.clone(),
            plans,
            gate: policy.gate_scheduling,
            warm_timeout_seconds: policy.warm_timeout_seconds,
            credentials,
        },
    );
    if scaled_up {
        ctx.warmer.retry_failed(&key);
    }
    let counts = ctx.warmer.counts(&key);
    if counts.failed > 0 {
        problems.push(Problem {
            reason: "WarmFailed",
            message: format!(
                "{} nodes failed: {}",
                counts.failed,
                ctx.warmer.failures(&key, 3).join("; ")
            ),
        });
    }

    // Status.
    let observed = Observed {
        images: &images,
        learn_target,
        nodes: counts,
        problems: &problems,
    };
    let phase = status::phase(&observed);
    let hot_bytes: u64 = images.iter().map(|i| i.hot_bytes).sum();
    let new_status = ImagePrefetchStatus {
        observed_generation: prefetch.metadata.generation,
        phase,
        conditions: status::conditions(
            &old_status.conditions,
            &observed,
            prefetch.metadata.generation,
            now,
        ),
        workload: Some(workload.description.clone()),
        image_count: images.len() as u32,
        hot_size: Some(format_size(hot_bytes)),
        warm_nodes: Some(format!("{}/{}", counts.warm, counts.total)),
        images,
        nodes: counts,
        last_scale_event,
    };
    if new_status != old_status {
        patch_status(&ctx.client, &namespace, &name, &new_status).await?;
    }

    // Events, on transitions only.
    let regarding = prefetch.object_ref(&());
    let deployment_refs: Vec<ObjectReference> = workload
        .deployments
        .iter()
        .map(|d| d.object_ref(&()))
        .collect();
    for note in learned {
        ctx.metrics.plan_learned();
        ctx.publish(&regarding, EventType::Normal, "PlanLearned", note.clone())
            .await;
        for d in &deployment_refs {
            ctx.publish(d, EventType::Normal, "PlanLearned", note.clone())
                .await;
        }
    }
    if scaled_up && let Some(e) = &new_status.last_scale_event {
        let note = format!(
            "scaled {} → {} replicas: warming {} candidate nodes ({} warm)",
            e.from_replicas, e.to_replicas, counts.total, counts.warm
        );
        ctx.publish(&regarding, EventType::Normal, "ScaleUp", note.clone())
            .await;
        for d in &deployment_refs {
            ctx.publish(d, EventType::Normal, "ScaleUp", note.clone())
                .await;
        }
    }
    if phase != old_status.phase {
        let (type_, note) = match phase {
            Phase::Degraded => (
                EventType::Warning,
                problems
                    .iter()
                    .map(|p| p.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Phase::Ready => (
                EventType::Normal,
                format!("all {} candidate nodes are warm", counts.total),
            ),
            Phase::Warming => (
                EventType::Normal,
                format!(
                    "pushing plans to {} of {} candidate nodes",
                    counts.total - counts.warm,
                    counts.total
                ),
            ),
            Phase::Learning => (
                EventType::Normal,
                "waiting for pod starts to learn from".to_string(),
            ),
            Phase::Pending => (EventType::Normal, "nothing to do yet".to_string()),
        };
        ctx.publish(&regarding, type_, &phase.to_string(), note.clone())
            .await;
        if matches!(phase, Phase::Ready | Phase::Degraded) {
            for d in &deployment_refs {
                ctx.publish(d, type_, &phase.to_string(), note.clone())
                    .await;
            }
        }
    }
    tracing::debug!(object = %name, %namespace, %phase, warm = counts.warm, total = counts.total, "reconciled");

    let next = match phase {
        Phase::Warming | Phase::Degraded => Duration::from_secs(60),
        _ => Duration::from_secs(300),
    };
    Ok(Action::requeue(look_again.map_or(next, |l| l.min(next))))
}

/// Writes the whole status with server-side apply.
pub async fn patch_status(
    client: &Client,
    namespace: &str,
    name: &str,
    status: &ImagePrefetchStatus,
) -> Result<(), Error> {
    let api: Api<ImagePrefetch> = Api::namespaced(client.clone(), namespace);
    let patch = serde_json::json!({
        "apiVersion": "stoker.dev/v1alpha1",
        "kind": "ImagePrefetch",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(CONTROLLER_NAME).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!(
        "patch status of ImagePrefetch {namespace}/{name}"
    )))?;
    Ok(())
}

struct LearnOutcome {
    look_again: Option<Duration>,
    /// One note per trace merged.
    learned: Vec<String>,
    problems: Vec<Problem>,
}

/// Collects the traces of started pods that were not learned from yet and
/// merges them into the images' plans.
#[allow(clippy::too_many_arguments)]
async fn learn(
    ctx: &Context,
    prefetch: &ImagePrefetch,
    workload: &Workload,
    images: &mut [ImageStatus],
    learn_target: u32,
    max_bytes: u64,
    budget: usize,
    now: Timestamp,
) -> Result<LearnOutcome, Error> {
    let window = Duration::from_secs(prefetch.spec.policy.startup_window_seconds.into());
    let mut outcome = LearnOutcome {
        look_again: None,
        learned: Vec::new(),
        problems: Vec::new(),
    };
    let mut again =
        |d: Duration| outcome.look_again = Some(outcome.look_again.map_or(d, |l| l.min(d)));
    let pods = workload_pods(ctx, workload).await?;
    let mut traces_by_node: HashMap<String, Result<Vec<stoker_api::agent::TraceSummary>, String>> =
        HashMap::new();
    let mut problems = Vec::new();
    let mut learned = Vec::new();
    for image in images.iter_mut() {
        for pod in &pods {
            if image.pods_learned >= learn_target {
                break;
            }
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if image.learned_from.contains(&uid)
                || lock(&ctx.given_up).contains(&format!("{uid}/{}", image.image))
            {
                continue;
            }
            let Some(started) = started_container(pod, &image.image) else {
                continue;
            };
            let traces = match traces_by_node.get(&started.node) {
                Some(t) => t.clone(),
                None => {
                    let t = ctx
                        .agents
                        .list_traces(&started.node)
                        .await
                        .map_err(|e| e.to_string());
                    traces_by_node.insert(started.node.clone(), t.clone());
                    t
                }
            };
            let traces = match traces {
                Ok(t) => t,
                Err(message) => {
                    if !problems.iter().any(|p: &Problem| p.message == message) {
                        problems.push(Problem {
                            reason: "AgentUnreachable",
                            message,
                        });
                    }
                    again(Duration::from_secs(30));
                    continue;
                }
            };
            let created_ms = pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map_or(0, |t| t.0.as_millisecond());
            match learning::pick_trace(&traces, &started.container_id, &image.image, created_ms) {
                TracePick::Complete(trace_id) => {
                    match merge_trace(
                        ctx,
                        &started.node,
                        &trace_id,
                        image,
                        &uid,
                        max_bytes,
                        budget,
                        now,
                    )
                    .await
                    {
                        Ok(note) => learned.push(format!(
                            "{note} (pod {}, node {})",
                            pod.name_any(),
                            started.node
                        )),
                        Err(e) => problems.push(Problem {
                            reason: "TraceUnusable",
                            message: format!("trace {trace_id} on {}: {e}", started.node),
                        }),
                    }
                }
                TracePick::Recording(_) => {
                    if started.ready {
                        // The pod is Ready: its startup is over, close the window now.
                        if let Err(e) = ctx
                            .agents
                            .container_ready(&started.node, &started.container_id)
                            .await
                        {
                            tracing::info!(node = %started.node, error = %e, "ContainerReady failed");
                        }
                        again(Duration::from_secs(2));
                    } else {
                        again(window.min(Duration::from_secs(15)));
                    }
                }
                TracePick::Missing => {
                    let age = now
                        .as_second()
                        .saturating_sub(started.started_at.as_second());
                    if age > window.as_secs() as i64 + 60 {
                        // Not a Stoker image on that node, or the agent lost it.
                        lock(&ctx.given_up).insert(format!("{uid}/{}", image.image));
                    } else {
                        again(Duration::from_secs(5));
                    }
                }
            }
        }
    }
    outcome.learned = learned;
    outcome.problems = problems;
    Ok(outcome)
}

/// Fetches a trace and folds it into an image's status. Returns a note.
#[allow(clippy::too_many_arguments)]
async fn merge_trace(
    ctx: &Context,
    node: &str,
    trace_id: &str,
    image: &mut ImageStatus,
    pod_uid: &str,
    max_bytes: u64,
    budget: usize,
    now: Timestamp,
) -> Result<String, Error> {
    let response = ctx.agents.get_trace(node, trace_id).await?;
    let trace = learning::trace_from_agent(&response)?;
    let previous = match (&image.plan, &image.index_digest) {
        (Some(plan), Some(digest)) if *digest == trace.index_digest => Some(LearnedPlan {
            plan: learning::decode_from_status(plan)?,
            pods_learned: image.pods_learned,
            hot_bytes: image.hot_bytes,
        }),
        _ => None,
    };
    if previous.is_none() {
        // First trace, or the image was rebuilt (a new index): start over.
        image.learned_from.clear();
    }
    let folded = learning::fold_trace(previous.as_ref(), &trace, max_bytes)?;
    let encoded = learning::encode_for_status(&folded.plan, budget)?;
    let kept_bytes = if encoded.truncated && !folded.plan.chunks.is_empty() {
        folded.hot_bytes * encoded.chunks as u64 / folded.plan.chunks.len() as u64
    } else {
        folded.hot_bytes
    };
    image.index_digest = Some(trace.index_digest.clone());
    image.plan = Some(encoded.base64);
    image.plan_truncated = encoded.truncated;
    image.hot_chunks = encoded.chunks as u64;
    image.hot_bytes = kept_bytes;
    image.pods_learned = folded.pods_learned;
    image.learned_from.push(pod_uid.to_string());
    image.learned_from.truncate(MAX_LEARN_FROM_STARTS as usize);
    image.updated_at = Some(Time(now));
    Ok(format!(
        "learned {}: {} chunks, {} hot, from {} pod starts",
        image.image,
        image.hot_chunks,
        format_size(image.hot_bytes),
        image.pods_learned
    ))
}

/// The pods of the workload's Deployments, oldest first.
async fn workload_pods(ctx: &Context, workload: &Workload) -> Result<Vec<Pod>, Error> {
    let mut pods = Vec::new();
    for deployment in &workload.deployments {
        let Some(namespace) = deployment.namespace() else {
            continue;
        };
        let spec = &deployment.spec;
        let Ok(selector) = Selector::try_from(spec.selector.clone()) else {
            continue;
        };
        let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        let list = api
            .list(&ListParams::default().labels_from(&selector))
            .await
            .map_err(Error::kube(format!(
                "list pods of Deployment {namespace}/{}",
                deployment.name_any()
            )))?;
        pods.extend(list.items);
    }
    pods.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
    Ok(pods)
}

/// A running container of a given image.
struct StartedContainer {
    node: String,
    /// The containerd container ID (without the `containerd://` prefix).
    container_id: String,
    started_at: Timestamp,
    ready: bool,
}

fn started_container(pod: &Pod, image: &str) -> Option<StartedContainer> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let status = pod.status.as_ref()?;
    let names: Vec<&str> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.image.as_deref() == Some(image))
        .map(|c| c.name.as_str())
        .collect();
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .filter(|s| names.contains(&s.name.as_str()))
        .find_map(|s| {
            let running = s.state.as_ref()?.running.as_ref()?;
            let id = s.container_id.as_deref()?;
            Some(StartedContainer {
                node: node.clone(),
                container_id: id.rsplit("://").next().unwrap_or(id).to_string(),
                started_at: running
                    .started_at
                    .as_ref()
                    .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
                ready: s.ready,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(30), Duration::from_secs(300));
    }
}
