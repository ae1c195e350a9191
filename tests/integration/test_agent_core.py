"""Core agent ops against the real binary and PROTOCOL.md: hello, health, stats,
slots, lease/unlease, cancel, reset, per-slot ordering, cross-slot parallelism,
out-of-order answers and argument checking."""
from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from conftest import Agent
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from helpers import (expect_error, kill_marked, marker, pids_with_arg, raw_unix, read_to_eof,
                     split_frames, wait_gone, wait_present, wait_running, wait_until,
                     workspace)
from slotwire import Client, pack_frame

RUNGS = {"uid", "namespaces", "landlock", "seccomp", "rlimits", "cgroup", "containment"}


def now_ms() -> int:
    return int(time.time() * 1000)


# -- hello / health / stats / slots

def test_hello_result_fields(client: Client) -> None:
    r = client.call("hello", {"client": "pytest-core"})
    assert r["protocol"] == 1
    assert r["agent"] == "slot-agent"
    assert isinstance(r["version"], str) and r["version"]
    assert isinstance(r["instance"], int) and r["instance"] >= 0
    assert r["slots"] == 4
    assert r["authenticated"] is True
    assert r["auth_required"] is False
    assert set(r["isolation"]) == RUNGS
    assert all(isinstance(v, bool) for v in r["isolation"].values())
    assert r["isolation"]["containment"] is True
    d = r["isolation_detail"]
    assert isinstance(d["root"], bool)
    assert isinstance(d["landlock_abi"], int)
    assert d["default"] in ("best_effort", "required")
    assert isinstance(d["unavailable"], dict)
    # every rung reported unavailable has a reason, and only those
    for rung, avail in r["isolation"].items():
        if not avail:
            assert isinstance(d["unavailable"].get(rung), str), rung
    assert isinstance(d["rlimits"], dict)
    lim = r["limits"]
    expected = {"max_frame": 64 << 20, "max_output": 1 << 20, "max_queue": 1024,
                "max_inflight": 4096, "max_timeout_ms": 86400000,
                "default_timeout_ms": 600000}
    assert {k: lim.get(k) for k in expected} == expected


def test_hello_without_args_and_nil_args(client: Client) -> None:
    a = client.call("hello")
    client.send_raw(pack_frame({"id": 77, "op": "hello", "args": None}))
    resp, _ = client.wait(77)
    assert resp["ok"] is True and resp["result"]["instance"] == a["instance"]
    # the instance is stable for one agent across connections
    assert client.call("hello")["instance"] == a["instance"]


def test_hello_limits_follow_options(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=2, extra=["--max-frame", "2097152", "--max-output", "65536"])
    r = a.client().call("hello")
    assert r["slots"] == 2
    assert r["limits"]["max_frame"] == 2 << 20
    assert r["limits"]["max_output"] == 65536


def test_instance_differs_between_agents(agent_factory: AgentFactory) -> None:
    a, b = agent_factory(), agent_factory()
    assert a.client().call("hello")["instance"] != b.client().call("hello")["instance"]


def test_health_fields_idle_and_busy(agent: Agent) -> None:
    c1 = agent.client()
    r = c1.call("health")
    assert r["ok"] is True
    assert r["slots"] == 4 and r["busy_slots"] == 0 and r["running_execs"] == 0
    assert r["connections"] == 1
    assert isinstance(r["uptime_ms"], int) and r["uptime_ms"] >= 0
    c2 = agent.client()
    rid = c2.send("exec", {"slot": 3, "cmd": "sleep 20", "timeout_ms": 20000})
    wait_running(c1, 3)
    r2 = c1.call("health")
    assert r2["busy_slots"] == 1 and r2["running_execs"] == 1 and r2["connections"] == 2
    assert r2["uptime_ms"] >= r["uptime_ms"]
    c1.call("cancel", {"slot": 3})
    assert c2.wait(rid)[0]["result"]["cancelled"] is True
    c2.close()
    wait_until(lambda: c1.call("health")["connections"] == 1, what="connection count to drop")
    r3 = c1.call("health")
    assert r3["busy_slots"] == 0 and r3["running_execs"] == 0


