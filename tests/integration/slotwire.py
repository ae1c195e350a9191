"""Minimal blocking client for the slot wire protocol, used by the tests.

Frames are a 4-byte big-endian length and one msgpack map. The client keeps
events and out-of-order responses so tests can pipeline requests.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import time
from typing import Any, Callable

import msgpack


def pack_frame(obj: Any) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return struct.pack(">I", len(body)) + body


class ProtocolError(Exception):
    pass


class AgentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Client:
    """One connection. `send_raw`/`recv_frame` give byte-level control."""

    def __init__(self, read: Callable[[int], bytes], write: Callable[[bytes], None],
                 close: Callable[[], None], timeout: float = 30.0) -> None:
        self._read = read
        self._write = write
        self._close = close
        self.timeout = timeout
        self._buf = b""
        self._next_id = 1
        self.pending: dict[int, list[dict]] = {}  # id -> frames received (events and final)

    # -- construction
    @classmethod
    def unix(cls, path: str, timeout: float = 30.0) -> "Client":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(path)
        return cls._from_socket(s, timeout)

    @classmethod
    def tcp(cls, host: str, port: int, timeout: float = 30.0) -> "Client":
        s = socket.create_connection((host, port), timeout=timeout)
        return cls._from_socket(s, timeout)

    @classmethod
    def _from_socket(cls, s: socket.socket, timeout: float) -> "Client":
        c = cls(s.recv, s.sendall, s.close, timeout)
        c.sock = s  # type: ignore[attr-defined]
        return c

    @classmethod
    def stdio(cls, proc: subprocess.Popen, timeout: float = 30.0) -> "Client":
        assert proc.stdin is not None and proc.stdout is not None
        import os
        fd = proc.stdout.fileno()

        def write(b: bytes) -> None:
            proc.stdin.write(b)  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]

        return cls(lambda n: os.read(fd, n), write, proc.stdin.close, timeout)

    def close(self) -> None:
        try:
            self._close()
        except OSError:
            pass

    # -- raw
    def send_raw(self, data: bytes) -> None:
        self._write(data)

    def recv_frame(self, timeout: float | None = None) -> dict | None:
        """Next frame, or None on EOF."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            if len(self._buf) >= 4:
                (n,) = struct.unpack(">I", self._buf[:4])
                if len(self._buf) >= 4 + n:
                    body = self._buf[4:4 + n]
                    self._buf = self._buf[4 + n:]
                    return msgpack.unpackb(body, raw=False, strict_map_key=False)
            if time.monotonic() > deadline:
                raise TimeoutError("no frame from agent")
            try:
                chunk = self._read(1 << 20)
            except socket.timeout as e:
                raise TimeoutError("no frame from agent") from e
            if not chunk:
                return None
            self._buf += chunk

    # -- requests
    def send(self, op: str, args: dict | None = None, id: int | None = None) -> int:
        if id is None:
            id = self._next_id
            self._next_id += 1
        msg: dict[str, Any] = {"id": id, "op": op}
        if args is not None:
            msg["args"] = args
        self._write(pack_frame(msg))
        self.pending.setdefault(id, [])
        return id

    def wait(self, id: int, timeout: float | None = None) -> tuple[dict, list[dict]]:
        """Final response for id and the events that preceded it."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            frames = self.pending.get(id, [])
            for i, f in enumerate(frames):
                if "event" not in f:
                    events = frames[:i]
                    del self.pending[id]
                    return f, events
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no response for id {id}")
            f = self.recv_frame(timeout=left)
            if f is None:
                raise ProtocolError("connection closed by agent")
            self.pending.setdefault(f.get("id", 0), []).append(f)

    def call_raw(self, op: str, args: dict | None = None, timeout: float | None = None) -> dict:
        return self.wait(self.send(op, args), timeout)[0]

    def call(self, op: str, args: dict | None = None, timeout: float | None = None) -> dict:
        """Result map, or raises AgentError."""
        resp = self.call_raw(op, args, timeout)
        if not resp.get("ok"):
            err = resp.get("error", {})
            raise AgentError(err.get("code", "?"), err.get("message", ""))
        return resp["result"]

    def call_stream(self, op: str, args: dict | None = None,
                    timeout: float | None = None) -> tuple[dict, list[dict]]:
        return self.wait(self.send(op, args), timeout)

    def error_code(self, op: str, args: dict | None = None) -> str | None:
        resp = self.call_raw(op, args)
        return None if resp.get("ok") else resp["error"]["code"]
