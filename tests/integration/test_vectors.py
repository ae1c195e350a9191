"""The shared protocol vectors (proto/vectors/vectors.json), checked with
Python's msgpack as an independent implementation, and against a live agent."""
from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

import msgpack
import pytest

from slotwire import pack_frame

VECTORS = json.loads((Path(__file__).resolve().parents[2] / "proto/vectors/vectors.json")
                     .read_text())
MAX_FRAME = 64 << 20


def from_json(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"$bin"}:
            return bytes.fromhex(v["$bin"])
        return {k: from_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [from_json(x) for x in v]
    return v


def depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max((max(depth(k), depth(x)) for k, x in v.items()), default=0)
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    return 0


def reference_decode(raw: bytes) -> tuple[str, Any]:
    """('ok', value) or ('bad_request'|'too_large', None), by the contract."""
    (n,) = struct.unpack(">I", raw[:4])
    if n > MAX_FRAME:
        return "too_large", None
    body = raw[4:]
    if n == 0 or len(body) != n:
        return "bad_request", None
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=False,
                                max_bin_len=n, max_str_len=n, max_array_len=n, max_map_len=n)
    except Exception:
        return "bad_request", None
    if depth(value) > 32:
        return "bad_request", None
    return "ok", value


def request_error(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "bad_request"
    if not isinstance(value.get("id"), int) or isinstance(value.get("id"), bool) or value["id"] < 0:
        return "bad_request"
    if not isinstance(value.get("op"), str):
        return "bad_request"
    if value.get("args") is not None and not isinstance(value["args"], dict):
        return "bad_request"
    return None


@pytest.mark.parametrize("v", VECTORS, ids=[v["name"] for v in VECTORS])
def test_vector_meaning(v: dict) -> None:
    raw = bytes.fromhex(v["hex"])
    exp = v["expect"]
    status, value = reference_decode(raw)
    if exp["kind"] == "invalid":
        code = status if status != "ok" else request_error(value)
        assert code == exp["code"]
        return
    assert status == "ok"
    if exp["kind"] == "request":
        assert request_error(value) is None
        assert value["id"] == exp["id"] and value["op"] == exp["op"]
        assert value.get("args") == from_json(exp["args"])
        # packing the meaning again gives a frame with the same meaning
        again = reference_decode(pack_frame(value))[1]
        assert again == value
    else:
        assert value == from_json(exp["value"])


def test_vectors_against_a_live_agent(agent) -> None:
    for v in VECTORS:
        raw = bytes.fromhex(v["hex"])
        exp = v["expect"]
        if exp["kind"] == "response":
            continue
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(agent.sock)
        s.sendall(raw)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, v["name"]
            buf += chunk
        answer = msgpack.unpackb(buf[4:4 + struct.unpack(">I", buf[:4])[0]], raw=False)
        if exp["kind"] == "invalid":
            assert answer["ok"] is False and answer["error"]["code"] == exp["code"], v["name"]
        else:
            assert answer["id"] == exp["id"], v["name"]
            assert "ok" in answer, v["name"]
        s.close()
    c = agent.client()
    assert c.call("health")["ok"]
