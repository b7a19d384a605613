#!/usr/bin/env bash
# Ballast's end-to-end demo on one machine: installs what is missing
# (scripts/setup.sh), builds the binaries and runs `ballast demo`, which
# starts a local 3-node cluster, puts PostgreSQL on a 3-replica volume
# through the CSI sockets, kills a replica's agent under pgbench, rebuilds
# it, fails PostgreSQL over to another node, checks the data and prints a
# report. It stops everything it started, even on failure or Ctrl-C.
#
# Arguments go to `ballast demo` (see `ballast demo --help`), e.g.
#   scripts/demo.sh --pgbench-seconds 10 --scale 5
#   scripts/demo.sh --dir /var/tmp/my-demo --keep
#   scripts/demo.sh snapshot      # the app-consistent group snapshot story
# With --all first, both stories run, one after the other, each on a
# cluster of its own (the other arguments go to both; not --dir):
#   scripts/demo.sh --all --pgbench-seconds 10
#
# Run as root on a Debian machine: scripts/demo.sh (sudo if you are not root)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (loop devices, mounts, FUSE): sudo $0 $*" >&2
    exit 1
fi
scripts/setup.sh
cargo build --release --bins
if [ "${1:-}" = "--all" ]; then
    shift
    target/release/ballast demo failover "$@"
    exec target/release/ballast demo snapshot "$@"
fi
exec target/release/ballast demo "$@"
