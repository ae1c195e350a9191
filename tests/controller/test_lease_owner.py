"""Lease owners against the real controller and real local agents.

A lease belongs to the owner of the trainer connection that took it (the
`owner` of `hello`, else the connection's own). When the owner's last
connection goes, its bound leases are released with reset after the
profile's lease_grace, unless the owner comes back first; `bind: false`
leases and lease_timeout; the owner across a controller restart; and the
trainer's sandbox policy arguments of the bash tool.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import AGENTCTL_BIN, ROOT, Controller
from helpers_proc import pids_with_arg, wait_gone, wait_present, wait_until
from slotwire import AgentError, Client

GRACE_CFG = ("profiles:\n  default:\n    slots_per_agent: {slots}\n    min_agents: 1\n"
             "    max_agents: 1\n    lease_grace: {grace}\n")


def cfg(slots: int = 2, grace: str = "1s", extra: str = "") -> str:
    return GRACE_CFG.format(slots=slots, grace=grace) + extra


def hello(c: Client, owner: str | None = None) -> dict:
    return c.call("hello", {"owner": owner} if owner is not None else {})


def bash(c: Client, slot: str, command: str, **kw) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "args": {"command": command, **kw}})


def leases(ctl: Controller) -> dict[str, dict]:
    c = ctl.client()
    try:
        return {x["slot"]: x for x in c.call("leases")["leases"]}
    finally:
        c.close()


def agentctl(ctl: Controller, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLOT_AGENT", "SLOT_CONTROLLER", "SLOT_TOKEN_FILE")}
    return subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def mark_slot(c: Client, slot: str) -> str:
    """A file and a background process in the slot; the sleep's unique
    argument finds the process from outside."""
    tag = f"{900 + (uuid.uuid4().int % 10000) / 10000:.4f}"
    bash(c, slot, f"echo mine > kept.txt; sleep {tag} >/dev/null 2>&1 &", keep_background=True)
    assert wait_present(tag, 10), "the background sleep"
    return tag


def assert_released_with_reset(ctl: Controller, slot: str, workspace: str, tag: str) -> None:
    """slot's lease is gone, its file and process with it, and the slot can
    be leased again, empty."""
    # The lease leaves the list when the release starts; the reset follows.
    assert wait_until(lambda: not Path(workspace, "kept.txt").exists(), 10, what="the reset")
    assert not wait_gone(tag, 10), "the sleep outlived the reset"
    c = ctl.client()
    try:
        assert c.error_code("exec", {"slot": slot, "args": {"command": "true"}}) == "not_leased"
        got = c.call("acquire", {"trajectory_id": "after", "timeout_ms": 10000})
        assert got["workspace"] == workspace or got["slot"] != slot
        assert bash(c, got["slot"], "ls -A")["stdout"] == b""
    finally:
        c.close()


# ---- hello, listings ---------------------------------------------------------


def test_hello_echoes_the_owner_and_leases_list_it(controller_factory):
    ctl = controller_factory(cfg(grace="60s"))
    a, anon1, anon2 = ctl.client(), ctl.client(), ctl.client()
    assert hello(a, "trainer-a")["owner"] == "trainer-a"
    o1, o2 = hello(anon1)["owner"], hello(anon2)["owner"]
    assert o1.startswith("conn-") and o2.startswith("conn-") and o1 != o2
    r = a.call("acquire", {"trajectory_id": "t1"})
    assert r["owner"] == "trainer-a" and r["bound"] is True
    r2 = anon1.call("acquire", {"trajectory_id": "t2", "bind": False})
    assert r2["owner"] == o1 and r2["bound"] is False
    ls = leases(ctl)
    assert ls[r["slot"]]["owner"] == "trainer-a" and ls[r["slot"]]["bound"] is True
    assert ls[r2["slot"]]["owner"] == o1 and ls[r2["slot"]]["bound"] is False
    assert all("grace_left_ms" not in x for x in ls.values())
    slots = {x["slot"]: x for x in a.call("slots")["slots"] if x["slot"]}
    assert slots[r["slot"]]["owner"] == "trainer-a" and slots[r["slot"]]["bound"] is True
    free = [x for x in a.call("slots")["slots"] if x["state"] == "free"]
    assert all(x["owner"] is None and x["bound"] is False for x in free)
    # agentctl leases: OWNER and GRACE columns
    out = agentctl(ctl, "leases")
    assert out.returncode == 0, out.stderr
    lines = [ln.split() for ln in out.stdout.splitlines()]
    assert lines[0][:4] == ["SLOT", "TRAJECTORY", "OWNER", "GRACE"]
    assert next(ln for ln in lines if ln[0] == r["slot"])[1:4] == ["t1", "trainer-a", "-"]
    assert next(ln for ln in lines if ln[0] == r2["slot"])[1:4] == ["t2", o1, "unbound"]
    js = json.loads(agentctl(ctl, "--json", "leases").stdout)
    assert {x["owner"] for x in js["leases"]} == {"trainer-a", o1}
    # a second hello may change the owner
    assert hello(anon2, "trainer-b")["owner"] == "trainer-b"
    for c in (a, anon1, anon2):
        c.close()


def test_hostile_owner_values_are_refused_and_the_connection_stays_usable(controller):
    c = controller.client()
    for bad, needle in [(7, "must be a string"), ("x" * 200, "1..128 bytes"),
                        ("", "1..128 bytes"), ("a\0b", "control"), ("a\nb", "control"),
                        (["x"], "must be a string"), (b"raw", "must be a string")]:
        resp = c.call_raw("hello", {"owner": bad})
        assert resp["ok"] is False, (bad, resp)
        assert resp["error"]["code"] == "bad_request", (bad, resp)
        assert "owner" in resp["error"]["message"] and needle in resp["error"]["message"], resp
        assert c.call("status")["agents"]["total"] >= 0
    # nothing changed: still the connection's own owner; a good one works
    assert hello(c)["owner"].startswith("conn-")
    assert hello(c, "x" * 128)["owner"] == "x" * 128
    assert hello(c, "ünïcode-trainer")["owner"] == "ünïcode-trainer"
    assert c.error_code("acquire", {"bind": "yes"}) == "bad_request"
    assert c.call("leases")["leases"] == []
    c.close()


def test_lease_timeout_defaults_to_30m_and_lease_grace_to_60s(controller_factory):
    ctl = controller_factory()
    c = ctl.client()
    p = c.call("profiles")["profiles"][0]
    assert p["lease_timeout_ms"] == 30 * 60 * 1000
    assert p["lease_grace_ms"] == 60 * 1000
    c.close()
    js = json.loads(agentctl(ctl, "--json", "profiles").stdout)
    assert js["profiles"][0]["lease_timeout_ms"] == 1800000
    # 0 set explicitly still means never
    ctl2 = controller_factory(cfg(extra="    lease_timeout: 0\n"))
    c = ctl2.client()
    p = c.call("profiles")["profiles"][0]
    assert p["lease_timeout_ms"] == 0 and p["lease_grace_ms"] == 1000
    c.close()


# ---- a trainer that goes ----------------------------------------------------


def test_closed_connection_leases_are_released_with_reset_after_the_grace(controller_factory):
    ctl = controller_factory(cfg(slots=1, grace="2s"))
    c = ctl.client()
    hello(c, "t-close")
    r = c.call("acquire", {"trajectory_id": "gone"})
    tag = mark_slot(c, r["slot"])
    c.close()
    closed = time.monotonic()
    # just after: still leased, its grace running, its files intact
    ls = wait_until(lambda: (x := leases(ctl)) and "grace_left_ms" in x[r["slot"]] and x, 5,
                    what="the grace deadline")
    assert time.monotonic() - closed < 2.0
    assert 0 < ls[r["slot"]]["grace_left_ms"] <= 2000
    assert Path(r["workspace"], "kept.txt").read_text() == "mine\n"
    assert pids_with_arg(tag)
    row = next(ln.split() for ln in agentctl(ctl, "leases").stdout.splitlines()
               if ln.startswith(r["slot"]))
    assert row[2] == "t-close" and row[3].endswith(("ms", "s")) and row[3] != "-", row
    # then released with reset, and not before the grace
    wait_until(lambda: r["slot"] not in leases(ctl), 15, what="the release")
    assert time.monotonic() - closed >= 1.5
    assert_released_with_reset(ctl, r["slot"], r["workspace"], tag)
    log = ctl.log()
    assert "owner 't-close' did not come back within lease_grace" in log, log[-2000:]


CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from slotwire import Client
c = Client.unix(sys.argv[2])
c.call("hello", {"owner": "t-kill"})
out = []
for i in range(2):
    r = c.call("acquire", {"trajectory_id": f"child-{i}"})
    c.call("exec", {"slot": r["slot"], "tool": "bash", "args": {
        "command": f"echo mine > kept.txt; sleep {sys.argv[3]}.{i} >/dev/null 2>&1 &",
        "keep_background": True}})
    out.append(r["slot"] + " " + r["workspace"])
print("\n".join(out), flush=True)
time.sleep(600)
"""


