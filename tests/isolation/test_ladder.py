"""The rungs themselves, per condition: slot users own their workspaces,
boxes give each slot its own PID 1, /tmp and hidden siblings, and
keep_background leaves a command's background processes alive until reset."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from conftest import Cond


def run(cd: Cond, cmd: str, slot: int = 0, **kw) -> dict:
    return cd.client.call("exec", {"slot": slot, "cmd": cmd, **kw}, timeout=60)


def test_probe_matches_the_condition(cond: Cond) -> None:
    rungs = cond.rungs
    assert rungs["landlock"] and rungs["seccomp"] and rungs["rlimits"] and rungs["containment"]
    detail = cond.client.call("hello")["isolation_detail"]
    assert detail["slot_uid_base"] == 20000
    if cond.name == "root":
        assert rungs["uid"] and rungs["namespaces"]
        assert detail["cgroup_version"] in (1, 2) and detail["slot_memory"] == 256 << 20
        assert detail["network_namespace"] and not detail["user_namespace"]
    elif cond.name == "user":
        assert not rungs["uid"] and rungs["namespaces"]
        assert detail["user_namespace"] and detail["cgroup_version"] == 0
    else:  # Docker's default profile refuses unshare; root in it may change ids
        assert rungs["uid"] and not rungs["namespaces"]


def test_slot_users_own_their_workspace(cond: Cond) -> None:
    r = run(cond, "id -u; id -g; ls -ldn . | cut -c1-10", slot=3)
    uid, gid, mode = r["stdout"].decode().split()
    if cond.rungs["uid"]:
        assert (uid, gid, mode) == ("20003", "20003", "drwx------")
        cond.client.call("write_file", {"slot": 3, "path": "made-by-agent", "data": b"x"})
        r = run(cond, "ls -ln made-by-agent | awk '{print $3, $4}'", slot=3)
        assert r["stdout"] == b"20003 20003\n"
    else:
        assert uid != "0"


def test_box_has_its_own_pid_1_and_tmp(cond: Cond) -> None:
    r = run(cond, "echo $$; touch /tmp/mine-0", slot=0)
    if not cond.rungs["namespaces"]:
        assert int(r["stdout"]) > 1
        return
    assert int(r["stdout"]) < 100  # a fresh PID namespace
    r = run(cond, "ls /tmp", slot=1)
    assert b"mine-0" not in r["stdout"]
    # the slot's host path (SLOT_WORKSPACE is /workspace in a box)
    ws = cond.client.call("slots", {"slot": 1})["slots"][0]["workspace"]
    r = run(cond, f"ls {ws}/../..", slot=1)
    assert r["stdout"].split() == [b"1"]  # siblings hidden
    r = run(cond, "pwd; echo $SLOT_WORKSPACE", slot=1)
    assert r["stdout"] == b"/workspace\n/workspace\n"


def alive(cond: Cond, mark: str) -> bool:
    if cond.name == "docker":  # no boxes there: the slot sees every process
        ps = run(cond, "ps -e -o args 2>/dev/null || ps", slot=2)["stdout"]
        return f"sleep {mark}".encode() in ps
    # from the host, which sees into every box
    return subprocess.run(["pgrep", "-f", f"^sleep {mark}$"],
                          capture_output=True).returncode == 0


def test_keep_background(cond: Cond) -> None:
    mark = f"3{int(time.time() * 1000) % 100000:05d}"
    r = run(cond, f"sleep {mark} & echo started", keep_background=True)
    assert r["exit_code"] == 0
    time.sleep(1.5)  # past the agent's periodic sweep
    assert alive(cond, mark)
    # a later command's end does not take it
    run(cond, "true")
    assert alive(cond, mark)
    # reset does
    cond.client.call("reset", {"slot": 0}, timeout=30)
    deadline = time.monotonic() + 5
    while alive(cond, mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(cond, mark)
    # without keep_background the same command leaves nothing
    run(cond, f"sleep {mark} & echo started")
    time.sleep(0.3)
    assert not alive(cond, mark)


def test_cgroup_bounds_the_slot_as_a_whole(cond: Cond) -> None:
    if cond.name != "root":
        # the unprivileged agent has no cgroup of its own to write; Docker
        # mounts the cgroup tree read-only
        assert not cond.rungs["cgroup"]
        return
    assert cond.rungs["cgroup"]
    # 400 MiB in a slot capped at 256 MiB, with no per-process limit
    r = cond.client.call("exec", {"slot": 1, "argv": [cond.escape, "alloc", str(400 << 20)],
                                  "rlimits": {"as": 1 << 40}}, timeout=60)
    assert "cgroup" in r["isolation"]
    assert r["signal"] == 9, r  # the kernel's OOM killer, inside the slot only
    # 300 processes for the slot as a whole: a fork bomb with no per-command
    # limit is stopped by the group, and the other slots do not notice
    groups = [g for g in Path("/sys/fs/cgroup/pids").rglob(f"slot-agent-{cond.agent_pid}/slot-1")]
    assert len(groups) == 1, groups
    g = groups[0]
    assert (g / "pids.max").read_text().strip() == "300"
    rid = cond.client.send("exec", {"slot": 1, "cmd": "b(){ b | b & }; b; sleep 3",
                                    "timeout_ms": 3000})
    peak = 0
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        peak = max(peak, int((g / "pids.current").read_text()))
        assert run(cond, "echo fine", slot=2)["stdout"] == b"fine\n"
    cond.client.wait(rid, timeout=60)
    assert 0 < peak <= 300
    assert int((g / "pids.events").read_text().split()[1]) > 0  # forks refused
    cond.client.call("reset", {"slot": 1}, timeout=30)
    # the box's holder and PID 1 leave the group as the agent reaps them
    deadline = time.monotonic() + 5
    while int((g / "pids.current").read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert int((g / "pids.current").read_text()) == 0


def test_many_commands_through_boxes(cond: Cond) -> None:
    """Pipelined commands on every slot: each answer matches its command,
    whether the holder's answer or the exit reaches the agent first."""
    c = cond.client
    ids = {}
    for i in range(200):
        rid = c.send("exec", {"slot": i % 4, "cmd": f"exit {i % 7}"})
        ids[rid] = i % 7
    for rid, code in ids.items():
        resp = c.wait(rid, timeout=60)[0]
        assert resp["result"]["exit_code"] == code, resp
    d = c.call("exec", {"slot": 0, "cmd": "sleep 30", "detach": True})
    assert d["pid"] > 0 and d["detached"] is True
    resp, events = c.call_stream("exec", {"slot": 1, "cmd": "echo hi", "stream": True})
    started = [e for e in events if e.get("event") == "started"]
    assert len(started) == 1 and started[0]["pid"] > 0
    assert resp["result"]["exit_code"] == 0
    # cancelled right after it was asked for: killed once it has started
    rid = c.send("exec", {"slot": 2, "cmd": "sleep 30"})
    c.call("cancel", {"slot": 2})
    r = c.wait(rid, timeout=30)[0]["result"]
    assert r["exit_code"] != 0 or r["cancelled"]
    assert c.call("cancel", {"exec_id": d["exec_id"]})["cancelled"] == 1
