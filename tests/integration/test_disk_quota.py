"""Per-slot disk and inode budgets (issue 21) against the real agent.

The mechanism here is "watch" (forced with --disk-mode watch: as root the
agent would give each slot a filesystem of its own, which
test_disk_fs.py covers): every command's RLIMIT_FSIZE is what is left
of its slot's byte budget, and a watcher counts the writable places of busy
slots and stops a slot found over a budget (its execs answer `disk_quota`).
The tests flood one slot (one huge file, a million files, many medium files,
hidden and deeply nested files, through detached execs, sessions and kept
background processes) and check that it is stopped near its budget, that
the others keep working, that `reset` gives the space back and that
templates are neither changed nor, in overlay mode, charged. Budgets are
small so that every flood is stopped within seconds; a flood that is not
stopped ends on its own (bounded) and the test fails on `disk_quota`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from conftest import AGENT_BIN
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from helpers import wait_running, wait_until, workspace
from slotwire import Client

MiB = 1 << 20
GiB = 1 << 30
DQ_KEYS = {"mechanism", "why", "slot_disk", "slot_inodes", "interval_ms", "reserve"}
DISK_KEYS = {"used", "budget", "inodes", "inodes_budget", "over", "stops", "scanned_ms_ago"}


def py_files(n: int, prefix: str = "f") -> str:
    """A shell command: python3 creating n empty files in the current directory
    (a few thousand a second at best: a million takes minutes)."""
    return ("python3 -c \"import os; [os.close(os.open('%s%%d' %% i, os.O_CREAT | os.O_WRONLY,"
            " 0o644)) for i in range(%d)]\"" % (prefix, n))


MILLION_FILES = "mkdir -p many && cd many && " + py_files(1_000_000)


def medium_files(d: str, n: int = 1024, size: str = "256K") -> str:
    """Many files each well under 1 MiB (so no RLIMIT_FSIZE stops them), paced
    a little so that a watcher sees the slot grow: n * size in a few seconds."""
    return (f"mkdir -p {d} && for i in $(seq {n}); do head -c {size} /dev/zero > {d}/$i"
            f" || exit 1; sleep 0.01; done")


def start(agent_factory: AgentFactory, disk: str | None = "64M", inodes: str | None = "20000",
          slots: int = 4, extra: list[str] | None = None):
    args: list[str] = ["--disk-mode", "watch"]
    if disk is not None:
        args += ["--slot-disk", disk]
    if inodes is not None:
        args += ["--slot-inodes", inodes]
    a = agent_factory(slots=slots, extra=args + (extra or []))
    return a, a.client(timeout=60)


def run(c: Client, slot: int, cmd: str, timeout: float = 120, **kw) -> dict:
    return c.call("exec", {"slot": slot, "cmd": cmd, "timeout_ms": int(timeout * 1000), **kw},
                  timeout=timeout + 30)


def ok(c: Client, slot: int, cmd: str, **kw) -> str:
    r = run(c, slot, cmd, **kw)
    assert r["exit_code"] == 0 and not r.get("disk_quota"), (cmd, r)
    return r["stdout"].decode()


def disk(c: Client, slot: int) -> dict:
    d = c.call("slots", {"slot": slot})["slots"][0]["disk"]
    assert DISK_KEYS <= set(d), d
    return d


def count_tree(root: Path) -> int:
    """Files and directories below root (symlinks not followed), counted on
    the host without the agent's help; iterative, so deep trees are fine."""
    n = 0
    todo = [str(root)]
    while todo:
        d = todo.pop()
        try:
            it = os.scandir(d)
        except OSError:
            continue
        with it:
            for e in it:
                n += 1
                if e.is_dir(follow_symlinks=False):
                    todo.append(e.path)
    return n


def expect_error(c: Client, op: str, args: dict, code: str, names: str | None = None) -> dict:
    """helpers.expect_error, without printing the request (its data is megabytes)."""
    r = c.call_raw(op, args)
    what = f"{op} {args.get('path')!r} in slot {args.get('slot')}"
    assert r.get("ok") is False, f"{what} succeeded: {r!r}"
    assert r["error"]["code"] == code, f"{what}: {r['error']!r}"
    if names is not None:
        assert names in r["error"]["message"], f"{what}: {names!r} not named in {r['error']!r}"
    return r


