"""Hostile and unusual clients against the real binary: garbage, oversized,
malformed and truncated frames, floods, many clients, clients that never read,
authentication, TCP and stdio transports, SIGTERM and zombies."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest

from conftest import AGENT_BIN, Agent
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from helpers import (StdioAgent, children, descendants, expect_error, frame_of, kill_marked,
                     marker, pids_with_arg, proc_state, raw_unix, read_to_eof, split_frames,
                     wait_gone, wait_present, wait_until)
from slotwire import Client, ProtocolError, pack_frame


def assert_alive(agent: Agent) -> None:
    assert agent.proc.poll() is None, "agent died"
    c = agent.client(timeout=10)
    assert c.call("exec", {"slot": 0, "cmd": "echo alive"})["stdout"] == b"alive\n"
    c.close()


# -- garbage and malformed frames

@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x00\x00\x10this is not msgpack at all!!",
    os.urandom(4096),
    b"\xff" * 64,
])
def test_garbage_then_valid_frame_on_new_connection(agent: Agent, garbage: bytes) -> None:
    s = raw_unix(agent.sock)
    try:
        s.sendall(garbage)
    except OSError:
        pass  # the agent may already have refused and closed
    s.close()
    assert_alive(agent)


@pytest.mark.parametrize("body", [
    b"\xc1",                        # never-used msgpack byte
    b"\xc1\xc1\xc1",
    b"not msgpack",                 # a fixstr-ish prefix followed by junk
    msgpack.packb([1, 2, 3]),       # valid msgpack, not a map
    msgpack.packb("hello"),
    msgpack.packb(42),
    msgpack.packb({"id": 1, "op": "health"}) + b"\x00",  # trailing bytes
])
def test_bad_frame_body_is_bad_request_and_connection_stays(client: Client,
                                                             body: bytes) -> None:
    client.send_raw(frame_of(body))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["ok"] is False and f["error"]["code"] == "bad_request"
    assert f["id"] in (0, 1)
    assert client.call("health")["ok"] is True


def test_empty_frame_is_bad_request(client: Client) -> None:
    client.send_raw(struct.pack(">I", 0))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["id"] == 0 and f["error"]["code"] == "bad_request"
    assert client.call("health")["ok"] is True


@pytest.mark.parametrize("msg,with_id", [
    ({"op": "health"}, False),
    ({"id": -3, "op": "health"}, False),
    ({"id": "7", "op": "health"}, False),
    ({"id": 7}, True),
    ({"id": 7, "op": 5}, True),
    ({"id": 7, "op": "health", "args": [1]}, True),
    ({"id": 7, "op": "health", "args": "x"}, True),
])
def test_bad_envelope(client: Client, msg: dict, with_id: bool) -> None:
    client.send_raw(pack_frame(msg))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["ok"] is False and f["error"]["code"] == "bad_request", f
    if with_id:
        assert f["id"] == 7
    assert client.call("health")["ok"] is True


def test_ids_in_any_int_encoding(client: Client) -> None:
    big = (1 << 64) - 1
    client.send_raw(pack_frame({"id": big, "op": "health"}))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["id"] == big and f["ok"] is True
    # uint8 encoded as uint64 (0xcf)
    body = b"\x82\xa2id\xcf" + struct.pack(">Q", 9) + b"\xa2op\xa6health"
    client.send_raw(frame_of(body))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["id"] == 9 and f["ok"] is True


def test_header_announcing_1gib_is_too_large_then_closed(agent: Agent) -> None:
    c = agent.client()
    rss_before = c.call("stats")["rss_bytes"]
    s = raw_unix(agent.sock)
    s.sendall(struct.pack(">I", 1 << 30) + b"\x80" * 100)
    data, closed = read_to_eof(s, 10)
    s.close()
    assert closed, "agent did not close the connection"
    frames = split_frames(data)
    assert len(frames) == 1, frames
    assert frames[0]["id"] == 0 and frames[0]["ok"] is False
    assert frames[0]["error"]["code"] == "too_large"
    # nothing was allocated for it
    assert c.call("stats")["rss_bytes"] < rss_before + (64 << 20)
    assert_alive(agent)


def test_frame_over_max_frame_option(agent_factory: AgentFactory) -> None:
    a = agent_factory(extra=["--max-frame", "1048576"])
    c = a.client()
    assert c.call("hello")["limits"]["max_frame"] == 1 << 20
    big = pack_frame({"id": 3, "op": "write_file",
                      "args": {"slot": 0, "path": "x", "data": os.urandom(2 << 20)}})
    s = raw_unix(a.sock)
    try:
        s.sendall(big)
    except OSError:
        pass  # the agent may stop reading and close while we are still sending
    data, closed = read_to_eof(s, 10)
    s.close()
    assert closed
    frames = split_frames(data)
    assert len(frames) == 1 and frames[0]["error"]["code"] == "too_large"
    assert not (Path(c.call("slots", {"slot": 0})["slots"][0]["workspace"]) / "x").exists()
    # a frame just under the limit still works
    ok = c.call("write_file", {"slot": 0, "path": "y", "data": b"\1" * (1 << 19)})
    assert ok["size"] == 1 << 19
    assert_alive(a)


def test_deep_nesting_is_bad_request(client: Client) -> None:
    for depth in (33, 100, 100_000):
        body = b"\x91" * depth + b"\xc0"
        client.send_raw(frame_of(body))
        f = client.recv_frame(timeout=10)
        assert f is not None and f["error"]["code"] == "bad_request", depth
    # nesting inside an otherwise valid request
    nested: object = 1
    for _ in range(40):
        nested = {"k": nested}
    client.send_raw(pack_frame({"id": 4, "op": "hello", "args": {"client": nested}}))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["error"]["code"] == "bad_request"
    assert client.call("health")["ok"] is True


@pytest.mark.parametrize("body", [
    b"\xdd\xff\xff\xff\xff",                 # array32 of 2^32-1 elements, none present
    b"\xdf\xff\xff\xff\xff\xa2id\x01",       # map32 claiming 2^32-1 pairs
    b"\x83\xa2id\x01",                       # fixmap of 3, one pair present
    b"\xdb\x40\x00\x00\x00abc",              # str32 claiming 1 GiB
    b"\xc6\x7f\xff\xff\xffxyz",              # bin32 claiming 2 GiB
    b"\x82\xa2id\x01\xa2op\xdb\x00\x10\x00\x00health",  # op str claiming 1 MiB
])
def test_lying_lengths_are_bad_request(client: Client, body: bytes) -> None:
    client.send_raw(frame_of(body))
    f = client.recv_frame(timeout=10)
    assert f is not None and f["ok"] is False and f["error"]["code"] == "bad_request"
    assert client.call("health")["ok"] is True


def test_truncated_frame_then_close(agent: Agent) -> None:
    c = agent.client()
    for partial in (b"\x00\x00", struct.pack(">I", 100) + b"\x82\xa2id",
                    pack_frame({"id": 1, "op": "exec",
                                "args": {"slot": 0, "cmd": "touch partial"}})[:-3]):
        s = raw_unix(agent.sock)
        s.sendall(partial)
        s.close()
    wait_until(lambda: c.call("health")["connections"] == 1, what="connections closed")
    assert c.call("slots", {"slot": 0})["slots"][0]["execs"] == 0
    assert_alive(agent)


def test_frame_split_into_single_bytes(client: Client) -> None:
    data = pack_frame({"id": 11, "op": "exec", "args": {"slot": 0, "cmd": "echo slow"}})
    for i in range(len(data)):
        client.send_raw(data[i:i + 1])
    assert client.wait(11, timeout=10)[0]["result"]["stdout"] == b"slow\n"


# -- load

def test_64_concurrent_clients(agent: Agent) -> None:
    results: dict[int, bool] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        try:
            c = agent.client(timeout=60)
            try:
                ids = [(j, c.send("exec", {"slot": (k + j) % 4, "argv": ["echo", f"{k}-{j}"]}))
                       for j in range(3)]
                ids.append((-1, c.send("health")))
                good = True
                for j, i in ids:
                    resp = c.wait(i, timeout=60)[0]
                    if j < 0:
                        good &= resp["ok"] is True
                    else:
                        good &= resp["ok"] and resp["result"]["stdout"] == f"{k}-{j}\n".encode()
                with lock:
                    results[k] = good
            finally:
                c.close()
        except Exception as e:  # noqa: BLE001 - reported below
            with lock:
                errors.append(f"client {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(64)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
    assert errors == []
    assert sorted(results) == list(range(64)) and all(results.values())
    assert_alive(agent)


def test_flood_of_5000_pipelined_requests(client: Client) -> None:
    n = 5000
    frames = []
    for i in range(1, n + 1):
        if i % 50 == 0:
            frames.append(pack_frame({"id": i, "op": "exec",
                                      "args": {"slot": i % 4, "argv": ["echo", str(i)]}}))
        elif i % 2:
            frames.append(pack_frame({"id": i, "op": "health"}))
        else:
            frames.append(pack_frame({"id": i, "op": "slots", "args": {"slot": i % 4}}))
    payload = b"".join(frames)
    send_err: list[BaseException] = []

    def sender() -> None:
        try:
            client.send_raw(payload)
        except BaseException as e:  # noqa: BLE001
            send_err.append(e)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len(seen) < n:
        assert time.monotonic() < deadline, f"only {len(seen)} of {n} answered"
        f = client.recv_frame(timeout=30)
        assert f is not None, f"connection closed after {len(seen)} answers"
        assert f["id"] not in seen
        seen[f["id"]] = f
    t.join(10)
    assert send_err == []
    assert set(seen) == set(range(1, n + 1))
    assert all(f["ok"] for f in seen.values())
    for i in range(50, n + 1, 50):
        assert seen[i]["result"]["stdout"] == f"{i}\n".encode()


def test_client_that_never_reads_does_not_block_others(agent: Agent) -> None:
    hog = raw_unix(agent.sock)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.setblocking(False)
    req = b"".join(pack_frame({"id": i, "op": "exec",
                               "args": {"slot": i % 2, "argv": ["head", "-c", "2000000",
                                                                "/dev/zero"],
                                        "stream": True}}) for i in range(1, 21))
    req += b"".join(pack_frame({"id": 100 + i, "op": "health"}) for i in range(2000))
    sent = 0
    deadline = time.monotonic() + 5
    while sent < len(req) and time.monotonic() < deadline:
        try:
            sent += hog.send(req[sent:])
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break  # dropped by the agent: fine
    try:
        c = agent.client(timeout=20)
        t0 = time.monotonic()
        for s in (2, 3):
            r = c.call("exec", {"slot": s, "cmd": "echo ok"}, timeout=20)
            assert r["stdout"] == b"ok\n"
        assert c.call("health", timeout=20)["ok"] is True
        assert time.monotonic() - t0 < 15
    finally:
        hog.close()
    assert_alive(agent)


# -- authentication and transports

def test_tcp_without_token_or_insecure_refuses_to_start(tmpdir_short: Path) -> None:
    r = subprocess.run([str(AGENT_BIN), "--listen", "tcp:127.0.0.1:0", "--slots", "1",
                        "--data-dir", str(tmpdir_short / "d")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert r.returncode != 0
    msg = (r.stderr + r.stdout).lower()
    assert "token" in msg or "insecure" in msg, msg


def test_tcp_insecure_works_without_token(agent_factory: AgentFactory) -> None:
    a = agent_factory(tcp=True, insecure=True)
    c = a.tcp_client(timeout=10)
    h = c.call("hello")
    assert h["auth_required"] is False and h["authenticated"] is True
    assert c.call("exec", {"slot": 0, "argv": ["echo", "tcp"]})["stdout"] == b"tcp\n"
    c.close()


def test_token_auth(agent_factory: AgentFactory) -> None:
    token = "s3cret-" + os.urandom(6).hex()
    a = agent_factory(tcp=True, token=token)
    for mk in (lambda: Client.unix(a.sock, 10), lambda: a.tcp_client(10)):
        c = mk()
        for op, args in (("health", None), ("stats", None), ("slots", None),
                         ("exec", {"slot": 0, "cmd": "touch pwned"}),
                         ("lease", {"slot": 0, "trajectory_id": "t"})):
            expect_error(c, op, args, "unauthorized")
        expect_error(c, "hello", {"token": "wrong"}, "unauthorized")
        expect_error(c, "hello", {"token": token + "x"}, "unauthorized")
        expect_error(c, "hello", {"token": token[:-1]}, "unauthorized")
        expect_error(c, "health", None, "unauthorized")
        r = c.call("hello", {"token": token, "client": "pytest"})
        assert r["authenticated"] is True and r["auth_required"] is True
        assert c.call("health")["ok"] is True
        c.close()
    ws = Path(a.client().call("slots", {"slot": 0})["slots"][0]["workspace"])
    assert not (ws / "pwned").exists()
    assert a.client().call("slots", {"slot": 0})["slots"][0]["leased"] is False


def test_token_is_per_connection(agent_factory: AgentFactory) -> None:
    token = "per-conn-" + os.urandom(6).hex()
    a = agent_factory(token=token)
    good = Client.unix(a.sock, 10)
    good.call("hello", {"token": token})
    bad = Client.unix(a.sock, 10)
    expect_error(bad, "health", None, "unauthorized")
    expect_error(bad, "hello", {"token": "nope"}, "unauthorized")
    expect_error(bad, "health", None, "unauthorized")
    # the authenticated connection is unaffected by the other one
    assert good.call("health")["ok"] is True
    # a hello without a token does not authenticate
    r = bad.call_raw("hello")
    if r["ok"]:
        assert r["result"]["authenticated"] is False and r["result"]["auth_required"] is True
    else:
        assert r["error"]["code"] == "unauthorized"
    expect_error(bad, "health", None, "unauthorized")
    bad.call("hello", {"token": token})
    assert bad.call("health")["ok"] is True
    # a new connection starts unauthenticated again
    expect_error(Client.unix(a.sock, 10), "health", None, "unauthorized")
    assert token not in a.log()


def test_stdio_mode(tmpdir_short: Path) -> None:
    with StdioAgent(tmpdir_short / "stdio-data", slots=2) as sa:
        c = sa.client
        h = c.call("hello")
        assert h["slots"] == 2 and h["authenticated"] is True
        assert c.call("exec", {"slot": 1, "argv": ["echo", "via-stdio"]})["stdout"] == \
            b"via-stdio\n"
        data = os.urandom(200_000)
        assert c.call("exec", {"slot": 0, "argv": ["cat"], "stdin": data})["stdout"] == data
        rid = c.send("exec", {"slot": 0, "cmd": "sleep 0.3; echo late"})
        assert sa.proc.stdin is not None
        sa.proc.stdin.close()
        # requests received before EOF are still answered
        assert c.wait(rid, timeout=10)[0]["result"]["stdout"] == b"late\n"
        assert sa.proc.wait(10) == 0
        assert c.recv_frame(timeout=5) is None


def test_stdio_exits_zero_on_immediate_eof(tmpdir_short: Path) -> None:
    p = subprocess.run([str(AGENT_BIN), "--stdio", "--data-dir", str(tmpdir_short / "d"),
                        "--slots", "1"], stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=10)
    assert p.returncode == 0 and p.stdout == b""


def test_stdio_kills_running_commands_on_eof(tmpdir_short: Path) -> None:
    m = marker()
    try:
        with StdioAgent(tmpdir_short / "stdio-data", slots=1) as sa:
            sa.client.call("exec", {"slot": 0, "cmd": f"sleep {m}", "detach": True})
            wait_present(m)
            assert sa.proc.stdin is not None
            sa.proc.stdin.close()
            assert sa.proc.wait(10) == 0
            assert wait_gone(m) == []
    finally:
        kill_marked(m)


# -- lifecycle

def test_sigterm_exits_zero_and_kills_commands(agent: Agent) -> None:
    c = agent.client()
    m, m2 = marker(), marker()
    try:
        rid = c.send("exec", {"slot": 0, "cmd": f"setsid sleep {m2} & sleep {m}"})
        queued = c.send("exec", {"slot": 0, "cmd": "echo never"})
        c.call("exec", {"slot": 1, "cmd": f"sleep {m}", "detach": True})
        wait_until(lambda: len(pids_with_arg(m)) >= 2 and pids_with_arg(m2),
                   what="commands started")
        agent.proc.send_signal(signal.SIGTERM)
        for i in (rid, queued):
            try:
                resp = c.wait(i, timeout=10)[0]
            except ProtocolError:
                pytest.fail(f"connection closed before request {i} was answered")
            if resp["ok"]:
                assert resp["result"]["cancelled"] is True
            else:
                assert resp["error"]["code"] == "cancelled"
        assert agent.proc.wait(10) == 0
        assert wait_gone(m) == [] and wait_gone(m2) == []
    finally:
        kill_marked(m)
        kill_marked(m2)


def test_no_zombies_after_commands_leave_children(agent: Agent) -> None:
    c = agent.client()
    tag = marker()
    ids = []
    for i in range(40):
        ids.append(c.send("exec", {"slot": i % 4, "cmd":
                                   f"(sleep 0.0{i % 10} &); sleep 0.01 & "
                                   f"(setsid sh -c 'sleep {tag}' &); true"}))
    for i in ids:
        assert c.wait(i, timeout=30)[0]["ok"]
    assert wait_gone(tag, 10) == []

    def no_zombies() -> bool:
        return not any(proc_state(k) == "Z" for k in descendants(agent.proc.pid))

    wait_until(no_zombies, 10, what="no zombie descendants of the agent")
    zombies = [k for k in children(agent.proc.pid) if proc_state(k) == "Z"]
    assert zombies == []
    # no process of ours is left under the agent (slot holders, if any, carry no marker)
    for k in descendants(agent.proc.pid):
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                assert tag.encode() not in f.read()
        except OSError:
            pass
    assert c.call("health")["running_execs"] == 0


def test_agent_log_has_no_token(agent_factory: AgentFactory) -> None:
    token = "log-tok-" + os.urandom(8).hex()
    a = agent_factory(tcp=True, token=token)
    c = Client.unix(a.sock, 10)
    expect_error(c, "hello", {"token": "wrong-" + token[::-1]}, "unauthorized")
    c.call("hello", {"token": token})
    c.call("exec", {"slot": 0, "cmd": "echo hi"})
    t = a.tcp_client(10)
    expect_error(t, "hello", {"token": "nope-" + os.urandom(4).hex()}, "unauthorized")
    t.call("hello", {"token": token})
    t.close()
    c.close()
    assert a.stop() == 0
    log = a.log()
    assert log, "agent wrote no log at all"
    assert token not in log and token[::-1] not in log
