#!/bin/sh
# stoker-certgen: issues and renews the mutual-TLS certificates of the
# controller -> agent gRPC connection (docs/SECURITY.md, "mTLS").
#
#   stoker-certgen            read and write the Secrets through the Kubernetes API
#                             (in a pod: the ServiceAccount token, KUBERNETES_SERVICE_*)
#   stoker-certgen --local D  the same, with the "Secrets" as directories under D
#                             (D/stoker-ca, D/stoker-agent-tls, ...): for tests and
#                             for clusters whose Secrets are managed elsewhere
#
# What it keeps, in the namespace $STOKER_NAMESPACE (default stoker-system):
#   stoker-ca              ca.crt, ca.key    the private CA, created once
#   stoker-agent-tls       tls.crt, tls.key, ca.crt
#                          server certificate for DNS:stoker-agent.<ns>.svc, which
#                          the controller checks when it dials an agent's pod IP
#   stoker-controller-tls  tls.crt, tls.key, ca.crt
#                          client certificate CN=stoker-controller
#
# Idempotent: run it again (the CronJob does, daily) and it only re-issues a leaf
# certificate that is missing, not signed by the current CA, for other names, or
# within $STOKER_CERT_RENEW_DAYS (default 30) of expiry. Leaf certificates last
# $STOKER_CERT_DAYS (default 90) days; the kubelet refreshes the mounted files and
# the agent and controller reload them without restarting.
set -eu

NAMESPACE=${STOKER_NAMESPACE:-stoker-system}
LEAF_DAYS=${STOKER_CERT_DAYS:-90}
RENEW_DAYS=${STOKER_CERT_RENEW_DAYS:-30}
CA_DAYS=${STOKER_CA_DAYS:-3650}
LOCAL_DIR=""

log() { printf 'stoker-certgen: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "${1:-}" in
  --local)
    [ $# -eq 2 ] || die "usage: stoker-certgen [--local DIR]"
    LOCAL_DIR=$2
    mkdir -p "$LOCAL_DIR"
    ;;
  "") ;;
  *) die "unknown argument '$1'; usage: stoker-certgen [--local DIR]" ;;
esac

for tool in openssl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
if [ -z "$LOCAL_DIR" ]; then
  for tool in curl jq base64; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
  done
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
umask 077

# --- Secret storage: the Kubernetes API, or directories in --local mode --------

# The pod's ServiceAccount token and the API server's CA (overridable for tests).
SA_DIR=${STOKER_SA_DIR:-/var/run/secrets/kubernetes.io/serviceaccount}
api_url() {
  host=${KUBERNETES_SERVICE_HOST:?not in a pod: KUBERNETES_SERVICE_HOST is unset (use --local DIR)}
  case "$host" in *:*) host="[$host]" ;; esac
  printf 'https://%s:%s/api/v1/namespaces/%s/secrets%s' \
    "$host" "${KUBERNETES_SERVICE_PORT:-443}" "$NAMESPACE" "$1"
}

# kube METHOD PATH [BODY_FILE] -> prints the HTTP status; the body lands in $WORK/response
kube() {
  set -- "$1" "$(api_url "$2")" "${3:-}"
  if [ -n "$3" ]; then
    curl -sS -o "$WORK/response" -w '%{http_code}' -X "$1" \
      --cacert "$SA_DIR/ca.crt" -H "Authorization: Bearer $(cat "$SA_DIR/token")" \
      -H 'Content-Type: application/json' --data-binary "@$3" "$2"
  else
    curl -sS -o "$WORK/response" -w '%{http_code}' -X "$1" \
      --cacert "$SA_DIR/ca.crt" -H "Authorization: Bearer $(cat "$SA_DIR/token")" "$2"
  fi
}

