//! Wiring: watches and reflectors, the two controllers, the warmer's event
//! feeds, the gate writer, leader election and the metrics server.
//!
//! | watch | how | feeds |
//! | --- | --- | --- |
//! | ImagePrefetch | full, reflector (the controller's store) | ImagePrefetch reconciler |
//! | Deployment | full, shared reflector, managed fields and foreign annotations pruned | both reconcilers |
//! | ReplicaSet | metadata only, reflector | Pod → Deployment mapping |
//! | Pod | metadata only, no store | ImagePrefetch reconciler (learning) |
//! | agent Pods | label-selected in the agent namespace | [`AgentDirectory`] |
//! | Node | full, pruned to labels/taints/one annotation, held by the warmer | [`Warmer`] |

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use stoker_crds::{CONTROLLER_NAME, ImagePrefetch, PREFETCH_ANNOTATION};

use crate::Error;
use crate::agents::{AgentApi, AgentDirectory, AgentTlsFiles, GrpcAgents};
use crate::leader::{self, LeaseConfig};
use crate::metrics::Metrics;
use crate::reconcile::{self, Context};
use crate::warmer::{Warmer, WarmerConfig};
use crate::workload;
use crate::{default_prefetch, gate};

/// The controller's configuration (the binary's flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Namespace and label selector of the agent DaemonSet's pods.
    pub agent_namespace: String,
    pub agent_selector: String,
    /// The agents' mTLS gRPC port.
    pub agent_port: u16,
    /// None: plain gRPC (development only; agents refuse it).
    pub agent_tls: Option<AgentTlsFiles>,
    pub metrics_addr: SocketAddr,
    /// None: no leader election (a single replica).
    pub lease: Option<LeaseConfig>,
    pub warmer: WarmerConfig,
    /// ImagePrefetch reconciles at once.
    pub concurrency: u16,
}

/// Runs the controller until leadership is lost or a fatal error.
pub async fn run(client: Client, config: Config) -> Result<(), Error> {
    run_with_agents(client, config, None).await
}