def test_stats_fields_and_counters(agent: Agent) -> None:
    c = agent.client()
    base = c.call("stats")
    for k in ("uptime_ms", "requests", "errors", "connections", "connections_total",
              "connections_dropped", "rss_bytes", "cpu_user_ms", "cpu_sys_ms"):
        assert isinstance(base[k], int) and base[k] >= 0, k
    for k in ("started", "finished", "running", "timed_out", "cancelled",
              "p50_us", "p90_us", "p99_us", "max_us"):
        assert isinstance(base["exec"][k], int), k
    assert base["rss_bytes"] > 0
    for _ in range(3):
        c.call("exec", {"slot": 0, "argv": ["true"]})
    c.call("exec", {"slot": 1, "cmd": "sleep 5", "timeout_ms": 200})
    expect_error(c, "no_such_op", None, "unknown_op")
    c2 = agent.client()
    c2.call("health")  # a second connection, accepted and served
    c2.close()
    r = c.call("stats")
    assert r["exec"]["started"] - base["exec"]["started"] == 4
    assert r["exec"]["finished"] - base["exec"]["finished"] == 4
    assert r["exec"]["running"] == 0
    assert r["exec"]["timed_out"] - base["exec"]["timed_out"] == 1
    assert 0 < r["exec"]["p50_us"] <= r["exec"]["p90_us"] <= r["exec"]["p99_us"] \
        <= r["exec"]["max_us"]
    assert r["exec"]["max_us"] >= 150_000  # the 200 ms timeout one
    assert r["requests"] - base["requests"] >= 6
    assert r["errors"] - base["errors"] >= 1
    assert r["connections_total"] - base["connections_total"] >= 1
    ops = r["ops"]
    assert ops["exec"]["calls"] >= 4
    for name in ("exec", "stats"):
        for k in ("calls", "errors", "p50_us", "p99_us"):
            assert isinstance(ops[name][k], int), (name, k)
    assert ops["exec"]["p99_us"] >= ops["exec"]["p50_us"]


def test_slots_fields(client: Client) -> None:
    all_slots = client.call("slots")["slots"]
    assert [s["slot"] for s in all_slots] == [0, 1, 2, 3]
    workspaces = set()
    for s in all_slots:
        assert s["state"] == "idle"
        assert s["leased"] is False
        assert s["trajectory_id"] is None and s["holder"] is None and s["leased_at"] is None
        assert isinstance(s["generation"], int)
        assert s["queued"] == 0 and s["running"] == [] and s["execs"] == 0
        assert s["workspace"].startswith("/")
        workspaces.add(s["workspace"])
    assert len(workspaces) == 4
    one = client.call("slots", {"slot": 2})["slots"]
    assert len(one) == 1 and one[0]["slot"] == 2
    client.call("exec", {"slot": 2, "argv": ["true"]})
    assert client.call("slots", {"slot": 2})["slots"][0]["execs"] == 1


def test_slots_busy_running_and_queued(agent: Agent) -> None:
    c = agent.client()
    watcher = agent.client()
    r1 = c.send("exec", {"slot": 1, "cmd": "sleep 20", "timeout_ms": 20000})
    r2 = c.send("exec", {"slot": 1, "argv": ["true"]})
    r3 = c.send("exec", {"slot": 1, "argv": ["true"]})
    eids = wait_running(watcher, 1)
    s = wait_until(lambda: (lambda x: x if x["queued"] == 2 else None)(
        watcher.call("slots", {"slot": 1})["slots"][0]), what="2 queued requests")
    assert s["state"] == "busy" and len(eids) == 1 and s["running"] == eids
    assert watcher.call("cancel", {"exec_id": eids[0]})["cancelled"] == 1
    first = c.wait(r1)[0]["result"]
    assert first["exec_id"] == eids[0] and first["cancelled"] is True
    assert c.wait(r2)[0]["ok"] and c.wait(r3)[0]["ok"]
    s = watcher.call("slots", {"slot": 1})["slots"][0]
    assert s["state"] == "idle" and s["queued"] == 0 and s["running"] == [] and s["execs"] == 3


# -- lease / unlease

