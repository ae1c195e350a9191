"""Templates against the real agent: template_put (chunked tar / tar.gz),
lease and reset on a template, template_from_slot, template_list and
template_delete, fork, layer flattening, and a restart. Each test runs in
three workspace modes: overlay with the agent's own user, overlay with a
user per slot (idmapped layers), and copy."""
from __future__ import annotations

import io
import time
import os
import tarfile
from pathlib import Path

import pytest

from helpers import expect_error

# overlay-fs: each slot on a filesystem of its own (--disk-mode fs, root):
# its layer cannot be renamed out of it, so freezing copies. The others
# count disk use instead (--disk-mode watch) and freeze by renaming.
MODES = ["overlay", "overlay-uid", "copy", "overlay-fs"]


def mode_args(mode: str) -> list[str]:
    return (["--template-mode", "copy"] if mode == "copy" else []) + \
        ["--disk-mode", "fs" if mode == "overlay-fs" else "watch"]


def freezes_by_copy(mode: str) -> bool:
    """A quiet slot's layer becomes a template by a copy, not a rename."""
    return mode in ("copy", "overlay-fs")


def make_tar(files: dict[str, bytes | None], gz: bool = False,
             links: dict[str, str] | None = None) -> bytes:
    """files: name -> content (None: a directory)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            if data is None:
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
                tf.addfile(ti)
            else:
                ti.size = len(data)
                ti.mode = 0o755 if name.endswith(".sh") else 0o644
                tf.addfile(ti, io.BytesIO(data))
        for name, target in (links or {}).items():
            ti = tarfile.TarInfo(name)
            ti.type = tarfile.SYMTYPE
            ti.linkname = target
            tf.addfile(ti)
    return buf.getvalue()


def put(c, name: str, data: bytes, chunk: int = 1 << 20, **extra) -> dict:
    off = 0
    while True:
        piece = data[off:off + chunk]
        done = off + len(piece) >= len(data)
        r = c.call("template_put", {"name": name, "data": piece, "offset": off, "done": done,
                                    **extra})
        off += len(piece)
        if done:
            return r
        assert r == {"name": name, "received": off, "done": False}


def sh(c, slot: int, cmd: str) -> str:
    r = c.call("exec", {"slot": slot, "cmd": cmd})
    assert r["exit_code"] == 0, (cmd, r["stdout"], r["stderr"])
    return r["stdout"].decode()


REPO = {"repo/": None, "repo/a.txt": b"alpha\n", "repo/sub/b.txt": b"beta\n",
        "repo/run.sh": b"#!/bin/sh\necho ran\n", "top.txt": b"top\n"}


@pytest.fixture(params=MODES)
def mode(request) -> str:
    return request.param


@pytest.fixture
def tagent(mode: str, agent_factory, tmpdir_short: Path):
    if mode == "overlay-uid":
        # The slot user rung needs every directory above the data dir
        # searchable by others.
        os.chmod(tmpdir_short, 0o755)
    a = agent_factory(slots=4, extra=mode_args(mode))
    c = a.client()
    h = c.call("hello")
    assert h["disk_quota"]["mechanism"] == ("fs" if mode == "overlay-fs" else "watch")
    want = "copy" if mode == "copy" else "overlay"
    assert h["templates"]["mode"] == want, h["templates"]
    assert h["isolation"]["uid"] is (mode == "overlay-uid")
    yield a, c
    c.close()


def layer_files(a, name: str) -> dict[str, bytes]:
    root = a.data_dir / "templates" / name / "layer"
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


def test_put_lease_and_isolation_between_slots(tagent, mode: str) -> None:
    a, c = tagent
    r = put(c, "base", make_tar(REPO, gz=True, links={"link": "repo/a.txt"}), chunk=100)
    assert r["done"] is True and r["template"]["name"] == "base"
    assert r["template"]["files"] >= 6 and r["template"]["layers"] == 1
    before = layer_files(a, "base")
    l0 = c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    l1 = c.call("lease", {"slot": 1, "trajectory_id": "t1", "template": "base"})
    want = "copy" if mode == "copy" else "overlay"
    for lr in (l0, l1):
        assert lr["template"] == "base" and lr["workspace_mode"] == want
        assert lr["prepare_ms"] >= 0
    assert sh(c, 0, "cat repo/a.txt repo/sub/b.txt; ./repo/run.sh; readlink link") == \
        "alpha\nbeta\nran\nrepo/a.txt\n"
    # The slot owns what it sees and can change everything.
    sh(c, 0, "echo changed > repo/a.txt; rm top.txt; rm -r repo/sub; chmod 600 repo/run.sh;"
             " mkdir -p new/deep && echo n > new/deep/f")
    c.call("write_file", {"slot": 0, "path": "repo/w.txt", "data": b"via write_file"})
    assert c.call("read_file", {"slot": 0, "path": "repo/a.txt"})["data"] == b"changed\n"
    # The other slot and the template are untouched.
    assert sh(c, 1, "cat repo/a.txt top.txt repo/sub/b.txt") == "alpha\ntop\nbeta\n"
    assert not c.call("list", {"slot": 1, "path": "repo"})["entries"] == []
    assert layer_files(a, "base") == before
    slots = c.call("slots")["slots"]
    assert slots[0]["template"] == "base" and slots[0]["workspace_mode"] == want
    assert slots[2]["template"] is None and slots[2]["workspace_mode"] == "plain"
    lst = c.call("template_list")["templates"]
    assert [t["name"] for t in lst] == ["base"] and lst[0]["in_use"] == 2


def test_reset_to_template_and_to_empty(tagent) -> None:
    a, c = tagent
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    sh(c, 0, "echo dirty > repo/a.txt; echo x > extra; (sleep 600 &)")
    r = c.call("reset", {"slot": 0, "template": "base"})
    assert r["template"] == "base"
    assert sh(c, 0, "cat repo/a.txt; ls") == "alpha\nrepo\ntop.txt\n"
    r = c.call("reset", {"slot": 0})
    assert r["template"] is None and r["workspace_mode"] == "plain"
    assert sh(c, 0, "ls -A | wc -l").strip() == "0"
    assert c.call("template_list")["templates"][0]["in_use"] == 0
    # Nothing of the earlier mounts is left under the data dir.
    ov = a.data_dir / "overlay" / "0"
    assert not ov.exists() or [p.name for p in ov.iterdir() if p.name != "state"] == []


def test_from_slot_layers_deletions_and_delete(tagent, mode: str) -> None:
    a, c = tagent
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    sh(c, 0, "echo v2 > repo/a.txt; rm top.txt; rm -r repo/sub; mkdir repo/sub;"
             " echo fresh > repo/sub/c.txt; echo added > added.txt")
    r = c.call("template_from_slot", {"slot": 0, "name": "v2"})
    t = r["template"]
    assert t["name"] == "v2"
    assert t["base"] == ("base" if mode != "copy" else None)
    c.call("lease", {"slot": 1, "trajectory_id": "t1", "template": "v2"})
    assert sh(c, 1, "cat repo/a.txt added.txt; ls; ls repo/sub") == \
        "v2\nadded\nadded.txt\nrepo\nc.txt\n"
    expect_error(c, "template_from_slot", {"slot": 1, "name": "v2"}, "exists")
    expect_error(c, "template_delete", {"name": "v2"}, "slot_busy", "in use")
    if mode != "copy":
        expect_error(c, "template_delete", {"name": "base"}, "slot_busy", "in use")
    # A quiet overlay slot gave its own layer (no copy) and stands on it now.
    s0 = c.call("slots", {"slot": 0})["slots"][0]
    assert s0["template"] == ("base" if freezes_by_copy(mode) else "v2"), s0
    assert sh(c, 0, "cat repo/a.txt; ls") == "v2\nadded.txt\nrepo\n"
    c.call("reset", {"slot": 1})
    c.call("reset", {"slot": 0, "template": "base"})
    c.call("template_delete", {"name": "v2"})
    assert not (a.data_dir / "templates" / "v2").exists()
    expect_error(c, "template_delete", {"name": "v2"}, "not_found")
    expect_error(c, "lease", {"slot": 2, "trajectory_id": "x", "template": "v2"}, "not_found")
    c.call("reset", {"slot": 0})
    c.call("template_delete", {"name": "base"})
    assert c.call("template_list")["templates"] == []


def test_fork_is_independent(tagent, mode: str) -> None:
    a, c = tagent
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    sh(c, 0, "echo mid > repo/a.txt; rm top.txt; echo only0 > f0")
    c.call("lease", {"slot": 1, "trajectory_id": "t1"})
    sh(c, 1, "echo old > stale; (sleep 600 &)")
    r = c.call("fork", {"slot": 0, "to_slot": 1})
    assert r["slot"] == 0 and r["to_slot"] == 1 and r["flattened"] is False
    assert r["workspace_mode"] == ("copy" if mode == "copy" else "overlay")
    assert sh(c, 1, "cat repo/a.txt f0; ls") == "mid\nonly0\nf0\nrepo\n"
    sh(c, 0, "echo after > repo/a.txt")
    sh(c, 1, "echo branch > repo/a.txt; echo b > only1")
    assert sh(c, 0, "cat repo/a.txt; ls") == "after\nf0\nrepo\n"
    assert sh(c, 1, "cat repo/a.txt") == "branch\n"
    expect_error(c, "fork", {"slot": 0, "to_slot": 0}, "bad_request")
    expect_error(c, "fork", {"slot": 0, "to_slot": 9}, "unknown_slot")
    # In overlay mode the source's own changes were frozen in place (no
    # copy): both now stand on that layer, which goes once neither does.
    s0 = c.call("slots", {"slot": 0})["slots"][0]
    assert s0["template"] == ("base" if freezes_by_copy(mode) else "(fork)"), s0
    c.call("reset", {"slot": 1})
    c.call("reset", {"slot": 0})
    assert not [p for p in (a.data_dir / "templates").iterdir() if p.name.startswith(".fork")]


def test_fork_of_a_slot_with_processes_copies(tagent, mode: str) -> None:
    """A source with something still running keeps its mount: its changes
    are copied into the frozen layer instead, and the process lives on."""
    a, c = tagent
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    sh(c, 0, "echo mine > repo/a.txt")
    d = c.call("exec", {"slot": 0, "cmd": "sleep 30; echo late > late.txt", "detach": True})
    c.call("lease", {"slot": 1, "trajectory_id": "t1"})
    r = c.call("fork", {"slot": 0, "to_slot": 1})
    assert r["flattened"] is False
    assert sh(c, 1, "cat repo/a.txt") == "mine\n"
    s0 = c.call("slots", {"slot": 0})["slots"][0]
    assert s0["template"] == "base" and s0["running"] == [d["exec_id"]], s0
    assert sh(c, 0, "cat repo/a.txt") == "mine\n"
    c.call("cancel", {"exec_id": d["exec_id"]})


def test_fork_chain_is_flattened_past_max_depth(agent_factory) -> None:
    a = agent_factory(slots=4, extra=["--template-max-depth", "3"])
    c = a.client()
    if c.call("hello")["templates"]["mode"] != "overlay":
        pytest.fail("overlay mode is unavailable here: " + str(c.call("hello")["templates"]))
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    flattened = []
    src = 0
    for i in range(5):
        dst = (src + 1) % 4
        sh(c, src, f"echo {i} >> repo/a.txt; rm -f gen{i - 1}; echo {i} > gen{i}")
        r = c.call("fork", {"slot": src, "to_slot": dst})
        flattened.append(r["flattened"])
        src = dst
    assert flattened == [False, False, True, False, False], flattened
    assert sh(c, src, "cat repo/a.txt; ls") == "alpha\n0\n1\n2\n3\n4\ngen4\nrepo\ntop.txt\n"
    c.close()


def test_put_validation_and_hostile_archives(tagent) -> None:
    a, c = tagent
    expect_error(c, "template_put", {"name": ".hidden", "data": b""}, "bad_request")
    expect_error(c, "template_put", {"name": "a/b", "data": b""}, "bad_request")
    expect_error(c, "template_put", {"name": "x" * 129, "data": b""}, "bad_request")
    expect_error(c, "template_put", {"name": "t", "data": b"", "offset": 5}, "not_found")
    expect_error(c, "template_put", {"name": "t", "data": b"", "format": "zip"}, "bad_request")
    data = make_tar(REPO)
    c.call("template_put", {"name": "t", "data": data[:1000], "offset": 0})
    expect_error(c, "template_put", {"name": "t", "data": data[1000:], "offset": 999},
                 "bad_request", "expected 1000")
    c.call("template_put", {"name": "t", "data": data[1000:], "offset": 1000, "done": True})
    expect_error(c, "template_put", {"name": "t", "data": data, "done": True}, "exists")
    through_link = io.BytesIO()
    with tarfile.open(fileobj=through_link, mode="w") as tf:
        ti = tarfile.TarInfo("evil")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/etc"
        tf.addfile(ti)
        ti = tarfile.TarInfo("evil/pwn")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))
    for bad in (make_tar({"../escape": b"x"}), make_tar({"/abs": b"x"}),
                through_link.getvalue(), data[:700]):
        r = c.call_raw("template_put", {"name": "bad", "data": bad, "done": True})
        assert r["ok"] is False and r["error"]["code"] == "bad_request", r
    names = [t["name"] for t in c.call("template_list")["templates"]]
    assert names == ["t"]
    assert not [p for p in (a.data_dir / "templates").iterdir() if p.name.startswith(".")]
    assert not Path("/escape").exists() and not Path("/etc/pwn").exists()
    expect_error(c, "template_put", {"name": "u", "data": b"", "base": "nope", "done": True},
                 "not_found")
    # A layer over a base: the base's files with the archive's on top.
    put(c, "over", make_tar({"repo/a.txt": b"over\n", "more.txt": b"m\n"}), base="t")
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "over"})
    assert sh(c, 0, "cat repo/a.txt repo/sub/b.txt more.txt") == "over\nbeta\nm\n"


def test_templates_and_workspaces_survive_a_restart(mode: str, agent_factory,
                                                    tmpdir_short: Path) -> None:
    if mode == "overlay-uid":
        os.chmod(tmpdir_short, 0o755)
    extra = mode_args(mode)
    a = agent_factory(slots=2, extra=extra)
    c = a.client()
    put(c, "base", make_tar(REPO))
    c.call("lease", {"slot": 0, "trajectory_id": "t0", "template": "base"})
    sh(c, 0, "echo kept > repo/a.txt")
    c.close()
    assert a.stop() == 0
    from conftest import Agent
    b = Agent(a.dir, slots=2, extra=extra)
    try:
        c = b.client()
        assert [t["name"] for t in c.call("template_list")["templates"]] == ["base"]
        s0 = c.call("slots")["slots"][0]
        assert s0["template"] == "base"
        assert sh(c, 0, "cat repo/a.txt top.txt") == "kept\ntop\n"
        expect_error(c, "template_delete", {"name": "base"}, "slot_busy")
        c.close()
    finally:
        b.stop()


def test_build_runs_once_and_failures_leave_nothing(tagent, mode: str) -> None:
    a, c = tagent
    put(c, "base", make_tar(REPO))
    script = ("set -e; test \"$(cat repo/a.txt)\" = alpha; echo built > built.txt;"
              " rm top.txt; echo \"$MARK\" > mark; sleep 0.5; echo out; echo err >&2")
    ids = [c.send("template_build", {"name": "env1", "base": "base", "script": script,
                                     "env": {"MARK": f"m{i}"}}) for i in range(3)]
    answers = [c.wait(i)[0] for i in ids]
    for r in answers:
        assert r["ok"] is True, r
    res = [r["result"] for r in answers]
    assert [x["built"] for x in res] == [True, True, True]
    # One build: the waiters got its answer, its output and its env.
    assert len({x["exec"]["exec_id"] for x in res}) == 1
    assert res[0]["exec"]["exit_code"] == 0 and res[0]["exec"]["stdout"] == b"out\n"
    t = res[0]["template"]
    assert t["name"] == "env1" and t["base"] == (None if mode == "copy" else "base")
    assert t["build_ms"] >= 500
    # The build's own layer became the template: nothing was copied (on a
    # filesystem of its own, it was).
    assert ("frozen in place as 'env1'" in a.log()) is (mode != "overlay-fs"), a.log()[-2000:]
    again = c.call("template_build", {"name": "env1", "script": "exit 1"})
    assert again["built"] is True and again["cached"] is True and again["exec"] is None
    # The borrowed slot is free and empty again.
    for s in c.call("slots")["slots"]:
        assert s["leased"] is False and s["template"] is None, s
    c.call("lease", {"slot": 3, "trajectory_id": "t", "template": "env1"})
    assert sh(c, 3, "cat built.txt mark repo/a.txt; ls") == \
        "built\nm0\nalpha\nbuilt.txt\nmark\nrepo\n"
    # A failing build: its answer carries the exit code and output; no template.
    r = c.call("template_build", {"name": "broken", "script": "echo half > f; echo boom; exit 3"})
    assert r["built"] is False and r["template"] is None
    assert r["exec"]["exit_code"] == 3 and r["exec"]["stdout"] == b"boom\n"
    r = c.call("template_build", {"name": "slow", "script": "sleep 30", "timeout_ms": 300})
    assert r["built"] is False and r["exec"]["timed_out"] is True
    names = sorted(t["name"] for t in c.call("template_list")["templates"])
    assert names == ["base", "env1"]
    assert not [p for p in (a.data_dir / "templates").iterdir() if p.name.startswith(".")]
    expect_error(c, "template_build", {"name": "x", "base": "nope", "script": "true"},
                 "not_found")
    expect_error(c, "template_build", {"name": "x", "script": "true", "detach": True},
                 "bad_request")


def test_build_needs_a_free_slot(agent_factory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    c.call("lease", {"slot": 0, "trajectory_id": "busy"})
    expect_error(c, "template_build", {"name": "x", "script": "true"}, "no_capacity", "free slot")
    c.call("unlease", {"slot": 0})
    assert c.call("template_build", {"name": "x", "script": "echo hi > f"})["built"] is True
    c.close()


def test_share_is_read_only_in_every_box(agent_factory, tmpdir_short: Path) -> None:
    host = tmpdir_short / "cache"
    (host / "pkgs").mkdir(parents=True)
    (host / "pkgs" / "wheel.txt").write_text("cached\n")
    # The mount point must exist in the image: /mnt does on Debian.
    a = agent_factory(slots=2, extra=["--share", f"{host}:/mnt"])
    c = a.client()
    h = c.call("hello")
    assert h["shares"] == [{"host": str(host), "path": "/mnt", "available": True, "why": None}]
    for slot in (0, 1):
        assert sh(c, slot, "cat /mnt/pkgs/wheel.txt") == "cached\n"
        r = c.call("exec", {"slot": slot, "cmd": "echo x > /mnt/pkgs/evil; touch /mnt/new"})
        assert r["exit_code"] != 0 and b"Read-only file system" in r["stderr"], r
    assert sorted(os.listdir(host / "pkgs")) == ["wheel.txt"]
    c.close()
    # Without a box there is nowhere to show it: said so, and not shown.
    b = agent_factory(slots=1, extra=["--share", f"{host}:/mnt", "--without", "namespaces"])
    c = b.client()
    sh_ = c.call("hello")["shares"][0]
    assert sh_["available"] is False and sh_["why"], sh_
    r = c.call("exec", {"slot": 0, "cmd": "cat /mnt/pkgs/wheel.txt"})
    assert r["exit_code"] != 0
    c.close()


def test_share_arguments_are_checked(tmpdir_short: Path) -> None:
    import subprocess
    from conftest import AGENT_BIN
    for spec, why in [("relative:/mnt", "absolute"), (f"{tmpdir_short}/nope:/mnt", "directory"),
                      (f"{tmpdir_short}:/no/such/dir", "existing directory"),
                      (f"{tmpdir_short}:/tmp", "existing directory")]:
        r = subprocess.run([str(AGENT_BIN), "--stdio", "--data-dir", str(tmpdir_short / "d"),
                            "--share", spec], capture_output=True, text=True, timeout=10)
        assert r.returncode == 2 and why in r.stderr, (spec, r.stderr)


def test_probe_says_how_slots_stand_on_templates(tmpdir_short: Path) -> None:
    import json
    import subprocess
    from conftest import AGENT_BIN
    for extra, mode in (([], "overlay"), (["--template-mode", "copy"], "copy")):
        r = subprocess.run([str(AGENT_BIN), "--probe", "--json", "--data-dir",
                            str(tmpdir_short / "d"), *extra], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["templates"]["mode"] == mode, r.stdout
        human = subprocess.run([str(AGENT_BIN), "--probe", "--data-dir", str(tmpdir_short / "d"),
                                *extra], capture_output=True, text=True, timeout=30).stdout
        assert f"templates: a slot stands on one as {'an overlay' if mode == 'overlay' else 'a copy'}" \
            in human, human
    # The probe leaves nothing of its own behind.
    assert [p.name for p in (tmpdir_short / "d" / "overlay").iterdir()] == []


def test_copy_mode_copies_without_holding_up_other_slots(agent_factory) -> None:
    """A copy is done by a worker process: while slot 0's workspace is being
    copied from a large template, slot 1's commands are answered."""
    a = agent_factory(slots=2, extra=["--template-mode", "copy"])
    c = a.client(timeout=120)
    chunk = os.urandom(1 << 20)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(3):
            ti = tarfile.TarInfo(f"blob{i}")
            ti.size = 100 << 20
            tf.addfile(ti, io.BytesIO(chunk * 100))
    put(c, "big", buf.getvalue(), chunk=8 << 20)
    del buf
    lease = c.send("lease", {"slot": 0, "trajectory_id": "t", "template": "big"})
    quick = c.send("exec", {"slot": 1, "cmd": "echo hi"})
    order = []
    while len(order) < 2:
        f = c.recv_frame(timeout=120)
        assert f is not None
        if "event" not in f:
            order.append(f["id"])
            if f["id"] == lease:
                assert f["ok"] is True and f["result"]["workspace_mode"] == "copy", f
    assert order == [quick, lease], order
    assert sh(c, 0, "ls; stat -c %s blob2") == "blob0\nblob1\nblob2\n" + str(100 << 20) + "\n"
    # Nothing of the worker is left (the sweep did not take it for a stray).
    assert c.call("slots", {"slot": 0})["slots"][0]["template"] == "big"
    c.close()


