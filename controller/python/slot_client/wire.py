"""Framing of the slot wire protocol: a 4-byte big-endian length, then one
msgpack map. Addresses are "unix:PATH", "tcp:HOST:PORT" or "tls:HOST:PORT"
(TCP with TLS 1.3, see tls.py)."""
from __future__ import annotations

import asyncio
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import msgpack

from .errors import SlotError

MAX_FRAME: int = 64 * 1024 * 1024
HEADER = struct.Struct(">I")


class FrameError(SlotError):
    """A frame that cannot be sent or was received malformed."""


def pack_frame(message: Mapping[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """Encode one message (a map) as a length-prefixed frame."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > max_frame:
        raise FrameError("too_large", f"request frame of {len(body)} bytes exceeds the "
                                      f"maximum of {max_frame} bytes")
    return HEADER.pack(len(body)) + body


def unpack_body(body: bytes) -> dict[str, Any]:
    """Decode a frame body; it must be one msgpack map."""
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise FrameError("bad_frame", f"undecodable frame from the controller: {e}") from e
    if not isinstance(value, dict):
        raise FrameError("bad_frame", f"frame is a {type(value).__name__}, not a map")
    return value


async def read_frame(reader: asyncio.StreamReader,
                     max_frame: int = MAX_FRAME) -> dict[str, Any] | None:
    """Read the next frame; None on a clean end of stream between frames."""
    try:
        header = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            return None
        raise FrameError("bad_frame", "connection closed inside a frame header") from e
    if header[0] in (0x15, 0x16) and header[1] == 3:
        # a TLS record (alert, handshake): never a frame length (> 350 MB)
        raise FrameError("tls_peer", "the controller answered with TLS: connect with "
                                     "tls:HOST:PORT (and a client certificate) rather than tcp:")
    (n,) = HEADER.unpack(header)
    if n == 0:
        raise FrameError("bad_frame", "empty frame")
    if n > max_frame:
        raise FrameError("too_large", f"frame of {n} bytes exceeds the maximum of "
                                      f"{max_frame} bytes")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise FrameError("bad_frame", f"connection closed inside a frame "
                                      f"({len(e.partial)} of {n} bytes)") from e
    return unpack_body(body)


@dataclass(frozen=True)
class Address:
    """A parsed listener address."""

    kind: Literal["unix", "tcp", "tls"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return "unix:" + self.path
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.kind}:{host}:{self.port}"


def default_address() -> str:
    """The controller's default socket: $XDG_RUNTIME_DIR/slot-controller.sock,
    else /tmp/slot-controller-<uid>.sock."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return "unix:" + os.path.join(runtime, "slot-controller.sock")
    return f"unix:/tmp/slot-controller-{os.getuid()}.sock"


def parse_address(address: str | None) -> Address:
    """Parse "unix:PATH", "tcp:HOST:PORT", "tls:HOST:PORT" (HOST may be
    "[v6]"), or a bare absolute path; None means the default address."""
    if address is None or address == "":
        address = default_address()
    if address.startswith("unix:"):
        path = address[len("unix:"):]
        if not path:
            raise ValueError(f"address {address!r}: empty socket path")
        return Address("unix", path=path)
    if address.startswith(("tcp:", "tls:")):
        kind = address[:3]
        rest = address[len("tcp:"):]
        host, sep, port_s = rest.rpartition(":")
        if not sep or not host or not port_s.isdigit():
            raise ValueError(f"address {address!r}: expected {kind}:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        port = int(port_s)
        if not 0 < port < 65536:
            raise ValueError(f"address {address!r}: port out of range")
        return Address(kind, host=host, port=port)  # type: ignore[arg-type]
    if address.startswith("/"):
        return Address("unix", path=address)
    raise ValueError(f"address {address!r}: expected unix:PATH, tcp:HOST:PORT or tls:HOST:PORT")
