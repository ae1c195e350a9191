#!/usr/bin/python3
"""Example trainer loop on slot-controller.

Runs N trajectories, C at a time, through `ControllerToolBackend` exactly as
a trainer's tool executor uses it (acquire(trajectory_id=...), execute_batch
of (slot, tool, args) with timeout_s, results as the model sees them, and
release(slot, reset_workspace=True)). Each trajectory writes a few files (one
batch of write_file calls), runs K bash steps whose observations are checked
against values computed here, reads a file back, and releases the slot.
Prints throughput, tool-call latency, errors and one observation as the model
sees it; exits 0 when every check passed, 1 otherwise.

    /usr/bin/python3 controller/python/examples/trainer.py --address unix:/path/ctl.sock
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slot_client import ControllerToolBackend, ExecutionResult, Slot, SlotError  # noqa: E402

SAMPLE: list[str] = []  # one observation, printed at the end


@dataclass
class Stats:
    trajectories_ok: int = 0
    trajectories_failed: int = 0
    tool_calls: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors.append(message)


@dataclass
class Step:
    command: str
    expect: Callable[[str], bool]
    describe: str


def make_steps(n_lines: int, numbers: bytes, notes: bytes, k: int) -> list[Step]:
    """K bash steps with answers known here: first a listing (proving the
    slot came back clean from its previous trajectory), then a cycle."""
    total = n_lines * (n_lines + 1) // 2
    digest = hashlib.sha256(numbers).hexdigest()
    catalogue: list[Step] = [
        # The reset on release must have left only what this trajectory wrote.
        Step("ls -A | sort | tr '\\n' ' '", lambda o: o.split() == ["data", "notes.md"],
             "workspace holds exactly data/ and notes.md"),
        Step("wc -l < data/numbers.txt", lambda o: o.strip() == str(n_lines),
             f"{n_lines} lines"),
        Step("s=0; while read -r x; do s=$((s + x)); done < data/numbers.txt; echo $s",
             lambda o: o.strip() == str(total), f"sum {total}"),
        Step("sha256sum data/numbers.txt", lambda o: o.split()[:1] == [digest],
             f"sha256 {digest[:12]}..."),
        Step("wc -c < notes.md", lambda o: o.strip() == str(len(notes)),
             f"{len(notes)} bytes"),
        Step("echo step >> log.txt && wc -l < log.txt", lambda o: o.strip().isdigit(),
             "log grows"),
        Step("printf 'to stderr\\n' >&2; echo out",
             lambda o: o == "out\n\n[stderr]\nto stderr", "stdout + stderr marker"),
    ]
    if k <= 0:
        return []
    first, rest = catalogue[0], catalogue[1:]
    return [first] + [rest[i % len(rest)] for i in range(k - 1)]


async def timed_batch(backend: ControllerToolBackend, stats: Stats,
                      calls: list[tuple[Slot, str, dict[str, Any]]]) -> list[ExecutionResult]:
    t0 = time.perf_counter()
    results = await backend.execute_batch(calls, timeout_s=60.0)
    elapsed_ms = (time.perf_counter() - t0) * 1000.0
    stats.tool_calls += len(calls)
    stats.latencies_ms.extend([elapsed_ms] * len(calls))
    return results


async def run_trajectory(backend: ControllerToolBackend, index: int, steps: int,
                         stats: Stats) -> bool:
    traj = f"trainer-{os.getpid()}-{index}"
    n_lines = 10 + index % 17
    numbers = "".join(f"{i}\n" for i in range(1, n_lines + 1)).encode()
    notes = f"# trajectory {traj}\n\nsteps: {steps}\nunicode: \u00e9\u2713\n".encode()
    failures: list[str] = []
    try:
        slot = await backend.acquire(trajectory_id=traj)
    except (SlotError, TimeoutError) as e:
        stats.error(f"{traj}: acquire: {e}")
        return False
    try:
        writes = await timed_batch(backend, stats, [
            (slot, "write_file", {"path": "data/numbers.txt", "content": numbers}),
            (slot, "write_file", {"path": "notes.md", "content": notes.decode()}),
        ])
        for r in writes:
            if not r.success:
                failures.append(f"write_file: {r.error}")
        if not failures:
            for step in make_steps(n_lines, numbers, notes, steps):
                [r] = await timed_batch(backend, stats, [(slot, "bash", {"command": step.command})])
                if not r.success:
                    failures.append(f"bash {step.command!r}: {r.error}: {r.output[:200]!r}")
                    break
                if not step.expect(r.output):
                    failures.append(f"bash {step.command!r}: expected {step.describe}, "
                                    f"got {r.output[:200]!r}")
                    break
                if not SAMPLE:
                    SAMPLE.append(r.to_tool_result().to_xml())
        if not failures:
            [r] = await timed_batch(backend, stats, [(slot, "read_file", {"path": "notes.md"})])
            if not r.success:
                failures.append(f"read_file: {r.error}")
            elif r.output != notes.decode():
                failures.append(f"read_file: content mismatch: {r.output[:200]!r}")
    finally:
        await backend.release(slot, reset_workspace=True)  # never raises
    for f in failures:
        stats.error(f"{traj}: {f}")
    return not failures


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = math.ceil(q / 100.0 * len(ordered))  # nearest-rank
    return ordered[max(0, min(len(ordered), rank) - 1)]


async def main_async(args: argparse.Namespace) -> int:
    backend = ControllerToolBackend(args.address, profile=args.profile, token=args.token)
    stats = Stats()
    try:
        await backend.start()
    except (SlotError, TimeoutError) as e:
        print(f"trainer: {e}", file=sys.stderr)
        return 1
    sem = asyncio.Semaphore(max(1, args.concurrency))

    async def one(i: int) -> None:
        async with sem:
            try:
                ok = await run_trajectory(backend, i, args.steps, stats)
            except Exception as e:  # report, keep the other trajectories going
                stats.error(f"trajectory {i}: {type(e).__name__}: {e}")
                ok = False
            if ok:
                stats.trajectories_ok += 1
            else:
                stats.trajectories_failed += 1

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(args.trajectories)))
    finally:
        await backend.stop(purge=True)
    elapsed = max(time.perf_counter() - t0, 1e-9)

    done = stats.trajectories_ok + stats.trajectories_failed
    print(f"trajectories:  {done} ({stats.trajectories_ok} ok, "
          f"{stats.trajectories_failed} failed) in {elapsed:.2f} s")
    print(f"trajectories/s: {done / elapsed:.1f}")
    print(f"tool calls:    {stats.tool_calls}")
    print(f"tool calls/s:  {stats.tool_calls / elapsed:.1f}")
    print(f"latency p50:   {percentile(stats.latencies_ms, 50):.2f} ms")
    print(f"latency p99:   {percentile(stats.latencies_ms, 99):.2f} ms")
    print(f"errors:        {len(stats.errors)}")
    if SAMPLE:
        print(f"observation:   {SAMPLE[0]}")
    for message in stats.errors[:5]:
        print(f"  {message}")
    if len(stats.errors) > 5:
        print(f"  ... and {len(stats.errors) - 5} more")
    return 0 if not stats.errors and stats.trajectories_failed == 0 else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--address", default=None,
                   help="controller address, unix:PATH or tcp:HOST:PORT "
                        "(default: the controller's default socket)")
    p.add_argument("--profile", default=None, help="profile to acquire slots from")
    p.add_argument("--token", default=os.environ.get("SLOT_CONTROLLER_TOKEN"),
                   help="token for controllers with --token-file "
                        "(default: $SLOT_CONTROLLER_TOKEN)")
    p.add_argument("--trajectories", type=int, default=32, metavar="N")
    p.add_argument("--concurrency", type=int, default=8, metavar="C")
    p.add_argument("--steps", type=int, default=4, metavar="K", help="bash calls per trajectory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
