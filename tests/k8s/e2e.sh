#!/usr/bin/env bash
# Ballast's end-to-end suite on a real Kubernetes: builds the cluster's
# programs and images (cached), starts the one-node cluster of cluster.sh,
# installs the chart with helm exactly as the README says, and runs the
# scenarios with kubectl. Whatever happens, the cluster is torn down.
#
#   tests/k8s/e2e.sh            every scenario
#   tests/k8s/e2e.sh 1 2        only those scenarios (the install always runs)
#
# Besides the DaemonSet's agent on the Kubernetes node, two storage agents
# run as plain processes on loopback (nodes agent-2 and agent-3), so that
# volumes have three replicas on three agents as on a real cluster of three
# storage nodes. Needs root, and what scripts/setup.sh installs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cache=${BALLAST_K8S_CACHE:-/var/cache/ballast-k8s}
# Must match the paths of values-test.yaml.
export BALLAST_K8S_RUN=/var/tmp/ballast-k8s
run=$BALLAST_K8S_RUN
export KUBECONFIG=$run/admin.kubeconfig
export PATH=$cache/bin:$repo/target/debug:$PATH
controller=http://10.250.0.1:9600
scenarios=("$@")
[[ ${#scenarios[@]} -eq 0 ]] && scenarios=(1 2)

log() { echo "e2e: $*" >&2; }
fail() {
    log "FAIL: $*"
    exit 1
}
# expect WHAT ACTUAL EXPECTED
expect() {
    [[ $2 == "$3" ]] || fail "$1: got '$2', expected '$3'"
    log "ok: $1 is '$3'"
}

timings=()
# phase NAME COMMAND...: runs COMMAND and records how long it took.
phase() {
    local name=$1 start=$SECONDS
    shift
    log "phase $name"
    "$@"
    timings+=("$name $((SECONDS - start)) s")
}

diagnose() {
    log "diagnostics:"
    kubectl get pods -A -o wide 2>&1 | sed 's/^/  /' >&2 || true
    kubectl get pvc,pv,volumeattachments -A 2>&1 | sed 's/^/  /' >&2 || true
    kubectl get events -A --sort-by=.lastTimestamp 2>&1 | tail -30 | sed 's/^/  /' >&2 || true
    local pod
    for pod in $(kubectl -n ballast get pods -o name 2>/dev/null); do
        kubectl -n ballast logs "$pod" --all-containers --tail=40 --prefix 2>&1 | sed 's/^/  /' >&2 || true
    done
    tail -n 30 "$run"/logs/kubelet.log 2>/dev/null | sed 's/^/  kubelet: /' >&2 || true
}

finish() {
    local status=$?
    [[ $status -ne 0 ]] && diagnose
    "$here/cluster.sh" down || true
    log "timings: ${timings[*]}"
    [[ $status -eq 0 ]] && log "PASS: scenarios ${scenarios[*]}"
    exit "$status"
}
trap finish EXIT

# Two storage agents outside Kubernetes, recorded for cluster.sh down.
start_agents() {
    local n
    for n in 2 3; do
        local dir=$run/agent-$n
        mkdir -p "$dir"
        setsid ballast-agent --state-dir "$dir" --node-id "agent-$n" \
            --grpc-listen "127.0.0.1:95$((n + 10))" --data-listen "127.0.0.1:97$((n + 10))" \
            --controller "$controller" --pool-file "$dir/pool.img" --pool-size 6GiB \
            >"$run/logs/agent-$n.log" 2>&1 &
        echo "$! agent-$n" >>"$run/pids"
    done
}

# wait_until WHAT SECONDS COMMAND...: retries COMMAND once a second.
wait_until() {
    local what=$1 seconds=$2 i
    shift 2
    for ((i = 0; i < seconds; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    fail "$what: not within ${seconds} s"
}

nodes_up() {
    [[ $(ballast --controller "$controller" -o json node list |
        python3 -c 'import json,sys; print(sum(1 for n in json.load(sys.stdin) if n["state"] == "up"))') == 3 ]]
}

install() {
    # The README's "Deploy to Kubernetes" commands, with the test values.
    "$repo/charts/ballast/fetch-crds.sh"
    helm install ballast "$repo/charts/ballast" --namespace ballast --create-namespace \
        --values "$here/values-test.yaml" --wait --timeout 5m
    wait_until "three storage nodes up" 60 nodes_up
}

scenario_1() {
    log "scenario 1: the chart is installed and kubelet knows the driver"
    kubectl -n ballast wait --for=condition=Ready pod --all --timeout=120s >/dev/null
    expect "Ballast pods not Ready" \
        "$(kubectl -n ballast get pods -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -vc True || true)" 0
    expect "the CSIDriver's attachRequired" "$(kubectl get csidriver csi.ballast.io -o jsonpath='{.spec.attachRequired}')" true
    expect "the StorageClass's provisioner" "$(kubectl get storageclass ballast -o jsonpath='{.provisioner}')" csi.ballast.io
    local node
    node=$(kubectl get nodes -o jsonpath='{.items[0].metadata.name}')
    # Only kubelet writes CSINode drivers: this is the plugin registration.
    wait_until "csi.ballast.io in CSINode $node" 60 \
        bash -c "kubectl get csinode $node -o jsonpath='{.spec.drivers[*].name}' | grep -qw csi.ballast.io"
    expect "the node's topology key in CSINode" \
        "$(kubectl get csinode "$node" -o jsonpath='{.spec.drivers[?(@.name=="csi.ballast.io")].topologyKeys[0]}')" \
        topology.ballast.io/node
}

psql_in() {
    kubectl exec "$1" -- psql -h /tmp -U postgres -d postgres -v ON_ERROR_STOP=1 -At -c "$2"
}

scenario_2() {
    log "scenario 2: PostgreSQL in a StatefulSet on a Ballast PVC"
    kubectl apply -f "$here/manifests/postgres.yaml" >/dev/null
    kubectl wait --for=jsonpath='{.status.phase}'=Bound pvc/data-pg-0 --timeout=180s >/dev/null
    kubectl wait --for=condition=Ready pod/pg-0 --timeout=180s >/dev/null
    local pv volume
    pv=$(kubectl get pvc data-pg-0 -o jsonpath='{.spec.volumeName}')
    expect "the PV's driver" "$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.driver}')" csi.ballast.io
    volume=$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')
    expect "in-sync replicas of $volume" "$(ballast --controller "$controller" -o json volume show "$volume" |
        python3 -c 'import json,sys; v=json.load(sys.stdin); print(sum(1 for r in v["replicas"] if r["state"] == "in-sync"))')" 3

    psql_in pg-0 "CREATE TABLE marker (v text); INSERT INTO marker VALUES ('written before the pod was deleted')" >/dev/null
    kubectl exec pg-0 -- pgbench -h /tmp -U postgres -i -s 2 -q postgres >/dev/null 2>&1
    local out
    out=$(kubectl exec pg-0 -- pgbench -h /tmp -U postgres -c 2 -T 10 postgres 2>&1)
    expect "pgbench's failed transactions" "$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' <<<"$out")" 0
    log "pgbench: $(grep -E '^tps' <<<"$out" | head -1)"
    local history
    history=$(psql_in pg-0 "SELECT count(*) FROM pgbench_history")

    local uid
    uid=$(kubectl get pod pg-0 -o jsonpath='{.metadata.uid}')
    kubectl delete pod pg-0 --wait=true --timeout=120s >/dev/null
    wait_until "pg-0 recreated" 120 bash -c "[[ \$(kubectl get pod pg-0 -o jsonpath='{.metadata.uid}') != $uid ]]"
    kubectl wait --for=condition=Ready pod/pg-0 --timeout=180s >/dev/null
    expect "the marker row after the pod came back" "$(psql_in pg-0 "SELECT v FROM marker")" \
        "written before the pod was deleted"
    expect "pgbench_history after the pod came back" "$(psql_in pg-0 "SELECT count(*) FROM pgbench_history")" "$history"

    local before
    before=$(kubectl exec pg-0 -- df -B1 --output=size /var/lib/postgresql/data | tail -1 | tr -d ' ')
    kubectl patch pvc data-pg-0 -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
    kubectl wait --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/data-pg-0 --timeout=180s >/dev/null
    local after
    after=$(kubectl exec pg-0 -- df -B1 --output=size /var/lib/postgresql/data | tail -1 | tr -d ' ')
    log "filesystem bytes: $before before the expansion, $after after"
    ((after > before + 900 * 1024 * 1024)) || fail "the filesystem did not grow by 1 GiB: $before -> $after bytes"
    expect "the marker row after the expansion" "$(psql_in pg-0 "SELECT v FROM marker")" \
        "written before the pod was deleted"
}

phase build-tools "$here/build-tools.sh" >/dev/null
phase images "$here/images/build.sh" >/dev/null
phase cluster "$here/cluster.sh" up
start_agents
phase install install
for s in "${scenarios[@]}"; do
    phase "scenario-$s" "scenario_$s"
done
