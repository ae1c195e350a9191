"""TLS 1.3 to a controller that listens on `tls:HOST:PORT`, with Python's
standard `ssl` module: our client certificate and key, the CA the
controller's certificate must chain to, and the name it must carry.

The handshake and the record layer run over memory BIOs on a plain asyncio
connection (`TLSStream`) rather than asyncio's own SSL transport, so that a
failed handshake still has the bytes the peer sent: a plaintext controller's
error frame can be quoted instead of "wrong version number". Every failure
becomes one line that says what to change.
"""
from __future__ import annotations

import asyncio
import os
import ssl
import struct
from dataclasses import dataclass
from typing import Optional

import msgpack

from .errors import ConnectError

ENV_CERT = "SLOT_TLS_CERT"
ENV_KEY = "SLOT_TLS_KEY"
ENV_CA = "SLOT_TLS_CA"
ENV_SERVER_NAME = "SLOT_TLS_SERVER_NAME"
ENV_STATE_DIR = "SLOT_STATE_DIR"

_CHUNK = 256 * 1024
_RAW_KEPT = 4096  # bytes of a failed handshake kept to quote a plaintext answer


def default_state_dir() -> str:
    """The controller's default state directory, as slot-controller picks
    it: $XDG_RUNTIME_DIR/slot-controller, else /var/tmp/slot-controller-UID."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "slot-controller")
    return f"/var/tmp/slot-controller-{os.getuid()}"


@dataclass(frozen=True)
class TLSConfig:
    """Where the client's TLS material comes from (paths, resolved)."""

    cert: Optional[str]
    key: Optional[str]
    ca: Optional[str]
    server_name: Optional[str]

    @classmethod
    def resolve(cls, cert: Optional[str] = None, key: Optional[str] = None,
                ca: Optional[str] = None, server_name: Optional[str] = None,
                state_dir: Optional[str] = None) -> "TLSConfig":
        """Each of cert, key, ca: the argument, else SLOT_TLS_CERT /
        SLOT_TLS_KEY / SLOT_TLS_CA, else the controller's own files in its
        state dir (`state_dir`, SLOT_STATE_DIR or the controller's default):
        tls/trainer.pem, tls/trainer.key, tls/ca.pem, when they exist.
        server_name: the argument, else SLOT_TLS_SERVER_NAME, else None (the
        address's HOST)."""
        sd = state_dir or os.environ.get(ENV_STATE_DIR) or default_state_dir()
        tls_dir = os.path.join(sd, "tls")

        def pick(arg: Optional[str], env: str, name: str) -> Optional[str]:
            if arg:
                return os.fspath(arg)
            v = os.environ.get(env)
            if v:
                return v
            p = os.path.join(tls_dir, name)
            return p if os.path.isfile(p) else None

        return cls(pick(cert, ENV_CERT, "trainer.pem"), pick(key, ENV_KEY, "trainer.key"),
                   pick(ca, ENV_CA, "ca.pem"),
                   server_name or os.environ.get(ENV_SERVER_NAME) or None)

    def context(self, where: str) -> ssl.SSLContext:
        """A client context: TLS 1.3 only, the server checked against `ca`
        (and its name), our certificate presented when we have one. A file
        that cannot be used raises ConnectError naming it."""
        if not self.ca:
            raise ConnectError(f"cannot connect to {where}: no CA to check the controller's "
                               f"certificate against: give tls_ca (or {ENV_CA}), or the "
                               f"controller's state dir (SLOT_STATE_DIR) holding tls/ca.pem")
        if bool(self.cert) != bool(self.key):
            raise ConnectError(f"cannot connect to {where}: a client certificate needs both "
                               f"tls_cert and tls_key ({ENV_CERT}, {ENV_KEY})")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        try:
            ctx.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot connect to {where}: CA file {self.ca}: "
                               f"{_file_reason(e)}") from e
        if self.cert and self.key:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as e:
                raise ConnectError(f"cannot connect to {where}: client certificate {self.cert} "
                                   f"with key {self.key}: {_file_reason(e)}") from e
        return ctx


def _file_reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLError):
        if e.reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return (e.reason or str(e)).replace("_", " ").lower()
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def _plaintext_frame(raw: bytes) -> Optional[str]:
    """`code: message` when `raw` starts with one complete error frame of
    the slot protocol (a plaintext listener explaining itself)."""
    if len(raw) < 5:
        return None
    (n,) = struct.unpack(">I", raw[:4])
    if n == 0 or len(raw) < 4 + n:
        return None
    try:
        msg = msgpack.unpackb(raw[4:4 + n], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not a frame: no quote
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("error"), dict):
        return None
    err = msg["error"]
    return f"{err.get('code', '?')}: {err.get('message', '')}".strip()


def _alert(reason: str) -> str:
    """'TLSV13_ALERT_CERTIFICATE_REQUIRED' -> 'certificate required'."""
    r = reason.upper()
    for p in ("TLSV13_ALERT_", "TLSV1_ALERT_", "SSLV3_ALERT_"):
        if r.startswith(p):
            r = r[len(p):]
            break
    return r.replace("_", " ").lower()


