"""Disk and inode budgets (issue 21) in each condition of conftest.py: the
agent as root, as an unprivileged user, and inside Docker (whose image has
only busybox, so commands here are POSIX sh with busybox applets). Slot 0
floods (one huge file, a million files, many medium files, files behind a
chmod 000 directory) and is held to its budget; slot 1, a bystander, keeps
writing; `reset` gives the space back; a template stays as it was.

As root on the host the agent gives each slot a filesystem of its own
(mechanism "fs"): the kernel answers the flood with ENOSPC at the budget.
Unprivileged and in Docker it counts (mechanism "watch"): the flood is
stopped near its budget with `disk_quota`. What each condition saw is
printed in a table at the end of the run."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time

import pytest

from conftest import CONDITIONS, Cond

# Read by conftest's cond fixture: this module's agents get budgets. The
# file budget is small because creating and deleting files in Docker's
# fuse-overlayfs runs at a few hundred to a thousand files a second.
AGENT_EXTRA_ARGS = ["--slot-disk", "32M", "--slot-inodes", "5000"]
MiB = 1 << 20
BUDGET, INODES = 32 * MiB, 5000
FLOOD, BYSTANDER, FRESH = 0, 1, 2

MILLION_FILES = ("busybox mkdir -p many && cd many && i=0;"
                 " while [ $i -lt 1000000 ]; do : > f$i || exit 1; i=$((i+1)); done")
# 1024 files of 256 KiB (each under the 1 MiB RLIMIT_FSIZE floor), paced so
# that the watcher sees the slot grow; then a sleep a stop cuts short.
MEDIUM_FILES = ("busybox mkdir -p chunks && i=0; while [ $i -lt 1024 ]; do"
                " head -c 262144 /dev/zero > chunks/$i || exit 1; busybox sleep 0.01;"
                " i=$((i+1)); done; sleep 30")
# 3500 files behind a chmod 000 directory, then 2000 visible: over 5000
# only when the hidden ones are counted.
HIDDEN = ("busybox mkdir hid && cd hid && i=0; while [ $i -lt 3500 ]; do : > f$i || exit 1;"
          " i=$((i+1)); done; cd .. && busybox chmod 000 hid && busybox mkdir vis && cd vis &&"
          " i=0; while [ $i -lt 2000 ]; do : > f$i || exit 1; i=$((i+1)); done; sleep 30")
# The same with bytes: 24 MiB behind chmod 000, then 12 MiB visible (in
# 512 KiB files, under the RLIMIT_FSIZE floor): over 32 MiB only when the
# hidden ones are counted.
HIDDEN_BYTES = ("busybox mkdir hidb && i=0; while [ $i -lt 48 ]; do"
                " head -c 524288 /dev/zero > hidb/$i || exit 1; i=$((i+1)); done;"
                " busybox chmod 000 hidb && busybox mkdir visb && i=0; while [ $i -lt 24 ]; do"
                " head -c 524288 /dev/zero > visb/$i || exit 1; busybox sleep 0.01; i=$((i+1));"
                " done; sleep 30")

# condition -> column -> what it saw
TABLE: dict[str, dict[str, str]] = {}
COLUMNS = ["mechanism", "templates", "huge file at stop", "million files: stop",
           "files at stop", "peak inodes", "bytes: peak used", "reset drained", "chmod 000",
           "template charged"]


class _Table:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not TABLE:
            return
        tr = terminalreporter
        conds = [c for c in CONDITIONS if c in TABLE]
        w = max(len(c) for c in COLUMNS) + 2
        tr.write_line("")
        tr.write_line(f"disk budgets ({' '.join(AGENT_EXTRA_ARGS)}): what each condition saw"
                      " (! = went over and was not stopped)")
        tr.write_line(f"{'':<{w}}" + "".join(f"{c:<26}" for c in conds))
        for col in COLUMNS:
            tr.write_line(f"{col:<{w}}" + "".join(f"{TABLE[c].get(col, '-'):<24}  "
                                                  for c in conds))


@pytest.fixture(scope="module", autouse=True)
def _table_plugin(request):
    pm = request.config.pluginmanager
    if pm.get_plugin("disk-quota-table") is None:
        pm.register(_Table(), "disk-quota-table")
    yield


@pytest.fixture(autouse=True)
def _patient_client(cond: Cond) -> None:
    """This module's agents are its own: their client waits as long as a flood
    may run (conftest's socket times out after 30 s without a frame)."""
    cond.client.sock.settimeout(300)
    cond.client.timeout = 300


def note(cd: Cond, col: str, value: str) -> None:
    TABLE.setdefault(cd.name, {})[col] = value


def run(cd: Cond, cmd: str, slot: int = FLOOD, timeout: float = 120, **kw) -> dict:
    return cd.client.call("exec", {"slot": slot, "cmd": cmd, "timeout_ms": int(timeout * 1000),
                                   **kw}, timeout=timeout + 30)


def ok(cd: Cond, cmd: str, slot: int) -> bytes:
    r = run(cd, cmd, slot)
    assert r["exit_code"] == 0 and not r.get("disk_quota"), (cmd, r)
    return r["stdout"]


def disk(cd: Cond, slot: int) -> dict:
    return cd.client.call("slots", {"slot": slot})["slots"][0]["disk"]


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.05)


