"""exec and exec_attach against the real binary and PROTOCOL.md: cmd/argv, the
clean environment, stdin, cwd, exit codes and signals, byte-exact output,
bounded output, timeouts, containment of everything a command leaves behind,
streaming, detach/attach and commands outliving their connection."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Iterator

import pytest

from conftest import Agent
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from helpers import (EXEC_RESULT_KEYS, assert_contiguous, cwd_path, env_of, expect_error,
                     kill_marked, marker, pids_with_arg, stream_bytes, wait_gone, wait_running,
                     wait_until, workspace)
from slotwire import Client

WAIT_GO = "while [ ! -e go ]; do sleep 0.02; done"
CLEAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- basics and result fields

def test_exec_cmd_result_fields(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "echo hi; echo oops >&2; exit 3",
                             "timeout_ms": 10000})
    assert set(r) >= EXEC_RESULT_KEYS
    assert r["exit_code"] == 3 and r["signal"] == 0
    assert r["stdout"] == b"hi\n" and r["stderr"] == b"oops\n"
    assert isinstance(r["stdout"], bytes) and isinstance(r["stderr"], bytes)
    assert r["stdout_bytes"] == 3 and r["stderr_bytes"] == 5
    assert r["stdout_truncated"] is False and r["stderr_truncated"] is False
    assert r["timed_out"] is False and r["idle_timed_out"] is False
    assert r["cancelled"] is False
    assert isinstance(r["exec_id"], int) and isinstance(r["pid"], int) and r["pid"] > 0
    assert isinstance(r["duration_ms"], int) and 0 <= r["duration_ms"] < 10000
    assert r["network"] is True
    assert isinstance(r["isolation"], list) and "containment" in r["isolation"]
    avail = {k for k, v in client.call("hello")["isolation"].items() if v}
    assert set(r["isolation"]) <= avail
    r2 = client.call("exec", {"slot": 0, "cmd": "true", "network": False})
    assert r2["network"] is False and r2["exec_id"] != r["exec_id"]


def test_cmd_runs_under_bash(client: Client) -> None:
    if not os.path.exists("/bin/bash"):
        pytest.skip("no /bin/bash here")
    r = client.call("exec", {"slot": 0, "cmd": "echo ${BASH_VERSION:+bash}; [[ 1 == 1 ]] && "
                                                "echo double-brackets"})
    assert r["stdout"] == b"bash\ndouble-brackets\n"


def test_argv_is_not_shell_expanded_and_searched_in_path(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "argv": ["printf", "%s|", "a b", "$HOME", "*", "`id`"]})
    assert r["stdout"] == b"a b|$HOME|*|`id`|" and r["exit_code"] == 0
    r = client.call("exec", {"slot": 0, "argv": ["/bin/echo", "abs"]})
    assert r["stdout"] == b"abs\n"
    # a relative argv[0] with a slash is relative to the cwd (the workspace)
    ws = workspace(client, 0)
    (ws / "tool.sh").write_text("#!/bin/sh\necho tool \"$@\"\n")
    (ws / "tool.sh").chmod(0o755)
    assert client.call("exec", {"slot": 0, "argv": ["./tool.sh", "x"]})["stdout"] == b"tool x\n"


def test_missing_or_non_executable_program_is_not_found(client: Client) -> None:
    expect_error(client, "exec", {"slot": 0, "argv": ["no-such-program-7f3a"]}, "not_found")
    expect_error(client, "exec", {"slot": 0, "argv": ["/nonexistent/dir/prog"]}, "not_found")
    ws = workspace(client, 0)
    (ws / "plain").write_text("#!/bin/sh\necho should-not-run\n")
    (ws / "plain").chmod(0o644)
    expect_error(client, "exec", {"slot": 0, "argv": ["./plain"]}, "not_found")
    # a shell command that is not found is just exit status 127
    r = client.call("exec", {"slot": 0, "cmd": "no-such-program-7f3a"})
    assert r["exit_code"] == 127 and r["signal"] == 0


@pytest.mark.parametrize("cmd,code,sig", [
    ("true", 0, 0),
    ("exit 1", 1, 0),
    ("exit 255", 255, 0),
    ("kill -9 $$", 137, 9),
    ("kill -TERM $$", 143, 15),
    ("kill -SEGV $$", 139, 11),
])
def test_exit_codes_and_signals(client: Client, cmd: str, code: int, sig: int) -> None:
    r = client.call("exec", {"slot": 0, "cmd": cmd})
    assert (r["exit_code"], r["signal"]) == (code, sig)
    assert r["timed_out"] is False and r["cancelled"] is False


# -- environment

def test_clean_environment(agent_factory: AgentFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLOT_SECRET_TEST", "leaked-value-91")
    monkeypatch.setenv("LD_PRELOAD", "")
    a = agent_factory()
    c = a.client()
    r = c.call("exec", {"slot": 2, "argv": ["env", "-0"], "env": {"EXTRA_ONE": "1",
                                                                   "WITH SPACE": "a=b c"}})
    env = env_of(r["stdout"])
    ws = workspace(c, 2)
    assert "SLOT_SECRET_TEST" not in env
    assert b"leaked-value-91" not in r["stdout"]
    # paths as the command sees them: /workspace in a box, else the host path
    assert env["HOME"] == cwd_path(c, 2) == env["PWD"]
    assert env["SLOT_WORKSPACE"] == cwd_path(c, 2)
    assert env["SLOT_INDEX"] == "2"
    assert env["PATH"] == CLEAN_PATH
    assert env["LANG"] == "C.UTF-8" and env["TERM"] == "dumb"
    assert env["TMPDIR"] and env["TMPDIR"] != str(ws)
    assert env["EXTRA_ONE"] == "1" and env["WITH SPACE"] == "a=b c"
    allowed = {"PATH", "HOME", "TMPDIR", "LANG", "TERM", "SLOT_INDEX", "SLOT_WORKSPACE", "PWD",
               "EXTRA_ONE", "WITH SPACE"}
    # env(1) itself adds nothing; the shell is not involved with argv
    assert set(env) <= allowed, f"unexpected variables: {set(env) - allowed}"
    # TMPDIR exists, is writable and private to the slot
    r = c.call("exec", {"slot": 2, "cmd": 'test -d "$TMPDIR" && touch "$TMPDIR/x" && '
                                          'test -w "$TMPDIR" && echo ok'})
    assert r["stdout"] == b"ok\n"
    other = env_of(c.call("exec", {"slot": 3, "argv": ["env", "-0"]})["stdout"])
    assert other["HOME"] == cwd_path(c, 3)
    r = c.call("exec", {"slot": 3, "cmd": 'test -e "$TMPDIR/x" || echo private'})
    assert r["stdout"] == b"private\n"
    assert "EXTRA_ONE" not in other  # env is per request
    assert "leaked-value-91" not in a.log()


def test_pass_env_gives_commands_chosen_agent_variables(agent_factory: AgentFactory,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # What a Modal Secret or an image's ENV puts in the agent's environment.
    monkeypatch.setenv("HF_TOKEN", "hf-secret-1")
    monkeypatch.setenv("APP_MODE", "prod")
    monkeypatch.setenv("APP_LEVEL", "3")
    monkeypatch.setenv("OTHER_THING", "no")
    monkeypatch.setenv("SLOT_AGENT_TOKEN", "never")
    monkeypatch.setenv("PATH", "/opt/tool/bin:/usr/bin:/bin")
    a = agent_factory(extra=["--pass-env", "HF_TOKEN", "--pass-env", "APP_*",
                             "--pass-env", "PATH", "--pass-env", "SLOT_*"])
    c = a.client()
    r = c.call("exec", {"slot": 1, "argv": ["env", "-0"], "env": {"APP_LEVEL": "9"}})
    env = env_of(r["stdout"])
    assert env["HF_TOKEN"] == "hf-secret-1" and env["APP_MODE"] == "prod"
    assert env["APP_LEVEL"] == "9"  # the request wins
    assert "OTHER_THING" not in env and "SLOT_AGENT_TOKEN" not in env
    assert env["PATH"] == "/opt/tool/bin:/usr/bin:/bin"  # the image's PATH
    assert env["HOME"] == cwd_path(c, 1) and env["SLOT_INDEX"] == "1"  # never passed
    # "*" passes everything but the slot's own variables
    b = agent_factory(extra=["--pass-env", "*"])
    env = env_of(b.client().call("exec", {"slot": 0, "argv": ["env", "-0"]})["stdout"])
    assert env["OTHER_THING"] == "no" and "SLOT_AGENT_TOKEN" not in env
    assert env["HOME"] == cwd_path(b.client(), 0) == env["PWD"]  # not the agent's PWD


@pytest.mark.parametrize("bad", ["", "A=B", "A*B", "**"])
def test_pass_env_refuses_bad_patterns(tmp_path, bad: str) -> None:
    import subprocess
    from conftest import AGENT_BIN
    r = subprocess.run([str(AGENT_BIN), "--stdio", "--pass-env", bad], capture_output=True,
                       text=True, timeout=10, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--pass-env takes NAME, PREFIX* or *" in r.stderr


def test_env_overrides_defaults(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": 'echo "$LANG|$TERM"',
                             "env": {"LANG": "C", "TERM": "xterm"}})
    assert r["stdout"] == b"C|xterm\n"


def test_token_never_reaches_child_env(agent_factory: AgentFactory) -> None:
    token = "tok-" + os.urandom(8).hex()
    a = agent_factory(token=token)
    c = a.client()
    r = c.call("exec", {"slot": 0, "cmd": "env -0; cat /proc/self/environ; "
                                          "cat /proc/$PPID/environ 2>/dev/null; true"})
    assert token.encode() not in r["stdout"]
    assert not any(token in v for v in env_of(r["stdout"]).values())
    assert token not in a.log()


# -- stdin and cwd

def test_stdin_bytes(client: Client) -> None:
    data = os.urandom(300_000) + b"\0\xff\n"
    r = client.call("exec", {"slot": 0, "argv": ["sha256sum"], "stdin": data})
    assert r["stdout"].split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = client.call("exec", {"slot": 0, "argv": ["cat"], "stdin": b"\x00\x01binary\xfe"})
    assert r["stdout"] == b"\x00\x01binary\xfe"
    # str is accepted for byte fields
    r = client.call("exec", {"slot": 0, "argv": ["cat"], "stdin": "text in"})
    assert r["stdout"] == b"text in"
    r = client.call("exec", {"slot": 0, "argv": ["wc", "-c"], "stdin": b""})
    assert r["stdout"].strip() == b"0"


def test_bare_cat_without_stdin_does_not_hang(client: Client) -> None:
    t0 = time.monotonic()
    r = client.call("exec", {"slot": 0, "cmd": "cat; echo after", "timeout_ms": 20000},
                    timeout=25)
    assert r["stdout"] == b"after\n" and r["exit_code"] == 0 and r["timed_out"] is False
    assert time.monotonic() - t0 < 10
    r = client.call("exec", {"slot": 0, "cmd": "readlink /proc/self/fd/0"})
    assert r["stdout"] == b"/dev/null\n"


def test_cwd(client: Client) -> None:
    ws = workspace(client, 1)
    (ws / "sub" / "dir").mkdir(parents=True)
    seen = cwd_path(client, 1)  # /workspace in a box, else ws itself
    r = client.call("exec", {"slot": 1, "argv": ["pwd"], "cwd": "sub/dir"})
    assert r["stdout"] == f"{seen}/sub/dir\n".encode()
    r = client.call("exec", {"slot": 1, "argv": ["pwd"]})
    assert r["stdout"] == f"{seen}\n".encode()
    r = client.call("exec", {"slot": 1, "argv": ["pwd"], "cwd": "."})
    assert r["stdout"] == f"{seen}\n".encode()
    expect_error(client, "exec", {"slot": 1, "argv": ["pwd"], "cwd": "../.."}, "path_escape")
    expect_error(client, "exec", {"slot": 1, "argv": ["pwd"], "cwd": "/tmp"}, "path_escape")
    expect_error(client, "exec", {"slot": 1, "argv": ["pwd"], "cwd": "missing"}, "not_found")
    (ws / "out").symlink_to("/tmp")
    expect_error(client, "exec", {"slot": 1, "argv": ["pwd"], "cwd": "out"}, "path_escape")


# -- output

def test_1mib_random_binary_round_trip(client: Client) -> None:
    data = os.urandom(1 << 20)
    ws = workspace(client, 0)
    (ws / "blob").write_bytes(data)
    r = client.call("exec", {"slot": 0, "argv": ["head", "-c", "1048576", "blob"]})
    assert r["stdout_bytes"] == len(data) and r["stdout_truncated"] is False
    assert r["stdout"] == data
    r = client.call("exec", {"slot": 0, "cmd": "head -c 1048576 blob >&2"})
    assert r["stderr"] == data and r["stdout"] == b"" and r["stderr_truncated"] is False
    # and through stdin and back
    r = client.call("exec", {"slot": 0, "argv": ["cat"], "stdin": data})
    assert r["stdout"] == data


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_flood_bounded_by_max_output_keeps_head_and_tail(client: Client, stream: str) -> None:
    total = 30_000_000
    redir = "" if stream == "stdout" else " >&2"
    r = client.call("exec", {"slot": 0, "cmd": f"yes | head -c {total}{redir}",
                             "max_output": 4096}, timeout=60)
    assert r["exit_code"] == 0 and r["timed_out"] is False
    assert r[f"{stream}_truncated"] is True
    assert r[f"{stream}_bytes"] == total
    dropped = total - 4096
    expected = b"y\n" * 1024 + f"\n[... {dropped} bytes dropped ...]\n".encode() + b"y\n" * 1024
    assert r[stream] == expected
    other = "stderr" if stream == "stdout" else "stdout"
    assert r[other] == b"" and r[f"{other}_truncated"] is False


def test_max_output_distinguishes_head_and_tail(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "seq 1 100000", "max_output": 100})
    out = r["stdout"]
    total = sum(len(str(i)) + 1 for i in range(1, 100001))
    assert r["stdout_bytes"] == total and r["stdout_truncated"] is True
    full = "".join(f"{i}\n" for i in range(1, 100001)).encode()
    assert out == full[:50] + f"\n[... {total - 100} bytes dropped ...]\n".encode() + full[-50:]
    # output that fits exactly is not truncated
    r = client.call("exec", {"slot": 0, "cmd": "head -c 100 /dev/zero", "max_output": 100})
    assert r["stdout"] == b"\0" * 100 and r["stdout_truncated"] is False


def test_max_output_above_agent_maximum_is_refused(agent_factory: AgentFactory) -> None:
    a = agent_factory(extra=["--max-output", "65536"])
    c = a.client()
    expect_error(c, "exec", {"slot": 0, "cmd": "true", "max_output": 65537}, "bad_request",
                 "max_output")
    r = c.call("exec", {"slot": 0, "cmd": "head -c 200000 /dev/zero"})
    # the agent default applies
    assert r["stdout_truncated"] is True and r["stdout_bytes"] == 200000
    assert r["stdout"].startswith(b"\0" * 32768) and r["stdout"].endswith(b"\0" * 32768)
    assert len(r["stdout"]) < 65536 + 64


def test_yes_flood_stopped_by_timeout(client: Client) -> None:
    t0 = time.monotonic()
    r = client.call("exec", {"slot": 1, "argv": ["yes"], "timeout_ms": 500,
                             "max_output": 1000}, timeout=20)
    assert time.monotonic() - t0 < 10
    assert r["timed_out"] is True and r["cancelled"] is False
    assert r["signal"] != 0 and r["exit_code"] == 128 + r["signal"]
    assert r["stdout_truncated"] is True and r["stdout_bytes"] > 100_000
    assert r["stdout"].startswith(b"y\n" * 250) and r["stdout"].endswith(b"y\n" * 250)
    assert b"bytes dropped ...]\n" in r["stdout"]
    assert 400 <= r["duration_ms"] < 10000


def test_idle_timeout(client: Client) -> None:
    t0 = time.monotonic()
    r = client.call("exec", {"slot": 0, "cmd": "echo start; sleep 30",
                             "idle_timeout_ms": 300, "timeout_ms": 20000}, timeout=25)
    assert time.monotonic() - t0 < 10
    assert r["idle_timed_out"] is True and r["timed_out"] is False
    assert r["signal"] != 0 and r["stdout"] == b"start\n"
    # steady output keeps an idle timer from firing
    r = client.call("exec", {"slot": 0, "cmd": "for i in 1 2 3 4 5 6; do echo $i; "
                                                "sleep 0.1; done",
                             "idle_timeout_ms": 1500})
    assert r["idle_timed_out"] is False and r["exit_code"] == 0
    assert r["stdout"] == b"1\n2\n3\n4\n5\n6\n"


def test_timeout_zero_means_default(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "sleep 0.2; echo ok", "timeout_ms": 0})
    assert r["stdout"] == b"ok\n" and r["timed_out"] is False


# -- containment

LEFTOVERS = ("sleep {a} & setsid sleep {b} & "
             "(setsid bash -c 'trap \"\" TERM HUP INT; sleep {c}' </dev/null >/dev/null 2>&1 &) ; "
             "nohup sh -c 'sleep {d} & ' >/dev/null 2>&1 ;")


@pytest.fixture
def markers() -> Iterator[list[str]]:
    ms = [marker() for _ in range(4)]
    yield ms
    for m in ms:
        kill_marked(m)


def leftovers(ms: list[str]) -> str:
    return LEFTOVERS.format(a=ms[0], b=ms[1], c=ms[2], d=ms[3])


def started(ms: list[str]) -> bool:
    return all(pids_with_arg(m) for m in ms)


def assert_all_gone(ms: list[str]) -> None:
    survivors = {m: wait_gone(m) for m in ms}
    assert all(v == [] for v in survivors.values()), f"survivors: {survivors}"


def test_leftovers_die_when_command_ends(agent: Agent, markers: list[str]) -> None:
    c = agent.client()
    ws = workspace(c, 0)
    rid = c.send("exec", {"slot": 0, "timeout_ms": 20000,
                          "cmd": leftovers(markers) + f" {WAIT_GO}; echo ready"})
    try:
        wait_until(lambda: started(markers), 10, what="all leftovers started")
    finally:
        (ws / "go").touch()
    r = c.wait(rid, timeout=20)[0]["result"]
    assert r["stdout"] == b"ready\n" and r["exit_code"] == 0 and r["timed_out"] is False
    assert_all_gone(markers)


def test_leftovers_die_on_timeout(client: Client, markers: list[str]) -> None:
    rid = client.send("exec", {"slot": 1, "cmd": leftovers(markers) + " sleep 60",
                               "timeout_ms": 1500})
    wait_until(lambda: started(markers), 10, what="all leftovers started")
    r = client.wait(rid, timeout=30)[0]["result"]
    assert r["timed_out"] is True and r["cancelled"] is False
    assert_all_gone(markers)


def test_leftovers_die_on_cancel(agent: Agent, markers: list[str]) -> None:
    c, ctl = agent.client(), agent.client()
    rid = c.send("exec", {"slot": 2, "cmd": leftovers(markers) + " sleep 60"})
    wait_until(lambda: started(markers), 10, what="all leftovers started")
    eid = wait_running(ctl, 2)[0]
    assert ctl.call("cancel", {"exec_id": eid})["cancelled"] == 1
    assert c.wait(rid, timeout=10)[0]["result"]["cancelled"] is True
    assert_all_gone(markers)


def test_leftovers_die_on_reset(agent: Agent, markers: list[str]) -> None:
    c, ctl = agent.client(), agent.client()
    rid = c.send("exec", {"slot": 3, "cmd": leftovers(markers) + " sleep 60"})
    wait_until(lambda: started(markers), 10, what="all leftovers started")
    assert ctl.call("reset", {"slot": 3}, timeout=20)["killed"] >= 1
    assert c.wait(rid, timeout=10)[0]["result"]["cancelled"] is True
    assert_all_gone(markers)


def test_leftovers_of_detached_command_die_on_cancel(client: Client,
                                                     markers: list[str]) -> None:
    r = client.call("exec", {"slot": 0, "cmd": leftovers(markers) + " sleep 60",
                             "detach": True})
    wait_until(lambda: started(markers), 10, what="all leftovers started")
    assert client.call("cancel", {"exec_id": r["exec_id"]})["cancelled"] == 1
    assert_all_gone(markers)


# -- streaming

def test_stream_events(client: Client) -> None:
    resp, events = client.call_stream("exec", {
        "slot": 0, "stream": True,
        "cmd": "for i in $(seq 1 200); do echo line$i; echo err$i >&2; done; exit 4"})
    assert events and events[0]["event"] == "started"
    st = events[0]
    assert isinstance(st["exec_id"], int) and isinstance(st["pid"], int) and st["pid"] > 0
    assert all(e["id"] == st["id"] for e in events)
    assert [e for e in events[1:] if e["event"] == "started"] == []
    assert {e["event"] for e in events[1:]} <= {"stdout", "stderr"}
    out_end = assert_contiguous(events, "stdout")
    err_end = assert_contiguous(events, "stderr")
    assert stream_bytes(events) == b"".join(f"line{i}\n".encode() for i in range(1, 201))
    assert stream_bytes(events, "stderr") == b"".join(f"err{i}\n".encode()
                                                      for i in range(1, 201))
    r = resp["result"]
    assert r["exec_id"] == st["exec_id"] and r["pid"] == st["pid"]
    assert r["stdout"] == b"" and r["stderr"] == b""
    assert r["stdout_bytes"] == out_end and r["stderr_bytes"] == err_end
    assert r["exit_code"] == 4


def test_stream_large_binary_output_is_exact(client: Client) -> None:
    data = os.urandom(3 << 20)
    (workspace(client, 1) / "big").write_bytes(data)
    resp, events = client.call_stream("exec", {"slot": 1, "stream": True,
                                               "argv": ["cat", "big"]}, timeout=60)
    assert assert_contiguous(events, "stdout") == len(data)
    assert stream_bytes(events) == data
    assert resp["result"]["stdout_bytes"] == len(data) and resp["result"]["stdout"] == b""


def test_stream_arrives_live(client: Client) -> None:
    ws = workspace(client, 2)
    rid = client.send("exec", {"slot": 2, "stream": True, "timeout_ms": 20000,
                               "cmd": "echo first; while [ ! -e go ]; do sleep 0.02; done; "
                                      "echo second"})
    got: list[dict] = []
    while stream_bytes(got) != b"first\n":
        f = client.recv_frame(timeout=10)
        assert f is not None and f["id"] == rid and "event" in f, f
        got.append(f)
    (ws / "go").touch()
    resp, rest = client.wait(rid, timeout=10)
    events = got + rest
    assert stream_bytes(events) == b"first\nsecond\n"
    assert_contiguous(events, "stdout")
    assert resp["result"]["exit_code"] == 0


# -- detach and exec_attach

def test_detach_answers_at_once_and_frees_the_slot(client: Client) -> None:
    t0 = time.monotonic()
    r = client.call("exec", {"slot": 0, "cmd": f"echo a; {WAIT_GO}; echo b",
                             "detach": True, "timeout_ms": 20000})
    assert time.monotonic() - t0 < 5
    assert r["detached"] is True and isinstance(r["exec_id"], int) and r["pid"] > 0
    try:
        assert client.call("exec", {"slot": 0, "cmd": "echo free"})["stdout"] == b"free\n"
        assert r["exec_id"] in client.call("slots", {"slot": 0})["slots"][0]["running"]
    finally:
        (workspace(client, 0) / "go").touch()
    resp, events = client.call_stream("exec_attach", {"exec_id": r["exec_id"]}, timeout=20)
    assert stream_bytes(events) == b"a\nb\n"
    assert resp["result"]["exit_code"] == 0 and resp["result"]["exec_id"] == r["exec_id"]


def test_attach_replays_from_zero_and_from_offset_then_streams_live(agent: Agent) -> None:
    c = agent.client()
    r = c.call("exec", {"slot": 1, "detach": True, "timeout_ms": 20000,
                        "cmd": f"echo line1; echo line2; echo e1 >&2; {WAIT_GO}; echo line3"})
    eid = r["exec_id"]
    ws = workspace(c, 1)
    try:
        # wait until the first lines are out
        a = agent.client()
        rid = a.send("exec_attach", {"exec_id": eid})
        got: list[dict] = []
        while stream_bytes(got) != b"line1\nline2\n" or stream_bytes(got, "stderr") != b"e1\n":
            f = a.recv_frame(timeout=10)
            assert f is not None and "event" in f and f["id"] == rid, f
            got.append(f)
        assert got[0]["offset"] == 0
        # a second attacher from a later offset, on another connection
        b = agent.client()
        rid_b = b.send("exec_attach", {"exec_id": eid, "offset": 6, "stderr_offset": 3})
        got_b: list[dict] = []
        while stream_bytes(got_b) != b"line2\n":
            f = b.recv_frame(timeout=10)
            assert f is not None and "event" in f and f["id"] == rid_b, f
            got_b.append(f)
        assert got_b[0]["offset"] == 6
    finally:
        (ws / "go").touch()
    resp, rest = a.wait(rid, timeout=10)
    events = got + rest
    assert stream_bytes(events) == b"line1\nline2\nline3\n"
    assert assert_contiguous(events, "stdout") == 18
    assert resp["result"]["exit_code"] == 0 and resp["result"]["stdout"] == b""
    resp_b, rest_b = b.wait(rid_b, timeout=10)
    assert stream_bytes(got_b + rest_b) == b"line2\nline3\n"
    assert stream_bytes(got_b + rest_b, "stderr") == b""
    assert assert_contiguous(got_b + rest_b, "stdout", 6) == 18
    # after it finished: replay from 0 and from an offset
    _, ev = c.call_stream("exec_attach", {"exec_id": eid})
    assert stream_bytes(ev) == b"line1\nline2\nline3\n" and stream_bytes(ev, "stderr") == b"e1\n"
    _, ev = c.call_stream("exec_attach", {"exec_id": eid, "offset": 12})
    assert stream_bytes(ev) == b"line3\n" and ev[0]["offset"] == 12


def test_attach_to_truncated_output_shows_the_gap(client: Client) -> None:
    r = client.call("exec", {"slot": 2, "cmd": "head -c 100000 /dev/zero | tr '\\0' x",
                             "detach": True, "max_output": 1000})
    # Attached while running, output is streamed live in full; only what was
    # retained after the end is bounded by max_output.
    wait_until(lambda: client.call("slots", {"slot": 2})["slots"][0]["running"] == [],
               what="command finished")
    resp, events = client.call_stream("exec_attach", {"exec_id": r["exec_id"]}, timeout=20)
    out = [e for e in events if e["event"] == "stdout"]
    assert b"".join(e["data"] for e in out) == b"x" * 1000
    # merged, the events cover [0, 500) and [99500, 100000): the offsets show the gap
    ranges: list[list[int]] = []
    for e in out:
        lo, hi = e["offset"], e["offset"] + len(e["data"])
        if ranges and ranges[-1][1] == lo:
            ranges[-1][1] = hi
        else:
            ranges.append([lo, hi])
    assert ranges == [[0, 500], [99500, 100000]]
    assert resp["result"]["stdout_bytes"] == 100000
    assert resp["result"]["stdout_truncated"] is True


def test_attach_to_delivered_result_has_no_events(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "echo delivered; exit 6"})
    resp, events = client.call_stream("exec_attach", {"exec_id": r["exec_id"]})
    assert events == []
    assert resp["result"]["exit_code"] == 6 and resp["result"]["exec_id"] == r["exec_id"]
    assert resp["result"]["stdout"] == b""


def test_attach_unknown_exec_is_not_found(client: Client) -> None:
    expect_error(client, "exec_attach", {"exec_id": 4_000_000_000}, "not_found")


def test_command_survives_connection_close_and_attaches_from_new_connection(agent: Agent) -> None:
    c = agent.client()
    ws = workspace(c, 1)
    c.send("exec", {"slot": 1, "timeout_ms": 20000,
                    "cmd": f"echo before; {WAIT_GO}; echo after; exit 5"})
    ctl = agent.client()
    eid = wait_running(ctl, 1)[0]
    c.close()
    # the command is still running after its connection is gone
    assert eid in ctl.call("slots", {"slot": 1})["slots"][0]["running"]
    n = agent.client()
    aid = n.send("exec_attach", {"exec_id": eid})
    got: list[dict] = []
    while stream_bytes(got) != b"before\n":
        f = n.recv_frame(timeout=10)
        assert f is not None and "event" in f, f
        got.append(f)
    (ws / "go").touch()
    resp, rest = n.wait(aid, timeout=10)
    assert stream_bytes(got + rest) == b"before\nafter\n"
    assert resp["result"]["exit_code"] == 5
    # the result itself stays attachable
    resp, _ = ctl.call_stream("exec_attach", {"exec_id": eid})
    assert resp["result"]["exit_code"] == 5 and resp["result"]["exec_id"] == eid


def test_attach_while_a_box_starts_the_command_gets_its_first_output(
        agent_factory: AgentFactory) -> None:
    """Output a command writes before its box holder's answer is read waits
    for its pid; an exec_attach that came in meanwhile gets it too (it used
    to get only what came later). The window is narrow: try it many times,
    on the cold path, the one with the holder's answer."""
    a = agent_factory(slots=1, extra=["--no-warm"])
    for i in range(25):
        c, ctl, n = a.client(), a.client(), a.client()
        c.send("exec", {"slot": 0, "timeout_ms": 20000,
                        "cmd": f"echo before{i}; {WAIT_GO}; rm go"})
        eid = wait_running(ctl, 0)[0]
        aid = n.send("exec_attach", {"exec_id": eid})
        got: list[dict] = []
        while stream_bytes(got) != f"before{i}\n".encode():
            f = n.recv_frame(timeout=10)
            assert f is not None and "event" in f, (i, f)
            got.append(f)
        (workspace(ctl, 0) / "go").touch()
        resp, _ = n.wait(aid, timeout=10)
        assert resp["result"]["exit_code"] == 0
        c.wait(1, timeout=10)
        for x in (c, ctl, n):
            x.close()


def test_finished_command_of_lost_connection_is_retained(agent: Agent) -> None:
    c = agent.client()
    ctl = agent.client()
    c.send("exec", {"slot": 0, "cmd": "echo kept; echo kept-err >&2; sleep 0.3"})
    eid = wait_running(ctl, 0)[0]
    c.close()
    wait_until(lambda: ctl.call("slots", {"slot": 0})["slots"][0]["running"] == [],
               what="command finished")
    resp, ev = ctl.call_stream("exec_attach", {"exec_id": eid})
    assert stream_bytes(ev) == b"kept\n" and stream_bytes(ev, "stderr") == b"kept-err\n"
    assert resp["result"]["exit_code"] == 0 and resp["result"]["exec_id"] == eid


def test_started_comes_first_even_for_instant_output(client: Client) -> None:
    """A command that writes before its start is announced (through a
    namespace holder the pid comes later) still streams "started" first."""
    for i in range(30):
        resp, events = client.call_stream("exec", {"slot": i % 3, "stream": True,
                                                   "cmd": "echo e >&2; echo o"})
        assert events[0]["event"] == "started", events
        assert stream_bytes(events) == b"o\n" and stream_bytes(events, "stderr") == b"e\n"
