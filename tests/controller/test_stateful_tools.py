"""bash_stateful and tmux, the trainer tool names the controller maps onto
agent sessions: state kept per lease, calls on one slot in order, a fresh
shell after `exit`, a `reset` or a new lease, terminal keys and screens,
hostile arguments, and an agent lost with calls still queued."""
from __future__ import annotations

import os
import signal
import time

from helpers_proc import wait_gone
from slotwire import Client


def acquire(c: Client, traj: str = "t") -> str:
    return c.call("acquire", {"trajectory_id": traj})["slot"]


def tool(c: Client, slot: str, name: str, **args) -> dict:
    return c.call("exec", {"slot": slot, "tool": name, "args": args}, timeout=60)


def sh(c: Client, slot: str, command: str, **kw) -> dict:
    return tool(c, slot, "bash_stateful", command=command, **kw)


def batch(c: Client, reqs: list[tuple[str, str, dict]]) -> list[dict]:
    return c.call("batch", {"requests": [{"slot": s, "tool": t, "args": a} for s, t, a in reqs]},
                  timeout=60)["results"]


def test_state_persists_and_one_slots_calls_run_in_order(controller, client):
    a = acquire(client, "a")
    b = acquire(client, "b")
    res = batch(client, [
        (a, "bash_stateful", {"command": "cd /tmp && X=from-a"}),
        (b, "bash_stateful", {"command": "f() { echo fn-$1; }; export Y=from-b"}),
        (a, "bash_stateful", {"command": "sleep 0.3; echo $X $PWD"}),
        (b, "bash_stateful", {"command": "f $Y; echo ${X:-unset}"}),
        (a, "bash_stateful", {"command": "echo err >&2; exit_code() { return 3; }; exit_code"}),
    ])
    assert all(r["ok"] for r in res), res
    assert res[2]["result"]["stdout"] == b"from-a /tmp\n"
    assert res[3]["result"]["stdout"] == b"fn-from-b\nunset\n"
    assert res[4]["result"]["exit_code"] == 3 and res[4]["result"]["stderr"] == b"err\n"
    # one shell per lease: a shell variable counts the calls
    for want in (b"1\n", b"2\n", b"3\n"):
        assert sh(client, a, "C=$((C+1)); echo $C")["stdout"] == want
    assert sh(client, b, "C=$((C+1)); echo $C")["stdout"] == b"1\n"


def test_exit_gives_a_fresh_shell_and_frees_the_old_one(controller, client):
    a = acquire(client, "a")
    for i in range(12):  # more than the agent's 8 sessions per slot
        sh(client, a, f"export N={i}")
        r = sh(client, a, "exit 5")
        assert r["exit_code"] == 5 and r["session_alive"] is False
    assert sh(client, a, "echo ${N:-unset}")["stdout"] == b"unset\n"


def test_timeout_interrupts_and_the_shell_stays(controller, client):
    a = acquire(client, "a")
    sh(client, a, "cd /tmp; Z=kept")
    t0 = time.monotonic()
    r = sh(client, a, "sleep 100", timeout=1)
    assert r["timed_out"] and time.monotonic() - t0 < 20
    r = sh(client, a, "echo $Z $PWD", timeout_ms=5000)
    assert r["stdout"] == b"kept /tmp\n" and r["exit_code"] == 0


def test_a_new_lease_and_a_reset_start_afresh(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 1\n"
                             "    min_agents: 1\n    max_agents: 1\n")
    client = ctl.client()
    a = acquire(client, "a")
    sh(client, a, "export K=old")
    # the reset tool closes the slot's sessions: the next call opens a new shell
    tool(client, a, "reset")
    assert sh(client, a, "echo ${K:-unset}")["stdout"] == b"unset\n"
    sh(client, a, "export K=older")
    client.call("release", {"slot": a, "reset": False})
    a2 = acquire(client, "a2")
    assert a2.split("/")[:2] == a.split("/")[:2] and a2 != a  # the same slot, a new lease
    assert sh(client, a2, "echo ${K:-unset}")["stdout"] == b"unset\n"
    client.close()


