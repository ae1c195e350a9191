#!/bin/bash
# Build the libFuzzer target with ASan+UBSan and run a fixed number of
# iterations, seeded with the protocol vectors. Exit non-zero on any finding.
set -euo pipefail
runs=${1:-200000}
root=$(cd "$(dirname "$0")/../.." && pwd)
out=${FUZZ_DIR:-$root/build-fuzz}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
clang -g -O1 -std=gnu11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined \
    -fno-sanitize-recover=undefined -I"$root/proto" \
    "$root/tests/fuzz/fuzz_frame.c" "$root"/proto/*.c -lmsgpackc -lmd -o "$out/fuzz_frame"
mkdir -p "$work/corpus"
/usr/bin/python3 - "$root/proto/vectors/vectors.json" "$work/corpus" <<'PY'
import json, sys, pathlib
for i, v in enumerate(json.load(open(sys.argv[1]))):
    pathlib.Path(sys.argv[2], f"v{i:03d}").write_bytes(bytes.fromhex(v["hex"]))
PY
if "$out/fuzz_frame" -runs="$runs" -max_len=4096 -seed=1 -print_final_stats=1 \
    -artifact_prefix="$out/" "$work/corpus" >"$work/log" 2>&1; then
    tail -n 12 "$work/log"
    echo "fuzz: $runs runs, 0 crashes"
else
    tail -n 60 "$work/log"
    echo "fuzz: FAILED (artifacts in $out/)"
    exit 1
fi
