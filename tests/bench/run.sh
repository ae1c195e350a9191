#!/bin/bash
# Build if needed, then run the exec benchmark against the freshly built
# agent. Extra arguments go to bench-agent-exec, e.g.:
#   tests/bench/run.sh --ops 5000 --levels 1,8,32 --json
#   tests/bench/run.sh --rungs        (also isolation off / one rung at a time)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build="$root/build"
if [ ! -f "$build/build.ninja" ]; then
    meson setup "$build" "$root" >/dev/null
fi
# only what the bench needs, so unrelated targets cannot stop it
meson compile -C "$build" slot-agent bench-agent-exec >/dev/null
exec "$build/bench-agent-exec" --agent "$build/slot-agent" "$@"
