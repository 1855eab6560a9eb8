#!/usr/bin/env bash
# Builds the stack's images on a Docker engine that can reach no image registry, only a Debian
# mirror (the deploy test's case, and an air-gapped site's):
#
#   stack/build-images.sh [--binaries DIR] [--cache DIR]
#
# 1. A Debian base image, made with `debootstrap --variant=minbase` and `docker import`
#    (bidsflux-debian:<suite>-<hash>). Needs root (debootstrap). With --cache, the root file
#    system is kept there as a tarball and reused while its inputs are the same.
# 2. The stages of stack/Dockerfile on that base (RUNTIME_IMAGE):
#      runtime → bidsflux:<hash>          the five services and bidsflux-ctl
#      nats    → bidsflux-nats:<hash>     Debian's nats-server
#      s3-dev  → bidsflux-s3-dev:<hash>   the embedded S3 server (tests and dev only)
#    With --binaries DIR (bidsflux-* binaries that cargo built on this host, same Debian
#    release) the runtime stage copies them (BINARIES=prebuilt); without it the Dockerfile's
#    builder stage compiles them, which needs the rust image (RUST_IMAGE) from a registry.
#
# Tags are reproducible: each is a hash of what the image is made from (suite, mirror and
# package recipe for the base; base tag, Dockerfile, copied files and binaries for the others),
# so the same inputs give the same tag, and an image whose tag already exists is not rebuilt.
#
# The last lines printed on stdout are shell assignments for the stack's variables:
#   BIDSFLUX_IMAGE=bidsflux BIDSFLUX_TAG=<hash> NATS_IMAGE=bidsflux-nats NATS_TAG=<hash>
#   S3_DEV_IMAGE=bidsflux-s3-dev:<hash>
#
# Environment: DOCKER_HOST (the engine), BIDSFLUX_DEBIAN_SUITE (default: this host's release
# codename), BIDSFLUX_DEBIAN_MIRROR (default: the mirror apt uses here, else deb.debian.org).
# BuildKit is required: `docker buildx` when installed, else Debian's docker.io CLI
# (/usr/bin/docker, 20.10) with DOCKER_BUILDKIT=1.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
binaries="" cache=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binaries) binaries=$(cd "$2" && pwd); shift 2 ;;
        --cache) mkdir -p "$2"; cache=$(cd "$2" && pwd); shift 2 ;;
        *) echo "build-images.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

log() { echo "build-images: $*" >&2; }
hash() { sha256sum | cut -c1-16; }

# --- The docker CLI that builds with BuildKit --------------------------------------------
if docker buildx version >/dev/null 2>&1; then
    build() { docker buildx build --load "$@"; }