# load_secret NAME DIR: copies the Secret's keys into DIR as files; returns 1 if
# the Secret does not exist. Remembers its resourceVersion for store_secret.
load_secret() {
  mkdir -p "$2"
  if [ -n "$LOCAL_DIR" ]; then
    [ -d "$LOCAL_DIR/$1" ] || return 1
    cp "$LOCAL_DIR/$1"/* "$2"/ 2>/dev/null || true
    return 0
  fi
  status=$(kube GET "/$1") || die "GET secret $1 failed (curl error)"
  case "$status" in
    200) ;;
    404) return 1 ;;
    *) die "GET secret $NAMESPACE/$1: HTTP $status: $(cat "$WORK/response")" ;;
  esac
  jq -r '.metadata.resourceVersion' "$WORK/response" >"$2/.resourceVersion"
  for key in $(jq -r '.data // {} | keys[]' "$WORK/response"); do
    jq -r --arg k "$key" '.data[$k]' "$WORK/response" | base64 -d >"$2/$key" \
      || die "secret $1 key $key is not valid base64"
  done
  return 0
}

# store_secret NAME TYPE DIR KEY...: creates or replaces the Secret with those keys.
# A concurrent writer makes the write fail (409), and the Job retries.
store_secret() {
  name=$1 type=$2 dir=$3
  shift 3
  if [ -n "$LOCAL_DIR" ]; then
    mkdir -p "$LOCAL_DIR/$name.new"
    for key in "$@"; do cp "$dir/$key" "$LOCAL_DIR/$name.new/$key"; done
    rm -rf "$LOCAL_DIR/$name"
    mv "$LOCAL_DIR/$name.new" "$LOCAL_DIR/$name"
    return 0
  fi
  data='{}'
  for key in "$@"; do
    data=$(printf '%s' "$data" | jq --arg k "$key" --arg v "$(base64 <"$dir/$key" | tr -d '\n')" '.[$k] = $v')
  done
  version=""
  [ -f "$dir/.resourceVersion" ] && version=$(cat "$dir/.resourceVersion")
  jq -n --arg name "$name" --arg ns "$NAMESPACE" --arg type "$type" --arg rv "$version" \
    --argjson data "$data" '{
      apiVersion: "v1", kind: "Secret", type: $type, data: $data,
      metadata: ({name: $name, namespace: $ns,
                  labels: {"app.kubernetes.io/part-of": "stoker",
                           "app.kubernetes.io/managed-by": "stoker-certgen"}}
                 + (if $rv == "" then {} else {resourceVersion: $rv} end))
    }' >"$WORK/body.json"
  if [ -n "$version" ]; then
    status=$(kube PUT "/$name" "$WORK/body.json") || die "PUT secret $name failed (curl error)"
  else
    status=$(kube POST "" "$WORK/body.json") || die "POST secret $name failed (curl error)"
  fi
  case "$status" in
    200 | 201) log "wrote secret $NAMESPACE/$name" ;;
    *) die "writing secret $NAMESPACE/$name: HTTP $status: $(cat "$WORK/response")" ;;
  esac
}

# --- Certificates ---------------------------------------------------------------

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
serial() { printf '0x%s' "$(openssl rand -hex 16)"; }

ensure_ca() {
  if load_secret stoker-ca "$WORK/ca" && [ -s "$WORK/ca/ca.crt" ] && [ -s "$WORK/ca/ca.key" ]; then
    openssl x509 -in "$WORK/ca/ca.crt" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null \
      || log "warning: the CA expires within $RENEW_DAYS days; rotate it (docs/SECURITY.md)"
    return 0
  fi
  log "creating the CA (stoker-ca, $CA_DAYS days)"
  new_key "$WORK/ca/ca.key"
  openssl req -x509 -new -key "$WORK/ca/ca.key" -out "$WORK/ca/ca.crt" -days "$CA_DAYS" \
    -subj "/O=stoker/CN=stoker-ca" -set_serial "$(serial)" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" >/dev/null 2>&1 || die "openssl could not create the CA"
  store_secret stoker-ca Opaque "$WORK/ca" ca.crt ca.key
}

# leaf_is_current DIR SAN: the certificate in DIR is signed by the current CA,
# carries exactly the wanted names, and is not due for renewal.
leaf_is_current() {
  [ -s "$1/tls.crt" ] && [ -s "$1/tls.key" ] || return 1
  openssl verify -CAfile "$WORK/ca/ca.crt" "$1/tls.crt" >/dev/null 2>&1 || return 1
  openssl x509 -in "$1/tls.crt" -noout -checkend $((RENEW_DAYS * 86400)) >/dev/null || return 1
  have=$(openssl x509 -in "$1/tls.crt" -noout -ext subjectAltName 2>/dev/null | tail -n +2 | tr -d ' ')
  [ "$have" = "$(printf '%s' "$2" | tr -d ' ')" ] || return 1
  cmp -s "$1/ca.crt" "$WORK/ca/ca.crt" || return 1
  return 0
}

# ensure_leaf SECRET CN SAN EKU
ensure_leaf() {
  secret=$1 cn=$2 san=$3 eku=$4 dir="$WORK/$1"
  if load_secret "$secret" "$dir" && leaf_is_current "$dir" "$san"; then
    log "$secret is current"
    return 0
  fi
  log "issuing $secret (CN=$cn, $san, $LEAF_DAYS days)"
  new_key "$dir/tls.key"
  openssl req -new -key "$dir/tls.key" -subj "/O=stoker/CN=$cn" -out "$dir/tls.csr" 2>/dev/null \
    || die "openssl could not create the request for $secret"
  cat >"$dir/ext.cnf" <<EOF
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = $eku
subjectAltName = $san
authorityKeyIdentifier = keyid
subjectKeyIdentifier = hash
EOF
  openssl x509 -req -in "$dir/tls.csr" -CA "$WORK/ca/ca.crt" -CAkey "$WORK/ca/ca.key" \
    -set_serial "$(serial)" -days "$LEAF_DAYS" -extfile "$dir/ext.cnf" -out "$dir/tls.crt" 2>/dev/null \
    || die "openssl could not sign $secret"
  cp "$WORK/ca/ca.crt" "$dir/ca.crt"
  store_secret "$secret" kubernetes.io/tls "$dir" tls.crt tls.key ca.crt
}

ensure_ca
ensure_leaf stoker-agent-tls stoker-agent \
  "DNS:stoker-agent.$NAMESPACE.svc, DNS:stoker-agent.$NAMESPACE.svc.cluster.local" serverAuth
ensure_leaf stoker-controller-tls stoker-controller \
  "DNS:stoker-controller.$NAMESPACE.svc, URI:spiffe://stoker/controller" clientAuth
log "done"
