#!/usr/bin/python3
"""Generate vectors.json: frames (hex, including the 4-byte length) and
what they mean. Deterministic: run it again and the file does not change.

Hand-built byte strings cover encodings a msgpack library would not choose
(wide integers for small ids) and invalid input a library would not emit.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import msgpack

OUT = Path(__file__).with_name("vectors.json")


def frame(body: bytes) -> str:
    return (struct.pack(">I", len(body)) + body).hex()


def to_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    return v


def request(name: str, desc: str, obj: dict, body: bytes | None = None) -> dict:
    body = body if body is not None else msgpack.packb(obj, use_bin_type=True)
    return {"name": name, "description": desc, "hex": frame(body),
            "expect": {"kind": "request", "id": obj["id"], "op": obj["op"],
                       "args": to_json(obj.get("args"))}}


def response(name: str, desc: str, obj: dict) -> dict:
    return {"name": name, "description": desc,
            "hex": frame(msgpack.packb(obj, use_bin_type=True)),
            "expect": {"kind": "response", "value": to_json(obj)}}


def invalid(name: str, desc: str, raw: bytes, code: str) -> dict:
    return {"name": name, "description": desc, "hex": raw.hex(),
            "expect": {"kind": "invalid", "code": code}}


def main() -> None:
    v: list[dict] = []
    v.append(request("hello", "hello with a token", {"id": 1, "op": "hello",
                                                     "args": {"token": "s3cret", "client": "x"}}))
    v.append(request("health_no_args", "args absent", {"id": 2, "op": "health"}))
    v.append(request("stats_nil_args", "args nil is the same as absent",
                     {"id": 3, "op": "stats", "args": None}))
    v.append(request("slots_one", "one slot", {"id": 4, "op": "slots", "args": {"slot": 1}}))
    v.append(request("lease", "lease a slot", {"id": 5, "op": "lease",
                                               "args": {"slot": 1, "trajectory_id": "traj-42",
                                                        "holder": "ctl"}}))
    v.append(request("unlease", "", {"id": 6, "op": "unlease",
                                     "args": {"slot": 1, "trajectory_id": "traj-42"}}))
    v.append(request("exec_cmd", "shell command with env, stdin bin and limits",
                     {"id": 7, "op": "exec",
                      "args": {"slot": 0, "cmd": "cat | wc -c", "env": {"A": "1"},
                               "stdin": b"\x00\x01\xff", "timeout_ms": 5000,
                               "max_output": 65536, "stream": False}}))
    v.append(request("exec_argv", "argv form, detached", {"id": 8, "op": "exec",
                                                          "args": {"slot": 2, "argv": ["ls", "-la"],
                                                                   "detach": True}}))
    v.append(request("exec_attach", "", {"id": 9, "op": "exec_attach",
                                         "args": {"exec_id": 17, "offset": 4096}}))
    v.append(request("cancel", "", {"id": 10, "op": "cancel", "args": {"exec_id": 17}}))
    v.append(request("read_file", "", {"id": 11, "op": "read_file",
                                       "args": {"slot": 0, "path": "src/a.py", "offset": 0,
                                                "length": 100, "sha256": True}}))
    v.append(request("write_file", "bytes as bin", {"id": 12, "op": "write_file",
                                                    "args": {"slot": 0, "path": "a/b.bin",
                                                             "data": bytes(range(256)),
                                                             "mode": 0o644, "mkdirs": True}}))
    v.append(request("stat", "", {"id": 13, "op": "stat", "args": {"slot": 0, "path": "a"}}))
    v.append(request("list", "", {"id": 14, "op": "list",
                                  "args": {"slot": 0, "path": ".", "recursive": True,
                                           "max_entries": 100}}))
    v.append(request("archive", "", {"id": 15, "op": "archive",
                                     "args": {"slot": 0, "path": ".", "format": "tar.gz"}}))
    v.append(request("reset", "", {"id": 16, "op": "reset", "args": {"slot": 3}}))
    # id 1 as uint64 (0xcf): any integer encoding is fine
    body = b"\x82\xa2id\xcf" + struct.pack(">Q", 1) + b"\xa2op\xa6health"
    v.append(request("id_uint64_encoding", "small id in a uint64 encoding",
                     {"id": 1, "op": "health"}, body))
    body = b"\x82\xa2id\xcf" + struct.pack(">Q", 2**64 - 1) + b"\xa2op\xa6health"
    v.append(request("id_max", "largest id", {"id": 2**64 - 1, "op": "health"}, body))
    v.append(request("extra_envelope_key", "unknown envelope keys are ignored",
                     {"id": 20, "op": "health", "trace": "abc"}))

    v.append(response("ok", "success", {"id": 7, "ok": True,
                                        "result": {"exit_code": 0, "stdout": b"3\n",
                                                   "stderr": b"", "timed_out": False}}))
    v.append(response("error", "failure", {"id": 11, "ok": False,
                                           "error": {"code": "path_escape",
                                                     "message": "../x: resolves outside"}}))
    v.append(response("event_stdout", "stream event", {"id": 9, "event": "stdout",
                                                       "data": b"\xffbinary\n", "offset": 4096}))
    v.append(response("event_started", "first event of a streaming exec",
                      {"id": 9, "event": "started", "exec_id": 17, "pid": 4242}))

    v.append(invalid("not_a_map", "body is an array", bytes.fromhex(frame(msgpack.packb([1, 2]))),
                     "bad_request"))
    v.append(invalid("truncated_body", "map header promises 2 pairs, 1 present",
                     bytes.fromhex(frame(b"\x82\xa2id\x01")), "bad_request"))
    v.append(invalid("oversize_header", "announces 1 GiB (limit 64 MiB)",
                     struct.pack(">I", 1 << 30), "too_large"))
    v.append(invalid("deep_nesting", "33 nested arrays",
                     bytes.fromhex(frame(b"\x91" * 33 + b"\xc0")), "bad_request"))
    v.append(invalid("array_count_lies", "array32 of 4 billion elements in 5 bytes",
                     bytes.fromhex(frame(b"\xdd\xff\xff\xff\xff")), "bad_request"))
    v.append(invalid("str_length_lies", "str32 of 1 GiB in 5 bytes",
                     bytes.fromhex(frame(b"\xdb\x40\x00\x00\x00")), "bad_request"))
    v.append(invalid("reserved_byte", "0xc1 is never used",
                     bytes.fromhex(frame(b"\xc1")), "bad_request"))
    v.append(invalid("id_negative", "id must be unsigned",
                     bytes.fromhex(frame(msgpack.packb({"id": -1, "op": "health"}))),
                     "bad_request"))
    v.append(invalid("id_str", "id must be an integer",
                     bytes.fromhex(frame(msgpack.packb({"id": "1", "op": "health"}))),
                     "bad_request"))
    v.append(invalid("op_missing", "", bytes.fromhex(frame(msgpack.packb({"id": 1}))),
                     "bad_request"))
    v.append(invalid("op_not_str", "", bytes.fromhex(frame(msgpack.packb({"id": 1, "op": 3}))),
                     "bad_request"))
    v.append(invalid("args_not_map", "",
                     bytes.fromhex(frame(msgpack.packb({"id": 1, "op": "health", "args": [1]}))),
                     "bad_request"))
    v.append(invalid("zero_length", "empty frame", struct.pack(">I", 0), "bad_request"))
    v.append(invalid("trailing_bytes", "a valid map followed by one more byte",
                     bytes.fromhex(frame(msgpack.packb({"id": 1, "op": "health"}) + b"\xc0")),
                     "bad_request"))
    OUT.write_text(json.dumps(v, indent=1) + "\n")


if __name__ == "__main__":
    main()
