#!/usr/bin/env bash
# Build Nomad v1.6.3 (the last release that is clearly MPL-2.0; 1.7.0 on is
# BUSL) from its Go module, fetched through the configured Go module proxy,
# and cache the binary outside the repository:
#
#   ${SLOT_CACHE:-/var/cache/slot}/nomad-1.6.3/nomad
#
# usage: tests/e2e/nomad/build-nomad.sh
#
# For tests only: 1.6.3 is end-of-life.
#
# - The module zip of github.com/hashicorp/nomad lacks api/ (a nested module)
#   while its go.mod says `replace github.com/hashicorp/nomad/api => ./api`,
#   so `go install ...@v1.6.3` refuses. The api module is fetched at the same
#   commit (as a pseudo-version built from the tag's commit time and hash) and
#   put in place as ./api of a writable copy, then `go build` runs there.
# - CGO_ENABLED=1 (gcc needed): with CGO_ENABLED=0 the build stops at
#   "github.com/opencontainers/runc/libcontainer/nsenter: build constraints
#   exclude all Go files" (drivers/shared/executor imports it). The binary
#   links only libc dynamically.
# - No `ui` build tag: the web UI is not embedded (stub assets). Not `release`
#   either, as the GNUmakefile's dev build.
# - A second run with the cache present only checks that the binary answers
#   `nomad version` with v1.6.3 (well under a second).
# - stdout: the absolute path of the nomad binary (the last line).
#   stderr: progress; on failure the reason, and the tail of the build log
#   (${SLOT_CACHE}/nomad-1.6.3.build.log).
#
# env: SLOT_CACHE  cache root (default /var/cache/slot)
#      GO          go binary (default: `go` on PATH, else /usr/local/go/bin/go)
#      SLOT_NOMAD_KEEP_BUILD=1  keep the build directory (debugging)
set -euo pipefail

NOMAD_VERSION=1.6.3
NOMAD_MODULE=github.com/hashicorp/nomad
# The commit of tag v1.6.3 and its commit time (the module's .info "Time").
NOMAD_COMMIT=e0497bff14378d68cad76a801cc0eba93ce05039
NOMAD_COMMIT_TIME=2023-10-30T12:58:10Z
# h1: hashes of the two module zips (the "Sum" of `go mod download -json`).
# The downloads are checked against these pins; their dependencies are checked
# against the go.sum inside the nomad module (go build is -mod=readonly).
NOMAD_MODULE_SUM="h1:M22raG/TH11N5XNRd/uQn64R/oeqQkwvQ/fvpoCvRCQ="
API_MODULE=github.com/hashicorp/nomad/api
API_VERSION=v0.0.0-20231030125810-e0497bff1437
API_MODULE_SUM="h1:Q8BvGHtbdcY6qwvUetuRtGVPi77psJARI0cFboSHV4s="

umask 022
me=build-nomad.sh
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
PREFIX=$CACHE_ROOT/nomad-$NOMAD_VERSION
BIN=$PREFIX/nomad
MARKER=$PREFIX/.slot-build-complete
LOG=$CACHE_ROOT/nomad-$NOMAD_VERSION.build.log

# True when the cache holds a complete build of the pinned version that runs.
cached_ok() {
    if ! [ -f "$MARKER" ] || ! [ -x "$BIN" ]; then return 1; fi
    local v
    # Not `| head -n 1`: with pipefail, nomad's SIGPIPE when head exits
    # first would fail a binary that runs.
    v=$("$BIN" version 2>/dev/null) || return 1
    v=${v%%$'\n'*}
    [ "$v" = "Nomad v$NOMAD_VERSION" ]
}

if cached_ok; then
    echo "$BIN"
    exit 0
fi

# --- cold build ----------------------------------------------------------------

t0=$SECONDS
mkdir -p "$CACHE_ROOT" 2>/dev/null || die "cannot create the cache directory $CACHE_ROOT (as $(id -un))"
[ -w "$CACHE_ROOT" ] || die "the cache directory $CACHE_ROOT is not writable by $(id -un)"

# One build at a time per version; a run that waited finds the cache filled.
command -v flock >/dev/null || die "flock (util-linux) is not installed"
exec 9>"$CACHE_ROOT/.nomad-$NOMAD_VERSION.lock"
if ! flock -n 9; then
    log "another build of nomad $NOMAD_VERSION is running; waiting for it"
    flock 9
fi
if cached_ok; then
    echo "$BIN"
    exit 0
fi

if ! command -v gcc >/dev/null; then
    [ "$(id -u)" = 0 ] || die "gcc is not installed (nomad needs cgo): apt-get install gcc libc6-dev"
    log "installing Debian packages: gcc libc6-dev"
    aptlog=$(mktemp)
    if ! { DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update -qq &&
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq gcc libc6-dev; } >"$aptlog" 2>&1; then
        tail -n 30 "$aptlog" >&2
        rm -f "$aptlog"
        die "apt-get install gcc libc6-dev failed"
    fi
    rm -f "$aptlog"
    command -v gcc >/dev/null || die "gcc still missing after apt-get install gcc"
fi

if [ -z "${GO:-}" ]; then
    GO=$(command -v go || true)
    [ -n "$GO" ] || GO=/usr/local/go/bin/go
