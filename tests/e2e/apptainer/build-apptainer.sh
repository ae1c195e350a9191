#!/usr/bin/env bash
# Build Apptainer (not packaged in Debian 12) from its Go module, fetched
# through the configured Go module proxy, and install it into a cache outside
# the repository, keyed by version:
#
#   ${SLOT_CACHE:-/var/cache/slot}/apptainer-<version>/bin/apptainer
#
# usage: tests/e2e/apptainer/build-apptainer.sh
#
# - Installs the Debian packages it needs (only the missing ones) with apt-get;
#   that needs root. Build: build-essential pkg-config libseccomp-dev.
#   Runtime: uidmap squashfs-tools squashfuse fuse2fs fuse-overlayfs fuse3.
# - No GitHub access is needed: the FUSE helpers (squashfuse_ll, fuse2fs,
#   fuse-overlayfs) come from Debian instead of Apptainer's
#   scripts/download-dependencies, and the CNI plugins are Go modules.
# - Non-setuid install (--without-suid): unprivileged users run containers in
#   user namespaces.
# - A second run with the cache present only checks that the cached binary
#   answers `apptainer version` and that the runtime packages are installed.
# - stdout: the absolute path of the apptainer binary (the last line).
#   stderr: progress; on failure the reason, and the tail of the build log.
#
# env: SLOT_CACHE  cache root (default /var/cache/slot)
#      GO          go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#      SLOT_APPTAINER_KEEP_BUILD=1  keep the build directory (debugging)
set -euo pipefail

# The pinned version, and the h1: hash of its module zip (the "Sum" that
# `go mod download -json github.com/apptainer/apptainer@v<version>` prints).
# The proxy here serves no checksum-database answers for this module, so the
# download is checked against this pin instead of sum.golang.org. Its
# dependencies are checked against the go.sum inside the module (-mod=readonly).
APPTAINER_VERSION=1.4.3
APPTAINER_MODULE_SUM="h1:2gBgyoYkEI5pAlP7uYBPW7cCrJkfSl8uaEE0se8kubk="
APPTAINER_MODULE=github.com/apptainer/apptainer

BUILD_PKGS=(build-essential pkg-config libseccomp-dev)
RUNTIME_PKGS=(uidmap squashfs-tools squashfuse fuse2fs fuse-overlayfs fuse3)

umask 022
me=build-apptainer.sh
die() {
    echo "$me: error: $*" >&2
    exit 1
}
log() { echo "$me: $*" >&2; }

