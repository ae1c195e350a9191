"""Hostile and unusual clients: garbage, oversized and malformed frames,
floods, many clients, slow readers, authentication, TCP and stdio."""
from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import msgpack
import pytest

from conftest import AGENT_BIN
from slotwire import Client, pack_frame


def raw_socket(agent) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(agent.sock)
    return s


def recv_all(s: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        if not chunk:
            break
        out += chunk
    return out


def test_garbage_then_valid_frame_on_new_connection(agent) -> None:
    s = raw_socket(agent)
    s.sendall(b"\x00\x00\x00\x10this is not msgpack at all!!")
    s.close()
    c = agent.client()
    assert c.call("exec", {"slot": 0, "cmd": "echo alive"})["stdout"] == b"alive\n"


def test_bad_msgpack_answers_bad_request_and_connection_stays(client: Client) -> None:
    client.send_raw(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    f = client.recv_frame()
    assert f["id"] == 0 and f["error"]["code"] == "bad_request"
    client.send_raw(pack_frame([1, 2, 3]))
    assert client.recv_frame()["error"]["code"] == "bad_request"
    client.send_raw(struct.pack(">I", 0))
    assert client.recv_frame()["error"]["code"] == "bad_request"
    client.send_raw(pack_frame({"id": -5, "op": "hello"}))
    assert client.recv_frame()["error"]["code"] == "bad_request"
    client.send_raw(pack_frame({"id": 7, "op": 5}))
    f = client.recv_frame()
    assert f["id"] == 7 and f["error"]["code"] == "bad_request"
    client.send_raw(pack_frame({"id": 8, "op": "hello", "args": [1]}))
    assert client.recv_frame()["error"]["code"] == "bad_request"
    assert client.call("health")["ok"]


def test_lying_lengths_and_deep_nesting_are_refused(client: Client) -> None:
    # array claiming 2^32-1 elements in a 6-byte body
    client.send_raw(struct.pack(">I", 5) + b"\xdd\xff\xff\xff\xff")
    assert client.recv_frame()["error"]["code"] == "bad_request"
    # str claiming 1 GiB
    client.send_raw(struct.pack(">I", 5) + b"\xdb\x40\x00\x00\x00")
    assert client.recv_frame()["error"]["code"] == "bad_request"
    deep = b"\x91" * 100 + b"\xc0"
    client.send_raw(struct.pack(">I", len(deep)) + deep)
    assert client.recv_frame()["error"]["code"] == "bad_request"
    trailing = msgpack.packb({"id": 1, "op": "health"}) + b"\x00"
    client.send_raw(struct.pack(">I", len(trailing)) + trailing)
    assert client.recv_frame()["error"]["code"] == "bad_request"
    assert client.call("health")["ok"]


def test_oversized_header_is_refused_and_closed(agent) -> None:
    s = raw_socket(agent)
    s.sendall(struct.pack(">I", 1 << 30))
    data = recv_all(s)
    (n,) = struct.unpack(">I", data[:4])
    f = msgpack.unpackb(data[4:4 + n])
    assert f["error"]["code"] == "too_large"
    assert data[4 + n:] == b""  # and then closed
    s.close()
    assert agent.client().call("health")["ok"]


def test_max_frame_option(agent_factory) -> None:
    a = agent_factory(extra=["--max-frame", "1048576"])
    c = a.client()
    assert c.call("hello")["limits"]["max_frame"] == 1 << 20
    s = raw_socket(a)
    big = pack_frame({"id": 1, "op": "write_file",
                      "args": {"slot": 0, "path": "x", "data": b"\0" * (2 << 20)}})
    try:
        s.sendall(big)
    except OSError:
        pass  # the agent may close before reading it all
    data = recv_all(s)
    assert msgpack.unpackb(data[4:])["error"]["code"] == "too_large"
    assert c.call("health")["ok"]


def test_truncated_frame_then_close(agent) -> None:
    s = raw_socket(agent)
    s.sendall(struct.pack(">I", 100) + b"\x82\xa2id")
    s.close()
    assert agent.client().call("health")["ok"]


def test_64_concurrent_clients(agent) -> None:
    ok: dict[int, bool] = {}

    def worker(k: int) -> None:
        c = agent.client()
        ids = [c.send("exec", {"slot": k % 4, "cmd": f"echo {k}-{j}"}) for j in range(4)]
        ok[k] = all(c.wait(i)[0]["result"]["stdout"] == f"{k}-{j}\n".encode()
                    for j, i in enumerate(ids))
        c.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(ok) == 64 and all(ok.values())


def test_flood_of_pipelined_requests_all_answered(client: Client) -> None:
    n = 5000
    frames = b"".join(pack_frame({"id": i, "op": "health"}) for i in range(1, n + 1))
    client.send_raw(frames)
    seen = set()
    while len(seen) < n:
        f = client.recv_frame()
        assert f is not None and f["ok"]
        seen.add(f["id"])
    assert seen == set(range(1, n + 1))


def test_client_that_never_reads_does_not_block_others(agent) -> None:
    hog = raw_socket(agent)
    hog.setblocking(False)
    req = pack_frame({"id": 1, "op": "exec",
                      "args": {"slot": 0, "cmd": "head -c 1000000 /dev/zero", "stream": True}})
    sent = 0
    deadline = time.monotonic() + 5
    while sent < 50 and time.monotonic() < deadline:
        try:
            hog.send(req)
            sent += 1
        except BlockingIOError:
            break
    c = agent.client()
    for s in (1, 2, 3):
        assert c.call("exec", {"slot": s, "cmd": "echo ok"}, timeout=20)["stdout"] == b"ok\n"
    hog.close()


def test_auth_flow_on_unix_and_tcp(agent_factory) -> None:
    a = agent_factory(tcp=True, token="t0ken-xyz")
    for c in (Client.unix(a.sock), a.tcp_client()):
        assert c.error_code("health") == "unauthorized"
        assert c.error_code("hello", {"token": "wrong"}) == "unauthorized"
        assert c.error_code("exec", {"slot": 0, "cmd": "true"}) == "unauthorized"
        r = c.call("hello", {"token": "t0ken-xyz"})
        assert r["authenticated"] and r["auth_required"]
        env = c.call("exec", {"slot": 0, "argv": ["env"]})["stdout"]
        assert b"t0ken-xyz" not in env
        c.close()
    # authentication is per connection
    assert Client.unix(a.sock).error_code("health") == "unauthorized"
    assert "t0ken-xyz" not in a.log()


def test_tcp_requires_token_unless_insecure(tmpdir_short, agent_factory) -> None:
    r = subprocess.run([str(AGENT_BIN), "--listen", "tcp:127.0.0.1:0", "--data-dir",
                        str(tmpdir_short / "d")], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "--token-file" in r.stderr
    a = agent_factory(tcp=True, insecure=True)
    assert a.tcp_client().call("exec", {"slot": 0, "cmd": "echo tcp"})["stdout"] == b"tcp\n"


def test_stdio_mode_answers_then_exits_cleanly_on_eof(tmpdir_short) -> None:
    p = subprocess.Popen([str(AGENT_BIN), "--stdio", "--data-dir", str(tmpdir_short / "d"),
                          "--slots", "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    try:
        c = Client.stdio(p)
        assert c.call("exec", {"slot": 0, "cmd": "echo via-stdio"})["stdout"] == b"via-stdio\n"
        rid = c.send("exec", {"slot": 1, "cmd": "sleep 0.3; echo late"})
        p.stdin.close()  # answers in flight are still delivered
        assert c.wait(rid)[0]["result"]["stdout"] == b"late\n"
        assert p.wait(10) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_cli_usage_errors() -> None:
    r = subprocess.run([str(AGENT_BIN)], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "--listen" in r.stderr
    r = subprocess.run([str(AGENT_BIN), "--slots", "0", "--stdio"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2
    r = subprocess.run([str(AGENT_BIN), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "--token-file" in r.stdout
    r = subprocess.run([str(AGENT_BIN), "--version"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "slot-agent" in r.stdout


@pytest.mark.parametrize("spec", ["bogus:1", "tcp:nohost", "tcp:example.invalid:1"])
def test_bad_listen_specs(tmpdir_short, spec: str) -> None:
    r = subprocess.run([str(AGENT_BIN), "--listen", spec, "--insecure", "--data-dir",
                        str(tmpdir_short / "d")], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0


def test_slow_reader_is_dropped_at_the_output_cap(agent_factory) -> None:
    # cap = 2 x max_frame = 2 MiB here; the hog asks for 8 MiB and reads nothing
    a = agent_factory(extra=["--max-frame", "1048576"])
    hog = raw_socket(a)
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    for i in range(8):
        hog.sendall(pack_frame({"id": i + 1, "op": "exec",
                                "args": {"slot": i % 4, "cmd": "head -c 1000000 /dev/urandom",
                                         "stream": True}}))
    c = a.client()
    deadline = time.monotonic() + 20
    while c.call("stats")["connections_dropped"] < 1:
        assert time.monotonic() < deadline, "slow reader was never dropped"
        time.sleep(0.05)
    assert "does not read its answers" in a.log()
    assert c.call("exec", {"slot": 0, "cmd": "echo fine"})["stdout"] == b"fine\n"
    hog.close()