def test_lease_fields_conflict_idempotence_generation(client: Client) -> None:
    gen0 = client.call("slots", {"slot": 1})["slots"][0]["generation"]
    t0 = now_ms()
    r = client.call("lease", {"slot": 1, "trajectory_id": "traj-a", "holder": "ctl-1"})
    assert r["slot"] == 1 and r["trajectory_id"] == "traj-a"
    assert r["generation"] == gen0 + 1
    assert t0 - 5000 <= r["leased_at"] <= now_ms() + 5000
    s = client.call("slots", {"slot": 1})["slots"][0]
    assert s["leased"] is True and s["trajectory_id"] == "traj-a" and s["holder"] == "ctl-1"
    assert s["leased_at"] == r["leased_at"] and s["generation"] == r["generation"]
    # idempotent re-lease by the same trajectory: same generation
    again = client.call("lease", {"slot": 1, "trajectory_id": "traj-a"})
    assert again["generation"] == r["generation"] and again["slot"] == 1
    # another trajectory: slot_busy, naming the holder trajectory; nothing changes
    e = expect_error(client, "lease", {"slot": 1, "trajectory_id": "traj-b"}, "slot_busy")
    assert "traj-a" in e["error"]["message"]
    s = client.call("slots", {"slot": 1})["slots"][0]
    assert s["trajectory_id"] == "traj-a" and s["generation"] == r["generation"]
    # other slots are independent
    assert client.call("lease", {"slot": 2, "trajectory_id": "traj-b"})["slot"] == 2
    # leases are bookkeeping only: other ops still work on a leased slot
    assert client.call("exec", {"slot": 1, "cmd": "echo hi"})["stdout"] == b"hi\n"
    # unlease then a new lease increments the generation
    assert client.call("unlease", {"slot": 1, "trajectory_id": "traj-a"}) == {"slot": 1}
    s = client.call("slots", {"slot": 1})["slots"][0]
    assert s["leased"] is False and s["trajectory_id"] is None
    r2 = client.call("lease", {"slot": 1, "trajectory_id": "traj-b"})
    assert r2["generation"] == r["generation"] + 1
    # unlease without trajectory_id releases whatever holds it
    assert client.call("unlease", {"slot": 1})["slot"] == 1
    r3 = client.call("lease", {"slot": 1, "trajectory_id": "traj-a"})
    assert r3["generation"] == r2["generation"] + 1


def test_unlease_not_leased_cases(client: Client) -> None:
    expect_error(client, "unlease", {"slot": 0}, "not_leased")
    expect_error(client, "unlease", {"slot": 0, "trajectory_id": "x"}, "not_leased")
    client.call("lease", {"slot": 0, "trajectory_id": "mine"})
    expect_error(client, "unlease", {"slot": 0, "trajectory_id": "theirs"}, "not_leased")
    # the failed unlease changed nothing
    assert client.call("slots", {"slot": 0})["slots"][0]["trajectory_id"] == "mine"
    client.call("unlease", {"slot": 0, "trajectory_id": "mine"})
    expect_error(client, "unlease", {"slot": 0, "trajectory_id": "mine"}, "not_leased")


def test_lease_argument_checks(client: Client) -> None:
    expect_error(client, "lease", {"slot": 0}, "bad_request", "trajectory_id")
    expect_error(client, "lease", {"trajectory_id": "t"}, "bad_request", "slot")
    expect_error(client, "lease", {"slot": 0, "trajectory_id": 5}, "bad_request",
                 "trajectory_id")
    expect_error(client, "lease", {"slot": 0, "trajectory_id": "x" * 257}, "bad_request",
                 "trajectory_id")
    expect_error(client, "lease", {"slot": 9, "trajectory_id": "t"}, "unknown_slot")
    expect_error(client, "unlease", {"slot": 9}, "unknown_slot")
    # exactly 256 bytes is allowed
    assert client.call("lease", {"slot": 0, "trajectory_id": "y" * 256})["slot"] == 0
    assert client.call("slots", {"slot": 0})["slots"][0]["leased"] is True


