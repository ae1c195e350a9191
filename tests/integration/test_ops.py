"""Every non-file op of the agent against the real binary: hello, health,
stats, slots, lease/unlease, exec basics, ordering and parallelism."""
from __future__ import annotations

import time

import pytest

from slotwire import AgentError, Client


def test_hello_reports_version_slots_and_limits(client: Client) -> None:
    r = client.call("hello", {"client": "pytest"})
    assert r["protocol"] == 1
    assert r["agent"] == "slot-agent"
    assert r["slots"] == 4
    assert r["authenticated"] is True and r["auth_required"] is False
    assert r["isolation"]["containment"] is True
    assert set(r["isolation"]) >= {"uid", "namespaces", "landlock", "seccomp", "rlimits",
                                   "cgroup", "containment"}
    assert r["limits"]["max_frame"] == 64 << 20
    assert r["limits"]["max_output"] == 1 << 20
    assert isinstance(r["instance"], int)


def test_instance_changes_across_restarts(agent_factory) -> None:
    a = agent_factory()
    first = a.client().call("hello")["instance"]
    a.stop()
    b = agent_factory()
    assert b.client().call("hello")["instance"] != first


def test_health(client: Client) -> None:
    r = client.call("health")
    assert r["ok"] is True
    assert r["slots"] == 4 and r["busy_slots"] == 0 and r["running_execs"] == 0
    assert r["connections"] == 1


def test_stats_count_requests_errors_and_exec_latency(client: Client) -> None:
    for _ in range(3):
        client.call("exec", {"slot": 0, "cmd": "true"})
    assert client.error_code("nope") == "unknown_op"
    r = client.call("stats")
    assert r["exec"]["started"] == 3 and r["exec"]["finished"] == 3
    assert r["exec"]["p50_us"] > 0 and r["exec"]["p99_us"] >= r["exec"]["p50_us"]
    assert r["ops"]["exec"]["calls"] == 3
    assert r["errors"] >= 1
    assert r["rss_bytes"] > 0
    assert r["requests"] >= 5


def test_slots_state_lease_and_running(client: Client) -> None:
    rid = client.send("exec", {"slot": 2, "cmd": "sleep 5"})
    deadline = time.monotonic() + 5
    while True:
        s = client.call("slots", {"slot": 2})["slots"][0]
        if s["running"] or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert s["state"] == "busy" and len(s["running"]) == 1
    assert s["workspace"].endswith("/slots/2/work")
    client.call("cancel", {"slot": 2})
    client.wait(rid)
    all_slots = client.call("slots")["slots"]
    assert [s["slot"] for s in all_slots] == [0, 1, 2, 3]
    assert all(s["state"] == "idle" for s in all_slots)
    assert client.error_code("slots", {"slot": 9}) == "unknown_slot"


def test_lease_unlease_semantics(client: Client) -> None:
    r = client.call("lease", {"slot": 1, "trajectory_id": "t-1", "holder": "ctl"})
    assert r["generation"] == 1 and r["trajectory_id"] == "t-1"
    # idempotent for the same trajectory, no new generation
    assert client.call("lease", {"slot": 1, "trajectory_id": "t-1"})["generation"] == 1
    with pytest.raises(AgentError) as e:
        client.call("lease", {"slot": 1, "trajectory_id": "t-2"})
    assert e.value.code == "slot_busy" and "t-1" in e.value.message
    s = client.call("slots", {"slot": 1})["slots"][0]
    assert s["leased"] and s["trajectory_id"] == "t-1" and s["holder"] == "ctl"
    assert client.error_code("unlease", {"slot": 1, "trajectory_id": "t-2"}) == "not_leased"
    client.call("unlease", {"slot": 1, "trajectory_id": "t-1"})
    assert client.error_code("unlease", {"slot": 1}) == "not_leased"
    assert client.call("lease", {"slot": 1, "trajectory_id": "t-2"})["generation"] == 2
    assert client.error_code("lease", {"slot": 1, "trajectory_id": ""}) == "bad_request"
    assert client.error_code("lease", {"slot": 1, "trajectory_id": "x" * 300}) == "bad_request"


def test_exec_cmd_and_argv(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "echo out; echo err >&2; exit 3"})
    assert (r["stdout"], r["stderr"], r["exit_code"], r["signal"]) == (b"out\n", b"err\n", 3, 0)
    assert r["timed_out"] is False and r["cancelled"] is False
    hello = client.call("hello")["isolation"]
    assert set(r["isolation"]) == {k for k, v in hello.items() if v}
    r = client.call("exec", {"slot": 0, "argv": ["printf", "%s|", "a b", "$HOME"]})
    assert r["stdout"] == b"a b|$HOME|"  # no shell: nothing expanded
    assert client.error_code("exec", {"slot": 0, "argv": ["no-such-program-xyz"]}) == "not_found"
    assert client.error_code("exec", {"slot": 0, "cmd": "true", "argv": ["true"]}) == "bad_request"
    assert client.error_code("exec", {"slot": 0}) == "bad_request"
    assert client.error_code("exec", {"slot": 0, "argv": []}) == "bad_request"


def test_exec_signal_exit(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "kill -9 $$"})
    assert r["signal"] == 9 and r["exit_code"] == 137


