"""TLS 1.3 listeners (`--listen tls:`): mutual X.509 authentication, a one-line
reason on both sides for every failure a user meets, an agent that keeps
serving through a flood of bad handshakes, certificate renewal without
dropping a connection, `--attach tls:`, and a loopback capture that finds
neither the token nor any command, file or output over TLS (and finds them
over plaintext, so the check can fail)."""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import AGENT_BIN, Agent, free_port
from helpers import _tcp_listening, split_frames
from helpers_proc import wait_until
from slotwire import Client, pack_frame

TOKEN = "tls-test-token-" + secrets.token_hex(8)


# ---- certificates (openssl CLI, EC P-256) ----------------------------------

def _run(*args: str, cwd: Path) -> None:
    r = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, f"{args}: {r.stderr}"


def _ca(d: Path, name: str) -> None:
    _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key",
         cwd=d)
    _run("openssl", "req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}",
         "-days", "30", "-out", f"{name}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, name: str, ca: str, cn: str, eku: str, days: int = 30) -> None:
    """days < 0 makes a certificate that expired when it was issued."""
    _run("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key",
         cwd=d)
    _run("openssl", "req", "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}", "-out",
         f"{name}.csr", cwd=d)
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage={eku}\nsubjectAltName=DNS:{cn}\n")
    _run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
         f"{ca}.key", "-set_serial", str(secrets.randbits(62)), "-days", str(days), "-extfile",
         f"{name}.ext", "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="slt-pki-", dir="/tmp"))
    try:
        _ca(d, "ca")
        _ca(d, "ca2")
        _leaf(d, "server", "ca", "agent-x", "serverAuth")
        _leaf(d, "server_renewed", "ca", "agent-x", "serverAuth", days=90)
        _leaf(d, "server_other", "ca", "agent-z", "serverAuth", days=90)
        _leaf(d, "client", "ca", "slot-controller:test", "clientAuth")
        _leaf(d, "untrusted", "ca2", "slot-controller:evil", "clientAuth")
        _leaf(d, "expired", "ca", "slot-controller:old", "clientAuth", days=-1)
        _leaf(d, "serveronly", "ca", "agent-y", "serverAuth")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- agents ------------------------------------------------------------------



class TlsAgent:
    """An agent with a unix: and a tls: listener (its own copy of the files)."""

    def __init__(self, pki: Path, tmp: Path, extra: list[str] | None = None) -> None:
        self.tls_dir = tmp / "tls"
        self.tls_dir.mkdir()
        for src, dst in (("server.pem", "cert.pem"), ("server.key", "key.pem"),
                         ("ca.pem", "ca.pem")):
            shutil.copy(pki / src, self.tls_dir / dst)
        (self.tls_dir / "key.pem").chmod(0o600)
        self.port = free_port()
        self.agent = Agent(tmp, slots=2, token=TOKEN, extra=[
            "--listen", f"tls:127.0.0.1:{self.port}",
            "--tls-cert", str(self.tls_dir / "cert.pem"),
            "--tls-key", str(self.tls_dir / "key.pem"),
            "--tls-ca", str(self.tls_dir / "ca.pem"), *(extra or [])])
        wait_until(lambda: _tcp_listening(self.port) or self.agent.proc.poll() is not None, 10,
                   0.005, "the tls listener")
        assert self.agent.proc.poll() is None, self.agent.log()

    def log(self) -> str:
        return self.agent.log()

    def stop(self) -> None:
        rc = self.agent.stop()
        log = self.agent.log()
        assert "Sanitizer" not in log and "runtime error:" not in log, log[-4000:]
        assert rc == 0, f"agent exited {rc}: {log[-2000:]}"


@pytest.fixture(scope="module")
def shared(pki: Path) -> Iterator[TlsAgent]:
    """One agent for the tests that do not change its certificate. A short
    handshake timeout keeps the silent-client tests fast."""
    d = Path(tempfile.mkdtemp(prefix="slt-", dir="/tmp"))
    a = TlsAgent(pki, d, ["--tls-handshake-timeout", "1"])
    try:
        yield a
    finally:
        a.stop()
        subprocess.run(["chmod", "-R", "u+rwx", str(d)], check=False)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def own(pki: Path, tmpdir_short: Path) -> Iterator[TlsAgent]:
    """An agent whose certificate files a test may replace."""
    a = TlsAgent(pki, tmpdir_short)
    try:
        yield a
    finally:
        a.stop()


# ---- clients -----------------------------------------------------------------

def tls_socket(pki: Path, port: int, who: str | None = "client", name: str = "agent-x",
               max_version: ssl.TLSVersion | None = None, timeout: float = 10) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki / "ca.pem"))
    if who:
        ctx.load_cert_chain(str(pki / f"{who}.pem"), str(pki / f"{who}.key"))
    if max_version:
        ctx.maximum_version = max_version
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(s, server_hostname=name)
    except BaseException:
        s.close()
        raise