def wait_screen(c: Client, slot: str, want: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = tool(c, slot, "tmux", action="capture")
        if any(want in row for row in r["rows"]):
            return r
        assert time.monotonic() < deadline, f"no {want!r} on the screen: {r['rows']}"
        time.sleep(0.05)


def test_tmux_start_keys_capture_stop(controller, client):
    a = acquire(client, "a")
    r = tool(client, a, "tmux", action="start", pane_width=50, pane_height=12)
    assert r["size"] == {"rows": 12, "cols": 50} and len(r["rows"]) == 12
    assert r["started"] is True and r["created"] is True
    wait_screen(client, a, "$")
    tool(client, a, "tmux", action="send_keys", keys=["echo hi-$((6*7))", "Enter"])
    wait_screen(client, a, "hi-42")
    # a second start keeps the running terminal
    again = tool(client, a, "tmux", action="start")
    assert again["session"] == r["session"] and again["size"]["cols"] == 50
    assert again["started"] is True and again["created"] is False
    # C-c interrupts a foreground program; the shell answers again
    tool(client, a, "tmux", action="send_keys", keys="sleep 100")
    tool(client, a, "tmux", action="send_keys", keys="Enter")
    time.sleep(0.3)
    tool(client, a, "tmux", action="send_keys", keys=["C-c"])
    tool(client, a, "tmux", action="send_keys", keys=["echo back", "Enter"])
    wait_screen(client, a, "back")
    # keys go to the terminal session, commands to the bash_stateful one
    assert sh(client, a, "echo plain")["stdout"] == b"plain\n"
    assert tool(client, a, "tmux", action="stop") == {"stopped": True}
    # stop always succeeds; any other action after it starts a fresh terminal
    assert tool(client, a, "tmux", action="stop") == {"stopped": True}
    r2 = tool(client, a, "tmux", action="capture", pane_width=30, pane_height=10)
    assert r2["session"] != r["session"] and r2["size"] == {"rows": 10, "cols": 30}
    # a reset closes it; start opens a new one
    tool(client, a, "reset")
    r3 = tool(client, a, "tmux", action="start")
    assert r3["session"] not in (r["session"], r2["session"]), r3
    assert r3["size"] == {"rows": 40, "cols": 120} and r3["created"] is True


def rows_equal(c: Client, slot: str, row: str, count: int = 1, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = tool(c, slot, "tmux", action="capture")["rows"]
        if sum(r == row for r in rows) >= count:
            return
        assert time.monotonic() < deadline, f"{count} x {row!r} not on the screen: {rows}"
        time.sleep(0.05)


def test_tmux_key_names_reach_the_terminal_as_keys(controller, client):
    a = acquire(client, "a")
    tool(client, a, "tmux", action="start", pane_width=60, pane_height=12)
    wait_screen(client, a, "$")

    def keys(*k: str) -> None:
        tool(client, a, "tmux", action="send_keys", keys=list(k))

    keys("echo first-$((1+1))", "Enter")
    rows_equal(client, a, "first-2")
    keys("echo abX", "BSpace", "C-m")          # BSpace erases, C-m is Enter
    rows_equal(client, a, "ab")
    keys("Up", "Up", "Enter")                  # history: the first command again
    rows_equal(client, a, "first-2", count=2)
    # M-b and C-a move the cursor (to a word's start, the line's), Right on
    keys("echo one two", "M-b", "C-a", *["Right"] * 5, "x", "Enter")
    rows_equal(client, a, "xone two")


def test_hostile_arguments_are_refused_and_the_slot_stays_usable(controller, client):
    a = acquire(client, "a")
    bad = [
        ("bash_stateful", {}),
        ("bash_stateful", {"command": 5}),
        ("bash_stateful", {"command": "true", "nope": 1}),
        ("bash_stateful", {"command": "true", "timeout": -1}),
        ("bash_stateful", {"command": "true", "timeout": 1e12}),
        ("bash_stateful", {"command": "true", "allow_network": "no"}),
        ("bash_stateful", {"command": "true", "require_stateful_sandbox": 1}),
        ("bash_stateful", {"command": "true", "require_sandbox": "yes"}),
        ("tmux", {"action": "explode"}),
        ("tmux", {"action": 7}),
        ("tmux", {"action": "send_keys"}),
        ("tmux", {"action": "send_keys", "keys": [1, 2]}),
        ("tmux", {"action": "send_keys", "keys": ["ok", 2]}),
        ("tmux", {"action": "send_keys", "keys": {"a": 1}}),
        ("tmux", {"action": "start", "pane_width": 1.5}),
        ("tmux", {"action": "start", "pane_height": "tall"}),
        ("tmux", {"action": "start", "what": 1}),
        ("tmux", {"action": "send_keys", "keys": "x", "block": "yes"}),
        ("tmux", {"action": "send_keys", "keys": "x", "block": 1}),
        ("tmux", {"action": "send_keys", "keys": "x", "min_wait_s": -1}),
        ("tmux", {"action": "send_keys", "keys": "x", "min_wait_s": "1"}),
        ("tmux", {"action": "send_keys", "keys": "x", "max_wait_s": 0}),
        ("tmux", {"action": "send_keys", "keys": "x", "max_wait_s": -2.5}),
        ("tmux", {"action": "send_keys", "keys": "x", "max_wait_s": 1e9}),
        ("tmux", {"action": "send_keys", "keys": "x", "timeout": "30"}),
        ("tmux", {"action": "send_keys", "keys": "x", "timeout": -1}),
        ("tmux", {"action": "capture", "capture_entire": "yes"}),
        ("tmux", {"action": "stream", "max_bytes": "big"}),
        ("tmux", {"action": "stream", "max_bytes": 1.5}),
        ("tmux", {"action": "stream", "reset": 0}),
        ("tmux", {"action": "start", "allow_network": 0}),
        ("tmux", {"action": "start", "require_stateful_sandbox": "true"}),
        ("tmux", {"action": "start", "require_sandbox": [True]}),
    ]
    for name, args in bad:
        r = client.call_raw("exec", {"slot": a, "tool": name, "args": args})
        assert not r["ok"] and r["error"]["code"] == "bad_request", (name, args, r)
        # a wrong name or type is named in the message
        named = [k for k in args if k != "command" and args[k] not in ("send_keys", "start")]
        assert not named or any(k in r["error"]["message"] for k in named), (args, r)
    r = client.call_raw("exec", {"slot": a, "tool": "bash_stateful", "args": [1]})
    assert r["error"]["code"] == "bad_request"
    r = client.call_raw("exec", {"slot": "x/0/1", "tool": "bash_stateful",
                                 "args": {"command": "true"}})
    assert r["error"]["code"] == "not_leased"
    r = client.call_raw("exec", {"slot": a, "tool": "tmux",
                                 "args": {"action": "send_keys", "keys": "x" * (2 << 20)}})
    assert r["error"]["code"] == "too_large"
    # a NUL in the command: the agent refuses it, the shell lives on
    r = client.call_raw("exec", {"slot": a, "tool": "bash_stateful",
                                 "args": {"command": "echo a\0b"}})
    assert r["error"]["code"] == "bad_request"
    assert sh(client, a, "echo fine")["stdout"] == b"fine\n"


def test_released_slot_refuses_queued_calls(controller, client):
    a = acquire(client, "a")
    rid = client.send("batch", {"requests": [
        {"slot": a, "tool": "bash_stateful", "args": {"command": "sleep 1; echo first"}},
        {"slot": a, "tool": "bash_stateful", "args": {"command": "echo second"}}]})
    time.sleep(0.3)
    other = controller.client()
    other.call("release", {"slot": a})
    resp, _ = client.wait(rid, timeout=30)
    res = resp["result"]["results"]
    assert res[1]["ok"] is False and res[1]["error"]["code"] == "not_leased", res
    assert res[0]["ok"] is False or res[0]["result"]["stdout"] in (b"first\n", b"")
    other.close()


def test_agent_lost_fails_the_queued_calls(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 2\n"
                             "    min_agents: 2\n    max_agents: 2\n")
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"t{i}") for i in range(4)]
    victim = slots[0].split("/")[0]
    safe = next(s for s in slots if s.split("/")[0] != victim)
    pid = next(a["pid"] for a in c.call("agents")["agents"] if a["id"] == victim)
    rid = c.send("batch", {"requests": [
        {"slot": slots[0], "tool": "bash_stateful", "args": {"command": "sleep 100"}},
        {"slot": slots[0], "tool": "bash_stateful", "args": {"command": "echo never"}},
        {"slot": slots[0], "tool": "tmux", "args": {"action": "start"}},
        {"slot": safe, "tool": "bash_stateful", "args": {"command": "sleep 2; echo safe"}}]})
    time.sleep(0.8)
    os.kill(pid, signal.SIGKILL)
    resp, _ = c.wait(rid, timeout=60)
    res = resp["result"]["results"]
    for r in res[:3]:
        assert r["ok"] is False and r["error"]["code"] == "agent_lost", res
    assert res[3]["ok"] and res[3]["result"]["stdout"] == b"safe\n", res
    c.close()


