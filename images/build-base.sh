#!/bin/bash
# Build the local base images the Dockerfile starts from, without a registry:
#
#   slot-base:SUITE     Debian SUITE (minbase) + images/base.packages
#   slot-builder:SUITE  the same + images/builder.packages (the agent's build deps)
#
# Each rootfs comes from `debootstrap --variant=minbase` against the apt mirror
# this machine is configured with (read from the apt sources, never
# hard-coded), is kept as a tarball under ${SLOT_CACHE:-/var/cache/slot}/images/
# named after the hash of its package list, and is imported with
# `docker import`. Nothing is rebuilt while the lists are unchanged, and
# nothing is imported again while the image carries the same slot.pkghash
# label.
#
# usage: images/build-base.sh [base|builder|all] [--force]
#   --force   debootstrap and import again even if the cache is current
# env:  SLOT_CACHE (default /var/cache/slot), SLOT_SUITE (default bookworm),
#       SLOT_DEBIAN_MIRROR (override the mirror read from the apt sources)
# prints the image tags on stdout, one a line; progress goes to stderr.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SUITE=${SLOT_SUITE:-bookworm}
CACHE=${SLOT_CACHE:-/var/cache/slot}/images
VARIANT=minbase
# Bump when the way a rootfs is made changes (not the package lists): every
# cached tarball and imported image is then rebuilt.
RECIPE=1

die() { echo "build-base.sh: $*" >&2; exit 1; }
log() { echo "build-base.sh: $*" >&2; }

what=all
force=0
for a in "$@"; do
    case $a in
    base | builder | all) what=$a ;;
    --force) force=1 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$a' (usage: build-base.sh [base|builder|all] [--force])" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "debootstrap needs root: run as root or with sudo"
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (is dockerd running?)"
if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; } ||
        die "cannot install debootstrap with apt-get"
fi