def test_lease_survives_connection(agent: Agent) -> None:
    c = agent.client()
    c.call("lease", {"slot": 3, "trajectory_id": "persist", "holder": "h"})
    c.close()
    s = agent.client().call("slots", {"slot": 3})["slots"][0]
    assert s["leased"] is True and s["trajectory_id"] == "persist"


# -- ordering and concurrency

def test_one_slot_runs_requests_in_arrival_order(client: Client) -> None:
    # Later commands sleep less: any overlap would reorder the lines.
    n = 8
    ids = [client.send("exec", {"slot": 0, "cmd": f"sleep 0.0{n - i}; echo {i} >> order"})
           for i in range(n)]
    rid = client.send("read_file", {"slot": 0, "path": "order"})
    results = [client.wait(i, timeout=30)[0] for i in ids]
    assert all(r["ok"] and r["result"]["exit_code"] == 0 for r in results)
    exec_ids = [r["result"]["exec_id"] for r in results]
    assert exec_ids == sorted(exec_ids) and len(set(exec_ids)) == n
    resp = client.wait(rid)[0]
    assert resp["ok"], resp
    assert resp["result"]["data"] == b"".join(f"{i}\n".encode() for i in range(n))


def test_read_file_waits_for_running_exec(client: Client) -> None:
    ex = client.send("exec", {"slot": 1, "cmd": "sleep 0.6; printf done > result"})
    rd = client.send("read_file", {"slot": 1, "path": "result"})
    resp, _ = client.wait(rd, timeout=20)
    assert resp["ok"], resp  # it ran after the exec, so the file exists
    assert resp["result"]["data"] == b"done"
    assert client.wait(ex)[0]["result"]["exit_code"] == 0


def test_ordering_holds_across_connections(agent: Agent) -> None:
    a, b = agent.client(), agent.client()
    r1 = a.send("exec", {"slot": 2, "cmd": "sleep 0.5; echo first >> log"})
    wait_running(b, 2)
    r2 = b.send("exec", {"slot": 2, "cmd": "echo second >> log"})
    assert b.wait(r2)[0]["ok"] and a.wait(r1)[0]["ok"]
    assert b.call("read_file", {"slot": 2, "path": "log"})["data"] == b"first\nsecond\n"


def test_different_slots_run_in_parallel(client: Client) -> None:
    t0 = time.monotonic()
    ids = [client.send("exec", {"slot": s, "cmd": "sleep 1"}) for s in range(4)]
    results = [client.wait(i, timeout=20)[0]["result"] for i in ids]
    elapsed = time.monotonic() - t0
    assert all(r["exit_code"] == 0 for r in results)
    assert all(r["duration_ms"] >= 900 for r in results)
    assert elapsed < 3.0, f"4 x sleep 1 on 4 slots took {elapsed:.1f}s (serial is 4s)"


def test_answers_come_out_of_order(client: Client) -> None:
    slow = client.send("exec", {"slot": 0, "cmd": "sleep 1; echo slow"})
    fast = client.send("exec", {"slot": 1, "cmd": "echo fast"})
    hl = client.send("health")
    first_final: list[int] = []
    while len(first_final) < 3:
        f = client.recv_frame(timeout=20)
        assert f is not None
        client.pending.setdefault(f["id"], []).append(f)
        if "event" not in f:
            first_final.append(f["id"])
    assert first_final[-1] == slow
    assert set(first_final[:2]) == {fast, hl}
    assert client.wait(fast)[0]["result"]["stdout"] == b"fast\n"
    assert client.wait(slow)[0]["result"]["stdout"] == b"slow\n"
    assert client.wait(hl)[0]["result"]["ok"] is True


def test_non_slot_ops_run_while_slot_is_busy(client: Client) -> None:
    rid = client.send("exec", {"slot": 0, "cmd": "sleep 20", "timeout_ms": 20000})
    wait_running(client, 0)
    t0 = time.monotonic()
    for op in ("hello", "health", "stats", "slots"):
        assert client.call_raw(op, None, timeout=5)["ok"]
    assert time.monotonic() - t0 < 5
    client.call("cancel", {"slot": 0})
    assert client.wait(rid)[0]["result"]["cancelled"] is True


