#!/usr/bin/python3
"""`make run`: start a real slot-agent and drive it with agentctl, printing
each command and what it answered. Everything it creates lives in a temp
directory that is removed at the end."""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    a = ap.parse_args()
    build = (ROOT / a.build).resolve()
    agent_bin, ctl = build / "slot-agent", build / "agentctl"
    # Not under /tmp (each slot gets a private /tmp), and searchable by the
    # slot users the agent runs commands as when it is root.
    tmp = Path(tempfile.mkdtemp(prefix="slot-demo-", dir="/var/tmp"))
    tmp.chmod(0o755)
    print(f"$ {agent_bin} --probe")
    subprocess.run([str(agent_bin), "--probe"])
    sock = tmp / "agent.sock"
    log = open(tmp / "agent.log", "wb")
    cmd = [str(agent_bin), "--listen", f"unix:{sock}", "--slots", "4", "--data-dir",
           str(tmp / "data")]
    print("$ " + " ".join(shlex.quote(c) for c in cmd) + " &")
    agent = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    status = 0
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                print((tmp / "agent.log").read_text())
                return 1
            time.sleep(0.02)

        def ctl_run(args: str, stdin: bytes | None = None, expect: int | None = 0,
                    shell_suffix: str = "") -> int:
            line = f"agentctl {args}{shell_suffix}"
            print(f"\n$ {line}", flush=True)
            full = f"{shlex.quote(str(ctl))} --agent unix:{sock} {args}{shell_suffix}"
            r = subprocess.run(["/bin/bash", "-c", full], input=stdin, cwd=tmp, timeout=60)
            if expect is not None and r.returncode != expect:
                print(f"(unexpected exit status {r.returncode}, wanted {expect})")
                nonlocal status
                status = 1
            elif r.returncode:
                print(f"(exit status {r.returncode})")
            return r.returncode

        ctl_run("hello")
        ctl_run("exec 0 -- 'echo hello from slot $SLOT_INDEX in $PWD as $(whoami); uname -sr'")
        ctl_run("put 0 src/fib.py", stdin=b"a, b = 0, 1\nfor _ in range(30):\n    a, b = b, a + b\nprint('fib(30) =', a)\n")
        ctl_run("exec 0 -- 'python3 src/fib.py 2>/dev/null || awk \"BEGIN{a=0;b=1;for(i=0;i<30;i++){t=a+b;a=b;b=t};print \\\"fib(30) =\\\", a}\"'")
        ctl_run("exec 1 -- 'seq 1 5 | paste -sd+ | bc 2>/dev/null || echo $((1+2+3+4+5))'")
        ctl_run("ls 0 -R")
        ctl_run("cat 0 src/fib.py")
        print("\n# file operations cannot leave the workspace:")
        ctl_run("cat 0 ../../../../etc/passwd", expect=1)
        print("\n# commands can write only to their workspace (Landlock), where the host allows it:")
        ctl_run("exec 0 -- 'echo x > /etc/slot-demo-was-here'", expect=1)
        print("\n# and see neither other slots' files nor their processes (where namespaces work):")
        ctl_run("exec 1 -- 'ls $SLOT_WORKSPACE/../..; ps -e | wc -l'")
        print("\n# a command that outlives its timeout, with a background child; both are killed:")
        ctl_run("exec 2 --timeout-ms 500 -- 'sleep 1000 & sleep 30'", expect=124)
        print("\n$ pgrep -f 'sleep 1000'   # on the host")
        left = subprocess.run(["pgrep", "-f", "^sleep 1000$"], capture_output=True, text=True)
        print(left.stdout.strip() or "no sleep left")
        ctl_run("archive 0 . --format tar.gz", shell_suffix=" > ws.tar.gz")
        print("\n$ tar -tzf ws.tar.gz")
        subprocess.run(["tar", "-tzf", str(tmp / "ws.tar.gz")])
        ctl_run("slots")
        ctl_run("reset 0")
        ctl_run("ls 0")
        ctl_run("health")
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            rc = agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            rc = agent.wait()
        log.close()
        print(f"\nagent stopped (exit {rc}); its log was {tmp / 'agent.log'}:")
        sys.stdout.write((tmp / "agent.log").read_text()[-1500:])
        shutil.rmtree(tmp, ignore_errors=True)
    print("\ndemo " + ("finished" if status == 0 else "FAILED"))
    return status


if __name__ == "__main__":
    sys.exit(main())
