"""Sessions: persistent shells in slots (session_open, session_exec,
session_write, session_read, session_resize, session_signal, session_close),
against the real agent: state that persists, interrupting without losing the
session, terminals, bounds, reset, hostile input, isolation and leaks."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from helpers import expect_error, marker, pids_with_arg, wait_until
from slotwire import Client


def sopen(c: Client, slot: int = 0, **kw) -> int:
    return c.call("session_open", {"slot": slot, **kw})["session"]


def sx(c: Client, sid: int, cmd: str, timeout_ms: int = 10000, **kw) -> dict:
    return c.call("session_exec", {"session": sid, "cmd": cmd, "timeout_ms": timeout_ms, **kw},
                  timeout=60)


def read_until(c: Client, sid: int, want: bytes, timeout: float = 10.0) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while want not in out:
        assert time.monotonic() < deadline, f"no {want!r} in {out!r}"
        r = c.call("session_read", {"session": sid, "wait_ms": 500})
        out += r["data"]
        assert not r["eof"], out
    return out


def sx_when_ready(c: Client, sid: int, cmd: str) -> dict:
    """session_exec once the shell is back at its prompt after session_write input."""
    deadline = time.monotonic() + 10
    while True:
        r = c.call_raw("session_exec", {"session": sid, "cmd": cmd, "timeout_ms": 10000})
        if r["ok"] or r["error"]["code"] != "slot_busy" or time.monotonic() > deadline:
            assert r["ok"], r
            return r["result"]
        time.sleep(0.05)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sessions_of(c: Client, slot: int) -> list[dict]:
    return c.call("slots", {"slot": slot})["slots"][0]["sessions"]


@pytest.mark.parametrize("pty", [False, True])
def test_state_persists_across_session_exec(client, pty) -> None:
    sid = sopen(client, pty=pty)
    r = sx(client, sid, "mkdir -p proj/venv/bin && cd proj && export GREETING=hello && "
                        "greet() { echo \"$GREETING $1\"; }")
    assert r["exit_code"] == 0 and not r["timed_out"], r
    # a virtualenv-like activate script, sourced
    sx(client, sid, "printf 'export VIRTUAL_ENV=$PWD/venv\\nexport PATH=$VIRTUAL_ENV/bin:$PATH\\n"
                    "deactivate() { unset VIRTUAL_ENV; }\\n' > venv/bin/activate && "
                    "printf '#!/bin/sh\\necho from-venv\\n' > venv/bin/tool && chmod +x venv/bin/tool")
    sx(client, sid, "source venv/bin/activate")
    r = sx(client, sid, "pwd; greet world; tool; echo $VIRTUAL_ENV; x=42")
    out = r["output" if pty else "stdout"].replace(b"\r\n", b"\n")
    assert b"/proj\n" in out and b"hello world\n" in out and b"from-venv\n" in out, out
    assert b"/proj/venv\n" in out
    r = sx(client, sid, "deactivate; echo \"[$VIRTUAL_ENV] $x\"")
    assert b"[] 42" in r["output" if pty else "stdout"]


def test_exit_codes_and_streams(client) -> None:
    sid = sopen(client)
    r = sx(client, sid, "echo out; echo err >&2; (exit 3)")
    assert (r["exit_code"], r["stdout"], r["stderr"]) == (3, b"out\n", b"err\n")
    assert r["session_alive"] and not r["timed_out"] and r["stdout_bytes"] == 4
    assert sx(client, sid, "false")["exit_code"] == 1
    assert sx(client, sid, "echo $?")["stdout"] == b"1\n"  # $? survives the marker
    assert sx(client, sid, "no-such-command-xyz")["exit_code"] == 127
    r = sx(client, sid, "if then fi '")  # a syntax error, not a shell waiting for more
    assert r["exit_code"] == 2 and b"syntax error" in r["stderr"], r
    assert sx(client, sid, "true")["exit_code"] == 0
    # no trailing newline, quotes, and text that looks like the marker
    r = sx(client, sid, "printf 'a'\"'\"'b'; printf '\\033]6973;0000000000000000;0\\007'")
    assert r["stdout"] == b"a'b\x1b]6973;0000000000000000;0\x07" and r["exit_code"] == 0
    # a multi-line command with a heredoc
    r = sx(client, sid, "cat <<EOF\nline1\nline2\nEOF\necho done")
    assert r["stdout"] == b"line1\nline2\ndone\n"


def test_exit_ends_the_session(client) -> None:
    sid = sopen(client)
    r = sx(client, sid, "echo bye; exit 5")
    assert r["exit_code"] == 5 and not r["session_alive"] and r["stdout"] == b"bye\n"
    r = client.call("session_read", {"session": sid, "wait_ms": 1000})
    assert r["eof"] and not r["alive"]
    expect_error(client, "session_exec", {"session": sid, "cmd": "true"}, "bad_request")
    expect_error(client, "session_write", {"session": sid, "data": b"x"}, "bad_request")
    assert [s["alive"] for s in sessions_of(client, 0)] == [False]
    client.call("session_close", {"session": sid})
    assert sessions_of(client, 0) == []


@pytest.mark.parametrize("pty", [False, True])
def test_timeout_interrupts_and_keeps_the_session(client, pty) -> None:
    sid = sopen(client, pty=pty)
    sx(client, sid, "cd /usr && v=kept")
    m = marker()
    t0 = time.monotonic()
    r = sx(client, sid, f"sleep 100 {m}; echo not-reached", timeout_ms=500)
    assert r["timed_out"] and r["exit_code"] == 130 and r["session_alive"], r
    assert time.monotonic() - t0 < 5
    # `echo not-reached` never ran: no line of output is its word (a
    # terminal echoes the command line itself, once or, when the input
    # came before readline took the terminal, twice)
    lines = r["output" if pty else "stdout"].replace(b"\r", b"").split(b"\n")
    assert b"not-reached" not in lines, r
    assert all(b"not-reached" not in ln or b"echo not-reached" in ln for ln in lines), r
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    r = sx(client, sid, "pwd; echo $v")
    out = r["output" if pty else "stdout"].replace(b"\r\n", b"\n")
    assert b"/usr\nkept\n" in out and r["exit_code"] == 0 and not r["timed_out"]
    # a loop of builtins in the shell itself is interrupted too
    r = sx(client, sid, "while :; do :; done", timeout_ms=300)
    assert r["timed_out"] and r["session_alive"]
    # a program that ignores SIGINT is killed after the grace period
    m = marker()
    r = sx(client, sid, f"python3 -c 'import signal,time; signal.signal(signal.SIGINT, "
                        f"signal.SIG_IGN); time.sleep(100)' {m}", timeout_ms=300)
    assert r["timed_out"] and r["session_alive"], r
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    assert b"kept" in sx(client, sid, "echo $v")["output" if pty else "stdout"]


def test_background_job_survives_a_timeout(client) -> None:
    sid = sopen(client)
    m = marker()
    sx(client, sid, f"sleep 300 {m} &")
    wait_until(lambda: pids_with_arg(m), timeout=5)
    # the foreground ignores SIGINT: SIGKILL after the grace period, for it alone
    f = marker()
    r = sx(client, sid, "python3 -c 'import signal,time; signal.signal(signal.SIGINT, "
                        f"signal.SIG_IGN); time.sleep(100)' {f}", timeout_ms=300)
    assert r["timed_out"] and r["exit_code"] == 137 and r["session_alive"], r
    assert not pids_with_arg(f)
    assert pids_with_arg(m), "a background job is not the foreground"
    client.call("session_close", {"session": sid})
    wait_until(lambda: not pids_with_arg(m), timeout=5)


def test_stdin_reading_commands_do_not_hang(client) -> None:
    # without a terminal, stdin is /dev/null as for exec
    sid = sopen(client)
    t0 = time.monotonic()
    r = sx(client, sid, "cat; read x; echo \"[$x]\"", timeout_ms=5000)
    assert not r["timed_out"] and r["stdout"] == b"[]\n" and time.monotonic() - t0 < 4
    assert sx(client, sid, "echo next")["stdout"] == b"next\n"
    # with a terminal they wait for input: the timeout takes them back
    p = sopen(client, slot=1, pty=True)
    r = sx(client, p, "cat", timeout_ms=400)
    assert r["timed_out"] and r["session_alive"]
    r = sx(client, p, "read x", timeout_ms=400)
    assert r["timed_out"] and r["session_alive"]
    assert b"next" in sx(client, p, "echo next")["output"]


def test_python_repl_in_a_pty(client) -> None:
    sid = sopen(client, pty=True)
    read_until(client, sid, b"$ ")
    client.call("session_write", {"session": sid, "data": b"python3 -q\n"})
    read_until(client, sid, b">>> ")
    client.call("session_write", {"session": sid, "data": b"x = 6 * 7\n"})
    read_until(client, sid, b">>> ")
    client.call("session_write", {"session": sid, "data": b"print(x, 'answer')\n"})
    assert b"42 answer" in read_until(client, sid, b"42 answer")
    # ^C is a key: KeyboardInterrupt in the REPL, which lives on
    client.call("session_write", {"session": sid, "data": b"import time; time.sleep(100)\n"})
    time.sleep(0.3)
    client.call("session_write", {"session": sid, "data": b"\x03"})
    read_until(client, sid, b"KeyboardInterrupt")
    client.call("session_write", {"session": sid, "data": b"exit()\n"})
    read_until(client, sid, b"$ ")
    assert sx(client, sid, "echo back")["exit_code"] == 0


def test_python_repl_without_a_pty(client) -> None:
    sid = sopen(client)
    client.call("session_write", {"session": sid, "data": b"python3 -u -i -q\n"})
    time.sleep(0.5)
    client.call("session_write", {"session": sid, "data": b"print(6 * 7)\n"})
    read_until(client, sid, b"42")
    client.call("session_write", {"session": sid, "data": b"exit()\n"})
    assert sx_when_ready(client, sid, "echo shell")["stdout"] == b"shell\n"


def test_resize_is_seen_by_stty(client) -> None:
    sid = sopen(client, pty=True, cols=100, rows=30)
    assert b"30 100" in sx(client, sid, "stty size")["output"]
    r = client.call("session_resize", {"session": sid, "cols": 132, "rows": 43})
    assert r == {"cols": 132, "rows": 43}
    assert b"43 132" in sx(client, sid, "stty size")["output"]
    # a running program gets SIGWINCH
    client.call("session_write", {"session": sid, "data":
                b"trap 'echo winch $(stty size)' WINCH; sleep 5 & wait\n"})
    time.sleep(0.5)
    client.call("session_resize", {"session": sid, "cols": 90, "rows": 20})
    read_until(client, sid, b"winch 20 90")
    client.call("session_signal", {"session": sid, "signal": "INT"})


def test_one_mib_through_a_session(client) -> None:
    sid = sopen(client)
    r = sx(client, sid, "yes abcdefghijklmno | head -c 1048576", timeout_ms=30000)
    assert r["stdout_bytes"] == 1 << 20 and len(r["stdout"]) == 1 << 20
    assert not r["stdout_truncated"] and r["stdout"][:16] == b"abcdefghijklmno\n"
    # beyond max_output: head + tail, like exec
    r = sx(client, sid, "yes abcdefghijklmno | head -c 3145728; echo END", timeout_ms=30000,
           max_output=65536)
    assert r["stdout_truncated"] and r["stdout_bytes"] == 3 * (1 << 20) + 4
    assert b"bytes dropped" in r["stdout"] and r["stdout"].endswith(b"END\n")
    p = sopen(client, slot=1, pty=True)
    r = sx(client, p, "yes abcdefghijklmno | head -c 1048576; echo", timeout_ms=30000)
    # the terminal turns each \n into \r\n: a little over max_output
    assert r["output_bytes"] >= 65536 * 17 and r["output_truncated"]
    assert r["output"].count(b"abcdefghijklmno\r\n") >= 60000
    assert sx(client, sid, "echo ok")["stdout"] == b"ok\n"


def test_many_sessions_across_slots(agent_factory) -> None:
    a = agent_factory(slots=8)
    c = a.client(timeout=120)
    sids = {}
    for slot in range(8):
        for i in range(4):
            sids[(slot, i)] = sopen(c, slot, pty=(i % 2 == 1))
    ids = {k: c.send("session_exec", {"session": s, "cmd": f"sleep 0.2; echo {k[0]}-$SLOT_INDEX-{k[1]}",
                                      "timeout_ms": 30000}) for k, s in sids.items()}
    for k, rid in ids.items():
        r, _ = c.wait(rid, timeout=60)
        assert r["ok"], r
        out = r["result"].get("stdout") or r["result"]["output"]
        assert f"{k[0]}-{k[0]}-{k[1]}".encode() in out
    assert sum(len(s["sessions"]) for s in c.call("slots")["slots"]) == 32


def test_reset_while_a_session_runs(client, agent) -> None:
    sid = sopen(client, 2)
    p = sopen(client, 2, pty=True)
    m = marker()
    rid = client.send("session_exec", {"session": sid, "cmd": f"sleep 100 {m} & sleep 100 {m}"})
    wait_until(lambda: len(pids_with_arg(m)) == 2, timeout=5)
    shells = [s["pid"] for s in sessions_of(client, 2)]
    r = client.call("reset", {"slot": 2})
    assert r["killed"] >= 2
    resp, _ = client.wait(rid, timeout=10)
    assert not resp["ok"] and resp["error"]["code"] == "cancelled"
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    for pid in shells:
        wait_until(lambda: not os.path.exists(f"/proc/{pid}") or
                   open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] == "Z", timeout=5)
    assert sessions_of(client, 2) == []
    for s in (sid, p):
        expect_error(client, "session_exec", {"session": s, "cmd": "true"}, "not_found")
    assert client.call("exec", {"slot": 2, "cmd": "echo ok"})["stdout"] == b"ok\n"
    assert sx(client, sopen(client, 2), "echo again")["stdout"] == b"again\n"


def test_unlease_closes_the_slots_sessions(client) -> None:
    """Sessions belong to the lease: the next holder of the slot must not
    find the last trajectory's shell."""
    client.call("lease", {"slot": 3, "trajectory_id": "traj-a"})
    sid = sopen(client, 3)
    m = marker()
    assert sx(client, sid, f"cd /tmp && export MINE=1 && (sleep 100 {m} &) && echo started")[
        "stdout"] == b"started\n"
    wait_until(lambda: len(pids_with_arg(m)) == 1, timeout=5)
    shell = sessions_of(client, 3)[0]["pid"]
    other = sopen(client, 1)
    client.call("unlease", {"slot": 3, "trajectory_id": "traj-a"})
    expect_error(client, "session_exec", {"session": sid, "cmd": "true"}, "not_found")
    assert sessions_of(client, 3) == []
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    wait_until(lambda: not os.path.exists(f"/proc/{shell}") or
               open(f"/proc/{shell}/stat").read().split(")")[1].split()[0] == "Z", timeout=5)
    # Another slot's session is untouched; the next lease starts afresh.
    assert sx(client, other, "echo still")["stdout"] == b"still\n"
    client.call("lease", {"slot": 3, "trajectory_id": "traj-b"})
    fresh = sopen(client, 3)
    assert fresh != sid
    assert sx(client, fresh, "echo ${MINE:-unset}")["stdout"] == b"unset\n"
    client.call("unlease", {"slot": 3})


