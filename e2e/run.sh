#!/usr/bin/env bash
# Stoker's end-to-end scenario on a kind cluster (issue 7, point 4):
#
#   1. create the cluster (kind-config/cluster.yaml) and a local registry, install
#      Stoker (manifests/overlays/kind);
#   2. build and push a sample image, convert it with `stoker convert`;
#   3. deploy it with `stoker.dev/prefetch: "true"` and wait until its
#      ImagePrefetch has learned a plan;
#   4. add a GPU-pool node (its kubelet was held back: kind cannot autoscale) and
#      scale the Deployment so that the new replica must land on it;
#   5. assert the pod was not scheduled before the node was warm, that the node
#      was warmed from the plan, and that the pod's start fetched almost nothing;
#   6. print timings.
#
# Needs Docker, kind and kubectl. Without them it prints one line and exits 0,
# claiming nothing. E2E_KEEP=1 keeps the cluster and registry afterwards;
# KIND_NODE_IMAGE picks the node image (default: kind's).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

skip() { echo "e2e: SKIPPED: $*"; exit 0; }
command -v docker >/dev/null 2>&1 || skip "docker not found (kind-based e2e needs a Docker engine)"
docker info >/dev/null 2>&1 || skip "no Docker engine answers (docker info failed)"
command -v kind >/dev/null 2>&1 || skip "kind not found (https://kind.sigs.k8s.io)"
command -v kubectl >/dev/null 2>&1 || skip "kubectl not found"

CLUSTER=stoker
REGISTRY=kind-registry
REGISTRY_PORT=5001
NEW_NODE="${CLUSTER}-worker3"   # the second GPU-pool worker of kind-config/cluster.yaml
STARTUP_TAINT=startup-taint.cluster-autoscaler.kubernetes.io/stoker-warming
IMAGE="localhost:${REGISTRY_PORT}/stoker-sample:v1"
declare -A T   # phase -> seconds

log() { printf '%(%H:%M:%S)T e2e: %s\n' -1 "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
now() { date +%s; }
# wait_for DESCRIPTION TIMEOUT_SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 timeout=$2 deadline
  shift 2
  deadline=$(($(now) + timeout))
  until "$@" >/dev/null 2>&1; do
    (($(now) < deadline)) || fail "timed out after ${timeout}s waiting for $what"
    sleep 2
  done
}
to_epoch() { date -d "$1" +%s; }

cleanup() {
  if [[ "${E2E_KEEP:-0}" == 1 ]]; then
    log "E2E_KEEP=1: keeping cluster '$CLUSTER' and registry '$REGISTRY'"
    return
  fi
  kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  [[ "${CREATED_REGISTRY:-0}" == 1 ]] && docker rm -f "$REGISTRY" >/dev/null 2>&1 || true
}
trap cleanup EXIT

# --- 1. cluster, registry, install ------------------------------------------------
start=$(now)
if [[ "$(docker inspect -f '{{.State.Running}}' "$REGISTRY" 2>/dev/null || true)" != true ]]; then
  log "starting the local registry $REGISTRY (localhost:$REGISTRY_PORT)"
  docker run -d --restart=always -p "127.0.0.1:${REGISTRY_PORT}:5000" --network bridge \
    --name "$REGISTRY" registry:2 >/dev/null
  CREATED_REGISTRY=1
fi

log "building images and the stoker CLI"
make images IMAGE_REGISTRY="localhost:${REGISTRY_PORT}" IMAGE_TAG=e2e
cargo build --release -p stoker-cli --bin stoker
STOKER=target/release/stoker
for image in agent controller certgen; do
  docker push "localhost:${REGISTRY_PORT}/stoker-${image}:e2e" >/dev/null
done

log "creating kind cluster '$CLUSTER'"
kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
kind create cluster --config kind-config/cluster.yaml --name "$CLUSTER" \
  ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} --wait 120s
for node in $(kind get nodes --name "$CLUSTER"); do
  docker exec "$node" mkdir -p "/etc/containerd/certs.d/localhost:${REGISTRY_PORT}"
  printf '[host."http://%s:5000"]\n' "$REGISTRY" |
    docker exec -i "$node" cp /dev/stdin "/etc/containerd/certs.d/localhost:${REGISTRY_PORT}/hosts.toml"
done
if [[ "$(docker inspect -f '{{json .NetworkSettings.Networks.kind}}' "$REGISTRY")" == null ]]; then
  docker network connect kind "$REGISTRY"
fi
kubectl apply -f kind-config/local-registry-hosting.yaml >/dev/null

# The second GPU node stands for the node an autoscaler adds later: hold its
# kubelet and forget its Node; starting the kubelet again registers it anew,
# with the taints of kind-config/cluster.yaml.
docker exec "$NEW_NODE" systemctl stop kubelet
kubectl delete node "$NEW_NODE" --wait=true >/dev/null
T[cluster]=$(($(now) - start))

