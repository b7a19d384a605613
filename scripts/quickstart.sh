#!/usr/bin/env bash
# Ballast quickstart: the main job, end to end on one machine.
#
# Builds Ballast, starts a local 3-node cluster (a controller with the
# embedded store, three agents with file-backed XFS pools, all on loopback),
# creates a 3-replica volume, publishes it on node-1, puts an ext4
# filesystem on it (nbdfuse + a loop device) and writes files; then kills
# the agent of a replica node while writing, brings it back, watches the
# rebuild, fails the volume over to node-2 and checks every file and that
# the three replicas are byte-identical. Tears everything down at the end.
#
# Run as root on a Debian machine: sudo scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --bins

export BALLAST_CLUSTER="${BALLAST_QUICKSTART_DIR:-/var/tmp/ballast-quickstart}"
WORK="$BALLAST_CLUSTER"
ballast() { "$PWD/target/release/ballast" "$@"; }
step() { printf '\n\033[1m== [%3ss] %s\033[0m\n' "$SECONDS" "$*"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

MNT="$WORK/mnt"
FUSE="$WORK/fuse"
LOOP=""
NBDFUSE_PID=""
detach() {
    mountpoint -q "$MNT" && umount "$MNT"
    [ -n "$LOOP" ] && losetup -d "$LOOP" && LOOP=""
    mountpoint -q "$FUSE" && fusermount3 -u "$FUSE"
    [ -n "$NBDFUSE_PID" ] && wait "$NBDFUSE_PID" 2>/dev/null; NBDFUSE_PID=""
    return 0
}
attach() { # URI: nbdfuse exposes the export as a file, a loop device makes it a disk
    mkdir -p "$FUSE" "$MNT"
    nbdfuse "$FUSE/disk" "$1" &
    NBDFUSE_PID=$!
    for _ in $(seq 1 100); do [ -e "$FUSE/disk" ] && break; sleep 0.1; done
    LOOP=$(losetup --find --show "$FUSE/disk")
}
cleanup() {
    set +e
    detach
    # BALLAST_QUICKSTART_KEEP=1 leaves the cluster running for a look around.
    [ -n "${BALLAST_QUICKSTART_KEEP:-}" ] || ballast cluster down --dir "$WORK" >/dev/null
}
trap cleanup EXIT

if [ -f "$WORK/cluster.json" ]; then ballast cluster down --dir "$WORK" >/dev/null || true; fi
rm -rf "$WORK"

step "Start a 3-node cluster (controller + 3 agents, 2 GiB file-backed pools)"
ballast cluster up --dir "$WORK" --nodes 3 --pool-size 2GiB --heartbeat-timeout 5s
ballast node list

step "Create a 1 GiB volume with 3 replicas and publish it on node-1"
ballast volume create demo --size 1GiB --replicas 3 --thin
URI=$(ballast volume publish demo --node node-1)
echo "NBD URI: $URI"
ballast volume show demo

step "ext4 on the volume (nbdfuse + loop device), write 64 MiB of files"
attach "$URI"
mkfs.ext4 -q "$LOOP"
mount "$LOOP" "$MNT"
for i in 1 2 3 4; do head -c 16M /dev/urandom >"$MNT/before-$i.bin"; done
sync

step "Kill node-3's agent (SIGKILL) and keep writing: the target drops its replica"
NODE3_PID=$(ballast cluster status --dir "$WORK" -o json | json "[n['process']['pid'] for n in d['nodes'] if n['node_id']=='node-3'][0]")
kill -9 "$NODE3_PID"
for i in 1 2 3 4; do
    # conv=fsync: the data goes through the loop device and nbdfuse to the
    # target now, not at some later page cache writeback.
    dd if=/dev/urandom of="$MNT/during-$i.bin" bs=1M count=16 conv=fsync status=none
done
for _ in $(seq 1 60); do
    ballast -o json volume show demo | json "[r['state'] for r in d['replicas'] if r['node_id']=='node-3'][0]" | grep -q in-sync || break
    sleep 1
done
(cd "$MNT" && sha256sum ./*.bin >"$WORK/files.sha256")
echo "64 MiB written and flushed with node-3 down"
ballast volume show demo
ballast -o json volume show demo | json "[r['state'] for r in d['replicas'] if r['node_id']=='node-3'][0]" | grep -qv in-sync \
    || { echo "node-3's replica was not dropped"; exit 1; }

step "Restart node-3: its replica rebuilds while the volume stays online"
ballast cluster restart-node node-3 --dir "$WORK"
for _ in $(seq 1 180); do
    STATES=$(ballast -o json volume show demo | json "' '.join(r['node_id']+':'+r['state'] for r in d['replicas'])")
    printf '\r  %s   ' "$STATES"
    case "$STATES" in *faulted*|*rebuilding*) sleep 1 ;; *) break ;; esac
done
echo
ballast volume show demo
ballast -o json volume show demo | json "all(r['state']=='in-sync' for r in d['replicas'])" | grep -q True \
    || { echo "replica did not rebuild"; exit 1; }

step "Fail over: unpublish, publish on node-2, mount there, check every file"
umount "$MNT"
detach
ballast volume unpublish demo
URI=$(ballast volume publish demo --node node-2)
echo "NBD URI on node-2: $URI"
attach "$URI"
mount "$LOOP" "$MNT"
(cd "$MNT" && sha256sum --check --quiet "$WORK/files.sha256") && echo "all 8 files intact"
umount "$MNT"
detach
ballast volume unpublish demo

step "The three replicas are byte-identical"
FILES=$(ballast cluster status --dir "$WORK" -o json | json "' '.join(n['state_dir']+'/pools/pool/replicas/demo.data' for n in d['nodes'])")
set -- $FILES
cmp "$1" "$2"
cmp "$1" "$3"
echo "node-1, node-2 and node-3 hold the same bytes"

step "Quickstart passed"
echo "Logs were in $WORK (removed by cluster down)."
