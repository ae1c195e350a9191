"""Idempotency keys: a request repeated with the `key` of one the agent has
seen (after a dropped link) attaches to the first run and never runs again.

Every test talks to the real agent over its socket; "ran once" is proved by
files the commands append to, and by outputs that differ on every run."""
from __future__ import annotations

import hashlib
import socket
import struct
import time
from typing import Any

import pytest

from conftest import Agent
from helpers import AgentFactory, assert_contiguous, stream_bytes, wait_running
from slotwire import AgentError, Client, pack_frame


# -- helpers

def send_keyed(c: Client, op: str, args: dict | None, key: Any, **envelope: Any) -> int:
    """Send a request whose envelope carries `key` (and e.g. `resume`)."""
    rid = c._next_id
    c._next_id += 1
    msg: dict[str, Any] = {"id": rid, "op": op, "key": key, **envelope}
    if args is not None:
        msg["args"] = args
    c.send_raw(pack_frame(msg))
    c.pending.setdefault(rid, [])
    return rid


def call_keyed(c: Client, op: str, args: dict | None, key: Any, timeout: float | None = None,
               **envelope: Any) -> tuple[dict, list[dict]]:
    """(final response, events before it)."""
    return c.wait(send_keyed(c, op, args, key, **envelope), timeout)


def ok(resp: dict) -> dict:
    assert resp.get("ok") is True, resp
    return resp["result"]


def err(resp: dict, code: str, names: str | None = None) -> str:
    assert resp.get("ok") is False, resp
    assert resp["error"]["code"] == code, resp
    if names is not None:
        assert names in resp["error"]["message"], resp
    return resp["error"]["message"]


def read(c: Client, slot: int, path: str) -> bytes:
    try:
        return c.call("read_file", {"slot": slot, "path": path})["data"]
    except AgentError as e:
        if e.code == "not_found":
            return b""
        raise


