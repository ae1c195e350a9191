"""A dropped link loses nothing: when the stream to an agent that outlives it
ends (a killed relay, a reset TCP connection, a stream ended on purpose), the
controller asks the backend whether the agent still runs, opens a new stream,
and resends what had no answer with its idempotency key, so every command
completes once with byte-exact output, leases and sessions intact. An agent
that really died is still lost, within reconnect_timeout.

Backends here: local (socket mode) and exec (a daemon behind
`slot-agent --attach`, over a Unix socket and over TCP through a proxy that
resets connections). Docker, ssh, Nomad, Slurm and Modal have their own
suites (tests/images, test_exec_ssh.py, tests/e2e, test_modal_backend.py)."""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import AGENT_BIN, AGENTCTL_BIN, Controller
from linkdrop import N, command, expected
from slotwire import Client
from test_exec_backend import daemon_pids, daemons  # noqa: F401 (fixture)

AB = str(AGENT_BIN)


def agents(ctl: Controller) -> list[dict]:
    c = ctl.client()
    try:
        return c.call("agents")["agents"]
    finally:
        c.close()


def run_and_drop(ctl: Controller, drop, lines: int = 400, slots: list[str] | None = None,
                 c: Client | None = None) -> tuple[list[str], Client]:
    """Start N streamed commands, drop() the link once output flows, and check
    that each completes once with its whole output, its stream contiguous."""
    own = c is None
    c = c or ctl.client()
    if slots is None:
        slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(N)]
    rids = [c.send("exec", {"slot": s, "tool": "bash",
                            "args": {"command": command(i, lines), "stream": True}})
            for i, s in enumerate(slots)]
    time.sleep(0.4)
    drop()
    for i, rid in enumerate(rids):
        resp, events = c.wait(rid, timeout=90)
        assert resp.get("ok"), resp
        out = bytearray()
        for ev in events:
            if ev.get("event") == "stdout":
                assert ev["offset"] == len(out), (i, ev["offset"], len(out))
                out += ev["data"]
        out += resp["result"]["stdout"]
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(expected(i, lines)).hexdigest(), \
            (i, len(out), len(expected(i, lines)))
        assert sum(1 for ev in events if ev.get("event") == "started") == 1, i
        assert resp["result"]["exit_code"] == 0
    runs = c.call("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "cat runs; rm runs"}} for s in slots]})
    for i, r in enumerate(runs["results"]):
        assert r["result"]["stdout"] == f"{i}\n".encode(), (i, r)
    if own:
        return slots, c
    return slots, c


# ---- local, socket mode ------------------------------------------------------

SOCKET_CFG = ("profiles:\n  default:\n    slots_per_agent: 32\n    min_agents: 1\n"
              "    max_agents: 1\n    local:\n      mode: socket\n")


def reconnect_op(ctl: Controller, agent_id: str) -> None:
    r = subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, "reconnect", agent_id],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 0 and "reconnecting" in r.stdout, r


def test_socket_agent_link_dropped_mid_stream_loses_nothing(controller_factory):
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)[0]
    c = ctl.client()
    # a stateful session lives in the agent: it survives the new stream
    s0 = c.call("acquire", {"trajectory_id": "sess"})["slot"]
    r = c.call("exec", {"slot": s0, "tool": "bash_stateful", "args": {"command": "export K=kept"}})
    assert r["exit_code"] == 0, r
    slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(N - 1)] + [s0]
    run_and_drop(ctl, lambda: reconnect_op(ctl, a["id"]), slots=slots, c=c)
    r = c.call("exec", {"slot": s0, "tool": "bash_stateful", "args": {"command": "echo $K"}})
    assert r["stdout"] == b"kept\n", r
    b = agents(ctl)[0]
    assert b["id"] == a["id"] and b["reconnects"] == 1 and b["state"] == "ready", b
    assert b["instance"] == a["instance"], b
    leases = c.call("leases")["leases"]
    assert len(leases) == N, leases
    st = ctl.status()
    assert st["agents"]["reconnecting"] == 0 and st["slots"]["leased"] == N, st
    c.close()


def test_requests_sent_while_reconnecting_wait_and_run(controller_factory, tmp_path):
    """The daemon is stopped (SIGSTOP) while its link is down: the stream cannot
    be opened; requests meanwhile wait, `agents` says reconnecting, and once it
    runs again everything completes."""
    ctl = controller_factory(SOCKET_CFG)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)[0]
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "w"})["slot"]
    os.kill(a["pid"], signal.SIGSTOP)
    try:
        reconnect_op(ctl, a["id"])
        rid = c.send("exec", {"slot": s, "tool": "bash", "args": {"command": "echo late"}})
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            b = agents(ctl)[0]
            if b["state"] == "reconnecting" and b["reconnect_attempts"] >= 1:
                break
            time.sleep(0.1)
        assert b["state"] == "reconnecting", b
        out = subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, "agents"],
                             capture_output=True, text=True, timeout=10).stdout
        assert "reconnecting for" in out, out
        assert ctl.status()["agents"]["reconnecting"] == 1
        # no lease of it goes to anyone else meanwhile
        r = c.call_raw("acquire", {"trajectory_id": "other", "timeout_ms": 300})
        assert r["error"]["code"] == "no_capacity", r
        time.sleep(1.5)
    finally:
        os.kill(a["pid"], signal.SIGCONT)
    resp, _ = c.wait(rid, timeout=30)
    assert resp["result"]["stdout"] == b"late\n", resp
    b = agents(ctl)[0]
    assert b["state"] == "ready" and b["reconnects"] == 1, b
    c.close()


