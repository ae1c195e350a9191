"""The trainer API over TLS 1.3 with client certificates (`--listen tls:`).

Certificates are made with the openssl CLI in the layout the controller's
own CAs use (STATE/tls/ca.pem, ca.key, api.pem, api.key; trainer-ca.pem,
trainer-ca.key, and trainer.pem, trainer.key signed by trainer-ca), before
the controller starts: it keeps files that exist. The API trusts
trainer-ca.pem only: the controller's client certificate (ca.pem's, for
agents) is refused there, and a trainer.pem of an older state dir (signed
by ca.pem) is issued again by trainer-ca.
Covers agentctl over tls: (status, acquire, exec, attach), each failure a
user meets with one line on each side (no client certificate, another CA,
an expired certificate, a TLS 1.2 client, a plaintext client on the tls:
port, a TLS client on a plaintext tcp: port), a flood of bad handshakes
beside a working client, and the API certificate replaced on disk.
"""
from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import (AGENT_BIN, AGENTCTL_BIN, CONTROLLER_BIN, ROOT, Client, Controller,
                      kill_stray_agents)

CONFIG = """
profiles:
  default:
    slots_per_agent: 2
    min_agents: 1
    max_agents: 1
"""

API_SAN = "DNS:slot-controller-api,DNS:localhost,IP:127.0.0.1,IP:::1"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca(d: Path, name: str = "ca", cn: str = "test CA") -> None:
    d.mkdir(parents=True, exist_ok=True)
    # SEC1 "EC PRIVATE KEY": the form the controller's CA reads and writes
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-x509", "-key", f"{name}.key", "-out", f"{name}.pem", "-days", "30",
            "-subj", f"/CN={cn}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def issue(d: Path, name: str, cn: str, eku: str, ca: str = "ca", days: int = 30,
          san: str | None = None, out: Path | None = None) -> None:
    """d/NAME.pem and .key signed by d/CA.pem; days -1: expired yesterday."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=d)
    openssl("req", "-new", "-key", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
            cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text(f"extendedKeyUsage={eku}\n" + (f"subjectAltName={san}\n" if san else ""))
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", str(days),
            "-out", f"{name}.pem", "-extfile", ext.name, cwd=d)
    (d / f"{name}.csr").unlink()
    ext.unlink()
    os.chmod(d / f"{name}.key", 0o600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TlsController:
    """A controller with unix:, tls: and (plaintext, loopback) tcp:
    listeners and a PKI in STATE/tls, plus a second CA in DIR/other."""

    def __init__(self, d: Path) -> None:
        self.dir = d
        self.tls = d / "state" / "tls"
        make_ca(self.tls)
        make_ca(self.tls, "trainer-ca", cn="test trainer CA")
        issue(self.tls, "api", "slot-controller-api", "serverAuth", san=API_SAN)
        issue(self.tls, "trainer", "slot-trainer:test", "clientAuth", ca="trainer-ca")
        issue(self.tls, "expired", "slot-trainer:old", "clientAuth", ca="trainer-ca", days=-1)
        self.other = d / "other"
        make_ca(self.other, cn="another CA")
        issue(self.other, "trainer", "slot-trainer:stranger", "clientAuth")
        self.port, self.tcp_port = free_port(), free_port()
        self.addr = f"tls:127.0.0.1:{self.port}"
        self.ctl = Controller(d, CONFIG, extra=[
            "--listen", self.addr, "--listen", f"tcp:127.0.0.1:{self.tcp_port}", "--insecure"])

    def agentctl(self, *args: str, cert: str | None = None, key: str | None = None,
                 addr: str | None = None, stdin: bytes | None = None,
                 timeout: float = 20) -> subprocess.CompletedProcess:
        argv = [str(AGENTCTL_BIN), "--controller", addr or self.addr,
                "--state-dir", str(self.dir / "state"), "--timeout", "10"]
        if cert:
            argv += ["--tls-cert", cert, "--tls-key", key or cert.replace(".pem", ".key")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLOT_")}
        return subprocess.run([*argv, *args], input=stdin or b"", capture_output=True,
                              timeout=timeout, env=env)

    def context(self, cert: bool = True, max_tls12: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(str(self.tls / "ca.pem"))
        if cert:
            ctx.load_cert_chain(str(self.tls / "trainer.pem"), str(self.tls / "trainer.key"))
        if max_tls12:
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def tls_client(self, timeout: float = 10) -> Client:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        s = self.context().wrap_socket(raw, server_hostname="slot-controller-api")
        c = Client._from_socket(s, timeout)
        return c

    def log_lines(self, start: int, pattern: str) -> list[str]:
        return [ln for ln in self.ctl.log()[start:].splitlines() if re.search(pattern, ln)]

    def close(self) -> None:
        rc = self.ctl.stop()
        kill_stray_agents(self.ctl.state_dir)
        log = self.ctl.log()
        assert "Sanitizer" not in log and "runtime error:" not in log, log[-4000:]
        assert rc == 0, log[-3000:]


@pytest.fixture
def tc(tmpdir_short: Path) -> Iterator[TlsController]:
    d = tmpdir_short / "tls"
    d.mkdir()
    t = TlsController(d)
    try:
        yield t
    finally:
        t.close()


def one_line(err: bytes) -> str:
    lines = err.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# Server-side lines about one refused connection.
FAIL = r"trainer connection from 127\.0\.0\.1:\d+: "


def wait_log(tc: TlsController, start: int, pattern: str, n: int = 1,
             timeout: float = 5) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = tc.log_lines(start, pattern)
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_agentctl_over_tls(tc: TlsController) -> None:
    r = tc.agentctl("status")
    assert r.returncode == 0, r.stderr
    assert b"1 ready" in r.stdout
    r = tc.agentctl("acquire", "--trajectory", "tls-t")
    assert r.returncode == 0, r.stderr
    handle = r.stdout.decode().strip()
    r = tc.agentctl("exec", handle, "--", "echo over-tls; head -c 300000 /dev/zero | wc -c")
    assert r.returncode == 0 and r.stdout == b"over-tls\n300000\n", r
    r = tc.agentctl("put", handle, "f.txt", stdin=b"x" * 100000)
    assert r.returncode == 0, r.stderr
    r = tc.agentctl("cat", handle, "f.txt")
    assert r.returncode == 0 and r.stdout == b"x" * 100000
    # attach: a PTY session, stdin not a terminal: the shell reads our lines
    r = tc.agentctl("attach", handle, stdin=b"echo attached-$((6*7))\nexit\n")
    assert r.returncode == 0 and b"attached-42" in r.stdout, r
    assert tc.agentctl("release", handle).returncode == 0
    r = tc.agentctl("top", "--once")
    assert r.returncode == 0 and b"default" in r.stdout, r
    log = tc.ctl.log()
    assert re.search(r"TLSv1\.3 .*client certificate 'slot-trainer:test'", log)
    assert "handshake failed" not in log
    # another certificate of the same CA (an agent's, serverAuth only) cannot
    # pose as the controller: agentctl wants the name slot-controller-api
    issue(tc.tls, "imposter", "default-123456", "serverAuth", san="DNS:default-123456")
    srv = socket.socket()
    srv.settimeout(10)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(tc.tls / "imposter.pem"), str(tc.tls / "imposter.key"))

    def serve() -> None:
        conn, _ = srv.accept()
        try:
            sctx.wrap_socket(conn, server_side=True).recv(10)
        except (ssl.SSLError, OSError):
            pass
        finally:
            conn.close()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    r = tc.agentctl("status", addr=f"tls:127.0.0.1:{srv.getsockname()[1]}")
    th.join(10)
    srv.close()
    assert r.returncode == 1
    assert "slot-controller-api" in one_line(r.stderr), r.stderr
    # stop over TLS: returns once the controller is gone
    r = tc.agentctl("stop")
    assert r.returncode == 0, r.stderr
    assert tc.ctl.proc is not None and tc.ctl.proc.wait(10) == 0


def test_each_failure_is_one_line_on_both_sides(tc: TlsController) -> None:
    good = tc.tls_client()
    assert good.call("status")["agents"]["ready"] == 1

    # an expired client certificate
    start = len(tc.ctl.log())
    r = tc.agentctl("status", cert=str(tc.tls / "expired.pem"))
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "TLS" in line and "expired" in line, line
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*expired")
    assert len(got) == 1, tc.ctl.log()[start:]

    # a certificate of another CA
    start = len(tc.ctl.log())
    r = tc.agentctl("status", cert=str(tc.other / "trainer.pem"))
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "TLS" in line, line
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*(not signed|CA)")
    assert len(got) == 1, tc.ctl.log()[start:]

    # a server certificate (EKU serverAuth only, as an agent's) used as a client's
    issue(tc.tls, "srvonly", "slot-trainer:srv", "serverAuth", ca="trainer-ca")
    start = len(tc.ctl.log())
    r = tc.agentctl("status", cert=str(tc.tls / "srvonly.pem"))
    assert r.returncode == 1
    assert "TLS" in one_line(r.stderr), r.stderr
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*(clientAuth|key usage)")
    assert len(got) == 1, tc.ctl.log()[start:]

    # no client certificate (Python: the handshake ends on the client's side
    # first in TLS 1.3; the refusal comes as an alert on the first read)
    start = len(tc.ctl.log())
    raw = socket.create_connection(("127.0.0.1", tc.port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError)) as ei:
        s = tc.context(cert=False).wrap_socket(raw, server_hostname="slot-controller-api")
        s.sendall(b"\x00\x00\x00\x01\x80")
        if not s.recv(100):
            raise ConnectionError("closed")
    raw.close()
    assert "certificate" in str(ei.value).lower() or "closed" in str(ei.value), ei.value
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*certificate")
    assert len(got) == 1, tc.ctl.log()[start:]

    # a TLS 1.2 client
    start = len(tc.ctl.log())
    raw = socket.create_connection(("127.0.0.1", tc.port), timeout=10)
    with pytest.raises(ssl.SSLError) as ei:
        tc.context(max_tls12=True).wrap_socket(raw, server_hostname="slot-controller-api")
    raw.close()
    assert "version" in str(ei.value).lower(), ei.value
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*(1\\.2|version)")
    assert len(got) == 1, tc.ctl.log()[start:]

    # a plaintext client on the tls: port: a plaintext error frame it can show
    start = len(tc.ctl.log())
    r = tc.agentctl("status", addr=f"tcp:127.0.0.1:{tc.port}")
    assert r.returncode == 1
    assert "this port speaks TLS" in one_line(r.stderr), r.stderr
    got = wait_log(tc, start, FAIL + "plaintext client on a tls: listener")
    assert len(got) == 1, tc.ctl.log()[start:]

    # a TLS client on the plaintext tcp: port
    start = len(tc.ctl.log())
    r = tc.agentctl("status", addr=f"tls:127.0.0.1:{tc.tcp_port}")
    assert r.returncode == 1
    line = one_line(r.stderr)
    assert "TLS" in line, line
    got = wait_log(tc, start, FAIL + "TLS client on a plaintext tcp: listener")
    assert len(got) == 1, tc.ctl.log()[start:]
    # ... and Python's raw TLS client gets the same plaintext frame
    raw = socket.create_connection(("127.0.0.1", tc.tcp_port), timeout=10)
    with pytest.raises(ssl.SSLError):
        tc.context().wrap_socket(raw, server_hostname="slot-controller-api")
    raw.close()

    # every line above was one line: no second line per failure
    assert len(tc.log_lines(0, r"handshake failed")) == 5, tc.ctl.log()
    # the controller is unharmed, and the connection open all along works
    assert good.call("status")["agents"]["ready"] == 1
    good.close()
    assert tc.agentctl("status").returncode == 0


def test_flood_of_bad_handshakes_while_a_client_works(tc: TlsController) -> None:
    good = tc.tls_client()
    handle = good.call("acquire", {"trajectory_id": "flood"})["slot"]
    start = len(tc.ctl.log())
    # and one that connects and never says a word: closed after 10 s
    silent = socket.create_connection(("127.0.0.1", tc.port), timeout=15)
    silent_at = time.monotonic()
    errors: list[BaseException] = []

    def flood() -> None:
        try:
            for i in range(200):
                raw = socket.create_connection(("127.0.0.1", tc.port), timeout=10)
                try:
                    if i % 2:  # garbage that starts like a TLS record
                        raw.sendall(b"\x16\x03\x01\x00\x10" + os.urandom(16))
                        raw.recv(100)
                    else:  # a real handshake without a client certificate
                        s = tc.context(cert=False).wrap_socket(
                            raw, server_hostname="slot-controller-api")
                        s.sendall(b"\x00\x00\x00\x01\x80")
                        s.recv(100)
                except (ssl.SSLError, OSError):
                    pass
                finally:
                    raw.close()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    th = threading.Thread(target=flood)
    th.start()
    n = 0
    while th.is_alive() or n < 5:
        r = good.call("exec", {"slot": handle, "tool": "bash",
                               "args": {"command": f"echo {n}"}})
        assert r["stdout"] == f"{n}\n".encode()
        n += 1
    th.join(30)
    assert not errors, errors
    assert n >= 5
    # a new good connection works right after
    assert tc.agentctl("status").returncode == 0
    # logged, but rate-limited: not 200 lines
    lines = tc.log_lines(start, r"trainer connection from|failed TLS connections")
    assert 1 <= len(lines) <= 30, len(lines)
    assert silent.recv(100) == b""  # blocks until the controller closes it
    assert 9.5 < time.monotonic() - silent_at < 13
    silent.close()
    # the rest of the flood is counted in one line at the end of the window
    assert wait_log(tc, start, r"\d+ more failed TLS connections in the last", timeout=5)
    assert good.call("exec", {"slot": handle, "tool": "bash",
                              "args": {"command": "echo still"}})["stdout"] == b"still\n"
    good.close()


def test_api_certificate_replaced_on_disk(tc: TlsController) -> None:
    old = tc.tls_client()
    old_der = old.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert old.call("status")["agents"]["ready"] == 1
    # A renewal: a new key and certificate, each written whole and renamed.
    time.sleep(1.1)  # a new mtime whatever the file system's resolution
    new = tc.dir / "renew"
    new.mkdir()
    for f in ("ca.pem", "ca.key"):
        (new / f).write_bytes((tc.tls / f).read_bytes())
    issue(new, "api", "slot-controller-api", "serverAuth", san=API_SAN)
    os.replace(new / "api.key", tc.tls / "api.key")
    os.replace(new / "api.pem", tc.tls / "api.pem")
    start = len(tc.ctl.log())
    fresh = tc.tls_client()
    fresh_der = fresh.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    assert fresh_der != old_der
    assert fresh_der == ssl.PEM_cert_to_DER_cert((tc.tls / "api.pem").read_text())
    assert fresh.call("status")["agents"]["ready"] == 1
    assert old.call("status")["agents"]["ready"] == 1  # the old link is untouched
    assert tc.log_lines(start, r"API certificate reloaded")
    assert tc.agentctl("status").returncode == 0
    # a broken set (a key that does not match) is refused, the last good one kept
    issue(new, "api2", "slot-controller-api", "serverAuth", san=API_SAN)
    time.sleep(1.1)
    os.replace(new / "api2.pem", tc.tls / "api.pem")
    start = len(tc.ctl.log())
    again = tc.tls_client()
    assert again.sock.getpeercert(binary_form=True) == fresh_der  # type: ignore[attr-defined]
    assert again.call("status")["agents"]["ready"] == 1
    assert tc.log_lines(start, r"cannot be used")
    for c in (old, fresh, again):
        c.close()


def test_agentctl_to_one_agent_over_tls(tc: TlsController) -> None:
    """agentctl --agent tls: with the controller's client certificate (ca.pem
    signs it and the agent's); --tls-name checks which agent answers. The
    trainer certificate (trainer-ca.pem's, agentctl's default) is refused at
    the agent's handshake."""
    issue(tc.tls, "agent", "agent-x", "serverAuth", san="DNS:agent-x")
    port = free_port()
    data = tc.dir / "agent-data"
    data.mkdir()
    log = open(tc.dir / "agent.log", "wb")
    agent = subprocess.Popen([str(AGENT_BIN), "--listen", f"tls:127.0.0.1:{port}",
                              "--tls-cert", str(tc.tls / "agent.pem"),
                              "--tls-key", str(tc.tls / "agent.key"),
                              "--tls-ca", str(tc.tls / "ca.pem"), "--data-dir", str(data),
                              "--slots", "2"], stdout=log, stderr=subprocess.STDOUT)
    try:
        addr = f"tls:127.0.0.1:{port}"
        base = [str(AGENTCTL_BIN), "--agent", addr, "--state-dir", str(tc.dir / "state"),
                "--wait", "10"]
        argv = [*base, "--tls-cert", str(tc.tls / "controller.pem"),
                "--tls-key", str(tc.tls / "controller.key")]
        r = subprocess.run([*argv, "--tls-name", "agent-x", "exec", "0", "--", "echo direct"],
                           capture_output=True, timeout=20)
        assert r.returncode == 0 and r.stdout == b"direct\n", r
        r = subprocess.run([*argv, "slots"], capture_output=True, timeout=20)
        assert r.returncode == 0 and b"SLOT" in r.stdout, r
        r = subprocess.run([*argv, "--tls-name", "agent-y", "health"], capture_output=True,
                           timeout=20)
        assert r.returncode == 1
        assert "agent-y" in one_line(r.stderr), r.stderr
        # the trainer certificate of another CA is refused by the agent too
        r = subprocess.run([*argv, "--tls-cert", str(tc.other / "trainer.pem"),
                            "--tls-key", str(tc.other / "trainer.key"), "health"],
                           capture_output=True, timeout=20)
        assert r.returncode == 1 and "TLS" in one_line(r.stderr), r.stderr
        # the trainer certificate (agentctl's default) is refused by the agent
        r = subprocess.run([*base, "health"], capture_output=True, timeout=20)
        assert r.returncode == 1 and "TLS" in one_line(r.stderr), r.stderr
        deadline = time.monotonic() + 5
        while "not signed by this server's CA (CN=slot-trainer:test)" not in \
                (tc.dir / "agent.log").read_text(errors="replace"):
            assert time.monotonic() < deadline, (tc.dir / "agent.log").read_text()
            time.sleep(0.05)
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
        log.close()
    text = (tc.dir / "agent.log").read_text(errors="replace")
    assert "Sanitizer" not in text and "runtime error:" not in text, text[-3000:]