def test_session_limit_per_slot(agent_factory) -> None:
    a = agent_factory(extra=["--max-sessions", "2"])
    c = a.client()
    s1, _ = sopen(c, 0), sopen(c, 0, pty=True)
    expect_error(c, "session_open", {"slot": 0}, "no_capacity")
    sopen(c, 1)  # per slot
    c.call("session_close", {"session": s1})
    sopen(c, 0)


def test_session_buffer_drops_oldest_first(agent_factory) -> None:
    a = agent_factory(extra=["--session-buffer", "4096"])
    c = a.client()
    sid = sopen(c)
    c.call("session_write", {"session": sid,
                             "data": b"head -c 100000 /dev/zero | tr '\\0' a; echo END\n"})
    time.sleep(1.0)
    r = c.call("session_read", {"session": sid, "max_bytes": 1 << 20})
    assert len(r["data"]) == 4096 and r["data"].endswith(b"aaaEND\n"), r["data"][-20:]
    assert r["dropped"] == 100004 - 4096
    r = c.call("session_read", {"session": sid})
    assert r["data"] == b"" and r["dropped"] == 0 and not r["eof"]


def test_read_long_poll_and_max_bytes(client) -> None:
    sid = sopen(client)
    t0 = time.monotonic()
    r = client.call("session_read", {"session": sid, "wait_ms": 300})
    assert r["data"] == b"" and time.monotonic() - t0 >= 0.25
    rid = client.send("session_read", {"session": sid, "wait_ms": 10000, "max_bytes": 3})
    time.sleep(0.2)
    client.call("session_write", {"session": sid, "data": b"echo hello\n"})
    resp, _ = client.wait(rid, timeout=10)
    assert resp["ok"] and resp["result"]["data"] == b"hel"
    assert read_until(client, sid, b"lo\n") == b"lo\n"


