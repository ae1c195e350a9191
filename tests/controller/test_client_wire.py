"""slot_client against an in-process fake controller: framing, id demultiplexing,
events, errors, timeouts, lost connections, and the ToolBackend's mapping of
answers to ExecutionResults. These need no controller binary."""
from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

import msgpack
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "controller" / "python"))

from slot_client import (  # noqa: E402
    AsyncClient,
    CallTimeout,
    ConnectError,
    ConnectionLost,
    ControllerToolBackend,
    Slot,
    SlotError,
    default_address,
    pack_frame,
    parse_address,
)

Frame = dict[str, Any]
Handler = Callable[["FakeConn", Frame], Awaitable[None]]


class FakeConn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, obj: Frame) -> None:
        self.writer.write(pack_frame(obj))
        await self.writer.drain()

    async def ok(self, req: Frame, result: Frame) -> None:
        await self.send({"id": req["id"], "ok": True, "result": result})

    async def fail(self, req: Frame, code: str, message: str) -> None:
        await self.send({"id": req["id"], "ok": False,
                         "error": {"code": code, "message": message}})


class FakeController:
    """A Unix-socket server; `handler` is run (as a task) for every request."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.dir = tempfile.mkdtemp(prefix="scw-", dir="/tmp")
        self.path = os.path.join(self.dir, "s.sock")
        self.addr = "unix:" + self.path
        self.requests: list[Frame] = []
        self.conns: list[FakeConn] = []
        self.server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> "FakeController":
        self.server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for c in self.conns:
            c.writer.close()
        await self.server.wait_closed()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.rmdir(self.dir)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConn(reader, writer)
        self.conns.append(conn)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                try:
                    (n,) = struct.unpack(">I", await reader.readexactly(4))
                    body = await reader.readexactly(n)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                req = msgpack.unpackb(body, raw=False)
                self.requests.append(req)
                t = asyncio.create_task(self.handler(conn, req))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        finally:
            writer.close()


async def echo_handler(conn: FakeConn, req: Frame) -> None:
    if req["op"] == "hello":
        await conn.ok(req, {"protocol": 1, "server": "slot-controller",
                            "authenticated": "token" in (req.get("args") or {})})
    else:
        await conn.ok(req, {"op": req["op"], "args": req.get("args")})


# ---------------------------------------------------------------- framing, addresses

def test_frame_matches_protocol_example() -> None:
    frame = pack_frame({"id": 1, "op": "hello", "args": {"token": "s3cret"}})
    expected = bytes.fromhex("00000021 83 a269 6401 a26f70a568656c6c6f"
                             " a461726773 81 a5746f6b656e a6733363726574".replace(" ", ""))
    assert frame == expected


def test_frame_too_large_refused() -> None:
    with pytest.raises(SlotError) as ei:
        pack_frame({"id": 1, "op": "x", "args": {"data": b"\0" * 2000}}, max_frame=1000)
    assert ei.value.code == "too_large"


def test_parse_address() -> None:
    a = parse_address("unix:/run/x.sock")
    assert (a.kind, a.path, str(a)) == ("unix", "/run/x.sock", "unix:/run/x.sock")
    a = parse_address("tcp:127.0.0.1:7000")
    assert (a.kind, a.host, a.port) == ("tcp", "127.0.0.1", 7000)
    a = parse_address("tcp:[::1]:7000")
    assert (a.kind, a.host, a.port, str(a)) == ("tcp", "::1", 7000, "tcp:[::1]:7000")
    assert parse_address("/abs/path.sock").path == "/abs/path.sock"
    for bad in ("tcp:host", "tcp:host:port", "tcp::80", "unix:", "http://x", "tcp:h:70000"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_default_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert default_address() == "unix:/run/user/1234/slot-controller.sock"
    assert parse_address(None).path == "/run/user/1234/slot-controller.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_address() == f"unix:/tmp/slot-controller-{os.getuid()}.sock"


def test_connect_missing_socket_is_clear() -> None:
    async def main() -> None:
        with pytest.raises(ConnectError) as ei:
            await AsyncClient.connect("unix:/tmp/definitely-missing-dir/ctl.sock")
        e = ei.value
        assert isinstance(e, SlotError) and isinstance(e, ConnectionError)
        assert e.code == "connect_failed"
        assert "unix:/tmp/definitely-missing-dir/ctl.sock" in str(e)
        assert "No such file" in str(e)
    asyncio.run(main())


# ---------------------------------------------------------------- demultiplexing

def test_hello_token_and_wrappers_send_documented_args() -> None:
    async def main() -> None:
        async with FakeController(echo_handler) as fake:
            c = await AsyncClient.connect(fake.addr, token="s3cret", client_name="t")
            assert c.server_info["authenticated"] is True
            assert fake.requests[0]["op"] == "hello"
            assert fake.requests[0]["args"] == {"token": "s3cret", "client": "t"}
            r = await c.call("acquire", {"profile": "p"})
            assert r == {"op": "acquire", "args": {"profile": "p"}}
            await c.acquire(trajectory_id="t1", timeout_ms=0)
            await c.release("a/1/2", reset=False)
            await c.exec("a/1/2", "bash", {"command": "ls"}, timeout_ms=5)
            await c.batch([{"slot": "a/1/2", "tool": "bash", "args": {"command": "ls"}}])
            await c.read_artifact("a/1/2", "f", max_bytes=10, sha256=True)
            await c.list_artifacts("a/1/2")
            await c.archive_artifacts("a/1/2", "src", format="tar")
            await c.drain("agent-1")
            sent = [(r["op"], r.get("args")) for r in fake.requests[2:]]
            assert sent == [
                ("acquire", {"trajectory_id": "t1", "timeout_ms": 0}),
                ("release", {"slot": "a/1/2", "reset": False}),
                ("exec", {"slot": "a/1/2", "tool": "bash", "args": {"command": "ls"},
                          "timeout_ms": 5}),
                ("batch", {"requests": [{"slot": "a/1/2", "tool": "bash",
                                         "args": {"command": "ls"}}]}),
                ("read_artifact", {"slot": "a/1/2", "path": "f", "max_bytes": 10,
                                   "sha256": True}),
                ("list_artifacts", {"slot": "a/1/2", "path": "."}),
                ("archive_artifacts", {"slot": "a/1/2", "path": "src", "format": "tar"}),
                ("drain", {"agent": "agent-1"}),
            ]
            ids = [r["id"] for r in fake.requests]
            assert len(set(ids)) == len(ids) and all(i > 0 for i in ids)
            await c.close()
    asyncio.run(main())


def test_out_of_order_answers_and_pipelining() -> None:
    async def main() -> None:
        arrived: list[int] = []
        all_in = asyncio.Event()

        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
                return
            n = req["args"]["n"]
            arrived.append(n)
            if len(arrived) == 20:
                all_in.set()
            await all_in.wait()  # answers only once every request is in flight
            await asyncio.sleep((20 - n) * 0.005)  # last sent answered first
            await conn.ok(req, {"n": n})

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            results = await asyncio.wait_for(
                asyncio.gather(*(c.call("op", {"n": n}) for n in range(20))), 10)
            assert [r["n"] for r in results] == list(range(20))
            assert c.pending_count == 0
            await c.close()
    asyncio.run(main())


def test_events_go_to_callback_before_result() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
                return
            rid = req["id"]
            await conn.send({"id": rid, "event": "started", "exec_id": 7, "pid": 42})
            await conn.send({"id": rid, "event": "stdout", "data": b"a\n", "offset": 0})
            await conn.send({"id": rid, "event": "stderr", "data": b"e", "offset": 0})
            await conn.ok(req, {"exit_code": 0})

        async with FakeController(handler) as fake:
            default_events: list[Frame] = []
            c = await AsyncClient.connect(fake.addr, on_event=default_events.append)
            events: list[Frame] = []
            r = await c.exec("s/0/1", "bash", {"command": "x", "stream": True},
                             on_event=events.append)
            assert r == {"exit_code": 0}
            assert [e["event"] for e in events] == ["started", "stdout", "stderr"]
            assert events[1]["data"] == b"a\n"
            assert default_events == []
            await c.call("exec", {})  # no per-call callback: the client's gets them
            assert [e["event"] for e in default_events] == ["started", "stdout", "stderr"]
            await c.close()
    asyncio.run(main())


def test_error_answer_raises_slot_error() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
            else:
                await conn.fail(req, "no_capacity", "queue position 3 of 3")

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            with pytest.raises(SlotError) as ei:
                await c.acquire()
            assert (ei.value.code, ei.value.message) == ("no_capacity", "queue position 3 of 3")
            assert str(ei.value) == "no_capacity: queue position 3 of 3"
            assert not isinstance(ei.value, ConnectionLost)
            await c.close()
    asyncio.run(main())


def test_wrong_token_raises_unauthorized() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            await conn.fail(req, "unauthorized", "wrong token")

        async with FakeController(handler) as fake:
            with pytest.raises(SlotError) as ei:
                await AsyncClient.connect(fake.addr, token="nope")
            assert ei.value.code == "unauthorized"
    asyncio.run(main())


def test_connection_lost_fails_every_pending_call() -> None:
    async def main() -> None:
        got = asyncio.Event()
        count = [0]

        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
                return
            count[0] += 1
            if count[0] == 5:
                got.set()
                await asyncio.sleep(0.05)
                conn.writer.close()

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            results = await asyncio.wait_for(asyncio.gather(
                *(c.call("exec", {"n": i}) for i in range(5)), return_exceptions=True), 10)
            assert all(isinstance(r, ConnectionLost) for r in results), results
            assert all(r.code == "connection_lost" for r in results)  # type: ignore[union-attr]
            assert "got no answer" in str(results[0])
            assert c.closed
            with pytest.raises(ConnectionLost):
                await c.status()
    asyncio.run(main())


def test_oversized_frame_from_server_drops_connection() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
                return
            conn.writer.write(struct.pack(">I", 0xFFFFFFF0) + b"xx")
            await conn.writer.drain()

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            with pytest.raises(ConnectionLost) as ei:
                await asyncio.wait_for(c.status(), 10)
            assert "too_large" in str(ei.value)
    asyncio.run(main())


def test_client_timeout_then_connection_still_usable() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "slow":
                await asyncio.sleep(0.5)
            await conn.ok(req, {"op": req["op"]})

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            with pytest.raises(CallTimeout) as ei:
                await c.call("slow", {}, timeout=0.1)
            assert ei.value.code == "timeout" and isinstance(ei.value, TimeoutError)
            assert c.pending_count == 0
            await asyncio.sleep(0.6)  # the late answer arrives and is dropped
            assert await c.call("fast", {}) == {"op": "fast"}
            await c.close()
    asyncio.run(main())


def test_close_fails_pending_and_later_calls() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
            # otherwise never answer

        async with FakeController(handler) as fake:
            c = await AsyncClient.connect(fake.addr)
            t = asyncio.create_task(c.call("hang", {}))
            await asyncio.sleep(0.05)
            await c.close()
            with pytest.raises(ConnectionLost):
                await t
            with pytest.raises(ConnectionLost):
                await c.call("x", {})
    asyncio.run(main())


# ---------------------------------------------------------------- ToolBackend mapping

def canned_batch_handler(answers: Callable[[list[Frame]], list[Frame]]) -> Handler:
    async def handler(conn: FakeConn, req: Frame) -> None:
        op = req["op"]
        if op == "hello":
            await conn.ok(req, {"protocol": 1})
        elif op == "acquire":
            await conn.ok(req, {"slot": "ag-1/2/3", "agent": "ag-1", "index": 2,
                                "generation": 3, "trajectory_id": req["args"].get(
                                    "trajectory_id", "traj-1"), "profile": "default",
                                "workspace": "/w/2", "address": "unix:/a.sock"})
        elif op == "release":
            await conn.ok(req, {"slot": req["args"]["slot"], "reset": req["args"]["reset"]})
        elif op == "batch":
            await conn.ok(req, {"results": answers(req["args"]["requests"])})
        elif op == "read_artifact":
            await conn.fail(req, "not_found", "no such file: x")
        else:
            await conn.fail(req, "unknown_op", op)
    return handler


def exec_result(**kw: Any) -> Frame:
    base: Frame = {"exec_id": 1, "pid": 9, "exit_code": 0, "signal": 0, "stdout": b"",
                   "stderr": b"", "stdout_truncated": False, "stderr_truncated": False,
                   "timed_out": False, "idle_timed_out": False, "cancelled": False,
                   "duration_ms": 3, "isolation": ["containment"], "network": True}
    base.update(kw)
    return {"ok": True, "result": base}


def test_tool_backend_result_mapping() -> None:
    content = "h\u00e9llo\n".encode()

    def answers(reqs: list[Frame]) -> list[Frame]:
        assert [r["tool"] for r in reqs] == ["write_file", "bash", "bash", "bash", "bash",
                                            "read_file", "bash"]
        assert reqs[0]["args"] == {"path": "d/f.txt", "data": content}
        assert reqs[1]["args"] == {"command": "x", "timeout": 1.5}  # seconds, as the controller takes them
        return [
            {"ok": True, "result": {"path": "d/f.txt", "size": len(content),
                                    "sha256": hashlib.sha256(content).hexdigest()}},
            exec_result(stdout=b"out\n", stderr=b"err\n", exit_code=3),
            exec_result(stderr=b"only err"),
            exec_result(stdout=b"\xffok", duration_ms=1500, timed_out=True, exit_code=137,
                        signal=9),
            exec_result(stdout=b"fine\n"),
            {"ok": True, "result": {"data": content, "size": len(content), "offset": 0,
                                    "eof": True, "mode": 420, "mtime": 1}},
            {"ok": False, "error": {"code": "not_leased", "message": "stale handle"}},
        ]

    async def main() -> None:
        async with FakeController(canned_batch_handler(answers)) as fake:
            b = ControllerToolBackend(fake.addr, conventions="slot")
            await b.start()
            slot = await b.acquire("traj-9")
            assert slot == Slot("ag-1/2/3", "ag-1", "unix:/a.sock", "/w/2", "acquired",
                                "traj-9", slot.metadata)
            assert slot.metadata["index"] == 2 and slot.metadata["generation"] == 3
            assert slot.metadata["profile"] == "default"
            rs = await b.execute_batch([
                (slot, "write_file", {"path": "d/f.txt", "content": content.decode()}),
                (slot, "bash", {"command": "x", "timeout": 1.5}),
                (slot, "bash", {"command": "y"}),
                (slot, "bash", {"command": "z"}),
                (slot, "bash", {"command": "w"}),
                (slot, "read_file", {"path": "d/f.txt"}),
                ("ag-0/0/1", "bash", {"command": "v"}),
            ])
            w, b1, b2, b3, b4, rf, bad = rs
            assert (w.success, w.output, w.error) == (True, f"wrote {len(content)} bytes to d/f.txt",
                                                      "")
            assert w.metadata["sha256"] == hashlib.sha256(content).hexdigest()
            assert (b1.success, b1.output, b1.error) == (False, "out\n\n[stderr]\nerr\n",
                                                         "exit code 3")
            assert b1.metadata["exit_code"] == 3 and b1.metadata["isolation"] == ["containment"]
            assert (b2.success, b2.output) == (True, "only err")
            assert b3.success is False and b3.output == "\ufffdok"
            assert b3.error == "timed out after 30000 ms" and b3.metadata["timed_out"] is True
            assert b3.metadata["signal"] == 9
            assert (b4.success, b4.output, b4.error) == (True, "fine\n", "")
            assert rf.output == content.decode()
            assert rf.metadata["size"] == len(content)
            assert (bad.success, bad.output, bad.error) == (False, "", "not_leased: stale handle")
            assert bad.metadata["code"] == "not_leased" and bad.slot_id == "ag-0/0/1"
            assert len({r.execution_id for r in rs}) == len(rs)
            assert all(r.slot_id == slot.slot_id for r in rs[:-1])

            art = await b.read_artifact(slot, "x")
            assert art["success"] is False and art["error"] == "Not found: x"
            await b.stop(purge=True)
            assert slot.state == "available"
            rel = [r for r in fake.requests if r["op"] == "release"]
            assert rel[0]["args"] == {"slot": "ag-1/2/3", "reset": True}
    asyncio.run(main())


def test_tool_backend_connection_failure_is_per_call_result() -> None:
    async def main() -> None:
        async def handler(conn: FakeConn, req: Frame) -> None:
            if req["op"] == "hello":
                await conn.ok(req, {})
            elif req["op"] == "profiles":
                await conn.ok(req, {"profiles": [{"name": "default", "min_agents": 0}]})
            elif req["op"] == "status":
                await conn.ok(req, {"agents": {"ready": 0}})
            else:
                conn.writer.close()

        async with FakeController(handler) as fake:
            b = ControllerToolBackend(fake.addr)
            await b.start()
            rs = await b.execute_batch([("a/0/1", "bash", {"command": "x"}),
                                        ("a/0/1", "read_file", {"path": "y"})])
            assert [r.success for r in rs] == [False, False]
            assert all(r.metadata["code"] == "connection_lost" for r in rs)
            assert rs[0].error.startswith("connection_lost: ")
            # The next call reconnects.
            rs = await b.execute_batch([("a/0/1", "bash", {"command": "x"})])
            assert rs[0].metadata["code"] == "connection_lost"
            assert sum(1 for r in fake.requests if r["op"] == "hello") == 2
            await b.stop()
    asyncio.run(main())