def test_controller_certificate_is_refused_by_the_api(tc: TlsController) -> None:
    """STATE/tls/controller.pem (clientAuth, signed by ca.pem: what reaches
    agents) does not open the trainer API, which trusts trainer-ca.pem."""
    ctl_pem, ctl_key = tc.tls / "controller.pem", tc.tls / "controller.key"
    assert ctl_pem.exists() and ctl_key.exists()
    start = len(tc.ctl.log())
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(tc.tls / "ca.pem"))
    ctx.load_cert_chain(str(ctl_pem), str(ctl_key))
    raw = socket.create_connection(("127.0.0.1", tc.port), timeout=10)
    # TLS 1.3: the client's side of the handshake ends first; the server's
    # refusal comes as an alert on the first read
    with pytest.raises((ssl.SSLError, ConnectionError)) as ei:
        s = ctx.wrap_socket(raw, server_hostname="slot-controller-api")
        s.sendall(b"\x00\x00\x00\x01\x80")
        if not s.recv(100):
            raise ConnectionError("closed")
    raw.close()
    assert "unknown ca" in str(ei.value).lower() or "closed" in str(ei.value), ei.value
    got = wait_log(tc, start, FAIL + "TLS handshake failed: .*not signed by this server's CA "
                   r"\(CN=slot-controller:")
    assert len(got) == 1, tc.ctl.log()[start:]
    r = tc.agentctl("status", cert=str(ctl_pem))
    assert r.returncode == 1 and "TLS" in one_line(r.stderr), r.stderr
    # the trainer certificate still works, and the server is checked against ca.pem
    assert tc.agentctl("status").returncode == 0


