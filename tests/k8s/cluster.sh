#!/usr/bin/env bash
# A one-node Kubernetes cluster for Ballast's end-to-end suite, on this
# machine only: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, containerd and kubelet, built by tests/k8s/build-tools.sh
# and started as plain processes.
#
#   tests/k8s/cluster.sh up      start it (images from tests/k8s/images/build.sh)
#   tests/k8s/cluster.sh down    stop everything it started and remove its state
#   tests/k8s/cluster.sh env     print the KUBECONFIG line for a shell
#
# Every listener is on 127.0.0.1 or on $NODE_IP, an address that `up` adds to
# the loopback interface (kubelet refuses a node address in 127.0.0.0/8), so
# nothing leaves the machine. State lives under $BALLAST_K8S_RUN (default
# /var/tmp/ballast-k8s); `down` also removes the paths kubelet uses whatever
# its flags. Facts this relies on are in ../shared/KUBERNETES.md.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${BALLAST_K8S_CACHE:-/var/cache/ballast-k8s}
bin=$cache/bin
run=${BALLAST_K8S_RUN:-/var/tmp/ballast-k8s}
NODE_IP=10.250.0.1
bridge=ballastk8sbr0
service_cidr=10.251.0.0/16
pod_subnet=10.252.0.0/24
etcd_port=23791
kubelet_dir=/var/lib/kubelet
export PATH=$bin:$PATH
export KUBECONFIG=$run/admin.kubeconfig

log() { echo "cluster: $*" >&2; }

# start NAME COMMAND...: runs COMMAND in the background, logging to
# $run/logs/NAME.log, and records its pid for `down`.
start() {
    local name=$1
    shift
    setsid "$@" >"$run/logs/$name.log" 2>&1 &
    echo "$! $name" >>"$run/pids"
}

