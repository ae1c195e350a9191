#!/usr/bin/python3
"""Reconnects (issue 18): figures printed, never asserted.

1. Time from a dropped link to the first resumed byte, p50/p99 over --drops
   drops per link kind, the trainer's view: a streamed command prints a line
   every 10 ms; the link is dropped; the clock stops at the first stdout
   event the trainer receives after the drop. Beside it, the same command's
   gap between two events with no drop (the floor), and the controller's own
   reconnect time (`agents` reconnect_ms: stream ended -> hello answered).
   Link kinds: local socket mode (`agentctl reconnect`: the controller shuts
   the stream down), an exec daemon behind `slot-agent --attach` over a Unix
   socket (the relay killed with SIGKILL), and the same over TCP through a
   proxy that resets every connection (RST).
2. A trainer's batches (8 slots, `seq N | sha256sum` each) for --soak seconds
   with no drop, then --soak seconds with the link reset or the relay killed
   every 1-4 s at random: batch p50/p99/max side by side (the added latency
   a trainer sees), and lost / duplicated / wrong / never-ran counts.

    /usr/bin/python3 tests/bench/reconnect.py [--build build] [--drops 20] [--soak 60]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def pct(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(len(v) * p))] if v else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--drops", type=int, default=20)
    ap.add_argument("--soak", type=float, default=60)
    a = ap.parse_args()
    os.environ["SLOT_BUILD_DIR"] = str((ROOT / a.build).resolve())
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    sys.path.insert(0, str(ROOT / "tests" / "controller"))
    from conftest import AGENTCTL_BIN, Controller, kill_stray_agents  # type: ignore
    import test_reconnect as T  # type: ignore

    made: list = []
    proxies: list = []

    def controller(cfg: str):
        d = Path(tempfile.mkdtemp(prefix="sbr-", dir="/tmp"))
        ctl = Controller(d, cfg)
        made.append(ctl)
        ctl.wait_agents(lambda st: st["agents"]["ready"] == 1, timeout=30)
        return ctl

    def kinds():
        ctl = controller(T.SOCKET_CFG)
        yield "local socket (agentctl reconnect)", ctl, lambda: subprocess.run(
            [str(AGENTCTL_BIN), "--controller", ctl.addr, "reconnect", T.agents(ctl)[0]["id"]],
            capture_output=True, timeout=10)
        ctl = controller(T.daemon_cfg("unix:{state_dir}/exec/{agent_id}.sock",
                                      "unix:{state_dir}/exec/{agent_id}.sock"))
        yield "exec relay, unix (relay SIGKILL)", ctl, \
            lambda: os.kill(T.agents(ctl)[0]["pid"], signal.SIGKILL)
        port = T.free_port()
        px = T.Proxy(port)
        proxies.append(px)
        ctl = controller(T.daemon_cfg(f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{px.port}"))
        yield "exec relay, tcp (connection RST)", ctl, px.drop

    def next_frame(c, rid: int) -> dict:
        """Read frames until one for rid; keep it for c.wait()."""
        while True:
            f = c.recv_frame(timeout=60)
            if f is None:
                raise RuntimeError("controller closed the connection")
            c.pending.setdefault(f.get("id", 0), []).append(f)
            if f.get("id") == rid:
                return f

    def first_byte_after(ctl, drop) -> tuple[float, float, float]:
        c = ctl.client()
        s = c.call("acquire", {"trajectory_id": "bench"})["slot"]
        rid = c.send("exec", {"slot": s, "tool": "bash", "args": {
            "command": "for i in $(seq 1 400); do echo $i; sleep 0.01; done", "stream": True}})
        for _ in range(5):
            next_frame(c, rid)
        t0 = time.monotonic()
        next_frame(c, rid)  # floor: the gap to the next event with no drop
        floor = time.monotonic() - t0
        t1 = time.monotonic()
        drop()
        while True:
            f = next_frame(c, rid)
            if f.get("event") == "stdout" or "event" not in f:
                break
        resumed = time.monotonic() - t1
        resp, events = c.wait(rid, timeout=60)
        out = b"".join(e["data"] for e in events if e.get("event") == "stdout")
        assert out == b"".join(f"{i}\n".encode() for i in range(1, 401)), "output differs"
        c.call("release", {"slot": s})
        rc_ms = T.agents(ctl)[0]["reconnect_ms"]
        c.close()
        return floor, resumed, rc_ms / 1000

    try:
        print(f"1. drop -> first resumed byte at the trainer, {a.drops} drops each "
              f"(ms; floor: the next event with no drop)")
        print(f"   {'link':36} {'floor p50':>9} {'resume p50':>10} {'p99':>7} "
              f"{'max':>7} {'reconnect p50':>13} {'p99':>7}")
        socket_ctl = None
        for name, ctl, drop in kinds():
            socket_ctl = socket_ctl or ctl
            fl, rs, rc = [], [], []
            for _ in range(a.drops):
                f, r, k = first_byte_after(ctl, drop)
                fl.append(f)
                rs.append(r)
                rc.append(k)
                time.sleep(0.2)
            print(f"   {name:36} {pct(fl, .5) * 1e3:9.1f} {pct(rs, .5) * 1e3:10.1f} "
                  f"{pct(rs, .99) * 1e3:7.1f} {max(rs) * 1e3:7.1f} {pct(rc, .5) * 1e3:13.1f} "
                  f"{pct(rc, .99) * 1e3:7.1f}")
        # the soak runs on the TCP profile made last (ctl, px)
        px = proxies[-1]
        c = ctl.client()
        slots = [c.call("acquire", {"trajectory_id": f"s{i}"})["slot"] for i in range(8)]
        seq = [0]
        counts = {"sent": 0, "lost": 0, "wrong": 0}

        def batches(seconds: float) -> list[float]:
            lat = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                reqs = []
                for s in slots:
                    seq[0] += 1
                    reqs.append((seq[0], {"slot": s, "tool": "bash", "args": {
                        "command": f"echo {seq[0]} >> ids; seq 1 {200 + seq[0] % 300} | sha256sum"}}))
                t0 = time.monotonic()
                res = c.call("batch", {"requests": [r for _, r in reqs]}, timeout=120)["results"]
                lat.append(time.monotonic() - t0)
                for (k, _), r in zip(reqs, res):
                    counts["sent"] += 1
                    if not r.get("ok"):
                        counts["lost"] += 1
                        continue
                    n = 200 + k % 300
                    want = hashlib.sha256("".join(f"{i}\n" for i in range(1, n + 1)).encode())
                    if r["result"]["stdout"].split()[0].decode() != want.hexdigest():
                        counts["wrong"] += 1
            return lat

        quiet = batches(a.soak)
        stop = threading.Event()
        drops = {"reset": 0, "relay": 0}
        rng = random.Random(1)

        def dropper() -> None:
            while not stop.wait(rng.uniform(1.0, 4.0)):
                if rng.random() < 0.5:
                    px.drop()
                    drops["reset"] += 1
                else:
                    pid = T.agents(ctl)[0]["pid"]
                    if pid > 0:
                        try:
                            os.kill(pid, signal.SIGKILL)
                            drops["relay"] += 1
                        except ProcessLookupError:
                            pass
        th = threading.Thread(target=dropper, daemon=True)
        th.start()
        try:
            noisy = batches(a.soak)
        finally:
            stop.set()
            th.join(10)
        ids = c.call("batch", {"requests": [
            {"slot": s, "tool": "bash", "args": {"command": "cat ids"}} for s in slots]})["results"]
        seen = [int(x) for r in ids for x in r["result"]["stdout"].split()]
        dup = len(seen) - len(set(seen))
        never = counts["sent"] - len(set(seen))
        print(f"\n2. a trainer's batches of 8, {a.soak:.0f} s without drops, then {a.soak:.0f} s "
              f"with {drops['reset']} TCP resets + {drops['relay']} killed relays "
              f"({T.agents(ctl)[0]['reconnects']} reconnects in all)")
        print(f"   {'':14} {'batches':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
        for name, lat in (("no drops", quiet), ("with drops", noisy)):
            print(f"   {name:14} {len(lat):8} {pct(lat, .5) * 1e3:8.0f} {pct(lat, .99) * 1e3:8.0f} "
                  f"{max(lat) * 1e3:8.0f}")
        print(f"   commands {counts['sent']}: lost {counts['lost']}, duplicated {dup}, "
              f"wrong {counts['wrong']}, never ran {never}")
        c.close()
    finally:
        for px in proxies:
            px.close()
        for ctl in made:
            ctl.stop()
            kill_stray_agents(ctl.state_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
