#!/usr/bin/env bash
# Ballast quickstart: builds Ballast, starts a storage agent with a
# file-backed pool, creates a thin replica, exports it over NBD and uses it
# with real NBD clients (nbdinfo, qemu-io, and an ext4 filesystem through
# nbdfuse + a loop device). Tears everything down at the end.
# Run as root on a Debian machine: sudo scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release --bins

WORK="${BALLAST_QUICKSTART_DIR:-/var/tmp/ballast-quickstart}"
ADDR="127.0.0.1:${BALLAST_QUICKSTART_PORT:-9500}"
BIN="$PWD/target/release"
ballast() { "$BIN/ballast" --agent "http://$ADDR" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

AGENT_PID=""
cleanup() {
    set +e
    mountpoint -q "$WORK/mnt" && umount "$WORK/mnt"
    [ -n "${LOOP:-}" ] && losetup -d "$LOOP"
    mountpoint -q "$WORK/fuse" && fusermount3 -u "$WORK/fuse"
    if [ -n "$AGENT_PID" ]; then
        kill -TERM "$AGENT_PID" 2>/dev/null
        wait "$AGENT_PID" 2>/dev/null
    fi
}
trap cleanup EXIT

rm -rf "$WORK"
mkdir -p "$WORK/mnt" "$WORK/fuse"

step "Start the agent with a 2 GiB file-backed pool (XFS on a loop device)"
"$BIN/ballast-agent" --state-dir "$WORK/state" --grpc-listen "$ADDR" \
    --pool-file "$WORK/pool0.img" --pool-size 2GiB >"$WORK/agent.log" 2>&1 &
AGENT_PID=$!
for _ in $(seq 1 100); do
    ballast pool list >/dev/null 2>&1 && break
    kill -0 "$AGENT_PID" 2>/dev/null || { cat "$WORK/agent.log"; exit 1; }
    sleep 0.2
done
ballast pool list

step "Create a 1 GiB thin replica and export it over NBD"
ballast replica create demo --size 1GiB --thin
URI=$(ballast export start demo --socket "$WORK/demo.sock")
echo "NBD URI: $URI"

step "nbdinfo sees the export"
nbdinfo "$URI"

step "qemu-io writes a pattern and reads it back"
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "read -P 0x5a 0 1M" "$URI"

step "An ext4 filesystem on it, through nbdfuse and a loop device"
nbdfuse "$WORK/fuse/disk" "$URI" &
for _ in $(seq 1 100); do [ -e "$WORK/fuse/disk" ] && break; sleep 0.1; done
LOOP=$(losetup --find --show "$WORK/fuse/disk")
mkfs.ext4 -q "$LOOP"
mount "$LOOP" "$WORK/mnt"
echo "hello from Ballast" >"$WORK/mnt/hello.txt"
sync
df -h "$WORK/mnt"
umount "$WORK/mnt"
mount "$LOOP" "$WORK/mnt"
cat "$WORK/mnt/hello.txt"

step "Replicas now"
ballast replica list
echo
echo "Quickstart passed. Logs: $WORK/agent.log"