start=$(now)
log "installing Stoker (manifests/overlays/kind)"
kubectl apply -f manifests/crds/ >/dev/null
kubectl apply -k manifests/overlays/kind >/dev/null
kubectl -n stoker-system wait --for=condition=complete job/stoker-certgen --timeout=180s
kubectl -n stoker-system rollout status daemonset/stoker-agent --timeout=300s
kubectl -n stoker-system rollout status deployment/stoker-controller --timeout=300s
T[install]=$(($(now) - start))

# --- 2. sample image ------------------------------------------------------------
start=$(now)
log "building, pushing and converting $IMAGE"
docker build -q -t "$IMAGE" e2e/sample >/dev/null
docker push "$IMAGE" >/dev/null
"$STOKER" convert --plain-http "$IMAGE"
T[convert]=$(($(now) - start))

# --- 3. deploy, learn -----------------------------------------------------------
start=$(now)
kubectl apply -f e2e/workload.yaml >/dev/null
kubectl rollout status deployment/sample --timeout=300s
plan_learned() {
  [[ -n "$(kubectl get imageprefetch -n default -o jsonpath='{.items[0].status.images[0].plan}')" ]]
}
wait_for "the ImagePrefetch to learn a plan" 300 plan_learned
T[learn]=$(($(now) - start))
kubectl get imageprefetch -n default

# --- 4. scale-up onto a new node ----------------------------------------------
start=$(now)
log "adding GPU node $NEW_NODE and scaling the Deployment to 2"
docker exec "$NEW_NODE" systemctl start kubelet
wait_for "node $NEW_NODE to register" 120 kubectl get node "$NEW_NODE"
kubectl scale deployment/sample --replicas=2 >/dev/null
taints=$(kubectl get node "$NEW_NODE" -o jsonpath='{.spec.taints[*].key}')
[[ " $taints " == *" $STARTUP_TAINT "* ]] || fail "$NEW_NODE registered without the startup taint ($taints)"
new_pod() {
  kubectl get pods -l app=sample --field-selector "spec.nodeName=$NEW_NODE" \
    -o jsonpath='{.items[0].metadata.name}'
}
new_pod_ready() {
  local pod
  pod=$(new_pod) && [[ -n "$pod" ]] && kubectl wait --for=condition=Ready "pod/$pod" --timeout=5s
}
wait_for "the new replica to be Ready on $NEW_NODE" 600 new_pod_ready
T[scale_up]=$(($(now) - start))

# --- 5. assertions --------------------------------------------------------------
pod=$(new_pod)
registered=$(to_epoch "$(kubectl get node "$NEW_NODE" -o jsonpath='{.metadata.creationTimestamp}')")
warm=$(kubectl get node "$NEW_NODE" \
  -o jsonpath='{.status.conditions[?(@.type=="StokerWarm")].lastTransitionTime}')
[[ -n "$warm" ]] || fail "$NEW_NODE has no StokerWarm condition"
warm_status=$(kubectl get node "$NEW_NODE" -o jsonpath='{.status.conditions[?(@.type=="StokerWarm")].status}')
[[ "$warm_status" == True ]] || fail "$NEW_NODE StokerWarm is $warm_status"
warm=$(to_epoch "$warm")
scheduled=$(to_epoch "$(kubectl get pod "$pod" \
  -o jsonpath='{.status.conditions[?(@.type=="PodScheduled")].lastTransitionTime}')")
ready=$(to_epoch "$(kubectl get pod "$pod" \
  -o jsonpath='{.status.conditions[?(@.type=="Ready")].lastTransitionTime}')")
((scheduled >= warm)) || fail "pod $pod was scheduled at $scheduled, before $NEW_NODE was warm at $warm"

# The new node's agent metrics: bytes fetched by the prefetch vs. by the pod.
metrics=$(docker exec "$NEW_NODE" curl -fsS http://127.0.0.1:9501/metrics)
bytes() {
  awk -v p="$1" '$1 ~ /^stoker_fetch_bytes(_bytes)?_total/ && $1 ~ "priority=\"" p "\"" { s += $2 } END { printf "%d", s }' <<<"$metrics"
}
prefetched=$(bytes prefetch)
on_demand=$(bytes on_demand)
((prefetched > 0)) || fail "$NEW_NODE fetched nothing by prefetch: it was not warmed from the plan"
# Almost nothing at start: under 5 % of what the plan brought, plus 1 MiB of slack
# for chunks outside the plan (image metadata, the shell).
limit=$((prefetched / 20 + 1048576))
((on_demand <= limit)) || fail "the pod's start fetched $on_demand bytes on demand (limit $limit)"

# --- 6. timings -----------------------------------------------------------------
printf '\n%-44s %10s\n' "phase" "seconds"
for phase in cluster install convert learn scale_up; do
  printf '%-44s %10s\n' "$phase" "${T[$phase]}"
done
printf '%-44s %10s\n' "new node registered -> warm" "$((warm - registered))"
printf '%-44s %10s\n' "warm -> pod scheduled" "$((scheduled - warm))"
printf '%-44s %10s\n' "pod scheduled -> Ready" "$((ready - scheduled))"
printf '%-44s %10s\n' "bytes prefetched on $NEW_NODE" "$prefetched"
printf '%-44s %10s\n' "bytes fetched on demand on $NEW_NODE" "$on_demand"
echo "e2e: PASSED"