def test_duplicate_ids_are_answered(client: Client) -> None:
    client.send_raw(pack_frame({"id": 5, "op": "health"}) + pack_frame({"id": 5, "op": "health"}))
    frames = [client.recv_frame(timeout=10) for _ in range(2)]
    assert all(f is not None and f["id"] == 5 and f["ok"] for f in frames)


def test_half_close_still_answers_received_requests(agent: Agent) -> None:
    s = raw_unix(agent.sock)
    s.sendall(pack_frame({"id": 1, "op": "exec", "args": {"slot": 0,
                                                        "cmd": "sleep 0.3; echo late"}})
              + pack_frame({"id": 2, "op": "health"}))
    s.shutdown(socket.SHUT_WR)
    data, closed = read_to_eof(s, 15)
    s.close()
    assert closed
    frames = {f["id"]: f for f in split_frames(data)}
    assert frames[1]["result"]["stdout"] == b"late\n"
    assert frames[2]["ok"] is True


# -- cancel

def test_cancel_by_exec_id(client: Client) -> None:
    m = marker()
    rid = client.send("exec", {"slot": 1, "cmd": f"sleep {m}", "stream": True})
    try:
        started = client.recv_frame(timeout=10)
        assert started is not None and started["event"] == "started" and started["id"] == rid
        wait_present(m)
        assert client.call("cancel", {"exec_id": started["exec_id"]}) == {"cancelled": 1}
        res = client.wait(rid, timeout=10)[0]["result"]
        assert res["cancelled"] is True and res["signal"] == 9 and res["exit_code"] == 137
        assert res["exec_id"] == started["exec_id"] and res["timed_out"] is False
        assert wait_gone(m) == []
        # a finished command: nothing left to signal, not an error
        assert client.call("cancel", {"exec_id": started["exec_id"]})["cancelled"] == 0
    finally:
        kill_marked(m)


def test_cancel_by_slot_and_cancel_errors(agent: Agent) -> None:
    c, other = agent.client(), agent.client()
    m = marker()
    rid = c.send("exec", {"slot": 2, "cmd": f"sleep {m}"})
    try:
        wait_running(other, 2)
        assert other.call("cancel", {"slot": 2})["cancelled"] == 1
        res = c.wait(rid, timeout=10)[0]["result"]
        assert res["cancelled"] is True and res["signal"] == 9
        assert wait_gone(m) == []
    finally:
        kill_marked(m)
    # idle slot: nothing to cancel
    assert other.call("cancel", {"slot": 3})["cancelled"] == 0
    # slot is usable afterwards
    assert other.call("exec", {"slot": 2, "cmd": "echo ok"})["stdout"] == b"ok\n"
    expect_error(other, "cancel", {"exec_id": 987654321}, "not_found")
    expect_error(other, "cancel", {}, "bad_request")
    expect_error(other, "cancel", None, "bad_request")
    expect_error(other, "cancel", {"exec_id": 1, "slot": 0}, "bad_request")
    expect_error(other, "cancel", {"slot": 4}, "unknown_slot")
    expect_error(other, "cancel", {"exec_id": "1"}, "bad_request", "exec_id")


def test_cancel_detached_command(client: Client) -> None:
    m = marker()
    r = client.call("exec", {"slot": 0, "cmd": f"sleep {m}", "detach": True})
    try:
        assert r["detached"] is True
        wait_present(m)
        assert client.call("cancel", {"exec_id": r["exec_id"]})["cancelled"] == 1
        assert wait_gone(m) == []
        resp, _ = client.call_stream("exec_attach", {"exec_id": r["exec_id"]}, timeout=10)
        assert resp["result"]["cancelled"] is True
    finally:
        kill_marked(m)


# -- reset