def test_a_waiting_read_of_a_lost_connection_does_not_block(client, agent) -> None:
    sid = sopen(client)
    other = agent.client()
    other.send("session_read", {"session": sid, "wait_ms": 600000})
    time.sleep(0.2)
    expect_error(client, "session_read", {"session": sid, "wait_ms": 100}, "slot_busy")
    other.close()
    time.sleep(0.2)
    rid = client.send("session_read", {"session": sid, "wait_ms": 10000})
    client.call("session_write", {"session": sid, "data": b"echo mine\n"})
    resp, _ = client.wait(rid, timeout=10)
    assert resp["ok"] and resp["result"]["data"] == b"mine\n", resp


def test_signal_and_close(client) -> None:
    sid = sopen(client)
    rid = client.send("session_exec", {"session": sid, "cmd": "sleep 100", "timeout_ms": 60000})
    time.sleep(0.3)
    r = client.call("session_signal", {"session": sid, "signal": "SIGTERM"})
    assert r["signal"] == 15 and r["signalled"] == 1
    resp, _ = client.wait(rid, timeout=10)
    assert resp["result"]["exit_code"] == 143 and resp["result"]["session_alive"]
    p = sopen(client, pty=True)
    client.call("session_write", {"session": p, "data": b"sleep 100\n"})
    time.sleep(0.3)
    r = client.call("session_signal", {"session": p, "signal": 2})
    assert r["signalled"] == 1 and r["pgid"] != sessions_of(client, 0)[0]["pid"]
    assert b"ok" in sx_when_ready(client, p, "echo ok")["output"]
    m = marker()
    sx(client, p, f"sleep 300 {m} &")
    wait_until(lambda: pids_with_arg(m), timeout=5)
    r = client.call("session_close", {"session": p})
    assert r["killed"] >= 2
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    expect_error(client, "session_close", {"session": p}, "not_found")


