"""The shared protocol vectors (proto/vectors/vectors.json): checked with
Python's msgpack and an independent reference validator written here, and
sent to a live agent."""
from __future__ import annotations

import importlib.util
import json
import socket
import struct
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack
import pytest

from slotwire import pack_frame

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "proto" / "vectors"
VECTORS: list[dict[str, Any]] = json.loads((VECTOR_DIR / "vectors.json").read_text())
MAX_FRAME = 64 << 20
MAX_DEPTH = 32
AGENT_OPS = {"hello", "health", "stats", "slots", "lease", "unlease", "exec", "exec_attach",
             "cancel", "read_file", "write_file", "stat", "list", "archive", "reset"}


def from_json(v: Any) -> Any:
    """The vector file's JSON back to msgpack-level Python values."""
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


# ---- reference validator ---------------------------------------------------

# Bytes that follow a type byte, for the fixed-size types.
_FIXED = {0xc0: 0, 0xc2: 0, 0xc3: 0, 0xca: 4, 0xcb: 8, 0xcc: 1, 0xcd: 2, 0xce: 4, 0xcf: 8,
          0xd0: 1, 0xd1: 2, 0xd2: 4, 0xd3: 8, 0xd4: 2, 0xd5: 3, 0xd6: 5, 0xd7: 9, 0xd8: 17}
# Type byte -> (width of the length field, extra bytes after it: the ext type).
_SIZED = {0xc4: (1, 0), 0xc5: (2, 0), 0xc6: (4, 0), 0xd9: (1, 0), 0xda: (2, 0), 0xdb: (4, 0),
          0xc7: (1, 1), 0xc8: (2, 1), 0xc9: (4, 1)}
# Container type byte -> (width of the count field, values per element).
_CONTAINERS = {0xdc: (2, 1), 0xdd: (4, 1), 0xde: (2, 2), 0xdf: (4, 2)}


def structure_error(body: bytes, max_depth: int = MAX_DEPTH) -> str | None:
    """Why `body` is not exactly one acceptable msgpack value, or None.

    The contract's rules, without recursion: nesting at most max_depth
    (empty containers count), every count and length backed by the bytes that
    remain (an element takes at least one byte), 0xc1 never used, no trailing
    bytes."""
    pos = 0
    stack = [1]  # values still to read at each open level
    while stack:
        if stack[-1] == 0:
            stack.pop()
            continue
        stack[-1] -= 1
        if pos >= len(body):
            return f"truncated at byte {pos}"
        b = body[pos]
        pos += 1
        skip = 0
        children = -1  # -1: not a container
        if b <= 0x7f or b >= 0xe0:
            pass
        elif 0x80 <= b <= 0x8f:
            children = 2 * (b & 0x0f)
        elif 0x90 <= b <= 0x9f:
            children = b & 0x0f
        elif 0xa0 <= b <= 0xbf:
            skip = b & 0x1f
        elif b in _FIXED:
            skip = _FIXED[b]
        elif b in _SIZED:
            width, extra = _SIZED[b]
            if len(body) - pos < width:
                return f"truncated length at byte {pos}"
            skip = int.from_bytes(body[pos:pos + width], "big") + extra
            pos += width
        elif b in _CONTAINERS:
            width, per = _CONTAINERS[b]
            if len(body) - pos < width:
                return f"truncated count at byte {pos}"
            children = per * int.from_bytes(body[pos:pos + width], "big")
            pos += width
        else:
            return f"reserved byte 0x{b:02x} at {pos - 1}"
        if skip > len(body) - pos:
            return f"length {skip} at byte {pos} exceeds the {len(body) - pos} bytes left"
        pos += skip
        if children >= 0:
            if len(stack) > max_depth:
                return f"nested deeper than {max_depth}"
            if children > len(body) - pos:
                return f"count {children} at byte {pos} exceeds the {len(body) - pos} bytes left"
            if children:
                stack.append(children)
    if pos != len(body):
        return f"{len(body) - pos} trailing bytes"
    return None


