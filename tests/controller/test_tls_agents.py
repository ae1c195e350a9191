"""The controller's CA and agents over TLS (issue 19), with the exec backend
and real processes: an agent daemon listening on `tls:127.0.0.1:PORT` with
the certificate the controller issued it ({tls_cert}, {tls_key}, {tls_ca}),
reached through a relay (`slot-agent --attach tls:...`) that presents the
controller's client identity ({tls_client_cert}, {tls_client_key}) and
checks the agent's name (--tls-name {agent_id}).

- leases and commands work; the daemon's port refuses a plaintext client;
  the agent's files live in STATE/tls/agents/ID (0600) and go with the agent;
- a daemon whose certificate names another agent is refused, with the reason;
- with tls.cert_lifetime 20s the agent's certificate is renewed over its
  link (op tls_renew; tls_not_after advances, its file is rewritten) while a
  lease stays and a streamed command runs across the renewal, untouched;
- the CA's and the controller's keys are 0600, and no PEM or key text is in
  the controller's log;
- the trainer certificate (STATE/tls/trainer.pem, signed by trainer-ca.pem,
  which agents do not trust) is refused at an agent's handshake, where the
  controller's client certificate (ca.pem's) is accepted."""
from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import pytest

from conftest import AGENT_BIN, Controller
from slotwire import Client
from test_exec_backend import agents

AB = str(AGENT_BIN)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_daemon(port: int, cert: str = "{tls_cert}", key: str = "{tls_key}") -> dict:
    """exec templates: a daemon on tls:127.0.0.1:PORT (pid in STATE/exec/ID.pid),
    and a relay to it with the controller's client identity."""
    return {
        "start": ["sh", "-c",
                  'mkdir -p "$1" || exit 1; setsid "$0" --listen "tls:127.0.0.1:$5" '
                  '--tls-cert "$6" --tls-key "$7" --tls-ca "$8" --token-file "$9" '
                  '--slots "$3" --data-dir "$4" </dev/null >>"$1/$2.log" 2>&1 & '
                  'echo $! > "$1/$2.pid"',
                  AB, "{state_dir}/exec", "{agent_id}", "{slots}", "{data_dir}", str(port),
                  cert, key, "{tls_ca}", "{state_dir}/agent-token"],
        "launch": [AB, "--attach", f"tls:127.0.0.1:{port}", "--tls-cert", "{tls_client_cert}",
                   "--tls-key", "{tls_client_key}", "--tls-ca", "{tls_ca}",
                   "--tls-name", "{agent_id}"],
        "stop": ["sh", "-c", 'kill $(cat "$0/$1.pid") 2>/dev/null; rm -f "$0/$1.pid"',
                 "{state_dir}/exec", "{agent_id}"],
        "list": ["sh", "-c",
                 'cd "$0" 2>/dev/null || exit 0; for f in *.pid; do [ -e "$f" ] || continue; '
                 'kill -0 $(cat "$f") 2>/dev/null && echo "${f%.pid}"; done; exit 0',
                 "{state_dir}/exec"],
    }


def cfg(exec_block: dict, lifetime: str | None = None, **fields) -> str:
    prof = {"backend": "exec", "slots_per_agent": 2, "min_agents": 1, "max_agents": 1,
            **fields, "exec": exec_block}
    doc: dict = {"profiles": {"default": prof}}
    if lifetime:
        doc["tls"] = {"cert_lifetime": lifetime}
    return json.dumps(doc)


def daemon_pids(state: Path) -> list[int]:
    out = []
    for f in (state / "exec").glob("*.pid"):
        try:
            out.append(int(f.read_text().strip()))
        except (OSError, ValueError):
            pass
    return out