def test_killed_trainer_process_leases_are_released_after_the_grace(controller_factory):
    ctl = controller_factory(cfg(slots=2, grace="1s"))
    tag = str(800 + uuid.uuid4().int % 100)
    child = subprocess.Popen(["/usr/bin/python3", "-c", CHILD, str(ROOT / "tests" / "integration"),
                              ctl.sock, tag], stdout=subprocess.PIPE, text=True)
    try:
        lines = [child.stdout.readline().split() for _ in range(2)]
        assert all(len(x) == 2 for x in lines), lines
        for i in range(2):
            assert wait_present(f"{tag}.{i}", 10), "the child's sleep"
        assert {x["owner"] for x in leases(ctl).values()} == {"t-kill"}
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        killed = time.monotonic()
        ls = wait_until(lambda: (x := leases(ctl)) and all("grace_left_ms" in v for v in x.values())
                      and x, 5, what="grace deadlines")
        assert len(ls) == 2 and time.monotonic() - killed < 1.0
        wait_until(lambda: not leases(ctl), 15, what="the releases")
        for i, (slot, ws) in enumerate(lines):
            assert wait_until(lambda: not Path(ws, "kept.txt").exists(), 10, what="the reset")
            assert not wait_gone(f"{tag}.{i}", 10), "the sleep outlived the reset"
        c = ctl.client()
        again = [c.call("acquire", {"timeout_ms": 10000})["slot"] for _ in range(2)]
        assert all(bash(c, s, "ls -A")["stdout"] == b"" for s in again)
        c.close()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