def test_reconnect_gives_up_after_reconnect_timeout(controller_factory):
    cfg = SOCKET_CFG.replace("    local:\n", "    reconnect_timeout: 2s\n    local:\n")
    ctl = controller_factory(cfg)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)[0]
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "w"})["slot"]
    os.kill(a["pid"], signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        rid = c.send("exec", {"slot": s, "tool": "bash", "args": {"command": "sleep 1"}})
        time.sleep(0.2)
        reconnect_op(ctl, a["id"])
        resp, _ = c.wait(rid, timeout=30)
        took = time.monotonic() - t0
        assert resp["error"]["code"] == "agent_lost", resp
        assert "reconnect_timeout 2 s" in resp["error"]["message"], resp
        assert took < 15, took
    finally:
        os.kill(a["pid"], signal.SIGKILL)
    c.close()


# ---- exec: a daemon behind a relay --------------------------------------------

def daemon_cfg(listen: str, attach: str, **fields) -> str:
    ex = {
        "start": ["sh", "-c",
                  'mkdir -p "$1" && (umask 077; printf %s "$SLOT_AGENT_TOKEN" > "$1/$2.tok") || '
                  'exit 1; setsid "$0" --listen "$5" --token-file "$1/$2.tok" --slots "$3" '
                  '--data-dir "$4" </dev/null >>"$1/$2.log" 2>&1 & echo $! > "$1/$2.pid"',
                  AB, "{state_dir}/exec", "{agent_id}", "{slots}", "{data_dir}", listen],
        "launch": [AB, "--attach", attach],
        "stop": ["sh", "-c", 'kill $(cat "$0/$1.pid") 2>/dev/null; rm -f "$0/$1.pid" "$0/$1.sock"',
                 "{state_dir}/exec", "{agent_id}"],
        "list": ["sh", "-c",
                 'cd "$0" 2>/dev/null || exit 0; for f in *.pid; do [ -e "$f" ] || continue; '
                 'kill -0 $(cat "$f") 2>/dev/null && echo "${f%.pid}"; done; exit 0',
                 "{state_dir}/exec"],
    }
    prof = {"backend": "exec", "slots_per_agent": N, "min_agents": 1, "max_agents": 1,
            **fields, "exec": ex}
    return json.dumps({"profiles": {"default": prof}})


def test_killed_relay_mid_stream_loses_nothing(controller_factory, daemons):
    ctl = controller_factory(daemon_cfg("unix:{state_dir}/exec/{agent_id}.sock",
                                        "unix:{state_dir}/exec/{agent_id}.sock"))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)[0]
    run_and_drop(ctl, lambda: os.kill(a["pid"], signal.SIGKILL))
    b = agents(ctl)[0]
    assert b["reconnects"] == 1 and b["pid"] != a["pid"], b
    assert "killed by signal 9" in b["link_cause"], b