CACHE_ROOT=${SLOT_CACHE:-/var/cache/slot}
case $CACHE_ROOT in
/*) ;;
*) die "SLOT_CACHE must be an absolute path, got '$CACHE_ROOT'" ;;
esac
CACHE_ROOT=${CACHE_ROOT%/}
PREFIX=$CACHE_ROOT/apptainer-$APPTAINER_VERSION
BIN=$PREFIX/bin/apptainer
MARKER=$PREFIX/.slot-build-complete
LOG=$CACHE_ROOT/apptainer-$APPTAINER_VERSION.build.log

# --- Debian packages ---------------------------------------------------------

# Prints the packages of "$@" that are not installed.
missing_pkgs() {
    local out p
    out=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "$@" 2>/dev/null || true)
    for p in "$@"; do
        grep -qx "$p installed" <<<"$out" || echo "$p"
    done
}

ensure_pkgs() {
    local missing
    missing=$(missing_pkgs "$@" | tr '\n' ' ')
    missing=${missing% }
    [ -z "$missing" ] && return 0
    [ "$(id -u)" = 0 ] ||
        die "missing Debian packages: $missing (run this script as root to install them, or: apt-get install $missing)"
    log "installing Debian packages: $missing"
    local aptlog
    aptlog=$(mktemp)
    # Wait for another apt/dpkg run instead of failing on its lock.
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq >"$aptlog" 2>&1; then
        cat "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get update failed"
    fi
    # shellcheck disable=SC2086 # $missing is a list of package names
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq $missing >"$aptlog" 2>&1; then
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get install $missing failed"
    fi
    rm -f "$aptlog"
    missing=$(missing_pkgs "$@" | tr '\n' ' ')
    [ -z "${missing% }" ] || die "still not installed after apt-get install: $missing"
}

# --- the cached install ------------------------------------------------------

# True when the cache holds a complete install of the pinned version that runs.
cached_ok() {
    if ! [ -f "$MARKER" ] || ! [ -x "$BIN" ]; then return 1; fi
    local v
    v=$("$BIN" version 2>/dev/null) || return 1
    [ "$v" = "$APPTAINER_VERSION" ]
}

if cached_ok; then
    ensure_pkgs "${RUNTIME_PKGS[@]}"
    echo "$BIN"
    exit 0
fi

# --- cold build ----------------------------------------------------------------

t0=$SECONDS
mkdir -p "$CACHE_ROOT" 2>/dev/null || die "cannot create the cache directory $CACHE_ROOT (as $(id -un))"
[ -w "$CACHE_ROOT" ] || die "the cache directory $CACHE_ROOT is not writable by $(id -un)"

# One build at a time per version; a run that waited finds the cache filled.
command -v flock >/dev/null || die "flock (util-linux) is not installed"
exec 9>"$CACHE_ROOT/.apptainer-$APPTAINER_VERSION.lock"
if ! flock -n 9; then
    log "another build of apptainer $APPTAINER_VERSION is running; waiting for it"
    flock 9
fi
if cached_ok; then
    ensure_pkgs "${RUNTIME_PKGS[@]}"
    echo "$BIN"
    exit 0
fi

ensure_pkgs "${BUILD_PKGS[@]}" "${RUNTIME_PKGS[@]}"

if [ -z "${GO:-}" ]; then
    GO=$(command -v go || true)
    [ -n "$GO" ] || GO=/usr/local/go/bin/go
fi
[ -x "$GO" ] || die "no Go toolchain: '$GO' is not an executable (set GO=/path/to/go)"
GO=$(readlink -f "$GO")
PATH="$(dirname "$GO"):$PATH"
export PATH
# Build with the local toolchain (the module needs go >= 1.23.6; checked below).
export GOTOOLCHAIN=local
# The module's own go.sum pins every dependency; the Makefile passes
# -mod=readonly. No VCS stamping: the source tree is not a git checkout.
export GOFLAGS=-buildvcs=false
# No checksum-database lookup for the apptainer module itself (the proxy here
# answers 404 for it); APPTAINER_MODULE_SUM is checked instead.
export GONOSUMDB="$APPTAINER_MODULE${GONOSUMDB:+,$GONOSUMDB}"

work=$(mktemp -d "$CACHE_ROOT/.apptainer-$APPTAINER_VERSION.build.XXXXXX")
cleanup() {
    if [ "${SLOT_APPTAINER_KEEP_BUILD:-0}" = 1 ]; then
        log "build directory kept: $work"
    else
        chmod -R u+w "$work" 2>/dev/null || true
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A private build cache: apptainer's Makefile runs `go clean -cache`, which
# would otherwise wipe the user's shared Go build cache.
export GOCACHE=$work/gocache
: >"$LOG"

# Runs "$@" with its output in the build log; on failure shows the log's tail
# and dies with "$what failed".
run() {
    local what=$1
    shift
    echo "+ $*" >>"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        echo "---- last lines of $LOG ----" >&2
        tail -n 40 "$LOG" >&2
        echo "----" >&2
        die "$what failed (exit status of: $*)"
    fi
}

log "apptainer $APPTAINER_VERSION: cold build into $PREFIX (log: $LOG)"
gover=$("$GO" env GOVERSION 2>>"$LOG") || die "'$GO env GOVERSION' failed"
log "go: $GO ($gover)"

# Fetch the module through the proxy (outside any module: -mod must not be set).
log "downloading $APPTAINER_MODULE@v$APPTAINER_VERSION through GOPROXY=$("$GO" env GOPROXY)"
dljson=$(cd "$work" && "$GO" mod download -json "$APPTAINER_MODULE@v$APPTAINER_VERSION" 2>>"$LOG") || true
dlerr=$(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$dljson")
[ -z "$dlerr" ] || die "go mod download $APPTAINER_MODULE@v$APPTAINER_VERSION: $dlerr"
srcdir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$dljson")
sum=$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",\{0,1\}$/\1/p' <<<"$dljson")
[ -d "${srcdir:-/nonexistent}" ] ||
    die "go mod download $APPTAINER_MODULE@v$APPTAINER_VERSION gave no source directory (output: $dljson; see $LOG)"
[ "$sum" = "$APPTAINER_MODULE_SUM" ] ||
    die "module hash mismatch for $APPTAINER_MODULE@v$APPTAINER_VERSION: got '$sum', pinned '$APPTAINER_MODULE_SUM'"

# The module cache is read-only and the zip keeps no exec bits: copy it, make
# it writable, and make its scripts executable again. No git checkout, so the
# version comes from a VERSION file.
src=$work/src
cp -r "$srcdir" "$src"
chmod -R u+w "$src"
find "$src" -type f -print0 | xargs -0 awk 'FNR == 1 && /^#!/ { print FILENAME }' |
    while IFS= read -r f; do chmod +x "$f"; done
echo "$APPTAINER_VERSION" >"$src/VERSION"

minver=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$src/go.mod")
if [ -n "$minver" ] && ! printf '%s\n%s\n' "$minver" "${gover#go}" | sort -V -C; then
    die "apptainer $APPTAINER_VERSION needs go >= $minver, but $GO is $gover (set GO=, or export GOTOOLCHAIN=go$minver to fetch it through the proxy)"
fi

# Stale partial install of this version (no completion marker): start over.
if [ -e "$PREFIX" ]; then
    log "removing incomplete install $PREFIX"
    chmod -R u+w "$PREFIX" 2>/dev/null || true
    rm -rf "$PREFIX"
fi

# --without-suid: no setuid starter; --reproducible: no build paths baked into
# the binary (they would point into the deleted build dir; it only disables
# plugin builds); --without-libsubid: /etc/subuid is read directly, one
# package fewer.
log "configuring (mconfig --without-suid --without-libsubid --reproducible --prefix=$PREFIX)"
run "mconfig" env -C "$src" ./mconfig -b builddir --prefix="$PREFIX" --without-suid --without-libsubid --reproducible
log "compiling (several minutes)"
run "make" make -C "$src/builddir"
# Install into a staging root, then move into place in one rename, so a
# failure never leaves a half-installed prefix behind.
stage=$work/stage
log "installing"
run "make install" make -C "$src/builddir" install DESTDIR="$stage"
[ -x "$stage$PREFIX/bin/apptainer" ] || die "make install did not produce $stage$PREFIX/bin/apptainer"
mv "$stage$PREFIX" "$PREFIX"

v=$("$BIN" version 2>&1) || die "the installed $BIN does not run: $v"
[ "$v" = "$APPTAINER_VERSION" ] || die "the installed $BIN reports version '$v', expected '$APPTAINER_VERSION'"
{
    echo "version=$APPTAINER_VERSION"
    echo "module_sum=$APPTAINER_MODULE_SUM"
    echo "go=$gover"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$MARKER"

# Things unprivileged users will meet; informational only.
if [ -e /dev/fuse ] && ! [ "$(stat -c %a /dev/fuse)" = 666 ]; then
    log "note: /dev/fuse is mode $(stat -c %a /dev/fuse): unprivileged users cannot mount SIF images with squashfuse; use 'apptainer exec --unsquash' (or run sandbox directories)"
fi
d=$PREFIX
while [ "$d" != / ]; do
    d=$(dirname "$d")
    if [ "$(($(stat -c '%#a' "$d") & 1))" = 0 ]; then
        log "note: $d is not searchable by other users, so unprivileged users cannot run $BIN"
        break
    fi
done

log "apptainer $APPTAINER_VERSION built in $((SECONDS - t0)) s"
echo "$BIN"