@pytest.fixture
def tls_ctl(tmp_path):
    """Controllers made here; their daemons are killed whatever happens."""
    made: list[Controller] = []

    def make(config: str, wait_ready: bool = True) -> Controller:
        d = tmp_path / f"c{len(made)}"
        d.mkdir()
        try:
            ctl = Controller(d, config, wait_ready=wait_ready)
        except BaseException:
            for pid in daemon_pids(d / "state"):
                _kill(pid)
            raise
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        try:
            if ctl.proc and ctl.proc.poll() is None:
                ctl.proc.send_signal(signal.SIGTERM)
                ctl.proc.wait(10)
        except Exception:
            ctl.proc.kill()
        for pid in daemon_pids(ctl.state_dir):
            _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def not_after(pem: Path) -> str:
    p = subprocess.run(["openssl", "x509", "-in", str(pem), "-noout", "-enddate", "-subject"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return p.stdout


def assert_no_secrets(ctl: Controller) -> None:
    log = ctl.log()
    assert "BEGIN" not in log and "PRIVATE KEY" not in log
    tls = ctl.state_dir / "tls"
    for k in [*tls.glob("*.key"), *tls.glob("agents/*/key.pem")]:
        assert oct(k.stat().st_mode & 0o777) == "0o600", k
        body = "".join(k.read_text().splitlines()[1:-1])
        assert body[:40] not in log and body[-40:] not in log


def test_leases_and_commands_over_tls_and_the_files_go_with_the_agent(tls_ctl):
    port = free_port()
    ctl = tls_ctl(cfg(tls_daemon(port)))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)["agents"][0]
    aid = a["id"]
    files = ctl.state_dir / "tls" / "agents" / aid
    assert sorted(p.name for p in files.iterdir()) == ["ca.pem", "cert.pem", "key.pem"]
    for p in files.iterdir():
        assert oct(p.stat().st_mode & 0o777) == "0o600", p
    assert f"CN = {aid}" in not_after(files / "cert.pem") or f"CN={aid}" in not_after(
        files / "cert.pem")
    assert time.time() + 3600 < a["tls_not_after"] <= time.time() + 86400 + 5, a
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "t"})["slot"]
    r = c.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo over-tls"}})
    assert r["stdout"] == b"over-tls\n"
    # the daemon's port speaks TLS only: a plaintext hello gets no answer
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        body = msgpack.packb({"id": 1, "op": "hello", "args": {}})
        raw.sendall(struct.pack(">I", len(body)) + body)
        raw.settimeout(5)
        got = b""
        try:
            while True:
                chunk = raw.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert b"slots" not in got and b"instance" not in got, got
    # the agent keeps serving after that
    r = c.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo still"}})
    assert r["stdout"] == b"still\n"
    assert_no_secrets(ctl)
    # drained with no lease, the agent stops; its files go with it
    c.call("release", {"slot": s})
    c.call("drain", {"agent": aid})
    deadline = time.monotonic() + 20
    while files.exists():
        assert time.monotonic() < deadline, f"{files} left behind\n{ctl.log()[-2000:]}"
        time.sleep(0.1)
    c.close()


