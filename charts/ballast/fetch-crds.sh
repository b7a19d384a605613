#!/usr/bin/env bash
# Fills charts/snapshot-controller/crds/ with the VolumeSnapshot and
# VolumeGroupSnapshot CRDs of the external-snapshotter release that
# tests/k8s/tools/csi-snapshotter/go.mod pins, from the Go module proxy (the
# CRDs ship in its client module). Run it before `helm install` with
# snapshotController.enabled=true; the directory is not in the repository.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
pins=$here/../../tests/k8s/tools/csi-snapshotter
module=github.com/kubernetes-csi/external-snapshotter/client/v8
version=$(cd "$pins" && go list -m -f '{{if .Replace}}{{.Replace.Version}}{{else}}{{.Version}}{{end}}' "$module")
dir=$(cd "$pins" && go mod download -json "$module@$version" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
out=$here/charts/snapshot-controller/crds
mkdir -p "$out"
# Group snapshot CRDs sort first, so Helm creates them first.
cp "$dir"/config/crd/groupsnapshot.storage.k8s.io_*.yaml "$dir"/config/crd/snapshot.storage.k8s.io_*.yaml "$out/"
chmod u+w "$out"/*.yaml
echo "fetch-crds: $(ls "$out" | wc -l) CRDs of $module $version in $out"
