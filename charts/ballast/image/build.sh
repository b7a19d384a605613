#!/usr/bin/env bash
# Builds Ballast's image without a container engine: the Containerfile's
# image, from a Debian root filesystem made by debootstrap with the packages
# of packages.txt, Ballast's binaries in /usr/local/bin, packed by
# oci-pack.sh into an OCI archive.
#
#   charts/ballast/image/build.sh [--profile release|dev] [ARCHIVE]
#
# ARCHIVE defaults to target/images/ballast.oci.tar; its tag is the
# workspace version. Import it with
#   ctr -n k8s.io images import --base-name localhost/ballast ARCHIVE
# The Debian root filesystem is cached under $BALLAST_K8S_CACHE (default
# /var/cache/ballast-k8s) by the hash of the package list. Needs root,
# debootstrap and umoci.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
profile=release
if [[ ${1:-} == --profile ]]; then profile=$2; shift 2; fi
archive=${1:-$repo/target/images/ballast.oci.tar}
cache=${BALLAST_K8S_CACHE:-/var/cache/ballast-k8s}
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)

mapfile -t packages < <(grep -v '^#' "$here/packages.txt")
base=$cache/rootfs/ballast-$(printf '%s\n' "${packages[@]}" | sha256sum | cut -c1-12)
if [[ ! -f $base/.complete ]]; then
    rm -rf "$base"
    mkdir -p "$(dirname "$base")"
    echo "image: debootstrap of bookworm with ${packages[*]}" >&2
    debootstrap --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
        bookworm "$base" http://deb.debian.org/debian >"$base.log" 2>&1 ||
        { tail -20 "$base.log" >&2; exit 1; }
    rm -rf "$base"/var/cache/apt/archives/*.deb "$base"/var/lib/apt/lists/* \
        "$base"/usr/share/doc "$base"/usr/share/man "$base"/usr/share/locale
    touch "$base/.complete"
fi

(cd "$repo" && cargo build --profile "$profile" --locked --bins)
dir=$profile
[[ $profile == dev ]] && dir=debug
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp -a "$base" "$stage/rootfs"
rm -f "$stage/rootfs/.complete"
install -m 0755 "$repo/target/$dir/ballast-agent" "$repo/target/$dir/ballast-csi" \
    "$repo/target/$dir/ballast" "$stage/rootfs/usr/local/bin/"
"$here/oci-pack.sh" "$stage/rootfs" "$archive" "$tag" --entrypoint ballast-csi
