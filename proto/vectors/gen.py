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


def frame_bytes(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def frame(body: bytes) -> str:
    return frame_bytes(body).hex()


def to_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$bin": v.hex()}
    if isinstance(v, dict):
        return {k: to_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [to_json(x) for x in v]
    return v


def request(name: str, desc: str, obj: dict) -> dict:
    body = msgpack.packb(obj, use_bin_type=True)
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


def raw_request(name: str, desc: str, body: bytes, id_: int, op: str) -> dict:
    """A request whose body is hand-built (encodings msgpack would not pick)."""
    return {"name": name, "description": desc, "hex": frame(body),
            "expect": {"kind": "request", "id": id_, "op": op, "args": None}}


def health_with_id(id_bytes: bytes) -> bytes:
    return b"\x82\xa2id" + id_bytes + b"\xa2op\xa6health"


def main() -> None:
    v: list[dict] = []
    # One request per agent op, with realistic arguments.
    v.append(request("hello", "hello with a token and a client name",
                     {"id": 1, "op": "hello", "args": {"token": "s3cret", "client": "agentctl"}}))
    v.append(request("health_no_args", "args absent",
                     {"id": 2, "op": "health"}))
    v.append(request("stats_nil_args", "args nil is the same as absent",
                     {"id": 3, "op": "stats", "args": None}))
    v.append(request("slots_one", "one slot's state",
                     {"id": 4, "op": "slots", "args": {"slot": 1}}))
    v.append(request("lease", "lease a slot for a trajectory",
                     {"id": 5, "op": "lease",
                      "args": {"slot": 1, "trajectory_id": "traj-42", "holder": "controller-a"}}))
    v.append(request("unlease", "release a lease, naming the trajectory",
                     {"id": 6, "op": "unlease", "args": {"slot": 1, "trajectory_id": "traj-42"}}))
    v.append(request("exec_cmd", "shell command with env, stdin as bin, limits and rlimits",
                     {"id": 7, "op": "exec",
                      "args": {"slot": 0, "cmd": "cat | wc -c", "env": {"LC_ALL": "C"},
                               "stdin": b"\x00\x01\xffdata\n", "timeout_ms": 5000,
                               "idle_timeout_ms": 0, "max_output": 65536, "stream": False,
                               "network": False, "rlimits": {"nofile": 256}}}))
    v.append(request("exec_argv_stream", "argv form, streamed output",
                     {"id": 8, "op": "exec",
                      "args": {"slot": 2, "argv": ["seq", "3"], "cwd": ".", "stream": True}}))
    v.append(request("exec_detach", "a detached command",
                     {"id": 9, "op": "exec",
                      "args": {"slot": 3, "cmd": "sleep 0.1", "detach": True}}))
    v.append(request("exec_attach", "attach to an exec from stdout offset 4096",
                     {"id": 10, "op": "exec_attach",
                      "args": {"exec_id": 17, "offset": 4096, "stderr_offset": 0}}))
    v.append(request("cancel", "cancel one exec by id",
                     {"id": 11, "op": "cancel", "args": {"exec_id": 17}}))
    v.append(request("read_file", "a range of a file with its sha256",
                     {"id": 12, "op": "read_file",
                      "args": {"slot": 0, "path": "src/main.py", "offset": 0, "length": 100,
                               "sha256": True}}))
    v.append(request("write_file", "256 bytes as bin, creating parents",
                     {"id": 13, "op": "write_file",
                      "args": {"slot": 0, "path": "a/b.bin", "data": bytes(range(256)),
                               "mode": 0o644, "mkdirs": True}}))
    v.append(request("write_file_str_data", "data as str is accepted too",
                     {"id": 14, "op": "write_file",
                      "args": {"slot": 0, "path": "notes.txt", "data": "hello\n",
                               "append": True}}))
    v.append(request("stat", "stat a path",
                     {"id": 15, "op": "stat", "args": {"slot": 0, "path": "src/main.py"}}))
    v.append(request("list", "recursive listing with a cap",
                     {"id": 16, "op": "list",
                      "args": {"slot": 0, "path": ".", "recursive": True, "max_entries": 100}}))
    v.append(request("archive", "tar.gz of the workspace",
                     {"id": 17, "op": "archive",
                      "args": {"slot": 0, "path": ".", "format": "tar.gz",
                               "max_bytes": 1 << 20}}))
    v.append(request("reset", "reset a slot",
                     {"id": 18, "op": "reset", "args": {"slot": 3}}))
    v.append(request("extra_envelope_key", "unknown envelope keys are ignored",
                     {"id": 19, "op": "health", "trace": "abc"}))
    # The id in every integer encoding: any encoding of a non-negative value is
    # valid, including the signed ones.
    v.append(raw_request("id_zero", "id 0 as a positive fixint", health_with_id(b"\x00"), 0,
                         "health"))
    v.append(raw_request("id_uint8", "id 200 as uint8", health_with_id(b"\xcc\xc8"), 200,
                         "health"))
    v.append(raw_request("id_uint16", "id 300 as uint16",
                         health_with_id(b"\xcd" + struct.pack(">H", 300)), 300, "health"))
    v.append(raw_request("id_uint32", "id 70000 as uint32",
                         health_with_id(b"\xce" + struct.pack(">I", 70000)), 70000, "health"))
    v.append(raw_request("id_uint64_small", "id 1 in a uint64 encoding",
                         health_with_id(b"\xcf" + struct.pack(">Q", 1)), 1, "health"))
    v.append(raw_request("id_uint64_max", "the largest id",
                         health_with_id(b"\xcf" + struct.pack(">Q", 2**64 - 1)), 2**64 - 1,
                         "health"))
    v.append(raw_request("id_int8_positive", "id 5 in a signed int8 encoding",
                         health_with_id(b"\xd0\x05"), 5, "health"))
    v.append(raw_request("id_int64_positive", "id 2^40 in a signed int64 encoding",
                         health_with_id(b"\xd3" + struct.pack(">q", 2**40)), 2**40, "health"))

    # Frames an agent sends.
    v.append(response("ok_exec", "success: an exec result",
                      {"id": 7, "ok": True,
                       "result": {"exec_id": 21, "pid": 4242, "exit_code": 0, "signal": 0,
                                  "stdout": b"9\n", "stderr": b"", "stdout_truncated": False,
                                  "timed_out": False, "duration_ms": 2,
                                  "isolation": ["containment"]}}))
    v.append(response("ok_nested", "success with nested maps, nil and a large integer",
                      {"id": 2**32, "ok": True,
                       "result": {"slots": [{"slot": 1, "leased": True, "holder": None,
                                             "leased_at": 1764043200123, "running": [17]}]}}))
    v.append(response("error", "failure",
                      {"id": 12, "ok": False,
                       "error": {"code": "path_escape", "message": "../x: resolves outside"}}))
    v.append(response("event_stdout", "stream event with binary data",
                      {"id": 8, "event": "stdout", "data": b"\xffbinary\n", "offset": 4096}))
    v.append(response("event_started", "first event of a streaming exec",
                      {"id": 8, "event": "started", "exec_id": 22, "pid": 4250}))

    # Invalid frames and what a receiver answers.
    v.append(invalid("not_a_map", "body is an array", frame_bytes(msgpack.packb([1, 2])),
                     "bad_request"))
    v.append(invalid("truncated_body", "map header promises 2 pairs, 1 present",
                     frame_bytes(b"\x82\xa2id\x01"), "bad_request"))
    v.append(invalid("oversize_header", "announces 1 GiB (limit 64 MiB); nothing follows",
                     struct.pack(">I", 1 << 30), "too_large"))
    v.append(invalid("oversize_header_by_one", "announces 64 MiB + 1 byte",
                     struct.pack(">I", (64 << 20) + 1), "too_large"))
    v.append(invalid("deep_nesting", "33 nested arrays",
                     frame_bytes(b"\x91" * 33 + b"\xc0"), "bad_request"))
    v.append(invalid("deep_nesting_in_args", "a valid envelope whose args nest 33 levels",
                     frame_bytes(b"\x83\xa2id\x01\xa2op\xa6health\xa4args"
                                 + b"\x81\xa1a" * 32 + b"\x01"), "bad_request"))
    v.append(invalid("array_count_lies", "array32 of 4 billion elements in 5 bytes",
                     frame_bytes(b"\xdd\xff\xff\xff\xff"), "bad_request"))
    v.append(invalid("map_count_lies", "map16 of 1000 pairs with 2 bytes after it",
                     frame_bytes(b"\xde\x03\xe8\xa0\xc0"), "bad_request"))
    v.append(invalid("str_length_lies", "str32 of 1 GiB in 5 bytes",
                     frame_bytes(b"\xdb\x40\x00\x00\x00"), "bad_request"))
    v.append(invalid("bin_length_lies", "a request whose stdin bin32 claims 16 MiB",
                     frame_bytes(b"\x83\xa2id\x01\xa2op\xa4exec\xa4args\x81\xa5stdin"
                                 + b"\xc6\x01\x00\x00\x00abc"), "bad_request"))
    v.append(invalid("reserved_byte", "0xc1 is never used",
                     frame_bytes(b"\x82\xa2id\x01\xa2op\xc1"), "bad_request"))
    v.append(invalid("id_negative", "id must be unsigned",
                     frame_bytes(msgpack.packb({"id": -1, "op": "health"})), "bad_request"))
    v.append(invalid("id_str", "id must be an integer",
                     frame_bytes(msgpack.packb({"id": "1", "op": "health"})), "bad_request"))
    v.append(invalid("id_missing", "no id at all",
                     frame_bytes(msgpack.packb({"op": "health"})), "bad_request"))
    v.append(invalid("op_missing", "no op",
                     frame_bytes(msgpack.packb({"id": 1})), "bad_request"))
    v.append(invalid("op_not_str", "op is an integer",
                     frame_bytes(msgpack.packb({"id": 1, "op": 3})), "bad_request"))
    v.append(invalid("args_not_map", "args is an array",
                     frame_bytes(msgpack.packb({"id": 1, "op": "health", "args": [1]})),
                     "bad_request"))
    v.append(invalid("zero_length", "empty frame", struct.pack(">I", 0), "bad_request"))
    v.append(invalid("trailing_bytes", "a valid map followed by one more byte",
                     frame_bytes(msgpack.packb({"id": 1, "op": "health"}) + b"\xc0"),
                     "bad_request"))
    names = [x["name"] for x in v]
    assert len(names) == len(set(names)), "duplicate vector names"
    OUT.write_text(json.dumps(v, indent=1) + "\n")


if __name__ == "__main__":
    main()