def drop(c: Client) -> None:
    """Break the link the way a network does (TCP reset), not a polite close:
    a half-closed connection still gets its queued requests run and
    answered, a reset one is gone at once."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,  # type: ignore[attr-defined]
                      struct.pack("ii", 1, 0))
    c.close()


def tcp_agent(agent_factory: AgentFactory) -> Agent:
    return agent_factory(tcp=True, insecure=True)


def stats(c: Client) -> dict:
    return c.call("stats")


def wait_idle(c: Client, slot: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = c.call("slots", {"slot": slot})["slots"][0]
        if s["state"] == "idle" and not s["running"]:
            return
        time.sleep(0.02)
    raise AssertionError(f"slot {slot} did not become idle")


# -- 1. a keyed write_file, repeated

def test_write_file_repeat_gets_the_same_answer_and_writes_once(agent: Agent) -> None:
    a = agent.client()
    args = {"slot": 0, "path": "log.txt", "data": b"one line\n", "append": True}
    first, _ = call_keyed(a, "write_file", args, "wf-1")
    res = ok(first)
    assert res["size"] == 9
    a.close()
    b = agent.client()
    b._next_id = 500  # another id: the repeat is answered under its own
    again, _ = call_keyed(b, "write_file", args, "wf-1")
    assert again["id"] == 500
    assert ok(again) == res
    assert read(b, 0, "log.txt") == b"one line\n"
    # The same key for another op: refused, naming the op it was used for.
    other, _ = call_keyed(b, "exec", {"slot": 0, "cmd": "echo no >> log.txt"}, "wf-1")
    err(other, "bad_request", "write_file")
    assert read(b, 0, "log.txt") == b"one line\n"
    # A key is one request: another key appends again.
    ok(call_keyed(b, "write_file", args, "wf-2")[0])
    assert read(b, 0, "log.txt") == b"one line\none line\n"
    b.close()


# -- 2. a keyed exec, repeated after it finished

def test_exec_repeat_returns_the_first_output_byte_for_byte(agent: Agent) -> None:
    a = agent.client()
    args = {"slot": 1, "cmd": "echo $RANDOM; date +%s%N; echo ran >> marker"}
    r1 = ok(call_keyed(a, "exec", args, "ex-1")[0])
    assert r1["exit_code"] == 0 and len(r1["stdout"].splitlines()) == 2
    a.close()
    time.sleep(0.05)
    b = agent.client()
    r2 = ok(call_keyed(b, "exec", args, "ex-1")[0])
    assert r2 == r1  # stdout, exec_id, duration: the first run's result
    assert read(b, 1, "marker") == b"ran\n"
    # And once more, the kept output is still there.
    r3 = ok(call_keyed(b, "exec", args, "ex-1")[0])
    assert r3["stdout"] == r1["stdout"]
    assert read(b, 1, "marker") == b"ran\n"
    b.close()


# -- 3. a streamed exec whose link drops, resumed from the bytes received

def test_streamed_exec_resumes_from_the_offset_the_client_has(agent: Agent) -> None:
    cmd = ("for i in $(seq 1 200); do printf 'line %04d of the stream\\n' $i; sleep 0.01; done; "
           "echo ran >> marker")
    expected = b"".join(b"line %04d of the stream\n" % i for i in range(1, 201))
    args = {"slot": 2, "cmd": cmd, "stream": True}
    a = agent.client()
    rid = send_keyed(a, "exec", args, "stream-1")
    got = b""
    exec_id = None
    while len(got) < 2000:
        f = a.recv_frame(timeout=10)
        assert f is not None and f["id"] == rid and "event" in f, f
        if f["event"] == "started":
            exec_id = f["exec_id"]
        elif f["event"] == "stdout":
            assert f["offset"] == len(got)
            got += f["data"]
    a.close()  # the link drops mid-stream
    n = len(got)
    assert exec_id is not None and 0 < n < len(expected)
    b = agent.client()
    final, events = call_keyed(b, "exec", args, "stream-1", timeout=30,
                               resume={"stdout": n})
    res = ok(final)
    started = [e for e in events if e["event"] == "started"]
    assert started and started[0]["exec_id"] == exec_id == res["exec_id"]
    assert assert_contiguous(events, "stdout", start=n) == len(expected)
    rest = stream_bytes(events)
    assert hashlib.sha256(got + rest).hexdigest() == hashlib.sha256(expected).hexdigest()
    # As a streamed exec ends: the result carries no output, only its size.
    assert res["stdout"] == b"" and res["stdout_bytes"] == len(expected)
    assert res["exit_code"] == 0
    assert read(b, 2, "marker") == b"ran\n"
    b.close()


def test_streamed_repeat_of_a_finished_exec_replays_from_resume(agent: Agent) -> None:
    c = agent.client()
    args = {"slot": 0, "cmd": "seq 1 500; echo ran >> marker", "stream": True}
    first, ev1 = call_keyed(c, "exec", args, "stream-2")
    full = stream_bytes(ev1)
    assert full == b"".join(b"%d\n" % i for i in range(1, 501))
    final, ev2 = call_keyed(c, "exec", args, "stream-2", resume={"stdout": 100})
    assert [e["event"] for e in ev2][0] == "started"
    assert ev2[0]["exec_id"] == ok(first)["exec_id"] and ev2[0]["pid"] == ok(first)["pid"]
    assert assert_contiguous(ev2, "stdout", start=100) == len(full)
    assert stream_bytes(ev2) == full[100:]
    assert ok(final) == ok(first)
    assert read(c, 0, "marker") == b"ran\n"
    c.close()


# -- 4. a non-streamed exec whose link drops before it ends

def test_unstreamed_exec_repeat_after_drop_gets_full_result(agent: Agent) -> None:
    args = {"slot": 3, "cmd": "sleep 1; seq 1 3000; echo ran >> marker"}
    a = agent.client()
    send_keyed(a, "exec", args, "long-1")
    wait_running(a, 3)
    a.close()
    b = agent.client()
    res = ok(call_keyed(b, "exec", args, "long-1", timeout=30)[0])
    assert res["stdout"] == b"".join(b"%d\n" % i for i in range(1, 3001))
    assert res["exit_code"] == 0
    # After the end too.
    assert ok(call_keyed(b, "exec", args, "long-1")[0]) == res
    assert read(b, 3, "marker") == b"ran\n"
    b.close()


# -- 5. dropped while queued: the repeat runs it, once

def test_request_dropped_unrun_is_run_by_its_repeat(agent_factory: AgentFactory) -> None:
    agent = tcp_agent(agent_factory)
    busy = agent.client()
    bid = busy.send("exec", {"slot": 0, "cmd": "sleep 1"})
    wait_running(busy, 0)
    args = {"slot": 0, "path": "q.txt", "data": b"queued\n", "append": True}
    a = agent.tcp_client()
    send_keyed(a, "write_file", args, "queued-1")
    time.sleep(0.1)
    assert busy.call("slots", {"slot": 0})["slots"][0]["queued"] == 1
    drop(a)  # its request never ran: dropped with the connection
    time.sleep(0.1)
    assert busy.call("slots", {"slot": 0})["slots"][0]["queued"] == 0
    assert ok(busy.wait(bid, 10)[0])["exit_code"] == 0
    wait_idle(busy, 0)
    assert read(busy, 0, "q.txt") == b""
    b = agent.client()
    res = ok(call_keyed(b, "write_file", args, "queued-1")[0])
    assert res["size"] == 7
    assert ok(call_keyed(b, "write_file", args, "queued-1")[0]) == res
    assert read(b, 0, "q.txt") == b"queued\n"
    b.close()
    busy.close()


def test_waiting_repeat_runs_when_the_queued_first_is_dropped(
        agent_factory: AgentFactory) -> None:
    agent = tcp_agent(agent_factory)
    busy = agent.client()
    bid = busy.send("exec", {"slot": 1, "cmd": "sleep 1"})
    wait_running(busy, 1)
    args = {"slot": 1, "path": "p.txt", "data": b"x\n", "append": True}
    a = agent.tcp_client()
    send_keyed(a, "write_file", args, "promote-1")
    time.sleep(0.05)
    b = agent.client()
    rid = send_keyed(b, "write_file", args, "promote-1")  # waits for a's
    time.sleep(0.1)
    assert busy.call("slots", {"slot": 1})["slots"][0]["queued"] == 1
    drop(a)  # a's request goes unrun: b's takes its place in the slot's queue
    time.sleep(0.1)
    assert busy.call("slots", {"slot": 1})["slots"][0]["queued"] == 1
    res = ok(b.wait(rid, 10)[0])
    assert res["size"] == 2
    ok(busy.wait(bid, 10)[0])
    assert read(b, 1, "p.txt") == b"x\n"
    b.close()
    busy.close()


# -- 6. a repeat while the first still runs

def test_exec_repeat_while_running_attaches(agent: Agent) -> None:
    args = {"slot": 2, "cmd": "sleep 0.8; echo $RANDOM-$$; echo ran >> marker"}
    a = agent.client()
    rid = send_keyed(a, "exec", args, "concurrent-1")
    wait_running(a, 2)
    b = agent.client()
    rb = ok(call_keyed(b, "exec", args, "concurrent-1", timeout=20)[0])
    ra = ok(a.wait(rid, 20)[0])
    assert ra == rb and ra["stdout"].endswith(b"\n") and len(ra["stdout"]) > 3
    assert read(a, 2, "marker") == b"ran\n"
    assert stats(a)["exec"]["started"] == 1
    a.close()
    b.close()


def test_write_file_repeat_while_queued_waits_for_the_same_answer(agent: Agent) -> None:
    busy = agent.client()
    bid = busy.send("exec", {"slot": 3, "cmd": "sleep 0.8"})
    wait_running(busy, 3)
    args = {"slot": 3, "path": "w.txt", "data": b"w\n", "append": True}
    a = agent.client()
    ra_id = send_keyed(a, "write_file", args, "concurrent-2")
    b = agent.client()
    rb = ok(call_keyed(b, "write_file", args, "concurrent-2", timeout=10)[0])
    ra = ok(a.wait(ra_id, 10)[0])
    assert ra == rb
    ok(busy.wait(bid, 10)[0])
    assert read(a, 3, "w.txt") == b"w\n"
    for c in (a, b, busy):
        c.close()


def test_exec_repeat_before_the_first_started_becomes_an_attach(agent: Agent) -> None:
    busy = agent.client()
    bid = busy.send("exec", {"slot": 0, "cmd": "sleep 0.8"})
    wait_running(busy, 0)
    args = {"slot": 0, "cmd": "seq 1 100; echo ran >> marker", "stream": True}
    a = agent.client()
    ra_id = send_keyed(a, "exec", args, "queued-exec")
    b = agent.client()
    fb, evb = call_keyed(b, "exec", args, "queued-exec", timeout=10)
    fa, eva = a.wait(ra_id, 10)
    want = b"".join(b"%d\n" % i for i in range(1, 101))
    assert stream_bytes(eva) == want and stream_bytes(evb) == want
    sa = [e for e in eva if e["event"] == "started"][0]
    sb = [e for e in evb if e["event"] == "started"][0]
    assert (sa["exec_id"], sa["pid"]) == (sb["exec_id"], sb["pid"])
    assert ok(fa) == ok(fb)
    ok(busy.wait(bid, 10)[0])
    assert read(a, 0, "marker") == b"ran\n"
    for c in (a, b, busy):
        c.close()


# -- 7. detach

def test_detached_exec_repeat_gets_the_same_exec(agent: Agent) -> None:
    c = agent.client()
    args = {"slot": 1, "cmd": "sleep 0.3; echo ran >> marker", "detach": True}
    r1 = ok(call_keyed(c, "exec", args, "detach-1")[0])
    assert r1["detached"] is True
    d = agent.client()
    r2 = ok(call_keyed(d, "exec", args, "detach-1")[0])
    assert r2 == r1
    time.sleep(0.6)
    r3 = ok(call_keyed(d, "exec", args, "detach-1")[0])
    assert r3 == r1
    assert read(d, 1, "marker") == b"ran\n"
    c.close()
    d.close()


# -- 8. reset and lease, and what hello and stats say

def test_reset_and_lease_repeats_are_cached_and_counted(agent: Agent) -> None:
    c = agent.client()
    h = c.call("hello")
    assert h["idempotency"] == {"window_s": 600, "max_keys": 65536}
    s0 = stats(c)
    assert (s0["idem_keys"], s0["idem_hits"], s0["idem_bytes"]) == (0, 0, 0)
    c.call("write_file", {"slot": 2, "path": "f", "data": b"x"})
    r1 = ok(call_keyed(c, "reset", {"slot": 2}, "reset-1")[0])
    c.call("write_file", {"slot": 2, "path": "f", "data": b"y"})
    r2 = ok(call_keyed(c, "reset", {"slot": 2}, "reset-1")[0])
    assert r2 == r1
    assert read(c, 2, "f") == b"y"  # the repeat did not empty the workspace again
    lease = {"slot": 2, "trajectory_id": "traj-1"}
    l1 = ok(call_keyed(c, "lease", lease, "lease-1")[0])
    c.call("unlease", {"slot": 2})
    l2 = ok(call_keyed(c, "lease", lease, "lease-1")[0])
    assert l2 == l1
    assert c.call("slots", {"slot": 2})["slots"][0]["leased"] is False  # not leased again
    s1 = stats(c)
    assert s1["idem_hits"] == 2
    assert s1["idem_keys"] == 2
    assert s1["idem_bytes"] > 0
    c.close()


def test_read_only_ops_accept_and_ignore_a_key(agent: Agent) -> None:
    c = agent.client()
    c.call("write_file", {"slot": 0, "path": "r", "data": b"1"})
    assert ok(call_keyed(c, "read_file", {"slot": 0, "path": "r"}, "ro")[0])["data"] == b"1"
    c.call("write_file", {"slot": 0, "path": "r", "data": b"2"})
    assert ok(call_keyed(c, "read_file", {"slot": 0, "path": "r"}, "ro")[0])["data"] == b"2"
    ok(call_keyed(c, "health", None, "ro")[0])
    assert stats(c)["idem_keys"] == 0
    c.close()


# -- 9. bad keys and bad resume

@pytest.mark.parametrize("key,names", [
    (17, "key"),
    ("k" * 129, "key"),
    ("", "key"),
    (b"bin-key", "key"),
    (["a"], "key"),
])
def test_bad_key_is_bad_request_and_connection_stays(agent: Agent, key: Any,
                                                     names: str) -> None:
    c = agent.client()
    args = {"slot": 0, "path": "bad.txt", "data": b"z\n", "append": True}
    err(call_keyed(c, "write_file", args, key)[0], "bad_request", names)
    assert read(c, 0, "bad.txt") == b""  # refused requests do not run
    assert c.call("health")["ok"] is True
    ok(call_keyed(c, "write_file", args, "k" * 128)[0])  # 128 bytes is fine
    c.close()


@pytest.mark.parametrize("resume,names", [
    (5, "resume"),
    ({"stdout": -1}, "resume.stdout"),
    ({"stderr": "x"}, "resume.stderr"),
    ({"stdin": 3}, "resume"),
    ([1, 2], "resume"),
])
def test_bad_resume_is_bad_request(agent: Agent, resume: Any, names: str) -> None:
    c = agent.client()
    err(call_keyed(c, "exec", {"slot": 0, "cmd": "echo ran >> m"}, "r-1", resume=resume)[0],
        "bad_request", names)
    assert read(c, 0, "m") == b""
    assert c.call("health")["ok"] is True
    # The key was never used: it runs now.
    ok(call_keyed(c, "exec", {"slot": 0, "cmd": "echo ran >> m"}, "r-1")[0])
    assert read(c, 0, "m") == b"ran\n"
    c.close()


def test_error_answers_are_kept_too(agent: Agent) -> None:
    c = agent.client()
    args = {"slot": 0, "argv": ["/nonexistent/prog"]}
    m1 = err(call_keyed(c, "exec", args, "e-1")[0], "not_found")
    m2 = err(call_keyed(c, "exec", args, "e-1")[0], "not_found")
    assert m1 == m2
    assert stats(c)["idem_hits"] == 1
    c.close()


# -- 10. bounds

def test_count_bound_evicts_oldest_and_never_reruns(agent_factory: AgentFactory) -> None:
    ag = agent_factory(extra=["--idem-max-keys", "8"])
    c = ag.client()
    assert c.call("hello")["idempotency"]["max_keys"] == 8
    for i in range(20):
        args = {"slot": 0, "path": "n.txt", "data": b"%d\n" % i, "append": True}
        ok(call_keyed(c, "write_file", args, f"n-{i}")[0])
        assert stats(c)["idem_keys"] <= 8
    assert stats(c)["idem_keys"] == 8
    content = read(c, 0, "n.txt")
    assert content.count(b"\n") == 20
    # Evicted: known to have run, not run again.
    msg = err(call_keyed(c, "write_file", {"slot": 0, "path": "n.txt", "data": b"0\n",
                                           "append": True}, "n-0")[0], "not_found")
    assert "n-0" in msg and "ran once already" in msg and "600" in msg
    # And another op with it: refused as a key of write_file (nothing reset).
    err(call_keyed(c, "reset", {"slot": 0}, "n-1")[0], "bad_request", "write_file")
    # Still remembered with its answer.
    last = ok(call_keyed(c, "write_file", {"slot": 0, "path": "n.txt", "data": b"19\n",
                                           "append": True}, "n-19")[0])
    assert last["size"] == len(content)
    assert read(c, 0, "n.txt") == content
    c.close()


def test_byte_bound_drops_oldest_answers(agent_factory: AgentFactory) -> None:
    ag = agent_factory(extra=["--idem-max-bytes", "400"])
    c = ag.client()
    for i in range(10):
        args = {"slot": 1, "path": "b.txt", "data": b"%d\n" % i, "append": True}
        ok(call_keyed(c, "write_file", args, f"b-{i}")[0])
    s = stats(c)
    assert 0 < s["idem_bytes"] <= 400
    assert s["idem_keys"] == 10
    err(call_keyed(c, "write_file", {"slot": 1, "path": "b.txt", "data": b"0\n",
                                     "append": True}, "b-0")[0], "not_found", "b-0")
    ok(call_keyed(c, "write_file", {"slot": 1, "path": "b.txt", "data": b"9\n",
                                    "append": True}, "b-9")[0])
    assert read(c, 1, "b.txt").count(b"\n") == 10
    c.close()


def test_window_expiry_forgets_keys(agent_factory: AgentFactory) -> None:
    ag = agent_factory(extra=["--idem-window", "1"])
    c = ag.client()
    assert c.call("hello")["idempotency"]["window_s"] == 1
    args = {"slot": 0, "path": "t.txt", "data": b"t\n", "append": True}
    ok(call_keyed(c, "write_file", args, "t-1")[0])
    ok(call_keyed(c, "write_file", args, "t-1")[0])
    assert read(c, 0, "t.txt") == b"t\n"
    deadline = time.monotonic() + 5
    while stats(c)["idem_keys"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stats(c)["idem_keys"] == 0  # swept
    # Past its window a key is new again: documented, the client's window.
    ok(call_keyed(c, "write_file", args, "t-1")[0])
    assert read(c, 0, "t.txt") == b"t\nt\n"
    c.close()


# -- the other spawn path, and an agent stopping with repeats waiting

def test_exec_repeats_without_namespaces(agent_factory: AgentFactory) -> None:
    """Without a box the pid is known at once (with one it comes from the
    box's holder later): repeats attach the same way on both paths."""
    ag = agent_factory(extra=["--without", "namespaces"])
    a = ag.client()
    assert a.call("hello")["isolation"]["namespaces"] is False
    busy = ag.client()
    bid = busy.send("exec", {"slot": 0, "cmd": "sleep 0.5"})
    wait_running(busy, 0)
    args = {"slot": 0, "cmd": "echo $RANDOM$RANDOM; echo ran >> marker", "stream": True}
    ra_id = send_keyed(a, "exec", args, "nobox-1")
    b = ag.client()
    fb, evb = call_keyed(b, "exec", args, "nobox-1", timeout=10)  # before it started
    fa, eva = a.wait(ra_id, 10)
    assert stream_bytes(eva) == stream_bytes(evb) and ok(fa) == ok(fb)
    plain = ok(call_keyed(b, "exec", {"slot": 0, "cmd": "x"}, "nobox-1")[0])  # args ignored
    assert plain["stdout"] == stream_bytes(eva) and plain["exec_id"] == ok(fa)["exec_id"]
    det = {"slot": 1, "cmd": "sleep 0.2; echo ran >> marker", "detach": True}
    d1 = ok(call_keyed(a, "exec", det, "nobox-2")[0])
    assert ok(call_keyed(b, "exec", det, "nobox-2")[0]) == d1
    ok(busy.wait(bid, 10)[0])
    time.sleep(0.4)
    assert read(a, 0, "marker") == b"ran\n" and read(a, 1, "marker") == b"ran\n"
    for c in (a, b, busy):
        c.close()


def test_agent_stops_cleanly_with_repeats_waiting(agent_factory: AgentFactory) -> None:
    ag = agent_factory()
    busy = ag.client()
    busy.send("exec", {"slot": 0, "cmd": "sleep 30"})
    wait_running(busy, 0)
    args = {"slot": 0, "path": "s.txt", "data": b"s\n", "append": True}
    a = ag.client()
    send_keyed(a, "write_file", args, "stop-1")
    b = ag.client()
    rid = send_keyed(b, "write_file", args, "stop-1")
    e = ag.client()
    eid = send_keyed(e, "exec", {"slot": 0, "cmd": "true"}, "stop-2")
    e2 = send_keyed(e, "exec", {"slot": 0, "cmd": "true"}, "stop-2")
    time.sleep(0.2)
    assert ag.stop() == 0  # fixture teardown also checks the log for sanitizer reports
    # Queued requests are cancelled by the shutdown; their repeats get the same.
    assert b.wait(rid, 5)[0]["error"]["code"] == "cancelled"
    assert e.wait(eid, 5)[0]["error"]["code"] == "cancelled"
    assert e.wait(e2, 5)[0]["error"]["code"] == "cancelled"