def clean(cd: Cond, *slots: int) -> None:
    """Slots reset, unleased, and counted as empty."""
    c = cd.client
    for s in slots:
        c.call("reset", {"slot": s})
        if c.call("slots", {"slot": s})["slots"][0]["leased"]:
            c.call("unlease", {"slot": s})
    for s in slots:
        wait_for(lambda: not disk(cd, s)["over"], 5, f"slot {s} to be counted after reset")


def entries(cd: Cond, path: str) -> int:
    r = cd.client.call("list", {"slot": FLOOD, "path": path, "max_entries": 1000000},
                       timeout=60)
    assert r["truncated"] is False
    return len(r["entries"])


def mechanism(cd: Cond) -> str:
    return cd.client.call("hello")["disk_quota"]["mechanism"]


def assert_stopped(r: dict) -> None:
    assert r.get("disk_quota") is True, r
    assert r["cancelled"] is True and r["timed_out"] is False, r
    assert isinstance(r.get("reason"), str) and r["reason"], r


def assert_held(cd: Cond, r: dict) -> None:
    """The flood did not get past its budget: stopped by the watcher, or
    refused by the slot's own filesystem (and then it gave up by itself)."""
    if mechanism(cd) == "fs":
        assert r["exit_code"] != 0 and not r.get("disk_quota") and r["timed_out"] is False, r
        assert b"No space left on device" in r["stderr"] + r["stdout"], r
    else:
        assert_stopped(r)


def bystander_writes(cd: Cond, tag: str) -> None:
    """Slot 1 writes a file through the agent and 10 MiB through a command."""
    c = cd.client
    data = os.urandom(MiB)
    w = c.call("write_file", {"slot": BYSTANDER, "path": f"w-{tag}", "data": data})
    assert w["sha256"] == hashlib.sha256(data).hexdigest()
    ok(cd, f"dd if=/dev/zero of=ten-{tag} bs=1M count=10 2>/dev/null", BYSTANDER)
    assert c.call("stat", {"slot": BYSTANDER, "path": f"ten-{tag}"})["size"] == 10 * MiB
    assert c.call("health")["ok"] is True


def flood_with_bystander(cd: Cond, cmd: str, tag: str) -> dict:
    """Runs cmd in slot 0 while slot 1 writes; the flood's result."""
    c = cd.client
    rid = c.send("exec", {"slot": FLOOD, "cmd": cmd, "timeout_ms": 120000})
    wait_for(lambda: c.call("slots", {"slot": FLOOD})["slots"][0]["running"], 10,
             "the flood to start")
    bystander_writes(cd, tag)
    resp = c.wait(rid, 180)[0]
    assert resp["ok"], resp
    return resp["result"]


def test_reports_mechanism(cond: Cond) -> None:
    dq = cond.client.call("hello")["disk_quota"]
    # A filesystem per slot needs root on the host (loop devices, mount).
    assert dq["mechanism"] == ("fs" if cond.name == "root" else "watch"), dq
    assert dq["slot_disk"] == BUDGET and dq["slot_inodes"] == INODES, dq
    note(cond, "mechanism", dq["mechanism"])
    note(cond, "templates", cond.client.call("hello")["templates"]["mode"])
    d = disk(cond, FLOOD)
    assert d["budget"] == BUDGET and d["inodes_budget"] == INODES and d["over"] is False, d