/// [`run`], with the agent calls going to `agents` when given instead of
/// over gRPC to the agent pods (tests and simulations).
pub async fn run_with_agents(
    client: Client,
    config: Config,
    agents: Option<Arc<dyn AgentApi>>,
) -> Result<(), Error> {
    let metrics = Metrics::new()?;
    let (addr, _server) = metrics.clone().serve(config.metrics_addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");

    let mut lost = None;
    if let Some(lease) = config.lease.clone() {
        tracing::info!(lease = %lease.name, identity = %lease.identity, "waiting for leadership");
        let leadership = leader::acquire(
            Api::<Lease>::namespaced(client.clone(), &lease.namespace),
            lease,
        )
        .await;
        lost = Some(leadership);
    }

    let directory = Arc::new(AgentDirectory::new());
    let agents: Arc<dyn AgentApi> = match agents {
        Some(agents) => agents,
        None => {
            let tls = config
                .agent_tls
                .as_ref()
                .map(AgentTlsFiles::load)
                .transpose()?;
            Arc::new(GrpcAgents::new(directory.clone(), config.agent_port, tls))
        }
    };
    let warmer = Warmer::new(agents.clone(), config.warmer.clone());

    // Deployments: one shared reflector, two subscribers.
    let (deployments, deployment_writer) = reflector::store_shared::<Deployment>(1024);
    let deployments_for_prefetch = deployment_writer
        .subscribe()
        .ok_or_else(|| Error::Metrics("subscribe".into()))?;
    let deployments_for_default = deployment_writer
        .subscribe()
        .ok_or_else(|| Error::Metrics("subscribe".into()))?;
    let deployment_feed = watcher(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .modify(prune_deployment)
    .default_backoff()
    .reflect_shared(deployment_writer)
    .for_each(|_| async {});

    // ReplicaSets, metadata only: Pod → ReplicaSet → Deployment.
    let (replicasets, replicaset_writer) = reflector::store::<PartialObjectMeta<ReplicaSet>>();
    let replicaset_feed = watcher(
        Api::<PartialObjectMeta<ReplicaSet>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .modify(|rs| {
        rs.metadata.managed_fields = None;
        rs.metadata.annotations = None;
    })
    .default_backoff()
    .reflect(replicaset_writer)
    .for_each(|_| async {});

    // Pods, metadata only, as triggers.
    let pods = watcher(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .modify(|p| {
        p.metadata.managed_fields = None;
        p.metadata.annotations = None;
    })
    .default_backoff()
    .touched_objects();

    // Agent pods → directory → waiting pushes.
    let agent_feed = {
        let api = Api::<Pod>::namespaced(client.clone(), &config.agent_namespace);
        let warmer = warmer.clone();
        let directory = directory.clone();
        watcher(
            api,
            watcher::Config::default().labels(&config.agent_selector),
        )
        .default_backoff()
        .for_each(move |event| {
            if let Ok(event) = event {
                for node in directory.apply(&event) {
                    warmer.agent_appeared(&node);
                }
            }
            async {}
        })
    };

    // Nodes → warmer.
    let node_feed = node_events(
        watcher(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().any_semantic(),
        )
        .default_backoff(),
        warmer.clone(),
    );

    let prefetch_controller = Controller::new(
        Api::<ImagePrefetch>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    );
    let prefetches = prefetch_controller.store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_NAME.into(),
            instance: config.lease.as_ref().map(|l| l.identity.clone()),
        },
    );
    let ctx = Context::new(
        client.clone(),
        prefetches.clone(),
        deployments.clone(),
        warmer.clone(),
        agents,
        metrics.clone(),
        recorder,
    );

    let warm_changes = {
        let warmer = warmer.clone();
        futures::stream::unfold(warmer, |w| async move {
            let keys = w.changed().await;
            Some((futures::stream::iter(keys), w))
        })
        .flatten()
    };
    let prefetch_loop = prefetch_controller
        .watches_shared_stream(deployments_for_prefetch, {
            let prefetches = prefetches.clone();
            move |d| prefetches_of_deployment(&prefetches, &d)
        })
        .watches_stream(pods, {
            let (prefetches, deployments, replicasets) =
                (prefetches.clone(), deployments.clone(), replicasets.clone());
            move |pod| prefetches_of_pod(&prefetches, &deployments, &replicasets, &pod)
        })
        .reconcile_on(warm_changes)
        .with_config(
            controller::Config::default()
                .debounce(Duration::from_millis(500))
                .concurrency(config.concurrency),
        )
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|_| async {});

    let default_loop = Controller::for_shared_stream(deployments_for_default, deployments.clone())
        .with_config(controller::Config::default().concurrency(4))
        .run(
            default_prefetch::reconcile,
            default_error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});

    let sync = mark_synced(prefetches.clone(), warmer.clone(), metrics.clone());
    let gates = gate::run(client.clone(), warmer.clone());
    let leadership_lost = async move {
        match lost {
            Some(mut leadership) => {
                let _ = leadership.lost.wait_for(|lost| *lost).await;
            }
            None => futures::future::pending::<()>().await,
        }
    };

    tokio::select! {
        _ = deployment_feed => Err(Error::Metrics("deployment watch ended".into())),
        _ = replicaset_feed => Err(Error::Metrics("replicaset watch ended".into())),
        _ = agent_feed => Err(Error::Metrics("agent pod watch ended".into())),
        _ = node_feed => Err(Error::Metrics("node watch ended".into())),
        _ = prefetch_loop => Ok(()),
        _ = default_loop => Ok(()),
        _ = sync => Ok(()),
        _ = gates => Ok(()),
        _ = leadership_lost => Err(Error::Lease("lost leadership; exiting so a new leader takes over".into())),
    }
}

/// Applies node watch events to the warmer (relists forget vanished nodes).
pub async fn node_events(
    events: impl Stream<Item = Result<watcher::Event<Node>, watcher::Error>>,
    warmer: Arc<Warmer>,
) {
    let mut relisted: Option<HashSet<String>> = None;
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(node)) => warmer.node_applied(&node),
            Ok(watcher::Event::Delete(node)) => warmer.node_deleted(&node.name_any()),
            Ok(watcher::Event::Init) => relisted = Some(HashSet::new()),
            Ok(watcher::Event::InitApply(node)) => {
                if let Some(seen) = relisted.as_mut() {
                    seen.insert(node.name_any());
                }
                warmer.node_applied(&node);
            }
            Ok(watcher::Event::InitDone) => {
                if let Some(seen) = relisted.take() {
                    warmer.retain_nodes(&seen);
                }
            }
            Err(error) => tracing::warn!(%error, "node watch"),
        }
    }
}

