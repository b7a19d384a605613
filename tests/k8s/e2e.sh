#!/usr/bin/env bash
# Ballast's end-to-end suite on a real Kubernetes: builds the cluster's
# programs and images (cached), starts the one-node cluster of cluster.sh,
# installs the chart with helm exactly as the README says, and runs the
# scenarios with kubectl. Whatever happens, the cluster is torn down.
#
#   tests/k8s/e2e.sh            every scenario
#   tests/k8s/e2e.sh 1 2        only those scenarios (the install always runs)
#   BALLAST_E2E_KEEP=1 tests/k8s/e2e.sh   leaves the cluster up after a failure
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
# Scenarios 3 and 4 use what 2 left running.
[[ ${#scenarios[@]} -eq 0 ]] && scenarios=(1 2 3 4)

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
    local ns pod
    while read -r ns pod; do
        kubectl -n "$ns" logs "$pod" --all-containers --tail=40 --prefix 2>&1 | sed 's/^/  /' >&2 || true
        kubectl -n "$ns" logs "$pod" --all-containers --tail=20 --prefix --previous 2>/dev/null |
            sed 's/^/  previous: /' >&2 || true
    done < <(kubectl get pods -A --no-headers -o custom-columns=NS:.metadata.namespace,NAME:.metadata.name 2>/dev/null)
    tail -n 30 "$run"/logs/kubelet.log 2>/dev/null | sed 's/^/  kubelet: /' >&2 || true
}

finish() {
    local status=$?
    [[ $status -ne 0 ]] && diagnose
    if [[ $status -ne 0 && -n ${BALLAST_E2E_KEEP:-} ]]; then
        log "BALLAST_E2E_KEEP is set: the cluster stays up; tests/k8s/cluster.sh down ends it"
    else
        "$here/cluster.sh" down || true
    fi
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
    out=$(kubectl exec pg-0 -- pgbench -h /tmp -U postgres -n -c 2 -T 10 postgres 2>&1)
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

    # Expansion is offline (the controller announces no ONLINE expansion: an
    # NBD client cannot learn a new size on its connection): stop the pod,
    # grow the PVC, start it again; kubelet grows the filesystem at mount.
    local before
    before=$(kubectl exec pg-0 -- df -B1 --output=size /var/lib/postgresql/data | tail -1 | tr -d ' ')
    kubectl scale statefulset pg --replicas=0 >/dev/null
    kubectl wait --for=delete pod/pg-0 --timeout=120s >/dev/null
    wait_until "the volume detached" 120 bash -c "[[ -z \$(kubectl get volumeattachments -o jsonpath='{.items[?(@.spec.source.persistentVolumeName==\"$pv\")].metadata.name}') ]]"
    kubectl patch pvc data-pg-0 -p '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}' >/dev/null
    wait_until "the controller expanded the volume" 120 \
        bash -c "[[ \$(kubectl get pv $pv -o jsonpath='{.spec.capacity.storage}') == 2Gi ]]"
    kubectl scale statefulset pg --replicas=1 >/dev/null
    wait_until "pg-0 back" 120 kubectl get pod pg-0
    kubectl wait --for=condition=Ready pod/pg-0 --timeout=180s >/dev/null
    kubectl wait --for=jsonpath='{.status.capacity.storage}'=2Gi pvc/data-pg-0 --timeout=180s >/dev/null
    local after
    after=$(kubectl exec pg-0 -- df -B1 --output=size /var/lib/postgresql/data | tail -1 | tr -d ' ')
    log "filesystem bytes: $before before the expansion, $after after"
    ((after > before + 900 * 1024 * 1024)) || fail "the filesystem did not grow by 1 GiB: $before -> $after bytes"
    expect "the marker row after the expansion" "$(psql_in pg-0 "SELECT v FROM marker")" \
        "written before the pod was deleted"
}

# restored_pod NAME DATA_PVC [WAL_PVC]: a PostgreSQL pod on restored volumes,
# Ready and passing pg_amcheck.
restored_pod() {
    local name=$1 data=$2 wal=${3:-}
    local manifest
    manifest=$(sed -e "s/NAME/$name/" -e "s/DATA_PVC/$data/" "$here/manifests/pg-restored.yaml")
    if [[ -n $wal ]]; then
        manifest=$(sed -e "s/#WAL//" -e "s/WAL_PVC/$wal/" <<<"$manifest")
    fi
    kubectl apply -f - <<<"$manifest" >/dev/null
    kubectl wait --for=condition=Ready "pod/$name" --timeout=180s >/dev/null
    psql_in "$name" "CREATE EXTENSION IF NOT EXISTS amcheck" >/dev/null
    kubectl exec "$name" -- pg_amcheck -h /tmp -U postgres --heapallindexed postgres ||
        fail "pg_amcheck found corruption in $name"
    log "ok: $name started on the restored volumes and pg_amcheck is clean"
}

# restore_pvc NAME SNAPSHOT BYTES: a PVC from a VolumeSnapshot.
restore_pvc() {
    kubectl apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $1}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ballast
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: $2}
  resources: {requests: {storage: $3}}
EOF
}

