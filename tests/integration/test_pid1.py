"""The agent as PID 1 of a PID namespace, as in a container without an init:
it serves, reaps every orphan (no zombie accumulates) and stops on SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import AGENT_BIN
from slotwire import Client


def test_agent_as_pid1_reaps_orphans(tmpdir_short) -> None:
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("needs root for a PID namespace (CI runs as root)")
    unshare = shutil.which("unshare")
    assert unshare, "util-linux unshare is required"
    sock = tmpdir_short / "a.sock"
    log = open(tmpdir_short / "log", "wb")
    # --kill-child: if unshare is killed (cleanup), the agent goes with it.
    p = subprocess.Popen([unshare, "--pid", "--fork", "--mount-proc", "--kill-child",
                          str(AGENT_BIN),
                          "--listen", f"unix:{sock}", "--data-dir", str(tmpdir_short / "d"),
                          "--slots", "2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        c = Client.unix(str(sock))
        assert c.call("exec", {"slot": 0, "cmd": "echo $$"})["stdout"] != b""
        # Orphans: daemons that double-fork and exit at once, and a process
        # started by something else in the namespace whose parent dies.
        for _ in range(20):
            c.call("exec", {"slot": 1, "cmd": "(setsid sh -c 'sleep 0.05 &' &) ; true"})
        time.sleep(0.5)
        r = c.call("exec", {"slot": 0, "cmd": "ps -eo pid=,ppid=,stat=,args="})
        rows = [line.split(None, 3) for line in r["stdout"].decode().splitlines()]
        assert any(row[0] == "1" and "slot-agent" in row[3] for row in rows), rows
        zombies = [row for row in rows if row[2].startswith("Z")]
        assert zombies == [], zombies
        # unshare does not forward signals: SIGTERM the agent (its child) itself
        with open(f"/proc/{p.pid}/task/{p.pid}/children") as f:
            agent_pid = int(f.read().split()[0])
        os.kill(agent_pid, signal.SIGTERM)
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()