# wait_for WHAT SECONDS COMMAND...: retries COMMAND once a second.
wait_for() {
    local what=$1 seconds=$2
    shift 2
    local i
    for ((i = 0; i < seconds; i++)); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 1
    done
    log "$what not ready after ${seconds} s; last lines of the logs:"
    tail -n 15 "$run"/logs/*.log >&2 || true
    return 1
}

pki() {
    local pki=$run/pki
    mkdir -p "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ballast-test-ca \
        -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
    # cert NAME SUBJECT [SANS]
    cert() {
        local ext=$pki/$1.ext
        printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
        [[ -n ${3:-} ]] && echo "subjectAltName=$3" >>"$ext"
        openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
        openssl x509 -req -in "$pki/$1.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
            -days 2 -extfile "$ext" -out "$pki/$1.crt" 2>/dev/null
    }
    cert apiserver /CN=kube-apiserver \
        "IP:$NODE_IP,IP:127.0.0.1,IP:${service_cidr%.0/16}.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost"
    # Every component authenticates as a cluster admin: one node, one user.
    cert admin "/O=system:masters/CN=admin"
    openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
    openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
    kubectl config set-cluster test --server="https://$NODE_IP:6443" \
        --certificate-authority="$pki/ca.crt" --embed-certs >/dev/null
    kubectl config set-credentials admin --client-certificate="$pki/admin.crt" \
        --client-key="$pki/admin.key" --embed-certs >/dev/null
    kubectl config set-context test --cluster=test --user=admin >/dev/null
    kubectl config use-context test >/dev/null
}

containerd_config() {
    mkdir -p "$run/containerd" "$run/cni"
    cat >"$run/containerd/config.toml" <<EOF
version = 2
root = "$run/containerd/root"
state = "$run/containerd/state"
[grpc]
  address = "$run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.10"
  # No CAP_SYS_RESOURCE here: a negative oom_score_adj fails runc create.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$run/cni"
EOF
    cat >"$run/cni/10-ballast-test.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ballast-test",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "ipMasq": false,
      "ipam": {"type": "host-local", "subnet": "$pod_subnet", "dataDir": "$run/cni-ipam"}
    }
  ]
}
EOF
}

kubelet_config() {
    mkdir -p "$run/kubelet"
    cat >"$run/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: $run/pki/ca.crt}
authorization: {mode: AlwaysAllow}
# cgroups v1 and no systemd here.
cgroupDriver: cgroupfs
failCgroupV1: false
containerRuntimeEndpoint: unix://$run/containerd/containerd.sock
failSwapOn: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
# The test machine's disk is shared with the build; never evict for it.
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
}

up() {
    if [[ -f $run/pids ]]; then
        log "a cluster is recorded in $run; stopping it first"
        down
    fi
    mkdir -p "$run/logs"
    : >"$run/pids"
    ip addr add "$NODE_IP/32" dev lo

    pki
    start etcd etcd --name test --data-dir "$run/etcd" \
        --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
        --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
        --initial-cluster "test=http://127.0.0.1:$((etcd_port + 1))" \
        --listen-metrics-urls ""
    wait_for etcd 30 curl -sf "http://127.0.0.1:$etcd_port/health"

    local pki=$run/pki
    start kube-apiserver kube-apiserver --etcd-servers "http://127.0.0.1:$etcd_port" \
        --bind-address "$NODE_IP" --advertise-address "$NODE_IP" --secure-port 6443 \
        --service-cluster-ip-range "$service_cidr" \
        --client-ca-file "$pki/ca.crt" --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
        --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
        --service-account-issuer https://kubernetes.default.svc \
        --kubelet-client-certificate "$pki/admin.crt" --kubelet-client-key "$pki/admin.key" \
        --kubelet-preferred-address-types InternalIP,Hostname \
        --authorization-mode RBAC --allow-privileged=true --profiling=false
    wait_for kube-apiserver 90 kubectl get --raw /readyz

    mkdir -p "$run/flex"
    start kube-controller-manager kube-controller-manager --kubeconfig "$KUBECONFIG" \
        --bind-address 127.0.0.1 --leader-elect=false \
        --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
        --use-service-account-credentials=false --flex-volume-plugin-dir "$run/flex" \
        --controllers '*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-route'
    start kube-scheduler kube-scheduler --kubeconfig "$KUBECONFIG" --bind-address 127.0.0.1 --leader-elect=false

    containerd_config
    start containerd containerd --config "$run/containerd/config.toml"
    local ctr_cmd=(ctr --address "$run/containerd/containerd.sock" -n k8s.io)
    wait_for containerd 30 "${ctr_cmd[@]}" version
    local archive name
    while read -r archive name; do
        "${ctr_cmd[@]}" images import --base-name "${name%:*}" "$archive" >/dev/null
    done <"$cache/images/images.txt"
    log "images: $("${ctr_cmd[@]}" images ls -q | grep -v '^sha256' | tr '\n' ' ')"

    kubelet_config
    mkdir -p "$kubelet_dir"
    # Bidirectional mount propagation needs a shared mount, and / is private
    # here: the node's state directory of the chart (values-test.yaml) gets
    # a shared bind mount of its own (kubelet does the same for its root).
    mkdir -p "$run/ballast-node"
    mount --bind "$run/ballast-node" "$run/ballast-node"
    mount --make-rshared "$run/ballast-node"
    start kubelet kubelet --config "$run/kubelet/config.yaml" --kubeconfig "$KUBECONFIG" \
        --root-dir "$kubelet_dir" --cert-dir "$run/kubelet/pki" --node-ip "$NODE_IP"
    wait_for "the node" 120 kubectl wait --for=condition=Ready node --all --timeout=1s
    wait_for "the default service account" 60 kubectl get serviceaccount default
    log "up: $(kubectl get nodes -o wide --no-headers)"
}

# Unmounts every mount point under $1, deepest first.
unmount_under() {
    local mounts
    mounts=$(awk -v p="$1" '$5 == p || index($5, p "/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
    local m
    for m in $mounts; do
        umount -l "$m" 2>/dev/null || true
    done
}

down() {
    if [[ -f $run/pids ]]; then
        # kubelet first, so that it restarts nothing; then every container.
        local pid name
        while read -r pid name; do
            [[ $name == kubelet ]] && kill "$pid" 2>/dev/null || true
        done <"$run/pids"
        if [[ -S $run/containerd/containerd.sock ]]; then
            local ctr_cmd=(ctr --address "$run/containerd/containerd.sock" -n k8s.io)
            local task
            for task in $("${ctr_cmd[@]}" tasks ls -q 2>/dev/null); do
                "${ctr_cmd[@]}" tasks kill -s SIGKILL "$task" >/dev/null 2>&1 || true
            done
            sleep 1
        fi
        tac "$run/pids" | while read -r pid name; do
            kill "$pid" 2>/dev/null || true
        done
        sleep 1
        tac "$run/pids" | while read -r pid name; do
            kill -9 "$pid" 2>/dev/null || true
        done
    fi
    # Shims outlive containerd by design; ours name our state directory.
    pkill -9 -f "containerd-shim.*$run/containerd" 2>/dev/null || true
    unmount_under "$kubelet_dir"
    unmount_under "$run"
    # Loop devices of Ballast's pool files and attached volumes under $run.
    local dev file
    losetup -n -l -O NAME,BACK-FILE 2>/dev/null | while read -r dev file; do
        [[ $file == "$run"/* ]] && losetup -d "$dev" 2>/dev/null || true
    done
    ip addr del "$NODE_IP/32" dev lo 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$kubelet_dir" "$run" /var/lib/cni/results/ballast-test-* /var/log/pods /var/log/containers
    log "down"
}

case ${1:-} in
    up) up ;;
    down) down ;;
    env) echo "export KUBECONFIG=$KUBECONFIG PATH=$bin:\$PATH" ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