# --- the mirror: the first enabled "deb" source for $SUITE -------------------
# deb822 (*.sources): stanzas of "Field: value" lines separated by blank lines.
deb822_mirror() {
    awk -v suite="$SUITE" '
        function flush() {
            if (uri != "" && types ~ /(^|[ \t])deb([ \t]|$)/ && enabled !~ /^[ \t]*no/ &&
                (" " suites " ") ~ ("[ \t]" suite "[ \t]")) {
                print uri "\t" signed; found = 1; exit
            }
            types = suites = uri = signed = enabled = ""
        }
        /^[ \t]*#/ { next }
        /^[ \t]*$/ { flush(); next }
        {
            f = tolower($1); v = $0; sub(/^[^:]*:[ \t]*/, "", v)
            if (f == "types:") types = v
            else if (f == "suites:") suites = v
            else if (f == "uris:") { split(v, u, /[ \t]+/); uri = u[1] }
            else if (f == "signed-by:") signed = v
            else if (f == "enabled:") enabled = v
        }
        END { if (!found) flush() }' "$@"
}
# one-line format: deb [opts] URI SUITE COMPONENTS...
oneline_mirror() {
    awk -v suite="$SUITE" '
        $1 != "deb" { next }
        {
            i = 2; signed = ""
            if ($2 ~ /^\[/) {
                while (i <= NF) {
                    if ($i ~ /^\[?signed-by=/) { s = $i; sub(/^\[?signed-by=/, "", s); sub(/\]$/, "", s); signed = s }
                    if ($i ~ /\]$/) { i++; break }
                    i++
                }
            }
            if ($(i + 1) == suite) { print $i "\t" signed; exit }
        }' "$@"
}

find_mirror() {
    local f out
    if [ -n "${SLOT_DEBIAN_MIRROR:-}" ]; then
        printf '%s\t\n' "$SLOT_DEBIAN_MIRROR"
        return
    fi
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        out=$(deb822_mirror "$f")
        [ -n "$out" ] && { echo "$out"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        out=$(oneline_mirror "$f")
        [ -n "$out" ] && { echo "$out"; return; }
    done
}

IFS=$'\t' read -r MIRROR SIGNED_BY < <(find_mirror) || true
[ -n "${MIRROR:-}" ] ||
    die "no 'deb' source for suite $SUITE in /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set SLOT_DEBIAN_MIRROR=URI"
KEYRING=""
for k in ${SIGNED_BY:-} /usr/share/keyrings/debian-archive-keyring.gpg; do
    if [ -f "$k" ]; then KEYRING=$k; break; fi
done
[ -n "$KEYRING" ] || die "no Debian archive keyring (install debian-archive-keyring)"

# --- package lists and their hash -------------------------------------------
read_list() { sed -e 's/#.*//' -e 's/[[:space:]]//g' "$@" | grep -v '^$' | sort -u; }
[ -f "$here/base.packages" ] || die "missing $here/base.packages"
[ -f "$here/builder.packages" ] || die "missing $here/builder.packages"

mkdir -p "$CACHE"
exec 9>"$CACHE/.build-base.lock"
if ! flock -n 9; then
    log "waiting for another build-base.sh (lock $CACHE/.build-base.lock)"
    flock -w 3600 9 || die "timed out waiting for the lock $CACHE/.build-base.lock"
fi

work=""
part=""
cleanup() {
    local rc=$?
    if [ -n "$work" ] && [ -d "$work" ]; then
        # debootstrap mounts proc/sys inside the target; a failed run can leave them
        awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r |
            while read -r m; do umount -l "$m" 2>/dev/null || true; done
        rm -rf --one-file-system "$work"
    fi
    [ -z "$part" ] || rm -f "$part"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# build_one NAME PACKAGES... : ensures slot-NAME:SUITE; prints its tag
build_one() {
    local name=$1
    shift
    local pkgs tag hash tarball have
    pkgs=$(printf '%s\n' "$@" | sort -u)
    tag="slot-$name:$SUITE"
    hash=$(printf 'recipe %s\nsuite %s\nvariant %s\n%s\n' "$RECIPE" "$SUITE" "$VARIANT" "$pkgs" |
        sha256sum | cut -c1-16)
    tarball="$CACHE/slot-$name-$SUITE-$hash.tar.gz"

    if [ "$force" = 1 ] || [ ! -s "$tarball" ]; then
        log "$tag: debootstrap $SUITE ($VARIANT) from $MIRROR with: $(echo $pkgs)"
        work=$(mktemp -d "$CACHE/rootfs-$name.XXXXXX")
        mkdir -p "$CACHE/debs"
        local t0=$SECONDS
        if ! debootstrap --variant="$VARIANT" --keyring="$KEYRING" --cache-dir="$CACHE/debs" \
            --include="$(echo $pkgs | tr ' ' ',')" "$SUITE" "$work/root" "$MIRROR" \
            >"$work/debootstrap.log" 2>&1; then
            tail -n 30 "$work/debootstrap.log" >&2
            [ -f "$work/root/debootstrap/debootstrap.log" ] && tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2
            die "$tag: debootstrap failed (log above)"
        fi
        local r="$work/root"
        # what a container image does not carry: package indexes, downloaded
        # .debs, logs, and files Docker provides at run time
        rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
            "$r"/var/log/*.log "$r"/var/log/apt/* "$r"/etc/hostname "$r"/etc/resolv.conf \
            "$r"/etc/machine-id "$r"/var/lib/dbus/machine-id
        : >"$r/etc/machine-id"
        printf '%s\n' "$pkgs" >"$r/etc/slot-image-packages"
        part="$tarball.part"
        tar --numeric-owner --xattrs -C "$r" \
            --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./run/*' \
            -cf - . | gzip -1 >"$part"
        mv -f "$part" "$tarball"
        part=""
        rm -rf --one-file-system "$work"
        work=""
        log "$tag: rootfs $(du -h "$tarball" | cut -f1) in $((SECONDS - t0)) s -> $tarball"
        # older tarballs of this image (other package lists) are dead weight
        find "$CACHE" -maxdepth 1 -name "slot-$name-$SUITE-*.tar.gz" ! -name "$(basename "$tarball")" -delete
    else
        log "$tag: cached rootfs $tarball"
    fi

    have=$(docker image inspect -f '{{ index .Config.Labels "slot.pkghash" }}' "$tag" 2>/dev/null || true)
    if [ "$force" = 1 ] || [ "$have" != "$hash" ]; then
        log "$tag: docker import"
        docker import \
            --change "LABEL slot.pkghash=$hash" \
            --change "LABEL slot.suite=$SUITE" \
            --change "LABEL org.opencontainers.image.title=$tag" \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change 'ENV LANG=C.UTF-8' \
            --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=$VARIANT $SUITE + $(echo $pkgs)" \
            "$tarball" "$tag" >/dev/null
    else
        log "$tag: up to date (slot.pkghash=$hash)"
    fi
    echo "$tag"
}

mapfile -t base_pkgs < <(read_list "$here/base.packages")
mapfile -t builder_pkgs < <(read_list "$here/base.packages" "$here/builder.packages")
case $what in
base) build_one base "${base_pkgs[@]}" ;;
builder) build_one builder "${builder_pkgs[@]}" ;;
all)
    build_one base "${base_pkgs[@]}"
    build_one builder "${builder_pkgs[@]}"
    ;;
esac
