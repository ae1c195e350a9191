#!/usr/bin/python3
"""Modal bridge figures, printed, never asserted: the latency the bridge adds
to an `exec` of `true`, against the same agent reached directly.

Modal's cloud cannot be reached from here, so the sandbox is the FAKE of
tests/controller/modal_fake (the agent daemon runs locally as the sandbox's
process). Both paths end in the same agent through `slot-agent --attach`:

  direct:  this process -> slot-agent --attach unix:SOCK (stdio)       -> agent
  bridge:  this process -> slot-modal-bridge attach (stdio) -> fake
           Sandbox.exec of slot-agent --attach                          -> agent

so the difference is the bridge's own cost (Python asyncio pump, the SDK's
write/drain and stdout iteration as the fake implements them), not Modal's
network. Rounds alternate between the paths; p50 and p99 per concurrency.

Usage: tests/bench/modal.py [--build build] [--ops 2000] [--levels 1,32] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack

ROOT = Path(__file__).resolve().parents[2]
FAKE = ROOT / "tests" / "controller" / "modal_fake"
sys.path.insert(0, str(FAKE))


class Stream:
    """Pipelined msgpack frames over a child's stdin/stdout."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env)
        assert self.p.stdin and self.p.stdout
        self.w = self.p.stdin.fileno()
        self.r = self.p.stdout.fileno()
        self.buf = b""
        self.next = 0

    def send(self, op: str, args: dict) -> int:
        self.next += 1
        body = msgpack.packb({"id": self.next, "op": op, "args": args}, use_bin_type=True)
        os.write(self.w, struct.pack(">I", len(body)) + body)
        return self.next

    def recv(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                n = struct.unpack(">I", self.buf[:4])[0]
                if len(self.buf) >= 4 + n:
                    body, self.buf = self.buf[4:4 + n], self.buf[4 + n:]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.r], [], [], left)[0]:
                raise TimeoutError("no answer")
            chunk = os.read(self.r, 1 << 20)
            if not chunk:
                raise EOFError("stream closed")
            self.buf += chunk

    def call(self, op: str, args: dict) -> dict:
        i = self.send(op, args)
        while True:
            f = self.recv()
            if f.get("id") == i and "event" not in f:
                return f

    def close(self) -> None:
        assert self.p.stdin
        self.p.stdin.close()
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()


def run(s: Stream, ops: int, conc: int, slots: int) -> list[float]:
    """Latencies (ms) of `ops` execs of `true`, `conc` in flight."""
    lat: list[float] = []
    sent: dict[int, float] = {}
    k = 0
    while len(lat) < ops:
        while len(sent) < conc and k < ops:
            i = s.send("exec", {"slot": k % slots, "argv": ["true"]})
            sent[i] = time.perf_counter()
            k += 1
        f = s.recv()
        if "event" in f or f.get("id") not in sent:
            continue
        assert f.get("ok", True) and "error" not in f, f
        lat.append((time.perf_counter() - sent.pop(f["id"])) * 1000)
    return lat


def pct(v: list[float], q: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--levels", default="1,32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = Path(a.build).resolve()
    d = Path(tempfile.mkdtemp(prefix="bm-", dir="/tmp"))
    d.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env.update(SLOT_FAKE_MODAL_DIR=str(d), MODAL_TOKEN_ID="ak-fake", MODAL_TOKEN_SECRET="as",
               PYTHONPATH=str(FAKE), MODAL_CONFIG_PATH=str(d / "none.toml"))
    os.environ.update({k: env[k] for k in ("SLOT_FAKE_MODAL_DIR", "MODAL_TOKEN_ID",
                                           "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH")})
    from modal import _fake_state  # the fake, for the sandbox's socket path

    slots = 32
    bridge_argv = [str(build / "slot-modal-bridge"), "attach", "--app", "bench", "--name",
                   "bench-1", "--slots", str(slots), "--agent-bin", str(build / "slot-agent"),
                   "--isolation", "best_effort"]
    results: dict[str, Any] = {}
    try:
        bridge = Stream(bridge_argv, env)
        bridge.call("hello", {})
        sb = next(x for x in _fake_state.sandboxes(d) if x.running())
        sock = sb.root / "run" / "slot-agent.sock"
        direct = Stream([str(build / "slot-agent"), "--attach", f"unix:{sock}"], env)
        direct.call("hello", {})
        for s in (direct, bridge):  # warm-up: boxes of every slot made
            run(s, 200, 32, slots)
        levels = [int(x) for x in a.levels.split(",")]
        lat: dict[tuple[str, int], list[float]] = {}
        per = max(1, a.ops // a.rounds)
        for _ in range(a.rounds):
            for c in levels:
                for name, s in (("direct", direct), ("bridge", bridge)):
                    lat.setdefault((name, c), []).extend(run(s, per, c, slots))
        for c in levels:
            dl, bl = lat[("direct", c)], lat[("bridge", c)]
            results[str(c)] = {
                "direct_p50_ms": statistics.median(dl), "bridge_p50_ms": statistics.median(bl),
                "direct_p99_ms": pct(dl, 0.99), "bridge_p99_ms": pct(bl, 0.99),
                "added_p50_ms": statistics.median(bl) - statistics.median(dl), "n": len(bl)}
        direct.close()
        bridge.close()
    finally:
        _fake_state.terminate_all(d)
        shutil.rmtree(d, ignore_errors=True)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"modal bridge on the fake SDK, exec of `true`, {os.cpu_count()} cores, "
          f"{a.ops} ops per path and level")
    for c, r in results.items():
        print(f"  c={c:>2}  direct p50 {r['direct_p50_ms']:.3f} ms p99 {r['direct_p99_ms']:.3f}; "
              f"bridge p50 {r['bridge_p50_ms']:.3f} ms p99 {r['bridge_p99_ms']:.3f}; "
              f"added p50 {r['added_p50_ms']:+.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
