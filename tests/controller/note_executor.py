"""A tool executor that drives a tool backend the way the trainer's own
executor does, written from ../shared/notes/trainer-interface.md (sections
2-4), not from the trainer's code: one loop, batches that close 20 ms after
their first call or at 200 calls, tool renaming and argument rewriting,
slots acquired lazily with one gather per batch (no return_exceptions),
groups by timeout run one after another, results turned into tool results
whose uniq_id is the call's, artifacts validated against the trainer's
pydantic models.

It uses only what the trainer uses of the backend, so anything the backend
lacks fails here as it would there (AttributeError kills the loop: the
pending calls then fail the test on their own timeout instead of hanging).
"""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from pydantic import BaseModel
from slot_client.results import ToolResult  # the executor's own refusals

BATCH_WINDOW_S = 0.020
MAX_BATCH = 200
SANDBOX_TOOLS = {"terminal": "bash", "bash": "bash", "terminal_stateful": "bash_stateful",
                 "tmux": "tmux", "read_file": "read_file", "write_file": "write_file"}
POLICY_KEYS = ("allow_network", "require_sandbox", "require_stateful_sandbox")


class ToolResultPayload(BaseModel):
    success: bool
    output: str = ""
    error: str = ""
    metadata: dict = {}
    uniq_id: Optional[str] = None


class ReadArtifactModel(BaseModel):
    success: bool
    content: str
    error: str
    encoding: str
    truncated: bool
    bytes: int
    file_size: Optional[int] = None
    path: Optional[str] = None
    mime: Optional[str] = None
    sha256: Optional[str] = None


class ListEntryModel(BaseModel):
    path: str
    is_dir: bool
    size: int
    mtime: float


class ListArtifactsModel(BaseModel):
    success: bool
    entries: list[ListEntryModel]
    truncated: bool
    error: str


class ArchiveArtifactsModel(BaseModel):
    success: bool
    content: str
    error: str
    encoding: str
    format: str
    bytes: int
    entry_count: int


@dataclass
class ExecutorConfig:
    allow_network: bool = True
    require_sandbox: bool = False
    require_stateful_sandbox: bool = False


@dataclass
class _Pending:
    trajectory_id: str
    name: str
    arguments: dict[str, Any]
    uniq_id: str
    timeout_s: Optional[float]
    future: "asyncio.Future[Any]"