def test_huge_file_stops_at_budget(cond: Cond) -> None:
    clean(cond, FLOOD, BYSTANDER)
    sizes = []
    for cmd, name in (("busybox yes > out.txt", "out.txt"),
                      ("dd if=/dev/zero of=big bs=1M count=200", "big")):
        r = flood_with_bystander(cond, cmd, name)
        assert r["exit_code"] != 0, (cmd, r)
        size = cond.client.call("stat", {"slot": FLOOD, "path": name})["size"]
        assert 0 < size <= BUDGET, (cmd, size)
        sizes.append(size)
        ok(cond, f"rm -f {name}", FLOOD)
    note(cond, "huge file at stop", "/".join(f"{s / MiB:.1f}M" for s in sizes))
    assert disk(cond, BYSTANDER)["over"] is False
    clean(cond, FLOOD, BYSTANDER)


def test_million_files_stopped(cond: Cond) -> None:
    clean(cond, FLOOD, BYSTANDER)
    r = flood_with_bystander(cond, MILLION_FILES, "many")
    assert_held(cond, r)
    n = entries(cond, "many")
    d = disk(cond, FLOOD)
    if mechanism(cond) == "fs":
        # exactly the budget (ext4 rounds its inode tables up a little)
        assert INODES - 100 < n <= INODES + 64, n
        assert d["over"] is True and INODES - 100 < d["inodes"] <= INODES + 64, d
    else:
        assert INODES - 1000 < n < 1_000_000, n
        assert d["over"] is True and d["inodes"] > INODES and d["stops"] >= 1, d
    note(cond, "million files: stop", f"{r['duration_ms'] / 1000:.1f}s")
    note(cond, "files at stop", str(n))
    note(cond, "peak inodes", str(d["inodes"]))
    r = cond.client.call_raw("write_file", {"slot": FLOOD, "path": "late", "data": b"x"})
    assert not r["ok"] and r["error"]["code"] == "too_large", r
    assert "budget" in r["error"]["message"], r
    # The bystander keeps working after the stop too.
    bystander_writes(cond, "after")
    assert disk(cond, BYSTANDER)["over"] is False
    clean(cond, FLOOD, BYSTANDER)


def test_fill_then_reset(cond: Cond) -> None:
    clean(cond, FLOOD, BYSTANDER)
    r = flood_with_bystander(cond, MEDIUM_FILES, "fill")
    assert_held(cond, r)
    assert entries(cond, "chunks") < 1024
    d = disk(cond, FLOOD)
    if mechanism(cond) == "fs":
        assert d["over"] is True and BUDGET - 2 * MiB < d["used"] <= BUDGET, d
    else:
        assert d["over"] is True and d["used"] > BUDGET, d
    note(cond, "bytes: peak used", f"{d['used'] / MiB:.1f}M")
    t0 = time.monotonic()
    cond.client.call("reset", {"slot": FLOOD})

    def drained():
        d = disk(cond, FLOOD)
        return d if d["used"] < MiB and d["inodes"] < 50 and not d["over"] else None
    wait_for(drained, 5, "slot 0's usage to drop after reset")
    note(cond, "reset drained", f"{time.monotonic() - t0:.2f}s")
    data = os.urandom(2 * MiB)
    cond.client.call("write_file", {"slot": FLOOD, "path": "w.bin", "data": data})
    ok(cond, "dd if=/dev/zero of=f4 bs=1M count=4 2>/dev/null", FLOOD)
    assert cond.client.call("stat", {"slot": FLOOD, "path": "f4"})["size"] == 4 * MiB
    rf = cond.client.call("read_file", {"slot": FLOOD, "path": "w.bin", "sha256": True})
    assert rf["sha256"] == hashlib.sha256(data).hexdigest()
    clean(cond, FLOOD, BYSTANDER)


