#!/bin/bash
# Build if needed and run the exec benchmark; extra arguments go to it
# (e.g. --ops 5000, --levels 1,8,32, --json).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
[ -f "$root/build/build.ninja" ] || meson setup "$root/build" >/dev/null
meson compile -C "$root/build" >/dev/null
exec "$root/build/bench-agent-exec" --agent "$root/build/slot-agent" "$@"
