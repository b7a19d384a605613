#!/usr/bin/env bash
# Runs Ballast's whole test suite: unit tests and the end-to-end suites that
# start real agents and real NBD clients. Needs root (loop devices, mounts,
# FUSE, namespaces). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
# The end-to-end suites start the binaries, so build them first.
cargo build --workspace --bins
cargo nextest run --workspace --no-fail-fast "$@"