def test_hostile_inputs(client) -> None:
    sid = sopen(client)
    p = sopen(client, pty=True)
    bad = [
        ("session_exec", {"session": 999999, "cmd": "true"}, "not_found"),
        ("session_read", {"session": 999999}, "not_found"),
        ("session_write", {"session": 999999, "data": b"x"}, "not_found"),
        ("session_resize", {"session": 999999, "cols": 1, "rows": 1}, "not_found"),
        ("session_signal", {"session": 999999, "signal": "INT"}, "not_found"),
        ("session_close", {"session": 999999}, "not_found"),
        ("session_exec", {"session": "1", "cmd": "true"}, "bad_request"),
        ("session_exec", {"session": sid}, "bad_request"),
        ("session_exec", {"session": sid, "cmd": 5}, "bad_request"),
        ("session_exec", {"session": sid, "cmd": "a\x00b"}, "bad_request"),
        ("session_exec", {"session": sid, "cmd": "true", "max_output": 1 << 40}, "bad_request"),
        ("session_exec", {"session": sid, "cmd": "true", "bogus": 1}, "bad_request"),
        ("session_exec", {"session": p, "cmd": "echo \x03"}, "bad_request"),
        ("session_write", {"session": sid, "data": 7}, "bad_request"),
        ("session_read", {"session": sid, "max_bytes": 0}, "bad_request"),
        ("session_read", {"session": sid, "wait_ms": -1}, "bad_request"),
        ("session_resize", {"session": sid, "cols": 80, "rows": 24}, "bad_request"),
        ("session_resize", {"session": p, "cols": 0, "rows": 24}, "bad_request"),
        ("session_resize", {"session": p, "cols": 80, "rows": 5000}, "bad_request"),
        ("session_signal", {"session": sid, "signal": "NOPE"}, "bad_request"),
        ("session_signal", {"session": sid, "signal": 0}, "bad_request"),
        ("session_signal", {"session": sid, "signal": 99}, "bad_request"),
        ("session_signal", {"session": sid, "signal": [2]}, "bad_request"),
        ("session_open", {"slot": 99}, "unknown_slot"),
        ("session_open", {"slot": 0, "shell": "bash"}, "bad_request"),
        ("session_open", {"slot": 0, "tag": "x" * 65}, "bad_request"),
        ("session_open", {"slot": 0, "tag": "a\0b"}, "bad_request"),
        ("session_open", {"slot": 0, "tag": 5}, "bad_request"),
        ("session_open", {"slot": 0, "shell": "/no/such/shell"}, "not_found"),
        ("session_open", {"slot": 0, "cwd": "../.."}, "path_escape"),
        ("session_open", {"slot": 0, "cwd": "missing"}, "not_found"),
        ("session_open", {"slot": 0, "env": {"A=B": "x"}}, "bad_request"),
        ("session_open", {"slot": 0, "env": {"A": 1}}, "bad_request"),
        ("session_open", {"slot": 0, "cols": 80}, "bad_request"),
        ("session_open", {"slot": 0, "pty": "yes"}, "bad_request"),
        ("session_open", {"slot": 0, "isolation": "maybe"}, "bad_request"),
        ("session_open", {"slot": 0, "rlimits": {"bogus": 1}}, "bad_request"),
    ]
    for op, args, code in bad:
        expect_error(client, op, args, code)
    # one command at a time per session
    rid = client.send("session_exec", {"session": sid, "cmd": "sleep 0.5"})
    expect_error(client, "session_exec", {"session": sid, "cmd": "true"}, "slot_busy")
    assert client.wait(rid, timeout=10)[0]["ok"]
    # a program in the terminal's foreground is not a shell to type into
    client.call("session_write", {"session": p, "data": b"sleep 100\n"})
    time.sleep(0.3)
    expect_error(client, "session_exec", {"session": p, "cmd": "true"}, "slot_busy")
    client.call("session_signal", {"session": p, "signal": "INT"})
    # a shell other than bash: raw sessions only
    sh = sopen(client, 1, shell="/bin/sh")
    expect_error(client, "session_exec", {"session": sh, "cmd": "true"}, "bad_request")
    client.call("session_write", {"session": sh, "data": b"echo from-sh\n"})
    read_until(client, sh, b"from-sh")
    # and everything still works
    assert sx(client, sid, "echo fine")["stdout"] == b"fine\n"
    assert b"fine" in sx_when_ready(client, p, "echo fine")["output"]


