"""`slot-agent --attach`: a relay of stdin/stdout to an agent daemon, byte for
byte. A relay that ends leaves the agent, its leases and its running
commands alone; the next relay finds them."""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest

from conftest import AGENT_BIN, Agent
from slotwire import Client, pack_frame

AgentFactory = object


def relay(addr: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([str(AGENT_BIN), "--attach", addr, *extra], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(p: subprocess.Popen, timeout: float = 10) -> tuple[int, bytes]:
    if p.stdin and not p.stdin.closed:
        p.stdin.close()
    rc = p.wait(timeout)
    err = p.stderr.read() if p.stderr else b""
    if p.stdout:
        p.stdout.close()
    if p.stderr:
        p.stderr.close()
    return rc, err


def test_relay_speaks_the_agent_protocol(agent: Agent) -> None:
    p = relay(f"unix:{agent.sock}")
    c = Client.stdio(p)
    h = c.call("hello")
    assert h["slots"] == 4
    r = c.call("exec", {"slot": 0, "cmd": "echo hi; echo err >&2; exit 3"})
    assert (r["stdout"], r["stderr"], r["exit_code"]) == (b"hi\n", b"err\n", 3)
    rc, err = finish(p)
    assert rc == 0, err


def test_relay_is_byte_for_byte_with_1mib_binary(agent: Agent) -> None:
    data = os.urandom(1 << 20)
    p = relay(f"unix:{agent.sock}")
    c = Client.stdio(p, timeout=60)
    c.call("write_file", {"slot": 1, "path": "blob", "data": data})
    r = c.call("exec", {"slot": 1, "cmd": "sha256sum blob"}, timeout=60)
    assert r["stdout"].split(b" ")[0].decode() == hashlib.sha256(data).hexdigest()
    r = c.call("exec", {"slot": 1, "cmd": "cat blob"}, timeout=60)
    assert r["stdout"] == data
    got = c.call("read_file", {"slot": 1, "path": "blob"}, timeout=60)
    assert got["data"] == data
    rc, err = finish(p)
    assert rc == 0, err


def test_pipelined_frames_split_at_odd_boundaries(agent: Agent) -> None:
    """Frames written in pieces that cut headers and bodies arrive whole."""
    frames = b"".join(pack_frame({"id": i, "op": "health", "args": {}}) for i in range(1, 201))
    p = relay(f"unix:{agent.sock}")
    assert p.stdin and p.stdout

    def writer() -> None:
        assert p.stdin
        for i in range(0, len(frames), 7):
            p.stdin.write(frames[i:i + 7])
            p.stdin.flush()
        p.stdin.close()

    t = threading.Thread(target=writer)
    t.start()
    out = p.stdout.read()
    t.join(10)
    assert p.wait(10) == 0
    unp = msgpack.Unpacker(raw=False)
    ids = []
    pos = 0
    while pos < len(out):
        n = int.from_bytes(out[pos:pos + 4], "big")
        unp.feed(out[pos + 4:pos + 4 + n])
        ids.extend(m["id"] for m in unp)
        pos += 4 + n
    assert ids == list(range(1, 201))


def test_stdin_eof_ends_the_relay_not_the_agent(agent: Agent) -> None:
    p = relay(f"unix:{agent.sock}")
    c = Client.stdio(p)
    c.call("hello")
    rc, _ = finish(p)
    assert rc == 0
    assert agent.proc.poll() is None
    # A second relay, and the agent's own socket, still work.
    p2 = relay(f"unix:{agent.sock}")
    c2 = Client.stdio(p2)
    assert c2.call("exec", {"slot": 0, "cmd": "echo again"})["stdout"] == b"again\n"
    finish(p2)


def test_running_command_and_lease_outlive_the_relay(agent: Agent) -> None:
    p = relay(f"unix:{agent.sock}")
    c = Client.stdio(p)
    c.call("lease", {"slot": 2, "trajectory_id": "traj-7", "holder": "ctl-x"})
    r = c.call("exec", {"slot": 2, "cmd": "sleep 1; echo done", "detach": True,
                        "timeout_ms": 20000})
    eid = r["exec_id"]
    # The relay dies hard, as when docker exec's client is killed.
    p.kill()
    finish(p)
    p2 = relay(f"unix:{agent.sock}")
    c2 = Client.stdio(p2)
    slots = c2.call("slots")["slots"]
    s2 = next(s for s in slots if s["slot"] == 2)
    assert s2.get("trajectory_id") == "traj-7" and s2.get("holder") == "ctl-x", s2
    resp, events = c2.call_stream("exec_attach", {"exec_id": eid}, timeout=20)
    out = b"".join(e["data"] for e in events if e["event"] == "stdout")
    assert out == b"done\n" and resp["result"]["exit_code"] == 0
    finish(p2)


def test_relay_waits_for_a_socket_that_appears_late(tmpdir_short: Path) -> None:
    sock = tmpdir_short / "late.sock"
    p = relay(f"unix:{sock}", "--attach-timeout", "20")
    time.sleep(0.5)
    a = Agent.__new__(Agent)
    d = tmpdir_short / "late"
    d.mkdir()
    proc = subprocess.Popen([str(AGENT_BIN), "--listen", f"unix:{sock}", "--slots", "1",
                             "--data-dir", str(d)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        c = Client.stdio(p)
        assert c.call("hello")["slots"] == 1
        rc, err = finish(p)
        assert rc == 0, err
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    del a


def test_missing_socket_fails_with_a_reason(tmpdir_short: Path) -> None:
    t0 = time.monotonic()
    p = relay(f"unix:{tmpdir_short}/nothing.sock", "--attach-timeout", "0.3")
    rc, err = finish(p)
    assert rc == 1
    assert b"cannot connect to unix:" in err and b"No such file" in err
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("addr", ["udp:1.2.3.4:5", "tcp:nohost", "tcp:example.org:80",
                                  "tcp:127.0.0.1:0"])
def test_bad_addresses_are_refused(addr: str) -> None:
    p = relay(addr, "--attach-timeout", "0")
    rc, err = finish(p)
    assert rc in (1, 2) and err.startswith(b"slot-agent:"), (rc, err)


def test_relay_over_tcp_with_token(agent_factory) -> None:
    a = agent_factory(tcp=True, token="s3cret")
    p = relay(f"tcp:127.0.0.1:{a.port}")
    c = Client.stdio(p)
    assert c.error_code("exec", {"slot": 0, "cmd": "true"}) is not None
    assert c.call("hello", {"token": "s3cret"})["slots"] == 4
    assert c.call("exec", {"slot": 0, "cmd": "echo tcp"})["stdout"] == b"tcp\n"
    rc, err = finish(p)
    assert rc == 0, err


def test_agent_exit_ends_the_relay(agent_factory) -> None:
    a = agent_factory()
    p = relay(f"unix:{a.sock}")
    c = Client.stdio(p)
    c.call("hello")
    a.stop()
    assert p.wait(10) == 0
    finish(p)
