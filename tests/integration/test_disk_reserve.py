"""The last line of defence of the disk watcher: with budgets larger than the
data filesystem (so no budget trips), a slot that keeps writing is stopped
once the filesystem's free space falls under --disk-reserve, before it
fills: the other slots and the agent's own files keep their room.

The data dir is a small tmpfs of the test's own (root only, as in CI)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import Agent

MIB = 1 << 20


@pytest.fixture
def small_fs(tmpdir_short: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.fail("needs root to mount a tmpfs (CI runs as root)")
    mnt = tmpdir_short / "fs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=755", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.parametrize("mode", ["watch", "fs"])
def test_a_writer_is_stopped_before_the_filesystem_fills(small_fs: Path, mode: str) -> None:
    # Agent directly on the small filesystem (not agent_factory: its data
    # dir is fixed under tmpdir_short). In fs mode the slots' sparse images
    # (1 GiB each) live there and grow as they are written.
    a = Agent(small_fs, slots=3, extra=["--slot-disk", "1G", "--slot-inodes", "50K",
                                        "--disk-reserve", "96M", "--disk-interval", "100",
                                        "--disk-mode", mode])
    try:
        c = a.client()
        hello = c.call("hello")["disk_quota"]
        assert hello["mechanism"] == mode and hello["reserve"] == 96 * MIB
        # 2 MiB every 20 ms (~100 MB/s): the filesystem would be full in
        # about two seconds; the watcher counts every 100 ms.
        t0 = time.monotonic()
        r = c.call("exec", {"slot": 0, "timeout_ms": 60000,
                            "cmd": "i=0; while :; do i=$((i+1)); "
                                   "head -c 2M /dev/zero > f$i || exit 9; sleep 0.02; done"})
        took = time.monotonic() - t0
        assert r["disk_quota"] is True and r["cancelled"] is True, r
        assert "data filesystem" in r["reason"] and "slot 0" in r["reason"], r["reason"]
        assert r["exit_code"] != 9, "the writer met a full filesystem before it was stopped"
        left = free_bytes(small_fs)
        assert left > 32 * MIB, f"only {left} bytes left: the reserve was not kept"
        # The others still have room, and the agent answers.
        w = c.call("write_file", {"slot": 1, "path": "ok.bin", "data": b"x" * (4 * MIB)})
        assert w["size"] == 4 * MIB
        assert c.call("exec", {"slot": 2, "cmd": "echo fine > f && cat f"})["stdout"] == b"fine\n"
        assert c.call("health")["ok"] is True
        assert c.call("stats")["disk_stops"] >= 1
        # The slot itself keeps its lease-less workspace and may clean up.
        assert c.call("exec", {"slot": 0, "cmd": "rm -f f*"})["exit_code"] == 0
        c.call("reset", {"slot": 0})
        assert free_bytes(small_fs) > 200 * MIB
        print(f"writer stopped after {took:.2f} s with {left >> 20} MiB free")
    finally:
        assert a.stop() == 0, a.log()[-2000:]
