"""bash_stateful and tmux, the trainer tool names the controller maps onto
agent sessions: state kept per lease, calls on one slot in order, a fresh
shell after `exit`, a `reset` or a new lease, terminal keys and screens,
hostile arguments, and an agent lost with calls still queued."""
from __future__ import annotations

import os
import signal
import time

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
    wait_screen(client, a, "$")
    tool(client, a, "tmux", action="send_keys", keys=["echo hi-$((6*7))", "Enter"])
    wait_screen(client, a, "hi-42")
    # a second start keeps the running terminal
    again = tool(client, a, "tmux", action="start")
    assert again["session"] == r["session"] and again["size"]["cols"] == 50
    # C-c interrupts a foreground program; the shell answers again
    tool(client, a, "tmux", action="send_keys", keys="sleep 100")
    tool(client, a, "tmux", action="send_keys", keys="Enter")
    time.sleep(0.3)
    tool(client, a, "tmux", action="send_keys", keys=["C-c"])
    tool(client, a, "tmux", action="send_keys", keys=["echo back", "Enter"])
    wait_screen(client, a, "back")
    # keys go to the terminal session, commands to the bash_stateful one
    assert sh(client, a, "echo plain")["stdout"] == b"plain\n"
    tool(client, a, "tmux", action="stop")
    for action, extra in (("capture", {}), ("send_keys", {"keys": "x"}), ("stop", {})):
        assert client.error_code("exec", {"slot": a, "tool": "tmux",
                                          "args": {"action": action, **extra}}) == "not_found"
    r2 = tool(client, a, "tmux", action="start", pane_width=30, pane_height=5)
    assert r2["session"] != r["session"] and r2["size"] == {"rows": 5, "cols": 30}
    # a reset closes it; start opens a new one
    tool(client, a, "reset")
    r3 = tool(client, a, "tmux", action="start")
    assert r3["session"] not in (r["session"], r2["session"]), r3
    assert r3["size"] == {"rows": 40, "cols": 160}


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
        ("tmux", {}),
        ("tmux", {"action": "explode"}),
        ("tmux", {"action": 7}),
        ("tmux", {"action": "send_keys"}),
        ("tmux", {"action": "send_keys", "keys": [1, 2]}),
        ("tmux", {"action": "send_keys", "keys": {"a": 1}}),
        ("tmux", {"action": "start", "pane_width": 0}),
        ("tmux", {"action": "start", "pane_height": 100000}),
        ("tmux", {"action": "start", "what": 1}),
    ]
    for name, args in bad:
        r = client.call_raw("exec", {"slot": a, "tool": name, "args": args})
        assert not r["ok"] and r["error"]["code"] == "bad_request", (name, args, r)
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
    tool(c, b, "tmux", action="start", pane_width=40, pane_height=8)
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
    assert screen["size"] == {"rows": 8, "cols": 40}
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