def test_exec_environment_is_clean(agent_factory, monkeypatch) -> None:
    monkeypatch.setenv("SLOT_SECRET_TEST", "leak-me")
    a = agent_factory()
    c = a.client()
    env = dict(line.split("=", 1) for line in
               c.call("exec", {"slot": 1, "argv": ["env"], "env": {"EXTRA": "1"}})["stdout"]
               .decode().splitlines())
    assert "SLOT_SECRET_TEST" not in env
    seen = c.call("slots", {"slot": 1})["slots"][0]["cwd_path"]  # /workspace in a box
    assert env["HOME"] == seen == env["PWD"]
    assert env["TMPDIR"] == "/tmp" or env["TMPDIR"].endswith("/slots/1/tmp")
    assert env["EXTRA"] == "1" and env["SLOT_INDEX"] == "1"
    assert env["PATH"].startswith("/usr/local/sbin")
    # the request can override defaults
    r = c.call("exec", {"slot": 1, "cmd": "echo $LANG", "env": {"LANG": "C"}})
    assert r["stdout"] == b"C\n"
    assert c.error_code("exec", {"slot": 1, "cmd": "true", "env": {"A=B": "x"}}) == "bad_request"
    assert c.error_code("exec", {"slot": 1, "cmd": "true", "env": {"A": 1}}) == "bad_request"


def test_exec_stdin_cwd_and_bare_cat(client: Client) -> None:
    data = bytes(range(256)) * 1000
    r = client.call("exec", {"slot": 0, "cmd": "sha256sum", "stdin": data})
    import hashlib
    assert r["stdout"].split()[0].decode() == hashlib.sha256(data).hexdigest()
    r = client.call("exec", {"slot": 0, "cmd": "cat"}, timeout=10)
    assert r["stdout"] == b"" and r["exit_code"] == 0
    client.call("exec", {"slot": 0, "cmd": "mkdir -p sub/dir"})
    r = client.call("exec", {"slot": 0, "cmd": "pwd", "cwd": "sub/dir"})
    seen = client.call("slots", {"slot": 0})["slots"][0]["cwd_path"]
    assert r["stdout"].decode() == f"{seen}/sub/dir\n"
    assert client.error_code("exec", {"slot": 0, "cmd": "pwd", "cwd": "../.."}) == "path_escape"
    assert client.error_code("exec", {"slot": 0, "cmd": "pwd", "cwd": "nope"}) == "not_found"


def test_requests_for_one_slot_run_in_arrival_order(client: Client) -> None:
    ids = [client.send("exec", {"slot": 0, "cmd": f"sleep 0.0{9 - i}; echo {i} >> order"})
           for i in range(6)]
    rid = client.send("read_file", {"slot": 0, "path": "order"})
    for i in ids:
        assert client.wait(i)[0]["ok"]
    resp = client.wait(rid)[0]
    assert resp["result"]["data"] == b"".join(f"{i}\n".encode() for i in range(6))


def test_slots_run_in_parallel_and_answers_come_out_of_order(client: Client) -> None:
    t0 = time.monotonic()
    ids = [client.send("exec", {"slot": s, "cmd": "sleep 1"}) for s in range(4)]
    for i in ids:
        assert client.wait(i)[0]["result"]["exit_code"] == 0
    assert time.monotonic() - t0 < 3.0  # serial would take 4 s
    slow = client.send("exec", {"slot": 0, "cmd": "sleep 0.5; echo slow"})
    fast = client.send("exec", {"slot": 1, "cmd": "echo fast"})
    first = client.recv_frame()
    assert first is not None and first["id"] == fast
    client.pending[fast].append(first)
    assert client.wait(slow)[0]["result"]["stdout"] == b"slow\n"


def test_unknown_op_slot_and_argument_errors(client: Client) -> None:
    r = client.call_raw("frobnicate")
    assert r["error"]["code"] == "unknown_op" and "frobnicate" in r["error"]["message"]
    assert client.error_code("exec", {"slot": 4, "cmd": "true"}) == "unknown_slot"
    r = client.call_raw("exec", {"slot": "0", "cmd": "true"})
    assert r["error"]["code"] == "bad_request" and "slot" in r["error"]["message"]
    r = client.call_raw("exec", {"slot": 0, "cmd": "true", "timout_ms": 5})
    assert r["error"]["code"] == "bad_request" and "timout_ms" in r["error"]["message"]
    r = client.call_raw("exec", {"slot": 0, "cmd": "true", "timeout_ms": -1})
    assert r["error"]["code"] == "bad_request" and "timeout_ms" in r["error"]["message"]
    r = client.call_raw("read_file", {"slot": 0})
    assert r["error"]["code"] == "bad_request" and "path" in r["error"]["message"]
    r = client.call_raw("exec", {"slot": 0, "cmd": "true", "isolation": "maybe"})
    assert r["error"]["code"] == "bad_request"


def test_isolation_required_fails_closed(agent_factory, tmpdir_short) -> None:
    marker = tmpdir_short / "required-ran"
    a = agent_factory(extra=["--without", "landlock"])
    c = a.client()
    hello = c.call("hello")
    assert hello["isolation"]["landlock"] is False
    assert "--without" in hello["isolation_detail"]["unavailable"]["landlock"]
    r = c.call_raw("exec", {"slot": 0, "cmd": f"touch {marker}", "isolation": "required"})
    assert r["error"]["code"] == "isolation_unavailable"
    assert "landlock" in r["error"]["message"]
    assert not marker.exists()
    # best effort runs with what exists, and says so
    r = c.call("exec", {"slot": 0, "cmd": "true"})
    assert "landlock" not in r["isolation"] and "containment" in r["isolation"]
    # the agent-wide default
    b = agent_factory(extra=["--without", "seccomp", "--isolation", "required"])
    r = b.client().call_raw("exec", {"slot": 0, "cmd": f"touch {marker}"})
    assert r["error"]["code"] == "isolation_unavailable" and "seccomp" in r["error"]["message"]
    assert not marker.exists()
