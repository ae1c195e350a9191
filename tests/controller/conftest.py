"""Fixtures that run the real slot-controller (local backend) and its agents.

SLOT_BUILD_DIR (default: build/ at the repo root) names the meson build tree.
Each controller gets a short private directory: its socket, its state
directory (agents' sockets, logs, workspaces) and its config file.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "controller" / "python"))

from slotwire import AgentError, Client  # noqa: E402

BUILD = Path(os.environ.get("SLOT_BUILD_DIR", ROOT / "build"))
CONTROLLER_BIN = BUILD / "slot-controller"
AGENT_BIN = BUILD / "slot-agent"
AGENTCTL_BIN = BUILD / "agentctl"

DEFAULT_CONFIG = """
profiles:
  default:
    slots_per_agent: 4
    min_agents: 1
    max_agents: 4
"""


class Controller:
    """A running slot-controller listening on a Unix socket in `dir`."""

    def __init__(self, dir: Path, config: str = DEFAULT_CONFIG, extra: list[str] | None = None,
                 env: dict[str, str] | None = None, wait_ready: bool = True,
                 token: str | None = None) -> None:
        self.dir = dir
        self.sock = str(dir / "ctl.sock")
        self.addr = "unix:" + self.sock
        self.state_dir = dir / "state"
        self.config_path = dir / "controller.yaml"
        self.config_path.write_text(config)
        self.extra = list(extra or [])
        self.token = token
        if token is not None:
            tf = dir / "token"
            tf.write_text(token + "\n")
            tf.chmod(0o600)
            self.extra += ["--token-file", str(tf)]
        self.env = dict(os.environ, **(env or {}))
        self.log_path = dir / "controller.log"
        self.expect_clean_exit = True
        self.proc: subprocess.Popen | None = None
        try:
            self.start(wait_ready)
        except BaseException:
            # never leave a controller (and its agents) behind a failed start
            if self.proc and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            kill_stray_agents(self.state_dir)
            raise

    def argv(self) -> list[str]:
        return [str(CONTROLLER_BIN), "--config", str(self.config_path), "--listen", self.addr,
                "--state-dir", str(self.state_dir), "--agent-bin", str(AGENT_BIN),
                "--log-level", "debug", *self.extra]

    def start(self, wait_ready: bool = True) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 15
        while True:  # a socket file left by a killed controller does not count
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError("controller did not open its socket: " + self.log())
            try:
                Client.unix(self.sock, 5).close()
                break
            except OSError:
                time.sleep(0.01)
        if wait_ready:
            self.wait_agents(lambda st: st["agents"]["ready"] >= 1
                             or st["agents"]["total"] == 0 and st["slots"]["total"] == 0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 30.0) -> Client:
        c = Client.unix(self.sock, timeout)
        if self.token is not None:
            c.call("hello", {"token": self.token})
        return c

    def status(self) -> dict:
        c = self.client()
        try:
            return c.call("status")
        finally:
            c.close()

    def wait_agents(self, pred, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met; status={st}\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.expect_clean_exit = False
        self.proc.kill()
        self.proc.wait(5)
        self._log.close()


def assert_only_victim_lost(handles: list[str], results: list[dict], victim: str,
                            done: bytes = b"done\n", needle: str | None = None,
                            or_killed: bool = False) -> None:
    """A batch across agents while one (victim) was lost: its requests fail
    with agent_lost (saying needle), every other request succeeds. With
    or_killed, a victim's command may also come back killed by a signal (an
    agent told to stop by SIGTERM answers what it kills before it goes)."""
    for h, x in zip(handles, results):
        if h.startswith(victim + "/"):
            if or_killed and x.get("ok"):
                assert x["result"].get("signal") or x["result"]["exit_code"] != 0, x
                continue
            assert x["error"]["code"] == "agent_lost", x
            assert needle is None or needle in x["error"]["message"], x
        else:
            assert x["ok"] and x["result"]["stdout"] == done, x


def assert_leases_and_files(cl: Client, handles: list[str], file: str) -> None:
    """After a restart: handle i is still leased to traj-i, and its file
    holds "i"."""
    leases = {x["slot"]: x["trajectory_id"] for x in cl.call("leases")["leases"]}
    assert leases == {h: f"traj-{i}" for i, h in enumerate(handles)}
    for i, h in enumerate(handles):
        r = cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": f"cat {file}"}})
        assert r["stdout"] == f"{i}\n".encode()


def kill_stray_agents(state_dir: Path) -> None:
    """Socket-mode agents (STATE/agents) and the exec tests' daemons
    (STATE/exec) outlive their controller by design: stop them, once the
    controller is gone (before, it would start replacements)."""
    pids = set()
    for pidf in [*state_dir.glob("agents/*.pid"), *state_dir.glob("exec/*.pid")]:
        try:
            pids.add(int(pidf.read_text().strip()))
        except (OSError, ValueError):
            pass
    # and any agent serving a path in this state dir: a daemon a start
    # helper forked just as the controller went has no pid file yet
    mark = str(state_dir).encode() + b"/"
    for d in Path("/proc").iterdir():
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if argv and argv[0].endswith(b"slot-agent") and any(mark in a for a in argv):
            pids.add(int(d.name))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short.
    d = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    try:
        yield d
    finally:
        subprocess.run(["chmod", "-R", "u+rwx", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def controller_factory(tmpdir_short: Path) -> Iterator:
    made: list[Controller] = []
    n = [0]

    def make(config: str = DEFAULT_CONFIG, **kw) -> Controller:
        n[0] += 1
        d = tmpdir_short / f"c{n[0]}"
        d.mkdir()
        c = Controller(d, config, **kw)
        made.append(c)
        return c

    yield make
    problems = []
    for c in made:
        rc = c.stop() if c.proc and c.proc.poll() is None else c.proc.returncode if c.proc else 0
        kill_stray_agents(c.state_dir)
        log = c.log()
        if "Sanitizer" in log or "runtime error:" in log:
            problems.append(f"sanitizer report in controller log:\n{log[-4000:]}")
        elif c.expect_clean_exit and rc != 0:
            problems.append(f"controller exited {rc} on SIGTERM:\n{log[-3000:]}")
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def controller(controller_factory) -> Controller:
    return controller_factory()


@pytest.fixture
def client(controller: Controller) -> Iterator[Client]:
    c = controller.client()
    yield c
    c.close()
