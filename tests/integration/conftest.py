"""Fixtures that run the real slot-agent binary.

SLOT_BUILD_DIR (default: build/ at the repo root) names the meson build tree.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from slotwire import Client

ROOT = Path(__file__).resolve().parents[2]
BUILD = Path(os.environ.get("SLOT_BUILD_DIR", ROOT / "build"))
AGENT_BIN = BUILD / "slot-agent"
AGENTCTL_BIN = BUILD / "agentctl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    """A running slot-agent on a Unix socket (and optionally TCP)."""

    def __init__(self, tmp: Path, slots: int = 4, tcp: bool = False, token: str | None = None,
                 extra: list[str] | None = None, insecure: bool = False) -> None:
        self.dir = tmp
        self.data_dir = tmp / "data"
        self.sock = str(tmp / "agent.sock")
        self.port = free_port() if tcp else None
        self.token = token
        # Tests that kill the agent on purpose set this to False.
        self.expect_clean_exit = True
        args = [str(AGENT_BIN), "--listen", f"unix:{self.sock}", "--slots", str(slots),
                "--data-dir", str(self.data_dir), "--log-level", "debug"]
        if tcp:
            args += ["--listen", f"tcp:127.0.0.1:{self.port}"]
        if insecure:
            args.append("--insecure")
        if token is not None:
            tf = tmp / "token"
            tf.write_text(token)
            tf.chmod(0o600)
            self.token_file = str(tf)
            args += ["--token-file", str(tf)]
        args += extra or []
        self.log_path = tmp / "agent.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError("agent did not create its socket: " + self.log())
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 30.0) -> Client:
        c = Client.unix(self.sock, timeout)
        if self.token is not None:
            c.call("hello", {"token": self.token})
        return c

    def tcp_client(self, timeout: float = 30.0) -> Client:
        assert self.port is not None
        return Client.tcp("127.0.0.1", self.port, timeout)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short.
    d = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))
    try:
        yield d
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent_factory(tmpdir_short: Path) -> Iterator:
    agents: list[Agent] = []
    n = [0]

    def make(**kw) -> Agent:
        n[0] += 1
        d = tmpdir_short / f"a{n[0]}"
        d.mkdir()
        a = Agent(d, **kw)
        agents.append(a)
        return a

    yield make
    problems = []
    for a in agents:
        rc = a.stop()
        log = a.log()
        if "Sanitizer" in log or "runtime error:" in log:
            problems.append(f"sanitizer report in agent log:\n{log[-4000:]}")
        elif a.expect_clean_exit and rc != 0:
            problems.append(f"agent exited {rc} on SIGTERM:\n{log[-2000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def agent(agent_factory) -> Agent:
    return agent_factory()


@pytest.fixture
def client(agent: Agent) -> Iterator[Client]:
    c = agent.client()
    yield c
    c.close()
