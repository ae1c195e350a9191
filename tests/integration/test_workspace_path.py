"""Commands see their slot's workspace at /workspace where the slot has a box
(its own mount namespace), whether or not the root filesystem has a
/workspace; hello, --probe, lease and slots say where commands see it, and
without a box that is the host path, which commands then really see."""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AGENT_BIN
from helpers import expect_error, workspace
from slotwire import Client

NOBODY = 65534


def run(c: Client, slot: int, cmd: str, **kw) -> dict:
    return c.call("exec", {"slot": slot, "cmd": cmd, **kw}, timeout=60)


@pytest.fixture
def boxed(agent_factory):
    a = agent_factory()
    c = a.client()
    h = c.call("hello")
    if not h["isolation"]["namespaces"]:
        pytest.skip("no namespaces here: " + h["isolation_detail"]["unavailable"]["namespaces"])
    return a, c


def test_exec_pwd_home_and_cwd_are_workspace(boxed) -> None:
    _, c = boxed
    r = run(c, 0, "pwd; echo $HOME; echo $PWD; echo $SLOT_WORKSPACE; /bin/pwd -P")
    assert r["exit_code"] == 0, r
    assert r["stdout"] == b"/workspace\n" * 5
    assert "namespaces" in r["isolation"]
    ws = workspace(c, 0)
    (ws / "sub" / "dir").mkdir(parents=True)
    r = c.call("exec", {"slot": 0, "argv": ["pwd"], "cwd": "sub/./dir/"})
    assert r["stdout"] == b"/workspace/sub/dir\n", r
    r = run(c, 0, "pwd; echo $PWD", cwd="sub/dir")
    assert r["stdout"] == b"/workspace/sub/dir\n" * 2, r
    # cwd stays relative to the workspace, and confined to it
    expect_error(c, "exec", {"slot": 0, "argv": ["pwd"], "cwd": "/workspace/sub"},
                 "path_escape")
    expect_error(c, "exec", {"slot": 0, "argv": ["pwd"], "cwd": "sub/../.."}, "path_escape")


def test_session_starts_in_workspace(boxed) -> None:
    _, c = boxed
    (workspace(c, 1) / "src").mkdir()
    for pty in (False, True):
        sid = c.call("session_open", {"slot": 1, "pty": pty})["session"]
        r = c.call("session_exec", {"session": sid, "cmd": "pwd; cd src && pwd; echo $HOME"})
        out = r["output" if pty else "stdout"].replace(b"\r\n", b"\n")
        assert out.endswith(b"/workspace\n/workspace/src\n/workspace\n"), r
        c.call("session_close", {"session": sid})
    sid = c.call("session_open", {"slot": 1, "cwd": "src"})["session"]
    r = c.call("session_exec", {"session": sid, "cmd": "pwd"})
    assert r["stdout"] == b"/workspace/src\n", r
    c.call("session_close", {"session": sid})


def test_files_written_at_workspace_are_the_slots(boxed) -> None:
    _, c = boxed
    r = run(c, 0, "echo zero > /workspace/x && mkdir -p d && echo deep > /workspace/d/y")
    assert r["exit_code"] == 0, r
    assert (workspace(c, 0) / "x").read_bytes() == b"zero\n"
    assert c.call("read_file", {"slot": 0, "path": "x"})["data"] == b"zero\n"
    assert c.call("read_file", {"slot": 0, "path": "d/y"})["data"] == b"deep\n"
    c.call("write_file", {"slot": 0, "path": "from-agent", "data": b"hi"})
    assert run(c, 0, "cat /workspace/from-agent")["stdout"] == b"hi"


def test_two_slots_see_their_own_workspace(boxed) -> None:
    _, c = boxed
    for s in (0, 1):
        assert run(c, s, f"echo slot{s} > /workspace/who")["exit_code"] == 0
    for s in (0, 1):
        assert run(c, s, "cat /workspace/who")["stdout"] == f"slot{s}\n".encode()
        assert c.call("read_file", {"slot": s, "path": "who"})["data"] == f"slot{s}\n".encode()
    # and no other slot's workspace is reachable by its host path
    other = workspace(c, 1)
    r = run(c, 0, f"cat {other}/who; echo planted > {other}/planted")
    assert r["exit_code"] != 0 and b"slot1" not in r["stdout"], r
    assert not (other / "planted").exists()


