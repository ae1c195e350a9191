"""slot_client (AsyncClient, ControllerToolBackend) and the example trainer
against a real slot-controller with local agents."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "controller" / "python"))

from slot_client import (  # noqa: E402
    AsyncClient,
    ConnectError,
    ConnectionLost,
    ControllerToolBackend,
    Slot,
    SlotError,
)

TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"
HANDLE_RE = re.compile(r"^[^/]+/\d+/\d+$")
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 120.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)
    return asyncio.run(main())


async def wait_for_status(addr: str, pred: Callable[[dict[str, Any]], bool],
                          timeout: float = 15.0) -> dict[str, Any]:
    c = await AsyncClient.connect(addr)
    try:
        deadline = time.monotonic() + timeout
        while True:
            st = await c.status()
            if pred(st):
                return st
            if time.monotonic() > deadline:
                raise AssertionError(f"status condition not met: {st}")
            await asyncio.sleep(0.05)
    finally:
        await c.close()


# ---------------------------------------------------------------- AsyncClient

def test_async_client_hello_status_profiles(controller: Any) -> None:
    async def main() -> None:
        c = await AsyncClient.connect(controller.addr)
        info = c.server_info
        assert info["protocol"] == 1 and info["server"] == "slot-controller"
        assert "default" in info["profiles"] and info["default_profile"] == "default"
        st = await c.status()
        assert st["agents"]["ready"] >= 1 and st["slots"]["total"] >= 4
        profiles = await c.profiles()
        assert [p["name"] for p in profiles] == ["default"]
        assert profiles[0]["slots_per_agent"] == 4
        agents = await c.agents()
        assert agents and agents[0]["profile"] == "default"
        with pytest.raises(SlotError) as ei:
            await c.call("no_such_op", {})
        assert ei.value.code == "unknown_op"
        with pytest.raises(SlotError) as ei:
            await c.acquire(profile="no-such-profile", timeout_ms=0)
        assert ei.value.code == "bad_request"
        await c.close()
    run(main)


def test_async_client_stream_events(controller: Any) -> None:
    async def main() -> None:
        c = await AsyncClient.connect(controller.addr)
        acq = await c.acquire(trajectory_id="stream-1")
        events: list[dict[str, Any]] = []
        res = await c.exec(acq["slot"], "bash",
                           {"command": "echo one; echo two >&2; echo three", "stream": True},
                           on_event=events.append)
        assert res["exit_code"] == 0
        kinds = [e["event"] for e in events]
        assert kinds[0] == "started"
        out = b"".join(e["data"] for e in events if e["event"] == "stdout")
        err = b"".join(e["data"] for e in events if e["event"] == "stderr")
        assert out == b"one\nthree\n" and err == b"two\n"
        await c.release(acq["slot"])
        await c.close()
    run(main)


# ---------------------------------------------------------------- ToolBackend

def test_acquire_release(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr)
        await b.start()
        slot = await b.acquire("traj-acq-1")
        assert isinstance(slot, Slot)
        assert HANDLE_RE.match(slot.slot_id), slot.slot_id
        assert slot.state == "acquired" and slot.trajectory_id == "traj-acq-1"
        assert slot.slot_id.startswith(slot.alloc_id + "/")
        assert slot.workspace_dir.startswith("/") and slot.container_addr
        assert slot.metadata["profile"] == "default"
        assert slot.slot_id == (f"{slot.alloc_id}/{slot.metadata['index']}/"
                                f"{slot.metadata['generation']}")
        anon = await b.acquire()
        assert anon.trajectory_id and anon.slot_id != slot.slot_id
        st = await wait_for_status(controller.addr, lambda s: s["slots"]["leased"] == 2)
        assert st["slots"]["leased"] == 2
        assert {s.slot_id for s in b.acquired_slots} == {slot.slot_id, anon.slot_id}

        await b.release(slot, reset_workspace=True)
        assert slot.state == "available" and slot.trajectory_id is None
        await b.release(anon)
        await wait_for_status(controller.addr, lambda s: s["slots"]["leased"] == 0)
        await b.release(slot)  # released before: a logged no-op, never an exception
        assert b.acquired_slots == []
        await b.stop()
    run(main)


def test_stop_purge_releases_everything(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr)
        await b.start()
        slots = [await b.acquire(f"purge-{i}") for i in range(3)]
        await b.execute_batch([(s, "write_file", {"path": "x", "content": "1"}) for s in slots])
        await wait_for_status(controller.addr, lambda s: s["slots"]["leased"] == 3)
        await b.stop(purge=True)
        assert all(s.state == "available" for s in slots)
        await wait_for_status(controller.addr, lambda s: s["slots"]["leased"] == 0)
        # purge released with reset: whoever gets those slots finds them empty
        b2 = ControllerToolBackend(controller.addr)
        await b2.start()
        again = [await b2.acquire(f"after-{i}") for i in range(4)]
        rs = await b2.execute_batch([(s, "bash", {"command": "ls -A"}) for s in again])
        assert [r.output for r in rs] == [""] * 4, [r.output for r in rs]
        await b2.stop(purge=True)
    run(main)


def test_execute_batch_mixed_tools_in_order(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr, conventions="slot")
        await b.start()
        slot = await b.acquire("mixed-1")
        text = "h\u00e9llo w\u00f6rld\nline 2\n"
        blob = bytes(range(256))
        rs = await b.execute_batch([
            (slot, "write_file", {"path": "sub/dir/a.txt", "content": text}),
            (slot, "write_file", {"path": "blob.bin", "content": blob}),
            (slot, "bash", {"command": "cat sub/dir/a.txt; echo oops >&2; exit 3"}),
            (slot, "bash", {"command": "echo only-err >&2"}),
            (slot, "bash", {"command": "wc -c < blob.bin; sha256sum blob.bin"}),
            (slot, "read_file", {"path": "sub/dir/a.txt"}),
            (slot, "bash", {"command": "echo appended >> sub/dir/a.txt && echo ok"}),
            (slot, "read_file", {"path": "sub/dir/a.txt"}),
            (slot, "bash", {"command": "kill -9 $$"}),
            (slot, "read_file", {"path": "missing.txt"}),
        ])
        assert len(rs) == 10
        w1, w2, b1, b2, b3, r1, b4, r2, b5, r3 = rs
        n = len(text.encode())
        assert (w1.success, w1.output, w1.error) == (True, f"wrote {n} bytes to sub/dir/a.txt",
                                                     "")
        assert w1.metadata["size"] == n
        assert w1.metadata["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert w2.success and w2.output == "wrote 256 bytes to blob.bin"

        assert b1.success is False and b1.error == "exit code 3"
        assert b1.output == text + "\n[stderr]\noops\n"
        assert b1.metadata["exit_code"] == 3 and b1.metadata["timed_out"] is False
        assert isinstance(b1.metadata["isolation"], list)
        assert isinstance(b1.metadata["duration_ms"], int) and b1.metadata["signal"] == 0

        assert (b2.success, b2.output, b2.error) == (True, "only-err\n", "")
        assert b3.success and b3.output == (
            f"256\n{hashlib.sha256(blob).hexdigest()}  blob.bin\n")
        assert (r1.success, r1.output, r1.error) == (True, text, "")
        assert r1.metadata["size"] == n
        json.dumps([r.metadata for r in rs])  # no bytes in metadata
        assert b4.success and b4.output == "ok\n"
        assert r2.output == text + "appended\n"
        assert b5.success is False and b5.metadata["exit_code"] == 137
        assert b5.metadata["signal"] == 9 and b5.error.startswith("exit code 137")
        assert (r3.success, r3.output) == (False, "")
        assert r3.error is not None and r3.error.startswith("not_found: ")
        assert r3.metadata["code"] == "not_found"
        assert all(r.slot_id == slot.slot_id for r in rs)
        assert len({r.execution_id for r in rs}) == len(rs)
        await b.stop(purge=True)
    run(main)


def test_execute_batch_timeout(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr, conventions="slot")
        await b.start()
        slot = await b.acquire("timeout-1")
        t0 = time.monotonic()
        r1, r2 = await b.execute_batch([(slot, "bash", {"command": "echo start; sleep 30"}),
                                        (slot, "bash", {"command": "echo next"})],
                                       timeout_s=0.5)
        assert time.monotonic() - t0 < 20
        assert r1.success is False and r1.metadata["timed_out"] is True
        assert r1.error == "timed out after 500 ms" and r1.output.startswith("start\n")
        assert r2.success and r2.output == "next\n"
        [r3] = await b.execute_batch([(slot, "bash", {"command": "sleep 30",
                                                      "timeout_ms": 300})])
        assert r3.metadata["timed_out"] is True and r3.error == "timed out after 300 ms"
        await b.stop(purge=True)
    run(main)


def test_per_request_error_does_not_fail_others(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr, conventions="slot")
        await b.start()
        live = await b.acquire("live-1")
        gone = await b.acquire("gone-1")
        await b.release(gone)
        rs = await b.execute_batch([
            (live, "bash", {"command": "echo before"}),
            (gone, "bash", {"command": "echo never"}),
            (live, "write_file", {"path": "f", "content": "x"}),
            (gone, "read_file", {"path": "f"}),
            ("no-such-agent/0/1", "bash", {"command": "true"}),
            (live, "read_file", {"path": "f"}),
        ])
        assert [r.success for r in rs] == [True, False, True, False, False, True]
        assert rs[0].output == "before\n" and rs[5].output == "x"
        for r in (rs[1], rs[3], rs[4]):
            assert r.output == "" and r.metadata["code"] == "not_leased", r
            assert r.error is not None and r.error.startswith("not_leased: ")
        assert rs[1].slot_id == gone.slot_id
        await b.stop(purge=True)
    run(main)


def test_artifacts(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr)
        await b.start()
        slot = await b.acquire("artifacts-1")
        big = b"0123456789" * 1000
        files = {"out/result.json": b'{"reward": 1.0}\n', "out/logs/run.log": big,
                 "README": "caf\u00e9\n".encode()}
        rs = await b.execute_batch([(slot, "write_file", {"path": p, "content": d.decode()})
                                    for p, d in files.items()])
        assert all(r.success for r in rs), rs

        a = await b.read_artifact(slot, "out/result.json", include_sha256=True)
        assert a["success"] is True and a["error"] == ""
        assert a["content"] == '{"reward": 1.0}\n' and a["path"] == "out/result.json"
        assert a["file_size"] == a["bytes"] == len(files["out/result.json"])
        assert a["truncated"] is False and a["mime"] == "application/json"
        assert a["sha256"] == hashlib.sha256(files["out/result.json"]).hexdigest()

        t = await b.read_artifact(slot, "out/logs/run.log", max_bytes=100, encoding="base64")
        assert t["success"] and t["truncated"] is True and t["file_size"] == len(big)
        assert base64.b64decode(t["content"]) == big[:100] and t["sha256"] is None

        missing = await b.read_artifact(slot, "nope.txt")
        assert (missing["success"], missing["error"]) == (False, "Not found: nope.txt")
        escape = await b.read_artifact(slot, "../../etc/passwd")
        assert escape["error"] == "Access denied: path outside workspace"

        ls = await b.list_artifacts(slot, recursive=True)
        assert ls["success"] and ls["truncated"] is False and ls["error"] == ""
        assert [e["path"] for e in ls["entries"]] == ["README", "out", "out/logs",
                                                      "out/logs/run.log", "out/result.json"]
        paths = {e["path"]: e for e in ls["entries"]}
        assert paths["out/logs/run.log"]["size"] == len(big)
        assert paths["out"]["is_dir"] is True and paths["README"]["is_dir"] is False
        sub = await b.list_artifacts(slot, "out/logs")
        assert [e["path"] for e in sub["entries"]] == ["out/logs/run.log"]
        bad = await b.list_artifacts(slot, "nope")
        assert (bad["success"], bad["error"]) == (False, "Not found: nope")

        ar = await b.archive_artifacts(slot, "out")
        assert ar["success"] and ar["error"] == "" and ar["format"] == "tar.gz"
        data = base64.b64decode(ar["content"])
        assert ar["bytes"] == len(data) and ar["entry_count"] == 2
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            got = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers()}
        assert got == {"out/result.json": files["out/result.json"], "out/logs/run.log": big}
        whole = await b.archive_artifacts(slot)
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(whole["content"])),
                          mode="r:gz") as tar:
            assert set(tar.getnames()) == set(files)
        nope = await b.archive_artifacts(slot, "nope")
        assert (nope["success"], nope["content"], nope["error"]) == (False, "", "Not found: nope")
        await b.stop(purge=True)
    run(main)


def test_pipelining_many_batches_on_one_connection(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr, conventions="slot")
        await b.start()
        slots = [await b.acquire(f"pipe-{i}") for i in range(4)]
        client = b.client
        assert client is not None

        async def one(i: int) -> list[Any]:
            s = slots[i % len(slots)]
            return await b.execute_batch([
                (s, "write_file", {"path": f"f{i}.txt", "content": f"value {i}\n"}),
                (s, "bash", {"command": f"cat f{i}.txt; echo n={i}"}),
            ])

        t0 = time.monotonic()
        results = await asyncio.gather(*(one(i) for i in range(50)))
        elapsed = time.monotonic() - t0
        for i, (w, r) in enumerate(results):
            assert w.success, w
            assert r.success and r.output == f"value {i}\nn={i}\n", r
        assert b.client is client  # one connection throughout
        assert client.pending_count == 0

        # A slow command on one slot does not hold up answers for another.
        slow = asyncio.create_task(b.execute_batch([(slots[0], "bash",
                                                     {"command": "sleep 1.5; echo slow"})]))
        await asyncio.sleep(0.1)
        t1 = time.monotonic()
        [quick] = await b.execute_batch([(slots[1], "bash", {"command": "echo quick"})])
        assert quick.output == "quick\n" and time.monotonic() - t1 < 1.0
        assert not slow.done()
        [s] = await slow
        assert s.output == "slow\n"
        await b.stop(purge=True)
        assert elapsed < 60
    run(main)


def test_connect_to_missing_socket(tmp_path: Path) -> None:
    addr = f"unix:{tmp_path}/no-controller.sock"

    async def main() -> None:
        with pytest.raises(ConnectError) as ei:
            await AsyncClient.connect(addr)
        assert ei.value.code == "connect_failed" and addr in str(ei.value)
        b = ControllerToolBackend(addr)
        with pytest.raises(ConnectError):
            await b.start()
    run(main)
    proc = subprocess.run([sys.executable, str(TRAINER), "--address", addr,
                           "--trajectories", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "connect_failed" in proc.stderr


def test_token_required(controller_factory: Callable[..., Any], tmpdir_short: Path) -> None:
    token_file = tmpdir_short / "token"
    token_file.write_text("s3cret-token")
    token_file.chmod(0o600)
    ctl = controller_factory(extra=["--token-file", str(token_file)], wait_ready=False)

    async def main() -> None:
        c = await AsyncClient.connect(ctl.addr)
        assert c.server_info["auth_required"] is True
        assert c.server_info["authenticated"] is False
        with pytest.raises(SlotError) as ei:
            await c.status()
        assert ei.value.code == "unauthorized"
        await c.close()
        with pytest.raises(SlotError) as ei:
            await AsyncClient.connect(ctl.addr, token="wrong")
        assert ei.value.code == "unauthorized"
        b = ControllerToolBackend(ctl.addr, token="s3cret-token")
        await b.start()
        assert b.client is not None and b.client.server_info["authenticated"] is True
        slot = await b.acquire("tok-1")
        [r] = await b.execute_batch([(slot, "bash", {"command": "echo authed"})])
        assert r.output == "authed"  # the trainer's conventions: stripped
        await b.stop(purge=True)
    run(main)


def test_connection_lost_on_controller_death(controller: Any) -> None:
    async def main() -> None:
        c = await AsyncClient.connect(controller.addr)
        acq = await c.acquire(trajectory_id="doomed-1")
        call = asyncio.create_task(c.exec(acq["slot"], "bash", {"command": "sleep 30"}))
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(None, controller.kill9)
        with pytest.raises(ConnectionLost) as ei:
            await asyncio.wait_for(call, 10)
        assert ei.value.code == "connection_lost"
        with pytest.raises(ConnectionLost):
            await c.status()
        await c.close()
    run(main)


SOCKET_AGENTS_CONFIG = """
profiles:
  default:
    slots_per_agent: 4
    min_agents: 1
    max_agents: 1
    local:
      mode: socket