def describe(e: BaseException, where: str, cfg: TLSConfig, raw: bytes = b"",
             handshake_done: bool = False) -> str:
    """One line for a TLS failure talking to the controller at `where`."""
    quoted = _plaintext_frame(raw)
    if isinstance(e, ssl.SSLCertVerificationError):
        why = e.verify_message or e.reason or str(e)
        return (f"the controller at {where} has a certificate we do not trust: {why} "
                f"(checked against {cfg.ca}"
                f"{', name ' + repr(cfg.server_name) if cfg.server_name else ''})")
    reason = (getattr(e, "reason", None) or "") if isinstance(e, ssl.SSLError) else ""
    if quoted is not None or reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE",
                                        "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                                        "UNKNOWN_PROTOCOL"):
        line = (f"the controller at {where} answered in plaintext: does it listen with tcp: "
                f"rather than tls:?")
        return line + (f" (it said {quoted})" if quoted else "")
    if "ALERT" in reason.upper():
        alert = _alert(reason)
        if alert == "protocol version":
            return (f"the controller at {where} refused our TLS version (alert: protocol "
                    f"version): the client speaks TLS 1.3 only")
        if not cfg.cert or alert == "certificate required":
            return (f"the controller at {where} requires a client certificate (alert: {alert}): "
                    f"give tls_cert and tls_key ({ENV_CERT}, {ENV_KEY})")
        return (f"the controller at {where} rejected our client certificate {cfg.cert} "
                f"(alert: {alert})")
    if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError, asyncio.IncompleteReadError,
                      ConnectionResetError, EOFError)) or reason == "UNEXPECTED_EOF_WHILE_READING":
        if handshake_done:
            if not cfg.cert:
                return (f"the controller at {where} closed the connection after the TLS "
                        f"handshake: it requires a client certificate: give tls_cert and "
                        f"tls_key ({ENV_CERT}, {ENV_KEY})")
            return (f"the controller at {where} closed the connection after the TLS "
                    f"handshake: did it reject our client certificate {cfg.cert}?")
        return (f"the controller at {where} closed the connection during the TLS handshake "
                f"(is it a TLS 1.3 listener?)")
    if isinstance(e, ssl.SSLError):
        return f"TLS with the controller at {where} failed: {_alert(reason) if reason else e}"
    why = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return f"TLS with the controller at {where} failed: {why}"


class TLSStream:
    """TLS over an asyncio stream pair, through memory BIOs. Offers what
    AsyncClient and read_frame use of StreamReader / StreamWriter:
    readexactly, write, drain, close, wait_closed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 ctx: ssl.SSLContext, server_name: str) -> None:
        self._raw_r = reader
        self._raw_w = writer
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(self._in, self._out, server_side=False,
                                 server_hostname=server_name)
        self._buf = bytearray()
        self._eof = False
        self.raw_seen = bytearray()  # the first bytes of a handshake, for describe()
        self.handshake_done = False
        self._write_error: Optional[BaseException] = None

    def _push(self) -> None:
        data = self._out.read()
        if data:
            self._raw_w.write(data)

    async def _feed(self) -> bool:
        """Read ciphertext from the socket into the BIO; False at EOF."""
        data = await self._raw_r.read(_CHUNK)
        if not data:
            self._in.write_eof()
            return False
        if not self.handshake_done and len(self.raw_seen) < _RAW_KEPT:
            self.raw_seen += data[:_RAW_KEPT - len(self.raw_seen)]
        self._in.write(data)
        return True

    async def handshake(self) -> None:
        while True:
            try:
                self._obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._push()
                await self._raw_w.drain()
                if not await self._feed():
                    # one more turn: the BIO's EOF makes do_handshake raise
                    # what OpenSSL makes of the bytes it has
                    self._obj.do_handshake()
                    raise ssl.SSLEOFError("EOF during the TLS handshake")
        self._push()  # our Finished (and certificate)
        await self._raw_w.drain()
        self.handshake_done = True

    def describe(self) -> str:
        """'TLSv1.3 TLS_AES_256_GCM_SHA384'."""
        c = self._obj.cipher()
        return f"{self._obj.version()} {c[0] if c else '?'}"

    def peer_certificate(self) -> dict:
        return dict(self._obj.getpeercert() or {})

    async def _read_some(self) -> bytes:
        """Decrypted bytes (one record's worth), b"" at the end of the
        stream: close_notify, or the peer closing the socket."""
        while True:
            try:
                return self._obj.read(_CHUNK)
            except ssl.SSLWantReadError:
                if self._eof:
                    return b""
                self._push()  # e.g. a post-handshake message needing an answer
                if not await self._feed():
                    self._eof = True  # the next read says how it ended
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as e:
                # a close without close_notify (a controller killed): an EOF;
                # read_frame tells a cut frame from a clean end
                if self._eof and (isinstance(e, ssl.SSLEOFError)
                                  or e.reason == "UNEXPECTED_EOF_WHILE_READING"):
                    return b""
                raise

    async def readexactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self._read_some()
            if not chunk:
                partial = bytes(self._buf)
                self._buf.clear()
                raise asyncio.IncompleteReadError(partial, n)
            self._buf += chunk
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def write(self, data: bytes) -> None:
        # StreamWriter.write never raises; a broken TLS session shows in drain
        try:
            self._obj.write(data)
        except (ssl.SSLError, ValueError) as e:
            if self._write_error is None:
                self._write_error = e
            return
        self._push()

    async def drain(self) -> None:
        if self._write_error is not None:
            raise ConnectionResetError(f"TLS session broken: {self._write_error}")
        await self._raw_w.drain()

    def close(self) -> None:
        try:
            self._obj.unwrap()  # queue close_notify
        except (ssl.SSLError, ValueError, OSError):
            pass
        try:
            self._push()
        except Exception:  # noqa: BLE001 - closing: best effort
            pass
        self._raw_w.close()

    async def wait_closed(self) -> None:
        await self._raw_w.wait_closed()
