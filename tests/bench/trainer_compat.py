#!/usr/bin/python3
"""The trainer's pattern through the compatibility layer versus the raw
client: figures printed, never asserted.

32 trajectories run the same tool calls on one controller in one run,
rounds interleaved, for two workloads: "mixed" (write_file, Python runs,
read_file, ls) and "true" (bash `true` only: the layers' own cost):
- raw: `AsyncClient.batch` straight to the controller, one batch per
  trajectory step (slot's own wire API);
- backend: `ControllerToolBackend.execute_batch` from each trajectory, the
  trainer's conventions (the layer's own cost);
- compat: the trainer's executor pattern (tests/controller/note_executor.py:
  20 ms batch window, renaming, gather of acquires, `execute_batch`,
  `to_tool_result()`) on `ControllerToolBackend` with the trainer's
  conventions.
Latency is per tool call, from submission to result. Usage:
tests/bench/trainer_compat.py [--build build] [--trajectories 32] [--steps 8]
[--rounds 3]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "controller" / "python"))
sys.path.insert(0, str(ROOT / "tests" / "controller"))

from note_executor import ExecutorConfig, NoteExecutor  # noqa: E402
from slot_client import AsyncClient, ControllerToolBackend  # noqa: E402

CONFIG = """
profiles:
  default:
    slots_per_agent: {slots}
    min_agents: 4
    max_agents: 4
"""


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))] if xs else 0.0


def step_calls(i: int, k: int, light: bool = False) -> list[tuple[str, dict]]:
    """The calls of trajectory i, step k (the same for both paths): a mix
    of file writes, reads and Python runs, or (light) `true` only, which
    shows the layers' own cost."""
    if light:
        return [("bash", {"command": "true"})]
    if k == 0:
        return [("write_file", {"path": f"src/m{i}.py", "content": f"X = {i}\n" * 20})]
    if k % 3 == 1:
        return [("bash", {"command": f"cd src && python3 -c 'import m{i}; print(m{i}.X)'"})]
    if k % 3 == 2:
        return [("read_file", {"path": f"src/m{i}.py"})]
    return [("bash", {"command": "ls -la src | wc -l"})]


async def raw_round(addr: str, n: int, steps: int,
                    light: bool) -> tuple[float, list[float], int]:
    c = await AsyncClient.connect(addr)
    lat: list[float] = []
    errors = 0
    t0 = time.perf_counter()
    slots = await asyncio.gather(*(c.acquire(trajectory_id=f"raw-{i}", timeout_ms=60000)
                                   for i in range(n)))

    async def traj(i: int, slot: str) -> None:
        nonlocal errors
        for k in range(steps):
            reqs = [{"slot": slot, "tool": t, "args": a} for t, a in step_calls(i, k, light)]
            s = time.perf_counter()
            res = await c.batch(reqs, timeout_ms=30000)
            lat.extend([(time.perf_counter() - s) * 1000] * len(reqs))
            errors += sum(1 for r in res if not r.get("ok")
                          or r["result"].get("exit_code", 0) != 0)
        await c.release(slot, reset=True)

    await asyncio.gather(*(traj(i, s["slot"]) for i, s in enumerate(slots)))
    elapsed = time.perf_counter() - t0
    await c.close()
    return elapsed, lat, errors


async def backend_round(addr: str, n: int, steps: int,
                        light: bool) -> tuple[float, list[float], int]:
    """ControllerToolBackend.execute_batch straight from each trajectory
    (no executor): the compatibility layer's own cost."""
    backend = ControllerToolBackend(addr)
    await backend.start()
    lat: list[float] = []
    errors = 0
    t0 = time.perf_counter()

    async def traj(i: int) -> None:
        nonlocal errors
        slot = await backend.acquire(trajectory_id=f"backend-{i}")
        for k in range(steps):
            calls = [(slot, t, a) for t, a in step_calls(i, k, light)]
            s = time.perf_counter()
            rs = await backend.execute_batch(calls, timeout_s=30)
            lat.extend([(time.perf_counter() - s) * 1000] * len(calls))
            errors += sum(not r.success for r in rs)
        await backend.release(slot, reset_workspace=True)

    await asyncio.gather(*(traj(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await backend.stop()
    return elapsed, lat, errors


async def compat_round(addr: str, n: int, steps: int,
                       light: bool) -> tuple[float, list[float], int]:
    backend = ControllerToolBackend(addr)
    await backend.start()
    ex = NoteExecutor(backend, ExecutorConfig())
    await ex.start()
    lat: list[float] = []
    errors = 0
    t0 = time.perf_counter()

    async def traj(i: int) -> None:
        nonlocal errors
        t = f"compat-{i}"
        for k in range(steps):
            for tool, args in step_calls(i, k, light):
                s = time.perf_counter()
                r = await ex.execute(t, tool, args)
                lat.append((time.perf_counter() - s) * 1000)
                errors += not r.success
        await ex.release_trajectory(t, reset_workspace=True)

    await asyncio.gather(*(traj(i) for i in range(n)))
    elapsed = time.perf_counter() - t0
    await ex.close()
    await backend.stop()
    return elapsed, lat, errors


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--trajectories", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    build = (ROOT / a.build).resolve()
    tmp = Path(tempfile.mkdtemp(prefix="slot-bench-compat-", dir="/var/tmp"))
    tmp.chmod(0o755)
    (tmp / "c.yaml").write_text(CONFIG.format(slots=max(1, (a.trajectories + 3) // 4)))
    addr = f"unix:{tmp}/ctl.sock"
    log = open(tmp / "ctl.log", "wb")
    ctl = subprocess.Popen([str(build / "slot-controller"), "--config", str(tmp / "c.yaml"),
                            "--listen", addr, "--state-dir", str(tmp / "state")],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        async def ready() -> None:
            deadline = time.monotonic() + 30
            while True:
                try:
                    c = await AsyncClient.connect(addr)
                    st = await c.status()
                    await c.close()
                    if st["agents"]["ready"] == 4:
                        return
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit("controller not ready: " + (tmp / "ctl.log").read_text())
                await asyncio.sleep(0.1)
        asyncio.run(ready())
        print(f"trainer pattern, {a.trajectories} trajectories x {a.steps} steps, "
              f"{a.rounds} rounds each, interleaved (4 agents, local backend)")
        print(f"{'workload':<8} {'path':<8} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7}")
        for light in (False, True):
            figures: dict[str, list] = {"raw": [0.0, [], 0, 0], "backend": [0.0, [], 0, 0],
                                        "compat": [0.0, [], 0, 0]}
            for _ in range(a.rounds):
                for name, fn in (("raw", raw_round), ("backend", backend_round),
                                 ("compat", compat_round)):
                    el, lat, err = asyncio.run(fn(addr, a.trajectories, a.steps, light))
                    f = figures[name]
                    f[0] += el
                    f[1] += lat
                    f[2] += err
                    f[3] += len(lat)
            wl = "true" if light else "mixed"
            for name, (el, lat, err, n) in figures.items():
                print(f"{wl:<8} {name:<8} {n / el:9.1f} {pct(lat, 0.5):8.2f} "
                      f"{pct(lat, 0.99):8.2f} {err:7d}")
            raw_rate = figures["raw"][3] / figures["raw"][0]
            compat_rate = figures["compat"][3] / figures["compat"][0]
            print(f"{wl:<8} compat / raw throughput: {compat_rate / raw_rate:.2f}")
        return 0
    finally:
        ctl.send_signal(signal.SIGTERM)
        try:
            ctl.wait(20)
        except subprocess.TimeoutExpired:
            ctl.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
