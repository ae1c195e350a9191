#!/bin/bash
# Build the libFuzzer target with ASan+UBSan in a temporary directory, seed
# it with the protocol vectors and run a fixed number of iterations.
# Usage: tests/fuzz/run.sh [RUNS]   (default 200000)
# Exits non-zero on any finding and keeps the work directory (binary, log,
# crash input) for inspection; prints 'fuzz: N runs, 0 crashes' otherwise.
set -euo pipefail
runs=${1:-200000}
root=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/slot-fuzz.XXXXXX")
keep=0
cleanup() { if [ "$keep" = 0 ]; then rm -rf "$work"; fi; }
trap cleanup EXIT

clang -g -O1 -std=gnu11 -D_GNU_SOURCE -Wall -Wextra -Werror -Wshadow \
    -Wno-missing-field-initializers -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -I"$root/proto" \
    "$root/tests/fuzz/fuzz_frame.c" "$root"/proto/*.c -lmsgpackc -lmd -lwolfssl -o "$work/fuzz_frame"

mkdir -p "$work/corpus"
/usr/bin/python3 - "$root/proto/vectors/vectors.json" "$work/corpus" <<'PY'
import json
import pathlib
import sys

for i, v in enumerate(json.loads(pathlib.Path(sys.argv[1]).read_text())):
    pathlib.Path(sys.argv[2], f"v{i:03d}").write_bytes(bytes.fromhex(v["hex"]))
PY

if ASAN_OPTIONS=detect_leaks=1 "$work/fuzz_frame" -runs="$runs" -max_len=4096 -seed=1 \
    -timeout=10 -print_final_stats=1 -artifact_prefix="$work/" "$work/corpus" \
    >"$work/log" 2>&1; then
    done_runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$work/log" | tail -n 1)
    echo "fuzz: ${done_runs:-$runs} runs, 0 crashes"
else
    keep=1
    tail -n 60 "$work/log"
    echo "fuzz: FAILED; log, binary and crash input kept in $work"
    exit 1
fi