def tls_client(pki: Path, port: int, who: str = "client", hello: bool = True) -> Client:
    c = Client._from_socket(tls_socket(pki, port, who), 10)
    if hello:
        c.call("hello", {"token": TOKEN})
    return c


def refused(pki: Path, port: int, **kw) -> str:
    """The client's one-line reason for a refused link. With TLS 1.3 the
    agent's verdict on a client certificate arrives after the client's side
    of the handshake, so a request is sent and the answer read."""
    try:
        s = tls_socket(pki, port, **kw)
    except (ssl.SSLError, OSError) as e:
        return str(e)
    try:
        s.sendall(pack_frame({"id": 1, "op": "hello", "args": {"token": TOKEN}}))
        data = s.recv(65536)
        return f"no failure: {data!r}"
    except (ssl.SSLError, OSError) as e:
        return str(e)
    finally:
        s.close()


def wait_log(a: TlsAgent, text: str, timeout: float = 5) -> str:
    wait_until(lambda: text in a.log(), timeout, 0.02, f"agent log line {text!r}")
    return next(line for line in a.log().splitlines() if text in line)


# ---- the link works ------------------------------------------------------------

def test_exec_over_tls_with_token(pki: Path, shared: TlsAgent) -> None:
    c = Client._from_socket(tls_socket(pki, shared.port), 10)
    # the token stays a second factor: a certificate alone runs nothing
    assert c.error_code("exec", {"slot": 0, "cmd": "true"}) == "unauthorized"
    h = c.call("hello", {"token": TOKEN})
    assert h["tls"] == {"version": "TLSv1.3", "cipher": h["tls"]["cipher"],
                        "peer_cn": "slot-controller:test"}
    # the agent picks by its own order, ChaCha20 first (no AES-NI in Debian's
    # wolfSSL), though Python's ssl offers AES-GCM first
    assert h["tls"]["cipher"] == "TLS_CHACHA20_POLY1305_SHA256"
    assert h["tls_listen"] is True and h["authenticated"] is True
    r = c.call("exec", {"slot": 0, "cmd": "echo over-tls"})
    assert (r["exit_code"], r["stdout"]) == (0, b"over-tls\n")
    st = c.call("stats")
    assert st["tls"]["handshakes"] >= 1
    c.close()
    # plaintext links say so: no tls map, the listener flag all the same
    u = shared.agent.client()
    h = u.call("hello", {"token": TOKEN})
    assert "tls" not in h and h["tls_listen"] is True
    u.close()


# ---- every failure: one line on both sides -------------------------------------

@pytest.mark.parametrize("who,client_says,agent_says", [
    (None, "certificate required",
     "the peer sent no client certificate (this server requires one signed by its --tls-ca)"),
    ("untrusted", "unknown ca",
     "the client certificate is not signed by this server's CA (CN=slot-controller:evil)"),
    ("expired", "certificate expired",
     "the client certificate has expired (CN=slot-controller:old, notAfter "),
    ("serveronly", "bad certificate",
     "the client certificate (CN=agent-y) is not for client use (its extended key usage lacks "
     "clientAuth)"),
])
def test_refused_client_certificates(pki: Path, shared: TlsAgent, who: str | None,
                                     client_says: str, agent_says: str) -> None:
    before = shared.log().count("TLS handshake failed")
    why = refused(pki, shared.port, who=who)
    assert client_says in why.lower(), why
    line = wait_log(shared, agent_says)
    assert "warn" in line and "TLS handshake failed" in line
    assert shared.log().count("TLS handshake failed") == before + 1
    # the agent is unharmed
    c = tls_client(pki, shared.port)
    assert c.call("exec", {"slot": 1, "cmd": "echo ok"})["stdout"] == b"ok\n"
    c.close()


def test_tls12_client_refused(pki: Path, shared: TlsAgent) -> None:
    why = refused(pki, shared.port, max_version=ssl.TLSVersion.TLSv1_2)
    assert "protocol version" in why.lower(), why
    wait_log(shared, "the peer offered TLS 1.2 or older; slot links need TLS 1.3")


