"""slot-controller end to end: the real controller, real local agents.

Leases, waiters, batches, agent loss, controller restart, bad configs,
disconnecting trainers and scaling, all against real processes.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import CONTROLLER_BIN, AGENT_BIN, Controller
from slotwire import AgentError, Client


def acquire(c: Client, traj: str = "t", **kw) -> str:
    return c.call("acquire", {"trajectory_id": traj, **kw})["slot"]


def bash(c: Client, slot: str, command: str, **kw) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "args": {"command": command, **kw}})


def agent_pids(ctl: Controller) -> dict[str, int]:
    c = ctl.client()
    try:
        return {a["id"]: a["pid"] for a in c.call("agents")["agents"] if a["state"] == "ready"}
    finally:
        c.close()


# ---- leases ---------------------------------------------------------------


def test_acquire_gives_a_leased_slot_recorded_in_the_agent(controller, client):
    r = client.call("acquire", {"trajectory_id": "traj-1"})
    assert r["trajectory_id"] == "traj-1" and r["profile"] == "default"
    agent, index, gen = r["slot"].split("/")
    assert agent == r["agent"] and int(index) == r["index"] and int(gen) == r["generation"]
    assert r["workspace"].endswith(f"/slots/{index}/work") and os.path.isdir(r["workspace"])
    # the agent itself holds the lease, under this controller's name
    ag = next(a for a in client.call("agents")["agents"] if a["id"] == agent)
    direct = Client.unix(ag["address"][len("unix:"):]) if ag["address"].startswith("unix:") \
        else None
    if direct is None:
        leases = client.call("leases")["leases"]
        assert [(x["slot"], x["trajectory_id"]) for x in leases] == [(r["slot"], "traj-1")]
    # cwd_path: where its commands see the workspace (/workspace in a box)
    assert r["cwd_path"] in ("/workspace", r["workspace"])
    out = bash(client, r["slot"], "pwd; id -u")
    assert out["exit_code"] == 0 and out["stdout"].decode().split()[0] == r["cwd_path"]


def test_generated_trajectory_ids_and_distinct_slots(controller, client):
    slots = [client.call("acquire") for _ in range(3)]
    assert len({s["slot"] for s in slots}) == 3
    assert all(s["trajectory_id"].startswith("traj-") for s in slots)
    assert len({s["trajectory_id"] for s in slots}) == 3


def test_release_with_reset_empties_the_workspace_before_reuse(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 1\n"
                             "    max_agents: 1\n")
    c = ctl.client()
    s1 = acquire(c, "a")
    bash(c, s1, "echo secret > notes.txt; sleep 1000 >/dev/null 2>&1 &", keep_background=True)
    assert c.call("release", {"slot": s1}) == {"slot": s1, "reset": True}
    # the handle is dead at once
    assert c.error_code("exec", {"slot": s1, "args": {"command": "true"}}) == "not_leased"
    s2 = acquire(c, "b", timeout_ms=10000)
    assert s2 != s1 and s2.rsplit("/", 1)[0] == s1.rsplit("/", 1)[0]  # same slot, new generation
    assert int(s2.rsplit("/", 1)[1]) > int(s1.rsplit("/", 1)[1])
    out = bash(c, s2, "ls -A; pgrep -x sleep || echo none")
    assert out["stdout"] == b"none\n"


def test_release_without_reset_keeps_files(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 1\n"
                             "    max_agents: 1\n")
    c = ctl.client()
    s1 = acquire(c, "a")
    bash(c, s1, "echo kept > f")
    c.call("release", {"slot": s1, "reset": False})
    s2 = acquire(c, "b", timeout_ms=10000)
    assert bash(c, s2, "cat f")["stdout"] == b"kept\n"


def test_stale_and_malformed_handles(controller, client):
    s = acquire(client)
    agent, idx, gen = s.split("/")
    assert client.error_code("release", {"slot": f"{agent}/{idx}/{int(gen) + 1}"}) == "not_leased"
    assert client.error_code("release", {"slot": "nope/0/1"}) == "not_leased"
    assert client.error_code("release", {"slot": "garbage"}) == "bad_request"
    assert client.error_code("release", {"slot": f"{agent}/x/1"}) == "bad_request"
    assert client.error_code("release", {"slot": 5}) == "bad_request"
    assert client.error_code("release", {}) == "bad_request"
    client.call("release", {"slot": s})
    assert client.error_code("release", {"slot": s}) == "not_leased"


def test_bad_requests_change_nothing(controller, client):
    assert client.error_code("acquire", {"profile": "nope"}) == "bad_request"
    assert client.error_code("acquire", {"trajectory_id": "x" * 300}) == "bad_request"
    assert client.error_code("acquire", {"timeout_ms": "soon"}) == "bad_request"
    assert client.error_code("frobnicate") == "unknown_op"
    s = acquire(client)
    assert client.error_code("exec", {"slot": s, "tool": "rm_rf"}) == "bad_request"
    assert client.error_code("exec", {"slot": s, "args": {}}) == "bad_request"  # no command
    assert client.error_code("exec", {"slot": s, "args": {"command": 5}}) == "bad_request"
    assert client.error_code("exec", {"slot": s, "args": {"command": "true", "bogus": 1}}) \
        == "bad_request"
    e = client.call_raw("exec", {"slot": s, "tool": "read_file", "args": {"path": "../../x"}})
    assert e["error"]["code"] == "path_escape"
    assert client.call("status")["slots"]["leased"] == 1
    assert bash(client, s, "echo ok")["stdout"] == b"ok\n"


# ---- waiters --------------------------------------------------------------

ONE_SLOT = "profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 1\n    max_agents: 1\n"


def test_no_capacity_after_timeout_names_position_and_capacity(controller_factory):
    ctl = controller_factory(ONE_SLOT)
    c = ctl.client()
    acquire(c, "holder")
    t0 = time.monotonic()
    r = c.call_raw("acquire", {"trajectory_id": "late", "timeout_ms": 300})
    assert time.monotonic() - t0 >= 0.25
    assert r["error"]["code"] == "no_capacity"
    msg = r["error"]["message"]
    assert "position 1 of 1" in msg and "capacity 1 slots on 1 agents" in msg, msg
    assert "max_agents 1" in msg
    assert c.call_raw("acquire", {"timeout_ms": 0})["error"]["code"] == "no_capacity"


def test_waiters_are_served_first_in_first_out(controller_factory):
    ctl = controller_factory(ONE_SLOT)
    c = ctl.client()
    held = acquire(c, "holder")
    waiters = [ctl.client() for _ in range(4)]
    ids = []
    for i, w in enumerate(waiters):
        ids.append(w.send("acquire", {"trajectory_id": f"w{i}", "timeout_ms": 20000}))
        ctl.wait_agents(lambda st, n=i + 1: st["waiters"] == n)
    slot = held
    for i, w in enumerate(waiters):
        c.call("release", {"slot": slot, "reset": False})
        # the oldest waiter gets it; a later one would leave it waiting (and failing here)
        resp, _ = w.wait(ids[i], timeout=10)
        assert resp["ok"] and resp["result"]["trajectory_id"] == f"w{i}", resp
        slot = resp["result"]["slot"]
        ctl.wait_agents(lambda st, n=3 - i: st["waiters"] == n)


def test_waiter_that_disconnects_leaves_the_queue(controller_factory):
    ctl = controller_factory(ONE_SLOT)
    c = ctl.client()
    held = acquire(c)
    w = ctl.client()
    w.send("acquire", {"timeout_ms": 20000})
    ctl.wait_agents(lambda st: st["waiters"] == 1)
    w.close()
    ctl.wait_agents(lambda st: st["waiters"] == 0)
    c.call("release", {"slot": held})
    # the slot is free again, not leased to the vanished waiter
    ctl.wait_agents(lambda st: st["slots"]["free"] == 1 and st["slots"]["leased"] == 0)
    assert acquire(c, timeout_ms=5000)


# ---- exec and batch -------------------------------------------------------


def test_batch_results_in_request_order_with_mixed_tools(controller, client):
    a = acquire(client, "a")
    b = acquire(client, "b")
    reqs = [
        {"slot": a, "tool": "write_file", "args": {"path": "d/in.txt", "content": "abc\n"}},
        {"slot": b, "tool": "bash", "args": {"command": "sleep 0.3; echo slow"}},
        {"slot": a, "tool": "bash", "args": {"command": "cat d/in.txt; echo e >&2; exit 4"}},
        {"slot": a, "tool": "read_file", "args": {"path": "d/in.txt"}},
        {"slot": "gone/0/1", "tool": "bash", "args": {"command": "true"}},
        {"slot": b, "tool": "nope", "args": {}},
        {"slot": b, "tool": "list", "args": {"path": "."}},
        {"slot": a, "tool": "stat", "args": {"path": "d"}},
        "not a map",
    ]
    res = client.call("batch", {"requests": reqs})["results"]
    assert len(res) == len(reqs)
    assert res[0]["ok"] and res[0]["result"]["size"] == 4
    assert res[1]["ok"] and res[1]["result"]["stdout"] == b"slow\n"
    assert res[2]["ok"] and res[2]["result"]["exit_code"] == 4
    assert res[2]["result"]["stdout"] == b"abc\n" and res[2]["result"]["stderr"] == b"e\n"
    assert res[3]["ok"] and res[3]["result"]["data"] == b"abc\n"
    assert res[4] == {"ok": False, "error": res[4]["error"]} and \
        res[4]["error"]["code"] == "not_leased"
    assert res[5]["error"]["code"] == "bad_request"
    assert res[6]["ok"] and res[6]["result"]["entries"] == []
    assert res[7]["ok"] and res[7]["result"]["type"] == "dir"
    assert res[8]["error"]["code"] == "bad_request"
    assert client.call("batch", {"requests": []}) == {"results": []}


def test_batch_fans_out_concurrently(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 4\n    min_agents: 2\n"
                             "    max_agents: 2\n")
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"t{i}") for i in range(8)]
    t0 = time.monotonic()
    res = c.call("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 1; echo $SLOT_INDEX"}}
        for s in slots]})["results"]
    took = time.monotonic() - t0
    assert all(r["ok"] and r["result"]["exit_code"] == 0 for r in res)
    assert took < 4, f"8 one-second commands on 8 slots took {took:.1f} s"
    assert len({s.split("/")[0] for s in slots}) == 2


def test_pipelined_requests_on_one_connection(controller, client):
    s = [acquire(client, f"p{i}") for i in range(4)]
    ids = {}
    for i in range(40):
        ids[client.send("exec", {"slot": s[i % 4], "args": {"command": f"echo {i}"}})] = i
    for rid, i in ids.items():
        resp, _ = client.wait(rid)
        assert resp["ok"] and resp["result"]["stdout"] == f"{i}\n".encode()


def test_exec_timeout_and_stream(controller, client):
    s = acquire(client)
    r = client.call("exec", {"slot": s, "args": {"command": "sleep 30"}, "timeout_ms": 300})
    assert r["timed_out"] and r["exit_code"] != 0
    r = bash(client, s, "sleep 30", timeout=0.3)
    assert r["timed_out"]
    rid = client.send("exec", {"slot": s, "tool": "bash",
                               "args": {"command": "echo one; sleep 0.2; echo two", "stream": True}})
    resp, events = client.wait(rid)
    assert resp["ok"]
    assert b"".join(e["data"] for e in events if e.get("event") == "stdout") == b"one\ntwo\n"
    assert any(e.get("event") == "started" for e in events)


def test_profile_env_and_secrets_reach_commands_but_not_the_api(controller_factory):
    cfg = ("profiles:\n  default:\n    min_agents: 1\n    env:\n      MODE: train\n"
           "      OVER: profile\n    secrets: [SLOT_TEST_SECRET]\n")
    ctl = controller_factory(cfg, env={"SLOT_TEST_SECRET": "hunter2"})
    c = ctl.client()
    s = acquire(c)
    out = c.call("exec", {"slot": s, "args": {"command": "echo $MODE $OVER $SLOT_TEST_SECRET",
                                               "env": {"OVER": "request"}}})
    assert out["stdout"] == b"train request hunter2\n"
    prof = c.call("profiles")["profiles"][0]
    assert prof["secrets"] == ["SLOT_TEST_SECRET"]
    assert b"hunter2" not in repr(prof).encode() and "hunter2" not in ctl.log()


def test_artifacts(controller, client):
    import hashlib
    import io
    import tarfile
    s = acquire(client)
    bash(client, s, "mkdir -p out && printf 'result 42\\n' > out/r.txt && head -c 3000 "
         "/dev/zero > out/big.bin")
    r = client.call("read_artifact", {"slot": s, "path": "out/r.txt", "sha256": True})
    assert r["content"] == b"result 42\n" and not r["truncated"]
    assert r["sha256"] == hashlib.sha256(b"result 42\n").hexdigest()
    r = client.call("read_artifact", {"slot": s, "path": "out/big.bin", "max_bytes": 100})
    assert len(r["content"]) == 100 and r["truncated"] and r["size"] == 3000
    ls = client.call("list_artifacts", {"slot": s})
    assert [e["path"] for e in ls["entries"]] == ["out", "out/big.bin", "out/r.txt"]
    ar = client.call("archive_artifacts", {"slot": s, "path": "out"})
    names = tarfile.open(fileobj=io.BytesIO(ar["data"]), mode="r:gz").getnames()
    assert "./r.txt" in names and "./big.bin" in names
    assert client.call_raw("read_artifact", {"slot": s, "path": "nope"})["error"]["code"] \
        == "not_found"


# ---- scale ------------------------------------------------------------------


def test_256_trajectories_over_32_agents(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 8\n    min_agents: 0\n"
           "    max_agents: 32\n    max_starts_per_second: 100\n")
    ctl = controller_factory(cfg, wait_ready=False)
    errors: list[str] = []
    done = []
    together = threading.Barrier(256, timeout=120)

    def trajectory(i: int) -> None:
        c = ctl.client(timeout=120)
        try:
            s = c.call("acquire", {"trajectory_id": f"T{i}", "timeout_ms": 60000})["slot"]
            together.wait()  # all 256 hold a slot at once: 32 agents are needed
            res = c.call("batch", {"requests": [
                {"slot": s, "tool": "write_file", "args": {"path": "n", "content": str(i)}},
                {"slot": s, "tool": "bash", "args": {"command": "echo $(( $(cat n) * 2 ))"}},
                {"slot": s, "tool": "read_file", "args": {"path": "n"}},
            ]})["results"]
            if not all(r["ok"] for r in res) or res[1]["result"]["stdout"] != f"{2 * i}\n".encode() \
                    or res[2]["result"]["data"] != str(i).encode():
                errors.append(f"{i}: {res}")
            c.call("release", {"slot": s})
            done.append(i)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(f"{i}: {e!r}")
        finally:
            c.close()

    threads = [threading.Thread(target=trajectory, args=(i,)) for i in range(256)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors[:5]
    assert len(done) == 256
    st = ctl.status()
    assert st["agents"]["total"] == 32 and st["exec"]["errors"] == 0


def test_scale_up_is_rate_limited_and_bursts_queue(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 0\n"
           "    max_agents: 6\n    max_starts_per_second: 2\n")
    ctl = controller_factory(cfg, wait_ready=False)
    cs = [ctl.client() for _ in range(6)]
    t0 = time.monotonic()
    ids = [c.send("acquire", {"timeout_ms": 30000}) for c in cs]
    for c, rid in zip(cs, ids):
        resp, _ = c.wait(rid, timeout=30)
        assert resp["ok"], resp
    took = time.monotonic() - t0
    # 6 starts at 2/s with a burst of 2: at least ~2 s; none failed
    assert took >= 1.5, took
    assert ctl.status()["agents"]["total"] == 6


def test_idle_agents_scale_down_but_never_with_a_lease(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 1\n"
           "    max_agents: 3\n    idle_timeout: 500ms\n")
    ctl = controller_factory(cfg)
    c = ctl.client()
    s = [acquire(c, f"t{i}", timeout_ms=10000) for i in range(3)]
    assert ctl.status()["agents"]["total"] == 3
    time.sleep(1.5)
    assert ctl.status()["agents"]["total"] == 3  # all hold leases
    c.call("release", {"slot": s[0]})
    c.call("release", {"slot": s[1]})
    ctl.wait_agents(lambda st: st["agents"]["total"] == 1, timeout=10)
    assert bash(c, s[2], "echo alive")["stdout"] == b"alive\n"
    c.call("release", {"slot": s[2]})
    time.sleep(1.5)
    assert ctl.status()["agents"]["total"] == 1  # min_agents


def test_max_lifetime_drains_then_replaces(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n"
           "    max_agents: 2\n    max_lifetime: 1s\n")
    ctl = controller_factory(cfg)
    c = ctl.client()
    s = acquire(c)
    first = s.split("/")[0]
    ctl.wait_agents(lambda st: st["agents"]["draining"] == 1, timeout=10)
    # the draining agent keeps serving its lease and takes no new one
    assert bash(c, s, "echo still")["stdout"] == b"still\n"
    s2 = acquire(c, "new", timeout_ms=10000)
    assert s2.split("/")[0] != first
    c.call("release", {"slot": s})
    ctl.wait_agents(lambda st: first not in agent_pids(ctl) and st["agents"]["draining"] == 0,
                    timeout=10)


def test_drain_op(controller, client):
    s = acquire(client)
    agent = s.split("/")[0]
    r = client.call("drain", {"agent": agent})
    assert r == {"agent": agent, "state": "draining", "leased": 1}
    assert client.error_code("drain", {"agent": "nope"}) == "not_found"
    assert bash(client, s, "echo ok")["stdout"] == b"ok\n"
    client.call("release", {"slot": s})
    controller.wait_agents(lambda st: agent not in agent_pids(controller)
                           and st["agents"]["ready"] >= 1, timeout=10)


# ---- faults ---------------------------------------------------------------


def test_agent_killed_mid_batch_fails_only_its_requests_and_is_replaced(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 2\n"
           "    max_agents: 2\n")
    ctl = controller_factory(cfg)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"t{i}") for i in range(4)]
    by_agent: dict[str, list[int]] = {}
    for i, s in enumerate(slots):
        by_agent.setdefault(s.split("/")[0], []).append(i)
    victim, survivor = list(by_agent)
    rid = c.send("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 1.5; echo done"}} for s in slots]})
    time.sleep(0.5)
    os.kill(agent_pids(ctl)[victim], signal.SIGKILL)
    resp, _ = c.wait(rid, timeout=20)
    res = resp["result"]["results"]
    for i in by_agent[victim]:
        assert res[i]["error"]["code"] == "agent_lost", res[i]
        assert victim in res[i]["error"]["message"]
    for i in by_agent[survivor]:
        assert res[i]["ok"] and res[i]["result"]["stdout"] == b"done\n"
    # the lost agent's handles are stale; a replacement serves new acquires
    assert c.error_code("exec", {"slot": slots[by_agent[victim][0]],
                                 "args": {"command": "true"}}) == "not_leased"
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and victim not in agent_pids(ctl))
    assert acquire(c, "after", timeout_ms=10000)


def test_waiters_are_served_after_an_agent_dies(controller_factory):
    ctl = controller_factory(ONE_SLOT)
    c = ctl.client()
    held = acquire(c)
    w = ctl.client()
    rid = w.send("acquire", {"trajectory_id": "waiting", "timeout_ms": 20000})
    ctl.wait_agents(lambda st: st["waiters"] == 1)
    os.kill(agent_pids(ctl)[held.split("/")[0]], signal.SIGKILL)
    resp, _ = w.wait(rid, timeout=20)
    assert resp["ok"] and resp["result"]["slot"].split("/")[0] != held.split("/")[0]


def test_agent_that_cannot_start_is_reported(controller_factory, tmp_path):
    bad = tmp_path / "bad-agent"
    bad.write_text("#!/bin/sh\necho 'fatal: no such runtime' >&2\nexit 3\n")
    bad.chmod(0o755)
    cfg = f"profiles:\n  default:\n    min_agents: 1\n    local:\n      agent: {bad}\n"
    ctl = controller_factory(cfg, wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 1500})
    assert r["error"]["code"] == "no_capacity"
    assert "no such runtime" in r["error"]["message"], r
    prof = c.call("profiles")["profiles"][0]
    assert "no such runtime" in prof["last_error"]


def test_trainer_disconnect_mid_batch_cancels_commands_and_keeps_leases(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n"
           "    max_agents: 1\n")
    ctl = controller_factory(cfg)
    c = ctl.client()
    s = acquire(c, "keep")
    marker = ctl.dir / "marker"
    c.send("batch", {"requests": [{"slot": s, "tool": "bash", "args": {
        "command": f"sleep 3; touch {marker}"}}]})
    ctl.wait_agents(lambda st: st["slots"]["executing"] == 1)
    c.close()
    ctl.wait_agents(lambda st: st["slots"]["executing"] == 0, timeout=10)
    time.sleep(3.5)
    assert not marker.exists(), "the command of a vanished trainer kept running"
    c2 = ctl.client()
    leases = c2.call("leases")["leases"]
    assert [x["slot"] for x in leases] == [s]
    assert bash(c2, s, "echo mine")["stdout"] == b"mine\n"


def test_lease_timeout_releases_unused_leases(controller_factory):
    cfg = ("profiles:\n  default:\n    slots_per_agent: 1\n    min_agents: 1\n"
           "    max_agents: 1\n    lease_timeout: 700ms\n")
    ctl = controller_factory(cfg)
    c = ctl.client()
    s = acquire(c)
    bash(c, s, "echo x > f")
    c.close()
    ctl.wait_agents(lambda st: st["slots"]["leased"] == 0 and st["slots"]["free"] == 1,
                    timeout=10)
    c = ctl.client()
    assert c.error_code("exec", {"slot": s, "args": {"command": "true"}}) == "not_leased"
    s2 = acquire(c)
    assert bash(c, s2, "ls -A")["stdout"] == b""  # released with reset


SOCKET_CFG = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 2\n"
              "    max_agents: 2\n    local:\n      mode: socket\n")


def test_controller_kill9_and_restart_rebuilds_leases_from_socket_agents(controller_factory):
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"traj-{i}") for i in range(3)]
    for i, s in enumerate(slots):
        bash(c, s, f"echo {i} > state.txt")
    run = c.send("exec", {"slot": slots[0], "args": {"command": "sleep 2; echo bg > late.txt"}})
    pids_before = agent_pids(ctl)
    ctl.kill9()  # before the trainer goes: a trainer that leaves cancels its commands
    c.close()
    # the agents outlive the controller
    for pid in pids_before.values():
        os.kill(pid, 0)
    ctl.expect_clean_exit = True
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 3)
    assert agent_pids(ctl) == pids_before
    c = ctl.client()
    leases = {x["slot"]: x["trajectory_id"] for x in c.call("leases")["leases"]}
    assert leases == {s: f"traj-{i}" for i, s in enumerate(slots)}
    for i, s in enumerate(slots):
        assert bash(c, s, "cat state.txt")["stdout"] == f"{i}\n".encode()
    # the command that was running across the restart finished in its slot
    time.sleep(2)
    assert bash(c, slots[0], "cat late.txt")["stdout"] == b"bg\n"
    # the fourth slot is free for a new trajectory
    s4 = acquire(c, "new")
    assert s4 not in slots
    del run


def test_socket_agents_survive_a_clean_controller_stop(controller_factory):
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    pids = agent_pids(ctl)
    assert ctl.stop() == 0
    for pid in pids.values():
        os.kill(pid, 0)
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    assert agent_pids(ctl) == pids


def wait_gone(pids, timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def test_stop_op_stops_socket_agents_and_the_controller(controller_factory):
    # SIGTERM keeps socket agents for a restart; `stop` is the way to end
    # everything, leased slots included, and its connection closes at the end.
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    pids = agent_pids(ctl)
    trainer = ctl.client()
    acquire(trainer, "t")
    c = ctl.client()
    r = c.call("stop", {"purge": False})
    assert r == {"agents": 2, "leased": 1, "purge": False}
    assert c.recv_frame(20) is None  # EOF once the controller is done
    assert ctl.proc.wait(10) == 0
    assert wait_gone(pids.values()) == []
    assert not list(ctl.state_dir.glob("agents/*.sock"))
    assert "stop requested: 2 agents (1 leased slots) go" in ctl.log()
    trainer.close()
    # a new controller finds nothing to reattach and starts fresh agents
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    assert set(agent_pids(ctl).values()).isdisjoint(pids.values())


def test_stop_op_with_a_bad_purge_is_refused(controller):
    c = controller.client()
    assert c.error_code("stop", {"purge": "yes"}) == "bad_request"
    assert c.call("status")["agents"]["ready"] >= 1  # still serving


def test_controller_stop_flag_ends_what_a_killed_controller_left(controller_factory):
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    pids = agent_pids(ctl)
    ctl.kill9()
    for pid in pids.values():
        os.kill(pid, 0)
    r = subprocess.run(ctl.argv() + ["--stop"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "stopped every agent" in r.stdout + r.stderr
    assert wait_gone(pids.values()) == []


def test_stdio_agents_die_with_a_killed_controller(controller_factory):
    ctl = controller_factory()
    pids = list(agent_pids(ctl).values())
    ctl.kill9()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in pids if Path(f"/proc/{p}").exists()
                 and "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive


# ---- configuration ----------------------------------------------------------


def run_check(tmp: Path, yaml: str, *args: str, env: dict | None = None
              ) -> subprocess.CompletedProcess:
    f = tmp / "c.yaml"
    f.write_text(yaml)
    return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check", *args],
                          capture_output=True, text=True, timeout=10,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("yaml,needle", [
    ("profiles:\n  default:\n    slots_per_agnet: 4\n", "c.yaml:3: unknown key 'slots_per_agnet'"),
    ("profiles:\n  default:\n    local:\n      mod: socket\n", "c.yaml:4: unknown key 'local.mod'"),
    ("controler:\n  name: x\n", "c.yaml:1: unknown key 'controler'"),
    ("controller:\n  listn: x\n", "c.yaml:2: unknown key 'listn' in controller"),
    ("profiles:\n  default:\n    max_agents: lots\n", "c.yaml:3: profile 'default' field "
                                                     "'max_agents'"),
    ("profiles:\n  default:\n    idle_timeout: 5 parsecs\n", "expected a duration"),
    ("profiles:\n  default:\n    memory: 2X\n", "expected a size"),
    ("profiles:\n  default:\n    backend: kubernetes\n", "unknown backend 'kubernetes'"),
    ("profiles:\n  default:\n    isolation: maybe\n", "best_effort or required"),
    ("profiles:\n  default:\n    min_agents: 5\n    max_agents: 2\n", "min_agents <= max_agents"),
    ("profiles:\n  default: [1, 2]\n", "expected a map"),
    ("profiles:\n  a b: {}\n", "profile names"),
    ("profiles: {\n", "YAML error"),
    ("- just\n- a list\n", "top level must be a map"),
])
def test_bad_config_files_are_rejected_with_file_and_line(tmp_path, yaml, needle):
    r = run_check(tmp_path, yaml)
    assert r.returncode == 2, r
    assert needle in r.stderr, r.stderr


def test_missing_config_file(tmp_path):
    r = subprocess.run([str(CONTROLLER_BIN), "--config", str(tmp_path / "none.yaml"), "--check"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "none.yaml" in r.stderr


def test_precedence_flags_over_env_over_file(tmp_path):
    yaml = ("profiles:\n  gpu:\n    slots_per_agent: 2\n    max_agents: 3\n"
            "    idle_timeout: 10s\n  cpu:\n    slots_per_agent: 5\n")
    r = run_check(tmp_path, yaml)
    assert "profile gpu: backend local, 2 slots/agent, agents 0..3" in r.stdout, r.stdout
    assert "idle_timeout 10000 ms" in r.stdout
    env = {"SLOT_SLOTS_PER_AGENT": "7", "SLOT_PROFILE_GPU_MAX_AGENTS": "9"}
    r = run_check(tmp_path, yaml, env=env)
    assert "profile gpu: backend local, 7 slots/agent, agents 0..9" in r.stdout, r.stdout
    assert "profile cpu: backend local, 7 slots/agent" in r.stdout
    r = run_check(tmp_path, yaml, "--slots-per-agent", "11", "--set", "gpu.max_agents=12",
                  env=env)
    assert "profile gpu: backend local, 11 slots/agent, agents 0..12" in r.stdout, r.stdout
    r = run_check(tmp_path, yaml, "--profile", "cpu")
    assert "profile cpu" in r.stdout and "profile gpu" not in r.stdout
    r = run_check(tmp_path, yaml, env={"SLOT_MAX_AGENTS": "many"})
    assert r.returncode == 2 and "SLOT_MAX_AGENTS" in r.stderr
    r = run_check(tmp_path, yaml, "--set", "gpu.nope=1")
    assert r.returncode == 2 and "unknown profile field 'nope'" in r.stderr
    r = run_check(tmp_path, yaml, "--set", "other.max_agents=1")
    assert r.returncode == 2 and "no profile 'other'" in r.stderr


@pytest.mark.parametrize("name,needle", [
    ("controller.yaml", "profile default: backend local"),
    ("docker.yaml", "exec.launch: docker run -i --rm"),
    ("apptainer.yaml", "exec.launch: apptainer -q exec"),
    ("nomad.yaml", "profile docker: backend nomad"),
    ("modal-profiles.yaml", "--name slot-rl-{agent_id} --slots {slots}"),
    ("slurm.yaml", "exec.launch: "),
])
def test_example_configs_load(name, needle):
    root = Path(__file__).resolve().parents[2]
    # from the repo's root, where their relative paths (nomad/*.hcl) point
    r = subprocess.run([str(CONTROLLER_BIN), "--config",
                        str(root / "controller" / "examples" / name), "--check"],
                       capture_output=True, text=True, timeout=10, cwd=root)
    assert r.returncode == 0, r.stderr
    assert needle in r.stdout


def test_second_controller_on_the_same_socket_is_refused(controller):
    r = subprocess.run([str(CONTROLLER_BIN), "--listen", controller.addr, "--state-dir",
                        str(controller.dir / "other")], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "another controller" in r.stderr


def test_tcp_needs_a_token(controller_factory, tmp_path):
    r = subprocess.run([str(CONTROLLER_BIN), "--listen", "tcp:127.0.0.1:0", "--state-dir",
                        str(tmp_path / "s")], capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and "token" in r.stderr
    ctl = controller_factory(token="s3cret")
    c = Client.unix(ctl.sock)
    assert c.error_code("status") == "unauthorized"
    assert c.error_code("hello", {"token": "wrong"}) == "unauthorized"
    assert c.call("hello", {"token": "s3cret"})["authenticated"]
    assert c.call("status")["agents"]["ready"] >= 1
    assert "s3cret" not in ctl.log()


def test_hostile_frames_do_not_hurt_the_controller(controller, client):
    import struct
    client.send_raw(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
    f = client.recv_frame(timeout=5)
    assert f["ok"] is False and f["error"]["code"] == "bad_request"
    assert client.call("status")["agents"]["ready"] >= 1
    evil = controller.client()
    evil.send_raw(struct.pack(">I", 0xFFFFFFF0))
    f = evil.recv_frame(timeout=5)
    assert f["error"]["code"] == "too_large"
    assert client.call("hello")["server"] == "slot-controller"


def test_profiles_from_the_environment_alone_and_modal_field_names(tmp_path):
    env = {"SLOT_PROFILES": "cpu,gpu", "SLOT_PROFILE_CPU_MAX_POOL": "3",
           "SLOT_PROFILE_CPU_MIN_POOL": "1", "SLOT_PROFILE_GPU_SCALE_DOWN_IDLE": "90s",
           "SLOT_PROFILE_GPU_ENV_VARS": "A=1"}
    r = subprocess.run([str(CONTROLLER_BIN), "--check"], capture_output=True, text=True,
                       timeout=10, env=dict(os.environ, **env))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("profile cpu: backend local") and "agents 1..3" in lines[0]
    assert lines[1].startswith("profile gpu:") and "idle_timeout 90000 ms" in lines[1]
    # --profile wins over SLOT_PROFILES
    r = subprocess.run([str(CONTROLLER_BIN), "--check", "--profile", "other"],
                       capture_output=True, text=True, timeout=10, env=dict(os.environ, **env))
    assert r.stdout.startswith("profile other:") and "profile cpu" not in r.stdout
    # the aliases in a file
    r = run_check(tmp_path, "profiles:\n  p:\n    min_pool: 2\n    max_pool: 5\n"
                            "    scale_down_idle: 2m\n    env_vars: {X: y}\n")
    assert r.returncode == 0 and "agents 2..5" in r.stdout and "idle_timeout 120000" in r.stdout


def test_sessions_through_the_controller_stay_in_their_slot(controller_factory):
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 2\n"
                             "    min_agents: 1\n    max_agents: 1\n")
    c = ctl.client()
    a = acquire(c, "a")
    b = acquire(c, "b")
    assert a.split("/")[0] == b.split("/")[0]  # one agent, two slots

    def tool(h, name, **args):
        return c.call("exec", {"slot": h, "tool": name, "args": args})

    sid = tool(a, "session_open")["session"]
    tool(a, "session_exec", session=sid, cmd="cd /tmp && export X=42")
    r = tool(a, "session_exec", session=sid, cmd="echo $X $PWD")
    assert r["stdout"] == b"42 /tmp\n" and r["exit_code"] == 0
    # b's handle cannot reach a's session, whatever number it sends
    for op, extra in (("session_exec", {"cmd": "id"}), ("session_write", {"data": b"id\n"}),
                      ("session_read", {}), ("session_close", {})):
        assert c.error_code("exec", {"slot": b, "tool": op,
                                     "args": {"session": sid, **extra}}) == "not_found"
    p = tool(b, "session_open", pty=True, cols=40, rows=5)["session"]
    deadline = time.monotonic() + 10
    while not any("$" in row for row in tool(b, "session_screen", session=p)["rows"]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # release with reset closes the slot's sessions
    c.call("release", {"slot": a})
    a2 = acquire(c, "a2")
    assert c.error_code("exec", {"slot": a2, "tool": "session_exec",
                                 "args": {"session": sid, "cmd": "true"}}) == "not_found"
    c.close()
