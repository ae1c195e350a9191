"""`ControllerToolBackend`: the tool backend RL trainers plug into their
tool executor (names, signatures, defaults, waiting and observation
conventions of the trainer's own backends), on top of slot-controller. One
connection carries every trajectory's calls."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Mapping, Optional, Sequence, Union

from . import conventions as cv
from .artifacts import ArtifactsMixin
from .client import AsyncClient
from .conventions import Conventions, Refused
from .errors import ConnectError, ConnectionLost, SlotError
from .results import ExecutionResult, Slot, SlotState
from .wire import MAX_FRAME

log = logging.getLogger("slot_client")

SlotRef = Union[Slot, str]
ToolCall = tuple[SlotRef, str, Mapping[str, Any]]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_ACQUIRE_TIMEOUT_S = 600.0
RECONNECT_S = 30.0  # how long acquire tries to reach a controller that is down
STATEFUL = ("bash_stateful", "tmux")


def _handle(slot: SlotRef) -> str:
    return slot.slot_id if isinstance(slot, Slot) else str(slot)


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return b"" if data is None else str(data).encode("utf-8")


class ControllerToolBackend(ArtifactsMixin):
    """Slots from slot-controller for a trainer's tool executor.

    >>> backend = ControllerToolBackend()            # the default controller socket
    >>> await backend.start()
    >>> slot = await backend.acquire(trajectory_id="traj-1")
    >>> [r] = await backend.execute_batch([(slot, "bash", {"command": "ls"})])
    >>> r.to_tool_result().to_xml()
    >>> await backend.release(slot, reset_workspace=True)
    >>> await backend.stop()

    `acquire` waits (first come, first served) up to `acquire_timeout_s`
    for a free slot while the controller scales up. Observations follow
    the trainer's conventions unless `conventions="slot"` (or a
    `Conventions`) asks for slot's richer forms. The leases belong to this
    backend (`owner`, the same across reconnects): if it goes away without
    releasing them, the controller releases them after its `lease_grace`.
    """

    def __init__(self, address: str | None = None, profile: str | None = None,
                 token: str | None = None, *,
                 default_timeout_s: float | None = DEFAULT_TIMEOUT_S,
                 acquire_timeout_s: float | None = DEFAULT_ACQUIRE_TIMEOUT_S,
                 start_timeout_s: float = 120.0,
                 conventions: Union[Conventions, str, None] = None,
                 owner: str | None = None,
                 client_name: str = "slot_client.ControllerToolBackend",
                 max_frame: int = MAX_FRAME,
                 template: str | Mapping[str, Any] | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None, tls_server_name: str | None = None,
                 state_dir: str | None = None) -> None:
        self.address: str | None = address
        # For a "tls:HOST:PORT" address (see AsyncClient.connect); every
        # reconnect uses them too.
        self.tls_cert, self.tls_key, self.tls_ca = tls_cert, tls_key, tls_ca
        self.tls_server_name: str | None = tls_server_name
        self.state_dir: str | None = state_dir
        # Every acquire's template unless it names one: a trainer that calls
        # acquire() unchanged still gets its prepared workspace.
        self.template: str | Mapping[str, Any] | None = template
        self.profile: str | None = profile
        self.token: str | None = token
        self._default_timeout_s = default_timeout_s
        self.acquire_timeout_s: float | None = acquire_timeout_s
        self.start_timeout_s = start_timeout_s
        self.conventions: Conventions = Conventions.of(conventions)
        self.owner: str = owner or f"slot_client-{uuid.uuid4().hex}"
        self.client_name: str = client_name
        self.max_frame: int = max_frame
        self._client: AsyncClient | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._started = False
        self._slots: dict[str, Slot] = {}
        self._stats: dict[str, Any] = {}
        self._stats_at = 0.0
        self._stats_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ lifecycle
    @property
    def default_timeout_s(self) -> Optional[float]:
        """The executor's per-call timeout when a call names none."""
        return self._default_timeout_s

    async def start(self) -> None:
        """Connect, and wait (up to `start_timeout_s`) until the profile has
        an agent ready when it keeps any (`min_agents`). Idempotent; raises
        on failure."""
        self._started = True
        client = await self._get_client()
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                profiles = await client.profiles(timeout=10)
            except SlotError as e:
                if e.code == "unknown_op":  # not a slot-controller's full API: connected is all
                    return
                raise
            prof = self._my_profile(profiles)
            want = min(int(prof.get("min_agents") or 0), 1) if prof else 0
            st = await client.status(prof.get("name") if prof else None, timeout=10)
            self._note_status(st, prof)
            if int((st.get("agents") or {}).get("ready", 0)) >= want:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no agent of profile {prof.get('name')!r} became ready "
                                   f"within {self.start_timeout_s:g} s"
                                   f"{': ' + str(prof['last_error']) if prof.get('last_error') else ''}")
            await asyncio.sleep(0.2)

    async def stop(self, *, purge: bool = False) -> None:
        """Release (with reset) every slot this backend still holds, then
        close the connection. The controller's agents are shared and stay;
        `purge` is accepted for the trainer's signature and changes nothing
        more."""
        del purge
        if self._slots:
            await asyncio.gather(*(self.release(s, reset_workspace=True)
                                   for s in list(self._slots.values())), return_exceptions=True)
        self._started = False
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
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
                                                   max_frame=self.max_frame, owner=self.owner,
                                                   tls_cert=self.tls_cert, tls_key=self.tls_key,
                                                   tls_ca=self.tls_ca,
                                                   tls_server_name=self.tls_server_name,
                                                   state_dir=self.state_dir)
                self._client = client
            return client

    # ------------------------------------------------------------ stats
    def _my_profile(self, profiles: list[dict[str, Any]]) -> dict[str, Any]:
        for p in profiles:
            if p.get("name") == self.profile:
                return p
        return profiles[0] if profiles and self.profile is None else {}

    def _note_status(self, st: Mapping[str, Any], prof: Mapping[str, Any] | None) -> None:
        pst = st
        name = (prof or {}).get("name")
        if name and isinstance(st.get("profiles"), Mapping) and name in st["profiles"]:
            pst = st["profiles"][name]
        self._stats = {"slots": dict(pst.get("slots") or {}),
                       "agents": dict(pst.get("agents") or {})}
        self._stats_at = time.monotonic()

    async def _refresh_stats(self) -> None:
        try:
            client = await self._get_client()
            st = await client.status(self.profile, timeout=10)
            self._note_status(st, None)
        except Exception as e:  # noqa: BLE001 - stats are best effort
            log.debug("slot_client: status refresh failed: %s", e)
        finally:
            self._stats_task = None

    def get_stats(self) -> dict[str, Any]:
        """Pool figures (total_slots, available_slots, acquired_slots,
        containers, slots_by_state, started) as of the last refresh (at most
        about a second old while the event loop runs)."""
        if self._started and self._stats_task is None and time.monotonic() - self._stats_at > 1.0:
            try:
                self._stats_task = asyncio.get_running_loop().create_task(self._refresh_stats())
            except RuntimeError:
                pass  # no running loop: the cached figures
        slots = self._stats.get("slots", {})
        agents = self._stats.get("agents", {})
        total, free = int(slots.get("total", 0)), int(slots.get("free", 0))
        leased, executing = int(slots.get("leased", 0)), int(slots.get("executing", 0))
        releasing = max(0, total - free - leased)
        return {"total_slots": total, "available_slots": free, "acquired_slots": leased,
                "containers": int(agents.get("ready", 0)) + int(agents.get("draining", 0)),
                "slots_by_state": {"available": free, "acquired": max(0, leased - executing),
                                   "executing": executing, "releasing": releasing, "error": 0},
                "started": self._started, "held_by_this_backend": len(self._slots)}

    # ------------------------------------------------------------ slots
    async def acquire(self, trajectory_id: Optional[str] = None, *,
                      template: Optional[str | Mapping[str, Any]] = None) -> Slot:
        """Lease a slot for a trajectory, waiting (FIFO, up to
        `acquire_timeout_s`) while every slot is taken. Raises TimeoutError
        when none came in time, SlotError for other refusals.

        `template` (slot's extension; the trainer's protocol has no such
        argument): the workspace starts as a copy-on-write view of that
        template, a name or {"name", "script", "base"}; the controller
        builds it from the recipe on an agent that does not hold it."""
        tid = trajectory_id or str(uuid.uuid4())
        if template is None:
            template = self.template
        deadline = None if self.acquire_timeout_s is None else \
            time.monotonic() + self.acquire_timeout_s
        down_since = 0.0
        while True:
            left_ms = 86_400_000 if deadline is None else \
                max(0, int((deadline - time.monotonic()) * 1000))
            try:
                client = await self._get_client()
                res = await client.acquire(trajectory_id=tid, profile=self.profile,
                                           timeout_ms=left_ms, template=template)
                break
            except SlotError as e:
                if e.code == "no_capacity" and (deadline is None or time.monotonic() < deadline):
                    await asyncio.sleep(0.05)
                    continue  # the controller's own bound was shorter: wait on
                if e.code == "no_capacity":
                    raise TimeoutError(f"no free slot for trajectory {tid} within "
                                       f"{self.acquire_timeout_s:g} s: {e.message}") from e
                raise
            except ConnectionLost as e:
                # A controller restart: connect again, for a while.
                now = time.monotonic()
                down_since = down_since or now
                if isinstance(e, ConnectError) and now - down_since > RECONNECT_S or \
                        deadline is not None and now >= deadline:
                    raise
                await asyncio.sleep(0.5)
        return self._track(res, tid)

    def _track(self, res: Mapping[str, Any], tid: str) -> Slot:
        meta: dict[str, Any] = {"index": res.get("index"), "generation": res.get("generation"),
                                "profile": res.get("profile"), "workspace": res.get("workspace")}
        if res.get("template") is not None:
            meta["template"] = res.get("template")
        if res.get("workspace_mode") is not None:
            meta["workspace_mode"] = res.get("workspace_mode")
        slot = Slot(
            slot_id=str(res["slot"]),
            alloc_id=str(res.get("agent", "")),
            container_addr=str(res.get("address", "")),
            workspace_dir=str(res.get("cwd_path") or res.get("workspace") or ""),
            state=SlotState.ACQUIRED,
            trajectory_id=res.get("trajectory_id", tid),
            metadata=meta,
        )
        self._slots[slot.slot_id] = slot
        return slot

    async def fork(self, slot: SlotRef, trajectory_id: Optional[str] = None) -> Slot:
        """A new slot on the same agent whose workspace is a copy-on-write
        copy of `slot`'s as it is now (tree search, branching a trajectory).
        Released like any acquired slot. Raises SlotError (no_capacity when
        that agent has no free slot)."""
        tid = trajectory_id or str(uuid.uuid4())
        client = await self._get_client()
        res = await client.fork(_handle(slot), trajectory_id=tid, timeout=600)
        return self._track(res, tid)

    async def release(self, slot: SlotRef, *, reset_workspace: bool = False) -> None:
        """Give the slot back (with `reset_workspace`: its processes killed
        and its workspace emptied first). Never raises: a slot released
        before, or unknown, is logged and ignored."""
        handle = _handle(slot)
        tracked = self._slots.pop(handle, None)
        for s in (slot, tracked):
            if isinstance(s, Slot):
                s.state = SlotState.RELEASING
        try:
            if tracked is None and isinstance(slot, Slot):
                log.info("slot_client: release of %s, which this backend does not hold: ignored",
                         handle)
                return
            client = await self._get_client()
            await client.release(handle, reset=reset_workspace, timeout=60)
        except SlotError as e:
            log.info("slot_client: release of %s: %s: %s", handle, e.code, e.message)
        except Exception as e:  # noqa: BLE001 - release never raises
            log.warning("slot_client: release of %s failed: %s", handle, e)
        finally:
            for s in (slot, tracked):
                if isinstance(s, Slot):
                    s.release()

    # ------------------------------------------------------------ tools
    def _build_request(self, slot: SlotRef, tool: str, args: Mapping[str, Any],
                       timeout_s: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The batch entry for one call, and what shaping its answer needs.
        Raises Refused for a call that cannot be sent."""
        handle = _handle(slot)
        ws = slot.workspace_dir if isinstance(slot, Slot) else ""
        ctx: dict[str, Any] = {"tool": tool, "timeout_s": timeout_s, "workspace_dir": ws}
        if not isinstance(args, Mapping):
            raise Refused("bad_request", f"arguments of {tool} must be a map")
        a = dict(args)
        if tool in ("bash", "bash_stateful") and a.get("background"):
            raise Refused("bad_request", "background execution is not supported",
                           "terminal background execution is not supported in sandbox")
        if tool in ("bash", "bash_stateful", "tmux"):
            a.pop("background", None)  # a schema key of the model's; false means nothing
        # The policy arguments go to the controller as they are (it maps them
        # and fails closed); here they only choose the texts and metadata.
        stateful_sandbox = a.get("require_stateful_sandbox")
        if tool == "bash" or stateful_sandbox is None:
            stateful_sandbox = a.get("require_sandbox")
        ctx.update(network=a.get("allow_network", True) is not False,
                   network_isolation=a.get("allow_network") is False,
                   sandbox=stateful_sandbox is True)
        if tool in ("bash", "bash_stateful"):
            ms, sec = a.get("timeout_ms"), a.get("timeout")
            if isinstance(ms, int) and not isinstance(ms, bool) and ms > 0:
                ctx["timeout_s"] = ms / 1000.0
            elif isinstance(sec, (int, float)) and not isinstance(sec, bool) and sec > 0:
                ctx["timeout_s"] = float(sec)
            ctx["timeout_ms"] = int(ctx["timeout_s"] * 1000) if ctx["timeout_s"] else None
            if isinstance(a.get("stdin"), str):
                a["stdin"] = a["stdin"].encode("utf-8")
        elif tool == "tmux":
            ctx["action"] = str(a.get("action") or "capture").strip().lower()
            ctx["capture_entire"] = a.get("capture_entire") is True
        if tool == "read_file":
            path = a.get("path")
            ctx["path"] = path
            if isinstance(path, str):
                a["path"] = self._relative(path, ws)
                lim = self.conventions.file_limit
                if lim is not None and "length" not in a:
                    a["length"] = lim + 1
        elif tool == "write_file":
            path = a.get("path")
            ctx["path"] = path
            if isinstance(path, str):
                a["path"] = self._relative(path, ws)
            data = a.pop("content", a.pop("data", None))
            if isinstance(data, str) and self.conventions.texts == "trainer":
                ctx["length"] = len(data)  # the trainer counts characters
            lim = self.conventions.file_limit
            if lim is not None and data is not None and len(data) > lim:
                raise Refused("too_large", "content too large",
                               f"Content too large: {len(data)} bytes (max {lim})")
            a["data"] = _as_bytes(data) if data is not None else None
            if a["data"] is None:
                del a["data"]
            ctx.setdefault("length", len(a.get("data", b"")))
        return {"slot": handle, "tool": tool, "args": a}, ctx

    def _relative(self, path: str, ws: str) -> str:
        """A path for the agent's file ops: relative to the workspace. An
        absolute path inside the workspace as commands see it is accepted;
        any other absolute path is refused (never sent)."""
        if not path.startswith("/"):
            return path
        root = (ws or "/workspace").rstrip("/")
        if path == root:
            return "."
        if root and path.startswith(root + "/"):
            return path[len(root) + 1:] or "."
        raise Refused("path_escape", f"{path} is outside the workspace",
                       "Access denied: path outside workspace")

    async def execute_batch(self, requests: Sequence[ToolCall], *,
                            timeout_s: float | None = None) -> list[ExecutionResult]:
        """Run the calls (calls on one slot in order, slots in parallel).
        Returns one ExecutionResult per call, in order; failures are
        results, never exceptions. `timeout_s` bounds each call."""
        try:
            return await self._execute_batch(requests, timeout_s)
        except Exception as e:  # noqa: BLE001 - the executor's loop must live on
            log.exception("slot_client: execute_batch failed")
            return [self._result(_handle(r[0]) if isinstance(r, (tuple, list)) and r else "",
                                 *cv.failure("internal", str(e), {}, self.conventions))
                    for r in requests]

    async def _execute_batch(self, calls: Sequence[ToolCall],
                             timeout_s: float | None) -> list[ExecutionResult]:
        if not calls:
            return []
        if timeout_s is None:
            timeout_s = self.default_timeout_s
        timeout_ms = None if timeout_s is None else max(1, int(timeout_s * 1000))
        # The controller answers `timeout` 5 s after the command timeout; allow more.
        guard = None if timeout_s is None else timeout_s + 30.0
        # The controller runs a slot's bash_stateful and tmux calls in order,
        # but not in order with the slot's other tools: with those tools, go
        # in rounds that hold at most one call per slot.
        rounds: list[list[int]] = [list(range(len(calls)))]
        if any(c[1] in STATEFUL for c in calls):
            rounds = []
            seen: dict[str, int] = {}
            for i, c in enumerate(calls):
                k = seen.get(_handle(c[0]), 0)
                seen[_handle(c[0])] = k + 1
                if k == len(rounds):
                    rounds.append([])
                rounds[k].append(i)
        results: list[ExecutionResult | None] = [None] * len(calls)
        slots = {id(c[0]): c[0] for c in calls if isinstance(c[0], Slot)}
        for s in slots.values():
            s.start_execution()
        try:
            for idx in rounds:
                part = [calls[i] for i in idx]
                for i, r in zip(idx, await self._run_round(part, timeout_s, timeout_ms, guard)):
                    results[i] = r
        finally:
            for s in slots.values():
                s.end_execution()
        return [r if r is not None else self._result("", False, "", "internal: no result", {})
                for r in results]

    async def _run_round(self, calls: Sequence[ToolCall], timeout_s: float | None,
                         timeout_ms: int | None, guard: float | None) -> list[ExecutionResult]:
        conv = self.conventions
        out: list[ExecutionResult | None] = [None] * len(calls)
        requests: list[dict[str, Any]] = []
        contexts: list[tuple[int, dict[str, Any]]] = []
        for i, (slot, tool, args) in enumerate(calls):
            try:
                req, ctx = self._build_request(slot, tool, args, timeout_s)
            except Refused as e:
                ctx = {"tool": tool}
                o = cv.failure(e.code, e.message, ctx, conv)
                if e.text and conv.texts == "trainer":
                    o = (False, "", e.text, o[3])
                out[i] = self._result(_handle(slot), *o)
                continue
            requests.append(req)
            contexts.append((i, ctx))
        if requests:
            try:
                client = await self._get_client()
                answers = await client.batch(requests, timeout_ms=timeout_ms, timeout=guard)
            except SlotError as e:
                answers = [{"ok": False, "error": {"code": e.code, "message": e.message}}] * \
                    len(requests)
            for (i, ctx), req, ans in zip(contexts, requests,
                                          answers + [None] * (len(requests) - len(answers))):
                out[i] = self._result(req["slot"], *self._shape(ans, ctx))
        return [r if r is not None else self._result("", False, "", "internal: no result", {})
                for r in out]

    def _shape(self, ans: Any, ctx: Mapping[str, Any]) -> cv.Outcome:
        conv = self.conventions
        if not isinstance(ans, dict):
            return cv.failure("internal", "no answer for this request in the batch", ctx, conv)
        if ans.get("ok") is not True:
            err = ans.get("error") if isinstance(ans.get("error"), dict) else {}
            return cv.failure(str(err.get("code", "internal")), str(err.get("message", "")),
                              ctx, conv)
        res = ans.get("result") if isinstance(ans.get("result"), dict) else {}
        tool = ctx.get("tool")
        if tool in ("bash", "bash_stateful") or (tool == "exec" and "exit_code" in res):
            return cv.command(res, ctx, conv)
        if tool == "tmux":
            return cv.tmux(res, ctx, conv)
        if tool == "read_file":
            return cv.read_file(res, ctx, conv)
        if tool == "write_file":
            return cv.write_file(res, ctx, conv)
        return cv.other(res, ctx)

    @staticmethod
    def _result(handle: str, success: bool, output: str, error: str,
                metadata: dict[str, Any]) -> ExecutionResult:
        return ExecutionResult(success=success, output=output, error=error,
                               execution_id=uuid.uuid4().hex, slot_id=handle,
                               metadata=metadata)

    async def execute(self, slot: SlotRef, tool: str, args: Mapping[str, Any],
                      timeout_s: float | None = None) -> ExecutionResult:
        """One call (a batch of one)."""
        return (await self.execute_batch([(slot, tool, args)], timeout_s=timeout_s))[0]


__all__ = ["ControllerToolBackend", "ExecutionResult", "Slot", "SlotState"]