def test_owner_back_within_the_grace_keeps_its_leases(controller_factory):
    ctl = controller_factory(cfg(slots=2, grace="1500ms"))
    c = ctl.client()
    hello(c, "t-back")
    r = c.call("acquire", {"trajectory_id": "blip"})
    tag = mark_slot(c, r["slot"])
    c.close()
    wait_until(lambda: "grace_left_ms" in leases(ctl).get(r["slot"], {}), 5, what="the deadline")
    # another trainer's connection does not count
    other = ctl.client()
    hello(other, "someone-else")
    c = ctl.client()
    assert hello(c, "t-back")["owner"] == "t-back"
    assert "grace_left_ms" not in leases(ctl)[r["slot"]]
    time.sleep(2.5)  # well past the grace
    ls = leases(ctl)
    assert ls[r["slot"]]["owner"] == "t-back" and ls[r["slot"]]["bound"] is True
    assert bash(c, r["slot"], "cat kept.txt")["stdout"] == b"mine\n"
    assert pids_with_arg(tag)
    # two connections of one owner: the lease waits for the last to go
    c2 = ctl.client()
    hello(c2, "t-back")
    c.close()
    time.sleep(2.0)
    assert "grace_left_ms" not in leases(ctl)[r["slot"]]
    c2.close()
    wait_until(lambda: r["slot"] not in leases(ctl), 15, what="the release")
    assert_released_with_reset(ctl, r["slot"], r["workspace"], tag)
    other.close()


