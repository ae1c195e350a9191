#!/usr/bin/python3
"""`make run`: the product doing its main job on the embedded local backend.

Starts slot-controller with the example config (agents are local child
processes), runs the example trainer against it (concurrent trajectories:
acquire, write files, bash calls, read back, release with reset), and shows
what the controller saw with agentctl. Every command is printed before it
runs. Everything it creates lives in a temp directory removed at the end.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"


def show(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    return subprocess.run(cmd, timeout=300, **kw)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--trajectories", type=int, default=64)
    a = ap.parse_args()
    build = (ROOT / a.build).resolve()
    ctl_bin, agentctl = build / "slot-controller", build / "agentctl"
    # Not under /tmp (each slot gets a private /tmp), and searchable by the
    # slot users the agents run commands as when they are root.
    tmp = Path(tempfile.mkdtemp(prefix="slot-demo-", dir="/var/tmp"))
    tmp.chmod(0o755)
    addr = f"unix:{tmp}/controller.sock"
    show([str(build / "slot-agent"), "--probe"])
    cmd = [str(ctl_bin), "--config", str(ROOT / "controller/examples/controller.yaml"),
           "--listen", addr, "--state-dir", str(tmp / "state")]
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd) + " 2>controller.log &", flush=True)
    log = open(tmp / "controller.log", "wb")
    ctl = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    status = 0
    try:
        ac = [str(agentctl), "--controller", addr]
        deadline = time.monotonic() + 20
        while subprocess.run(ac + ["status"], capture_output=True).returncode != 0:
            if ctl.poll() is not None or time.monotonic() > deadline:
                print((tmp / "controller.log").read_text())
                return 1
            time.sleep(0.1)
        r = show([PY, str(ROOT / "controller/python/examples/trainer.py"), "--address", addr,
                  "--trajectories", str(a.trajectories), "--concurrency", "16", "--steps", "4"])
        status |= r.returncode
        for sub in (["status"], ["agents"], ["profiles"]):
            status |= show(ac + sub).returncode
        # one slot by hand, the way a person debugs a trajectory
        r = subprocess.run(ac + ["acquire", "--trajectory", "by-hand"], capture_output=True,
                           text=True)
        print(f"\n$ agentctl --controller {addr} acquire --trajectory by-hand\n{r.stdout}",
              end="")
        status |= r.returncode
        slot = r.stdout.strip().split()[-1] if r.returncode == 0 else None
        if slot:
            status |= show(ac + ["exec", slot, "--", "echo hello from $SLOT_INDEX; id -un"]
                           ).returncode
            status |= show(ac + ["leases"]).returncode
            status |= show(ac + ["release", slot]).returncode
    finally:
        ctl.send_signal(signal.SIGTERM)
        try:
            ctl.wait(20)
        except subprocess.TimeoutExpired:
            ctl.kill()
        log.close()
        if status:
            print("\n--- controller log (tail) ---")
            print((tmp / "controller.log").read_text()[-3000:])
        shutil.rmtree(tmp, ignore_errors=True)
    print("\ndemo " + ("finished" if status == 0 else "FAILED"))
    return 1 if status else 0


if __name__ == "__main__":
    sys.exit(main())
