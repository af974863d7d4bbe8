//! Talking to the node agents: finding each node's agent and calling its
//! gRPC API (`stoker.agent.v1.Agent`) over mutual TLS.
//!
//! [`AgentDirectory`] maps node names to agent pod IPs, fed by a watch of the
//! agent DaemonSet's pods (namespace and label configurable). [`GrpcAgents`]
//! keeps one lazily connected channel per agent and implements [`AgentApi`],
//! the narrow interface the rest of the controller uses (the simulation
//! benchmark and tests plug in their own).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::watcher;
use stoker_api::agent::agent_client::AgentClient;
use stoker_api::agent::{
    CancelPrefetchRequest, ContainerReadyRequest, GetTraceRequest, GetTraceResponse,
    ListTracesRequest, PrefetchProgress, PrefetchRequest, RegistryCredential,
    SetCredentialsRequest, TraceSummary,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::Error;

/// A stream of prefetch progress messages; the last one has a final state.
pub type ProgressStream = BoxStream<'static, Result<PrefetchProgress, Error>>;

/// The agent calls the controller makes, by node name.
pub trait AgentApi: Send + Sync + 'static {
    /// Starts warming `node` from a plan; the stream reports progress.
    fn prefetch(
        &self,
        node: &str,
        request: PrefetchRequest,
    ) -> BoxFuture<'static, Result<ProgressStream, Error>>;
    /// Cancels the prefetch of an index on `node`.
    fn cancel_prefetch(
        &self,
        node: &str,
        index_digest: &str,
    ) -> BoxFuture<'static, Result<bool, Error>>;
    /// Lists the startup traces `node` keeps.
    fn list_traces(&self, node: &str) -> BoxFuture<'static, Result<Vec<TraceSummary>, Error>>;
    /// Fetches one trace from `node`.
    fn get_trace(
        &self,
        node: &str,
        trace_id: &str,
    ) -> BoxFuture<'static, Result<GetTraceResponse, Error>>;
    /// Closes a container's startup window on `node` (its pod became Ready).
    fn container_ready(
        &self,
        node: &str,
        container_id: &str,
    ) -> BoxFuture<'static, Result<bool, Error>>;
    /// Hands `node`'s agent registry credentials from image pull secrets (kept in its
    /// memory until their expiry). Returns how many the agent now holds.
    fn set_credentials(
        &self,
        node: &str,
        credentials: Vec<RegistryCredential>,
    ) -> BoxFuture<'static, Result<u32, Error>>;
}

/// Node name → agent pod IP, from the agent pods' watch events.
#[derive(Debug, Default)]
pub struct AgentDirectory {
    by_node: RwLock<HashMap<String, IpAddr>>,
    /// Entries seen during a relist, swapped in at its end.
    relist: Mutex<Option<HashMap<String, IpAddr>>>,
}

impl AgentDirectory {
    pub fn new() -> Self {
        Self::default()
    }

    /// The agent address of `node`, if its agent pod is ready.
    pub fn get(&self, node: &str) -> Option<IpAddr> {
        read(&self.by_node).get(node).copied()
    }

    pub fn len(&self) -> usize {
        read(&self.by_node).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records an agent address directly (tests and simulations).
    pub fn insert(&self, node: &str, ip: IpAddr) {
        write(&self.by_node).insert(node.to_string(), ip);
    }

    /// Applies a watch event of the agent pods. Returns the nodes whose agent
    /// became reachable (so that waiting pushes can go ahead).
    pub fn apply(&self, event: &watcher::Event<Pod>) -> Vec<String> {
        let mut appeared = Vec::new();
        match event {
            watcher::Event::Apply(pod) => {
                let mut map = write(&self.by_node);
                match ready_agent(pod) {
                    Some((node, ip)) => {
                        if map.insert(node.clone(), ip) != Some(ip) {
                            appeared.push(node);
                        }
                    }
                    None => {
                        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()) {
                            // Only forget the node's agent if this pod was it.
                            let this_pod = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref());
                            if this_pod.is_none_or(|ip| {
                                map.get(node).map(|a| a.to_string()).as_deref() == Some(ip)
                            }) {
                                map.remove(node);
                            }
                        }
                    }
                }
            }
            watcher::Event::Delete(pod) => {
                if let Some((node, ip)) = pod_address(pod) {
                    let mut map = write(&self.by_node);
                    if map.get(&node) == Some(&ip) {
                        map.remove(&node);
                    }
                }
            }
            watcher::Event::Init => *lock(&self.relist) = Some(HashMap::new()),
            watcher::Event::InitApply(pod) => {
                if let (Some(seen), Some((node, ip))) =
                    (lock(&self.relist).as_mut(), ready_agent(pod))
                {
                    seen.insert(node, ip);
                }
            }
            watcher::Event::InitDone => {
                if let Some(seen) = lock(&self.relist).take() {
                    let mut map = write(&self.by_node);
                    appeared = seen
                        .iter()
                        .filter(|(n, ip)| map.get(*n) != Some(ip))
                        .map(|(n, _)| n.clone())
                        .collect();
                    *map = seen;
                }
            }
        }
        appeared
    }
}

