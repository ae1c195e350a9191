"""The trainer's own tool executor on slot, unchanged: slot_client driven
exactly as ../shared/notes/trainer-interface.md says the trainer drives its
backend (note_executor.py is that executor, written from the note), against
the real controller and agents. Observations are compared field by field
with the note's conventions; every result goes through json.dumps and the
trainer's pydantic models."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "controller" / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from note_executor import (  # noqa: E402
    ExecutorConfig,
    NoteExecutor,
    ToolResultPayload,
)
from slot_client import (  # noqa: E402
    AsyncClient,
    ControllerToolBackend,
    ExecutionResult,
    Slot,
    SlotState,
    ToolResult,
)

T = TypeVar("T")
PY = "/usr/bin/python3"

POOL = """
profiles:
  default:
    slots_per_agent: 8
    min_agents: {min}
    max_agents: {max}
    lease_grace: 1s
"""


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 180.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(main())


def observation(r: Any) -> dict[str, Any]:
    """What the model sees: the to_xml JSON, parsed back."""
    x = r.to_xml()
    assert x.startswith("<tool_response>") and x.endswith("</tool_response>")
    return json.loads(x[len("<tool_response>"):-len("</tool_response>")])


def check_result(r: Any) -> dict[str, Any]:
    """Every tool result: JSON-serialisable, valid for the trainer's
    payload model, error "" on success."""
    ToolResultPayload(success=r.success, output=r.output, error=r.error, metadata=r.metadata,
                      uniq_id=r.uniq_id)
    json.dumps(r.metadata)
    if r.success:
        assert r.error == "", r
    else:
        assert r.error, r
    return observation(r)


async def with_executor(addr: str, body: Callable[[NoteExecutor, ControllerToolBackend],
                                                  Awaitable[T]],
                        config: ExecutorConfig | None = None, **backend_kw: Any) -> T:
    backend = ControllerToolBackend(addr, **backend_kw)
    await backend.start()
    ex = NoteExecutor(backend, config or ExecutorConfig())
    await ex.start()
    try:
        return await body(ex, backend)
    finally:
        await ex.close()
        await backend.stop(purge=True)


# ---------------------------------------------------------------- the interface

def test_the_interface_has_the_trainers_names_signatures_and_defaults() -> None:
    b = ControllerToolBackend("unix:/nonexistent")
    assert b.default_timeout_s == 30.0
    assert isinstance(type(b).__dict__["default_timeout_s"], property)
    for name in ("start", "stop", "acquire", "release", "execute_batch", "read_artifact",
                 "list_artifacts", "archive_artifacts"):
        assert inspect.iscoroutinefunction(getattr(b, name)), name
    sig = lambda f: inspect.signature(f).parameters  # noqa: E731
    assert sig(b.stop)["purge"].default is False
    assert sig(b.stop)["purge"].kind == inspect.Parameter.KEYWORD_ONLY
    assert sig(b.acquire)["trajectory_id"].default is None
    assert sig(b.release)["reset_workspace"].default is False
    eb = list(sig(b.execute_batch).items())
    assert eb[0][0] == "requests" and eb[1][0] == "timeout_s" and eb[1][1].default is None
    ra = sig(b.read_artifact)
    assert (ra["encoding"].default, ra["max_bytes"].default, ra["include_sha256"].default,
            ra["timeout_s"].default) == ("text", None, False, None)
    la = sig(b.list_artifacts)
    assert (la["path"].default, la["recursive"].default, la["max_entries"].default) == \
        (".", False, None)
    aa = sig(b.archive_artifacts)
    assert (aa["path"].default, aa["archive_format"].default, aa["max_bytes"].default,
            aa["max_entries"].default) == (".", "tar.gz", None, None)
    stats = b.get_stats()
    assert set(stats) >= {"total_slots", "available_slots", "acquired_slots", "containers",
                          "slots_by_state", "started"}
    assert stats["started"] is False
    json.dumps(stats)

    assert [s.value for s in SlotState] == ["available", "acquired", "executing", "releasing",
                                            "error"]
    s = Slot("a/0/1", "a", "stdio:pid:1")
    assert (s.workspace_dir, s.state, s.trajectory_id, s.metadata) == \
        ("", SlotState.AVAILABLE, None, {})
    assert s.is_available() and not s.is_acquired()
    s.acquire("t")
    assert s.is_acquired() and s.trajectory_id == "t"
    with pytest.raises(RuntimeError):
        s.acquire("u")
    s.start_execution()
    assert s.state == SlotState.EXECUTING
    s.end_execution()
    d = s.to_dict()
    assert d["state"] == "acquired" and json.dumps(d)
    assert Slot.from_dict(d) == s and "acquired" in repr(s)
    s.mark_error("boom")
    assert s.state == SlotState.ERROR
    s.release()
    assert s.is_available() and s.trajectory_id is None

    r = ExecutionResult(success=True)
    assert (r.output, r.error, r.execution_id, r.slot_id, r.metadata) == ("", "", "", "", {})
    tr = r.to_tool_result()
    assert isinstance(tr, ToolResult) and tr.error == "" and tr.uniq_id == ""
    assert observation(tr) == {"success": True, "output": ""}
    tr = ExecutionResult(False, "out", "Exit code: 1", "e1", "s", {"exit_code": 1}).to_tool_result()
    assert observation(tr) == {"success": False, "output": "out", "uniq_id": "e1",
                               "error": "Exit code: 1", "metadata": {"exit_code": 1}}


def test_release_is_a_logged_no_op_the_second_time(controller_factory: Any,
                                                   caplog: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))

    async def main() -> None:
        b = ControllerToolBackend(ctl.addr)
        await b.start()
        s = await b.acquire(trajectory_id="twice")
        assert s.state == SlotState.ACQUIRED and s.trajectory_id == "twice"
        await b.release(s, reset_workspace=True)
        assert s.state == SlotState.AVAILABLE and s.trajectory_id is None
        await b.release(s, reset_workspace=True)  # no exception
        await b.release(Slot("nobody/0/1", "nobody", ""))  # unknown: ignored
        await b.release("garbage")
        assert b.acquired_slots == []
        await b.stop()
    with caplog.at_level("INFO", logger="slot_client"):
        run(main)
    assert any("does not hold" in m or "not_leased" in m for m in caplog.messages), \
        caplog.messages


# ---------------------------------------------------------------- observations

def test_observations_follow_the_trainers_conventions(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        t = "obs"
        call = lambda name, args, **kw: ex.execute(t, name, args, **kw)  # noqa: E731
        w = await call("write_file", {"path": "src/a.txt", "content": "héllo\n"})
        assert check_result(w)["output"] == "Successfully wrote 6 bytes to src/a.txt"
        slot = ex.slots[t]
        assert slot.state == SlotState.ACQUIRED and slot.trajectory_id == t

        r = await call("terminal", {"command": "pwd", "timeout": 10})
        pwd = check_result(r)["output"]
        assert pwd == slot.workspace_dir, (pwd, slot.workspace_dir)
        assert slot.alloc_id not in pwd, "the path commands see names the agent"
        if os.geteuid() == 0:
            assert pwd == "/workspace"

        r = await call("terminal", {"command": "echo '  out  '; echo err >&2; exit 3"})
        o = check_result(r)
        # joined, then stripped as a whole (the streams keep their own blanks)
        assert o == {"success": False, "output": "out  \n\n[stderr]\nerr", "uniq_id": r.uniq_id,
                     "error": "Exit code: 3",
                     "metadata": {"exit_code": 3, "sandboxed": r.metadata["sandboxed"],
                                  "network_isolated": False}}
        r = await call("bash", {"command": "echo only-err >&2"})
        assert (r.success, r.output, r.error) == (True, "only-err", "")
        r = await call("bash", {"command": "printf '\\n\\n  x \\n\\n'"})
        assert r.output == "x"

        r = await call("bash", {"command": "seq 1 100000"})
        assert r.success and len(r.output) == 50_000 + len("\n... (output truncated)")
        assert r.output.endswith("\n... (output truncated)") and r.output.startswith("1\n2\n")
        r = await call("bash", {"command": "seq 1 10"})
        assert r.output == "\n".join(str(i) for i in range(1, 11))

        t0 = time.monotonic()
        r = await call("terminal", {"command": "echo start; sleep 30", "timeout": 2})
        assert time.monotonic() - t0 < 20
        assert check_result(r) == {"success": False, "output": "", "uniq_id": r.uniq_id,
                                   "error": "Command timed out after 2.0s",
                                   "metadata": {"exit_code": -1, "timeout": True}}

        r = await call("read_file", {"path": "src/a.txt"})
        o = check_result(r)
        assert (o["success"], o["output"]) == (True, "héllo\n")
        assert r.metadata == {"path": slot.workspace_dir + "/src/a.txt", "size": 7}
        r = await call("read_file", {"path": slot.workspace_dir + "/src/a.txt"})
        assert r.output == "héllo\n"
        for path, err in (("nope.txt", "File not found: nope.txt"),
                          ("src", "Not a file: src"),
                          ("../../etc/passwd", "Access denied: path outside workspace"),
                          ("/etc/passwd", "Access denied: path outside workspace")):
            r = await call("read_file", {"path": path})
            assert (r.success, r.output, r.error) == (False, "", err), (path, r)
            check_result(r)
        await call("bash", {"command": "ln -s /etc/passwd link; head -c 100001 /dev/zero > big; "
                                       "head -c 100000 /dev/zero > edge"})
        r = await call("read_file", {"path": "link"})
        assert r.error == "Access denied: path outside workspace", r
        r = await call("read_file", {"path": "big"})
        assert r.error == "File too large: 100001 bytes (max 100000)", r
        r = await call("read_file", {"path": "edge"})
        assert r.success and len(r.output) == 100_000

        r = await call("write_file", {"path": "huge", "content": "x" * 100_001})
        assert (r.success, r.error) == (False, "Content too large: 100001 bytes (max 100000)")
        r = await call("write_file", {"path": "deep/er/f.txt", "content": "1"})
        assert r.output == "Successfully wrote 1 bytes to deep/er/f.txt"
        r = await call("write_file", {"path": "../x", "content": "1"})
        assert r.error == "Access denied: path outside workspace"
        r = await call("nonsense", {})
        assert (r.success, r.error) == (False, "Unknown tool: nonsense")

        # Nothing per-run in metadata: the same call twice, the same observation.
        a = await call("bash", {"command": "echo same"})
        b2 = await call("bash", {"command": "echo same"})
        assert (a.metadata == b2.metadata and a.output == b2.output)
        assert set(a.metadata) == {"exit_code", "sandboxed", "network_isolated"}
    run(lambda: with_executor(ctl.addr, body))


def test_slot_conventions_keep_the_richer_forms(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))

    async def main() -> None:
        b = ControllerToolBackend(ctl.addr, conventions="slot")
        await b.start()
        s = await b.acquire()
        r1, r2, r3 = await b.execute_batch([
            (s, "bash", {"command": "seq 1 100000; kill -9 $$"}),
            (s, "bash", {"command": "  echo ' x '"}),
            (s, "write_file", {"path": "f", "content": "x" * 200_000}),
        ], timeout_s=20)
        assert r1.error == "exit code 137 (signal 9)" and r1.metadata["signal"] == 9
        assert len(r1.output) == len("\n".join(str(i) for i in range(1, 100001))) + 1
        assert isinstance(r1.metadata["duration_ms"], int) and r1.metadata["isolation"]
        assert r2.output == " x \n" and r2.error == ""
        assert r3.success and r3.output == "wrote 200000 bytes to f"
        json.dumps([r.metadata for r in (r1, r2, r3)])
        await b.stop()
    run(main)


# ---------------------------------------------------------------- policy arguments

def _listener() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    return srv, srv.getsockname()[1]


def test_policy_arguments_are_understood(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))
    srv, port = _listener()
    probe = (f"{PY} -c \"import socket; socket.create_connection(('127.0.0.1', {port}), 3); "
             f"print('connected')\"")

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        r = await ex.execute("open", "bash", {"command": probe})
        assert (r.success, r.output) == (True, "connected"), r
        assert r.metadata["network_isolated"] is False
        r = await ex.execute("open", "bash", {"command": "echo ok", "background": False})
        assert r.output == "ok"
        r = await ex.execute("open", "terminal", {"command": "sleep 1", "background": True})
        assert r.error == "terminal background execution is not supported in sandbox"
        r = await ex.execute("open", "bash", {"command": "echo", "frobnicate": 1})
        assert not r.success and "frobnicate" in r.error, r
    run(lambda: with_executor(ctl.addr, body))

    async def closed(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        r = await ex.execute("closed", "bash", {"command": probe})
        assert not r.success and r.error.startswith("Exit code: "), r
        assert "connected" not in r.output
        assert r.metadata["network_isolated"] is True and r.metadata["sandboxed"] is True
        r = await ex.execute("closed", "bash", {"command": "echo still-works"})
        assert (r.success, r.output) == (True, "still-works")
    run(lambda: with_executor(ctl.addr, closed,
                              ExecutorConfig(allow_network=False, require_sandbox=True)))
    srv.close()


def test_a_policy_the_agent_cannot_enforce_fails_closed_with_the_trainers_text(
        controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1)
                             + "    local:\n      args: [--without, seccomp]\n")

    async def no_net(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        for name, args in (("terminal", {"command": "echo never"}),
                           ("terminal_stateful", {"command": "echo never"})):
            r = await ex.execute("n", name, args)
            assert not r.success and r.output == "", r
            assert r.error.startswith("Network isolation requested but "), r
            assert "seccomp" in r.error and check_result(r)
    run(lambda: with_executor(ctl.addr, no_net, ExecutorConfig(allow_network=False)))

    async def sandbox(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        r = await ex.execute("s", "bash", {"command": "echo never"})
        assert r.error.startswith("Sandboxing required but ") and "seccomp" in r.error, r
        r = await ex.execute("s", "tmux", {"action": "start"})
        assert r.output == "started", r  # require_stateful_sandbox false: best effort
    run(lambda: with_executor(ctl.addr, sandbox, ExecutorConfig(require_sandbox=True)))


# ---------------------------------------------------------------- the workload

def test_32_trajectories_through_the_executor(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=4, max=4))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 4, timeout=30)

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        async def trajectory(i: int) -> None:
            t = f"traj-{i}"
            r = await ex.execute(t, "write_file", {"path": f"pkg/mod{i}.py",
                                                   "content": f"def f():\n    return {i}\n"})
            assert check_result(r)["output"] == f"Successfully wrote 27 bytes to pkg/mod{i}.py" \
                or r.output.startswith("Successfully wrote "), r
            r = await ex.execute(t, "terminal", {"command": f"cd pkg && {PY} -c 'import mod{i}; "
                                                            f"print(mod{i}.f() * 2)'",
                                                 "timeout": 30})
            assert check_result(r)["output"] == str(2 * i), r
            r = await ex.execute(t, "terminal", {"command": "ls -A"})
            assert r.output == "pkg", r  # a fresh workspace: only this trajectory's files
            r = await ex.execute(t, "read_file", {"path": f"pkg/mod{i}.py"})
            assert r.output == f"def f():\n    return {i}\n"
            r = await ex.execute(t, "bash", {"command": f"exit {i % 3}"})
            assert (r.success, r.error) == (i % 3 == 0, "" if i % 3 == 0 else f"Exit code: {i % 3}")
            await ex.release_trajectory(t, reset_workspace=True)

        await asyncio.gather(*(trajectory(i) for i in range(32)))
        assert max(ex.batches) > 1, ex.batches  # calls of many trajectories share batches
        st = b.get_stats()
        json.dumps(st)
        assert st["started"] is True
    run(lambda: with_executor(ctl.addr, body))


def test_more_trajectories_than_slots_wait_and_all_finish(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1).replace("slots_per_agent: 8",
                                                               "slots_per_agent: 4"))

    async def main() -> None:
        b = ControllerToolBackend(ctl.addr, acquire_timeout_s=120)
        await b.start()
        order: list[int] = []

        async def trajectory(i: int) -> None:
            s = await b.acquire(trajectory_id=f"w{i}")
            order.append(i)
            [r] = await b.execute_batch([(s, "bash", {"command": f"ls -A; echo {i} > mine; "
                                                                 "sleep 0.2; cat mine"})])
            assert (r.success, r.output) == (True, str(i)), r
            await b.release(s, reset_workspace=True)

        tasks = []
        for i in range(16):
            tasks.append(asyncio.create_task(trajectory(i)))
            await asyncio.sleep(0.01)  # arrival order
        await asyncio.gather(*tasks)
        assert sorted(order) == list(range(16))
        assert order[4:] == sorted(order[4:]), order  # waiters served first come, first served
        await b.stop()
    run(main)


def test_waiting_acquires_in_one_executor_batch_are_served_by_scaling(
        controller_factory: Any) -> None:
    """The executor acquires for a whole batch with one gather: more new
    trajectories than free slots wait while the controller starts agents,
    and no call fails."""
    ctl = controller_factory(POOL.format(min=1, max=4).replace("slots_per_agent: 8",
                                                               "slots_per_agent: 4"))

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        rs = await asyncio.gather(*(ex.execute(f"s{i}", "bash", {"command": f"echo {i}"})
                                    for i in range(16)))
        assert [(r.success, r.output) for r in rs] == [(True, str(i)) for i in range(16)]
        assert len({s.alloc_id for s in ex.slots.values()}) == 4
    run(lambda: with_executor(ctl.addr, body))


def test_acquire_timeout_is_a_timeout_error_and_fails_only_its_batch(
        controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1).replace("slots_per_agent: 8",
                                                               "slots_per_agent: 1"))

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        r = await ex.execute("holder", "bash", {"command": "echo mine"})
        assert r.output == "mine"
        t0 = time.monotonic()
        r = await ex.execute("late", "bash", {"command": "echo never"})
        assert time.monotonic() - t0 >= 1.0
        assert not r.success and r.error.startswith("Failed to acquire slot: "), r
        assert "within 1 s" in r.error
        r = await ex.execute("holder", "bash", {"command": "echo still"})
        assert r.output == "still"
    run(lambda: with_executor(ctl.addr, body, acquire_timeout_s=1.0))


# ---------------------------------------------------------------- artifacts

def test_artifacts_as_the_executor_calls_them(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        t = "art"
        none = await ex.read_artifact(t, "x")
        assert none == {"success": False,
                        "error": "No active slot for trajectory (run a sandbox tool first)"}
        r = await ex.execute(t, "bash", {"command":
                                         "mkdir -p out/logs b && printf 'héllo' > out/r.json && "
                                         "seq 1 1000 > out/logs/run.log && touch b/z a && "
                                         "ln -s out lnk && printf '\\377' > bin.dat"})
        assert r.success, r
        a = await ex.read_artifact(t, "out/r.json", encoding="text", max_bytes=None,
                                   include_sha256=True)
        assert a["success"] and a["content"] == "héllo" and a["encoding"] == "text"
        assert (a["bytes"], a["file_size"], a["truncated"], a["path"]) == (6, 6, False,
                                                                          "out/r.json")
        assert a["mime"] == "application/json" and len(a["sha256"]) == 64
        a = await ex.read_artifact(t, "out/logs/run.log", max_bytes=10)
        assert (a["content"], a["truncated"], a["bytes"], a["sha256"]) == \
            ("1\n2\n3\n4\n5\n", True, 10, None)
        a = await ex.read_artifact(t, "bin.dat", encoding="base64")
        assert (a["content"], a["encoding"]) == ("/w==", "base64")
        a = await ex.read_artifact(t, "bin.dat")
        assert a["content"] == "\ufffd"
        for path, err in (("nope", "Not found: nope"), ("out", "Not a file: out"),
                          ("../x", "Access denied: path outside workspace"),
                          ("/etc/passwd", "Access denied: path outside workspace")):
            a = await ex.read_artifact(t, path)
            assert (a["success"], a["error"]) == (False, err), (path, a)

        ls = await ex.list_artifacts(t, ".", recursive=False, max_entries=None)
        assert ls["success"] and not ls["truncated"]
        assert [(e["path"], e["is_dir"]) for e in ls["entries"]] == \
            [("a", False), ("b", True), ("bin.dat", False), ("lnk", False), ("out", True)]
        ls = await ex.list_artifacts(t, ".", recursive=True)
        assert [e["path"] for e in ls["entries"]] == \
            ["a", "b", "b/z", "bin.dat", "lnk", "out", "out/logs", "out/logs/run.log",
             "out/r.json"]
        e = {x["path"]: x for x in ls["entries"]}["out/r.json"]
        assert e["size"] == 6 and isinstance(e["mtime"], float) and e["mtime"] > 1.6e9
        ls = await ex.list_artifacts(t, "out", recursive=True, max_entries=2)
        assert ls["truncated"] and [e["path"] for e in ls["entries"]] == ["out/logs",
                                                                          "out/logs/run.log"]
        ls = await ex.list_artifacts(t, "nope")
        assert (ls["success"], ls["error"]) == (False, "Not found: nope")

        import base64
        import io
        import tarfile
        ar = await ex.archive_artifacts(t, "out", archive_format="tar.gz", max_bytes=None,
                                        max_entries=None)
        assert ar["success"] and (ar["encoding"], ar["format"], ar["entry_count"]) == \
            ("base64", "tar.gz", 2)
        raw = base64.b64decode(ar["content"])
        assert len(raw) == ar["bytes"]
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tf:
            assert sorted(tf.getnames()) == ["out/logs/run.log", "out/r.json"]
            assert tf.extractfile("out/r.json").read() == "héllo".encode()  # type: ignore
        ar = await ex.archive_artifacts(t, ".", archive_format="tgz")
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(ar["content"])), mode="r:gz") as tf:
            assert sorted(tf.getnames()) == ["a", "b/z", "bin.dat", "out/logs/run.log",
                                             "out/r.json"]  # regular files only
        await ex.execute(t, "bash", {"command": "mkdir -p d && echo 1 > d/d"})
        for path, names in (("d", ["d/d"]), ("out/r.json", ["out/r.json"])):
            ar = await ex.archive_artifacts(t, path)
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(ar["content"])),
                              mode="r:gz") as tf:
                assert tf.getnames() == names, (path, tf.getnames())
        ar = await ex.archive_artifacts(t, "out", archive_format="zip")
        assert not ar["success"] and "zip" in ar["error"]
        ar = await ex.archive_artifacts(t, "out", max_bytes=10)
        assert not ar["success"] and ar["error"].startswith("Archive too large: ")
        assert ar["error"].endswith(" bytes (max 10)")
        ar = await ex.archive_artifacts(t, "../..")
        assert ar["error"] == "Access denied: path outside workspace"
    run(lambda: with_executor(ctl.addr, body))


# ---------------------------------------------------------------- one setting

FAKE_TRAINER = {
    "atropos/__init__.py": "",
    "atropos/backends/__init__.py": '''
        def create_tool_backend(cfg):
            if cfg.tool_pool_mode == "nomad":
                return ("nomad backend", cfg)
            raise ValueError(f"Unknown tool_pool_mode: {cfg.tool_pool_mode}")
    ''',
    "atropos/tools/__init__.py": "",
    "atropos/tools/base.py": '''
        import json
        from dataclasses import dataclass, field
        from typing import Optional

        @dataclass
        class ToolResult:
            success: bool
            output: str = ""
            error: str = ""
            metadata: dict = field(default_factory=dict)
            uniq_id: Optional[str] = None

            def to_xml(self):
                d = {"success": self.success, "output": self.output}
                if self.uniq_id:
                    d["uniq_id"] = self.uniq_id
                if self.error:
                    d["error"] = self.error
                if self.metadata:
                    d["metadata"] = self.metadata
                return "<tool_response>" + json.dumps(d) + "</tool_response>"
    ''',
    "atropos/envs/__init__.py": "",
    "atropos/envs/agent_env.py": '''
        from dataclasses import dataclass
        from atropos.backends import create_tool_backend

        @dataclass
        class AgentEnvConfig:
            tool_pool_mode: str = "nomad"

        class AgentEnv:
            def __init__(self, cfg):
                self.cfg = cfg

            async def _start_tool_backend(self):
                self.tool_backend = create_tool_backend(self.cfg)
                if hasattr(self.tool_backend, "start"):
                    await self.tool_backend.start()
                return self.tool_backend
    ''',
}


def test_one_setting_selects_slot_in_the_trainer(controller_factory: Any, tmp_path: Path,
                                                 monkeypatch: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))
    for rel, src in FAKE_TRAINER.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SLOT_CONTROLLER", ctl.addr)
    import importlib

    import slot_client.atropos as compat
    agent_env = importlib.import_module("atropos.envs.agent_env")
    base = importlib.import_module("atropos.tools.base")
    try:
        # The three lines of controller/python/README.md:
        compat.install()
        cfg = agent_env.AgentEnvConfig(tool_pool_mode="slot")

        async def main() -> None:
            env = agent_env.AgentEnv(cfg)
            backend = await env._start_tool_backend()
            assert isinstance(backend, ControllerToolBackend)
            s = await backend.acquire(trajectory_id=str(uuid.uuid4()))
            [r] = await backend.execute_batch([(s, "bash", {"command": "echo hi"})])
            tr = r.to_tool_result()
            assert isinstance(tr, base.ToolResult)  # the trainer's own class
            assert json.loads(tr.to_xml()[15:-16])["output"] == "hi"
            await backend.release(s, reset_workspace=True)
            await backend.stop(purge=True)
        run(main)
        assert agent_env.AgentEnv(agent_env.AgentEnvConfig()).cfg.tool_pool_mode == "nomad"
        assert agent_env.create_tool_backend(agent_env.AgentEnvConfig())[0] == "nomad backend"
        with pytest.raises(ValueError):
            agent_env.create_tool_backend(agent_env.AgentEnvConfig(tool_pool_mode="x"))
        compat.install()  # idempotent
    finally:
        compat.uninstall()
        for m in [m for m in sys.modules if m == "atropos" or m.startswith("atropos.")]:
            del sys.modules[m]


# ---------------------------------------------------------------- leases cannot leak

TRAINER_THAT_DIES = """
import asyncio, sys
sys.path.insert(0, {pypath!r})
from slot_client import ControllerToolBackend