def test_unbound_lease_survives_its_owner(controller_factory):
    ctl = controller_factory(cfg(slots=2, grace="500ms"))
    c = ctl.client()
    hello(c, "t-free")
    r = c.call("acquire", {"trajectory_id": "free", "bind": False})
    assert r["bound"] is False
    bash(c, r["slot"], "echo mine > kept.txt")
    c.close()
    time.sleep(2.0)
    ls = leases(ctl)
    assert ls[r["slot"]]["owner"] == "t-free" and ls[r["slot"]]["bound"] is False
    assert "grace_left_ms" not in ls[r["slot"]]
    c = ctl.client()
    assert bash(c, r["slot"], "cat kept.txt")["stdout"] == b"mine\n"
    c.close()
    # agentctl acquire takes unbound leases: later agentctl runs use the slot
    out = agentctl(ctl, "acquire", "--trajectory", "by-hand")
    assert out.returncode == 0, out.stderr
    h = out.stdout.strip()
    time.sleep(1.5)
    ls = leases(ctl)
    assert ls[h]["bound"] is False and "grace_left_ms" not in ls[h]
    assert agentctl(ctl, "exec", h, "--", "echo still").stdout == "still\n"


def test_lease_timeout_still_ends_unbound_leases(controller_factory):
    ctl = controller_factory(cfg(slots=1, grace="60s", extra="    lease_timeout: 800ms\n"))
    c = ctl.client()
    r = c.call("acquire", {"bind": False})
    bash(c, r["slot"], "echo x > f")
    c.close()
    wait_until(lambda: not leases(ctl), 10, what="lease_timeout")
    assert wait_until(lambda: not Path(r["workspace"], "f").exists(), 10, what="the reset")


SOCKET_CFG = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 2\n"
              "    max_agents: 2\n    lease_grace: 3s\n    local:\n      mode: socket\n")


def test_restart_releases_leases_whose_owner_never_comes_back(controller_factory):
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    gone, back = ctl.client(), ctl.client()
    hello(gone, "t-gone")
    hello(back, "t-return")
    lg = gone.call("acquire", {"trajectory_id": "lost"})
    tag = mark_slot(gone, lg["slot"])
    lu = gone.call("acquire", {"trajectory_id": "unbound", "bind": False})
    lb = back.call("acquire", {"trajectory_id": "returns"})
    for x in (lu, lb):
        bash(back, x["slot"], "echo mine > kept.txt")
    ctl.kill9()
    gone.close()
    back.close()
    ctl.expect_clean_exit = True
    ctl.start()
    back = ctl.client()
    hello(back, "t-return")
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] >= 2)
    ls = leases(ctl)
    assert ls[lg["slot"]]["owner"] == "t-gone" and ls[lg["slot"]]["bound"] is True
    assert "grace_left_ms" in ls[lg["slot"]]
    assert ls[lu["slot"]]["owner"] == "t-gone" and ls[lu["slot"]]["bound"] is False
    assert "grace_left_ms" not in ls[lu["slot"]]
    assert ls[lb["slot"]]["owner"] == "t-return" and "grace_left_ms" not in ls[lb["slot"]]
    wait_until(lambda: lg["slot"] not in leases(ctl), 15, what="the release of t-gone's lease")
    assert wait_until(lambda: not Path(lg["workspace"], "kept.txt").exists(), 10, what="the reset")
    assert not wait_gone(tag, 10), "the sleep outlived the reset"
    assert set(leases(ctl)) == {lu["slot"], lb["slot"]}
    for x in (lu, lb):
        assert bash(back, x["slot"], "cat kept.txt")["stdout"] == b"mine\n"
    assert "owner 't-gone' did not come back" in ctl.log()
    back.close()


# ---- the trainer's sandbox policy for bash ----------------------------------


@pytest.fixture
def listener():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.settimeout(0.5)
    yield s
    s.close()


def accepted(s: socket.socket) -> bool:
    try:
        conn, _ = s.accept()
    except (socket.timeout, BlockingIOError):
        return False
    conn.close()
    return True