def reference_decode(raw: bytes) -> tuple[str, Any]:
    """('ok', value) or ('bad_request' | 'too_large', reason) for one whole
    frame, by the contract."""
    assert len(raw) >= 4
    (n,) = struct.unpack(">I", raw[:4])
    if n > MAX_FRAME:
        return "too_large", f"frame of {n} bytes"
    body = raw[4:]
    assert len(body) == n, "a vector is one whole frame"
    if n == 0:
        return "bad_request", "empty frame"
    why = structure_error(body)
    limits = dict(max_bin_len=n, max_str_len=n, max_array_len=n, max_map_len=n, max_ext_len=n)
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False, **limits)
        lib_ok = True
    except Exception:  # noqa: BLE001 - any decoding failure
        value, lib_ok = None, False
    if why is None:
        assert lib_ok, "the reference validator accepted what msgpack cannot decode"
        return "ok", value
    if "deeper" not in why:
        # msgpack has no depth limit, but it must see every other problem too
        assert not lib_ok, f"msgpack decoded what the validator refused: {why}"
    return "bad_request", why


def request_error(value: Any) -> str | None:
    """Why a decoded frame is not a request envelope, or None."""
    if not isinstance(value, dict):
        return "not a map"
    id_ = value.get("id")
    if not isinstance(id_, int) or isinstance(id_, bool) or id_ < 0:
        return "id must be an unsigned integer"
    if not isinstance(value.get("op"), str):
        return "op must be a str"
    if value.get("args") is not None and not isinstance(value["args"], dict):
        return "args must be a map"
    return None


def expected_request(exp: dict) -> dict:
    msg: dict[str, Any] = {"id": exp["id"], "op": exp["op"]}
    if exp["args"] is not None:
        msg["args"] = from_json(exp["args"])
    return msg


# ---- the vectors on their own -----------------------------------------------

def test_vector_file_shape() -> None:
    assert len(VECTORS) >= 25
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names))
    kinds = Counter(v["expect"]["kind"] for v in VECTORS)
    assert set(kinds) == {"request", "response", "invalid"}
    for v in VECTORS:
        assert set(v) == {"name", "description", "hex", "expect"}, v["name"]
        assert v["description"], v["name"]
        assert v["hex"] == v["hex"].lower() and len(v["hex"]) % 2 == 0, v["name"]
        if v["expect"]["kind"] == "invalid":
            assert v["expect"]["code"] in ("bad_request", "too_large"), v["name"]
    ops = {v["expect"]["op"] for v in VECTORS if v["expect"]["kind"] == "request"}
    assert AGENT_OPS <= ops, AGENT_OPS - ops