def test_reset_kills_cancels_queue_empties_workspace_keeps_lease(agent: Agent) -> None:
    c, ctl = agent.client(), agent.client()
    lease = ctl.call("lease", {"slot": 3, "trajectory_id": "keep-me", "holder": "h"})
    ctl.call("exec", {"slot": 3, "cmd": "mkdir -p a/b && echo x > a/b/f && echo y > .hidden "
                                         "&& echo t > \"$TMPDIR/tmpfile\" && chmod 500 a/b"})
    m = marker()
    running = c.send("exec", {"slot": 3, "cmd": f"sleep {m} & setsid sleep {m} & wait"})
    try:
        queued = [c.send("exec", {"slot": 3, "cmd": "echo never > never"}) for _ in range(3)]
        queued.append(c.send("read_file", {"slot": 3, "path": "a/b/f"}))
        wait_running(ctl, 3)
        wait_until(lambda: len(pids_with_arg(m)) >= 2,
                   what="both sleeps started")
        r = ctl.call("reset", {"slot": 3}, timeout=20)
        assert r["slot"] == 3 and isinstance(r["killed"], int) and r["killed"] >= 1
        res = c.wait(running, timeout=10)[0]
        assert res["ok"] and res["result"]["cancelled"] is True
        for q in queued:
            resp = c.wait(q, timeout=10)[0]
            assert resp["ok"] is False and resp["error"]["code"] == "cancelled", resp
        assert wait_gone(m) == []
    finally:
        kill_marked(m)
    ws = workspace(ctl, 3)
    assert ws.is_dir() and list(ws.iterdir()) == []
    assert ctl.call("exec", {"slot": 3, "cmd": "ls -A \"$TMPDIR\""})["stdout"] == b""
    s = ctl.call("slots", {"slot": 3})["slots"][0]
    assert s["leased"] is True and s["trajectory_id"] == "keep-me"
    assert s["generation"] == lease["generation"]
    assert s["state"] == "idle" and s["queued"] == 0 and s["running"] == []
    # still the same lease: a re-lease by the same trajectory is idempotent
    assert ctl.call("lease", {"slot": 3, "trajectory_id": "keep-me"})["generation"] == \
        lease["generation"]
    assert ctl.call("exec", {"slot": 3, "cmd": "echo usable"})["stdout"] == b"usable\n"


def test_reset_idle_slot_and_errors(client: Client) -> None:
    client.call("write_file", {"slot": 1, "path": "f", "data": b"1"})
    r = client.call("reset", {"slot": 1})
    assert r == {"slot": 1, "killed": 0} or (r["slot"] == 1 and r["killed"] == 0)
    assert list(workspace(client, 1).iterdir()) == []
    expect_error(client, "reset", {"slot": 4}, "unknown_slot")
    expect_error(client, "reset", {}, "bad_request", "slot")
    # other slots are untouched by a reset
    client.call("write_file", {"slot": 2, "path": "keep", "data": b"k"})
    client.call("reset", {"slot": 1})
    assert (workspace(client, 2) / "keep").read_bytes() == b"k"


# -- errors and argument checking

def test_unknown_op(client: Client) -> None:
    r = expect_error(client, "frobnicate", {"slot": 0}, "unknown_op")
    assert "frobnicate" in r["error"]["message"]
    assert client.call("health")["ok"] is True


@pytest.mark.parametrize("op,args", [
    ("exec", {"slot": 4, "cmd": "true"}),
    ("exec", {"slot": 1 << 40, "cmd": "true"}),
    ("slots", {"slot": 4}),
    ("lease", {"slot": 100, "trajectory_id": "t"}),
    ("reset", {"slot": 4}),
    ("read_file", {"slot": 4, "path": "x"}),
])
def test_unknown_slot(client: Client, op: str, args: dict[str, Any]) -> None:
    expect_error(client, op, args, "unknown_slot")