/// Node and IP of a running, ready agent pod.
fn ready_agent(pod: &Pod) -> Option<(String, IpAddr)> {
    let status = pod.status.as_ref()?;
    let ready = status.phase.as_deref() == Some("Running")
        && pod.metadata.deletion_timestamp.is_none()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
    ready.then_some(())?;
    pod_address(pod)
}

fn pod_address(pod: &Pod) -> Option<(String, IpAddr)> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?.parse().ok()?;
    Some((node, ip))
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}
fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
fn lock<T>(lock: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Client certificate, key and CA of the controller→agent mTLS, as PEM files
/// (mounted from a Secret), and the name the agents' certificate carries.
#[derive(Clone, Debug)]
pub struct AgentTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// DNS name in the agents' serving certificate, checked instead of the IP.
    pub server_name: String,
}

impl AgentTlsFiles {
    /// Reads the files into a tonic client TLS configuration.
    pub fn load(&self) -> Result<ClientTlsConfig, Error> {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| Error::Tls(format!("cannot read {}: {e}", path.display())))
        };
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?))
            .domain_name(self.server_name.clone())
            // Agents speak only HTTP/2; do not require ALPN to say so.
            .assume_http2(true))
    }
}

/// [`AgentApi`] over gRPC, one lazily connected channel per agent.
pub struct GrpcAgents {
    directory: Arc<AgentDirectory>,
    port: u16,
    /// None: plain HTTP/2 (tests only; the agent refuses it on its TCP port).
    tls: Option<ClientTlsConfig>,
    channels: Mutex<HashMap<IpAddr, Channel>>,
    /// Deadline of unary calls.
    call_timeout: Duration,
}

impl GrpcAgents {
    pub fn new(directory: Arc<AgentDirectory>, port: u16, tls: Option<ClientTlsConfig>) -> Self {
        GrpcAgents {
            directory,
            port,
            tls,
            channels: Mutex::new(HashMap::new()),
            call_timeout: Duration::from_secs(30),
        }
    }

    fn client(&self, node: &str) -> Result<AgentClient<Channel>, Error> {
        let ip = self
            .directory
            .get(node)
            .ok_or_else(|| Error::NoAgent(node.to_string()))?;
        let mut channels = lock(&self.channels);
        if let Some(channel) = channels.get(&ip) {
            return Ok(AgentClient::new(channel.clone()));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let host = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        };
        let agent_error = |e: tonic::transport::Error| Error::Agent {
            node: node.to_string(),
            message: format!("endpoint {host}:{}: {e}", self.port),
        };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{host}:{}", self.port))
            .map_err(agent_error)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30));
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(agent_error)?;
        }
        let channel = endpoint.connect_lazy();
        channels.insert(ip, channel.clone());
        Ok(AgentClient::new(channel))
    }

    fn unary<T, F>(
        &self,
        node: &str,
        call: impl FnOnce(AgentClient<Channel>) -> F + Send + 'static,
    ) -> BoxFuture<'static, Result<T, Error>>
    where
        F: Future<Output = Result<tonic::Response<T>, tonic::Status>> + Send + 'static,
        T: Send + 'static,
    {
        let node = node.to_string();
        let client = self.client(&node);
        let timeout = self.call_timeout;
        async move {
            let response = tokio::time::timeout(timeout, call(client?))
                .await
                .map_err(|_| Error::Agent {
                    node: node.clone(),
                    message: format!("no answer within {timeout:?}"),
                })?
                .map_err(|status| status_error(&node, status))?;
            Ok(response.into_inner())
        }
        .boxed()
    }
}

fn status_error(node: &str, status: tonic::Status) -> Error {
    Error::Agent {
        node: node.to_string(),
        message: format!("{:?}: {}", status.code(), status.message()),
    }
}