def test_vectors_are_reproducible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("vectors_gen", VECTOR_DIR / "gen.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    monkeypatch.setattr(gen, "OUT", tmp_path / "vectors.json")
    gen.main()
    assert (tmp_path / "vectors.json").read_text() == (VECTOR_DIR / "vectors.json").read_text()


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_meaning(v: dict) -> None:
    raw = bytes.fromhex(v["hex"])
    exp = v["expect"]
    status, value = reference_decode(raw)
    if exp["kind"] == "invalid":
        if status == "ok":
            assert request_error(value) is not None, "valid request in an invalid vector"
            status = "bad_request"
        assert status == exp["code"]
        return
    assert status == "ok", value
    if exp["kind"] == "request":
        assert request_error(value) is None
        assert value["id"] == exp["id"] and value["op"] == exp["op"]
        assert value.get("args") == from_json(exp["args"])
        want = expected_request(exp)
    else:
        assert value == from_json(exp["value"])
        want = from_json(exp["value"])
    # Packing the meaning again gives a frame with the same meaning.
    status2, again = reference_decode(pack_frame(want))
    assert status2 == "ok"
    if exp["kind"] == "request":
        assert {k: again.get(k) for k in ("id", "op", "args")} == \
            {k: value.get(k) for k in ("id", "op", "args")}
    else:
        assert again == value


def test_reference_validator_self_check() -> None:
    # The validator agrees with the C library's rules on the edges.
    assert structure_error(b"\x91" * 32 + b"\xc0") is None
    assert structure_error(b"\x91" * 33 + b"\xc0") is not None
    assert structure_error(b"\x91" * 32 + b"\x90") is not None  # empty level counts
    assert structure_error(b"\x81\xc0") is not None  # a pair needs two bytes
    assert structure_error(b"\xd4\x01\x00") is None
    assert structure_error(b"\xc7\x01\x01") is not None
    assert structure_error(b"") is not None
    body = msgpack.packb({"id": 1, "op": "write_file",
                          "args": {"data": b"x" * 300, "f": 1.5, "n": -70000}})
    assert structure_error(body) is None
    for i in range(len(body)):
        assert structure_error(body[:i]) is not None


# ---- against a live agent ------------------------------------------------------

def recv_frame(s: socket.socket, buf: bytearray) -> dict | None:
    """Next frame from s (buffered in buf), or None on EOF."""
    while True:
        if len(buf) >= 4:
            (n,) = struct.unpack(">I", buf[:4])
            if len(buf) >= 4 + n:
                body = bytes(buf[4:4 + n])
                del buf[:4 + n]
                out = msgpack.unpackb(body, raw=False, strict_map_key=False)
                assert isinstance(out, dict)
                return out
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        buf += chunk


def final_answer(s: socket.socket, buf: bytearray, name: str) -> dict:
    """The response after any stream events, which must carry the same id."""
    events: list[dict] = []
    while True:
        f = recv_frame(s, buf)
        assert f is not None, f"{name}: connection closed without an answer"
        if "event" not in f:
            for e in events:
                assert e["id"] == f["id"], name
            return f
        events.append(f)


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(15)
    s.connect(path)
    return s


def test_vectors_against_a_live_agent(agent) -> None:
    for v in VECTORS:
        exp = v["expect"]
        if exp["kind"] == "response":
            continue
        name = v["name"]
        with connect(agent.sock) as s:
            buf = bytearray()
            s.sendall(bytes.fromhex(v["hex"]))
            answer = final_answer(s, buf, name)
            if exp["kind"] == "request":
                assert answer["id"] == exp["id"], name
                assert isinstance(answer.get("ok"), bool), name
                # the vectors' args follow each op's schema: any failure is
                # about the (empty) slot, never the request itself
                assert answer["ok"] or answer["error"]["code"] != "bad_request", (name, answer)
                continue
            assert answer["ok"] is False, name
            assert answer["error"]["code"] == exp["code"], (name, answer)
            assert isinstance(answer["error"]["message"], str) and answer["error"]["message"]
            if exp["code"] == "too_large":
                assert answer["id"] == 0, name
                # the agent shuts down its side and closes
                assert recv_frame(s, buf) is None, name
            else:
                # frame boundaries are intact: the connection keeps working
                s.sendall(pack_frame({"id": 77, "op": "hello"}))
                again = final_answer(s, buf, name)
                assert again["id"] == 77 and again["ok"] is True, (name, again)
    # and a new connection is served normally afterwards
    c = agent.client()
    try:
        assert c.call("hello")["protocol"] == 1
    finally:
        c.close()


def test_request_vectors_pipelined_on_one_connection(agent) -> None:
    reqs = [v for v in VECTORS if v["expect"]["kind"] == "request"]
    want = Counter(v["expect"]["id"] for v in reqs)
    with connect(agent.sock) as s:
        s.sendall(b"".join(bytes.fromhex(v["hex"]) for v in reqs))
        buf = bytearray()
        got: Counter[int] = Counter()
        while sum(got.values()) < len(reqs):
            f = recv_frame(s, buf)
            assert f is not None, f"closed with answers missing: {want - got}"
            if "event" in f:
                continue
            assert isinstance(f.get("ok"), bool)
            got[f["id"]] += 1
        assert got == want