@pytest.mark.parametrize("op,args,key", [
    ("exec", {"slot": "0", "cmd": "true"}, "slot"),
    ("exec", {"slot": -1, "cmd": "true"}, "slot"),
    ("exec", {"slot": 0, "cmd": 5}, "cmd"),
    ("exec", {"slot": 0, "argv": "true"}, "argv"),
    ("exec", {"slot": 0, "argv": ["echo", 1]}, "argv"),
    ("exec", {"slot": 0, "cmd": "true", "env": ["A=1"]}, "env"),
    ("exec", {"slot": 0, "cmd": "true", "env": {"A": 1}}, "env"),
    ("exec", {"slot": 0, "cmd": "true", "stdin": 7}, "stdin"),
    ("exec", {"slot": 0, "cmd": "true", "cwd": 1}, "cwd"),
    ("exec", {"slot": 0, "cmd": "true", "timeout_ms": "10"}, "timeout_ms"),
    ("exec", {"slot": 0, "cmd": "true", "timeout_ms": -5}, "timeout_ms"),
    ("exec", {"slot": 0, "cmd": "true", "timeout_ms": 86400001}, "timeout_ms"),
    ("exec", {"slot": 0, "cmd": "true", "idle_timeout_ms": 1.5}, "idle_timeout_ms"),
    ("exec", {"slot": 0, "cmd": "true", "max_output": "big"}, "max_output"),
    ("exec", {"slot": 0, "cmd": "true", "stream": "yes"}, "stream"),
    ("exec", {"slot": 0, "cmd": "true", "detach": 1}, "detach"),
    ("exec", {"slot": 0, "cmd": "true", "network": "no"}, "network"),
    ("exec", {"slot": 0, "cmd": "true", "isolation": "sometimes"}, "isolation"),
    ("lease", {"slot": 0, "trajectory_id": ["t"]}, "trajectory_id"),
    ("lease", {"slot": 0, "trajectory_id": "t", "holder": 3}, "holder"),
    ("unlease", {"slot": 0, "trajectory_id": 3}, "trajectory_id"),
    ("slots", {"slot": "all"}, "slot"),
    ("cancel", {"exec_id": -1}, "exec_id"),
    ("exec_attach", {"exec_id": "1"}, "exec_id"),
    ("exec_attach", {"exec_id": 1, "offset": "0"}, "offset"),
    ("reset", {"slot": True}, "slot"),
    ("hello", {"token": 12}, "token"),
    ("hello", {"client": {"x": 1}}, "client"),
])
def test_wrong_arg_type_names_the_key(client: Client, op: str, args: dict[str, Any],
                                      key: str) -> None:
    expect_error(client, op, args, "bad_request", key)


@pytest.mark.parametrize("op,args,key", [
    ("exec", {"slot": 0, "cmd": "true", "timout_ms": 5}, "timout_ms"),
    ("hello", {"tokn": "x"}, "tokn"),
    ("health", {"verbose": True}, "verbose"),
    ("lease", {"slot": 0, "trajectory_id": "t", "ownr": "x"}, "ownr"),
    ("reset", {"slot": 0, "force": True}, "force"),
    ("cancel", {"slot": 0, "signal": 15}, "signal"),
])
def test_unknown_arg_key(client: Client, op: str, args: dict[str, Any], key: str) -> None:
    expect_error(client, op, args, "bad_request", key)


@pytest.mark.parametrize("op,args,key", [
    ("exec", {"cmd": "true"}, "slot"),
    ("lease", {"slot": 0}, "trajectory_id"),
    ("unlease", {}, "slot"),
    ("reset", {}, "slot"),
    ("exec_attach", {}, "exec_id"),
])
def test_missing_required_arg(client: Client, op: str, args: dict[str, Any], key: str) -> None:
    expect_error(client, op, args, "bad_request", key)


def test_exec_needs_exactly_one_of_cmd_and_argv(client: Client) -> None:
    expect_error(client, "exec", {"slot": 0, "cmd": "echo a", "argv": ["echo", "b"]},
                 "bad_request")
    expect_error(client, "exec", {"slot": 0}, "bad_request")
    expect_error(client, "exec", {"slot": 0, "argv": []}, "bad_request", "argv")
    expect_error(client, "exec", None, "bad_request")
    # the failing requests did not run anything
    assert client.call("slots", {"slot": 0})["slots"][0]["execs"] == 0


def test_bad_request_changes_nothing_and_connection_stays(client: Client) -> None:
    for _ in range(20):
        expect_error(client, "exec", {"slot": 0, "cmd": "touch f", "bogus": 1}, "bad_request")
    assert list(workspace(client, 0).iterdir()) == []
    assert client.call("exec", {"slot": 0, "cmd": "echo fine"})["stdout"] == b"fine\n"
