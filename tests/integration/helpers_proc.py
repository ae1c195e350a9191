"""Process inspection helpers for containment tests (reads /proc directly),
and the polling wait the suites share. Imports no conftest, so the
controller suite uses it too."""
from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def pids_with_arg(marker: str) -> list[int]:
    """Pids whose argv contains `marker` as a whole argument."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in args:
            found.append(int(d))
    return found


def wait_gone(marker: str, timeout: float = 5.0) -> list[int]:
    """Wait until no process carries `marker`; returns the survivors (empty on success)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids_with_arg(marker) if not is_zombie(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def wait_present(marker: str, timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        found = pids_with_arg(marker)
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.01)


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def is_zombie(pid: int) -> bool:
    return proc_state(pid) == "Z"


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def wait_until(pred: Callable[[], T], timeout: float = 10.0, interval: float = 0.02,
               what: str = "condition") -> T:
    """Poll pred until it returns a truthy value; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