elif [ -x /usr/bin/docker ] && /usr/bin/docker --version | grep -q '^Docker version 20\.10\.'; then
    build() { DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"; }
else
    echo "build-images.sh: needs BuildKit: install docker-buildx, or Debian's docker.io (its CLI builds with DOCKER_BUILDKIT=1)" >&2
    exit 1
fi

# --- 1. The Debian base -------------------------------------------------------------------
# shellcheck disable=SC1091
suite=${BIDSFLUX_DEBIAN_SUITE:-$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")}
mirror=${BIDSFLUX_DEBIAN_MIRROR:-$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)\/\{0,1\}$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)}
mirror=${mirror:-http://deb.debian.org/debian}
base_recipe="debootstrap --variant=minbase $suite $mirror; apt lists and caches removed"
base="bidsflux-debian:$suite-$(printf '%s' "$base_recipe" | hash)"

if docker image inspect "$base" >/dev/null 2>&1; then
    log "$base is there"
else
    tarball=""
    [ -n "$cache" ] && tarball="$cache/${base//[:\/]/_}.tar"
    if [ -z "$tarball" ] || [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || { echo "build-images.sh: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
        rootfs=$(mktemp -d "${TMPDIR:-/tmp}/bidsflux-rootfs.XXXXXX")
        # A failed debootstrap can leave /proc, /sys (even a bind of /dev) mounted in the root
        # file system: unmounted first, and rm never crosses into another file system.
        remove_rootfs() {
            awk -v r="$rootfs/" 'index($2, r) == 1 { print $2 }' /proc/mounts | sort -r |
                while read -r m; do umount -l "$m" || true; done
            rm -rf --one-file-system "$rootfs"
        }
        trap 'remove_rootfs; rm -f "$rootfs.log"' EXIT
        # Its progress goes to a log; on failure the end of it (and of debootstrap's own log,
        # which names the package or download that failed) is printed. A mirror being synced
        # can fail a download for a while: three tries, a minute apart at most.
        for try in 1 2 3; do
            log "debootstrap $suite from $mirror (about 35 s; try $try of 3)"
            if debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1; then
                break
            fi
            log "debootstrap failed; the end of its output:"
            tail -n 25 "$rootfs.log" >&2
            if [ -f "$rootfs/debootstrap/debootstrap.log" ]; then
                log "the end of $rootfs/debootstrap/debootstrap.log:"
                tail -n 25 "$rootfs/debootstrap/debootstrap.log" >&2
            fi
            [ "$try" -lt 3 ] || exit 1
            remove_rootfs && mkdir -p "$rootfs"
            sleep $((try * 20))
        done
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
        out=${tarball:-$rootfs.tar}
        tar --numeric-owner -C "$rootfs" -cf "$out.part" .
        mv "$out.part" "$out"
        remove_rootfs; rm -f "$rootfs.log"
        trap - EXIT
        tarball=$out
    fi
    log "docker import $base"
    docker import -c 'CMD ["/bin/bash"]' "$tarball" "$base" >/dev/null
    [ -n "$cache" ] || rm -f "$tarball"
fi

# --- 2. The images of stack/Dockerfile ----------------------------------------------------
context=$(mktemp -d "${TMPDIR:-/tmp}/bidsflux-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/prebuilt" "$context/services/study-completion"
cp "$repo/services/study-completion/rules.example.toml" "$context/services/study-completion/"
build_args=(--build-arg "RUNTIME_IMAGE=$base")
if [ -n "$binaries" ]; then
    for b in bidsflux-receiver bidsflux-study-completion bidsflux-uploader bidsflux-indexer \
             bidsflux-provisioner bidsflux-ctl bidsflux-s3-dev; do
        [ -x "$binaries/$b" ] || { echo "build-images.sh: $binaries/$b is missing (cargo build --bins)" >&2; exit 1; }
        # Without debug info: the same code, a tenth of the size to send to the engine.
        strip --strip-debug -o "$context/prebuilt/$b" "$binaries/$b"
    done
    build_args+=(--build-arg BINARIES=prebuilt)
    context_dir=$context
else
    context_dir=$repo
fi

dockerfile_hash=$( { echo "$base"; cat "$repo/stack/Dockerfile"; } | hash)
input_hash=$( { echo "$dockerfile_hash"; cat "$repo/services/study-completion/rules.example.toml";
                if [ -n "$binaries" ]; then (cd "$context/prebuilt" && sha256sum -- *);
                else git -C "$repo" rev-parse HEAD; git -C "$repo" status --porcelain; fi; } | hash)

image() { # image NAME TAG TARGET
    if docker image inspect "$1:$2" >/dev/null 2>&1; then
        log "$1:$2 is there"
        return
    fi
    log "building $1:$2 (stage $3)"
    build -f "$repo/stack/Dockerfile" --target "$3" "${build_args[@]}" -t "$1:$2" "$context_dir" >&2
}
image bidsflux "$input_hash" runtime
image bidsflux-nats "$dockerfile_hash" nats
image bidsflux-s3-dev "$input_hash" s3-dev

echo "BIDSFLUX_IMAGE=bidsflux"
echo "BIDSFLUX_TAG=$input_hash"
echo "NATS_IMAGE=bidsflux-nats"
echo "NATS_TAG=$dockerfile_hash"
echo "S3_DEV_IMAGE=bidsflux-s3-dev:$input_hash"