def assert_stopped(r: dict) -> None:
    """An exec result of a command the watcher stopped."""
    assert r.get("disk_quota") is True, r
    assert r["cancelled"] is True, r
    assert isinstance(r.get("reason"), str) and r["reason"], r
    assert r["timed_out"] is False, r


def scanned_since(c: Client, slot: int, t0: float, timeout: float = 5.0) -> dict:
    """The slot's disk map once a count started after monotonic time t0."""
    def fresh():
        d = disk(c, slot)
        ago = d["scanned_ms_ago"]
        return d if ago >= 0 and ago / 1000 < time.monotonic() - t0 else None
    return wait_until(fresh, timeout, 0.05, f"a disk count of slot {slot}")


# -- 1. what the agent reports, flags

def probe(*args: str) -> subprocess.CompletedProcess:
    args = ("--disk-mode", "watch", *args)
    return subprocess.run([str(AGENT_BIN), "--probe", *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


def test_hello_probe_and_flags(agent_factory, tmpdir_short: Path) -> None:
    a, c = start(agent_factory, "64M", "20K")
    dq = c.call("hello")["disk_quota"]
    assert DQ_KEYS <= set(dq), dq
    assert dq["mechanism"] == "watch", dq
    assert dq["slot_disk"] == 64 * MiB and dq["slot_inodes"] == 20000, dq
    assert isinstance(dq["why"], str)
    assert dq["interval_ms"] == 250 and dq["reserve"] > 0, dq
    for s in c.call("slots")["slots"]:
        assert s["disk"]["budget"] == 64 * MiB and s["disk"]["inodes_budget"] == 20000, s
        assert s["disk"]["over"] is False, s
    assert {"disk_scans", "disk_scan_ms", "disk_stops"} <= set(c.call("stats"))

    # No budget at all: mechanism none (0 and off alike).
    for off in ("0", "off"):
        _, c2 = start(agent_factory, off, off)
        dq = c2.call("hello")["disk_quota"]
        assert dq["mechanism"] == "none" and dq["slot_disk"] == 0 and dq["slot_inodes"] == 0, dq
        d = disk(c2, 0)
        assert d["budget"] == 0 and d["inodes_budget"] == 0, d
        r = run(c2, 0, "head -c 3M /dev/zero > f && stat -c %s f")
        assert r["exit_code"] == 0 and r["stdout"] == b"3145728\n" and not r["disk_quota"], r

    # Defaults: from the data filesystem, within the documented clamps.
    _, c3 = start(agent_factory, None, None)
    dq = c3.call("hello")["disk_quota"]
    assert dq["mechanism"] == "watch", dq
    assert 256 * MiB <= dq["slot_disk"] <= 16 * GiB, dq
    assert 10000 <= dq["slot_inodes"] <= 500000, dq

    # --probe, text and JSON, with and without budgets.
    data = tmpdir_short / "probe-data"
    data.mkdir()
    p = probe("--json", "--data-dir", str(data), "--slot-disk", "64M", "--slot-inodes", "20000")
    assert p.returncode == 0, p.stderr
    pj = json.loads(p.stdout)["disk_quota"]
    assert DQ_KEYS - {"interval_ms", "reserve"} <= set(pj), pj
    assert pj["mechanism"] == "watch" and pj["slot_disk"] == 64 * MiB, pj
    assert pj["slot_inodes"] == 20000 and isinstance(pj["why"], str), pj
    p = probe("--json", "--data-dir", str(data))
    pj = json.loads(p.stdout)["disk_quota"]
    assert pj["mechanism"] == "watch" and 256 * MiB <= pj["slot_disk"] <= 16 * GiB, pj
    p = probe("--json", "--data-dir", str(data), "--slot-disk", "0", "--slot-inodes", "0")
    assert json.loads(p.stdout)["disk_quota"]["mechanism"] == "none", p.stdout
    p = probe("--data-dir", str(data), "--slot-disk", "64M")
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if "disk" in ln.lower()]
    assert lines and any("watch" in ln for ln in lines), p.stdout

    # Bad values: the agent refuses to start and names the flag.
    for flag, bad in (("--slot-disk", "-1"), ("--slot-disk", "12Q"),
                      ("--slot-inodes", "many"), ("--slot-inodes", "-3")):
        r = subprocess.run([str(AGENT_BIN), "--stdio", "--data-dir", str(tmpdir_short / "bad"),
                            flag, bad], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=30)
        assert r.returncode != 0, (flag, bad, r.stderr)
        assert flag in r.stderr, (flag, bad, r.stderr)


# -- 2. one huge file

def test_huge_file_stops_at_budget_and_others_write(agent_factory) -> None:
    a, c = start(agent_factory, "64M", "20000")
    c1 = a.client(timeout=60)
    for cmd, name in (("yes > out.txt", "out.txt"), ("head -c 200M /dev/zero > big", "big")):
        rid = c.send("exec", {"slot": 0, "cmd": cmd, "timeout_ms": 60000})
        # Slot 1 keeps writing meanwhile.
        data = os.urandom(MiB)
        w = c1.call("write_file", {"slot": 1, "path": f"w-{name}", "data": data})
        assert w["size"] == MiB and w["sha256"] == hashlib.sha256(data).hexdigest()
        r1 = run(c1, 1, f"head -c 10M /dev/zero > ten-{name} && stat -c %s ten-{name}")
        assert r1["exit_code"] == 0 and r1["stdout"] == b"10485760\n", r1
        assert c1.call("health")["ok"] is True
        r = c.wait(rid, 90)[0]
        assert r["ok"], r
        r = r["result"]
        assert r["exit_code"] != 0 and r["timed_out"] is False, (cmd, r)
        size = c.call("stat", {"slot": 0, "path": name})["size"]
        assert 0 < size <= 64 * MiB, (cmd, size)
        ok(c, 0, f"rm -f {name}")
    assert c.call("health")["ok"] is True
    assert disk(c, 1)["over"] is False
    assert c1.call("read_file", {"slot": 1, "path": "ten-big"})["size"] == 10 * MiB
    c1.close()


# -- 3. a million files

def test_million_files_stopped_by_inode_budget(agent_factory) -> None:
    a, c = start(agent_factory, "4G", "20000")
    c1 = a.client(timeout=60)
    ws0 = workspace(c, 0)
    rid = c.send("exec", {"slot": 0, "cmd": MILLION_FILES, "timeout_ms": 120000})
    wait_running(c1, 0)
    # Slot 1 works normally while slot 0 floods.
    for i in range(20):
        c1.call("write_file", {"slot": 1, "path": f"b{i}.txt", "data": os.urandom(4096)})
    out = ok(c1, 1, "mkdir -p d && for i in $(seq 200); do echo $i > d/$i; done; ls d | wc -l")
    assert out == "200\n"
    assert c1.call("health")["ok"] is True
    resp = c.wait(rid, 180)[0]
    assert resp["ok"], resp
    r = resp["result"]
    assert_stopped(r)
    n = count_tree(ws0 / "many")
    assert 19000 < n < 1_000_000, n
    d = disk(c, 0)
    assert d["over"] is True and d["inodes"] > 20000 and d["inodes_budget"] == 20000, d
    assert d["stops"] >= 1, d
    assert running_none(c, 0)
    expect_error(c, "write_file", {"slot": 0, "path": "late.txt", "data": b"x"}, "too_large",
                 "budget")
    assert not (ws0 / "late.txt").exists()
    # The bystander is unaffected, before and after.
    assert disk(c, 1)["over"] is False
    c1.call("write_file", {"slot": 1, "path": "after.txt", "data": b"after\n"})
    assert ok(c1, 1, "cat after.txt; ls | wc -l") == "after\n22\n"
    st = c.call("stats")
    assert st["disk_stops"] >= 1 and st["disk_scans"] >= 1, st
    c.call("reset", {"slot": 0})
    c1.close()


def running_none(c: Client, slot: int) -> bool:
    return c.call("slots", {"slot": slot})["slots"][0]["running"] == []


# -- 4. fill, then reset

@pytest.mark.parametrize("how", ["files", "bytes"])
def test_fill_then_reset_gives_the_space_back(agent_factory, how: str) -> None:
    a, c = start(agent_factory, "32M", "5000")
    ws0 = workspace(c, 0)
    cmd = MILLION_FILES if how == "files" else medium_files("chunks") + "; sleep 30"
    r = run(c, 0, cmd)
    assert_stopped(r)
    d = disk(c, 0)
    assert d["over"] is True, d
    if how == "files":
        assert d["inodes"] > 5000, d
    else:
        assert d["used"] > 32 * MiB, d
        assert count_tree(ws0 / "chunks") < 1024
    expect_error(c, "write_file", {"slot": 0, "path": "x", "data": b"x"}, "too_large", "budget")
    c.call("reset", {"slot": 0})

    def drained():
        d = disk(c, 0)
        return d if d["used"] < MiB and d["inodes"] < 50 and d["over"] is False else None
    wait_until(drained, 5, 0.1, "slot 0's usage to drop after reset")
    data = os.urandom(2 * MiB)
    c.call("write_file", {"slot": 0, "path": "w.bin", "data": data})
    assert ok(c, 0, "head -c 4M /dev/zero > f4 && stat -c %s f4 && sha256sum w.bin") == \
        f"4194304\n{hashlib.sha256(data).hexdigest()}  w.bin\n"
    assert disk(c, 0)["over"] is False


def test_over_budget_slot_may_remove_files(agent_factory) -> None:
    """A stopped slot keeps its lease and may clean up after itself: `rm` runs,
    the next count sees the space back, and writes go again."""
    a, c = start(agent_factory, "32M", "5000")
    c.call("lease", {"slot": 0, "trajectory_id": "t0"})
    r = run(c, 0, medium_files("chunks") + "; sleep 30")
    assert_stopped(r)
    s0 = c.call("slots", {"slot": 0})["slots"][0]
    assert s0["disk"]["over"] is True and s0["leased"] is True, s0
    assert s0["trajectory_id"] == "t0", s0
    r = run(c, 0, "rm -rf chunks && echo gone")
    assert r["exit_code"] == 0 and r["stdout"] == b"gone\n" and not r["disk_quota"], r

    def freed():
        d = disk(c, 0)
        return d if d["used"] < MiB and d["over"] is False else None
    wait_until(freed, 5, 0.1, "the removal to be counted")
    c.call("write_file", {"slot": 0, "path": "w.bin", "data": os.urandom(MiB)})
    assert ok(c, 0, "head -c 10M /dev/zero > ten && stat -c %s ten") == "10485760\n"


# -- 5. templates are never changed, and in overlay mode never charged

MODES = ["overlay", "overlay-uid", "copy"]


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def put(c: Client, name: str, data: bytes, chunk: int = 4 << 20) -> dict:
    off = 0
    while True:
        piece = data[off:off + chunk]
        done = off + len(piece) >= len(data)
        r = c.call("template_put", {"name": name, "data": piece, "offset": off, "done": done})
        off += len(piece)
        if done:
            return r["template"]


def layer_files(a, name: str) -> dict[str, str]:
    root = a.data_dir / "templates" / name / "layer"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("mode", MODES)
def test_templates_untouched_and_charged_only_in_copy_mode(agent_factory, tmpdir_short: Path,
                                                            mode: str) -> None:
    if mode == "overlay-uid":
        os.chmod(tmpdir_short, 0o755)
    copy = mode == "copy"
    a, c = start(agent_factory, "16M", "5000", extra=["--template-mode", "copy"] if copy else [])
    h = c.call("hello")
    assert h["templates"]["mode"] == ("copy" if copy else "overlay"), h["templates"]
    assert h["isolation"]["uid"] is (mode == "overlay-uid")
    # Overlay: a template twice the budget. Copy: half of it (it is charged).
    nblob, blob = (3, 10 * MiB) if not copy else (2, 4 * MiB)
    files = {"repo/a.txt": b"alpha\n", "repo/sub/b.txt": b"beta\n"}
    files.update({f"blob{i}.bin": os.urandom(blob) for i in range(nblob)})
    t = put(c, "tpl", make_tar(files))
    assert t["files"] >= len(files)
    before = layer_files(a, "tpl")
    assert len(before) == len(files)
    t_lease = time.monotonic()
    lr = c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "tpl"})
    assert lr["workspace_mode"] == ("copy" if copy else "overlay"), lr
    keep = c.call("exec", {"slot": 0, "cmd": "sleep 30", "detach": True})
    if copy:
        d = wait_until(lambda: (lambda d: d if d["used"] >= nblob * blob else None)(disk(c, 0)),
                       5, 0.05, "the copied template to be charged to slot 0")
    else:
        d = scanned_since(c, 0, t_lease)
        assert d["used"] < 4 * MiB and d["over"] is False, d
    c.call("cancel", {"exec_id": keep["exec_id"]})

    # Bytes: append to a template file and the slot's own changes.
    r = run(c, 0, "echo evil > repo/a.txt; rm repo/sub/b.txt; head -c 100M /dev/zero >> blob0.bin")
    assert r["exit_code"] != 0, r
    assert c.call("stat", {"slot": 0, "path": "blob0.bin"})["size"] <= 16 * MiB
    # Files: stopped by the watcher.
    ok(c, 0, "rm -f blob0.bin")
    r = run(c, 0, MILLION_FILES)
    assert_stopped(r)
    assert disk(c, 0)["over"] is True

    # The template is as it was, and a fresh lease on it sees the originals.
    assert layer_files(a, "tpl") == before
    c.call("lease", {"slot": 2, "trajectory_id": "t2", "template": "tpl"})
    for name, data in files.items():
        rf = c.call("read_file", {"slot": 2, "path": name, "sha256": True})
        assert rf["sha256"] == hashlib.sha256(data).hexdigest(), name
    lst = {t["name"]: t for t in c.call("template_list")["templates"]}
    assert "tpl" in lst and lst["tpl"]["files"] == t["files"], lst
    assert disk(c, 2)["over"] is False
    for s in (0, 2):
        c.call("reset", {"slot": s})
        c.call("unlease", {"slot": s})
    c.call("template_delete", {"name": "tpl"})