@dataclass
class NoteExecutor:
    backend: Any
    config: ExecutorConfig = field(default_factory=ExecutorConfig)
    slots: dict[str, Any] = field(default_factory=dict)
    batches: list[int] = field(default_factory=list)  # sizes, for the tests

    def __post_init__(self) -> None:
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: Optional[asyncio.Task[None]] = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        """Release what is still held (no reset), then stop the loop."""
        for tid, slot in list(self.slots.items()):
            await self.backend.release(slot, reset_workspace=False)
            self.slots.pop(tid, None)
        if self._task is not None:
            self._task.cancel()

    async def execute(self, trajectory_id: str, name: str, arguments: dict[str, Any],
                      timeout_s: Optional[float] = None) -> Any:
        """One tool call of a trajectory; returns the tool result object."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(trajectory_id, name, dict(arguments), str(uuid.uuid4()),
                                       timeout_s, fut))
        return await fut

    async def release_trajectory(self, trajectory_id: str, reset_workspace: bool = True) -> None:
        slot = self.slots.pop(trajectory_id, None)
        if slot is not None:
            await self.backend.release(slot, reset_workspace=reset_workspace)

    # ---- artifacts, as the executor's HTTP server calls them
    async def read_artifact(self, trajectory_id: str, path: str, **kw: Any) -> dict[str, Any]:
        return self._artifact(trajectory_id, ReadArtifactModel,
                              await self._with_slot(trajectory_id, "read_artifact", path, **kw))

    async def list_artifacts(self, trajectory_id: str, path: str = ".",
                             **kw: Any) -> dict[str, Any]:
        return self._artifact(trajectory_id, ListArtifactsModel,
                              await self._with_slot(trajectory_id, "list_artifacts", path, **kw))

    async def archive_artifacts(self, trajectory_id: str, path: str = ".",
                                **kw: Any) -> dict[str, Any]:
        return self._artifact(trajectory_id, ArchiveArtifactsModel,
                              await self._with_slot(trajectory_id, "archive_artifacts", path,
                                                    **kw))

    async def _with_slot(self, trajectory_id: str, method: str, path: str,
                         **kw: Any) -> Optional[dict[str, Any]]:
        slot = self.slots.get(trajectory_id)
        if slot is None:
            return None
        return await getattr(self.backend, method)(slot, path, **kw)

    @staticmethod
    def _artifact(trajectory_id: str, model: type[BaseModel],
                  d: Optional[dict[str, Any]]) -> dict[str, Any]:
        if d is None:
            return {"success": False,
                    "error": "No active slot for trajectory (run a sandbox tool first)"}
        d = {k: v for k, v in d.items() if k != "http_status"}
        try:
            return model(**d).dict()
        except Exception as e:  # noqa: BLE001 - the executor's own text
            return {"success": False, "error": f"Invalid artifact response: {e}"}

    # ---- the loop
    async def _loop(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = asyncio.get_running_loop().time() + BATCH_WINDOW_S
            while len(batch) < MAX_BATCH:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            self.batches.append(len(batch))
            await self._run_batch(batch)

    def _rewrite(self, p: _Pending) -> tuple[Optional[str], dict[str, Any], Optional[str]]:
        """(backend tool, arguments, refusal text)."""
        tool = SANDBOX_TOOLS.get(p.name)
        if tool is None:
            return None, {}, f"Unknown tool: {p.name}"
        a = dict(p.arguments)
        cfg = self.config
        if p.name == "terminal":
            if a.get("background"):
                return None, {}, "terminal background execution is not supported in sandbox"
            a.pop("timeout", None)
        if tool == "bash":
            for k in ("allow_network", "require_sandbox", "timeout"):
                a.pop(k, None)
            a["allow_network"] = cfg.allow_network
            a["require_sandbox"] = cfg.require_sandbox
        elif tool == "bash_stateful":
            for k in ("timeout", *POLICY_KEYS):
                a.pop(k, None)
            a["allow_network"] = cfg.allow_network
            a["require_stateful_sandbox"] = cfg.require_stateful_sandbox
        elif tool == "tmux":
            for k in POLICY_KEYS:
                a.pop(k, None)
            a["allow_network"] = cfg.allow_network
            a["require_stateful_sandbox"] = cfg.require_stateful_sandbox
        return tool, a, None

    def _timeout(self, p: _Pending) -> float:
        if p.timeout_s is not None:
            return min(600.0, max(1.0, float(p.timeout_s)))
        t = p.arguments.get("timeout")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            return min(600.0, max(1.0, float(t)))
        d = self.backend.default_timeout_s
        return 30.0 if d is None else d

    async def _run_batch(self, batch: list[_Pending]) -> None:
        routed: list[tuple[_Pending, str, dict[str, Any]]] = []
        for p in batch:
            tool, args, refusal = self._rewrite(p)
            if refusal is not None:
                self._resolve(p, ToolResult(success=False, error=refusal))
            else:
                assert tool is not None
                routed.append((p, tool, args))
        need = sorted({p.trajectory_id for p, _, _ in routed if p.trajectory_id not in self.slots})
        if need:
            try:
                got = await asyncio.gather(*(self.backend.acquire(trajectory_id=t) for t in need))
            except Exception as e:  # noqa: BLE001 - the executor fails the whole batch
                for p, _, _ in routed:
                    self._resolve(p, ToolResult(success=False, error=f"Failed to acquire slot: {e}"))
                return
            for t, s in zip(need, got):
                self.slots[t] = s
        groups: dict[float, list[tuple[_Pending, str, dict[str, Any]]]] = {}
        for item in routed:
            groups.setdefault(self._timeout(item[0]), []).append(item)
        for timeout_s, items in groups.items():
            requests = [(self.slots[p.trajectory_id], tool, args) for p, tool, args in items]
            try:
                results = await self.backend.execute_batch(requests, timeout_s=timeout_s)
            except Exception as e:  # noqa: BLE001
                for p, _, _ in items:
                    self._resolve(p, ToolResult(success=False, error=f"Batch execution failed: {e}"))
                continue
            # Outside any try, as in the trainer: a missing attribute kills the loop.
            for (p, _, _), r in zip(items, results):
                _ = r.success
                tr = r.to_tool_result()
                tr.uniq_id = p.uniq_id
                self._resolve(p, tr)

    @staticmethod
    def _resolve(p: _Pending, result: Any) -> None:
        if not p.future.done():
            p.future.set_result(result)


def to_xml(result: Any) -> str:
    """The observation the model sees, as the trainer builds it."""
    return result.to_xml()
