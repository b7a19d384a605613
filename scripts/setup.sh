#!/usr/bin/env bash
# Installs what Ballast's build, tests, demo and benchmarks need on a fresh
# Debian machine that has only the toolchains (Rust, Go, Python, gcc).
# Safe to run again: packages already present are left alone.
#
# The build itself needs no Debian package: the protobuf definitions are
# compiled by the protox crate, not by a system protoc. Every package below
# is for the tests, the demo or the benchmarks. .ci/isolate hides every
# package this list (with its dependencies) and the machine kind do not
# account for, so a package installed by hand cannot make CI green.
#
#   scripts/setup.sh          installs what is missing and says what it did
#   scripts/setup.sh --list   prints the package names, one a line
set -euo pipefail

packages=(
    xfsprogs          # mkfs.xfs: pools are XFS with reflink
    e2fsprogs         # mkfs.ext4, resize2fs
    util-linux        # losetup, wipefs, blkid, mount, fsfreeze
    fdisk             # sfdisk, used by tests to write partition tables
    fuse3             # nbdfuse needs fusermount3
    libnbd-bin        # nbdinfo, nbdcopy, nbdfuse, nbdsh
    python3-libnbd    # libnbd's Python bindings, a real NBD client in tests
    nbdkit            # a mature NBD server, the benchmark baseline
    fio               # with the nbd engine, for tests and benchmarks
    qemu-utils        # qemu-img, qemu-io
    iproute2          # network namespaces for fault tests
    psmisc
    etcd-server       # the production cluster store, started by tests on loopback
    postgresql        # the demo's database (initdb, postgres, psql, pgbench)
    postgresql-contrib # amcheck, for pg_amcheck in the demo and its tests
    # The Kubernetes suite (tests/k8s/): its container runtime, pod network,
    # certificates, and the images it builds without a container engine.
    containerd
    runc
    containernetworking-plugins # bridge, host-local and loopback CNI plugins
    iptables          # the bridge plugin's rules (containernetworking-plugins needs it too)
    openssl
    debootstrap       # the Debian root filesystems of the images
    umoci             # packs them as OCI archives
)

if [ "${1:-}" = "--list" ]; then
    printf '%s\n' "${packages[@]}"
    exit 0
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    echo "setup: installed ${missing[*]}"
fi
echo "setup: present: ${packages[*]}"

if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install --locked cargo-nextest
fi
# The fuzz targets (scripts/fuzz.sh) build and run with cargo-fuzz.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup: installing cargo-fuzz"
    cargo install --locked cargo-fuzz
fi

# Loop devices and FUSE are needed by pools and by attaching volumes.
$SUDO modprobe loop 2>/dev/null || true
$SUDO modprobe fuse 2>/dev/null || true
[ -e /dev/loop-control ] || { echo "setup: /dev/loop-control is missing; loop devices are required" >&2; exit 1; }
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing; FUSE is required" >&2; exit 1; }
echo "setup: ready"
