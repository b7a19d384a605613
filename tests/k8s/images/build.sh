#!/usr/bin/env bash
# Builds the images of the test cluster into $BALLAST_K8S_CACHE/images
# (default /var/cache/ballast-k8s/images), as OCI archives, and writes
# images.txt there: one "ARCHIVE NAME" per line for tests/k8s/cluster.sh to
# import. No registry is reachable, so every image is made here:
#
# - pause: pause.c, static, the pod sandbox image kubelet asks for;
# - the CSI sidecars and snapshot-controller: their static binaries from
#   tests/k8s/build-tools.sh, alone in the image, under the names the
#   chart's values give;
# - ballast-kubelet-registrar (csi/kubelet-registrar), in place of
#   node-driver-registrar;
# - postgres: Debian's PostgreSQL 15 with postgres-entrypoint.sh;
# - ballast: charts/ballast/image/build.sh (debug build; --profile to change).
#
# Each image is rebuilt only when what it is made of changed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cache=${BALLAST_K8S_CACHE:-/var/cache/ballast-k8s}
profile=${BALLAST_IMAGE_PROFILE:-dev}
out=$cache/images
pack=$repo/charts/ballast/image/oci-pack.sh
mkdir -p "$out"
list=$out/images.txt
: >"$list"

# stale ARCHIVE INPUT...: true when ARCHIVE is missing or older than an input.
stale() {
    local archive=$1
    shift
    [[ ! -f $archive ]] && return 0
    local input
    for input in "$@"; do
        [[ $input -nt $archive ]] && return 0
    done
    return 1
}

# A root filesystem with only FILE at /PATH (and /tmp), packed as NAME:TAG.
single_binary_image() {
    local file=$1 path=$2 name=$3 tag=$4 archive=$out/${3##*/}.oci.tar
    if stale "$archive" "$file" "$pack"; then
        local rootfs
        rootfs=$(mktemp -d)
        install -D -m 0755 "$file" "$rootfs/$path"
        mkdir -m 1777 "$rootfs/tmp"
        "$pack" "$rootfs" "$archive" "$tag" --entrypoint "/$path"
        rm -rf "$rootfs"
    fi
    echo "$archive ${name}:$tag" >>"$list"
}

# pause
pause_bin=$cache/bin/pause
if stale "$pause_bin" "$here/pause.c"; then
    mkdir -p "$cache/bin"
    gcc -static -O2 -Wall -Werror -o "$pause_bin" "$here/pause.c"
fi
single_binary_image "$pause_bin" pause registry.k8s.io/pause 3.10

# The sidecars, named and tagged as in charts/ballast/values.yaml.
values=$repo/charts/ballast/values.yaml
subvalues=$repo/charts/ballast/charts/snapshot-controller/values.yaml
for sidecar in csi-provisioner csi-attacher csi-resizer csi-snapshotter snapshot-controller; do
    image=$(grep -ho "registry.k8s.io/sig-storage/$sidecar:[^ ]*" "$values" "$subvalues" | head -1)
    single_binary_image "$cache/bin/$sidecar" "$sidecar" "${image%:*}" "${image##*:}"
done

# Ballast's registrar (node-driver-registrar is not served here).
(cd "$repo/csi/kubelet-registrar" && CGO_ENABLED=0 GOCACHE=$cache/go-build \
    go build -trimpath -o "$cache/bin/ballast-kubelet-registrar" .)
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo/Cargo.toml" | head -1)
single_binary_image "$cache/bin/ballast-kubelet-registrar" ballast-kubelet-registrar \
    localhost/ballast-kubelet-registrar "$tag"

# postgres
pg_root=$cache/rootfs/postgres
if [[ ! -f $pg_root/.complete ]]; then
    rm -rf "$pg_root"
    mkdir -p "$(dirname "$pg_root")"
    echo "images: debootstrap of bookworm with PostgreSQL 15" >&2
    debootstrap --variant=minbase --include=postgresql-15,postgresql-contrib,util-linux \
        bookworm "$pg_root" http://deb.debian.org/debian >"$pg_root.log" 2>&1 ||
        { tail -20 "$pg_root.log" >&2; exit 1; }
    rm -rf "$pg_root"/var/cache/apt/archives/*.deb "$pg_root"/var/lib/apt/lists/* \
        "$pg_root"/usr/share/doc "$pg_root"/usr/share/man
    # Debian's package made a cluster of its own; the image starts empty.
    rm -rf "$pg_root"/var/lib/postgresql/15 "$pg_root"/etc/postgresql/15
    touch "$pg_root/.complete"
fi
pg_archive=$out/postgres.oci.tar
if stale "$pg_archive" "$here/postgres-entrypoint.sh" "$pg_root/.complete" "$pack"; then
    stage=$(mktemp -d)
    cp -a "$pg_root" "$stage/rootfs"
    install -m 0755 "$here/postgres-entrypoint.sh" "$stage/rootfs/usr/local/bin/postgres-entrypoint"
    "$pack" "$stage/rootfs" "$pg_archive" 15 --entrypoint /usr/local/bin/postgres-entrypoint \
        --env PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    rm -rf "$stage"
fi
echo "$pg_archive localhost/postgres:15" >>"$list"

# ballast
"$repo/charts/ballast/image/build.sh" --profile "$profile" "$out/ballast.oci.tar" >&2
echo "$out/ballast.oci.tar localhost/ballast:$tag" >>"$list"
cat "$list"
