#!/usr/bin/env bash
# Packs a root filesystem directory into a one-layer OCI image archive that
# `ctr images import` and `podman load` read, with umoci (Debian's umoci: it
# writes OCI image layouts without a daemon, a registry or a container
# engine, and needs no storage driver, unlike buildah).
#
#   oci-pack.sh ROOTFS ARCHIVE TAG [--entrypoint ARG]... [--env K=V]... [--workdir DIR] [--user USER]
#
# The archive's image is named TAG only (OCI ref.name); import it with
# `ctr -n k8s.io images import --base-name REPOSITORY ARCHIVE` to get
# REPOSITORY:TAG.
set -euo pipefail
rootfs=$1 archive=$2 tag=$3
shift 3
config=()
entrypoint=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --entrypoint) entrypoint+=("--config.entrypoint=$2"); shift 2 ;;
        --env) config+=("--config.env=$2"); shift 2 ;;
        --workdir) config+=("--config.workingdir=$2"); shift 2 ;;
        --user) config+=("--config.user=$2"); shift 2 ;;
        *) echo "oci-pack: unknown option $1" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
layout=$work/layout
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --image "$layout:$tag" "$work/bundle" >/dev/null
# umoci unpack made an empty rootfs; the layer is what repack finds in it.
rmdir "$work/bundle/rootfs"
cp -a "$rootfs" "$work/bundle/rootfs"
umoci repack --image "$layout:$tag" "$work/bundle"
if [[ " ${config[*]} " != *" --config.env=PATH="* ]]; then
    config+=("--config.env=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
fi
umoci config --image "$layout:$tag" "${entrypoint[@]}" "${config[@]}"
umoci gc --layout "$layout"
mkdir -p "$(dirname "$archive")"
tar -C "$layout" -cf "$archive" .
echo "oci-pack: $archive ($(du -h "$archive" | cut -f1), tag $tag)"
