#!/usr/bin/env bash
# Regenerates fuzz/corpus/ seeds from real traffic:
#   - what qemu-io, nbdinfo, nbdcopy and fio (nbd engine) send to the NBD
#     server of a published volume, recorded by capture-proxy.py, a relay in
#     front of the volume's NBD socket (nbd_handshake: whole client streams;
#     nbd_transmission: what follows negotiation, after a byte naming how
#     the client negotiated);
#   - the replica protocol frames the volume's target sends to the replica
#     on the other node, recorded with strace on the target's agent
#     (replica_request: the wire mode of that target);
#   - the agents' own replica metadata and pool label files, and the
#     kernel's mountinfo lines for the cluster's mounts (metadata_files,
#     mountinfo).
# It replaces the captured seeds of those five targets and keeps seeds named
# *-hand. size_strings has hand-written seeds only; csi_parameters and
# replica_response take structured (arbitrary) input that no capture maps
# to, and start from an empty corpus.
#
# Needs root, the debug binaries (cargo build --workspace --bins), and the
# clients: qemu-utils, libnbd-bin, fio, strace (scripts/setup.sh installs
# them). Each seed is cut at 32 KiB so the corpus stays small.
#
#   fuzz/capture-seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/debug
work=$(mktemp -d /tmp/ballast-capture.XXXXXX)
cluster=$work/cluster
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    "$bin/ballast" cluster down --dir "$cluster" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

"$bin/ballast" cluster up --dir "$cluster" --nodes 2 >/dev/null
ballast() { "$bin/ballast" --cluster "$cluster" "$@"; }
ballast volume create seed --size 4MiB --replicas 2 >/dev/null
uri=$(ballast volume publish seed --node node-1 | tail -n1)
socket=${uri#*socket=}
export_name=${uri#nbd+unix:///}
export_name=${export_name%%\?*}

# The agent of node-1 runs the volume's target.
agent=$(pgrep -f -- "--state-dir $cluster/[^ ]*node-1" | head -n1 || true)
[ -n "$agent" ] || agent=$(pgrep -f -- "ballast-agent.*$cluster.*node-1" | head -n1)
mkdir -p "$work/strace" "$work/nbd"
strace -ff -ttt -yy -xx -s 65536 -e trace=write,writev,sendto,sendmsg \
    -o "$work/strace/t" -p "$agent" 2>/dev/null &
pids+=($!)
python3 fuzz/capture-proxy.py "$work/proxy.sock" "$socket" "$work/nbd" &
pids+=($!)
for _ in $(seq 50); do [ -S "$work/proxy.sock" ] && break; sleep 0.1; done
sleep 1
via="nbd+unix:///$export_name?socket=$work/proxy.sock"

client() { echo "$1" >"$work/nbd/client"; }
client nbdinfo
nbdinfo --json "$via" >/dev/null
client nbdinfo-list
nbdinfo --list --json "$via" >/dev/null
client qemu-io
qemu-io -f raw -c "write -P 0xab 0 64k" -c "write -P 0x11 513 1000" \
    -c "writev -P 0x22 1M 4k 12k" -c "write -z 2M 512k" -c "discard 3M 64k" \
    -c "read -P 0xab 0 513" -c "flush" "$via" >/dev/null
head -c 4M /dev/urandom >"$work/image"
client nbdcopy-in
nbdcopy "$work/image" "$via"
client nbdcopy-out
nbdcopy "$via" "$work/copy"
client fio
fio --name=seed --ioengine=nbd --uri="$via" --rw=randrw --bs=4k --size=4M \
    --iodepth=8 --runtime=2 --time_based --verify=crc32c --do_verify=0 >/dev/null
sleep 1
kill "${pids[@]}" 2>/dev/null || true
wait 2>/dev/null || true
pids=()

# The agents' files, as they wrote them.
find "$cluster" -name '*.meta.json' -o -name 'ballast-pool.json' | head -n 6 >"$work/files"

python3 - "$work" <<'PY'
import glob, os, re, struct, sys
work = sys.argv[1]
corpus = "fuzz/corpus"
# Seeds named *-hand were written by hand and are kept.
for target in ("nbd_handshake", "nbd_transmission", "replica_request", "metadata_files", "mountinfo"):
    for path in glob.glob(f"{corpus}/{target}/*"):
        if not path.endswith("-hand"):
            os.remove(path)
LIMIT = 32 << 10
def put(target, name, data):
    os.makedirs(f"{corpus}/{target}", exist_ok=True)
    with open(f"{corpus}/{target}/{name}", "wb") as f:
        f.write(data[:LIMIT])

IHAVEOPT = 0x49484156454F5054
for path in sorted(glob.glob(f"{work}/nbd/*.bin")):
    data = open(path, "rb").read()
    if len(data) < 4:
        continue
    name = os.path.basename(path)[:-4]
    put("nbd_handshake", name, data)
    flags = struct.unpack(">I", data[:4])[0]
    style, at = (1 if flags & 2 else 0), 4
    while at + 16 <= len(data):
        magic, option, length = struct.unpack(">QII", data[at:at + 16])
        if magic != IHAVEOPT:
            break
        at += 16 + length
        if option == 8:
            style |= 2
        if option in (1, 7):
            if option == 1:
                style |= 4
            if at < len(data):
                put("nbd_transmission", name, bytes([style]) + data[at:])
            break

# strace -xx -yy: writes to TCP sockets, merged across threads by time.
line = re.compile(r'^(\d+\.\d+) (write|writev|sendto|sendmsg)\((\d+)<TCP:\[([^\]]+)\]>, (.*)\) = (\d+)$')
chunks = {}
for path in glob.glob(f"{work}/strace/t.*"):
    for text in open(path, errors="replace"):
        m = line.match(text.strip())
        if not m:
            continue
        sent = int(m.group(6))
        data = b"".join(bytes.fromhex(s.replace("\\x", "")) for s in re.findall(r'"((?:\\x[0-9a-f]{2})*)"', m.group(5)))
        chunks.setdefault(m.group(4), []).append((float(m.group(1)), data[:sent]))
n = 0
for conn, parts in sorted(chunks.items()):
    stream = b"".join(d for _, d in sorted(parts, key=lambda p: p[0]))
    if stream.startswith(b"BLRQ"):
        n += 1
        put("replica_request", f"target-{n:02}", stream)

for i, path in enumerate(open(f"{work}/files").read().split()):
    kind = 2 if path.endswith("ballast-pool.json") else (1 if "/snapshots/" in path else 0)
    name = ["replica-meta", "copy-meta", "pool-label"][kind]
    put("metadata_files", f"{name}-{i:02}", bytes([kind]) + open(path, "rb").read())
# The kernel's lines for the cluster's own mounts (pools, and the root
# filesystem they sit on); the rest of the host's table is nobody's business.
lines = [l for l in open("/proc/self/mountinfo", "rb").read().splitlines(keepends=True)
         if work.encode() in l or b" / / " in l]
put("mountinfo", "cluster-pools", b"".join(lines))
PY
du -sh fuzz/corpus
