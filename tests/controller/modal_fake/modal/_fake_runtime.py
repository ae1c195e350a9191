"""The FAKE Modal's sandbox runtime (the "worker"; not part of Modal's API).

    python3 -s -E _fake_runtime.py SANDBOX_DIR

Started by the fake `Sandbox.create`. It forks: the parent reports "ok" on
stdout once the sandbox's process runs (or failed to start) and exits, so the
runtime itself is orphaned and outlives whoever created the sandbox. The
runtime then:

- runs spec.json's argv (the create() positional args, paths already mapped
  into the sandbox root) in its own session, stdout/stderr to SANDBOX_DIR/log;
- is a child subreaper, so whatever that process leaves behind comes back to
  it and dies with the sandbox, like a container's processes do;
- as root, gives that process a mount namespace of its own (private
  propagation), so what it mounts (an agent's per-slot filesystems) goes
  with the sandbox as it does with a container's, instead of staying on the
  host after the sandbox's processes are killed;
- ends the sandbox when the process exits (its exit code, 128+signal when
  killed), when `timeout` passes (124), or on SIGTERM from terminate() (137):
  it records `returncode` first, then kills the sandbox's execs, the process
  group, and every remaining descendant.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from _fake_state import (RC_TERMINATED, RC_TIMEOUT, SandboxDir,  # type: ignore[import]
                         write_atomic, write_pidfile)

PR_SET_CHILD_SUBREAPER = 36
CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def children(of: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == of and fields[0] not in ("Z", "X"):
            out.append(int(d))
    return out


def reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def finish(sb: SandboxDir, rc: int, pgid: Optional[int]) -> None:
    write_atomic(sb.path / "returncode", f"{rc}\n")
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    sb.kill_execs()
    # Orphans of the sandbox's process were reparented to us (subreaper).
    deadline = time.monotonic() + 5
    me = os.getpid()
    while time.monotonic() < deadline:
        reap_all()
        kids = children(me)
        if not kids:
            break
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    reap_all()


def run(sb: SandboxDir, report_fd: int) -> int:
    spec = json.loads((sb.path / "spec.json").read_text())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def enter() -> None:
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if os.geteuid() == 0:
            if libc.unshare(CLONE_NEWNS) != 0 or \
                    libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
                os.write(2, b"fake modal: cannot make the sandbox's mount namespace\n")
                os._exit(125)
    write_pidfile(sb.path / "runtime.pid", os.getpid())
    mask = STOP_SIGNALS | {signal.SIGCHLD}
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    log = open(sb.path / "log", "ab")
    try:
        child = subprocess.Popen(
            spec["argv"], cwd=spec["cwd"], env=spec["env"], stdin=subprocess.DEVNULL,
            stdout=log, stderr=log, start_new_session=True, preexec_fn=enter)
    except OSError as e:
        # Like a container whose entrypoint cannot be executed: it ends at once.
        log.write(f"fake modal: cannot run {spec['argv'][0]!r}: {e.strerror}\n".encode())
        log.flush()
        write_atomic(sb.path / "returncode", f"{126 if e.errno == errno.EACCES else 127}\n")
        os.write(report_fd, b"ok\n")
        os.close(report_fd)
        return 0
    write_pidfile(sb.path / "pid", child.pid)
    os.write(report_fd, b"ok\n")
    os.close(report_fd)

    deadline = time.monotonic() + float(spec["timeout"])
    rc: Optional[int] = None
    while rc is None:
        while True:  # reap: the sandbox's process, and orphans it left
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == child.pid:
                rc = exit_code(status)
        if rc is not None:
            break
        if (sb.path / "terminated").exists():
            rc = RC_TERMINATED
            break
        left = deadline - time.monotonic()
        if left <= 0:
            rc = RC_TIMEOUT
            break
        info = signal.sigtimedwait(mask, min(left, 5.0))
        if info is not None and info.si_signo in STOP_SIGNALS:
            rc = RC_TERMINATED
    finish(sb, rc, child.pid)
    return 0


def main() -> int:
    sb = SandboxDir(Path(sys.argv[1]))
    r, w = os.pipe()
    if os.fork() > 0:  # the launcher: wait for the report, then leave the runtime orphaned
        os.close(w)
        got = b""
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            ready, _, _ = select.select([r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 64)
            if not chunk:
                break
            got += chunk
        sys.stdout.write(got.decode() or "runtime did not report\n")
        return 0 if got.startswith(b"ok") else 1
    os.close(r)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # never hold the creator's pipes open
        os.dup2(devnull, fd)
    os.close(devnull)
    try:
        return run(sb, w)
    except BaseException as e:  # leave a trace for the tests, then die
        with open(sb.path / "log", "a") as f:
            f.write(f"fake modal runtime failed: {e!r}\n")
        raise


if __name__ == "__main__":
    sys.exit(main())
