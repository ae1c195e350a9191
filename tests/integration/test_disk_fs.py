"""Per-slot filesystems (disk mode "fs", issue 21): as root with loop devices
and mkfs.ext4 the agent gives every slot an ext4 filesystem of its budgets,
bound over DATA/slots/N and DATA/overlay/N. The kernel holds a slot to its
budget (ENOSPC in its own commands); the mounts go when the agent stops, when
it is killed (its guardian), or when its process group is; a restart finds
the slots' files again. test_disk_quota.py covers the counting mechanism."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AGENT_BIN, Agent
from helpers import AgentFactory, agent_factory, expect_error, wait_until  # noqa: F401

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("per-slot filesystems need root (CI runs as root)")


def mounts_under(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp.startswith(str(path) + "/"):
                out.append(mp)
    return out


def loops_of(path: Path) -> list[str]:
    r = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=10)
    return [ln for ln in r.stdout.splitlines() if str(path) in ln]


def start(agent_factory: AgentFactory, *extra: str, slots: int = 3) -> tuple[Agent, object]:
    a = agent_factory(slots=slots, extra=["--slot-disk", "32M", "--slot-inodes", "4000",
                                          "--disk-mode", "fs", *extra])
    return a, a.client(timeout=120)


def run(c, slot: int, cmd: str, timeout: float = 120) -> dict:
    return c.call("exec", {"slot": slot, "cmd": cmd, "timeout_ms": int(timeout * 1000)},
                  timeout=timeout + 30)


def disk(c, slot: int) -> dict:
    return c.call("slots", {"slot": slot})["slots"][0]["disk"]


def test_reports_fs_and_refuses_what_it_cannot(agent_factory, tmpdir_short: Path) -> None:
    a, c = start(agent_factory)
    dq = c.call("hello")["disk_quota"]
    assert dq["mechanism"] == "fs" and dq["why"] == "", dq
    assert dq["slot_disk"] == 32 * MiB and dq["slot_inodes"] == 4000, dq
    for n in range(3):
        assert str(a.data_dir / "slots" / str(n)) in mounts_under(a.data_dir)
        assert str(a.data_dir / "overlay" / str(n)) in mounts_under(a.data_dir)
        img = a.data_dir / "overlay" / ".disks" / f"{n}.img"
        # sparse: the image takes a small part of its size on the host
        assert img.stat().st_blocks * 512 < img.stat().st_size / 4, img.stat()
    p = subprocess.run([str(AGENT_BIN), "--probe", "--data-dir", str(tmpdir_short / "p"),
                        "--slot-disk", "1G"], capture_output=True, text=True, timeout=30)
    assert "disk quota: fs" in p.stdout, p.stdout
    # --disk-mode fs where it cannot be: no byte budget to size one by.
    r = subprocess.run([str(AGENT_BIN), "--stdio", "--data-dir", str(tmpdir_short / "x"),
                        "--disk-mode", "fs", "--slot-disk", "0"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "--disk-mode fs" in r.stderr, r.stderr
    r = subprocess.run([str(AGENT_BIN), "--stdio", "--disk-mode", "quota"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--disk-mode" in r.stderr, r.stderr


def test_a_full_slot_gets_enospc_and_nobody_else_notices(agent_factory) -> None:
    a, c = start(agent_factory)
    # One huge file: ENOSPC just under the budget, never past it.
    r = run(c, 0, "yes > out.txt; echo rc=$?")
    assert b"No space left on device" in r["stderr"], r
    size = c.call("stat", {"slot": 0, "path": "out.txt"})["size"]
    assert 31 * MiB <= size <= 32 * MiB, size
    d = disk(c, 0)
    assert d["over"] is True and 31 * MiB <= d["used"] <= 32 * MiB, d
    # write_file does not fit: refused, nothing left behind.
    expect_error(c, "write_file", {"slot": 0, "path": "more.bin", "data": b"x" * MiB},
                 "too_large", "budget")
    assert [e["path"] for e in c.call("list", {"slot": 0})["entries"]] == ["out.txt"]
    # The others write as before.
    data = os.urandom(8 * MiB)
    w = c.call("write_file", {"slot": 1, "path": "w.bin", "data": data})
    assert w["sha256"] == hashlib.sha256(data).hexdigest()
    assert run(c, 2, "head -c 20M /dev/zero > f && stat -c %s f")["stdout"] == b"20971520\n"
    # Files: ENOSPC at the inode budget (ext4 rounds it up a little).
    assert run(c, 0, "rm out.txt")["exit_code"] == 0
    r = run(c, 0, "mkdir many && cd many && python3 -c \"import os\n"
                  "for i in range(1000000): os.close(os.open('f%d' % i, os.O_CREAT, 0o644))\"")
    assert r["exit_code"] != 0 and b"No space left on device" in r["stderr"], r
    n = len(c.call("list", {"slot": 0, "path": "many", "max_entries": 100000})["entries"])
    assert 3900 < n <= 4064, n
    d = disk(c, 0)
    assert d["over"] is True and 3900 < d["inodes"] <= 4064, d
    expect_error(c, "write_file", {"slot": 0, "path": "x", "data": b""}, "too_large", "files")
    # Reset gives it all back at once.
    c.call("reset", {"slot": 0})
    d = disk(c, 0)
    assert d["used"] < MiB and d["inodes"] < 10 and d["over"] is False, d
    assert run(c, 0, "head -c 30M /dev/zero > g && stat -c %s g")["stdout"] == b"31457280\n"
    assert c.call("health")["ok"] is True


def test_slots_cannot_reach_the_images(agent_factory) -> None:
    a, c = start(agent_factory)
    disks = a.data_dir / "overlay" / ".disks"
    r = run(c, 0, f"head -c 1 {disks}/1.img; ls {disks}; ln {a.data_dir}/overlay/.disks/1.img x")
    assert r["exit_code"] != 0 and r["stdout"] == b"", r
    # A hard link out of the slot's filesystem is another device.
    r = run(c, 0, "ln /etc/hostname h 2>&1; echo $?")
    assert r["stdout"].strip().endswith(b"1"), r


def test_mounts_go_with_the_agent_and_a_restart_finds_the_files(agent_factory,
                                                                 tmpdir_short: Path) -> None:
    a, c = start(agent_factory)
    c.call("write_file", {"slot": 1, "path": "kept.txt", "data": b"kept\n"})
    c.close()
    assert a.stop() == 0
    assert mounts_under(a.data_dir) == []
    # the kernel lets a loop device go (autoclear) a moment after its unmount
    wait_until(lambda: not loops_of(a.data_dir), 10, 0.05, "the loop devices to go")
    # Killed: the guardian takes the mounts away.
    sock = a.dir / "agent.sock"
    sock.unlink(missing_ok=True)
    b = Agent(a.dir, slots=3, extra=["--slot-disk", "32M", "--slot-inodes", "4000"])
    cb = b.client()
    assert cb.call("read_file", {"slot": 1, "path": "kept.txt"})["data"] == b"kept\n"
    assert len(mounts_under(a.data_dir)) == 6
    b.expect_clean_exit = False
    os.kill(b.proc.pid, signal.SIGKILL)
    b.stop()
    wait_until(lambda: not mounts_under(a.data_dir), 10, 0.05, "the guardian to unmount")
    wait_until(lambda: not loops_of(a.data_dir), 10, 0.05, "the loop devices to go")
    # The whole process group killed (a launcher's stop): the guardian is in
    # a session of its own and still cleans up.
    d = tmpdir_short / "pg"
    d.mkdir()
    p = subprocess.Popen([str(AGENT_BIN), "--listen", f"unix:{d}/a.sock", "--slots", "2",
                          "--data-dir", str(d / "data"), "--slot-disk", "32M"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: len(mounts_under(d / "data")) == 4, 10, 0.05, "the mounts")
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
    wait_until(lambda: not mounts_under(d / "data"), 10, 0.05, "the guardian to unmount")
    # New budgets make new filesystems.
    sock.unlink(missing_ok=True)
    e = Agent(a.dir, slots=3, extra=["--slot-disk", "48M", "--slot-inodes", "4000"])
    try:
        ce = e.client()
        assert disk(ce, 1)["budget"] == 48 * MiB
        expect_error(ce, "read_file", {"slot": 1, "path": "kept.txt"}, "not_found")
        r = run(ce, 1, "head -c 100M /dev/zero > f; stat -c %s f")
        assert 47 * MiB <= int(r["stdout"].split()[-1]) <= 48 * MiB, r
    finally:
        assert e.stop() == 0
    assert mounts_under(a.data_dir) == []
