#!/bin/bash
# Build the slot-agent images from this repository, with no registry.
#
# usage: images/build.sh [docker|sif|all] [--no-cache] [--out FILE.sif]
#   docker   (default) images/build-base.sh, then from images/Dockerfile:
#              slot-agent:latest      the agent on slot-base (EXPOSE 7070)
#              slot-agent-bin:latest  the agent alone (FROM scratch), for COPY --from=
#              slot-agent-build:latest  the compile stage, kept as layer cache
#   sif      the docker images, then an Apptainer SIF built from
#            slot-agent:latest with images/slot-agent.def
#            (default ${SLOT_CACHE:-/var/cache/slot}/images/slot-agent.sif)
#   all      both
#   --no-cache  (or SLOT_NO_CACHE=1) build every layer afresh; the agent is
#               still compiled once
# env: SLOT_CACHE, SLOT_SUITE (default bookworm), APPTAINER (binary to use)
# Prints the image tags and the SIF path on stdout; progress on stderr.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${SLOT_SUITE:-bookworm}
CACHE=${SLOT_CACHE:-/var/cache/slot}/images
IMAGE=slot-agent:latest
BIN_IMAGE=slot-agent-bin:latest
BUILD_IMAGE=slot-agent-build:latest

die() { echo "build.sh: $*" >&2; exit 1; }
log() { echo "build.sh: $*" >&2; }

what=docker
no_cache=${SLOT_NO_CACHE:-0}
out="$CACHE/slot-agent.sif"
while [ $# -gt 0 ]; do
    case $1 in
    docker | sif | all) what=$1 ;;
    --no-cache) no_cache=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a path"; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    -h | --help) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (usage: build.sh [docker|sif|all] [--no-cache] [--out FILE.sif])" ;;
    esac
    shift
done
case $no_cache in 0 | 1) ;; *) die "SLOT_NO_CACHE is 0 or 1, got '$no_cache'" ;; esac

command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"

tmp=$(mktemp -d)
part="" # a SIF being built
trap 'rm -rf "$tmp"; [ -z "$part" ] || rm -f "$part"' EXIT
trap 'exit 130' INT TERM

build_docker() {
    local t0=$SECONDS tags base builder
    tags=$("$root/images/build-base.sh" all) || die "images/build-base.sh failed"
    base=$(sed -n 1p <<<"$tags")
    builder=$(sed -n 2p <<<"$tags")
    [ -n "$base" ] && [ -n "$builder" ] || die "build-base.sh printed no image tags"
    local common=(-f "$root/images/Dockerfile" --build-arg "BASE=$base" --build-arg "BUILDER=$builder")
    # The legacy builder builds every stage up to --target. With --no-cache the
    # compile stage is built afresh once (and tagged); the two images then take
    # it as their only cache source, so nothing older is reused and nothing is
    # compiled twice.
    local first=() later=()
    if [ "$no_cache" = 1 ]; then
        first=(--no-cache)
        later=(--cache-from "$BUILD_IMAGE")
    fi
    log "docker build --target build -> $BUILD_IMAGE${first:+ (--no-cache)}"
    docker build "${common[@]}" "${first[@]}" --target build -t "$BUILD_IMAGE" "$root" >"$tmp/build.log" 2>&1 ||
        { tail -n 40 "$tmp/build.log" >&2; die "docker build (stage build) failed"; }
    log "docker build --target agent -> $BIN_IMAGE"
    docker build "${common[@]}" "${later[@]}" --target agent -t "$BIN_IMAGE" "$root" >"$tmp/agent.log" 2>&1 ||
        { tail -n 40 "$tmp/agent.log" >&2; die "docker build (stage agent) failed"; }
    log "docker build --target final -> $IMAGE"
    docker build "${common[@]}" "${later[@]}" --target final -t "$IMAGE" "$root" >"$tmp/final.log" 2>&1 ||
        { tail -n 40 "$tmp/final.log" >&2; die "docker build (stage final) failed"; }
    log "docker images built in $((SECONDS - t0)) s"
}

apptainer_bin() {
    if [ -n "${APPTAINER:-}" ]; then
        [ -x "$APPTAINER" ] || die "APPTAINER=$APPTAINER is not executable"
        echo "$APPTAINER"
        return
    fi
    if command -v apptainer >/dev/null; then
        command -v apptainer
        return
    fi
    local script="$root/tests/e2e/apptainer/build-apptainer.sh" p
    [ -x "$script" ] || [ -f "$script" ] ||
        die "no apptainer on PATH and no $script to build one: install Apptainer or set APPTAINER=/path/to/apptainer"
    log "no apptainer on PATH: building one with $script"
    p=$(bash "$script" | tail -n 1) || die "$script failed"
    [ -x "$p" ] || die "$script printed '$p', which is not an executable apptainer"
    echo "$p"
}

build_sif() {
    local app id have t0=$SECONDS
    id=$(docker image inspect -f '{{.Id}}' "$IMAGE") || die "$IMAGE is missing"
    have=$(cat "$out.image-id" 2>/dev/null || true)
    if [ "$no_cache" = 0 ] && [ -s "$out" ] && [ "$have" = "$id" ]; then
        log "$out is up to date (from $IMAGE $id)"
        return
    fi
    app=$(apptainer_bin)
    mkdir -p "$(dirname "$out")"
    log "$app build $out (Bootstrap: docker-daemon $IMAGE)"
    # built next to the target, then renamed: a failed build leaves the old SIF
    part="$out.part.$$"
    (cd "$root/images" && "$app" build --force --notest "$part" slot-agent.def) >"$tmp/sif.log" 2>&1 ||
        { tail -n 40 "$tmp/sif.log" >&2; die "apptainer build failed"; }
    mv -f "$part" "$out"
    part=""
    echo "$id" >"$out.image-id"
    log "SIF built in $((SECONDS - t0)) s"
}

build_docker
[ "$what" = docker ] || build_sif
echo "$IMAGE"
echo "$BIN_IMAGE"
[ "$what" = docker ] || echo "$out"
