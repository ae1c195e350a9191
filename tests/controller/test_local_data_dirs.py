"""The local backend names an agent's data dir STATE/data/PROFILE/N, N the
lowest index no live agent uses (held by an flock on N.lock for the agent's
life), so host paths do not name the agent and repeat; acquire says where
commands see their workspace (cwd_path); clean-up of stale data dirs removes
exactly those no live agent holds."""
from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path

from conftest import Controller

ONE = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n"
       "    max_agents: 1\n")
TWO = ("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 2\n"
       "    max_agents: 2\n")
SOCKET_TWO = TWO + "    local:\n      mode: socket\n"


def bash(c, slot: str, cmd: str) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "args": {"command": cmd}})


def data_dir_of(workspace: str) -> Path:
    return Path(workspace).parents[2]  # DATA/slots/N/work


def wait_for(pred, timeout: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def indexes(ctl: Controller) -> list[str]:
    d = ctl.state_dir / "data" / "default"
    return sorted(p.name for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_data_dirs_are_indexed_and_acquire_gives_cwd_path(controller_factory):
    ctl = controller_factory(TWO)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    a, b = c.call("acquire", {"trajectory_id": "a"}), c.call("acquire", {"trajectory_id": "b"})
    dirs = sorted(str(data_dir_of(x["workspace"])) for x in (a, b))
    base = ctl.state_dir / "data" / "default"
    assert dirs == [str(base / "0"), str(base / "1")]
    for x in (a, b):
        assert x["agent"] not in x["workspace"]  # the path does not name the agent
        out = bash(c, x["slot"], "pwd; echo $HOME")
        assert out["stdout"] == f"{x['cwd_path']}\n{x['cwd_path']}\n".encode(), out
        # the agent's own listing agrees
        assert x["cwd_path"] in ("/workspace", x["workspace"])
    # each index is locked by its agent process while it lives
    for i in ("0", "1"):
        with open(base / f"{i}.lock", "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError(f"index {i} is not locked by its agent")
            except BlockingIOError:
                pass
    c.close()


def test_a_lost_agents_index_is_reused_empty(controller_factory):
    ctl = controller_factory(ONE)
    c = ctl.client()
    r = c.call("acquire", {"trajectory_id": "t"})
    assert data_dir_of(r["workspace"]) == ctl.state_dir / "data" / "default" / "0"
    bash(c, r["slot"], "echo old > f")
    pid = c.call("agents")["agents"][0]["pid"]
    os.kill(pid, signal.SIGKILL)
    # a replacement comes, on the same (emptied) index
    wait_for(lambda: any(a["state"] == "ready" and a["pid"] != pid
                         for a in c.call("agents")["agents"]), what="a replacement agent")
    r2 = c.call("acquire", {"trajectory_id": "t2", "timeout_ms": 10000})
    assert r2["agent"] != r["agent"]
    assert data_dir_of(r2["workspace"]) == data_dir_of(r["workspace"]), ctl.log()[-3000:]
    assert bash(c, r2["slot"], "ls -A")["stdout"] == b""
    wait_for(lambda: not [p for p in (ctl.state_dir / "data" / "default").iterdir()
                          if p.name.startswith(".gone-")], what="the old tree's removal")
    c.close()


def test_killed_controller_leftovers_are_removed_but_not_a_locked_index(controller_factory):
    ctl = controller_factory(ONE)
    c = ctl.client()
    r = c.call("acquire", {"trajectory_id": "t"})
    bash(c, r["slot"], "echo left > f")
    pid = c.call("agents")["agents"][0]["pid"]
    c.close()
    ctl.kill9()
    # stdio agents end with their controller's stream
    wait_for(lambda: not Path(f"/proc/{pid}").exists()
             or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2], what="agent exit")
    base = ctl.state_dir / "data" / "default"
    # what the agent left: its workspace, or the image of the slot's own
    # filesystem (disk mode fs: unmounted when the agent ended)
    assert (base / "0" / "slots" / "0" / "work" / "f").exists() or \
        (base / "0" / "overlay" / ".disks" / "0.img").exists()
    # another live process (an agent of another controller sharing the base)
    # holds index 1: its data must survive, and its index is not taken
    (base / "1" / "slots").mkdir(parents=True)
    (base / "1" / "keep").write_text("in use")
    held = open(base / "1.lock", "a+b")
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    # an unlocked leftover index beyond: removed
    (base / "5" / "slots").mkdir(parents=True)
    (base / "5.lock").touch()
    try:
        ctl.expect_clean_exit = True
        ctl.config_path.write_text(TWO)
        ctl.start()
        ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
        c = ctl.client()
        ws = sorted(str(data_dir_of(x["workspace"])) for x in
                    (c.call("acquire", {"trajectory_id": f"n{i}"}) for i in range(2)))
        assert ws == [str(base / "0"), str(base / "2")]
        wait_for(lambda: not (base / "5").exists(), what="the stale index 5 removed")
        assert (base / "1" / "keep").read_text() == "in use"
        assert not (base / "0" / "slots" / "0" / "work" / "f").exists()
        c.close()
    finally:
        held.close()


def test_socket_agents_keep_their_data_dir_across_a_controller_restart(controller_factory):
    ctl = controller_factory(SOCKET_TWO)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"traj-{i}"}) for i in range(2)]
    for i, s in enumerate(slots):
        bash(c, s["slot"], f"echo {i} > state.txt")
    c.close()
    ctl.kill9()
    ctl.expect_clean_exit = True
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 2)
    c = ctl.client()
    for i, s in enumerate(slots):
        assert bash(c, s["slot"], "cat state.txt")["stdout"] == f"{i}\n".encode()
    assert indexes(ctl) == ["0", "1"]
    # `stop` ends the agents and then their data dirs go
    c.call("stop")
    c.close()
    ctl.proc.wait(30)
    wait_for(lambda: indexes(ctl) == [], what="data dirs removed after stop")