def test_shells_and_terminals_survive_a_controller_restart(controller_factory):
    """Socket-mode agents outlive the controller; the restarted one finds
    the leases and, by their tags, the sessions of bash_stateful and tmux."""
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n"
                             "    max_agents: 1\n    local:\n      mode: socket\n")
    c = ctl.client()
    a = acquire(c, "a")
    b = acquire(c, "b")
    sh(c, a, "cd /tmp && export KEPT=yes && C=41")
    tool(c, b, "tmux", action="start", pane_width=40, pane_height=10)
    wait_screen(c, b, "$")
    tool(c, b, "tmux", action="send_keys", keys=["echo before-restart", "Enter"])
    wait_screen(c, b, "before-restart")
    ctl.kill9()
    c.close()
    ctl.expect_clean_exit = True
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1 and st["slots"]["leased"] == 2)
    c = ctl.client()
    r = sh(c, a, "C=$((C+1)); echo $KEPT $C $PWD")
    assert r["stdout"] == b"yes 42 /tmp\n", r
    screen = tool(c, b, "tmux", action="capture")
    assert any("before-restart" in row for row in screen["rows"]), screen
    assert screen["size"] == {"rows": 10, "cols": 40}
    tool(c, b, "tmux", action="send_keys", keys=["echo after-restart", "Enter"])
    wait_screen(c, b, "after-restart")
    c.close()
    # no second shell was opened for either: ask the agent itself
    agent_id = a.split("/")[0]
    ag = Client.unix(str(ctl.state_dir / "agents" / f"{agent_id}.sock"))
    ag.call("hello")
    tags = sorted(x["tag"] for sl in ag.call("slots")["slots"] for x in sl["sessions"])
    assert tags == ["bash_stateful", "tmux"], tags
    ag.close()