/// Gate targets are complete once every ImagePrefetch was reconciled once.
async fn mark_synced(prefetches: Store<ImagePrefetch>, warmer: Arc<Warmer>, metrics: Arc<Metrics>) {
    if prefetches.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        let all = prefetches
            .state()
            .iter()
            .all(|p| warmer.has_target(&ObjectRef::from_obj(&**p)));
        if all {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    warmer.set_synced();
    metrics.set_ready(true);
    tracing::info!(
        prefetches = prefetches.len(),
        nodes = warmer.node_count(),
        "synced; writing gate targets"
    );
    futures::future::pending::<()>().await
}

fn default_error_policy(deployment: Arc<Deployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed("deployment", error);
    tracing::warn!(deployment = %deployment.name_any(), namespace = ?deployment.namespace(), %error, "default ImagePrefetch");
    Action::requeue(if error.is_transient() {
        Duration::from_secs(5)
    } else {
        Duration::from_secs(300)
    })
}

/// The ImagePrefetch objects that serve a Deployment.
pub fn prefetches_of_deployment(
    prefetches: &Store<ImagePrefetch>,
    deployment: &Deployment,
) -> Vec<ObjectRef<ImagePrefetch>> {
    let namespace = deployment.metadata.namespace.as_deref();
    prefetches
        .state()
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == namespace
                && workload::selects(&p.spec.workload, deployment)
        })
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

/// The ImagePrefetch objects a pod matters to: those serving its Deployment
/// that are still learning.
pub fn prefetches_of_pod(
    prefetches: &Store<ImagePrefetch>,
    deployments: &Store<Deployment>,
    replicasets: &Store<PartialObjectMeta<ReplicaSet>>,
    pod: &PartialObjectMeta<Pod>,
) -> Vec<ObjectRef<ImagePrefetch>> {
    let Some(namespace) = pod.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let owner =
        |refs: &Option<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>,
         kind: &str| {
            refs.iter()
                .flatten()
                .find(|o| o.kind == kind && o.controller == Some(true))
                .map(|o| o.name.clone())
        };
    let Some(rs_name) = owner(&pod.metadata.owner_references, "ReplicaSet") else {
        return Vec::new();
    };
    let Some(rs) = replicasets.get(&ObjectRef::new(&rs_name).within(namespace)) else {
        return Vec::new();
    };
    let Some(deployment_name) = owner(&rs.metadata.owner_references, "Deployment") else {
        return Vec::new();
    };
    let Some(deployment) = deployments.get(&ObjectRef::new(&deployment_name).within(namespace))
    else {
        return Vec::new();
    };
    prefetches
        .state()
        .iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace)
                && workload::selects(&p.spec.workload, &deployment)
        })
        .filter(|p| still_learning(p))
        .map(|p| ObjectRef::from_obj(&**p))
        .collect()
}

fn still_learning(prefetch: &ImagePrefetch) -> bool {
    let target = prefetch.spec.policy.learn_from_starts;
    match &prefetch.status {
        None => true,
        Some(status) => {
            status.images.is_empty() || status.images.iter().any(|i| i.pods_learned < target)
        }
    }
}

/// Drops what the controller never reads from Deployments: managed fields and
/// annotations other than `stoker.dev/prefetch` (the last-applied
/// configuration alone can be larger than the rest).
pub fn prune_deployment(deployment: &mut Deployment) {
    deployment.metadata.managed_fields = None;
    if let Some(annotations) = deployment.metadata.annotations.as_mut() {
        let keep: BTreeMap<String, String> = annotations
            .iter()
            .filter(|(k, _)| *k == PREFETCH_ANNOTATION)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        *annotations = keep;
    }
}