def test_open_with_env_and_cwd(client) -> None:
    client.call("exec", {"slot": 0, "cmd": "mkdir -p sub/dir"})
    sid = sopen(client, cwd="sub/dir", env={"FOO": "bar", "TERM": "vt100"})
    r = sx(client, sid, "pwd; echo $FOO $TERM $HOME $SLOT_INDEX")
    ws = client.call("slots", {"slot": 0})["slots"][0]["cwd_path"]  # /workspace in a box
    assert r["stdout"] == f"{ws}/sub/dir\nbar vt100 {ws} 0\n".encode()
    p = sopen(client, pty=True)
    assert b"xterm-256color" in sx(client, p, "echo $TERM")["output"]


def test_no_fd_or_process_leaks(client, agent) -> None:
    sx(client, sopen(client, 3), "true")  # warm up the slot (its box, rulesets)
    client.call("session_close", {"session": sessions_of(client, 3)[0]["session"]})
    base = fd_count(agent.proc.pid)
    m = marker()
    for round_ in range(3):
        sids = [sopen(client, 3, pty=(i % 2 == 0)) for i in range(6)]
        for s in sids:
            sx(client, s, f"sleep 300 {m} & echo started")
        sx(client, sids[0], "sleep 100", timeout_ms=200)
        wait_until(lambda: len(pids_with_arg(m)) == 6, timeout=5)
        assert fd_count(agent.proc.pid) > base
        for s in sids:
            client.call("session_close", {"session": s})
        wait_until(lambda: not pids_with_arg(m), timeout=5)
    wait_until(lambda: fd_count(agent.proc.pid) == base, timeout=5)
    # shells that ended by themselves too
    for _ in range(3):
        s = sopen(client, 3)
        sx(client, s, "exit 0")
        client.call("session_close", {"session": s})
    wait_until(lambda: fd_count(agent.proc.pid) == base, timeout=5)


def test_isolation_same_as_exec(client, agent, tmpdir_short) -> None:
    e = client.call("exec", {"slot": 0, "cmd": "id -u; id -g"})
    for pty in (False, True):
        r = client.call("session_open", {"slot": 0, "pty": pty})
        assert set(r["isolation"]) == set(e["isolation"]), (r, e)
        out = sx(client, r["session"], "id -u; id -g")
        assert (out["output"] if pty else out["stdout"]).replace(b"\r\n", b"\n").endswith(
            e["stdout"]), out
    sid = sopen(client, 0)
    r = sx(client, sid, "grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status")
    assert b"NoNewPrivs:\t1" in r["stdout"] and b"Seccomp:\t2" in r["stdout"]
    # other slots' workspaces: neither writable nor (through the box) visible
    other = Path(client.call("slots", {"slot": 1})["slots"][0]["workspace"])
    r = sx(client, sid, f"echo x > {other}/planted")
    assert r["exit_code"] != 0 and not (other / "planted").exists()
    r = sx(client, sid, f"ln -s {other} other && echo x > other/planted2")
    assert r["exit_code"] != 0 and not (other / "planted2").exists()
    target = tmpdir_short / "escape-session"
    r = sx(client, sid, f"echo x > {target}")
    assert r["exit_code"] != 0 and not target.exists()
    # nor can it signal the agent or another slot's command
    d = client.call("exec", {"slot": 1, "cmd": "sleep 30", "detach": True})
    for pid in (agent.proc.pid, d["pid"]):
        r = sx(client, sid, f"kill -TERM {pid}")
        assert r["exit_code"] != 0 and (b"not permitted" in r["stderr"] or
                                        b"No such process" in r["stderr"]), r
    assert agent.proc.poll() is None
    assert client.call("cancel", {"exec_id": d["exec_id"]})["cancelled"] == 1


def test_slots_lists_sessions(client) -> None:
    sid = sopen(client, 1)
    p = sopen(client, 1, pty=True, tag="term-1")
    ss = {s["session"]: s for s in sessions_of(client, 1)}
    assert set(ss) == {sid, p}
    assert ss[p]["tag"] == "term-1" and ss[sid]["tag"] == ""
    assert ss[p]["pty"] and not ss[sid]["pty"] and all(s["alive"] for s in ss.values())
    assert all(s["pid"] > 0 and not s["running"] for s in ss.values())
    assert sessions_of(client, 0) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid rung needs root")