# under_load POD KIND/NAME: applies the manifest on stdin 5 s into a 15 s
# pgbench run in POD, then waits until KIND/NAME is ReadyToUse and pgbench
# ended without an error. pgbench -n: without it every run starts by
# truncating pgbench_history, and the counts around the cut would compare
# different tables.
under_load() {
    local pod=$1 resource=$2 log=$run/logs/pgbench-$1.log manifest
    manifest=$(cat)
    kubectl exec "$pod" -- pgbench -h /tmp -U postgres -n -c 2 -T 15 postgres >"$log" 2>&1 &
    local load=$!
    sleep 5
    kubectl apply -f - <<<"$manifest" >/dev/null
    kubectl wait --for=jsonpath='{.status.readyToUse}'=true "$resource" --timeout=180s >/dev/null
    wait "$load" || fail "pgbench in $pod failed during $resource: $(tail -5 "$log")"
}

scenario_3() {
    log "scenario 3: a VolumeSnapshot under pgbench, restored to a new PVC"
    local before after restored
    before=$(psql_in pg-0 "SELECT count(*) FROM pgbench_history")
    under_load pg-0 volumesnapshot/pg-snap <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: pg-snap}
spec:
  volumeSnapshotClassName: ballast
  source: {persistentVolumeClaimName: data-pg-0}
EOF
    after=$(psql_in pg-0 "SELECT count(*) FROM pgbench_history")
    local size
    size=$(kubectl get volumesnapshot pg-snap -o jsonpath='{.status.restoreSize}')
    log "snapshot pg-snap ready, restoreSize $size"
    restore_pvc pg-restored pg-snap "$size"
    restored_pod pg-restored pg-restored
    restored=$(psql_in pg-restored "SELECT count(*) FROM pgbench_history")
    log "pgbench_history: $before before the snapshot, $restored in the restore, $after after pgbench"
    ((before <= restored && restored <= after)) ||
        fail "the restore holds $restored pgbench_history rows, not between $before and $after"
    ((restored > before)) || fail "the restore holds no transaction of the load it was taken under"
}

scenario_4() {
    log "scenario 4: an app-consistent VolumeGroupSnapshot of data and WAL, hooks from pod annotations"
    kubectl apply -f "$here/manifests/pg-wal.yaml" >/dev/null
    kubectl wait --for=jsonpath='{.status.phase}'=Bound pvc/data-pgw-0 pvc/wal-pgw-0 --timeout=180s >/dev/null
    kubectl wait --for=condition=Ready pod/pgw-0 --timeout=240s >/dev/null
    psql_in pgw-0 "CREATE TABLE hooklog (phase text); CREATE TABLE marker AS SELECT 'before the group snapshot'::text AS v" >/dev/null
    kubectl exec pgw-0 -- pgbench -h /tmp -U postgres -i -s 2 -q postgres >/dev/null 2>&1
    under_load pgw-0 volumegroupsnapshot/pgw-group <<EOF
apiVersion: groupsnapshot.storage.k8s.io/v1
kind: VolumeGroupSnapshot
metadata: {name: pgw-group}
spec:
  volumeGroupSnapshotClassName: ballast-app-consistent
  source:
    selector:
      matchLabels: {snapshot-group: pgw}
EOF
    # Both members were frozen through the cut (ballast.io/freeze of the class).
    local group
    group=$(kubectl get volumegroupsnapshotcontent -o jsonpath='{range .items[?(@.spec.volumeGroupSnapshotRef.name=="pgw-group")]}{.status.volumeGroupSnapshotHandle}{end}')
    expect "members of $group frozen through the cut" "$(ballast --controller "$controller" -o json snapshot group show "$group" |
        python3 -c 'import json,sys; print(sum(1 for s in json.load(sys.stdin)["snapshots"] if s["frozen"]))')" 2
    expect "hook rows in the source after the group snapshot" \
        "$(psql_in pgw-0 "SELECT string_agg(phase, ',' ORDER BY phase DESC) FROM hooklog")" "pre,post"
    # Member snapshots name their group and their PVC.
    local members
    members=$(kubectl get volumesnapshots -o jsonpath='{range .items[?(@.status.volumeGroupSnapshotName=="pgw-group")]}{.spec.source.persistentVolumeClaimName}={.metadata.name}={.status.restoreSize}{"\n"}{end}')
    expect "member snapshots of pgw-group" "$(grep -c = <<<"$members")" 2
    local member pvc snapshot size
    for member in $members; do
        IFS== read -r pvc snapshot size <<<"$member"
        restore_pvc "restored-$pvc" "$snapshot" "$size"
    done
    restored_pod pgw-restored restored-data-pgw-0 restored-wal-pgw-0
    expect "the marker row in the restored pair" "$(psql_in pgw-restored "SELECT v FROM marker")" "before the group snapshot"
    # The pre-hook ran before the cut and the post-hook after it.
    expect "hook rows in the restored pair" "$(psql_in pgw-restored "SELECT string_agg(phase, ',') FROM hooklog")" "pre"
}

phase build-tools "$here/build-tools.sh" >/dev/null
phase images "$here/images/build.sh" >/dev/null
phase cluster "$here/cluster.sh" up
start_agents
phase install install
for s in "${scenarios[@]}"; do
    phase "scenario-$s" "scenario_$s"
done