# -- 6. hostile layouts

HIDDEN = ("mkdir hid && cd hid && " + py_files(8000) + " && cd .. && chmod 000 hid && "
          "mkdir vis && cd vis && " + py_files(4000) + " && sleep 30")


def nested(depth: int, name: str, deep: int, visible: int) -> str:
    """A python script: `deep` files `depth` directories down, then `visible`
    files at the top, then a sleep that a stop cuts short."""
    return f"""
import os, time
for i in range({depth}):
    os.mkdir("{name}")
    os.chdir("{name}")
for i in range({deep}):
    os.close(os.open("f%d" % i, os.O_CREAT | os.O_WRONLY, 0o644))
os.chdir(os.environ["HOME"])
os.mkdir("vis")
for i in range({visible}):
    os.close(os.open("vis/f%d" % i, os.O_CREAT | os.O_WRONLY, 0o644))
time.sleep(30)
"""


def test_hidden_and_deep_files_are_counted(agent_factory, tmpdir_short: Path) -> None:
    # Slot users (not root) when the data dir is reachable by them.
    os.chmod(tmpdir_short, 0o755)
    a, c = start(agent_factory, "1G", "10000")
    ws0 = workspace(c, 0)
    try:
        # 8000 files behind a chmod 000 directory plus 4000 visible: over 10000
        # only when the hidden ones count.
        r = run(c, 0, HIDDEN, timeout=90)
        assert_stopped(r)
        assert disk(c, 0)["inodes"] > 10000, disk(c, 0)
        c.call("reset", {"slot": 0})
        # 7000 files 400 directories deep (a path of 4800 bytes: past
        # PATH_MAX) plus 3000 visible: over 10000 only when the deep ones count.
        c.call("write_file", {"slot": 0, "path": "deep.py",
                              "data": nested(400, "d" * 11, 7000, 3000).encode()})
        r = run(c, 0, "python3 deep.py", timeout=90)
        assert_stopped(r)
        assert disk(c, 0)["inodes"] > 10000, disk(c, 0)
        c.call("reset", {"slot": 0})
        # Nesting deeper than the agent counts (1500 levels) is stopped as such.
        c.call("write_file", {"slot": 0, "path": "deeper.py",
                              "data": nested(1500, "dd", 10, 10).encode()})
        r = run(c, 0, "python3 deeper.py", timeout=90)
        assert_stopped(r)
        assert disk(c, 0)["over"] is True, disk(c, 0)
        c.call("reset", {"slot": 0})
        wait_until(lambda: disk(c, 0)["inodes"] < 50, 5, 0.1, "the reset to be counted")
        assert [p.name for p in ws0.iterdir()] == []
    finally:
        # Python's rmtree (the fixture's) cannot take 1500 levels: leave none.
        subprocess.run(["rm", "-rf", "--", *map(str, ws0.iterdir())], check=False)