def test_an_agent_certificate_naming_another_agent_is_refused(tls_ctl, tmp_path):
    """A daemon presenting a certificate for another agent id (signed by the
    controller's own CA): the relay's name check refuses it, and the reason
    reaches the agent's failure."""
    port = free_port()
    # the CA first (a controller with no profile that starts anything), then
    # a certificate for 'default-ffffff' from it with openssl
    ctl = tls_ctl(cfg(tls_daemon(port, cert=str(tmp_path / "evil.pem"),
                                 key=str(tmp_path / "evil.key")), min_agents=0),
                  wait_ready=False)
    tls = ctl.state_dir / "tls"
    for args in (["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "evil.key"],
                 ["req", "-new", "-key", "evil.key", "-subj", "/CN=default-ffffff", "-out",
                  "evil.csr"]):
        p = subprocess.run(["openssl", *args], cwd=tmp_path, capture_output=True, text=True,
                           timeout=30)
        assert p.returncode == 0, p.stderr
    (tmp_path / "ext").write_text("subjectAltName=DNS:default-ffffff\n"
                                  "extendedKeyUsage=serverAuth\n")
    p = subprocess.run(["openssl", "x509", "-req", "-in", "evil.csr", "-CA", str(tls / "ca.pem"),
                        "-CAkey", str(tls / "ca.key"), "-CAcreateserial", "-days", "1",
                        "-extfile", "ext", "-out", "evil.pem"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 8000})
    assert r["error"]["code"] == "no_capacity", r
    failed = c.call("agents")["failed"]
    why = " ".join(f["error"] for f in failed) + r["error"]["message"]
    assert "default-ffffff" in why, why
    c.close()
    assert_no_secrets(ctl)


def _agent_handshake(port: int, ca: Path, cert: Path, key: Path, name: str) -> bytes:
    """A TLS client with cert/key: a hello frame (no token) and the first
    bytes of the answer; raises ssl.SSLError / ConnectionError if refused."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=name) as s:
            body = msgpack.packb({"id": 1, "op": "hello", "args": {}})
            s.sendall(struct.pack(">I", len(body)) + body)
            got = s.recv(4096)  # TLS 1.3: a refused client certificate shows here
            if not got:
                raise ConnectionError("closed")
            return got


def test_trainer_certificate_is_refused_by_agents(tls_ctl):
    port = free_port()
    ctl = tls_ctl(cfg(tls_daemon(port)))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    aid = agents(ctl)["agents"][0]["id"]
    tls = ctl.state_dir / "tls"
    for f in ("trainer-ca.pem", "trainer.pem", "controller.pem", "api.pem"):
        assert (tls / f).exists(), f
    # trainer.pem chains to trainer-ca.pem only; the rest to ca.pem only
    for cert, good, bad in (("trainer.pem", "trainer-ca.pem", "ca.pem"),
                            ("controller.pem", "ca.pem", "trainer-ca.pem"),
                            ("api.pem", "ca.pem", "trainer-ca.pem")):
        for ca, ok in ((good, True), (bad, False)):
            p = subprocess.run(["openssl", "verify", "-CAfile", str(tls / ca), str(tls / cert)],
                               capture_output=True, text=True, timeout=30)
            assert (p.returncode == 0) == ok, (cert, ca, p.stdout, p.stderr)
    # the controller's client certificate opens a TLS link to the agent (the
    # token check then answers), the trainer's is refused at the handshake
    got = _agent_handshake(port, tls / "ca.pem", tls / "controller.pem", tls / "controller.key",
                           aid)
    assert len(got) >= 4, got
    with pytest.raises((ssl.SSLError, ConnectionError)) as ei:
        _agent_handshake(port, tls / "ca.pem", tls / "trainer.pem", tls / "trainer.key", aid)
    assert "unknown ca" in str(ei.value).lower() or "closed" in str(ei.value), ei.value
    log = ctl.state_dir / "exec" / f"{aid}.log"
    deadline = time.monotonic() + 5
    while "not signed by this server's CA (CN=slot-trainer:" not in log.read_text(
            errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)
    # the agent keeps serving its controller
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "t"})["slot"]
    r = c.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo still"}})
    assert r["stdout"] == b"still\n"
    c.call("release", {"slot": s})
    c.close()
    assert_no_secrets(ctl)


def test_short_lived_certificates_are_renewed_over_the_link(tls_ctl):
    """cert_lifetime 9 s: renewal at 2/3 (about 6 s); the lease stays, and a
    streamed command started before the renewal runs to its end after it."""
    port = free_port()
    ctl = tls_ctl(cfg(tls_daemon(port), lifetime="9s"))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    aid = agents(ctl)["agents"][0]["id"]
    cert = ctl.state_dir / "tls" / "agents" / aid / "cert.pem"
    first = not_after(cert)
    first_ctl = not_after(ctl.state_dir / "tls" / "controller.pem")
    t0 = agents(ctl)["agents"][0].get("tls_not_after")
    c = ctl.client()
    s = c.call("acquire", {"trajectory_id": "long"})["slot"]
    cmd = "for i in $(seq 1 12); do echo line$i; sleep 0.75; done"
    rid = c.send("exec", {"slot": s, "tool": "bash",
                          "args": {"command": cmd, "stream": True, "timeout": 60}})
    out = b""
    answer = None
    deadline = time.monotonic() + 60
    while answer is None:
        assert time.monotonic() < deadline, ctl.log()[-3000:]
        f = c.recv_frame(timeout=30)
        assert f is not None
        if f.get("id") != rid:
            continue
        if f.get("event") == "stdout":
            out += f["data"]
        elif "event" not in f:
            answer = f
    assert answer.get("ok", "result" in answer), answer
    res = answer["result"]
    out += res.get("stdout", b"") if isinstance(res.get("stdout"), bytes) else b""
    assert out.count(b"line") >= 12 and b"line12\n" in out, out
    # renewed meanwhile (9 s > 2/3 of 9 s): a new certificate in the
    # agent's file (the agent rewrote it) and in the controller's answer
    assert not_after(cert) != first, ctl.log()[-3000:]
    assert not_after(ctl.state_dir / "tls" / "controller.pem") != first_ctl
    t1 = agents(ctl)["agents"][0].get("tls_not_after")
    assert t0 and t1 and t1 > t0, (t0, t1)
    assert "certificate renewed" in ctl.log()
    # the lease is the same one, and the relay never reconnected
    a = agents(ctl)["agents"][0]
    assert a["id"] == aid and a["reconnects"] == 0, a
    r = c.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo after"}})
    assert r["stdout"] == b"after\n"
    c.close()
    assert_no_secrets(ctl)


def test_tls_placeholders_need_tls_on(tmp_path):
    from conftest import CONTROLLER_BIN
    conf = tmp_path / "c.yaml"
    conf.write_text(cfg(tls_daemon(free_port()), tls="off"))
    p = subprocess.run([str(CONTROLLER_BIN), "--config", str(conf), "--check"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "tls: off" in p.stderr, p.stderr
