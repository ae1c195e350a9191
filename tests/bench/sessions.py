#!/usr/bin/python3
"""Session benchmarks: figures printed, never asserted.

1. Latency: `session_exec` of `true` in a persistent shell versus a plain
   `exec` of `true` (a new process each time), against the same agent, N of
   each, interleaved one by one so both see the same host load. Issue 8's
   target: the session is faster (no fork+exec of a new shell).
2. Memory per idle session: open --idle sessions (default 50; half with a
   pty) on an otherwise idle agent and read, from /proc, the RSS the agent
   grew by and the RSS of the sessions' processes (the shells), per session.

3. Through the controller: the trainer tool `bash_stateful` of `true` (the
   controller's session per lease) versus `bash` of `true`, interleaved, on
   one leased slot of a local agent (what a trainer sees).

Usage: tests/bench/sessions.py [--build build] [-n 1000] [--idle 50] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from slotwire import Client  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages divided among their users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except OSError:
            pass
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def through_controller(build: Path, n: int) -> tuple[list[float], list[float]]:
    """Latencies (ms) of bash and bash_stateful of `true` via slot-controller."""
    d = Path(tempfile.mkdtemp(prefix="slt-bench-c-", dir="/tmp"))
    (d / "c.yaml").write_text("profiles:\n  default:\n    slots_per_agent: 1\n"
                              "    min_agents: 1\n    max_agents: 1\n")
    sock = str(d / "c.sock")
    log = open(d / "c.log", "wb")
    ctl = subprocess.Popen(
        [str(build / "slot-controller"), "--config", str(d / "c.yaml"), "--listen",
         "unix:" + sock, "--state-dir", str(d / "state"), "--agent-bin",
         str(build / "slot-agent"), "--log-level", "warn"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                c = Client.unix(sock, 60)
                h = c.call("acquire", {"trajectory_id": "bench", "timeout_ms": 15000})["slot"]
                break
            except OSError:
                if time.monotonic() > deadline or ctl.poll() is not None:
                    raise SystemExit((d / "c.log").read_text())
                time.sleep(0.05)

        def call(tool: str) -> float:
            t0 = time.perf_counter()
            r = c.call("exec", {"slot": h, "tool": tool, "args": {"command": "true"}})
            assert r["exit_code"] == 0, r
            return (time.perf_counter() - t0) * 1e3

        for _ in range(20):
            call("bash")
            call("bash_stateful")
        t_bash, t_state = [], []
        for _ in range(n):
            t_bash.append(call("bash"))
            t_state.append(call("bash_stateful"))
        c.close()
        return t_bash, t_state
    finally:
        ctl.terminate()
        try:
            ctl.wait(15)
        except subprocess.TimeoutExpired:
            ctl.kill()
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--idle", type=int, default=50)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    # As bench-agent-exec: under /var/tmp (a data dir under /tmp leaves /tmp
    # shared in the slot boxes) and searchable, so slot users reach their
    # workspaces and the whole ladder (uid rung included) is measured.
    tmp = Path(tempfile.mkdtemp(prefix="slt-bench-", dir=os.environ.get("TMPDIR", "/var/tmp")))
    tmp.chmod(0o755)
    sock = str(tmp / "agent.sock")
    slots = max(1, (a.idle + 7) // 8) + 1
    agent = subprocess.Popen(
        [str(Path(a.build) / "slot-agent"), "--listen", f"unix:{sock}", "--slots", str(slots),
         "--data-dir", str(tmp / "data"), "--log-level", "warn", "--max-sessions", "8"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline or agent.poll() is not None:
                raise SystemExit("agent did not start")
            time.sleep(0.01)
        c = Client.unix(sock, 60)
        rungs = c.call("hello")["isolation"]

        # 1. latency, interleaved; warm up both paths (the slot's box, rulesets)
        sid = c.call("session_open", {"slot": 0})["session"]
        for _ in range(20):
            c.call("exec", {"slot": 0, "cmd": "true"})
            c.call("session_exec", {"session": sid, "cmd": "true"})
        t_exec, t_sess = [], []
        for _ in range(a.n):
            t0 = time.perf_counter()
            r = c.call("exec", {"slot": 0, "cmd": "true"})
            t1 = time.perf_counter()
            s = c.call("session_exec", {"session": sid, "cmd": "true"})
            t2 = time.perf_counter()
            assert r["exit_code"] == 0 and s["exit_code"] == 0
            t_exec.append((t1 - t0) * 1e3)
            t_sess.append((t2 - t1) * 1e3)
        c.call("session_close", {"session": sid})

        # 2. memory per idle session
        time.sleep(0.3)
        agent_before = rss_kib(agent.pid)
        procs_before = set(descendants(agent.pid))
        sids = []
        for i in range(a.idle):
            sids.append(c.call("session_open", {"slot": 1 + i // 8, "pty": i % 2 == 1})["session"])
        time.sleep(0.5)
        agent_after = rss_kib(agent.pid)
        shells = [s["pid"] for sl in c.call("slots")["slots"] for s in sl["sessions"]]
        new_procs = [p for p in descendants(agent.pid) if p not in procs_before]
        # the shells and anything below them; the rest are the new slots'
        # namespace boxes (holder + PID 1), a per-slot cost
        sess_procs = shells + [d for p in shells for d in descendants(p)]
        sess_rss = sum(rss_kib(p) for p in sess_procs)
        sess_pss = sum(pss_kib(p) for p in sess_procs)
        box_rss = sum(rss_kib(p) for p in new_procs if p not in sess_procs)
        for s in sids:
            c.call("session_close", {"session": s})
        c.close()

        # 3. the trainer tools through the controller
        t_bash, t_state = through_controller(Path(a.build), a.n)

        res = {
            "n": a.n,
            "isolation": [k for k, v in rungs.items() if v],
            "exec_true_p50_ms": round(statistics.median(t_exec), 3),
            "exec_true_p99_ms": round(pct(t_exec, 0.99), 3),
            "session_exec_true_p50_ms": round(statistics.median(t_sess), 3),
            "session_exec_true_p99_ms": round(pct(t_sess, 0.99), 3),
            "idle_sessions": a.idle,
            "shell_processes": len(shells),
            "agent_rss_increase_kib_per_session": round((agent_after - agent_before) / a.idle, 1),
            "session_processes_rss_kib_per_session": round(sess_rss / a.idle, 1),
            "session_processes_pss_kib_per_session": round(sess_pss / a.idle, 1),
            "slot_box_processes_rss_kib": box_rss,
            "controller_bash_true_p50_ms": round(statistics.median(t_bash), 3),
            "controller_bash_stateful_true_p50_ms": round(statistics.median(t_state), 3),
        }
        if a.json:
            print(json.dumps(res, indent=2))
        else:
            print(f"isolation rungs available: {', '.join(res['isolation'])}")
            print(f"exec of true          p50 {res['exec_true_p50_ms']:.3f} ms   "
                  f"p99 {res['exec_true_p99_ms']:.3f} ms   (N={a.n}, interleaved)")
            print(f"session_exec of true  p50 {res['session_exec_true_p50_ms']:.3f} ms   "
                  f"p99 {res['session_exec_true_p99_ms']:.3f} ms")
            print(f"speed-up p50: {statistics.median(t_exec) / statistics.median(t_sess):.1f}x")
            print(f"idle sessions: {a.idle} ({a.idle // 2} with a pty): {len(sess_procs)} session "
                  f"processes, {len(new_procs) - len(sess_procs)} slot box processes "
                  f"({box_rss} KiB, per slot, not per session)")
            print(f"  agent RSS increase per session:   "
                  f"{res['agent_rss_increase_kib_per_session']:.1f} KiB "
                  f"({agent_before} -> {agent_after} KiB)")
            print(f"  session processes RSS per session: "
                  f"{res['session_processes_rss_kib_per_session']:.1f} KiB "
                  f"(shared pages counted in each process)")
            print(f"  session processes PSS per session: "
                  f"{res['session_processes_pss_kib_per_session']:.1f} KiB "
                  f"(shared pages divided among the processes)")
            print(f"through the controller: bash of true p50 "
                  f"{res['controller_bash_true_p50_ms']:.3f} ms, bash_stateful of true p50 "
                  f"{res['controller_bash_stateful_true_p50_ms']:.3f} ms "
                  f"({statistics.median(t_bash) / statistics.median(t_state):.1f}x)")
        return 0
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
