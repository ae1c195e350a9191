"""`ControllerToolBackend`: the ToolBackend shape RL trainers use, on top of
slot-controller. One connection carries every trajectory's calls."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from .client import AsyncClient
from .errors import SlotError
from .wire import MAX_FRAME


@dataclass
class Slot:
    """A leased workspace. `slot_id` is the controller's handle."""

    slot_id: str
    alloc_id: str
    container_addr: str
    workspace_dir: str
    state: str = "acquired"
    trajectory_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExecutionResult:
    """The outcome of one tool call."""

    success: bool
    output: str
    error: str | None
    execution_id: str
    slot_id: str
    metadata: dict[str, Any] = field(default_factory=dict)


SlotRef = Union[Slot, str]
ToolCall = tuple[SlotRef, str, Mapping[str, Any]]


def _handle(slot: SlotRef) -> str:
    return slot.slot_id if isinstance(slot, Slot) else slot


def _decode(data: Any) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    if data is None:
        return ""
    return str(data)


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if data is None:
        return b""
    return str(data).encode("utf-8")


def _error_text(code: str, message: str) -> str:
    return f"{code}: {message}" if message else code


class ControllerToolBackend:
    """Slots from slot-controller, tool calls batched into `batch` requests.

    >>> backend = ControllerToolBackend("unix:/run/user/1000/slot-controller.sock")
    >>> await backend.start()
    >>> slot = await backend.acquire("traj-1")
    >>> [res] = await backend.execute_batch([(slot, "bash", {"command": "ls"})])
    >>> await backend.release(slot, reset_workspace=True)
    >>> await backend.stop()

    After a lost connection (e.g. a controller restart) the next call
    reconnects; handles stay valid when the controller kept its agents.
    """

    def __init__(self, address: str | None = None, profile: str | None = None,
                 token: str | None = None, *, acquire_timeout_ms: int | None = None,
                 client_name: str = "slot_client.ControllerToolBackend",
                 max_frame: int = MAX_FRAME) -> None:
        self.address: str | None = address
        self.profile: str | None = profile
        self.token: str | None = token
        self.acquire_timeout_ms: int | None = acquire_timeout_ms
        self.client_name: str = client_name
        self.max_frame: int = max_frame
        self._client: AsyncClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._started = False
        self._slots: dict[str, Slot] = {}

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Connect (raises ConnectError when the controller is unreachable)."""
        self._started = True
        await self._get_client()

    async def stop(self, purge: bool = False) -> None:
        """Close the connection. With `purge`, first release (with reset)
        every slot this backend acquired and has not released."""
        if purge and self._slots:
            slots = list(self._slots.values())
            await asyncio.gather(*(self.release(s, reset_workspace=True) for s in slots),
                                 return_exceptions=True)
        self._started = False
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    async def __aenter__(self) -> "ControllerToolBackend":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(purge=True)

    @property
    def client(self) -> AsyncClient | None:
        """The current connection (None before start / after stop)."""
        return self._client

    @property
    def acquired_slots(self) -> list[Slot]:
        return list(self._slots.values())

    async def _get_client(self) -> AsyncClient:
        client = self._client
        if client is not None and not client.closed:
            return client
        if not self._started:
            raise SlotError("not_started", "ControllerToolBackend.start() was not called "
                                           "(or stop() was)")
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            client = self._client
            if client is None or client.closed:
                client = await AsyncClient.connect(self.address, self.token,
                                                   client_name=self.client_name,
                                                   max_frame=self.max_frame)
                self._client = client
            return client

    # ------------------------------------------------------------ slots
    async def acquire(self, trajectory_id: str | None = None) -> Slot:
        """Lease a slot for a trajectory (raises SlotError, e.g. no_capacity)."""
        client = await self._get_client()
        res = await client.acquire(trajectory_id=trajectory_id, profile=self.profile,
                                   timeout_ms=self.acquire_timeout_ms)
        slot = Slot(
            slot_id=str(res["slot"]),
            alloc_id=str(res.get("agent", "")),
            container_addr=str(res.get("address", "")),
            workspace_dir=str(res.get("workspace", "")),
            state="acquired",
            trajectory_id=res.get("trajectory_id", trajectory_id),
            metadata={"index": res.get("index"), "generation": res.get("generation"),
                      "profile": res.get("profile"), "acquire_result": res},
        )
        self._slots[slot.slot_id] = slot
        return slot

    async def release(self, slot: SlotRef, reset_workspace: bool = False) -> None:
        """Give the slot back. With `reset_workspace` its processes are killed
        and its workspace emptied before anyone else gets it. Raises SlotError
        (e.g. not_leased for a stale handle); the slot is marked released
        either way."""
        handle = _handle(slot)
        try:
            client = await self._get_client()
            await client.release(handle, reset=reset_workspace)
        finally:
            tracked = self._slots.pop(handle, None)
            for s in (slot, tracked):
                if isinstance(s, Slot):
                    s.state = "released"

    # ------------------------------------------------------------ tools
    def _build_request(self, slot: SlotRef, tool: str,
                       args: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The batch entry for one call, and local context for its result."""
        handle = _handle(slot)
        ctx: dict[str, Any] = {"tool": tool}
        a = dict(args)
        if tool == "tmux":
            ctx["action"] = a.get("action")
        elif tool == "bash_stateful":
            # the controller takes `timeout` in seconds; kept for the error text
            if "timeout" in a:
                ctx["timeout_ms"] = int(float(a["timeout"]) * 1000)
            elif "timeout_ms" in a:
                ctx["timeout_ms"] = a["timeout_ms"]
        elif tool == "bash":
            if "timeout" in a and "timeout_ms" not in a:  # seconds, for convenience
                a["timeout_ms"] = int(float(a.pop("timeout")) * 1000)
            if "stdin" in a and isinstance(a["stdin"], str):
                a["stdin"] = a["stdin"].encode("utf-8")
            ctx["timeout_ms"] = a.get("timeout_ms")
        elif tool == "read_file":
            ctx["path"] = a.get("path")
        elif tool == "write_file":
            if "content" in a:
                a["data"] = _as_bytes(a.pop("content"))
            elif "data" in a:
                a["data"] = _as_bytes(a["data"])
            ctx["path"] = a.get("path")
            ctx["length"] = len(a.get("data", b""))
        return {"slot": handle, "tool": tool, "args": a}, ctx

    async def execute_batch(self, calls: Sequence[ToolCall],
                            timeout_s: float | None = None) -> list[ExecutionResult]:
        """Run the calls as one controller `batch` (calls on one slot run in
        order, different slots in parallel). Returns one ExecutionResult per
        call, in order; failures are results, never exceptions."""
        if not calls:
            return []
        timeout_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
        # The controller answers `timeout` 5 s after the command timeout; allow more.
        guard = None if timeout_s is None else timeout_s + 30.0
        # The controller runs a slot's bash_stateful and tmux calls in
        # order, but not in order with the slot's other tools: with those
        # tools, go in rounds that hold at most one call per slot (order per
        # slot kept, slots in parallel).
        rounds: list[list[int]] = [list(range(len(calls)))]
        if any(tool in ("bash_stateful", "tmux") for _, tool, _ in calls):
            rounds = []
            seen: dict[str, int] = {}
            for i, (slot, _, _) in enumerate(calls):
                k = seen.get(_handle(slot), 0)
                seen[_handle(slot)] = k + 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(i)
        results: list[ExecutionResult | None] = [None] * len(calls)
        for idx in rounds:
            part = [calls[i] for i in idx]
            for i, r in zip(idx, await self._run_round(part, timeout_ms, guard)):
                results[i] = r
        return [r for r in results if r is not None]

    async def _run_round(self, calls: Sequence[ToolCall], timeout_ms: int | None,
                         guard: float | None) -> list[ExecutionResult]:
        requests: list[dict[str, Any]] = []
        contexts: list[dict[str, Any]] = []
        for slot, tool, args in calls:
            req, ctx = self._build_request(slot, tool, args)
            requests.append(req)
            contexts.append(ctx)
        try:
            client = await self._get_client()
            answers = await client.batch(requests, timeout_ms=timeout_ms, timeout=guard)
        except SlotError as e:
            return [self._failure(req["slot"], e.code, e.message, ctx)
                    for req, ctx in zip(requests, contexts)]
        results: list[ExecutionResult] = []
        for i, (req, ctx) in enumerate(zip(requests, contexts)):
            if ctx.get("timeout_ms") is None and timeout_ms is not None:
                ctx["timeout_ms"] = timeout_ms
            ans = answers[i] if i < len(answers) else None
            if not isinstance(ans, dict):
                results.append(self._failure(req["slot"], "internal",
                                             "no answer for this request in the batch", ctx))
            elif ans.get("ok") is True:
                res = ans.get("result")
                results.append(self._success(req["slot"], ctx,
                                             res if isinstance(res, dict) else {}))
            else:
                err = ans.get("error") if isinstance(ans.get("error"), dict) else {}
                results.append(self._failure(req["slot"], str(err.get("code", "internal")),
                                             str(err.get("message", "")), ctx))
        return results

    async def execute(self, slot: SlotRef, tool: str, args: Mapping[str, Any],
                      timeout_s: float | None = None) -> ExecutionResult:
        """One call (a batch of one)."""
        return (await self.execute_batch([(slot, tool, args)], timeout_s))[0]

    @staticmethod
    def _failure(handle: str, code: str, message: str,
                 ctx: Mapping[str, Any]) -> ExecutionResult:
        return ExecutionResult(success=False, output="", error=_error_text(code, message),
                               execution_id=uuid.uuid4().hex, slot_id=handle,
                               metadata={"code": code, "tool": ctx.get("tool")})

    @staticmethod
    def _success(handle: str, ctx: Mapping[str, Any],
                 res: Mapping[str, Any]) -> ExecutionResult:
        tool = ctx.get("tool")
        eid = uuid.uuid4().hex
        if tool == "tmux":
            text = "\n".join(res.get("rows", [])) if "rows" in res else ""
            meta = {"tool": tool, "action": ctx.get("action"), "result": dict(res)}
            return ExecutionResult(True, text, None, eid, handle, meta)
        if tool == "bash_stateful" or tool == "bash" or (tool == "exec" and "exit_code" in res):
            stdout = _as_bytes(res.get("stdout"))
            stderr = _as_bytes(res.get("stderr"))
            out = _decode(stdout)
            if stderr:
                err_text = _decode(stderr)
                out = (out + "\n[stderr]\n" + err_text) if out else ("[stderr]\n" + err_text)
            exit_code = res.get("exit_code")
            timed_out = bool(res.get("timed_out")) or bool(res.get("idle_timed_out"))
            success = exit_code == 0 and not timed_out
            error: str | None = None
            if not success:
                if res.get("idle_timed_out"):
                    error = f"idle timeout after {res.get('duration_ms')} ms"
                elif timed_out:
                    error = f"timed out after {ctx.get('timeout_ms') or res.get('duration_ms')} ms"
                elif res.get("cancelled"):
                    error = "cancelled"
                elif res.get("signal"):
                    error = f"exit code {exit_code} (signal {res.get('signal')})"
                else:
                    error = f"exit code {exit_code}"
            meta: dict[str, Any] = {
                "tool": tool,
                "exit_code": exit_code,
                "timed_out": timed_out,
                "isolation": list(res.get("isolation") or []),
                "duration_ms": res.get("duration_ms"),
                "stdout": stdout,
                "stderr": stderr,
                "signal": res.get("signal", 0),
                "exec_id": res.get("exec_id"),
                "stdout_truncated": bool(res.get("stdout_truncated")),
                "stderr_truncated": bool(res.get("stderr_truncated")),
                "cancelled": bool(res.get("cancelled")),
            }
            return ExecutionResult(success, out, error, eid, handle, meta)
        if tool == "read_file":
            data = _as_bytes(res.get("data"))
            meta = {"tool": tool, "size": res.get("size"), "bytes": data,
                    "eof": res.get("eof"), "mode": res.get("mode"), "mtime": res.get("mtime")}
            if "sha256" in res:
                meta["sha256"] = res["sha256"]
            return ExecutionResult(True, _decode(data), None, eid, handle, meta)
        if tool == "write_file":
            path = res.get("path", ctx.get("path"))
            meta = {"tool": tool, "size": res.get("size"), "sha256": res.get("sha256"),
                    "path": path}
            return ExecutionResult(True, f"wrote {ctx.get('length', 0)} bytes to {path}",
                                   None, eid, handle, meta)
        # Other tools (agent ops such as stat, list, archive, reset, cancel).
        shown = {k: v for k, v in res.items() if not isinstance(v, (bytes, bytearray))}
        return ExecutionResult(True, repr(shown), None, eid, handle,
                               {"tool": tool, "result": dict(res)})

    # ------------------------------------------------------------ artifacts
    async def read_artifact(self, slot: SlotRef, path: str,
                            max_bytes: int | None = None) -> dict[str, Any]:
        """{"success", "content" (str), "content_bytes", "size", "truncated",
        "sha256", "error"}; failures give success False and "code: message"."""
        try:
            client = await self._get_client()
            res = await client.read_artifact(_handle(slot), path, max_bytes=max_bytes,
                                             sha256=True)
        except SlotError as e:
            return {"success": False, "content": "", "content_bytes": b"", "size": 0,
                    "truncated": False, "sha256": None,
                    "error": _error_text(e.code, e.message)}
        data = _as_bytes(res.get("content"))
        return {"success": True, "content": _decode(data), "content_bytes": data,
                "size": res.get("size", len(data)), "truncated": bool(res.get("truncated")),
                "sha256": res.get("sha256"), "error": None}

    async def list_artifacts(self, slot: SlotRef, path: str = ".") -> dict[str, Any]:
        """{"success", "entries", "truncated", "error"} (recursive listing)."""
        try:
            client = await self._get_client()
            res = await client.list_artifacts(_handle(slot), path)
        except SlotError as e:
            return {"success": False, "entries": [], "truncated": False,
                    "error": _error_text(e.code, e.message)}
        return {"success": True, "entries": list(res.get("entries") or []),
                "truncated": bool(res.get("truncated")), "error": None}

    async def archive_artifacts(self, slot: SlotRef, path: str = ".",
                                format: str = "tar.gz") -> dict[str, Any]:
        """{"success", "data" (archive bytes), "format", "entries", "bytes", "error"}."""
        try:
            client = await self._get_client()
            res = await client.archive_artifacts(_handle(slot), path, format=format)
        except SlotError as e:
            return {"success": False, "data": b"", "format": format, "entries": 0,
                    "bytes": 0, "error": _error_text(e.code, e.message)}
        data = _as_bytes(res.get("data"))
        return {"success": True, "data": data, "format": res.get("format", format),
                "entries": res.get("entries", 0), "bytes": res.get("bytes", len(data)),
                "error": None}


__all__ = ["ControllerToolBackend", "ExecutionResult", "Slot"]