def test_allow_network_false_cannot_reach_a_local_listener(controller, listener):
    c = controller.client()
    slot = c.call("acquire")["slot"]
    port = listener.getsockname()[1]
    probe = f"exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
    on = bash(c, slot, probe, allow_network=True)
    assert on["stdout"] == b"connected\n" and on["network"] is True, on
    assert accepted(listener)
    off = bash(c, slot, probe, allow_network=False)
    assert off["exit_code"] != 0 and b"connected" not in off["stdout"], off
    assert off["network"] is False, off
    assert not accepted(listener)
    # the agent's own `network` wins over the trainer's allow_network
    both = bash(c, slot, probe, allow_network=False, network=True)
    assert both["stdout"] == b"connected\n" and both["network"] is True, both
    assert accepted(listener)
    # in a batch too
    [x] = c.call("batch", {"requests": [{"slot": slot, "tool": "bash", "args": {
        "command": probe, "allow_network": False}}]})["results"]
    assert x["ok"] and x["result"]["exit_code"] != 0 and x["result"]["network"] is False, x
    c.close()


def test_require_sandbox_runs_with_the_required_rungs(controller):
    c = controller.client()
    slot = c.call("acquire")["slot"]
    r = bash(c, slot, "echo boxed", require_sandbox=True)
    assert r["exit_code"] == 0 and r["stdout"] == b"boxed\n", r
    assert {"landlock", "seccomp", "containment"} <= set(r["isolation"]), r
    # an explicit best_effort cannot weaken it; it is still a sandboxed run
    r = bash(c, slot, "echo boxed", require_sandbox=True, isolation="best_effort")
    assert r["exit_code"] == 0 and {"landlock", "seccomp"} <= set(r["isolation"]), r
    r = bash(c, slot, "echo plain", require_sandbox=False, require_stateful_sandbox=True)
    assert r["exit_code"] == 0 and r["stdout"] == b"plain\n", r
    c.close()


NO_SECCOMP = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n"
              "    max_agents: 1\n    local:\n      args: [--without, seccomp]\n")


def test_allow_network_false_fails_closed_where_the_agent_cannot_enforce_it(
        controller_factory):
    """An agent without seccomp cannot keep a command off the network: the
    trainer's allow_network false is then refused, as its own server does,
    for bash and for the stateful tools; everything else still runs."""
    ctl = controller_factory(NO_SECCOMP)
    c = ctl.client()
    slot = c.call("acquire")["slot"]
    assert bash(c, slot, "echo open", allow_network=True)["stdout"] == b"open\n"
    for tool, args in (("bash", {"command": "echo never"}),
                       ("bash_stateful", {"command": "echo never"}),
                       ("tmux", {"action": "start"})):
        resp = c.call_raw("exec", {"slot": slot, "tool": tool,
                                   "args": {**args, "allow_network": False}})
        assert resp["ok"] is False, (tool, resp)
        assert resp["error"]["code"] == "isolation_unavailable", (tool, resp)
        assert "seccomp" in resp["error"]["message"], resp
    # the agent's own `network` keeps its best-effort meaning
    r = bash(c, slot, "echo best-effort", network=False)
    assert r["stdout"] == b"best-effort\n" and "seccomp" not in r["isolation"], r
    c.close()


def test_policy_arguments_of_the_wrong_type_and_unknown_ones_are_refused(controller):
    c = controller.client()
    slot = c.call("acquire")["slot"]
    for args, needle in [({"allow_network": "no"}, "'allow_network' must be a bool"),
                         ({"require_sandbox": 1}, "'require_sandbox' must be a bool"),
                         ({"require_stateful_sandbox": "x"},
                          "'require_stateful_sandbox' must be a bool"),
                         ({"allow_network": None}, "'allow_network' must be a bool"),
                         ({"frobnicate": True}, "unknown argument 'frobnicate'")]:
        resp = c.call_raw("exec", {"slot": slot, "tool": "bash",
                                   "args": {"command": "echo no", **args}})
        assert resp["ok"] is False and resp["error"]["code"] == "bad_request", (args, resp)
        assert needle in resp["error"]["message"], resp
    assert bash(c, slot, "echo fine")["stdout"] == b"fine\n"
    c.close()