def test_hidden_files_counted(cond: Cond) -> None:
    """Files and bytes behind a chmod 000 directory count (the agent may be
    no more privileged than the slot: the user condition)."""
    results = []
    for cmd, what in ((HIDDEN, "files"), (HIDDEN_BYTES, "bytes")):
        clean(cond, FLOOD)
        r = run(cond, cmd, timeout=90)
        d = disk(cond, FLOOD)
        results.append((what, r, d))
        clean(cond, FLOOD)
        assert cond.client.call("list", {"slot": FLOOD})["entries"] == []
    note(cond, "chmod 000", ", ".join(
        (f"{d['inodes']} files" if what == "files" else f"{d['used'] / MiB:.0f}M")
        + ("" if r.get("disk_quota") or r["exit_code"] != 0 else "!") for what, r, d in results))
    for what, r, d in results:
        assert_held(cond, r)
        if mechanism(cond) == "fs":  # full, and never past it
            assert (d["inodes"] > INODES - 100) if what == "files" else \
                (d["used"] > BUDGET - 2 * MiB), (what, d)
        else:
            assert (d["inodes"] > INODES) if what == "files" else (d["used"] > BUDGET), (what, d)


def tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def put(cd: Cond, name: str, data: bytes, chunk: int = 4 << 20) -> dict:
    off = 0
    while True:
        piece = data[off:off + chunk]
        done = off + len(piece) >= len(data)
        r = cd.client.call("template_put", {"name": name, "data": piece, "offset": off,
                                            "done": done})
        off += len(piece)
        if done:
            return r["template"]


def test_template_untouched(cond: Cond) -> None:
    c = cond.client
    clean(cond, FLOOD, BYSTANDER, FRESH)
    mode = c.call("hello")["templates"]["mode"]
    # Overlay: more than the whole budget (not charged). Copy: a quarter (charged).
    blob = 40 * MiB if mode == "overlay" else 8 * MiB
    files = {"repo/a.txt": b"alpha\n", "repo/sub/b.txt": b"beta\n", "blob.bin": os.urandom(blob)}
    t = put(cond, "dq", tar(files))
    t_lease = time.monotonic()
    lr = c.call("lease", {"slot": FLOOD, "trajectory_id": "dq-0", "template": "dq"})
    assert lr["workspace_mode"] == mode, lr
    keep = c.call("exec", {"slot": FLOOD, "cmd": "sleep 30", "detach": True})

    def counted():
        d = disk(cond, FLOOD)
        ago = d["scanned_ms_ago"]
        return d if 0 <= ago and ago / 1000 < time.monotonic() - t_lease else None
    if mode == "overlay":
        d = wait_for(counted, 5, "a count of slot 0 after its lease")
        assert d["used"] < 4 * MiB and d["over"] is False, d
    else:
        d = wait_for(lambda: (lambda d: d if d["used"] >= blob else None)(disk(cond, FLOOD)),
                     5, "the copied template to be charged")
    note(cond, "template charged", f"{mode}: {d['used'] / MiB:.1f}M of {blob // MiB}M")
    c.call("cancel", {"exec_id": keep["exec_id"]})
    # Change the template's files, then flood.
    r = run(cond, "echo evil > repo/a.txt; rm repo/sub/b.txt; head -c 104857600 /dev/zero"
                  " >> blob.bin")
    assert r["exit_code"] != 0, r
    ok(cond, "rm -f blob.bin", FLOOD)
    r = flood_with_bystander(cond, MEDIUM_FILES, "tpl")
    assert_held(cond, r)
    # A fresh lease on the template sees the originals; it is still listed.
    c.call("lease", {"slot": FRESH, "trajectory_id": "dq-2", "template": "dq"})
    for name, data in files.items():
        rf = c.call("read_file", {"slot": FRESH, "path": name, "sha256": True})
        assert rf["sha256"] == hashlib.sha256(data).hexdigest(), name
    lst = {x["name"]: x for x in c.call("template_list")["templates"]}
    assert "dq" in lst and lst["dq"]["files"] == t["files"], lst
    assert c.call("health")["ok"] is True
    clean(cond, FLOOD, BYSTANDER, FRESH)
    c.call("template_delete", {"name": "dq"})
