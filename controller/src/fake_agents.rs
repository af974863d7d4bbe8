//! An in-process stand-in for the node agents, implementing [`AgentApi`]: it
//! records every call and answers from canned data. The simulation benchmark
//! (`controller-sim`) and the tests use it; the real path is
//! [`crate::agents::GrpcAgents`].

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use stoker_api::agent::{
    GetTraceResponse, PrefetchProgress, PrefetchRequest, PrefetchState, RegistryCredential,
    TraceSummary,
};

use crate::Error;
use crate::agents::{AgentApi, ProgressStream};

/// One Prefetch call an agent received.
#[derive(Clone, Debug)]
pub struct ReceivedPush {
    pub node: String,
    pub index_digest: String,
    pub plan_len: usize,
    /// The request said the controller has learned the image.
    pub learning_complete: bool,
    pub at: Instant,
}

/// One SetCredentials call an agent received.
#[derive(Clone, Debug)]
pub struct ReceivedCredentials {
    pub node: String,
    pub credentials: Vec<RegistryCredential>,
    pub at: Instant,
}

/// See the module documentation.
#[derive(Default)]
pub struct FakeAgents {
    pushes: Mutex<Vec<ReceivedPush>>,
    traces: Mutex<HashMap<String, Vec<GetTraceResponse>>>,
    /// Nodes whose prefetches fail.
    failing: Mutex<HashSet<String>>,
    /// Nodes without an agent.
    absent: Mutex<HashSet<String>>,
    /// Nodes whose prefetches stay running (never send a final state).
    stalled: Mutex<HashSet<String>>,
    ready_calls: Mutex<Vec<(String, String)>>,
    cancels: Mutex<Vec<(String, String)>>,
    credential_calls: Mutex<Vec<ReceivedCredentials>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FakeAgents {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes `node`'s agent keep a trace.
    pub fn add_trace(&self, node: &str, trace: GetTraceResponse) {
        lock(&self.traces)
            .entry(node.to_string())
            .or_default()
            .push(trace);
    }

    pub fn set_failing(&self, node: &str, failing: bool) {
        set(&self.failing, node, failing);
    }

    pub fn set_absent(&self, node: &str, absent: bool) {
        set(&self.absent, node, absent);
    }

    pub fn set_stalled(&self, node: &str, stalled: bool) {
        set(&self.stalled, node, stalled);
    }

    /// Every Prefetch call received so far.
    pub fn pushes(&self) -> Vec<ReceivedPush> {
        lock(&self.pushes).clone()
    }

    pub fn push_count(&self) -> usize {
        lock(&self.pushes).len()
    }

    /// The time of the last Prefetch call received.
    pub fn last_push_at(&self) -> Option<Instant> {
        lock(&self.pushes).last().map(|p| p.at)
    }

    /// ContainerReady calls received, as (node, container id).
    pub fn ready_calls(&self) -> Vec<(String, String)> {
        lock(&self.ready_calls).clone()
    }

    /// CancelPrefetch calls received, as (node, index digest).
    pub fn cancels(&self) -> Vec<(String, String)> {
        lock(&self.cancels).clone()
    }

    /// Every SetCredentials call received so far.
    pub fn credential_calls(&self) -> Vec<ReceivedCredentials> {
        lock(&self.credential_calls).clone()
    }

    fn check_present(&self, node: &str) -> Result<(), Error> {
        if lock(&self.absent).contains(node) {
            Err(Error::NoAgent(node.to_string()))
        } else {
            Ok(())
        }
    }
}

fn set(set: &Mutex<HashSet<String>>, node: &str, on: bool) {
    if on {
        lock(set).insert(node.to_string());
    } else {
        lock(set).remove(node);
    }
}

fn progress(
    digest: &str,
    state: PrefetchState,
    done: u64,
    total: u64,
    error: &str,
) -> PrefetchProgress {
    PrefetchProgress {
        index_digest: digest.to_string(),
        state: state as i32,
        chunks_done: done,
        chunks_total: total,
        bytes_done: done << 20,
        bytes_total: total << 20,
        error: error.to_string(),
    }
}

impl AgentApi for FakeAgents {
    fn prefetch(
        &self,
        node: &str,
        request: PrefetchRequest,
    ) -> BoxFuture<'static, Result<ProgressStream, Error>> {
        let result = self.check_present(node).map(|()| {
            lock(&self.pushes).push(ReceivedPush {
                node: node.to_string(),
                index_digest: request.index_digest.clone(),
                plan_len: request.plan.len(),
                learning_complete: request.learning_complete,
                at: Instant::now(),
            });
            let digest = request.index_digest;
            let total = 10;
            let running = progress(&digest, PrefetchState::Running, 5, total, "");
            if lock(&self.stalled).contains(node) {
                return futures::stream::iter([Ok(running)])
                    .chain(futures::stream::pending())
                    .boxed();
            }
            let last = if lock(&self.failing).contains(node) {
                progress(
                    &digest,
                    PrefetchState::Failed,
                    5,
                    total,
                    "registry returned 503",
                )
            } else {
                progress(&digest, PrefetchState::Done, total, total, "")
            };
            futures::stream::iter([Ok(running), Ok(last)]).boxed()
        });
        async move { result }.boxed()
    }

    fn cancel_prefetch(
        &self,
        node: &str,
        index_digest: &str,
    ) -> BoxFuture<'static, Result<bool, Error>> {
        lock(&self.cancels).push((node.to_string(), index_digest.to_string()));
        async { Ok(true) }.boxed()
    }

    fn list_traces(&self, node: &str) -> BoxFuture<'static, Result<Vec<TraceSummary>, Error>> {
        let result = self.check_present(node).map(|()| {
            lock(&self.traces)
                .get(node)
                .map(|t| t.iter().filter_map(|t| t.summary.clone()).collect())
                .unwrap_or_default()
        });
        async move { result }.boxed()
    }

    fn get_trace(
        &self,
        node: &str,
        trace_id: &str,
    ) -> BoxFuture<'static, Result<GetTraceResponse, Error>> {
        let found = lock(&self.traces)
            .get(node)
            .and_then(|t| {
                t.iter()
                    .find(|t| t.summary.as_ref().is_some_and(|s| s.trace_id == trace_id))
                    .cloned()
            })
            .ok_or_else(|| Error::Agent {
                node: node.to_string(),
                message: format!("NotFound: no trace {trace_id}"),
            });
        async move { found }.boxed()
    }

    fn container_ready(
        &self,
        node: &str,
        container_id: &str,
    ) -> BoxFuture<'static, Result<bool, Error>> {
        lock(&self.ready_calls).push((node.to_string(), container_id.to_string()));
        let mut traces = lock(&self.traces);
        let mut closed = false;
        for trace in traces.get_mut(node).into_iter().flatten() {
            if let Some(s) = trace
                .summary
                .as_mut()
                .filter(|s| s.container_id == container_id && !s.complete)
            {
                s.complete = true;
                closed = true;
            }
        }
        async move { Ok(closed) }.boxed()
    }

    fn set_credentials(
        &self,
        node: &str,
        credentials: Vec<RegistryCredential>,
    ) -> BoxFuture<'static, Result<u32, Error>> {
        let result = self.check_present(node).map(|()| {
            let stored = credentials.len() as u32;
            lock(&self.credential_calls).push(ReceivedCredentials {
                node: node.to_string(),
                credentials,
                at: Instant::now(),
            });
            stored
        });
        async move { result }.boxed()
    }
}
