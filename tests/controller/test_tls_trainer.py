"""A trainer over TLS (issue 19): slot_client speaking TLS 1.3 with mutual
certificates, and a packet capture of a whole trainer run.

- The client against small Python TLS servers (the standard `ssl` module,
  certificates made with the `openssl` CLI): what works, and the one line it
  gives for each failure (no client certificate, a certificate the server
  refuses, an untrusted or expired server certificate, a plaintext server,
  a TLS 1.2 server, and a plaintext client on a TLS port).
- The real slot-controller listening on `tls:127.0.0.1:P`: a trainer
  (ControllerToolBackend) acquires a slot, writes a file with a random
  marker, runs a command printing another, reads the output back, while
  `tcpdump -i lo` captures every port involved; none of the token, the
  markers or the command text appears in the capture. The agent is an exec
  daemon on `tls:127.0.0.1:P2` with the certificate the controller's CA
  issued it, reached through `slot-agent --attach tls:` with the
  controller's client certificate. The same run over plaintext `tcp:` links
  finds them all, so the check can fail.
- The same one-line errors from the controller's own listeners (wolfSSL),
  and a ControllerToolBackend that reconnects over TLS across a controller
  restart.

Needs tcpdump and openssl (Debian packages of the same names).
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, TypeVar

import msgpack
import pytest
from pydantic import BaseModel

from conftest import AGENT_BIN, ROOT, Controller, kill_stray_agents

sys.path.insert(0, str(ROOT / "controller" / "python"))

from slot_client import AsyncClient, ConnectError, ControllerToolBackend  # noqa: E402
from slot_client.tls import TLSConfig  # noqa: E402

T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 90.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(main())


# ---------------------------------------------------------------- certificates

def _openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, f"openssl {' '.join(args)}: {p.stderr}"


class PKI:
    """A test CA (EC P-256) in `dir`, issuing leaf certificates with openssl."""

    def __init__(self, dir: Path, name: str = "ca") -> None:
        self.dir = dir
        self.name = name
        self.ca = dir / f"{name}.pem"
        self.ca_key = dir / f"{name}.key"
        dir.mkdir(parents=True, exist_ok=True)
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(self.ca_key), "-out", str(self.ca), "-days", "3",
                 "-subj", f"/CN=slot-test-{name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=dir)

    def issue(self, stem: str, cn: str, eku: str, sans: tuple[str, ...] = (),
              expired: bool = False) -> tuple[Path, Path]:
        """STEM.pem / STEM.key: CN, EKU (serverAuth / clientAuth), SANs
        ("DNS:x", "IP:y"); `expired`: valid for one day, ten days ago."""
        key, csr, pem = (self.dir / f"{stem}.{x}" for x in ("key", "csr", "pem"))
        ext = self.dir / f"{stem}.ext"
        lines = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
                 f"extendedKeyUsage={eku}"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}",
                 cwd=self.dir)
        if not expired:
            _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey",
                     str(self.ca_key), "-CAcreateserial", "-out", str(pem), "-days", "2",
                     "-extfile", str(ext), cwd=self.dir)
        else:  # `openssl ca` is the CLI that takes explicit dates
            db = self.dir / f"{stem}.db"
            db.mkdir(exist_ok=True)
            (db / "index.txt").write_text("")
            conf = self.dir / f"{stem}.cnf"
            conf.write_text(
                "[ca]\ndefault_ca=d\n[d]\n"
                f"database={db}/index.txt\nnew_certs_dir={db}\nserial={db}/serial\n"
                "default_md=sha256\npolicy=p\nunique_subject=no\ncopy_extensions=none\n"
                "[p]\ncommonName=supplied\n")
            (db / "serial").write_text("1000\n")
            old = time.gmtime(time.time() - 10 * 86400)
            end = time.gmtime(time.time() - 9 * 86400)
            _openssl("ca", "-batch", "-config", str(conf), "-cert", str(self.ca), "-keyfile",
                     str(self.ca_key), "-in", str(csr), "-out", str(pem), "-notext",
                     "-startdate", time.strftime("%Y%m%d%H%M%SZ", old),
                     "-enddate", time.strftime("%Y%m%d%H%M%SZ", end),
                     "-extfile", str(ext), cwd=self.dir)
        key.chmod(0o600)
        return pem, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("tls-pki")
    ca = PKI(d, "ca")
    other = PKI(d, "other-ca")
    local = ("DNS:localhost", "IP:127.0.0.1", "IP:::1")
    return {
        "dir": d, "ca": ca, "other": other,
        "server": ca.issue("server", "slot-controller-api", "serverAuth", local),
        "expired": ca.issue("expired", "slot-controller-api", "serverAuth", local,
                            expired=True),
        "client": ca.issue("trainer", "slot-trainer:test", "clientAuth"),
        "stranger": other.issue("stranger", "slot-trainer:stranger", "clientAuth"),
    }


def wait_port(port: int, timeout: float = 15.0) -> None:
    """Until 127.0.0.1:port accepts (the controller opens its TCP listeners
    after its Unix socket, which is what Controller waits for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- a fake controller over TLS

async def _serve_frames(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers hello, and echo for anything else, until the client leaves."""
    try:
        while True:
            n = struct.unpack(">I", await reader.readexactly(4))[0]
            req = msgpack.unpackb(await reader.readexactly(n), raw=False)
            res = {"protocol": 1, "server": "fake"} if req["op"] == "hello" else \
                {"echo": req.get("args")}
            body = msgpack.packb({"id": req["id"], "ok": True, "result": res})
            writer.write(struct.pack(">I", len(body)) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


class FakeServer:
    """A TLS (or plaintext) frame server on 127.0.0.1 for the client's tests."""

    def __init__(self, ctx: Optional[ssl.SSLContext], handler: Any = _serve_frames) -> None:
        self.ctx = ctx
        self.handler = handler
        self.server: Optional[asyncio.AbstractServer] = None
        self.port = 0

    async def __aenter__(self) -> "FakeServer":
        self.server = await asyncio.start_server(self.handler, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def addr(self) -> str:
        return f"tls:127.0.0.1:{self.port}"


def server_ctx(pki: dict[str, Any], which: str = "server",
               max_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if max_version is not None:
        ctx.maximum_version = max_version
    cert, key = pki[which]
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(pki["ca"].ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_kw(pki: dict[str, Any], who: Optional[str] = "client",
              ca: Optional[Path] = None) -> dict[str, Any]:
    kw: dict[str, Any] = {"tls_ca": str(ca or pki["ca"].ca), "connect_timeout": 10}
    if who is not None:
        kw["tls_cert"], kw["tls_key"] = (str(x) for x in pki[who])
    return kw


@pytest.fixture
def no_tls_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No SLOT_TLS_* from the caller's environment, and no controller state
    dir with a trainer certificate to fall back to."""
    for v in ("SLOT_TLS_CERT", "SLOT_TLS_KEY", "SLOT_TLS_CA", "SLOT_TLS_SERVER_NAME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("SLOT_STATE_DIR", str(tmp_path / "no-state"))


def test_tls_address() -> None:
    from slot_client import parse_address
    a = parse_address("tls:127.0.0.1:7000")
    assert (a.kind, a.host, a.port, str(a)) == ("tls", "127.0.0.1", 7000, "tls:127.0.0.1:7000")
    a = parse_address("tls:[::1]:7000")
    assert (a.kind, a.host, str(a)) == ("tls", "::1", "tls:[::1]:7000")
    for bad in ("tls:host", "tls::80", "tls:h:0", "tls:h:x"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_client_speaks_tls13_with_its_certificate(pki: dict[str, Any], no_tls_env: None) -> None:
    seen: list[dict[str, Any]] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        obj = w.get_extra_info("ssl_object")
        seen.append({"version": obj.version(), "peer": obj.getpeercert()})
        await _serve_frames(r, w)

    async def main() -> None:
        async with FakeServer(server_ctx(pki), handler) as srv:
            c = await AsyncClient.connect(srv.addr, **client_kw(pki))
            assert c.server_info == {"protocol": 1, "server": "fake"}
            assert c.tls_info.startswith("TLSv1.3 "), c.tls_info
            big = "x" * (3 << 20)  # several TLS records each way
            r = await c.call("echo", {"data": big, "n": 1})
            assert r == {"echo": {"data": big, "n": 1}}
            rs = await asyncio.gather(*(c.call("echo", {"i": i}) for i in range(50)))
            assert [x["echo"]["i"] for x in rs] == list(range(50))
            await c.close()
    run(main)
    assert seen and seen[0]["version"] == "TLSv1.3"
    subject = dict(x[0] for x in seen[0]["peer"]["subject"])
    assert subject["commonName"] == "slot-trainer:test"


def test_client_tls_defaults_from_env_and_state_dir(pki: dict[str, Any], no_tls_env: None,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "tls").mkdir(parents=True)
    cert, key = pki["client"]
    for src, name in ((cert, "trainer.pem"), (key, "trainer.key"), (pki["ca"].ca, "ca.pem")):
        (state / "tls" / name).write_bytes(src.read_bytes())
    cfg = TLSConfig.resolve(state_dir=str(state))
    assert (cfg.cert, cfg.key, cfg.ca) == tuple(str(state / "tls" / n) for n in
                                                ("trainer.pem", "trainer.key", "ca.pem"))
    monkeypatch.setenv("SLOT_TLS_CA", "/env/ca.pem")
    assert TLSConfig.resolve(state_dir=str(state)).ca == "/env/ca.pem"
    assert TLSConfig.resolve(ca="/arg/ca.pem", state_dir=str(state)).ca == "/arg/ca.pem"
    monkeypatch.delenv("SLOT_TLS_CA")

    async def main() -> None:
        async with FakeServer(server_ctx(pki)) as srv:
            # the backend, as a trainer builds it: only the address and STATE
            b = ControllerToolBackend(srv.addr, state_dir=str(state))
            b._started = True
            c = await b._get_client()
            assert c.tls_info.startswith("TLSv1.3")
            # a reconnect speaks TLS too
            await c.close()
            c2 = await b._get_client()
            assert c2 is not c and c2.tls_info.startswith("TLSv1.3")
            assert (await c2.call("echo", {"k": 1})) == {"echo": {"k": 1}}
            await b.stop()
            # env only
            monkeypatch.setenv("SLOT_TLS_CERT", str(cert))
            monkeypatch.setenv("SLOT_TLS_KEY", str(key))
            monkeypatch.setenv("SLOT_TLS_CA", str(pki["ca"].ca))
            c3 = await AsyncClient.connect(srv.addr)
            assert c3.tls_info.startswith("TLSv1.3")
            await c3.close()
    run(main)


async def connect_error(addr: str, **kw: Any) -> str:
    with pytest.raises(ConnectError) as ei:
        c = await AsyncClient.connect(addr, **kw)
        await c.close()
    assert ei.value.code == "connect_failed"
    msg = ei.value.message
    assert "\n" not in msg, msg
    return msg


def test_client_errors_are_one_line(pki: dict[str, Any], no_tls_env: None) -> None:
    async def plaintext_explains(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(5)  # what a plaintext listener says to a TLS client
        body = msgpack.packb({"id": 0, "ok": False, "error": {
            "code": "bad_request", "message": "this is a plaintext port: connect with tcp:"}})
        w.write(struct.pack(">I", len(body)) + body)
        await w.drain()
        w.close()

    async def plaintext_garbles(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(5)
        w.write(b"\0\0\0\x40half a frame")  # plaintext, but no whole frame to quote
        await w.drain()
        w.close()

    async def main() -> dict[str, str]:
        out: dict[str, str] = {}
        async with FakeServer(server_ctx(pki)) as srv:
            addr = srv.addr
            out["no_cert"] = await connect_error(addr, **client_kw(pki, None))
            out["stranger"] = await connect_error(addr, **client_kw(pki, "stranger"))
            out["untrusted"] = await connect_error(addr, **client_kw(pki, ca=pki["other"].ca))
            out["wrong_name"] = await connect_error(addr, tls_server_name="nomad-other",
                                              **client_kw(pki))
            out["no_ca"] = await connect_error(addr, tls_cert=str(pki["client"][0]),
                                         tls_key=str(pki["client"][1]))
            out["key_mismatch"] = await connect_error(addr, tls_cert=str(pki["client"][0]),
                                                tls_key=str(pki["server"][1]),
                                                tls_ca=str(pki["ca"].ca))
            # a plaintext client on this TLS port
            with pytest.raises(ConnectionError) as ei:
                c = await AsyncClient.connect(f"tcp:127.0.0.1:{srv.port}", connect_timeout=10)
                await c.close()
            out["plain_on_tls"] = str(ei.value)
        async with FakeServer(server_ctx(pki, "expired")) as srv:
            out["expired"] = await connect_error(srv.addr, **client_kw(pki))
        async with FakeServer(server_ctx(pki, max_version=ssl.TLSVersion.TLSv1_2)) as srv:
            out["tls12"] = await connect_error(srv.addr, **client_kw(pki))
        async with FakeServer(None, plaintext_explains) as srv:
            out["plaintext_frame"] = await connect_error(srv.addr, **client_kw(pki))
        async with FakeServer(None, plaintext_garbles) as srv:
            out["plaintext"] = await connect_error(srv.addr, **client_kw(pki))
        return out

    m = run(main)
    for k, v in m.items():
        print(f"{k:16} {v}")
    assert "requires a client certificate" in m["no_cert"] and "tls_cert" in m["no_cert"]
    # the alert, or (when the reset overtook it) the connection closed on us
    assert "stranger.pem" in m["stranger"], m["stranger"]
    assert "rejected our client certificate" in m["stranger"] or \
        "did it reject our client certificate" in m["stranger"], m["stranger"]
    assert "certificate we do not trust" in m["untrusted"]
    assert "unable to get local issuer certificate" in m["untrusted"] or \
        "self-signed certificate in certificate chain" in m["untrusted"], m["untrusted"]
    assert "certificate has expired" in m["expired"], m["expired"]
    assert "nomad-other" in m["wrong_name"] and "do not trust" in m["wrong_name"]
    assert "no CA" in m["no_ca"] and "SLOT_TLS_CA" in m["no_ca"]
    assert "does not belong" in m["key_mismatch"] or "key" in m["key_mismatch"]
    # OpenSSL's TLS 1.2 server closes without an alert; wolfSSL sends one
    assert "1.3" in m["tls12"] and ("TLS version" in m["tls12"] or
                                    "during the TLS handshake" in m["tls12"]), m["tls12"]
    plain = "answered in plaintext: does it listen with tcp: rather than tls:?"
    assert plain in m["plaintext"], m["plaintext"]
    assert plain in m["plaintext_frame"], m["plaintext_frame"]
    assert "bad_request: this is a plaintext port" in m["plaintext_frame"]
    assert "connect with tls:" in m["plain_on_tls"], m["plain_on_tls"]


# ---------------------------------------------------------------- capture of a whole trainer run

def tcpdump_start(pcap: Path, ports: tuple[int, ...]) -> subprocess.Popen:
    """tcpdump on lo for these ports, writing pcap; returns once it says
    "listening on" (it captures from then on)."""
    filt = " or ".join(f"tcp port {p}" for p in ports)
    # -Z root: keep writing pcap in a root-owned directory; -U and
    # --immediate-mode: each packet written as it comes (tcpdump drops what
    # it has not taken from the kernel's ring when SIGINT arrives)
    proc = subprocess.Popen(["tcpdump", "-i", "lo", "-n", "-U", "--immediate-mode", "-s", "0",
                             "-Z", "root",
                             "-w", str(pcap), filt],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    said = b""
    deadline = time.monotonic() + 15
    while b"listening on" not in said:
        if proc.poll() is not None or time.monotonic() > deadline:
            tcpdump_stop(proc)
            raise AssertionError("tcpdump did not start listening: "
                                 + said.decode(errors="replace"))
        chunk = proc.stderr.read()
        if chunk:
            said += chunk
        else:
            time.sleep(0.02)
    return proc


def tcpdump_stop(proc: subprocess.Popen, pcap: Optional[Path] = None) -> str:
    """Once pcap stopped growing (0.5 s, at most 10 s: tcpdump has caught
    up), SIGINT (it flushes and says how many packets it caught), then wait
    up to 10 s; what it said on stderr."""
    if pcap is not None:
        last, since, deadline = -1, time.monotonic(), time.monotonic() + 10
        while time.monotonic() < deadline and proc.poll() is None:
            size = pcap.stat().st_size if pcap.exists() else 0
            if size != last:
                last, since = size, time.monotonic()
            elif time.monotonic() - since >= 0.5:
                break
            time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    out = b""
    if proc.stderr is not None:
        try:
            out = proc.stderr.read() or b""
        except (OSError, ValueError):
            pass
        proc.stderr.close()
    return out.decode(errors="replace")


def tcp_payloads(pcap: bytes) -> dict[tuple[int, int], bytes]:
    """TCP payload bytes per (source port, destination port) in a pcap of
    lo (Linux: Ethernet framing), IPv4 and IPv6, in capture order."""
    magic = struct.unpack("<I", pcap[:4])[0]
    end = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(end + "I", pcap[20:24])[0]
    assert linktype == 1, f"link type {linktype}: expected Ethernet framing on lo"
    out: dict[tuple[int, int], bytearray] = {}
    off = 24
    while off + 16 <= len(pcap):
        caplen = struct.unpack(end + "I", pcap[off + 8:off + 12])[0]
        pkt = pcap[off + 16:off + 16 + caplen]
        off += 16 + caplen
        eth = struct.unpack(">H", pkt[12:14])[0]
        if eth == 0x0800:
            ihl = (pkt[14] & 0x0F) * 4
            total = struct.unpack(">H", pkt[16:18])[0]
            if pkt[23] != 6:
                continue
            tcp, ip_end = 14 + ihl, 14 + total
        elif eth == 0x86DD:
            if pkt[20] != 6:
                continue
            tcp, ip_end = 54, 54 + struct.unpack(">H", pkt[18:20])[0]
        else:
            continue
        sport, dport = struct.unpack(">HH", pkt[tcp:tcp + 4])
        data = pkt[tcp + (pkt[tcp + 12] >> 4) * 4:ip_end]
        if data:
            out.setdefault((sport, dport), bytearray()).extend(data)
    return {k: bytes(v) for k, v in out.items()}


def exec_daemon_profile(agent_port: int, tls: bool) -> str:
    """One agent, a daemon on 127.0.0.1:agent_port (tls: with the
    certificate the controller issues it, or plaintext tcp:), reached
    through a relay (slot-agent --attach) speaking the same. Both checks the
    agent token (STATE/agent-token) the controller sends in hello."""
    ab = str(AGENT_BIN)
    if tls:
        listen = f"tls:127.0.0.1:{agent_port} --tls-cert {{tls_cert}} --tls-key {{tls_key}} " \
                 f"--tls-ca {{tls_ca}}"
        attach = [ab, "--attach", f"tls:127.0.0.1:{agent_port}", "--tls-cert",
                  "{tls_client_cert}", "--tls-key", "{tls_client_key}", "--tls-ca", "{tls_ca}",
                  "--tls-name", "{agent_id}"]  # the agent's certificate must name it
    else:
        listen = f"tcp:127.0.0.1:{agent_port}"
        attach = [ab, "--attach", f"tcp:127.0.0.1:{agent_port}"]
    d = "{state_dir}/exec"
    start = ["bash", "-c",
             f'mkdir -p {d} || exit 1; setsid {ab} --listen {listen} '
             f'--token-file {{state_dir}}/agent-token --slots {{slots}} --data-dir {{data_dir}} '
             f'</dev/null >>{d}/{{agent_id}}.log 2>&1 & echo $! > {d}/{{agent_id}}.pid; '
             # the relay must not connect before the daemon listens (a bare
             # connect, nothing sent: bash's /dev/tcp)
             f'for i in $(seq 100); do '
             f'(exec 3<>/dev/tcp/127.0.0.1/{agent_port}) 2>/dev/null && exit 0; sleep 0.05; '
             f'done; exit 1']
    stop = ["sh", "-c", f'kill $(cat {d}/{{agent_id}}.pid) 2>/dev/null; '
                        f'rm -f {d}/{{agent_id}}.pid']
    lst = ["sh", "-c", f'cd {d} 2>/dev/null || exit 0; for f in *.pid; do [ -e "$f" ] || '
                       f'continue; kill -0 $(cat "$f") 2>/dev/null && echo "${{f%.pid}}"; done; '
                       f'exit 0']
    prof = {"backend": "exec", "slots_per_agent": 2, "min_agents": 1, "max_agents": 1,
            "tls": "on" if tls else "off",
            "exec": {"start": start, "launch": attach, "stop": stop, "list": lst}}
    return json.dumps({"profiles": {"default": prof}})


def _agent_pids(state_dir: Path) -> list[int]:
    """Agents (and their filesystem guardians) serving paths in state_dir."""
    mark = str(state_dir).encode() + b"/"
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"slot-agent" in argv[0] and any(mark in a for a in argv):
            pids.append(int(d.name))
    return pids


def stop_agents(state_dir: Path) -> None:
    """Agents that outlive their controller (exec daemons, socket-mode local
    agents): SIGTERM, so they take their slots' filesystems down themselves,
    up to 15 s; then conftest's SIGKILL for any left."""
    for pid in _agent_pids(state_dir):
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + 15
    while _agent_pids(state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_stray_agents(state_dir)


class Observation(BaseModel):
    """The shape a trainer's own result model takes."""

    success: bool
    output: str
    error: str
    metadata: dict[str, Any]


def trainer_run(addr: str, token: str, state_dir: Path, file_marker: str,
                out_marker: str, command: str) -> None:
    """What a trainer does: acquire, write a file, run a command, read the
    output and the file back, release."""
    async def main() -> None:
        b = ControllerToolBackend(addr, token=token, state_dir=str(state_dir),
                                  acquire_timeout_s=60, start_timeout_s=60)
        await b.start()
        if addr.startswith("tls:"):
            assert b.client is not None and b.client.tls_info.startswith("TLSv1.3"), \
                b.client.tls_info if b.client else None
        slot = await b.acquire("capture-1")
        w, e, r = await b.execute_batch([
            (slot, "write_file", {"path": "secret.txt", "content": file_marker + "\n"}),
            (slot, "bash", {"command": command}),
            (slot, "read_file", {"path": "secret.txt"}),
        ], timeout_s=30)
        assert w.success, w
        assert (e.success, e.output) == (True, out_marker), e
        assert (r.success, r.output) == (True, file_marker + "\n"), r
        # what a trainer does with results: pydantic models and json.dumps;
        # nothing of TLS in them
        for x in (w, e, r):
            Observation(success=x.success, output=x.output, error=x.error, metadata=x.metadata)
            text = json.dumps(x.metadata) + x.to_tool_result().to_xml()
            assert "tls" not in text.lower() and "ssl" not in text.lower(), text
        # (the slot's container_addr names the exec launcher, tls: flags
        # included: paths, never the material)
        assert "-----BEGIN" not in json.dumps([slot.to_dict(), b.get_stats()])
        await b.release(slot, reset_workspace=True)
        await b.stop()
    run(main, timeout=120)


@pytest.mark.parametrize("secure", [True, False], ids=["tls", "plaintext"])
def test_capture_of_a_trainer_run(secure: bool, tmpdir_short: Path) -> None:
    api_port, agent_port = free_port(), free_port()
    while agent_port == api_port:
        agent_port = free_port()
    token = "trainer-token-" + secrets.token_hex(12)
    file_marker = "file-marker-" + secrets.token_hex(12)
    out_marker = "output-marker-" + secrets.token_hex(12)
    # the command's text (with its own marker) is not its output
    command = f"echo cmd-marker-{secrets.token_hex(6)} >/dev/null; echo {out_marker[::-1]} | rev"
    pcap = tmpdir_short / "run.pcap"
    d = tmpdir_short / "ctl"
    d.mkdir()
    listen = f"{'tls' if secure else 'tcp'}:127.0.0.1:{api_port}"
    dump = tcpdump_start(pcap, (api_port, agent_port))
    ctl: Optional[Controller] = None
    dump_said = ""
    try:
        ctl = Controller(d, exec_daemon_profile(agent_port, secure), token=token,
                         extra=["--listen", listen], wait_ready=False)
        ctl.wait_agents(lambda st: st["agents"]["ready"] >= 1, timeout=30)
        wait_port(api_port)
        agent_token = (ctl.state_dir / "agent-token").read_text().strip()
        assert len(agent_token) >= 16
        trainer_run(listen, token, ctl.state_dir,
                    file_marker, out_marker, command)
    finally:
        dump_said = tcpdump_stop(dump, pcap)
        if ctl is not None:
            ctl.stop()
            stop_agents(ctl.state_dir)
    data = pcap.read_bytes()
    print(f"{'TLS' if secure else 'plaintext'}: {len(data)} bytes captured; tcpdump: "
          f"{dump_said.strip().splitlines()[-3:] if dump_said else ''}")
    # enough traffic to mean something: the 16-byte pcap header and more
    assert len(data) > 4000, dump_said
    needles = {"trainer token": token, "agent token": agent_token, "file marker": file_marker,
               "output marker": out_marker, "command": command,
               "command marker": command.split()[1]}
    found = {k: v.encode() in data for k, v in needles.items()}
    # both links carried the run: the trainer's (API port) and the agent's
    flows = tcp_payloads(data)
    for port, what in ((api_port, "trainer <-> controller"), (agent_port, "controller <-> agent")):
        to_server = [v for (sp, dp), v in flows.items() if dp == port]
        from_server = [v for (sp, dp), v in flows.items() if sp == port]
        assert sum(map(len, to_server)) > 200 and sum(map(len, from_server)) > 200, \
            f"{what} (port {port}): too little traffic captured: {sorted(flows)}"
        if secure:
            # every connection opens with a TLS handshake record, and stays TLS
            for v in to_server + from_server:
                assert v[:1] == b"\x16" and v[1:2] == b"\x03", f"{what}: not TLS: {v[:16]!r}"
    if secure:
        assert not any(found.values()), f"in the TLS capture: {[k for k, v in found.items() if v]}"
    else:
        assert all(found.values()), f"missing from the plaintext capture: " \
                                    f"{[k for k, v in found.items() if not v]}"


def test_client_errors_against_the_controller(pki: dict[str, Any], no_tls_env: None,
                                              tmpdir_short: Path) -> None:
    """The same one-line errors from the real controller's tls: listener
    (wolfSSL) and its plaintext tcp: one; the controller keeps serving."""
    tls_port, tcp_port = free_port(), free_port()
    while tcp_port == tls_port:
        tcp_port = free_port()
    d = tmpdir_short / "ctl"
    d.mkdir()
    ctl = Controller(d, token="tok-" + secrets.token_hex(8),
                     extra=["--listen", f"tls:127.0.0.1:{tls_port}",
                            "--listen", f"tcp:127.0.0.1:{tcp_port}"], wait_ready=False)
    try:
        wait_port(tls_port)
        wait_port(tcp_port)
        tls_dir = ctl.state_dir / "tls"
        ca, cert, key = (str(tls_dir / n) for n in ("ca.pem", "trainer.pem", "trainer.key"))
        addr = f"tls:127.0.0.1:{tls_port}"

        async def main() -> dict[str, str]:
            out: dict[str, str] = {}
            out["no_cert"] = await connect_error(addr, tls_ca=ca)
            out["stranger"] = await connect_error(addr, tls_ca=ca,
                                                  tls_cert=str(pki["stranger"][0]),
                                                  tls_key=str(pki["stranger"][1]))
            out["untrusted"] = await connect_error(addr, tls_ca=str(pki["ca"].ca),
                                                   tls_cert=cert, tls_key=key)
            out["wrong_name"] = await connect_error(addr, tls_ca=ca, tls_cert=cert,
                                                    tls_key=key, tls_server_name="not-the-api")
            out["tls_to_tcp"] = await connect_error(f"tls:127.0.0.1:{tcp_port}", tls_ca=ca,
                                                    tls_cert=cert, tls_key=key)
            out["tcp_to_tls"] = await connect_error(f"tcp:127.0.0.1:{tls_port}")
            # and after all that, a good client is served (the STATE files)
            c = await AsyncClient.connect(addr, ctl.token, state_dir=str(ctl.state_dir))
            assert c.tls_info.startswith("TLSv1.3"), c.tls_info
            assert c.server_info.get("authenticated") is True, c.server_info
            st = await c.status()
            assert "agents" in st
            await c.close()
            return out

        m = run(main)
        for k, v in m.items():
            print(f"{k:12} {v}")
        assert "requires a client certificate" in m["no_cert"], m["no_cert"]
        assert "stranger.pem" in m["stranger"] and "reject" in m["stranger"], m["stranger"]
        assert "certificate we do not trust" in m["untrusted"], m["untrusted"]
        assert "not-the-api" in m["wrong_name"] and "do not trust" in m["wrong_name"]
        assert "answered in plaintext: does it listen with tcp: rather than tls:?" in \
            m["tls_to_tcp"], m["tls_to_tcp"]
        assert "tls:" in m["tcp_to_tls"], m["tcp_to_tls"]
        assert ctl.proc is not None and ctl.proc.poll() is None
    finally:
        rc = ctl.stop()
        stop_agents(ctl.state_dir)
    assert rc == 0, ctl.log()[-2000:]


SOCKET_AGENTS_CONFIG = """
profiles:
  default:
    slots_per_agent: 2
    min_agents: 1
    max_agents: 1
    local:
      mode: socket
"""


def test_backend_reconnects_over_tls_across_a_controller_restart(no_tls_env: None,
                                                                  tmpdir_short: Path) -> None:
    port = free_port()
    d = tmpdir_short / "ctl"
    d.mkdir()
    ctl = Controller(d, SOCKET_AGENTS_CONFIG, extra=["--listen", f"tls:127.0.0.1:{port}"])
    try:
        wait_port(port)

        async def main() -> None:
            b = ControllerToolBackend(f"tls:127.0.0.1:{port}", state_dir=str(ctl.state_dir))
            await b.start()
            first = b.client
            assert first is not None and first.tls_info.startswith("TLSv1.3")
            slot = await b.acquire("survivor-1")
            [w] = await b.execute_batch([(slot, "write_file", {"path": "k.txt",
                                                               "content": "kept\n"})])
            assert w.success, w
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, ctl.kill9)
            [down] = await b.execute_batch([(slot, "bash", {"command": "true"})])
            assert down.success is False
            await loop.run_in_executor(None, ctl.start)
            await loop.run_in_executor(None, wait_port, port)
            [r] = await b.execute_batch([(slot, "bash", {"command": "cat k.txt"})])
            assert (r.success, r.output) == (True, "kept"), r
            again = b.client
            assert again is not None and again is not first
            assert again.tls_info.startswith("TLSv1.3"), again.tls_info
            assert again.address.kind == "tls"
            await b.release(slot, reset_workspace=True)
            await b.stop()
        run(main)
    finally:
        ctl.stop()
        stop_agents(ctl.state_dir)