class Proxy:
    """A TCP proxy under the test's control: drop() resets every connection
    through it (RST, as a network failure would)."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.ls = socket.socket()
        self.ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.ls.bind(("127.0.0.1", 0))
        self.ls.listen(64)
        self.port = self.ls.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        self.drops = 0
        self.dropped: set[socket.socket] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                a, _ = self.ls.accept()
            except OSError:
                return
            # like the relay's own --attach-timeout: the agent behind may
            # still be starting
            b = None
            deadline = time.monotonic() + 10
            while b is None and time.monotonic() < deadline:
                try:
                    b = socket.create_connection(("127.0.0.1", self.target), timeout=5)
                except OSError:
                    time.sleep(0.02)
                    continue
                if b.getsockname() == b.getpeername():  # TCP self-connect
                    b.close()
                    b = None
            if b is None:
                a.close()
                continue
            with self.lock:
                self.conns += [a, b]
            for x, y in ((a, b), (b, a)):
                threading.Thread(target=self._pump, args=(x, y), daemon=True).start()

    def _pump(self, x: socket.socket, y: socket.socket) -> None:
        try:
            while True:
                d = x.recv(65536)
                if not d:
                    break
                y.sendall(d)
        except OSError:
            pass
        if x in self.dropped:
            x.close()  # linger 0 was set: the kernel answers with RST
            return
        for s in (x, y):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self) -> None:
        """Reset every connection: linger 0, then wake each reader (SHUT_RD
        sends nothing), which closes its socket; the peers get RST."""
        with self.lock:
            conns, self.conns = self.conns, []
            self.drops += 1
        for s in conns:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.dropped.add(s)
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass

    def close(self) -> None:
        self.closed = True
        self.ls.close()
        self.drop()


def free_port() -> int:
    """A free port below the ephemeral range, where nothing that connects to
    it while its agent starts can take it by a TCP self-connect."""
    lo = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        p = random.randrange(10000, max(10001, lo))
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port")


@pytest.fixture
def proxy():
    made: list[Proxy] = []

    def make(port: int) -> Proxy:
        p = Proxy(port)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


def test_tcp_link_reset_mid_stream_loses_nothing(controller_factory, daemons, proxy):
    port = free_port()
    px = proxy(port)
    ctl = controller_factory(daemon_cfg(f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{px.port}"))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    run_and_drop(ctl, px.drop)
    b = agents(ctl)[0]
    assert b["reconnects"] == 1, b


def test_agent_that_died_during_the_drop_is_lost_and_replaced(controller_factory, daemons):
    ctl = controller_factory(daemon_cfg("unix:{state_dir}/exec/{agent_id}.sock",
                                        "unix:{state_dir}/exec/{agent_id}.sock"))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)[0]
    dpid = daemon_pids(ctl)[a["id"]]
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "x"})["slot"]
    rid = c.send("exec", {"slot": s, "tool": "bash", "args": {"command": "sleep 30"}})
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(dpid, signal.SIGKILL)  # the relay ends with it
    resp, _ = c.wait(rid, timeout=30)
    assert resp["error"]["code"] == "agent_lost", resp
    assert "the agent is gone" in resp["error"]["message"], resp
    assert time.monotonic() - t0 < 10
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1
                    and a["id"] not in {x["id"] for x in agents(ctl)})
    c.close()


# ---- soak --------------------------------------------------------------------

SOAK_S = float(os.environ.get("SLOT_SOAK_SECONDS", "25"))


def test_soak_batches_with_links_dropped_at_random(controller_factory, daemons, proxy):
    """A trainer's batches for SOAK_S seconds (SLOT_SOAK_SECONDS; the closing
    figures come from 600) while the link is reset through the proxy or its
    relay killed every few seconds: 0 lost, 0 duplicated, 0 wrong."""
    port = free_port()
    px = proxy(port)
    ctl = controller_factory(daemon_cfg(f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{px.port}"))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"s{i}"})["slot"] for i in range(8)]
    stop = threading.Event()
    drops = {"reset": 0, "relay": 0}
    rng = random.Random(7)

    def dropper() -> None:
        while not stop.wait(rng.uniform(1.0, 4.0)):
            if rng.random() < 0.5:
                px.drop()
                drops["reset"] += 1
            else:
                pid = agents(ctl)[0]["pid"]
                if pid > 0:
                    try:
                        os.kill(pid, signal.SIGKILL)
                        drops["relay"] += 1
                    except ProcessLookupError:
                        pass
    th = threading.Thread(target=dropper, daemon=True)
    th.start()
    t_end = time.monotonic() + SOAK_S
    seq, sent, wrong, lost, lat = 0, 0, 0, 0, []
    try:
        while time.monotonic() < t_end:
            reqs = []
            for i, s in enumerate(slots):
                seq += 1
                reqs.append({"slot": s, "tool": "bash", "args": {
                    "command": f"echo {seq} >> ids; seq 1 {200 + seq % 300} | sha256sum"}})
            t0 = time.monotonic()
            res = c.call("batch", {"requests": reqs}, timeout=120)["results"]
            lat.append(time.monotonic() - t0)
            for q, r in zip(reqs, res):
                sent += 1
                if not r.get("ok"):
                    lost += 1
                    print("lost:", r)
                    continue
                n = int(q["args"]["command"].split("seq 1 ")[1].split(" ")[0])
                want = hashlib.sha256("".join(f"{k}\n" for k in range(1, n + 1)).encode()).hexdigest()
                if r["result"]["stdout"].split()[0].decode() != want:
                    wrong += 1
    finally:
        stop.set()
        th.join(10)
    ids = c.call("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "cat ids"}} for s in slots]})["results"]
    assert all(r.get("ok") for r in ids), [r for r in ids if not r.get("ok")][:2]
    seen = [int(x) for r in ids for x in r["result"]["stdout"].split()]
    dup = len(seen) - len(set(seen))
    missing = sent - len(set(seen))
    lat.sort()
    print(f"\nsoak {SOAK_S:.0f} s: {sent} commands in {len(lat)} batches, drops: "
          f"{drops['reset']} TCP resets + {drops['relay']} killed relays; lost {lost}, "
          f"duplicated {dup}, wrong {wrong}, never ran {missing}; batch p50 "
          f"{lat[len(lat) // 2] * 1000:.0f} ms p99 {lat[int(len(lat) * 0.99)] * 1000:.0f} ms "
          f"max {lat[-1] * 1000:.0f} ms; reconnects {agents(ctl)[0]['reconnects']}")
    assert drops["reset"] + drops["relay"] >= 3
    assert (lost, dup, wrong, missing) == (0, 0, 0, 0)
    c.close()