def test_a_shell_or_terminal_that_died_between_calls_is_replaced(controller, client):
    a = acquire(client, "a")
    sh(client, a, "export X=old")
    sh(client, a, "(sleep 0.3; kill -9 $$) >/dev/null 2>&1 &")
    time.sleep(1.5)
    r = sh(client, a, "echo ${X:-unset}")
    assert r["stdout"] == b"unset\n" and r["exit_code"] == 0, r
    # a terminal whose shell exited: start opens a new one
    first = tool(client, a, "tmux", action="start", pane_width=40, pane_height=6)
    wait_screen(client, a, "$")
    tool(client, a, "tmux", action="send_keys", keys=["exit", "Enter"])
    deadline = time.monotonic() + 10
    while tool(client, a, "tmux", action="capture")["alive"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    again = tool(client, a, "tmux", action="start")
    assert again["session"] != first["session"] and again["alive"], again
    wait_screen(client, a, "$")


def test_queued_calls_of_a_trainer_that_left_do_not_run(controller):
    c1 = controller.client()
    a = acquire(c1, "a")
    c1.send("batch", {"requests": [
        {"slot": a, "tool": "bash_stateful", "args": {"command": "sleep 1; touch first"}},
        {"slot": a, "tool": "bash_stateful", "args": {"command": "touch second"}}]})
    time.sleep(0.3)
    c1.close()
    c2 = controller.client()
    time.sleep(2.5)
    r = c2.call("exec", {"slot": a, "tool": "bash", "args": {"command": "ls"}})
    assert b"second" not in r["stdout"], r
    # the lease stays usable from another connection
    assert sh(c2, a, "echo ok")["stdout"] == b"ok\n"
    c2.close()


def test_an_agent_that_stops_answering_does_not_hang_the_slots_queue(controller, client):
    a = acquire(client, "a")
    sh(client, a, "export KEEP=1")
    pid = next(x["pid"] for x in client.call("agents")["agents"]
               if x["id"] == a.split("/")[0])
    os.kill(pid, signal.SIGSTOP)
    try:
        first = client.send("exec", {"slot": a, "tool": "bash_stateful",
                                     "args": {"command": "true", "timeout": 1}})
        second = client.send("exec", {"slot": a, "tool": "bash_stateful",
                                      "args": {"command": "echo second"}})
        t0 = time.monotonic()
        r, _ = client.wait(first, timeout=60)
        assert r["error"]["code"] == "timeout", r
        assert time.monotonic() - t0 < 40
    finally:
        os.kill(pid, signal.SIGCONT)
    # the queue went on: the second call is answered (it may meet the
    # first command still running in the shell), and the shell lives on
    r, _ = client.wait(second, timeout=60)
    assert r["ok"] or r["error"]["code"] == "slot_busy", r
    deadline = time.monotonic() + 10
    while True:
        r = client.call_raw("exec", {"slot": a, "tool": "bash_stateful",
                                     "args": {"command": "echo $KEEP"}})
        if r["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r["ok"] and r["result"]["stdout"] == b"1\n", r


# ---- the trainer executor's tmux arguments --------------------------------

def tmux(c: Client, slot: str, **args) -> dict:
    return tool(c, slot, "tmux", **args)


def tmux_err(c: Client, slot: str, **args) -> dict:
    r = c.call_raw("exec", {"slot": slot, "tool": "tmux", "args": args}, timeout=60)
    assert not r["ok"], r
    return r["error"]


def test_tmux_actions_any_case_and_capture_by_default(controller, client):
    a = acquire(client, "a")
    # no action: capture, which starts a terminal first (120 x 40 by default)
    r = tmux(client, a)
    assert r["size"] == {"rows": 40, "cols": 120} and r["alive"], r
    assert "started" not in r and len(r["rows"]) == 40
    st = tmux(client, a, action="START", pane_width=60)
    assert st["started"] and st["created"] is False and st["session"] == r["session"]
    assert st["size"]["cols"] == 120  # the pane size applies only when a terminal is made
    wait_screen(client, a, "$")
    w = tmux(client, a, action=" Send_Keys ", keys=["echo case-$((2+3))", "Enter"])
    assert w["written"] == len("echo case-$((2+3))\r") and w["prompt"] is False, w
    wait_screen(client, a, "case-5")
    assert any("case-5" in row for row in tmux(client, a, action="Capture")["rows"])
    assert tmux(client, a, action="STOP") == {"stopped": True}


def test_tmux_stop_without_a_terminal_and_capture_after_stop(controller, client):
    a = acquire(client, "a")
    assert tmux(client, a, action="stop") == {"stopped": True}
    assert tmux(client, a, action="stop", keys=[1]) == {"stopped": True}
    first = tmux(client, a, action="start")
    assert first["created"] is True
    assert tmux(client, a, action="stop") == {"stopped": True}
    r = tmux(client, a, action="capture")
    assert r["session"] != first["session"] and r["alive"] and "rows" in r
    # send_keys and stream on a stopped terminal start a fresh one too
    tmux(client, a, action="stop")
    w = tmux(client, a, action="send_keys", keys=["echo fresh", "Enter"], block=True,
             max_wait_s=20)
    assert w["prompt"] is True, w
    wait_screen(client, a, "fresh")
    tmux(client, a, action="stop")
    s = tmux(client, a, action="stream")
    assert s["offset"] == 0 and s["data"] == b"", s


def test_tmux_block_returns_when_the_command_finishes(controller, client):
    a = acquire(client, "a")
    tmux(client, a, action="start", pane_width=80, pane_height=20)
    t0 = time.monotonic()
    # no Enter: with block it is added, as the trainer's server does
    w = tmux(client, a, action="send_keys", keys="sleep 1; echo done-$((40+2))", block=True)
    took = time.monotonic() - t0
    assert w["prompt"] is True and w["alive"] is True, w
    assert 0.9 <= took < 15 and w["waited_ms"] >= 900, (took, w)
    rows = tmux(client, a, action="capture")["rows"]
    assert "done-42" in rows, rows
    # a second blocked line in the same terminal: the state persists
    w = tmux(client, a, action="send_keys", keys=["X=kept; cd /tmp", "Enter"], block=True)
    assert w["prompt"] is True
    tmux(client, a, action="send_keys", keys=["echo $X $PWD", "Enter"], block=True)
    assert "kept /tmp" in tmux(client, a, action="capture")["rows"]


def test_tmux_block_timeout_fails_and_tears_the_terminal_down(controller, client):
    a = acquire(client, "a")
    first = tmux(client, a, action="start")
    m = f"30.{time.monotonic_ns() % 10**9:09d}"
    t0 = time.monotonic()
    e = tmux_err(client, a, action="send_keys", keys=[f"sleep {m}", "Enter"], block=True,
                 max_wait_s=1)
    assert e == {"code": "timeout", "message": "tmux blocked keys timed out after 1.0s"}, e
    assert time.monotonic() - t0 < 15
    assert not wait_gone(m, 10), "the blocked command still runs"  # gone with its terminal
    r = tmux(client, a, action="capture")
    assert r["session"] != first["session"] and r["alive"], r
    # max_wait_s defaults to the call's timeout (`timeout` seconds here)
    e = tmux_err(client, a, action="send_keys", keys="sleep 30", block=True, timeout=1.5)
    assert e["message"] == "tmux blocked keys timed out after 1.5s", e
    # ... or the exec's timeout_ms
    r = client.call_raw("exec", {"slot": a, "tool": "tmux", "timeout_ms": 1000,
                                 "args": {"action": "send_keys", "keys": "sleep 30",
                                          "block": True}}, timeout=60)
    assert r["error"]["message"] == "tmux blocked keys timed out after 1.0s", r
    assert tmux(client, a, action="send_keys", keys="true", block=True)["prompt"] is True


def test_tmux_min_wait_delays_the_answer(controller, client):
    a = acquire(client, "a")
    tmux(client, a, action="start")
    t0 = time.monotonic()
    w = tmux(client, a, action="send_keys", keys=["true", "Enter"], min_wait_s=1.0)
    assert time.monotonic() - t0 >= 0.95 and w["waited_ms"] >= 950, w
    # with block: at least min_wait_s, then until the prompt
    t0 = time.monotonic()
    w = tmux(client, a, action="send_keys", keys="echo quick", block=True, min_wait_s=0.8)
    assert w["prompt"] is True and time.monotonic() - t0 >= 0.75, w
    t0 = time.monotonic()
    w = tmux(client, a, action="send_keys", keys="sleep 1.2", block=True, min_wait_s=0.2)
    assert w["prompt"] is True and time.monotonic() - t0 >= 1.1, w


def test_tmux_capture_entire_returns_the_history(controller, client):
    a = acquire(client, "a")
    tmux(client, a, action="start", pane_width=40, pane_height=10)
    w = tmux(client, a, action="send_keys", keys=["seq 1 500", "Enter"], block=True)
    assert w["prompt"], w
    screen = tmux(client, a, action="capture")
    assert "history" not in screen and "500" in screen["rows"] and "1" not in screen["rows"]
    whole = tmux(client, a, action="capture", capture_entire=True)
    hist = whole["history"]
    assert "$ seq 1 500" in hist, hist[:5]
    nums = [h for h in hist if h.isdigit()]
    assert nums[:3] == ["1", "2", "3"] and "500" in whole["rows"], (nums[:5], whole["rows"])
    assert nums + [r for r in whole["rows"] if r.isdigit()] == [str(i) for i in range(1, 501)]


def test_tmux_stream_returns_new_whole_lines(controller, client):
    a = acquire(client, "a")
    tmux(client, a, action="start", pane_width=80, pane_height=20)
    tmux(client, a, action="send_keys", keys="echo alpha", block=True)
    s1 = tmux(client, a, action="stream")
    assert s1["offset"] == 0 and b"alpha\r\n" in s1["data"] and s1["data"].endswith(b"\n")
    assert s1["next_offset"] == len(s1["data"])
    tmux(client, a, action="send_keys", keys="echo beta", block=True)
    s2 = tmux(client, a, action="stream")
    assert s2["offset"] == s1["next_offset"], (s1, s2)
    assert b"beta\r\n" in s2["data"] and b"alpha" not in s2["data"], s2
    # nothing new: nothing (the prompt's line is not finished)
    s3 = tmux(client, a, action="stream")
    assert s3["data"] == b"" and s3["offset"] == s2["next_offset"], s3
    # reset rewinds to the start
    s4 = tmux(client, a, action="stream", reset=True)
    assert s4["offset"] == 0 and b"alpha" in s4["data"] and b"beta" in s4["data"]
    # max_bytes: cut after the last newline that fits; a longer line comes
    # max_bytes at a time
    tmux(client, a, action="send_keys", keys="printf 'aaaa\\nbbbb\\ncccc\\n'", block=True)
    off = s4["next_offset"]
    chunks = []
    for _ in range(100):
        s = tmux(client, a, action="stream", max_bytes=14)
        assert s["offset"] == off and s["next_offset"] == off + len(s["data"]), s
        if not s["data"]:
            break
        assert s["data"].endswith(b"\n") or len(s["data"]) == 14, s
        chunks.append(s["data"])
        off = s["next_offset"]
    assert any(c.count(b"\n") >= 2 for c in chunks), chunks  # several lines at once
    assert b"aaaa\r\nbbbb\r\ncccc\r\n" in b"".join(chunks), chunks
    # a line longer than max_bytes comes max_bytes at a time
    tmux(client, a, action="send_keys", keys="printf '%0300d\\n' 7", block=True)
    got = [tmux(client, a, action="stream", max_bytes=100)["data"] for _ in range(6)]
    assert b"0" * 100 in got and b"0" * 99 + b"7" in b"".join(got), got
    # hostile sizes are clamped, not refused
    s = tmux(client, a, action="stream", max_bytes=10**12, reset=True)
    assert 0 < len(s["data"]) <= 200000 and s["data"].endswith(b"\n")
    s = tmux(client, a, action="stream", max_bytes=-5, reset=True)
    assert len(s["data"]) <= 1
    # start rewinds the stream as well (the terminal keeps running)
    tmux(client, a, action="start")
    assert tmux(client, a, action="stream")["offset"] == 0


def test_tmux_pane_size_is_clamped_and_set_only_at_creation(controller, client):
    a = acquire(client, "a")
    r = tmux(client, a, action="start", pane_width=5, pane_height=1000)
    assert r["size"] == {"rows": 200, "cols": 20}, r["size"]
    r = tmux(client, a, action="start", pane_width=100, pane_height=30)
    assert r["size"] == {"rows": 200, "cols": 20} and r["created"] is False
    tmux(client, a, action="stop")
    r = tmux(client, a, action="start", pane_width=10**6, pane_height=-3)
    assert r["size"] == {"rows": 10, "cols": 500} and r["created"] is True, r["size"]
    # the shell sees it too
    tmux(client, a, action="send_keys", keys="stty size", block=True)
    assert "10 500" in tmux(client, a, action="capture")["rows"]


def tcp_listener():
    import socket
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def test_network_policy_applies_when_the_session_opens(controller, client):
    srv, port = tcp_listener()
    try:
        probe = (f"(exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo CONN-OK "
                 f"|| echo CONN-FAIL")
        a = acquire(client, "a")
        b = acquire(client, "b")
        # allowed (the default): the listener is reached
        r = sh(client, a, probe, allow_network=True, require_sandbox=False)
        assert r["stdout"] == b"CONN-OK\n", r
        r = sh(client, b, probe, allow_network=False, require_stateful_sandbox=False)
        assert r["stdout"] == b"CONN-FAIL\n", r
        # the shell keeps the policy it was opened with
        r = sh(client, b, probe, allow_network=True)
        assert r["stdout"] == b"CONN-FAIL\n", r
        r = sh(client, a, probe, allow_network=False)
        assert r["stdout"] == b"CONN-OK\n", r
        # tmux: the same, for its terminal
        tmux(client, b, action="start", allow_network=False, require_stateful_sandbox=False)
        w = tmux(client, b, action="send_keys", keys=probe, block=True, allow_network=True)
        assert w["prompt"], w
        rows = tmux(client, b, action="capture")["rows"]
        assert "CONN-FAIL" in rows and "CONN-OK" not in rows, rows
        tmux(client, a, action="send_keys", keys=probe, block=True)  # started by send_keys
        rows = tmux(client, a, action="capture")["rows"]
        assert "CONN-OK" in rows, rows
    finally:
        srv.close()


def test_sandbox_required_runs_where_the_agent_can_isolate(controller, client):
    a = acquire(client, "a")
    r = sh(client, a, "echo sandboxed", require_stateful_sandbox=True, allow_network=False)
    assert r["stdout"] == b"sandboxed\n" and r["exit_code"] == 0, r
    b = acquire(client, "b")
    # require_sandbox is the fallback when require_stateful_sandbox is absent
    r = sh(client, b, "echo fallback", require_sandbox=True)
    assert r["stdout"] == b"fallback\n", r
    st = tmux(client, a, action="start", require_stateful_sandbox=True, allow_network=False)
    assert st["created"] and st["alive"], st
    w = tmux(client, a, action="send_keys", keys="echo in-tmux", block=True,
             require_stateful_sandbox=True)
    assert w["prompt"] is True
    assert "in-tmux" in tmux(client, a, action="capture")["rows"]


def test_hostile_tmux_values_leave_the_slot_usable(controller, client):
    a = acquire(client, "a")
    tmux(client, a, action="start")
    for args in ({"action": "send_keys", "keys": ["a", None]},
                 {"action": "send_keys", "keys": "x", "min_wait_s": float("nan")},
                 {"action": "send_keys", "keys": "x", "max_wait_s": float("inf")},
                 {"action": "send_keys", "keys": "x", "min_wait_s": -0.001},
                 {"action": "capture", "pane_width": [1]},
                 {"action": "stream", "max_bytes": None, "reset": "no"},
                 {"action": "\x00start"}):
        e = tmux_err(client, a, **args)
        assert e["code"] == "bad_request", (args, e)
    # nil counts as not given
    r = tmux(client, a, action="capture", capture_entire=None, pane_width=None)
    assert r["alive"]
    w = tmux(client, a, action="send_keys", keys="echo still-fine", block=True)
    assert w["prompt"] and "still-fine" in tmux(client, a, action="capture")["rows"]
    assert sh(client, a, "echo fine")["stdout"] == b"fine\n"