def test_writes_outside_the_slot_are_still_refused(boxed, tmpdir_short) -> None:
    _, c = boxed
    target = tmpdir_short / "escape"
    for cmd in (f"echo x > {target}", "echo x > /planted", "mkdir /workspace-2",
                "echo x > /etc/planted", "rm -rf /workspace 2>&1; rmdir /workspace"):
        r = run(c, 0, cmd)
        assert r["exit_code"] != 0, (cmd, r)
    assert not target.exists()
    assert not Path("/planted").exists() and not Path("/etc/planted").exists()
    assert not Path("/workspace-2").exists()
    # the workspace itself is intact and writable
    r = run(c, 0, "touch /workspace/ok && ls /workspace")
    assert r["exit_code"] == 0 and b"ok" in r["stdout"], r


def test_file_ops_stay_relative_and_confined(boxed) -> None:
    _, c = boxed
    c.call("write_file", {"slot": 0, "path": "f", "data": b"1"})
    expect_error(c, "read_file", {"slot": 0, "path": "/workspace/f"}, "path_escape")
    expect_error(c, "write_file", {"slot": 0, "path": "/workspace/g", "data": b"1"},
                 "path_escape")
    expect_error(c, "read_file", {"slot": 0, "path": "../1/work/f"}, "path_escape")
    # symlinks a command makes to /workspace paths resolve outside for the agent
    assert run(c, 0, "ln -s /workspace/f abs && ln -s ../.. up")["exit_code"] == 0
    assert run(c, 0, "cat abs")["stdout"] == b"1"
    expect_error(c, "read_file", {"slot": 0, "path": "abs"}, "path_escape")
    expect_error(c, "read_file", {"slot": 0, "path": "up/slots/0/work/f"}, "path_escape")
    expect_error(c, "list", {"slot": 0, "path": "up"}, "path_escape")


def test_hello_lease_and_slots_report_what_commands_see(boxed) -> None:
    a, c = boxed
    h = c.call("hello")
    assert h["workspace_view"] == "/workspace"
    s = c.call("slots")["slots"]
    assert [x["cwd_path"] for x in s] == ["/workspace"] * 4
    assert [x["workspace"] for x in s] == [str(a.data_dir.resolve() / "slots" / str(i) / "work")
                                           for i in range(4)]
    r = c.call("lease", {"slot": 2, "trajectory_id": "t"})
    assert r["cwd_path"] == "/workspace"
    assert run(c, 2, "pwd")["stdout"] == f"{r['cwd_path']}\n".encode()


