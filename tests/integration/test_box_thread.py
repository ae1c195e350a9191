"""Cold commands through a slot box: isolation set up once per box.

A box's holder serves `exec` commands from a second thread that enforces
the slot's Landlock ruleset and loads the seccomp filter on itself once,
with the first command; every later command inherits both and adds only a
Landlock domain that scopes its signals and abstract sockets. The holder's
own thread stays unconfined for sessions, whose ruleset adds their terminal.
These tests run the agent with --no-warm, so every command takes that path."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from conftest import Agent
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from slotwire import AgentError, Client


def status(pid: int, tid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def children(pid: int) -> list[int]:
    return [int(k) for k in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def holders(a: Agent) -> list[int]:
    """The agent's children that hold a box: the parent of a PID 1."""
    out = []
    for k in children(a.proc.pid):
        try:
            if any(status(g, g)["NSpid"].split()[-1] == "1" for g in children(k)):
                out.append(k)
        except OSError:
            continue
    return out


def run(c: Client, cmd: str, slot: int = 0, **kw) -> dict:
    return c.call("exec", {"slot": slot, "cmd": cmd, **kw})


@pytest.fixture
def cold(agent_factory: AgentFactory) -> tuple[Agent, Client]:
    a = agent_factory(extra=["--no-warm"])
    c = a.client()
    iso = c.call("hello")["isolation"]
    # The box is what this is about: fail loudly where it cannot be made.
    assert iso["namespaces"] and iso["landlock"] and iso["seccomp"], iso
    return a, c


def test_one_thread_per_box_carries_landlock_and_seccomp(cold) -> None:
    a, c = cold
    for _ in range(3):
        r = run(c, "true")
        assert r["exit_code"] == 0 and r["warm"] is False, r
        assert {"namespaces", "landlock", "seccomp"} <= set(r["isolation"]), r
    (h,) = holders(a)
    tids = sorted(int(t) for t in os.listdir(f"/proc/{h}/task"))
    assert len(tids) == 2, tids
    main, thread = status(h, tids[0]), status(h, tids[1])
    # the holder's own thread is unconfined (sessions need their own ruleset)
    assert main["NoNewPrivs"] == "0" and main["Seccomp"] == "0", main
    # the command thread holds the filter, loaded once
    assert thread["NoNewPrivs"] == "1" and thread["Seccomp"] == "2", thread
    assert thread["Seccomp_filters"] == "1", thread
    # and commands inherit it rather than stacking one more of their own
    r = run(c, "grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters):' /proc/self/status")
    assert r["stdout"] == b"NoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t1\n", r


def test_commands_under_the_inherited_ruleset(cold) -> None:
    _, c = cold
    # writes only in the workspace, tmp and harmless devices
    r = run(c, "echo x > /etc/slot-escape")
    assert r["exit_code"] != 0 and b"Permission denied" in r["stderr"], r
    assert not Path("/etc/slot-escape").exists()
    r = run(c, "echo a > f && echo b > $TMPDIR/t && echo c > /dev/null && cat f $TMPDIR/t")
    assert r["exit_code"] == 0 and r["stdout"] == b"a\nb\n", r
    # renames and links across directories: each command's own scope domain
    # grants "refer", so the slot's ruleset decides, as before
    r = run(c, "mkdir -p a b && echo x > a/f && mv a/f b/f && ln b/f a/g && cat a/g")
    assert r["exit_code"] == 0 and r["stdout"] == b"x\n", r
    # read and execute anywhere, also in the box's own root
    r = run(c, "ls / >/dev/null && /usr/bin/env true && head -c1 /usr/bin/env | wc -c")
    assert r["exit_code"] == 0 and r["stdout"] == b"1\n", r
    # network=false goes to the other box, with its own thread and ruleset
    r = run(c, "cat /proc/self/status | grep -c NoNewPrivs:.1", network=False)
    assert r["exit_code"] == 0 and r["stdout"] == b"1\n", r


def test_commands_cannot_signal_one_another(cold) -> None:
    _, c = cold
    abi = c.call("hello")["isolation_detail"]["landlock_abi"]
    if abi < 6:
        pytest.fail(f"Landlock ABI {abi} has no signal scoping: this kernel cannot show it")
    d = c.call("exec", {"slot": 0, "cmd": "exec sleep 30", "detach": True})
    r = run(c, "p=$(pgrep -x sleep) && kill -TERM $p; echo rc=$?")
    # the sleeping command lives in a Landlock domain of its own
    assert r["stdout"] == b"rc=1\n" and b"not permitted" in r["stderr"], r
    # a command still signals its own children
    assert run(c, "sleep 30 & kill $!; wait $!; echo $?")["stdout"] == b"143\n"
    assert c.call("cancel", {"exec_id": d["exec_id"]})["cancelled"] == 1


def test_sessions_and_resets_beside_the_thread(cold) -> None:
    _, c = cold
    assert run(c, "true")["exit_code"] == 0
    # a terminal session (through the holder's own thread) opens its tty by name
    sid = c.call("session_open", {"slot": 0, "pty": True})["session"]
    r = c.call("session_exec", {"session": sid, "cmd": "echo hi > $(tty) && ls / >/dev/null && "
                                                      "echo ok", "timeout_ms": 10000})
    assert r["exit_code"] == 0 and b"ok" in r["output"], r
    c.call("session_close", {"session": sid})
    # after a reset the box and its thread are new, and commands run as before
    c.call("reset", {"slot": 0})
    r = run(c, "ls / >/dev/null && echo x > f && cat f")
    assert r["exit_code"] == 0 and r["stdout"] == b"x\n", r
    r = run(c, "echo x > /etc/slot-escape")
    assert r["exit_code"] != 0, r


def test_a_lost_holder_is_replaced_with_its_thread(cold) -> None:
    a, c = cold
    assert run(c, "true")["exit_code"] == 0
    (h,) = holders(a)
    os.kill(h, 9)
    # the next command finds the box gone (its exit reaped, or its socket
    # closed) and gets a new one, with a new command thread
    deadline = time.monotonic() + 10
    while True:
        try:
            r = run(c, "echo ok")
        except AgentError as e:  # "the slot's holder is gone": the next one starts it anew
            r = {"error": str(e)}
        if r.get("exit_code") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r["exit_code"] == 0 and r["stdout"] == b"ok\n", r
    (h2,) = holders(a)
    assert h2 != h and len(os.listdir(f"/proc/{h2}/task")) == 2
    r = run(c, "grep -c '^NoNewPrivs:.1' /proc/self/status; echo x > /etc/slot-escape")
    assert r["stdout"] == b"1\n" and r["exit_code"] != 0, r
