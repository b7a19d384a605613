#!/usr/bin/env bash
# Runs Ballast's whole test suite: unit tests, the end-to-end suites that
# start real agents and real NBD clients, and the Kubernetes suite. Needs
# root (loop devices, mounts, FUSE, namespaces). Installs what is missing
# first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The end-to-end suites start the binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
# Then Ballast on a real one-node Kubernetes, installed with its Helm chart
# (tests/k8s/e2e.sh). Arguments filter the nextest suites only, and skip it.
if [ "$#" -eq 0 ]; then
    tests/k8s/e2e.sh
fi