def test_agentctl_templates_against_one_agent(agent_factory) -> None:
    import json
    import subprocess
    from conftest import AGENTCTL_BIN
    a = agent_factory(slots=2)
    c = a.client()
    put(c, "base", make_tar(REPO))
    put(c, "over", make_tar({"x": b"y"}), base="base")
    c.call("lease", {"slot": 0, "trajectory_id": "t", "template": "over"})
    r = subprocess.run([str(AGENTCTL_BIN), "--agent", f"unix:{a.sock}", "templates"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["TEMPLATE", "BASE", "SIZE", "FILES", "IN-USE", "BUILD"], lines
    rows = {ln.split()[0]: ln.split() for ln in lines[1:]}  # SIZE is "24 KiB": count from the end
    assert rows["over"][1] == "base" and rows["over"][-2] == "1", rows
    assert rows["base"][1] == "-" and rows["base"][-2] == "1", rows  # "over" builds on it
    assert rows["base"][-3] == "6", rows
    j = subprocess.run([str(AGENTCTL_BIN), "--agent", f"unix:{a.sock}", "--json", "templates"],
                       capture_output=True, text=True, timeout=30)
    assert j.returncode == 0, j.stderr
    assert sorted(t["name"] for t in json.loads(j.stdout)["templates"]) == ["base", "over"]
    c.close()


def test_review_cases_leave_no_slot_stuck(agent_factory) -> None:
    """Races and failures found in review: a build whose command never
    starts gives its slot back; a put of a name being built is refused; a
    lease whose workspace cannot be laid out is no lease; a second fork into
    a slot whose copy still runs keeps the slot resetting until it is done;
    a reset waiting at shutdown does not touch freed templates."""
    a = agent_factory(slots=3, extra=["--template-mode", "copy"])
    c = a.client(timeout=120)
    # A build cancelled before its script starts.
    b = c.send("template_build", {"name": "bx", "slot": 0, "script": "sleep 1; echo hi > f"})
    c.send("reset", {"slot": 0})
    r = c.wait(b)[0]
    if r["ok"]:
        assert r["result"]["built"] is False, r
    s0 = c.call("slots", {"slot": 0})["slots"][0]
    assert s0["leased"] is False and s0["state"] == "idle", s0
    assert c.call("template_build", {"name": "bx", "script": "echo ok > f"})["built"] is True
    # A put of a name being built.
    b = c.send("template_build", {"name": "slow", "script": "sleep 1; echo x > f"})
    time.sleep(0.2)
    expect_error(c, "template_put", {"name": "slow", "data": make_tar(REPO), "done": True},
                 "slot_busy", "being built")
    assert c.wait(b)[0]["result"]["built"] is True
    # A template too deep to copy: the lease fails and leaves no lease.
    deep = "/".join(["d"] * 205) + "/f"
    put(c, "deep", make_tar({deep: b"x"}))
    r = c.call_raw("lease", {"slot": 1, "trajectory_id": "A", "template": "deep"})
    assert r["ok"] is False, r
    assert c.call("slots", {"slot": 1})["slots"][0]["leased"] is False
    c.call("lease", {"slot": 1, "trajectory_id": "B"})
    # Two forks of a big slot into the same target: an exec on the target
    # sent after the first answer runs after the second fork, on a full copy.
    sh(c, 2, "mkdir t && cd t && seq 1 20000 | xargs touch")
    f1 = c.send("fork", {"slot": 2, "to_slot": 1})
    f2 = c.send("fork", {"slot": 2, "to_slot": 1})
    assert c.wait(f1)[0]["ok"] is True
    ex = c.send("exec", {"slot": 1, "cmd": "ls t | wc -l"})
    assert c.wait(f2)[0]["ok"] is True
    r = c.wait(ex)[0]
    assert r["ok"] is True and r["result"]["stdout"] == b"20000\n", r
    # Shut down with a reset waiting behind a copy (ASan: no use after free).
    c.send("fork", {"slot": 2, "to_slot": 0})
    c.send("reset", {"slot": 0, "template": "bx"})
    time.sleep(0.05)
    c.close()
    assert a.stop() == 0


def test_copies_keep_holes(agent_factory) -> None:
    """A sparse file stays sparse through a copy-mode fork and a template
    made from it (no gigabytes of zeros from one `truncate`)."""
    a = agent_factory(slots=2, extra=["--template-mode", "copy"])
    c = a.client(timeout=120)
    sh(c, 0, "truncate -s 1G sparse; printf data > mixed; truncate -s 64M mixed;"
             " echo tail >> mixed")
    c.call("fork", {"slot": 0, "to_slot": 1})
    out = sh(c, 1, "du -k sparse mixed | cut -f1; stat -c %s sparse mixed; tail -c 5 mixed")
    du_sparse, du_mixed, size_sparse, size_mixed, tail = out.split("\n")[:5]
    assert int(du_sparse) < 1024 and int(du_mixed) < 1024, out
    assert int(size_sparse) == 1 << 30 and int(size_mixed) == (64 << 20) + 5, out
    assert tail == "tail", out
    t = c.call("template_from_slot", {"slot": 1, "name": "sp"})["template"]
    assert t["size"] < 1 << 20, t
    c.close()