def test_symlinks_not_followed_hard_links_once(agent_factory) -> None:
    a, c = start(agent_factory, "64M", "10000")
    t0 = time.monotonic()
    # Symlinks to / and around would count far beyond both budgets if
    # followed; ten names of one 20 MiB file are 20 MiB, not 200.
    r = run(c, 0, "ln -s / root; ln -s /usr usr; ln -s .. up; ln -s /proc proc; mkdir d;"
                  " ln -s ../.. d/up2; ln -s . self; head -c 20M /dev/urandom > h0;"
                  " for i in $(seq 9); do ln h0 h$i; done; sleep 2; echo done", timeout=60)
    assert r["exit_code"] == 0 and r["stdout"] == b"done\n" and not r["disk_quota"], r
    d = scanned_since(c, 0, t0)
    assert d["over"] is False and d["inodes"] < 100, d
    assert 20 * MiB <= d["used"] < 30 * MiB, d
    assert c.call("stats")["disk_stops"] == 0


# -- 7. write_file beyond the budget

def test_write_file_over_budget_refused_without_leftovers(agent_factory) -> None:
    a, c = start(agent_factory, "16M", "20000")
    ws0 = workspace(c, 0)
    first = os.urandom(10 * MiB)
    c.call("write_file", {"slot": 0, "path": "a.bin", "data": first})
    more = os.urandom(10 * MiB)
    # A single write beyond the whole budget, in an empty slot.
    expect_error(c, "write_file", {"slot": 1, "path": "huge.bin", "data": bytes(20 * MiB)},
                 "too_large", "budget")
    assert sorted(p.name for p in workspace(c, 1).iterdir()) == []
    # 10 MiB more on top of 10 MiB: over 16 MiB, refused, nothing left.
    expect_error(c, "write_file", {"slot": 0, "path": "b.bin", "data": more}, "too_large",
                 "budget")
    expect_error(c, "write_file", {"slot": 0, "path": "a.bin", "data": more, "append": True},
                 "too_large", "budget")
    expect_error(c, "stat", {"slot": 0, "path": "b.bin"}, "not_found")
    rf = c.call("read_file", {"slot": 0, "path": "a.bin", "sha256": True})
    assert rf["size"] == 10 * MiB and rf["sha256"] == hashlib.sha256(first).hexdigest()
    assert sorted(p.name for p in ws0.iterdir()) == ["a.bin"]
    # What fits still goes.
    c.call("write_file", {"slot": 0, "path": "c.bin", "data": bytes(MiB)})
    assert sorted(p.name for p in ws0.iterdir()) == ["a.bin", "c.bin"]