def test_sessions_run_as_the_slot_user(agent_factory, tmpdir_short) -> None:
    # A data dir other users can reach: the uid rung turns on.
    tmpdir_short.chmod(0o755)
    a = agent_factory(slots=2)
    c = a.client()
    h = c.call("hello")
    assert h["isolation"]["uid"], h["isolation_detail"]
    uid = h["isolation_detail"]["slot_uid_base"] + 1
    e = c.call("exec", {"slot": 1, "cmd": "id -u"})
    assert e["stdout"] == f"{uid}\n".encode()
    sid = sopen(c, 1)
    assert sx(c, sid, "id -u; whoami")["stdout"] == f"{uid}\nslot1\n".encode()
    # the terminal belongs to the slot user, like a login's
    p = sopen(c, 1, pty=True)
    out = sx(c, p, "id -u; stat -c %u $(tty)")["output"].replace(b"\r\n", b"\n")
    assert out.endswith(f"{uid}\n{uid}\n".encode()), out
    # another slot's workspace is out of reach
    other = Path(c.call("slots", {"slot": 0})["slots"][0]["workspace"])
    r = sx(c, sid, f"echo x > {other}/planted; ls {other}")
    assert r["exit_code"] != 0 and not (other / "planted").exists()


# ---- session_screen: what a terminal would show ----------------------------------


def screen(c: Client, sid: int) -> dict:
    return c.call("session_screen", {"session": sid})


