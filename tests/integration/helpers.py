"""Shared helpers for test_agent_core.py, test_exec.py and test_hostile.py.

Process inspection reads /proc directly; every wait here is bounded.
"""
from __future__ import annotations

import os
import stat
import random
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import msgpack
import pytest

from conftest import AGENT_BIN, Agent
from helpers_proc import children, descendants, is_zombie, proc_state, wait_gone  # noqa: F401
from helpers_proc import wait_until  # noqa: F401
from helpers_proc import pids_with_arg as _pids_any
from slotwire import Client

AgentFactory = Callable[..., Agent]

EXEC_RESULT_KEYS = {
    "exec_id", "pid", "exit_code", "signal", "stdout", "stderr", "stdout_truncated",
    "stderr_truncated", "stdout_bytes", "stderr_bytes", "timed_out", "idle_timed_out",
    "cancelled", "duration_ms", "isolation", "network", "disk_quota", "warm",
}


def marker() -> str:
    """A unique `sleep` duration: `sleep <marker>` is a unique argv word to find in /proc."""
    return f"1000.{random.randrange(10**9):09d}"


# -- /proc

def pids_with_arg(word: str) -> list[int]:
    """Pids (not zombies) whose argv holds `word` as a whole argument."""
    return [p for p in _pids_any(word) if not is_zombie(p)]


def wait_present(word: str, timeout: float = 10.0) -> list[int]:
    return wait_until(lambda: pids_with_arg(word), timeout, 0.01, f"a process with {word!r}")


def kill_marked(word: str) -> None:
    """Last-resort cleanup so a failing containment test leaves nothing behind."""
    for p in pids_with_arg(word):
        try:
            os.kill(p, 9)
        except OSError:
            pass


# -- agent interaction

def workspace(c: Client, slot: int) -> Path:
    return Path(c.call("slots", {"slot": slot})["slots"][0]["workspace"])


def cwd_path(c: Client, slot: int) -> str:
    """Where the slot's commands see their workspace (/workspace in a box)."""
    return c.call("slots", {"slot": slot})["slots"][0]["cwd_path"]


def running_execs(c: Client, slot: int) -> list[int]:
    return list(c.call("slots", {"slot": slot})["slots"][0]["running"])


def wait_running(c: Client, slot: int, timeout: float = 10.0) -> list[int]:
    return wait_until(lambda: running_execs(c, slot), timeout, 0.01,
                      f"a running exec on slot {slot}")


def env_of(stdout: bytes) -> dict[str, str]:
    """Parse `env -0` output."""
    env: dict[str, str] = {}
    for item in stdout.split(b"\0"):
        if item:
            k, _, v = item.decode(errors="replace").partition("=")
            env[k] = v
    return env


def stream_bytes(events: list[dict], stream: str = "stdout") -> bytes:
    return b"".join(e["data"] for e in events if e.get("event") == stream)


def assert_contiguous(events: list[dict], stream: str, start: int = 0) -> int:
    """Offsets of `stream` events follow each other with no gap; returns the end offset."""
    off = start
    for e in events:
        if e.get("event") == stream:
            assert e["offset"] == off, f"{stream} event at {e['offset']}, expected {off}"
            assert isinstance(e["data"], bytes) and len(e["data"]) > 0
            off += len(e["data"])
    return off


def expect_error(c: Client, op: str, args: dict[str, Any] | None, code: str,
                 names: str | None = None) -> dict:
    """The request fails with `code` (and its message mentions `names`)."""
    r = c.call_raw(op, args)
    assert r.get("ok") is False, f"{op} {args!r} succeeded: {r!r}"
    assert r["error"]["code"] == code, f"{op} {args!r}: {r['error']!r}"
    assert isinstance(r["error"]["message"], str) and r["error"]["message"]
    if names is not None:
        assert names in r["error"]["message"], f"{names!r} not named in {r['error']!r}"
    return r


# -- raw sockets

def raw_unix(path: str, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_to_eof(s: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until EOF; (data, closed). closed is False when the timeout hit first."""
    deadline = time.monotonic() + timeout
    out = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return out, False
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            return out, False
        except ConnectionResetError:
            return out, True
        if not chunk:
            return out, True
        out += chunk


def split_frames(data: bytes) -> list[Any]:
    frames: list[Any] = []
    while len(data) >= 4:
        (n,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + n:
            break
        frames.append(msgpack.unpackb(data[4:4 + n], raw=False, strict_map_key=False))
        data = data[4 + n:]
    return frames


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# -- stdio agent

class StdioAgent:
    """`slot-agent --stdio` with pipes; always killed on exit."""

    def __init__(self, data_dir: Path, slots: int = 2, extra: list[str] | None = None) -> None:
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(
            [str(AGENT_BIN), "--stdio", "--data-dir", str(data_dir), "--slots", str(slots),
             *(extra or [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err)
        self.client = Client.stdio(self.proc, timeout=20)

    def __enter__(self) -> "StdioAgent":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        self._err.close()



# -- readiness
#
# The agent binds its Unix socket under a temporary name and renames it once
# it listens, so the path existing as a socket means it accepts. TCP
# listeners are checked in /proc/net so no probe connection disturbs
# connection counts.

def _unix_listening(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _tcp_listening(port: int) -> bool:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":
                        return True
        except OSError:
            pass
    return False


def wait_listening(a: Agent, timeout: float = 10.0) -> None:
    wait_until(lambda: _unix_listening(a.sock) or a.proc.poll() is not None, timeout, 0.005,
               "the agent's unix listener")
    if a.port is not None:
        wait_until(lambda: _tcp_listening(a.port) or a.proc.poll() is not None, timeout, 0.005,
                   "the agent's tcp listener")
    assert a.proc.poll() is None, f"agent exited: {a.log()}"


@pytest.fixture
def agent_factory(agent_factory: AgentFactory) -> AgentFactory:
    """conftest's agent_factory, returning only once the agent listens."""
    def make(**kw: Any) -> Agent:
        a = agent_factory(**kw)
        wait_listening(a)
        return a
    return make
