#!/usr/bin/env bash
# Builds the programs of the test cluster from the Go modules pinned under
# tests/k8s/tools/ (kubelet, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, the CSI sidecars, snapshot-controller, helm, crictl)
# into $BALLAST_K8S_CACHE/bin (default /var/cache/ballast-k8s). A directory
# whose go.mod and go.sum have not changed since its last build is skipped, and
# Go's build cache stays under the same root, so a second run takes seconds.
#
# Everything comes from the Go module proxy; nothing is downloaded elsewhere.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${BALLAST_K8S_CACHE:-/var/cache/ballast-k8s}
bin=$cache/bin
mkdir -p "$bin" "$cache/stamps"
export GOCACHE=${GOCACHE:-$cache/go-build}
export GOFLAGS=${GOFLAGS:--trimpath}
# Static binaries: the sidecars' images hold nothing but their program.
export CGO_ENABLED=0

for dir in "$here"/tools/*/; do
    name=$(basename "$dir")
    stamp=$cache/stamps/$name
    want=$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -d' ' -f1)
    if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
        continue
    fi
    echo "build-tools: building $name" >&2
    start=$SECONDS
    ldflags=()
    if [[ $name == kubernetes ]]; then
        # What `kubectl version`, the API server's /version and Helm's
        # kubeVersion check see; the module build does not stamp it.
        version=$(cd "$dir" && go list -m -f '{{.Version}}' k8s.io/kubernetes)
        minor=${version#v1.}
        minor=${minor%%.*}
        x=""
        for package in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
            x+=" -X $package.gitVersion=$version -X $package.gitMajor=1 -X $package.gitMinor=$minor"
            x+=" -X $package.gitTreeState=clean"
        done
        ldflags=(-ldflags "$x")
    fi
    (cd "$dir" && nice -n 19 go build -p 2 "${ldflags[@]}" -o "$bin/" tool)
    echo "$want" > "$stamp"
    echo "build-tools: $name built in $((SECONDS - start)) s" >&2
done
ls "$bin"
