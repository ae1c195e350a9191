"""On-disk state of the FAKE Modal SDK (not part of Modal's API; see __init__.py).

Everything lives under $SLOT_FAKE_MODAL_DIR so that separate processes (two
bridges, the tests) see the same apps and sandboxes:

    lock                      flock(2) taken to create apps and sandboxes
    apps/<app name>.json      {"name", "app_id"}
    secrets/<secret name>.json  {"KEY": "value", ...}   (written by tests)
    sandboxes/<sb-id>/
        meta.json             {"object_id", "app_id", "name", "created"}; written
                              last, so a half-made sandbox is never seen
        create.json           what create() was asked for (args, image, cpu, ...)
        tags.json             the sandbox's tags
        spec.json             argv/cwd/env/timeout the runtime starts
        root/                 the sandbox's filesystem ("/" inside it)
        runtime.pid           "PID STARTTIME" of _fake_runtime.py (the worker)
        pid                   "PID STARTTIME" of the sandbox's own process
        execs/<pid>           "PID STARTTIME" of each running exec
        terminated            present once terminate() was asked for
        returncode            the exit code, once the sandbox has finished
        log                   the sandbox process's stdout and stderr

This module is imported both as `modal._fake_state` (by the fake SDK and the
tests) and as `_fake_state` (by _fake_runtime.py, which runs without the
package on its path), so it holds no state of its own.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Iterator, Optional

ENV_DIR = "SLOT_FAKE_MODAL_DIR"

# Modal's documented exit codes for a sandbox that ended without its process exiting.
RC_TIMEOUT = 124
RC_TERMINATED = 137


def base_dir() -> Path:
    d = os.environ.get(ENV_DIR)
    if not d:
        raise RuntimeError(f"fake modal: {ENV_DIR} is not set (the fake keeps its sandboxes there)")
    p = Path(d)
    for sub in ("apps", "secrets", "sandboxes"):
        (p / sub).mkdir(parents=True, exist_ok=True)
    return p


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---- processes --------------------------------------------------------------

def proc_starttime(pid: int) -> Optional[str]:
    """The start time of a live process (not a zombie), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def write_pidfile(path: Path, pid: int) -> None:
    write_atomic(path, f"{pid} {proc_starttime(pid) or '?'}\n")


def pidfile_alive(path: Path) -> Optional[int]:
    """The pid recorded in `path` if that very process still runs."""
    try:
        pid_s, start = path.read_text().split()
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return pid if proc_starttime(pid) == start else None


def kill_group(path: Path, sig: int = signal.SIGKILL) -> None:
    """Signal the process group led by the process recorded in `path`."""
    pid = pidfile_alive(path)
    if pid is None:
        return
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---- sandboxes --------------------------------------------------------------

class SandboxDir:
    """One fake sandbox on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.root = path / "root"

    @property
    def object_id(self) -> str:
        return self.path.name

    def meta(self) -> dict[str, Any]:
        return dict(read_json(self.path / "meta.json"))

    def tags(self) -> dict[str, str]:
        return dict(read_json(self.path / "tags.json"))

    def create_args(self) -> dict[str, Any]:
        return dict(read_json(self.path / "create.json"))

    def returncode(self) -> Optional[int]:
        try:
            return int((self.path / "returncode").read_text())
        except (OSError, ValueError):
            return None

    def poll(self) -> Optional[int]:
        """None while running, else the exit code. A runtime that vanished
        without recording one (killed from outside) counts as terminated."""
        rc = self.returncode()
        if rc is not None:
            return rc
        if pidfile_alive(self.path / "runtime.pid") is None:
            rc = self.returncode()  # it may have finished just now
            return RC_TERMINATED if rc is None else rc
        return None

    def running(self) -> bool:
        return self.poll() is None

    def finished(self) -> bool:
        """Ended and swept: the runtime recorded the exit code, killed what was
        left of the sandbox and exited."""
        return (self.returncode() is not None
                and pidfile_alive(self.path / "runtime.pid") is None)

    def ended_within(self, seconds: float) -> bool:
        """Finished less than `seconds` ago (by its recorded exit code)."""
        try:
            st = (self.path / "returncode").stat()
        except OSError:
            return False
        return time.time() - st.st_mtime < seconds

    def process_pid(self) -> Optional[int]:
        """Pid of the sandbox's own process while it runs."""
        return pidfile_alive(self.path / "pid")

    # execs
    def register_exec(self, pid: int) -> None:
        d = self.path / "execs"
        d.mkdir(exist_ok=True)
        write_pidfile(d / str(pid), pid)

    def unregister_exec(self, pid: int) -> None:
        try:
            (self.path / "execs" / str(pid)).unlink()
        except FileNotFoundError:
            pass

    def kill_execs(self) -> None:
        for f in (self.path / "execs").glob("*"):
            kill_group(f)

    # termination
    def request_terminate(self) -> None:
        """Ask the runtime to end the sandbox (it kills everything, records 137)."""
        if self.returncode() is not None:
            return
        (self.path / "terminated").touch()
        pid = pidfile_alive(self.path / "runtime.pid")
        if pid is not None:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def force_finish(self, rc: int = RC_TERMINATED) -> None:
        """What the runtime would have done, for a runtime that is gone or hung."""
        kill_group(self.path / "runtime.pid")
        kill_group(self.path / "pid")
        self.kill_execs()
        if self.returncode() is None:
            write_atomic(self.path / "returncode", f"{rc}\n")

    def terminate_blocking(self, wait: float = 10.0) -> int:
        self.request_terminate()
        deadline = time.monotonic() + wait
        if pidfile_alive(self.path / "runtime.pid") is None:
            deadline = 0  # no runtime to do it (gone, or never started)
        while not self.finished() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self.finished():
            self.force_finish()
        rc = self.returncode()
        assert rc is not None
        return rc


def sandboxes(base: Path) -> Iterator[SandboxDir]:
    """Every fully created sandbox, running or finished, oldest first."""
    dirs = [p for p in (base / "sandboxes").glob("sb-*") if (p / "meta.json").exists()]
    dirs.sort(key=lambda p: (p / "meta.json").stat().st_mtime_ns)
    for p in dirs:
        yield SandboxDir(p)


def find_running(base: Path, app_id: str, name: str) -> Optional[SandboxDir]:
    for sb in sandboxes(base):
        m = sb.meta()
        if m["app_id"] == app_id and m.get("name") == name and sb.running():
            return sb
    return None


def terminate_all(base: Path) -> None:
    """Test cleanup: end every sandbox under `base` and all its processes."""
    if not (base / "sandboxes").is_dir():
        return
    for p in (base / "sandboxes").glob("sb-*"):
        sb = SandboxDir(p)
        sb.terminate_blocking(wait=10.0)
        sb.kill_execs()
