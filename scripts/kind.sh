#!/usr/bin/env bash
# bpfproxy in a kind cluster without kube-proxy: up | deploy | test | down (make kind-*).
# Each step first checks for docker (a running daemon) and kind, and stops with what is
# missing. Settings: KIND_CLUSTER (default bpfproxy), BPFPROXY_IMAGE (default bpfproxy:dev).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
cluster="${KIND_CLUSTER:-bpfproxy}"
image="${BPFPROXY_IMAGE:-bpfproxy:dev}"
context="kind-$cluster"            # the kubeconfig context `kind create cluster` writes
namespace=bpfp-test

log() { printf 'kind: %s\n' "$*" >&2; }
die() { printf 'kind: %s\n' "$*" >&2; exit 1; }

need_tools() {
    command -v docker >/dev/null 2>&1 \
        || die "docker is not installed (or not on PATH); the kind targets need Docker: https://docs.docker.com/engine/install/"
    docker info >/dev/null 2>&1 \
        || die "docker is installed but its daemon is not answering (docker info failed); start it (systemctl start docker) or check your permissions"
    command -v kind >/dev/null 2>&1 \
        || die "kind is not installed (or not on PATH); see https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is not installed (or not on PATH)"
    done
}

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "$cluster"; }

need_cluster() {
    cluster_exists || die "no kind cluster named $cluster; run: make kind-up"
}

kubectl_() { kubectl --context "$context" "$@"; }

up() {
    need_tools
    if cluster_exists; then
        log "cluster $cluster exists already"
        return 0
    fi
    kind create cluster --name "$cluster" --config "$repo/manifests/kind-config.yaml"
    log "cluster $cluster is up without kube-proxy; next: make kind-deploy"
}

deploy() {
    need_tools kubectl
    need_cluster
    log "building $image"
    # The context is only what the image needs (not .venv): a tar on stdin.
    tar -C "$repo" --exclude=__pycache__ --exclude=agent/api/generated -cf - \
        pyproject.toml README.md agent api bpf manifests/Dockerfile manifests/entrypoint.sh \
        | docker build -f manifests/Dockerfile -t "$image" -
    kind load docker-image "$image" --name "$cluster"
    kubectl_ apply -f "$repo/manifests/rbac.yaml" -f "$repo/manifests/configmap.yaml"
    # The agent reaches the API server directly: kind's control-plane container.
    kubectl_ -n kube-system patch configmap bpfproxy --type merge \
        -p "{\"data\":{\"KUBERNETES_SERVICE_HOST\":\"$cluster-control-plane\",\"KUBERNETES_SERVICE_PORT\":\"6443\"}}"
    kubectl_ apply -f "$repo/manifests/daemonset.yaml"
    kubectl_ -n kube-system set image daemonset/bpfproxy "bpfproxy=$image"
    # A rebuilt image under the same tag: restart so every node runs it.
    kubectl_ -n kube-system rollout restart daemonset/bpfproxy
    kubectl_ -n kube-system rollout status daemonset/bpfproxy --timeout=300s
    log "bpfproxy runs on every node; next: make kind-test"
}

test_() {
    need_tools kubectl
    need_cluster
    kubectl_ -n kube-system rollout status daemonset/bpfproxy --timeout=120s
    kubectl_ apply -f "$repo/manifests/test-app.yaml"
    kubectl_ -n "$namespace" rollout status deployment/echo --timeout=180s
    kubectl_ -n "$namespace" wait --for=condition=Ready pod/client --timeout=180s
    local cluster_ip node_ip
    cluster_ip="$(kubectl_ -n "$namespace" get service echo -o jsonpath='{.spec.clusterIP}')"
    node_ip="$(kubectl_ get node "$cluster-worker" \
        -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')"

    log "from a pod: ClusterIP $cluster_ip:80 and by name (cluster DNS is a Service too)"
    kubectl_ -n "$namespace" exec client -- /agnhost connect --timeout=5s "$cluster_ip:80"
    kubectl_ -n "$namespace" exec client -- /agnhost connect --timeout=5s echo:80
    log "from a pod: NodePort $node_ip:30080"
    kubectl_ -n "$namespace" exec client -- /agnhost connect --timeout=5s "$node_ip:30080"

    log "from the nodes (docker exec): ClusterIP, and the other node's NodePort"
    docker exec "$cluster-control-plane" curl -fsS --max-time 5 "http://$cluster_ip:80/hostname"
    echo
    docker exec "$cluster-control-plane" curl -fsS --max-time 5 "http://$node_ip:30080/hostname"
    echo
    log "from the host: NodePort $node_ip:30080 (outside every node)"
    curl -fsS --max-time 5 "http://$node_ip:30080/hostname" \
        || docker run --rm --network kind curlimages/curl:8.16.0 -fsS --max-time 5 \
            "http://$node_ip:30080/hostname"
    echo
    log "every check passed"
}

down() {
    need_tools
    if cluster_exists; then
        kind delete cluster --name "$cluster"
    else
        log "no cluster named $cluster"
    fi
}

case "${1:-}" in
    up) up ;;
    deploy) deploy ;;
    test) test_ ;;
    down) down ;;
    *) die "usage: $0 up|deploy|test|down" ;;
esac