impl AgentApi for GrpcAgents {
    fn prefetch(
        &self,
        node: &str,
        request: PrefetchRequest,
    ) -> BoxFuture<'static, Result<ProgressStream, Error>> {
        let node = node.to_string();
        let client = self.client(&node);
        async move {
            let response = client?
                .prefetch(request)
                .await
                .map_err(|s| status_error(&node, s))?;
            let stream = response
                .into_inner()
                .map(move |item| item.map_err(|s| status_error(&node, s)));
            Ok(stream.boxed())
        }
        .boxed()
    }

    fn cancel_prefetch(
        &self,
        node: &str,
        index_digest: &str,
    ) -> BoxFuture<'static, Result<bool, Error>> {
        let request = CancelPrefetchRequest {
            index_digest: index_digest.to_string(),
        };
        let call = self.unary(node, move |mut c| async move {
            c.cancel_prefetch(request).await
        });
        async move { Ok(call.await?.cancelled) }.boxed()
    }

    fn list_traces(&self, node: &str) -> BoxFuture<'static, Result<Vec<TraceSummary>, Error>> {
        let call = self.unary(node, |mut c| async move {
            c.list_traces(ListTracesRequest::default()).await
        });
        async move { Ok(call.await?.traces) }.boxed()
    }

    fn get_trace(
        &self,
        node: &str,
        trace_id: &str,
    ) -> BoxFuture<'static, Result<GetTraceResponse, Error>> {
        let request = GetTraceRequest {
            trace_id: trace_id.to_string(),
        };
        self.unary(node, move |mut c| async move { c.get_trace(request).await })
    }

    fn container_ready(
        &self,
        node: &str,
        container_id: &str,
    ) -> BoxFuture<'static, Result<bool, Error>> {
        let request = ContainerReadyRequest {
            container_id: container_id.to_string(),
        };
        let call = self.unary(node, move |mut c| async move {
            c.container_ready(request).await
        });
        async move { Ok(call.await?.trace_closed) }.boxed()
    }

    fn set_credentials(
        &self,
        node: &str,
        credentials: Vec<RegistryCredential>,
    ) -> BoxFuture<'static, Result<u32, Error>> {
        let request = SetCredentialsRequest { credentials };
        let call = self.unary(node, move |mut c| async move {
            c.set_credentials(request).await
        });
        async move { Ok(call.await?.stored) }.boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};

    fn agent_pod(node: &str, ip: &str, ready: bool) -> Pod {
        Pod {
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..PodCondition::default()
                }]),
                ..PodStatus::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn directory_follows_agent_pods() {
        let directory = AgentDirectory::new();
        assert_eq!(
            directory.apply(&watcher::Event::Apply(agent_pod("n1", "10.0.0.1", false))),
            Vec::<String>::new()
        );
        assert_eq!(directory.get("n1"), None);
        assert_eq!(
            directory.apply(&watcher::Event::Apply(agent_pod("n1", "10.0.0.1", true))),
            ["n1"]
        );
        assert_eq!(directory.get("n1"), Some("10.0.0.1".parse().unwrap()));
        // The same address again is no news.
        assert!(
            directory
                .apply(&watcher::Event::Apply(agent_pod("n1", "10.0.0.1", true)))
                .is_empty()
        );
        // A replaced agent pod's deletion does not forget the new one.
        directory.apply(&watcher::Event::Apply(agent_pod("n1", "10.0.0.2", true)));
        directory.apply(&watcher::Event::Delete(agent_pod("n1", "10.0.0.1", true)));
        assert_eq!(directory.get("n1"), Some("10.0.0.2".parse().unwrap()));
        directory.apply(&watcher::Event::Delete(agent_pod("n1", "10.0.0.2", true)));
        assert_eq!(directory.get("n1"), None);
    }

    #[test]
    fn a_relist_replaces_the_directory() {
        let directory = AgentDirectory::new();
        directory.apply(&watcher::Event::Apply(agent_pod("gone", "10.0.0.9", true)));
        directory.apply(&watcher::Event::Init);
        directory.apply(&watcher::Event::InitApply(agent_pod(
            "n1", "10.0.0.1", true,
        )));
        directory.apply(&watcher::Event::InitApply(agent_pod(
            "n2", "10.0.0.2", false,
        )));
        let mut appeared = directory.apply(&watcher::Event::InitDone);
        appeared.sort();
        assert_eq!(appeared, ["n1"]);
        assert_eq!(directory.get("gone"), None);
        assert_eq!(directory.len(), 1);
    }

    #[tokio::test]
    async fn nodes_without_an_agent_are_reported() {
        let agents = GrpcAgents::new(Arc::new(AgentDirectory::new()), 7443, None);
        let error = agents.list_traces("n1").await.unwrap_err();
        assert!(
            matches!(error, Error::NoAgent(ref n) if n == "n1"),
            "{error}"
        );
    }
}
