"""The Apptainer SIF built from slot-agent:latest by `images/build.sh sif`
with images/slot-agent.def: the documented forms work, run by root. The
apptainer binary and the SIF come from conftest.py's session fixtures
(`apptainer` builds one with tests/e2e/apptainer/build-apptainer.sh when
there is none; a missing apptainer fails these tests, it never skips them).
tests/images/test_apptainer_controller.py runs the same SIF as an
unprivileged user."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from images_lib import Client, apptainer_root_args


@pytest.fixture
def data() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="slot-sif-", dir="/var/tmp"))
    os.chmod(d, 0o755)  # slot users must be able to reach their workspaces
    try:
        yield d
    finally:
        subprocess.run(["rm", "-rf", str(d)], timeout=60)


def _app(app: str, *args: str) -> list[str]:
    """APP COMMAND [OPTIONS...]: the root-only options go after the command
    (after `instance start` for instances)."""
    n = 2 if args[0] == "instance" else 1
    return [app, *args[:n], *apptainer_root_args(), *args[n:]]


def _stdio(cmd: list[str]) -> tuple[subprocess.Popen, Client]:
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    return p, Client.stdio(p, timeout=60)


def _finish(p: subprocess.Popen, c: Client) -> None:
    c.close()  # stdin closes: the agent exits 0
    try:
        assert p.wait(timeout=30) == 0, p.stderr.read().decode(errors="replace")[-2000:]  # type: ignore[union-attr]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def _cwd_path(c, slot: int) -> str:
    """Where the slot's commands see their workspace (the agent's slots)."""
    return c.call("slots", {"slot": slot})["slots"][0]["cwd_path"]


def test_exec_stdio(apptainer: str, sif: Path, data: Path) -> None:
    p, c = _stdio(_app(apptainer, "exec", "--bind", f"{data}:/data", str(sif), "slot-agent",
                       "--stdio", "--data-dir", "/data", "--slots", "2"))
    h = c.call("hello")
    assert h["slots"] == 2 and h["authenticated"] is True
    r = c.call("exec", {"slot": 1, "cmd": "echo hi from $SLOT_INDEX; pwd; python3 -c 'print(6*7)'"})
    # in a box the slot's workspace is at /workspace (the SIF has the mount point)
    seen = _cwd_path(c, 1)
    assert seen == ("/workspace" if h["isolation"]["namespaces"] else "/data/slots/1/work")
    assert r["exit_code"] == 0 and r["stdout"] == f"hi from 1\n{seen}\n42\n".encode(), r
    _finish(p, c)
    # The slots' data stayed on the host's bind: the workspace itself, or,
    # where the agent (root here) gave each slot a filesystem of its own
    # (mounted in the container's namespace, gone with it), its image.
    fs = h["disk_quota"]["mechanism"] == "fs"
    assert (data / "overlay" / ".disks" / "1.img").is_file() if fs else \
        (data / "slots" / "1" / "work").is_dir()


def test_run_defaults_to_stdio(apptainer: str, sif: Path, data: Path) -> None:
    # no arguments: the runscript serves stdio; /data (bound) is the data dir
    p, c = _stdio(_app(apptainer, "run", "--bind", f"{data}:/data", str(sif)))
    assert c.call("hello")["protocol"] == 1
    r = c.call("exec", {"slot": 0, "cmd": "pwd"})
    assert r["stdout"] == f"{_cwd_path(c, 0)}\n".encode(), r
    _finish(p, c)


def test_run_listens_on_a_bound_socket(apptainer: str, sif: Path, data: Path) -> None:
    p = subprocess.Popen(_app(apptainer, "run", "--bind", f"{data}:/data", str(sif), "--listen",
                              "unix:/data/agent.sock", "--data-dir", "/data", "--slots", "2"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sock = data / "agent.sock"
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert p.poll() is None, p.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no socket within 30 s"
            time.sleep(0.05)
        c = Client.unix(str(sock))
        assert c.call("hello")["slots"] == 2
        r = c.call("exec", {"slot": 0, "cmd": "echo ok"})
        assert r["stdout"] == b"ok\n"
        c.close()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_instance_start_listens_on_the_data_dir(apptainer: str, sif: Path, data: Path) -> None:
    name = f"slot-test-{uuid.uuid4().hex[:8]}"
    r = subprocess.run(_app(apptainer, "instance", "start", "--bind", f"{data}:/data", str(sif),
                            name),
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    try:
        sock = data / "agent.sock"
        deadline = time.monotonic() + 30
        while not sock.is_socket():
            assert time.monotonic() < deadline, "no socket within 30 s"
            time.sleep(0.05)
        c = Client.unix(str(sock))
        assert c.call("hello")["slots"] == 10
        r2 = c.call("exec", {"slot": 3, "cmd": "pwd"})
        assert r2["stdout"] == f"{_cwd_path(c, 3)}\n".encode()
        c.close()
    finally:
        subprocess.run([apptainer, "instance", "stop", name], capture_output=True, timeout=60)