def test_trainer_certificate_of_an_older_state_dir_is_issued_again(tmpdir_short: Path) -> None:
    """A state dir from before trainer-ca.pem: trainer.pem signed by ca.pem.
    At start the controller makes trainer-ca.pem (0644, key 0600) and issues
    trainer.pem again from it; agentctl and slot_client work with the
    defaults, and ca.pem and api.pem are kept."""
    d = tmpdir_short / "old"
    tls = d / "state" / "tls"
    make_ca(tls)
    issue(tls, "api", "slot-controller-api", "serverAuth", san=API_SAN)
    issue(tls, "trainer", "slot-trainer:test", "clientAuth")
    kept = {f: (tls / f).read_bytes() for f in ("ca.pem", "ca.key", "api.pem")}
    old_trainer = (tls / "trainer.pem").read_bytes()
    port = free_port()
    ctl = Controller(d, CONFIG, extra=["--listen", f"tls:127.0.0.1:{port}"])
    try:
        assert {f: (tls / f).read_bytes() for f in kept} == kept
        assert (tls / "trainer.pem").read_bytes() != old_trainer
        assert oct((tls / "trainer-ca.pem").stat().st_mode & 0o777) == "0o644"
        assert oct((tls / "trainer-ca.key").stat().st_mode & 0o777) == "0o600"

        def verify(ca: str) -> subprocess.CompletedProcess:
            return subprocess.run(["openssl", "verify", "-CAfile", str(tls / ca),
                                   str(tls / "trainer.pem")], capture_output=True, timeout=30)
        assert verify("trainer-ca.pem").returncode == 0
        assert verify("ca.pem").returncode != 0
        assert re.search(r"trainer\.pem is not signed by the controller's trainer CA",
                         ctl.log()), ctl.log()[-3000:]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLOT_")}
        r = subprocess.run([str(AGENTCTL_BIN), "--controller", f"tls:127.0.0.1:{port}",
                            "--state-dir", str(d / "state"), "--timeout", "10", "status"],
                           capture_output=True, timeout=20, env=env)
        assert r.returncode == 0 and b"1 ready" in r.stdout, r
        # the Python client with its defaults (STATE/tls/trainer.pem, ca.pem)
        code = ("import asyncio, sys\n"
                "from slot_client import AsyncClient\n"
                "async def main():\n"
                "    c = await AsyncClient.connect(sys.argv[1], state_dir=sys.argv[2])\n"
                "    st = await c.status()\n"
                "    print(c.tls_info, st['agents']['ready'])\n"
                "    await c.close()\n"
                "asyncio.run(main())\n")
        r = subprocess.run([sys.executable, "-c", code, f"tls:127.0.0.1:{port}",
                            str(d / "state")], capture_output=True, timeout=30,
                           env={**env, "PYTHONPATH": str(ROOT / "controller" / "python")})
        assert r.returncode == 0 and r.stdout.startswith(b"TLSv1.3") and \
            r.stdout.strip().endswith(b" 1"), r
        # a restart keeps the new trainer.pem (it verifies against trainer-ca)
        now = (tls / "trainer.pem").read_bytes()
        assert ctl.stop() == 0
        ctl.start()
        assert (tls / "trainer.pem").read_bytes() == now
    finally:
        rc = ctl.stop()
        kill_stray_agents(ctl.state_dir)
    assert rc == 0, ctl.log()[-3000:]


def test_plaintext_tcp_on_the_network_needs_insecure(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text("s3cret\n")
    r = subprocess.run([str(CONTROLLER_BIN), "--listen", f"tcp:0.0.0.0:{free_port()}",
                        "--token-file", str(tok), "--state-dir", str(tmp_path / "s"),
                        "--profile", "none", "--max-agents", "1", "--min-agents", "0"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1
    assert "non-loopback" in r.stderr and "tls:" in r.stderr and "--insecure" in r.stderr, r.stderr
