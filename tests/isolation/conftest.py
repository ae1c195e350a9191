"""The escape suite's three conditions: the agent as root on the host, as an
unprivileged user (nobody, as under Apptainer), and inside a Docker container
with Docker's default seccomp profile and capabilities. Each condition is an
agent on a Unix socket; the table of which rung blocked each attempt is
printed at the end of the run."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from slotwire import Client  # noqa: E402

BUILD = Path(os.environ.get("SLOT_BUILD_DIR", ROOT / "build"))
IMAGE = "slot-isolation-test:latest"
NOBODY = 65534
AGENT_ARGS = ["--slots", "4", "--log-level", "info", "--slot-memory", "256M", "--slot-pids", "300"]

# (attempt, condition) -> the rung that blocked it
RESULTS: dict[tuple[str, str], str] = {}
CONDITIONS = ["root", "user", "docker"]


@dataclass
class Cond:
    name: str
    client: Client
    agent_pid: int          # the agent's pid as a slot command sees it
    escape: str             # path of slot-escape as a slot command sees it
    data: str               # the data dir as a slot command sees it
    stop: object = None
    log: Path | None = None
    rungs: dict = field(default_factory=dict)


def _wait_socket(path: Path, proc_alive, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_socket():
            return
        if not proc_alive():
            break
        time.sleep(0.02)
    raise RuntimeError(f"agent did not listen on {path}")


def _host_agent(name: str, base: Path, user: int | None, extra: tuple = ()) -> Cond:
    bindir = base / "bin"
    bindir.mkdir()
    shutil.copy(BUILD / "slot-escape", bindir / "slot-escape")
    data = base / "data"
    sock = base / "agent.sock"
    log = base / "agent.log"
    cmd = [str(BUILD / "slot-agent"), "--listen", f"unix:{sock}", "--data-dir", str(data),
           *AGENT_ARGS, *extra]
    if user is not None:
        data.mkdir()
        os.chown(base, user, user)
        os.chown(data, user, user)
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(log, "wb"))
    _wait_socket(sock, lambda: proc.poll() is None)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    c = Client.unix(str(sock))
    return Cond(name, c, proc.pid, str(bindir / "slot-escape"), str(data), stop, log)


def _docker_image(ctx: Path) -> None:
    """A tiny image: busybox, the static agent and slot-escape; imported, not
    pulled (no registry here)."""
    root = ctx / "rootfs"
    for d in ("bin", "usr/local/bin", "tmp", "proc", "dev", "sys", "data", "run/slot", "etc"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    shutil.copy("/bin/busybox", root / "bin/busybox")
    for applet in ("sh", "sleep", "echo", "cat", "ls", "kill", "setsid", "id", "true", "ln",
                   "touch", "rm", "head", "ps", "mount", "unshare", "dd", "trap", "wc"):
        os.symlink("busybox", root / "bin" / applet)
    shutil.copy(BUILD / "slot-agent", root / "usr/local/bin/slot-agent")
    shutil.copy(BUILD / "slot-escape", root / "usr/local/bin/slot-escape")
    (root / "etc/passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", IMAGE], stdin=tar.stdout, check=True,
                   stdout=subprocess.DEVNULL, timeout=120)
    tar.wait()


def _docker_agent(base: Path, extra: tuple = ()) -> Cond:
    if not shutil.which("docker"):
        raise RuntimeError("docker is not installed: the Docker condition cannot run")
    _docker_image(base)
    run = base / "run"
    run.mkdir()
    name = f"slot-iso-{uuid.uuid4().hex[:8]}"
    subprocess.run(["docker", "run", "-d", "--rm", "--name", name, "-v", f"{run}:/run/slot",
                    IMAGE, "/usr/local/bin/slot-agent", "--listen", "unix:/run/slot/agent.sock",
                    "--data-dir", "/data", *AGENT_ARGS, *extra],
                   check=True, stdout=subprocess.DEVNULL, timeout=60)

    def alive() -> bool:
        r = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", name],
                           capture_output=True, text=True)
        return r.stdout.strip() == "true"

    def stop() -> None:
        subprocess.run(["docker", "logs", name], stdout=open(base / "agent.log", "wb"),
                       stderr=subprocess.STDOUT, timeout=30)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)

    try:
        _wait_socket(run / "agent.sock", alive, 30)
    except Exception:
        stop()
        raise
    c = Client.unix(str(run / "agent.sock"))
    return Cond("docker", c, 1, "/usr/local/bin/slot-escape", "/data", stop, base / "agent.log")


@pytest.fixture(scope="module", params=CONDITIONS)
def cond(request) -> Iterator[Cond]:
    base = Path(tempfile.mkdtemp(prefix="slot-iso-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    # A test module may add agent options of its own: AGENT_EXTRA_ARGS = [...]
    # at its top level (none by default).
    extra = tuple(getattr(request.module, "AGENT_EXTRA_ARGS", ()))
    try:
        if request.param == "docker":
            cd = _docker_agent(base, extra)
        else:
            cd = _host_agent(request.param, base, NOBODY if request.param == "user" else None,
                             extra)
        cd.rungs = cd.client.call("hello")["isolation"]
        yield cd
        cd.client.close()
        cd.stop()
        log = cd.log.read_text(errors="replace") if cd.log and cd.log.exists() else ""
        assert "Sanitizer" not in log
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def pytest_terminal_summary(terminalreporter) -> None:
    if not RESULTS:
        return
    attempts = list(dict.fromkeys(a for a, _ in RESULTS))
    w = max(len(a) for a in attempts) + 2
    tr = terminalreporter
    tr.write_line("")
    tr.write_line("escape attempts: blocked by which rung "
                  "(root = agent as root on the host, user = unprivileged, "
                  "docker = default seccomp profile)")
    tr.write_line(f"{'attempt':<{w}}" + "".join(f"{c:<14}" for c in CONDITIONS))
    for a in attempts:
        tr.write_line(f"{a:<{w}}" + "".join(f"{RESULTS.get((a, c), '-'):<14}" for c in CONDITIONS))