def test_probe_reports_workspace_view(tmpdir_short) -> None:
    out = subprocess.run([str(AGENT_BIN), "--probe", "--json"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    d = json.loads(out)
    if d["rungs"]["namespaces"]["available"]:
        assert d["workspace_view"] == "/workspace" and d["namespaces"]["workspace"] is True
    data = tmpdir_short / "d"
    out = subprocess.run([str(AGENT_BIN), "--probe", "--json", "--without", "namespaces",
                          "--data-dir", str(data)], capture_output=True, text=True, timeout=20,
                         check=True).stdout
    assert json.loads(out)["workspace_view"] == f"{data}/slots/{{slot}}/work"
    human = subprocess.run([str(AGENT_BIN), "--probe"], capture_output=True, text=True,
                           timeout=20, check=True).stdout
    assert "commands see their workspace at" in human


def test_a_data_dir_under_workspace_is_never_bound_over(tmpdir_short) -> None:
    """Binding the slot's workspace over /workspace would put a data dir
    below it (the slot's tmp, the box's passwd copies) within the slot's
    reach: such an agent shows commands the host path instead."""
    out = subprocess.run([str(AGENT_BIN), "--probe", "--json", "--data-dir", "/workspace/d"],
                         capture_output=True, text=True, timeout=20, check=True).stdout
    d = json.loads(out)
    assert d["workspace_view"] == "/workspace/d/slots/{slot}/work"
    assert d["namespaces"]["workspace"] is False
    human = subprocess.run([str(AGENT_BIN), "--probe", "--data-dir", "/workspace/d"],
                           capture_output=True, text=True, timeout=20, check=True).stdout
    if d["rungs"]["namespaces"]["available"]:
        assert "the data dir is under /workspace" in human, human


def test_without_a_box_commands_see_the_host_path(agent_factory) -> None:
    a = agent_factory(extra=["--without", "namespaces"])
    c = a.client()
    h = c.call("hello")
    assert h["isolation"]["namespaces"] is False
    assert h["workspace_view"] == f"{a.data_dir.resolve()}/slots/{{slot}}/work"
    for s in c.call("slots")["slots"]:
        assert s["cwd_path"] == s["workspace"]
        r = run(c, s["slot"], "pwd; echo $HOME; echo $PWD")
        assert r["stdout"] == f"{s['cwd_path']}\n".encode() * 3, r
        assert "namespaces" not in r["isolation"]
    lease = c.call("lease", {"slot": 1, "trajectory_id": "t"})
    assert lease["cwd_path"] == str(workspace(c, 1))
    (workspace(c, 1) / "sub").mkdir()
    r = run(c, 1, "pwd; echo $PWD", cwd="./sub")
    assert r["stdout"] == f"{lease['cwd_path']}/sub\n".encode() * 2, r


def _wait_socket(sock: Path, p: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while not sock.exists():
        assert p.poll() is None and time.monotonic() < deadline, p.stderr.read()
        time.sleep(0.02)


def test_unprivileged_box_builds_workspace_without_touching_the_host(tmpdir_short) -> None:
    """As nobody (as under Apptainer) the box has no right to create /workspace
    in the root filesystem: it gets a root of its own that has one; the host's
    / is left as it was."""
    had_workspace = os.path.lexists("/workspace")
    os.chown(tmpdir_short, NOBODY, NOBODY)
    sock, data = tmpdir_short / "a.sock", tmpdir_short / "data"
    p = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          "--inh-caps=-all", "--bounding-set=-all", str(AGENT_BIN), "--listen",
                          f"unix:{sock}", "--slots", "2", "--data-dir", str(data)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, p)
        c = Client.unix(str(sock))
        h = c.call("hello")
        if not h["isolation"]["namespaces"]:
            pytest.skip("no user namespaces here: "
                        + h["isolation_detail"]["unavailable"]["namespaces"])
        assert h["isolation_detail"]["user_namespace"] is True
        assert h["workspace_view"] == "/workspace"
        for s in (0, 1):
            r = run(c, s, "pwd; echo s$SLOT_INDEX > /workspace/f; cat f; ls / | grep -c .; "
                          "test -r /etc/passwd && test -x /bin/sh && echo sys-ok")
            out = r["stdout"].split(b"\n")
            assert r["exit_code"] == 0 and out[0] == b"/workspace", r
            assert out[1] == f"s{s}".encode() and int(out[2]) > 5 and out[3] == b"sys-ok", r
            assert c.call("read_file", {"slot": s, "path": "f"})["data"] == f"s{s}\n".encode()
        # the built root is read-only, and writes outside the slot are refused
        r = run(c, 0, "touch /planted || mkdir /planted2 || exit 7")
        assert r["exit_code"] == 7, r
        # the slot's tmp is still its own (a data dir under /tmp keeps /tmp shared)
        r = run(c, 0, 'echo t > "$TMPDIR/t" && cat "$TMPDIR/t"')
        assert r["exit_code"] == 0 and r["stdout"] == b"t\n", r
        sid = c.call("session_open", {"slot": 1})["session"]
        assert c.call("session_exec", {"session": sid, "cmd": "pwd"})["stdout"] == \
            b"/workspace\n"
        c.close()
    finally:
        p.terminate()
        assert p.wait(10) == 0
    assert os.path.lexists("/workspace") == had_workspace


def test_box_tmp_is_the_slots_own_at_tmp(tmpdir_short) -> None:
    """With the data dir outside /tmp the box binds the slot's tmp on /tmp:
    TMPDIR is /tmp there too, and no host path shows in the environment."""
    import shutil
    import tempfile
    base = Path(tempfile.mkdtemp(prefix="slt-ws-", dir="/var/tmp"))
    sock, data = tmpdir_short / "a.sock", base / "data"
    p = subprocess.Popen([str(AGENT_BIN), "--listen", f"unix:{sock}", "--slots", "2",
                          "--data-dir", str(data)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_socket(sock, p)
        c = Client.unix(str(sock))
        if not c.call("hello")["isolation"]["namespaces"]:
            pytest.skip("no namespaces here")
        for s in (0, 1):
            r = run(c, s, f"echo t{s} > /tmp/t && cat /tmp/t && env")
            assert r["exit_code"] == 0 and r["stdout"].startswith(f"t{s}\n".encode()), r
            env = dict(ln.split("=", 1) for ln in r["stdout"].decode().splitlines()[1:]
                       if "=" in ln)
            assert env["TMPDIR"] == "/tmp" and env["HOME"] == "/workspace", env
            assert str(data) not in r["stdout"].decode()
            tmp = Path(c.call("slots", {"slot": s})["slots"][0]["workspace"]).parent / "tmp"
            assert (tmp / "t").read_text() == f"t{s}\n"
        c.close()
    finally:
        p.terminate()
        assert p.wait(10) == 0
        shutil.rmtree(base, ignore_errors=True)