async def main():
    b = ControllerToolBackend({addr!r})
    await b.start()
    slots = [await b.acquire(trajectory_id=f"doomed-{{i}}") for i in range(3)]
    rs = await b.execute_batch([(s, "bash", {{"command": "echo kept > f; sleep 3171 & "
                                "echo started", "keep_background": True}}) for s in slots])
    assert all(r.output == "started" for r in rs), rs
    print("ready", flush=True)
    await asyncio.sleep(300)

asyncio.run(main())
"""


def test_a_killed_trainers_leases_come_back_after_the_grace(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1).replace("slots_per_agent: 8",
                                                               "slots_per_agent: 3"))
    code = TRAINER_THAT_DIES.format(pypath=str(ROOT / "controller" / "python"), addr=ctl.addr)
    p = subprocess.Popen([PY, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"

        async def leases() -> list[dict[str, Any]]:
            c = await AsyncClient.connect(ctl.addr)
            try:
                return await c.leases()
            finally:
                await c.close()
        assert subprocess.run(["pgrep", "-f", "sleep 3171"], capture_output=True).returncode == 0
        held = run(leases)
        assert len(held) == 3 and len({x["owner"] for x in held}) == 1, held
        assert held[0]["owner"].startswith("slot_client-")
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        deadline = time.monotonic() + 0.5  # the controller sees the EOF on its own time
        after = run(leases)
        while not all("grace_left_ms" in x for x in after) and time.monotonic() < deadline:
            time.sleep(0.02)
            after = run(leases)
        assert len(after) == 3 and all(0 < x["grace_left_ms"] <= 1000 for x in after), after
        deadline = time.monotonic() + 15
        while run(leases) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run(leases) == []

        async def fresh() -> None:
            b = ControllerToolBackend(ctl.addr)
            await b.start()
            slots = [await b.acquire() for _ in range(3)]
            rs = await b.execute_batch([(s, "bash", {"command": "ls -A"}) for s in slots])
            assert all(r.success and r.output == "" for r in rs), rs  # emptied by the reset
            await b.stop()
        run(fresh)
        left = subprocess.run(["pgrep", "-f", "sleep 3171"], capture_output=True, text=True)
        assert left.stdout == "", "the dead trainer's background processes outlived the grace"
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


# ---------------------------------------------------------------- stateful tools

def test_stateful_tools_and_every_tmux_argument(controller_factory: Any) -> None:
    ctl = controller_factory(POOL.format(min=1, max=1))

    async def body(ex: NoteExecutor, b: ControllerToolBackend) -> None:
        t = "tty"
        st = lambda cmd, **kw: ex.execute(t, "terminal_stateful",  # noqa: E731
                                          {"command": cmd, **kw})
        tmux = lambda **a: ex.execute(t, "tmux", a)  # noqa: E731
        r = await st("mkdir -p d && cd d && export V=7", timeout=10)
        assert (r.success, r.output, r.error) == (True, "", ""), r
        assert r.metadata["stateful"] is True and json.dumps(r.metadata)
        r = await st("echo $V $(basename $PWD); echo e >&2; (exit 4)")
        assert (r.success, r.output, r.error) == (False, "7 d\n\n[stderr]\ne", "Exit code: 4"), r
        r = await st("sleep 30", timeout=2)
        assert (r.success, r.output, r.error) == (False, "", "Command timed out after 2.0s")
        assert r.metadata == {"exit_code": -1, "timeout": True, "stateful": True}

        o = check_result(await tmux(action="start", pane_width=30, pane_height=10))
        assert o["output"] == "started"
        r = await tmux(action="send_keys", keys=["sleep 1; echo blocked-done"], block=True,
                       max_wait_s=20)
        assert (r.success, r.output) == (True, "ok"), r
        r = await tmux(action="capture")
        assert "blocked-done" in r.output.splitlines(), r.output
        assert len(r.output.split("\n")) == 10 and max(map(len, r.output.split("\n"))) <= 30
        r = await tmux(action="CAPTURE")
        assert r.success and "blocked-done" in r.output
        r = await tmux()  # no action: capture
        assert r.success and "blocked-done" in r.output
        t0 = time.monotonic()
        r = await tmux(action="send_keys", keys=["true", "Enter"], min_wait_s=1.0)
        assert r.output == "ok" and time.monotonic() - t0 >= 1.0
        await tmux(action="send_keys", keys=["seq 1 500", "Enter"], block=True)
        r = await tmux(action="capture")
        assert "1" not in r.output.split("\n")  # scrolled off the 10-row screen
        r = await tmux(action="capture", capture_entire=True)
        lines = r.output.split("\n")
        assert "1" in lines and "500" in lines, r.output[:300]

        first = await tmux(action="stream", reset=True)
        assert first.success and "blocked-done" in first.output
        assert isinstance(first.metadata["offset"], int)
        await tmux(action="send_keys", keys=["echo stream-next", "Enter"], block=True)
        nxt = await tmux(action="stream")
        assert "stream-next" in nxt.output and "blocked-done" not in nxt.output
        again = await tmux(action="stream", reset=True, max_bytes=40)
        assert 0 < len(again.output.encode()) <= 40 and again.output.endswith("\n")

        r = await tmux(action="send_keys", keys=["sleep 30"], block=True, max_wait_s=1.0)
        assert (r.success, r.error) == (False, "tmux blocked keys timed out after 1.0s"), r
        r = await tmux(action="capture")  # a fresh terminal after the timeout
        assert r.success and "sleep 30" not in r.output
        r = await tmux(action="stop")
        assert (r.success, r.output) == (True, "stopped")
        r = await tmux(action="stop")
        assert (r.success, r.output) == (True, "stopped")
        r = await tmux(action="capture")
        assert r.success, r
        r = await tmux(action="dance")
        assert not r.success and "dance" in r.error
        r = await tmux(action="send_keys", keys="x", frobnicate=True)
        assert not r.success and "frobnicate" in r.error
        for res in (first, nxt, again):
            check_result(res)
    run(lambda: with_executor(ctl.addr, body))