# -- 8. detached execs, sessions, kept background processes

def test_detached_session_and_background_writers_stopped(agent_factory) -> None:
    a, c = start(agent_factory, "16M", "100000")
    ws0 = workspace(c, 0)

    # A detached exec: its result (through exec_attach) says disk_quota.
    d = c.call("exec", {"slot": 0, "cmd": medium_files("det") + "; sleep 30", "detach": True,
                        "timeout_ms": 120000})
    assert d["detached"] is True
    resp = c.call_stream("exec_attach", {"exec_id": d["exec_id"]}, timeout=90)[0]
    assert resp["ok"], resp
    assert_stopped(resp["result"])
    assert count_tree(ws0 / "det") < 1024
    assert running_none(c, 0)
    stops = disk(c, 0)["stops"]
    assert stops >= 1
    c.call("reset", {"slot": 0})
    wait_until(lambda: not disk(c, 0)["over"], 5, 0.1, "the reset to be counted")

    # A session: its command ends (the session is closed), nothing more is written.
    sid = c.call("session_open", {"slot": 0})["session"]
    r = c.call_raw("session_exec", {"session": sid, "cmd": medium_files("ses") + "; sleep 30",
                                    "timeout_ms": 90000}, timeout=120)
    if r["ok"]:
        assert r["result"]["exit_code"] != 0 and r["result"]["session_alive"] is False, r
    else:
        assert r["error"]["code"] == "cancelled", r
    assert count_tree(ws0 / "ses") < 1024
    sessions = c.call("slots", {"slot": 0})["slots"][0]["sessions"]
    assert all(not s["alive"] for s in sessions if s["session"] == sid), sessions
    assert disk(c, 0)["stops"] > stops
    stops = disk(c, 0)["stops"]
    c.call("reset", {"slot": 0})
    wait_until(lambda: not disk(c, 0)["over"], 5, 0.1, "the reset to be counted")

    # A background process kept after its command ended.
    r = run(c, 0, "(" + medium_files("bg") + "; sleep 30) >/dev/null 2>&1 &",
            keep_background=True)
    assert r["exit_code"] == 0, r
    wait_until(lambda: disk(c, 0)["stops"] > stops, 30, 0.1, "the kept writer to be stopped")
    n = count_tree(ws0 / "bg")
    time.sleep(1)
    assert count_tree(ws0 / "bg") == n < 1024
    assert c.call("health")["ok"] is True
    c.call("reset", {"slot": 0})