"""


def test_backend_reconnects_across_controller_restart(controller_factory: Callable[..., Any]
                                                      ) -> None:
    ctl = controller_factory(SOCKET_AGENTS_CONFIG)

    async def main() -> None:
        b = ControllerToolBackend(ctl.addr)
        await b.start()
        slot = await b.acquire("survivor-1")
        [w] = await b.execute_batch([(slot, "write_file", {"path": "keep.txt",
                                                           "content": "kept\n"})])
        assert w.success, w
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, ctl.kill9)
        [down] = await b.execute_batch([(slot, "bash", {"command": "true"})])
        assert down.success is False
        assert down.metadata["code"] in ("connection_lost", "connect_failed"), down
        await loop.run_in_executor(None, ctl.start)
        # The next call reconnects; the handle from before the restart still works.
        [r, e] = await b.execute_batch([(slot, "read_file", {"path": "keep.txt"}),
                                        (slot, "bash", {"command": "cat keep.txt"})])
        assert (r.success, r.output) == (True, "kept\n"), r
        assert (e.success, e.output) == (True, "kept"), e
        await b.release(slot, reset_workspace=True)
        await b.stop()
    run(main)


# ---------------------------------------------------------------- example trainer

def test_example_trainer(controller: Any) -> None:
    proc = subprocess.run(
        ["/usr/bin/python3", str(TRAINER), "--address", controller.addr,
         "--trajectories", "24", "--concurrency", "6", "--steps", "7"],
        capture_output=True, text=True, timeout=180, cwd="/")
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert re.search(r"^trajectories:\s+24 \(24 ok, 0 failed\)", out, re.M), out
    # per trajectory: 2 writes + 7 bash + 1 read
    assert re.search(r"^tool calls:\s+240$", out, re.M), out
    for label in ("trajectories/s:", "tool calls/s:", "latency p50:", "latency p99:"):
        assert label in out
    assert re.search(r"^errors:\s+0$", out, re.M), out
    st = controller.status()
    assert st["slots"]["leased"] == 0 or _eventually_unleased(controller)


def _eventually_unleased(controller: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if controller.status()["slots"]["leased"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_bash_stateful_and_tmux_tools_map_onto_sessions(controller: Any) -> None:
    async def main() -> None:
        b = ControllerToolBackend(controller.addr)
        await b.start()
        s1 = await b.acquire("stateful-1")
        s2 = await b.acquire("stateful-2")
        rs = await b.execute_batch([
            (s1, "bash_stateful", {"command": "mkdir -p d && cd d && export V=7 && f() { echo f$1; }"}),
            (s1, "bash_stateful", {"command": "echo $V $(basename $PWD); f 1"}),
            (s2, "bash_stateful", {"command": "echo ${V:-unset}"}),
            (s1, "bash_stateful", {"command": "sleep 30", "timeout": 0.5}),
            (s1, "bash_stateful", {"command": "echo still $V; (exit 3)"}),
            (s2, "bash_stateful", {"command": "exit 4"}),
            (s2, "bash_stateful", {"command": "echo new shell ${V:-unset}"}),
        ])
        assert [r.success for r in rs] == [True, True, True, False, False, False, True], rs
        assert rs[1].output == "7 d\nf1"
        assert rs[2].output == "unset"  # another slot, another shell
        assert rs[3].error == "Command timed out after 0.5s"
        assert rs[4].output == "still 7" and rs[4].metadata["exit_code"] == 3
        assert rs[4].error == "Exit code: 3" and rs[4].metadata["stateful"] is True
        assert rs[6].output == "new shell unset"  # `exit` ended s2's shell: a new one
        # tmux: a terminal driven with keys, read back as a screen
        r = await b.execute(s1, "tmux", {"action": "start", "pane_width": 60, "pane_height": 12})
        assert r.success, r
        r = await b.execute(s1, "tmux", {"action": "send_keys",
                                         "keys": ["printf 'x%sy\\n' 1 2", "Enter"]})
        assert r.success, r
        deadline = time.monotonic() + 10
        while True:
            cap = await b.execute(s1, "tmux", {"action": "capture"})
            assert cap.success, cap
            if "x1y" in cap.output.splitlines() and "x2y" in cap.output.splitlines():
                break
            assert time.monotonic() < deadline, cap.output
            await asyncio.sleep(0.05)
        assert len(cap.output.split("\n")) == 12
        await b.execute(s1, "tmux", {"action": "send_keys", "keys": ["sleep 100", "Enter"]})
        await asyncio.sleep(0.3)
        r = await b.execute(s1, "tmux", {"action": "send_keys", "keys": "C-c"})
        assert r.success
        r = await b.execute(s1, "tmux", {"action": "stop"})
        assert (r.success, r.output) == (True, "stopped")
        r = await b.execute(s1, "tmux", {"action": "capture"})
        assert r.success, r  # a fresh terminal, as the trainer's server does
        r = await b.execute(s1, "tmux", {"action": "dance"})
        assert not r.success and r.metadata["code"] == "bad_request"
        await b.release(s1)   # no reset: the agent's unlease closes its sessions
        await b.release(s2, reset_workspace=True)
        await b.stop()
    run(main)