def test_plaintext_client_on_tls_port_gets_an_error_frame(shared: TlsAgent) -> None:
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
        s.sendall(pack_frame({"id": 1, "op": "hello", "args": {"token": TOKEN}}))
        c = Client._from_socket(s, 10)
        f = c.recv_frame()
        assert f is not None and f["ok"] is False
        assert f["error"]["code"] == "bad_request"
        assert "this port speaks TLS" in f["error"]["message"]
        assert c.recv_frame() is None  # then closed
    wait_log(shared, "a plaintext client on the TLS listener")


def test_tls_client_on_plaintext_port(pki: Path, agent_factory) -> None:
    a = agent_factory(tcp=True, token=TOKEN)
    wait_until(lambda: _tcp_listening(a.port), 10, 0.005, "tcp listener")
    why = refused(pki, a.port)
    assert "wrong version number" in why.lower() or "record" in why.lower(), why
    wait_until(lambda: "a TLS client on the plaintext listener" in a.log(), 5, 0.02, "log")
    # the agent's own TLS client names the mistake
    r = subprocess.run([str(AGENT_BIN), "--attach", f"tls:127.0.0.1:{a.port}",
                        "--tls-cert", str(pki / "client.pem"),
                        "--tls-key", str(pki / "client.key"), "--tls-ca", str(pki / "ca.pem")],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip().endswith(
        "the agent answered in plaintext (it listens with tcp:, not tls:?)"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # and plaintext clients still work there
    c = a.tcp_client()
    c.call("hello", {"token": TOKEN})
    assert c.call("exec", {"slot": 0, "cmd": "echo plain"})["stdout"] == b"plain\n"
    c.close()


def test_silent_client_is_closed_by_the_handshake_timeout(shared: TlsAgent) -> None:
    with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the agent, nothing said
        took = time.monotonic() - t0
    assert 0.8 < took < 5, took
    wait_log(shared, "no handshake within 1 s")


def test_flood_of_bad_handshakes(pki: Path, shared: TlsAgent) -> None:
    """200 bad clients from threads (garbage, silent half-open, TLS 1.2,
    wrong certificates) while a good client runs execs every few ms: every
    exec succeeds, the agent still answers, and the log stays short."""
    good = tls_client(pki, shared.port)
    before = good.call("stats")["tls"]["failures"]
    lines_before = shared.log().count("TLS handshake failed")
    stop = threading.Event()
    results: list[bytes] = []
    errors: list[BaseException] = []

    def exec_loop() -> None:
        try:
            i = 0
            while not stop.is_set():
                r = good.call("exec", {"slot": 0, "cmd": f"echo {i}"}, timeout=20)
                results.append(r["stdout"])
                assert r["stdout"] == f"{i}\n".encode()
                i += 1
                time.sleep(0.003)
        except BaseException as e:  # reported below
            errors.append(e)

    held: list[socket.socket] = []
    lock = threading.Lock()

    def bad(k: int) -> None:
        kind = k % 4
        try:
            if kind == 0:  # garbage that looks like a TLS record
                with socket.create_connection(("127.0.0.1", shared.port), timeout=10) as s:
                    s.sendall(b"\x16\x03\x01\x00\x30" + os.urandom(48))
                    s.recv(100)
            elif kind == 1:  # silent, half-open: held until the end
                s = socket.create_connection(("127.0.0.1", shared.port), timeout=10)
                with lock:
                    held.append(s)
            elif kind == 2:
                refused(pki, shared.port, max_version=ssl.TLSVersion.TLSv1_2)
            else:
                refused(pki, shared.port, who="untrusted")
        except OSError:
            pass

    t = threading.Thread(target=exec_loop)
    t.start()
    threads = [threading.Thread(target=bad, args=(k,)) for k in range(200)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    time.sleep(0.3)
    stop.set()
    t.join(30)
    for s in held:
        s.close()
    assert not errors, errors
    assert len(results) >= 10
    st = good.call("stats")
    assert st["tls"]["failures"] - before >= 150  # the silent ones may still be pending
    good.close()
    # the rate limit: at most 10 lines a second, then a summary
    wait_log(shared, "more failed TLS handshakes", timeout=5)
    assert shared.log().count("TLS handshake failed") - lines_before < 100
    c = tls_client(pki, shared.port)
    assert c.call("health") is not None
    c.close()


# ---- renewal -----------------------------------------------------------------

def _not_after(pki: Path, port: int) -> float:
    s = tls_socket(pki, port)
    try:
        return ssl.cert_time_to_seconds(s.getpeercert()["notAfter"])
    finally:
        s.close()


def test_tls_renew_swaps_the_certificate_and_keeps_open_links(pki: Path, own: TlsAgent) -> None:
    old = _not_after(pki, own.port)
    keep = tls_client(pki, own.port)
    cert = (pki / "server_renewed.pem").read_bytes()
    key = (pki / "server_renewed.key").read_bytes()
    # another name is refused: the controller renews, it does not rename
    r = keep.call_raw("tls_renew", {"cert": (pki / "server_other.pem").read_bytes(),
                                    "key": (pki / "server_other.key").read_bytes()})
    assert r["error"]["code"] == "bad_request" and "CN=agent-z" in r["error"]["message"]
    # a key of another certificate is refused
    r = keep.call_raw("tls_renew", {"cert": cert, "key": (pki / "server.key").read_bytes()})
    assert r["error"]["code"] == "bad_request" and "does not match" in r["error"]["message"]
    res = keep.call("tls_renew", {"cert": cert, "key": key})
    assert res["written"] is True and res["cn"] == "agent-x"
    new = _not_after(pki, own.port)
    assert new > old + 30 * 86400 and abs(res["not_after"] - new) <= 1
    # the open link keeps working on its old keys
    assert keep.call("exec", {"slot": 0, "cmd": "echo still"})["stdout"] == b"still\n"
    keep.close()
    # written back atomically, the key 0600
    assert (own.tls_dir / "cert.pem").read_bytes() == cert
    assert (own.tls_dir / "key.pem").read_bytes() == key
    assert (own.tls_dir / "key.pem").stat().st_mode & 0o777 == 0o600
    assert "BEGIN" not in own.log() and key.decode() not in own.log()
    # a plaintext unauthenticated connection cannot renew
    u = Client.unix(own.agent.sock)
    assert u.error_code("tls_renew", {"cert": cert, "key": key}) == "unauthorized"
    u.close()


def test_sighup_reloads_changed_files(pki: Path, own: TlsAgent) -> None:
    old = _not_after(pki, own.port)
    keep = tls_client(pki, own.port)
    # a broken set (certificate without its key) is refused, the old one kept
    shutil.copy(pki / "server_renewed.pem", own.tls_dir / "cert.pem")
    own.agent.proc.send_signal(signal.SIGHUP)
    wait_log(own, "kept the certificate loaded before")
    assert _not_after(pki, own.port) == old
    # the matching key arrives: the next check picks the pair up
    shutil.copy(pki / "server_renewed.key", own.tls_dir / "key.pem")
    own.agent.proc.send_signal(signal.SIGHUP)
    wait_log(own, "TLS: certificate reloaded (CN=agent-x")
    assert _not_after(pki, own.port) > old + 30 * 86400
    assert keep.call("exec", {"slot": 1, "cmd": "echo kept"})["stdout"] == b"kept\n"
    keep.close()


# ---- start-up rules ------------------------------------------------------------

def _start_fails(args: list[str], tmp: Path) -> str:
    r = subprocess.run([str(AGENT_BIN), *args, "--data-dir", str(tmp / "data"), "--slots", "1"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert r.returncode != 0, r.stderr
    return r.stderr


def test_plaintext_tcp_on_non_loopback_needs_insecure(tmpdir_short: Path) -> None:
    tok = tmpdir_short / "token"
    tok.write_text(TOKEN)
    port = free_port()
    err = _start_fails(["--listen", f"tcp:0.0.0.0:{port}", "--token-file", str(tok)],
                       tmpdir_short)
    assert "non-loopback" in err and "--insecure" in err and "tls:" in err, err
    # with --insecure it starts
    p = subprocess.Popen([str(AGENT_BIN), "--listen", f"tcp:0.0.0.0:{port}", "--insecure",
                          "--token-file", str(tok), "--data-dir", str(tmpdir_short / "d2"),
                          "--slots", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        wait_until(lambda: _tcp_listening(port) or p.poll() is not None, 10, 0.01, "listener")
        assert p.poll() is None
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(10) == 0
        p.stderr.close()


def test_probe_reports_tls_listen(tmpdir_short: Path) -> None:
    r = subprocess.run([str(AGENT_BIN), "--probe", "--json", "--data-dir",
                        str(tmpdir_short / "d")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tls_listen"] is True


def test_tls_listener_needs_its_files(pki: Path, tmpdir_short: Path) -> None:
    port = free_port()
    err = _start_fails(["--listen", f"tls:127.0.0.1:{port}", "--tls-cert",
                        str(pki / "server.pem")], tmpdir_short)
    assert "needs --tls-cert, --tls-key and --tls-ca" in err, err
    err = _start_fails(["--listen", f"tls:127.0.0.1:{port}", "--tls-cert", str(pki / "server.pem"),
                        "--tls-key", str(pki / "client.key"), "--tls-ca", str(pki / "ca.pem")],
                       tmpdir_short)
    assert "does not match the certificate" in err, err


# ---- --attach tls: -------------------------------------------------------------

def test_attach_tls_relays_an_exec(pki: Path, shared: TlsAgent) -> None:
    base = [str(AGENT_BIN), "--attach", f"tls:127.0.0.1:{shared.port}", "--tls-cert",
            str(pki / "client.pem"), "--tls-key", str(pki / "client.key"), "--tls-ca",
            str(pki / "ca.pem")]
    p = subprocess.Popen(base + ["--tls-name", "agent-x"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        c = Client.stdio(p, timeout=20)
        h = c.call("hello", {"token": TOKEN})
        assert h["tls"]["peer_cn"] == "slot-controller:test"
        r = c.call("exec", {"slot": 0, "cmd": "echo relayed; exit 4"})
        assert (r["stdout"], r["exit_code"]) == (b"relayed\n", 4)
        p.stdin.close()
        assert p.wait(10) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)
        for f in (p.stdout, p.stderr):
            f.close()
    # requests then EOF on stdin (a half-close): every answer still arrives
    req = (pack_frame({"id": 1, "op": "hello", "args": {"token": TOKEN}}) +
           pack_frame({"id": 2, "op": "exec", "args": {"slot": 1, "cmd": "sleep 0.2; echo late"}}))
    r = subprocess.run(base, input=req, capture_output=True, timeout=20)
    assert r.returncode == 0, r.stderr
    frames = split_frames(r.stdout)
    assert [f["id"] for f in frames] == [1, 2] and frames[1]["result"]["stdout"] == b"late\n"
    # the wrong expected name, and a refused certificate: one line each, exit 1
    r = subprocess.run(base + ["--tls-name", "agent-q"], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "the server certificate is for CN=agent-x, not for the expected name agent-q" in r.stderr
    r = subprocess.run(base[:4] + [str(pki / "untrusted.pem"), "--tls-key",
                                   str(pki / "untrusted.key"), "--tls-ca", str(pki / "ca.pem")],
                       input=pack_frame({"id": 1, "op": "hello"}), capture_output=True,
                       timeout=20)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1, r.stderr
    assert b"the server refused our client certificate (TLS alert unknown_ca" in r.stderr


# ---- nothing readable on the wire ----------------------------------------------

def _capture(port: int, tmp: Path, traffic) -> bytes:
    out = tmp / f"cap-{port}.pcap"
    # --immediate-mode: packets reach the file as they come, not when a
    # ring block fills or times out (SIGINT would lose a partial block)
    p = subprocess.Popen(["tcpdump", "-i", "lo", "--immediate-mode", "-U", "-w", str(out),
                          f"tcp port {port}"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 10
        while "listening on" not in line:
            assert time.monotonic() < deadline and p.poll() is None, "tcpdump did not start"
            line = p.stderr.readline()
        traffic()
        time.sleep(0.2)  # the last segments reach the capture
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        p.stderr.close()
    data = out.read_bytes()
    out.unlink()
    return data


def _trainer_traffic(c: Client, file_marker: str, out_marker: str) -> None:
    c.call("hello", {"token": TOKEN})
    c.call("write_file", {"slot": 0, "path": "secret.txt", "data": file_marker.encode()})
    r = c.call("exec", {"slot": 0, "cmd": f"cat secret.txt; echo {out_marker}"})
    assert r["stdout"] == f"{file_marker}{out_marker}\n".encode()
    c.close()


def test_capture_shows_nothing_over_tls_and_everything_in_plaintext(
        pki: Path, shared: TlsAgent, agent_factory, tmpdir_short: Path) -> None:
    secrets_seen = []
    for kind in ("tls", "tcp"):
        file_marker = "FILE-" + secrets.token_hex(12)
        out_marker = "OUT-" + secrets.token_hex(12)
        if kind == "tls":
            port = shared.port
            mk = lambda: Client._from_socket(tls_socket(pki, port), 10)  # noqa: E731
        else:
            a = agent_factory(tcp=True, token=TOKEN)
            wait_until(lambda: _tcp_listening(a.port), 10, 0.005, "tcp listener")
            port = a.port
            mk = a.tcp_client
        cap = _capture(port, tmpdir_short, lambda: _trainer_traffic(mk(), file_marker, out_marker))
        assert len(cap) > 500, "the capture holds the connection"
        wanted = (TOKEN, file_marker, out_marker, f"echo {out_marker}")
        secrets_seen.append((kind, sum(m.encode() in cap for m in wanted)))
    # over TLS none of the four; in plaintext all four (the check can fail)
    assert secrets_seen == [("tls", 0), ("tcp", 4)], secrets_seen