def wait_screen(c: Client, sid: int, pred, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = screen(c, sid)
        if pred(s):
            return s
        assert time.monotonic() < deadline, "\n".join(s["rows"])
        time.sleep(0.05)


def keys(c: Client, sid: int, data: bytes) -> None:
    c.call("session_write", {"session": sid, "data": data})


def test_screen_of_a_shell_and_its_size(client) -> None:
    sid = sopen(client, pty=True, cols=60, rows=12)
    s = wait_screen(client, sid, lambda s: any("$" in r for r in s["rows"]))
    assert s["size"] == {"rows": 12, "cols": 60} and len(s["rows"]) == 12
    keys(client, sid, b"echo screen-$((6*7))\n")
    s = wait_screen(client, sid, lambda s: "screen-42" in s["rows"])
    row = s["rows"].index("screen-42")
    assert s["cursor"]["row"] == row + 1  # on the next prompt
    client.call("session_resize", {"session": sid, "cols": 100, "rows": 30})
    s = screen(client, sid)
    assert s["size"] == {"rows": 30, "cols": 100} and len(s["rows"]) == 30
    # a session without a terminal has no screen
    plain = sopen(client)
    expect_error(client, "session_screen", {"session": plain}, "bad_request")
    expect_error(client, "session_screen", {"session": 99999}, "not_found")


def test_less_driven_with_keys(client) -> None:
    sx(client, sopen(client), "seq 1 200 > nums.txt")
    sid = sopen(client, pty=True, cols=80, rows=24)
    wait_screen(client, sid, lambda s: any("$" in r for r in s["rows"]))
    keys(client, sid, b"less nums.txt\n")
    s = wait_screen(client, sid, lambda s: s["rows"][0] == "1" and s["rows"][22] == "23")
    keys(client, sid, b" ")  # next page
    s = wait_screen(client, sid, lambda s: s["rows"][0] == "24")
    assert s["rows"][22] == "46"
    keys(client, sid, b"G")  # the end
    s = wait_screen(client, sid, lambda s: "200" in s["rows"])
    keys(client, sid, b"g")  # the top again
    wait_screen(client, sid, lambda s: s["rows"][0] == "1")
    keys(client, sid, b"/150\n")  # search forward
    wait_screen(client, sid, lambda s: s["rows"][0] == "150")
    keys(client, sid, b"q")
    # less used the alternate screen: the shell's screen is back
    s = wait_screen(client, sid, lambda s: any("less nums.txt" in r for r in s["rows"]))
    assert not any(r == "150" for r in s["rows"])


def test_vi_edits_a_file_through_keys(client) -> None:
    sid = sopen(client, pty=True, cols=80, rows=24)
    wait_screen(client, sid, lambda s: any("$" in r for r in s["rows"]))
    keys(client, sid, b"vi -u NONE -N notes.txt\n")
    s = wait_screen(client, sid, lambda s: any(r.startswith("~") for r in s["rows"]))
    keys(client, sid, b"ihello from vi\x1b")
    s = wait_screen(client, sid, lambda s: s["rows"][0] == "hello from vi")
    assert s["cursor"]["row"] == 0
    keys(client, sid, b":wq\n")
    wait_screen(client, sid, lambda s: any("vi -u NONE" in r for r in s["rows"])
                and not any(r.startswith("~") for r in s["rows"]))
    assert sx_when_ready(client, sid, "cat notes.txt")["output"].endswith(b"hello from vi\r\n")


def test_full_screen_redraws_show_the_latest_frame(client) -> None:
    # an htop-like program: clears and redraws the whole screen many times
    prog = ("import curses, time\n"
            "def main(w):\n"
            "    for i in range(60):\n"
            "        w.erase()\n"
            "        w.addstr(0, 0, f'frame {i:03d}')\n"
            "        for r in range(1, curses.LINES - 1):\n"
            "            w.addstr(r, 0, f'row {r} of frame {i}')\n"
            "        w.refresh()\n"
            "        time.sleep(0.01)\n"
            "    w.addstr(0, 0, 'done      ')\n"
            "    w.refresh()\n"
            "    time.sleep(30)\n"
            "curses.wrapper(main)\n")
    sx(client, sopen(client), f"cat > top.py <<'EOF'\n{prog}EOF")
    sid = sopen(client, pty=True, cols=50, rows=10)
    wait_screen(client, sid, lambda s: any("$" in r for r in s["rows"]))
    keys(client, sid, b"python3 top.py\n")
    s = wait_screen(client, sid, lambda s: s["rows"][0] == "done")
    assert s["rows"][1:9] == [f"row {r} of frame 59" for r in range(1, 9)]
    assert len(s["rows"]) == 10
    client.call("session_signal", {"session": sid, "signal": "INT"})
    wait_screen(client, sid, lambda s: "KeyboardInterrupt" in s["rows"])


def test_programs_asking_the_terminal_get_answers(client) -> None:
    sid = sopen(client, pty=True, cols=80, rows=24)
    wait_screen(client, sid, lambda s: any("$" in r for r in s["rows"]))
    # a cursor position report, as full-screen programs ask for it
    keys(client, sid, b"printf '\\033[5;9H\\033[6n'; read -rs -d R pos; echo; echo \"at ${pos#*[}\"\n")
    wait_screen(client, sid, lambda s: any(r.startswith("at 5;9") for r in s["rows"]), 10)


# ---- waiting writes, scrollback history, the transcript --------------------

def wait_prompt(c: Client, sid: int) -> None:
    """The shell is at its prompt (a bare Enter is answered by a new one)."""
    r = c.call("session_write", {"session": sid, "data": b"\n", "wait_prompt_ms": 10000},
               timeout=30)
    assert r["prompt"], r


@pytest.mark.parametrize("pty", [False, True])
def test_write_waits_for_the_prompt(client, pty) -> None:
    sid = sopen(client, pty=pty)
    t0 = time.monotonic()
    r = client.call("session_write", {"session": sid, "data": b"sleep 0.5; echo hi\n",
                                      "wait_prompt_ms": 10000}, timeout=30)
    assert r["prompt"] is True and r["alive"] is True and r["written"] == 19, r
    assert 0.45 <= time.monotonic() - t0 < 8 and r["waited_ms"] >= 450, r
    out = read_until(client, sid, b"hi")
    assert b"hi" in out
    # not finished within the wait: answered with prompt false; the line runs on
    m = marker()
    r = client.call("session_write", {"session": sid, "data": f"sleep {m}\n".encode(),
                                      "wait_prompt_ms": 300}, timeout=30)
    assert r["prompt"] is False and r["alive"] and 300 <= r["waited_ms"] < 5000, r
    assert pids_with_arg(m)
    client.call("session_signal", {"session": sid, "signal": "INT"})
    wait_until(lambda: not pids_with_arg(m), timeout=5)
    # no wait asked: the old answer
    assert client.call("session_write", {"session": sid, "data": b""}) == {"written": 0}
    # the prompt after the interrupted line comes; session_exec works again
    sx_when_ready(client, sid, "true")


def test_write_min_wait_and_one_waiting_write(client) -> None:
    sid = sopen(client, pty=True)
    wait_prompt(client, sid)
    t0 = time.monotonic()
    r = client.call("session_write", {"session": sid, "data": b"", "min_wait_ms": 400})
    assert r["prompt"] is False and r["waited_ms"] >= 400 and time.monotonic() - t0 >= 0.38
    # min_wait_ms with wait_prompt_ms: the prompt came early, the answer waits
    t0 = time.monotonic()
    r = client.call("session_write", {"session": sid, "data": b"true\n", "min_wait_ms": 600,
                                      "wait_prompt_ms": 5000})
    assert r["prompt"] is True and time.monotonic() - t0 >= 0.58 and r["waited_ms"] >= 600, r
    # zero waits: answered at once, in the waiting form
    r = client.call("session_write", {"session": sid, "data": b"", "min_wait_ms": 0,
                                      "wait_prompt_ms": 0})
    assert set(r) == {"written", "prompt", "waited_ms", "alive"} and r["written"] == 0
    # one waiting write per session; plain writes still go
    rid = client.send("session_write", {"session": sid, "data": b"sleep 1\n",
                                        "wait_prompt_ms": 10000})
    time.sleep(0.2)
    expect_error(client, "session_write", {"session": sid, "data": b"x", "min_wait_ms": 10},
                 "slot_busy")
    assert client.call("session_write", {"session": sid, "data": b""})["written"] == 0
    resp, _ = client.wait(rid, timeout=30)
    assert resp["ok"] and resp["result"]["prompt"] is True, resp


def test_waiting_write_ends_with_the_shell_or_the_session(client) -> None:
    sid = sopen(client, pty=True)
    wait_prompt(client, sid)
    r = client.call("session_write", {"session": sid, "data": b"exit 3\n",
                                      "wait_prompt_ms": 10000}, timeout=30)
    assert r["prompt"] is False and r["alive"] is False and r["waited_ms"] < 9000, r
    sid = sopen(client, pty=True)
    wait_prompt(client, sid)
    rid = client.send("session_write", {"session": sid, "data": b"sleep 100\n",
                                        "wait_prompt_ms": 60000})
    time.sleep(0.3)
    client.call("session_close", {"session": sid})
    resp, _ = client.wait(rid, timeout=10)
    assert resp["error"]["code"] == "cancelled", resp
    # a reset cancels it as well
    sid = sopen(client, pty=True)
    wait_prompt(client, sid)
    rid = client.send("session_write", {"session": sid, "data": b"sleep 100\n",
                                        "min_wait_ms": 60000})
    time.sleep(0.3)
    client.call("reset", {"slot": 0})
    resp, _ = client.wait(rid, timeout=10)
    assert resp["error"]["code"] == "cancelled", resp


def test_screen_history_keeps_what_scrolled_off(client) -> None:
    sid = sopen(client, pty=True, cols=40, rows=10)
    s = client.call("session_screen", {"session": sid})
    assert "history" not in s
    r = sx(client, sid, "seq 1 300")
    assert r["exit_code"] == 0
    s = client.call("session_screen", {"session": sid, "history": True})
    nums = [h for h in s["history"] if h.isdigit()] + [r for r in s["rows"] if r.isdigit()]
    assert nums == [str(i) for i in range(1, 301)], nums[:5]
    assert "$ seq 1 300" in s["history"]
    # bounded: the oldest lines go first
    sx(client, sid, "seq 1 12000", timeout_ms=60000)
    s = client.call("session_screen", {"session": sid, "history": True})
    assert len(s["history"]) == 10000, len(s["history"])
    assert "1" not in s["history"][:5] and s["history"][-1].isdigit(), s["history"][:3]
    # full-screen programs leave no history
    before = len(client.call("session_screen", {"session": sid, "history": True})["history"])
    sx(client, sid, "clear")
    s = client.call("session_screen", {"session": sid, "history": True})
    assert len(s["history"]) >= before - 10


def test_session_log_reads_the_transcript_by_offset(client) -> None:
    sid = sopen(client, pty=True, cols=80, rows=10)
    sx(client, sid, "echo one; echo two")
    # the prompt is printed after the marker that ended the command
    r = wait_until(lambda: (lambda x: x if x["data"].endswith(b"$ ") else None)(
        client.call("session_log", {"session": sid})), timeout=10)
    assert r["offset"] == 0 and r["start"] == 0 and r["dropped"] == 0 and r["session"] == sid
    assert b"one\r\ntwo\r\n" in r["data"] and r["next_offset"] == len(r["data"]) == r["end"]
    # lines: up to the last newline (the prompt's line waits for its end)
    ln = client.call("session_log", {"session": sid, "lines": True})
    assert ln["data"].endswith(b"\n") and r["data"].startswith(ln["data"]), ln
    # from an offset; past the end is the end; reads do not consume
    part = client.call("session_log", {"session": sid, "offset": 5, "max_bytes": 4})
    assert part["data"] == r["data"][5:9] and part["next_offset"] == 9
    end = client.call("session_log", {"session": sid, "offset": 10**12})
    assert end["data"] == b"" and end["offset"] == r["end"] and end["dropped"] == 0
    again = client.call("session_log", {"session": sid})
    assert again["data"] == r["data"]
    # max_bytes with lines: a line longer than max_bytes comes max_bytes of it
    cut = client.call("session_log", {"session": sid, "lines": True, "max_bytes": 3})
    assert len(cut["data"]) == 3
    # a session without a terminal has none; session_read is unaffected
    plain = sopen(client)
    expect_error(client, "session_log", {"session": plain}, "bad_request", "terminal")
    keys(client, sid, b"echo after\n")
    assert b"after" in read_until(client, sid, b"after\r\n")
    r2 = client.call("session_log", {"session": sid, "offset": r["end"]})
    assert b"after" in r2["data"]


def test_session_log_is_bounded_and_says_what_it_dropped(client) -> None:
    sid = sopen(client, pty=True, cols=200, rows=5)
    r = sx(client, sid, "head -c 5000000 /dev/zero | tr '\\0' x; echo; echo tail-mark",
           timeout_ms=120000)
    assert r["exit_code"] == 0, r
    cap = 4 << 20
    lg = client.call("session_log", {"session": sid, "max_bytes": 64})
    assert lg["end"] > 5000000 and lg["end"] - lg["start"] == cap, lg
    assert lg["offset"] == lg["start"] and lg["dropped"] == lg["start"] > 0
    assert lg["data"] == b"x" * 64
    tail = client.call("session_log", {"session": sid, "offset": lg["end"] - 200,
                                       "max_bytes": 200})
    assert b"tail-mark\r\n" in tail["data"] and tail["dropped"] == 0


def test_hostile_arguments_of_the_new_session_args(client) -> None:
    sid = sopen(client, pty=True)
    for op, args in (
        ("session_write", {"session": sid, "data": b"", "wait_prompt_ms": -1}),
        ("session_write", {"session": sid, "data": b"", "wait_prompt_ms": "1"}),
        ("session_write", {"session": sid, "data": b"", "min_wait_ms": 1.5}),
        ("session_write", {"session": sid, "data": b"", "min_wait_ms": 10**12}),
        ("session_screen", {"session": sid, "history": 1}),
        ("session_screen", {"session": sid, "history": "yes"}),
        ("session_log", {"session": sid, "offset": -1}),
        ("session_log", {"session": sid, "offset": "0"}),
        ("session_log", {"session": sid, "max_bytes": 0}),
        ("session_log", {"session": sid, "max_bytes": 1 << 40}),
        ("session_log", {"session": sid, "lines": "no"}),
        ("session_log", {"session": sid, "nope": 1}),
        ("session_log", {}),
    ):
        expect_error(client, op, args, "bad_request")
    expect_error(client, "session_log", {"session": 999999}, "not_found")
    expect_error(client, "session_log", {"session": sid, "slot": 1}, "not_found")
    r = client.call("session_log", {"session": sid, "offset": 2**64 - 1})
    assert r["data"] == b""
    assert sx(client, sid, "echo alive")["exit_code"] == 0


def test_history_is_bounded_in_bytes_too(client) -> None:
    """Long lines (a wide pane of two-byte characters) reach the byte bound
    of the scrollback (4 MiB) before its 10,000 lines: the oldest go, and a
    capture of the whole history stays a small answer."""
    sid = sopen(client, pty=True, cols=1000, rows=10)
    wait_prompt(client, sid)
    r = client.call("session_write", {"session": sid, "data":
                                      b"python3 -c \"import sys; [sys.stdout.write('\\u00e9' * 1000"
                                      b" + '\\n') for _ in range(3000)]\"; echo DONE\n",
                                      "wait_prompt_ms": 60000}, timeout=90)
    assert r["prompt"] is True, r
    h = client.call("session_screen", {"session": sid, "history": True}, timeout=30)["history"]
    total = sum(len(x.encode()) for x in h)
    assert 0 < total <= 4 << 20 and len(h) < 3000, (total, len(h))
    assert h[-1] == "\u00e9" * 1000 or "DONE" in "".join(h[-3:]), h[-1][:50]