fi
[ -x "$GO" ] || die "no Go toolchain: '$GO' is not an executable (set GO=/path/to/go)"
GO=$(readlink -f "$GO")
PATH="$(dirname "$GO"):$PATH"
export PATH
export GOTOOLCHAIN=local
# The source tree is not a git checkout: no VCS stamping.
export GOFLAGS=-buildvcs=false
# The two nomad modules are checked against the pins above, so they need no
# checksum-database lookup (which a restricted proxy may refuse).
export GONOSUMDB="$NOMAD_MODULE${GONOSUMDB:+,$GONOSUMDB}"

work=$(mktemp -d "$CACHE_ROOT/.nomad-$NOMAD_VERSION.build.XXXXXX")
cleanup() {
    if [ "${SLOT_NOMAD_KEEP_BUILD:-0}" = 1 ]; then
        log "build directory kept: $work"
    else
        chmod -R u+w "$work" 2>/dev/null || true
        rm -rf "$work"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# A private build cache (about 2 GB of objects, dropped with the build dir).
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

# Downloads module "$1" and prints its Dir; dies on an error or a hash
# mismatch with the pin "$2".
download() {
    local mod=$1 want=$2 json err dir sum
    echo "+ go mod download -json $mod" >>"$LOG"
    json=$(cd "$work" && "$GO" mod download -json "$mod" 2>>"$LOG") || true
    echo "$json" >>"$LOG"
    err=$(sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
    [ -z "$err" ] || die "go mod download $mod: $err"
    dir=$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
    sum=$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",\{0,1\}$/\1/p' <<<"$json")
    [ -d "${dir:-/nonexistent}" ] || die "go mod download $mod gave no source directory (output: ${json:-none}; see $LOG)"
    [ "$sum" = "$want" ] || die "module hash mismatch for $mod: got '$sum', pinned '$want'"
    echo "$dir"
}

log "nomad $NOMAD_VERSION: cold build into $PREFIX (log: $LOG)"
gover=$("$GO" env GOVERSION 2>>"$LOG") || die "'$GO env GOVERSION' failed"
log "go: $GO ($gover), GOPROXY=$("$GO" env GOPROXY)"

log "downloading $NOMAD_MODULE@v$NOMAD_VERSION and $API_MODULE@$API_VERSION"
srcdir=$(download "$NOMAD_MODULE@v$NOMAD_VERSION" "$NOMAD_MODULE_SUM")
apidir=$(download "$API_MODULE@$API_VERSION" "$API_MODULE_SUM")

minver=$(sed -n 's/^go \([0-9.]*\).*/\1/p' "$srcdir/go.mod")
if [ -n "$minver" ] && ! printf '%s\n%s\n' "$minver" "${gover#go}" | sort -V -C; then
    die "nomad $NOMAD_VERSION needs go >= $minver, but $GO is $gover (set GO=, or export GOTOOLCHAIN=go$minver to fetch it through the proxy)"
fi
grep -q "^replace $API_MODULE => ./api" "$srcdir/go.mod" ||
    die "$srcdir/go.mod has no 'replace $API_MODULE => ./api' line; the api/ workaround does not apply"

# The module cache is read-only: copy both, make them writable, put api/ in.
src=$work/src
cp -r "$srcdir" "$src"
chmod -R u+w "$src"
[ ! -e "$src/api" ] || die "the nomad module zip unexpectedly contains api/"
cp -r "$apidir" "$src/api"
chmod -R u+w "$src/api"

log "downloading dependencies"
run "go mod download (dependencies)" env -C "$src" "$GO" mod download
log "compiling (about 3 minutes on 2 cores)"
ldflags="-X $NOMAD_MODULE/version.GitCommit=$NOMAD_COMMIT -X $NOMAD_MODULE/version.BuildDate=$NOMAD_COMMIT_TIME"
run "go build" env -C "$src" CGO_ENABLED=1 "$GO" build -trimpath -ldflags "$ldflags" -o "$work/nomad" .

v=$("$work/nomad" version 2>&1) || die "the built nomad does not run: $v"
v=${v%%$'\n'*}
[ "$v" = "Nomad v$NOMAD_VERSION" ] || die "the built nomad reports '$v', expected 'Nomad v$NOMAD_VERSION'"

# Stale partial install (no completion marker): replace it. The binary is
# moved in with one rename, then the marker is written.
if [ -e "$PREFIX" ]; then
    log "removing incomplete install $PREFIX"
    rm -rf "$PREFIX"
fi
mkdir -p "$PREFIX"
mv "$work/nomad" "$BIN"
{
    echo "version=$NOMAD_VERSION"
    echo "commit=$NOMAD_COMMIT"
    echo "module_sum=$NOMAD_MODULE_SUM"
    echo "api_module=$API_MODULE@$API_VERSION $API_MODULE_SUM"
    echo "go=$gover"
    echo "cgo=1"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "build_seconds=$((SECONDS - t0))"
} >"$MARKER"
cached_ok || die "the installed $BIN does not answer 'nomad version' with v$NOMAD_VERSION"

log "nomad $NOMAD_VERSION built in $((SECONDS - t0)) s"
echo "$BIN"
