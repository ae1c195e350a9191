"""Low-level asyncio client for the slot-controller trainer API.

One connection, one reader task: requests are pipelined (many in flight at
once) and answers are matched to callers by request id, in whatever order
they arrive. Stream events (`{"id", "event", ...}`) that precede a final
answer are handed to a callback.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from typing import Any, Awaitable, Callable, Mapping, Sequence, Union

from .errors import CallTimeout, ConnectError, ConnectionLost, SlotError
from .tls import TLSConfig, TLSStream, describe as describe_tls
from .wire import MAX_FRAME, Address, FrameError, pack_frame, parse_address, read_frame

log = logging.getLogger("slot_client")

Event = dict[str, Any]
EventCallback = Callable[[Event], Union[None, Awaitable[None]]]

_READ_LIMIT = 1 << 20


class _Pending:
    __slots__ = ("future", "on_event", "op")

    def __init__(self, future: "asyncio.Future[dict[str, Any]]", op: str,
                 on_event: EventCallback | None) -> None:
        self.future = future
        self.op = op
        self.on_event = on_event


class AsyncClient:
    """A connection to slot-controller. Create with `await AsyncClient.connect()`."""

    def __init__(self, reader: Any, writer: Any,
                 address: Address, *, max_frame: int = MAX_FRAME,
                 on_event: EventCallback | None = None,
                 tls: TLSConfig | None = None) -> None:
        # reader/writer: asyncio streams, or one TLSStream for both
        self.address: Address = address
        # The TLS settings this connection used (None: unix: or tcp:), and
        # "TLSv1.3 CIPHER" once the handshake is done.
        self.tls: TLSConfig | None = tls
        self.tls_info: str = reader.describe() if isinstance(reader, TLSStream) else ""
        self._frames_seen = 0
        self._tls_failure: str | None = None
        self.max_frame: int = max_frame
        self.on_event: EventCallback | None = on_event
        self.server_info: dict[str, Any] = {}
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._closed = False
        self._close_reason: str | None = None
        self._orphan_error: dict[str, Any] | None = None
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._reader_task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._read_loop(), name=f"slot_client reader {address}")

    # ------------------------------------------------------------ lifecycle
    @classmethod
    async def connect(cls, address: str | None = None, token: str | None = None, *,
                      client_name: str | None = "slot_client",
                      owner: str | None = None,
                      hello: bool = True,
                      connect_timeout: float | None = 10.0,
                      max_frame: int = MAX_FRAME,
                      on_event: EventCallback | None = None,
                      tls_cert: str | None = None, tls_key: str | None = None,
                      tls_ca: str | None = None, tls_server_name: str | None = None,
                      state_dir: str | None = None) -> "AsyncClient":
        """Connect to `address` ("unix:PATH", "tcp:HOST:PORT" or
        "tls:HOST:PORT"; None: the controller's default socket).

        `tls:` is TLS 1.3 with mutual certificates: `tls_cert`/`tls_key` (our
        client certificate, PEM), `tls_ca` (what the controller's certificate
        must chain to) and `tls_server_name` (the name it must carry; default
        HOST). Each falls back to SLOT_TLS_CERT / SLOT_TLS_KEY / SLOT_TLS_CA,
        then to the controller's own files STATE/tls/trainer.pem, trainer.key,
        ca.pem (`state_dir`, else SLOT_STATE_DIR, else the controller's
        default state dir). A TLS failure raises ConnectError with one line
        saying what to change.

        With `hello` (the default, forced when a
        token is given), sends `hello` first and keeps its result in
        `server_info`; a wrong token raises SlotError("unauthorized").
        `owner` (sent in hello; forces it) names the trainer that owns the
        leases taken on this connection: give the same one on every
        reconnect, and the controller keeps them when the connection drops
        for less than the profile's lease_grace."""
        addr = parse_address(address)
        tls: TLSConfig | None = None
        ctx: ssl.SSLContext | None = None
        if addr.kind == "tls":
            tls = TLSConfig.resolve(tls_cert, tls_key, tls_ca, tls_server_name, state_dir)
            ctx = tls.context(str(addr))
        stream: TLSStream | None = None

        async def open_() -> tuple[Any, Any]:
            nonlocal stream
            if addr.kind == "unix":
                return await asyncio.open_unix_connection(addr.path, limit=_READ_LIMIT)
            r, w = await asyncio.open_connection(addr.host, addr.port, limit=_READ_LIMIT)
            if ctx is None or tls is None:
                return r, w
            stream = TLSStream(r, w, ctx, tls.server_name or addr.host)
            try:
                await stream.handshake()
            except BaseException:
                w.close()
                raise
            return stream, stream

        try:
            reader, writer = await asyncio.wait_for(open_(), connect_timeout)
        except (ssl.SSLError, EOFError) as e:
            assert tls is not None
            raw = bytes(stream.raw_seen) if stream is not None else b""
            raise ConnectError(describe_tls(e, str(addr), tls, raw)) from e
        except asyncio.TimeoutError as e:
            raise ConnectError(f"cannot connect to {addr}: timed out after "
                               f"{connect_timeout} s") from e
        except OSError as e:
            reason = e.strerror or str(e) or type(e).__name__
            raise ConnectError(f"cannot connect to {addr}: {reason}"
                               + (" (is slot-controller running?)"
                                  if isinstance(e, (FileNotFoundError, ConnectionRefusedError))
                                  else "")) from e
        client = cls(reader, writer, addr, max_frame=max_frame, on_event=on_event, tls=tls)
        if hello or token is not None or owner is not None:
            try:
                client.server_info = await client.hello(token=token, client=client_name,
                                                        owner=owner, timeout=connect_timeout)
            except ConnectionLost as e:
                await client.close()
                # A TLS server checks our certificate after our side of the
                # handshake is done, so its refusal (an alert) arrives here.
                if client._tls_failure is not None and not isinstance(e, ConnectError):
                    raise ConnectError(client._tls_failure) from e
                if tls is not None and not client._frames_seen and \
                        not isinstance(e, ConnectError):
                    # the reset overtook the alert (e.g. while sending hello)
                    raise ConnectError(describe_tls(ConnectionResetError(), str(addr), tls,
                                                    handshake_done=True)) from e
                orphan = client._orphan_error
                if orphan is not None and not isinstance(e, ConnectError):
                    raise ConnectError(f"cannot connect to {addr}: the controller answered "
                                       f"{orphan.get('code')}: {orphan.get('message')}") from e
                if addr.kind == "tcp" and not client._frames_seen and \
                        not isinstance(e, ConnectError):
                    raise ConnectError(f"cannot connect to {addr}: the controller closed the "
                                       f"connection without answering hello (does it listen "
                                       f"with tls:? then connect with tls:HOST:PORT)") from e
                raise
            except BaseException:
                await client.close()
                raise
        return client

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    async def close(self) -> None:
        """Close the connection; calls still in flight fail with ConnectionLost."""
        self._shutdown("connection closed by the client")
        if self._reader_task is not asyncio.current_task():
            self._reader_task.cancel()
            try:
                await self._reader_task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self._writer.wait_closed()
        except Exception:
            pass

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _shutdown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        if self._orphan_error is not None:
            err = self._orphan_error
            reason += f" (last unmatched error: {err.get('code')}: {err.get('message')})"
        self._close_reason = reason
        try:
            self._writer.close()
        except Exception:
            pass
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(ConnectionLost(
                    f"{reason}; request {p.op!r} to {self.address} got no answer"))

    # ------------------------------------------------------------ reading
    async def _read_loop(self) -> None:
        reason = "connection closed by the controller"
        try:
            while True:
                frame = await read_frame(self._reader, self.max_frame)
                if frame is None:
                    if self.tls is not None and not self._frames_seen:
                        self._tls_failure = describe_tls(EOFError(), str(self.address),
                                                         self.tls, handshake_done=True)
                        reason = self._tls_failure
                    break
                self._frames_seen += 1
                self._dispatch(frame)
        except asyncio.CancelledError:
            reason = "connection closed by the client"
            raise
        except FrameError as e:
            reason = f"protocol error from the controller: {e}"
        except ssl.SSLError as e:
            assert self.tls is not None
            if not self._frames_seen:  # the server's verdict on our certificate
                self._tls_failure = describe_tls(e, str(self.address), self.tls,
                                                 handshake_done=True)
                reason = self._tls_failure
            else:
                reason = f"TLS connection to the controller failed: {e.reason or e}"
        except (OSError, asyncio.IncompleteReadError) as e:
            reason = f"connection to the controller failed: {e}"
            if self.tls is not None and not self._frames_seen:
                # reset right after the handshake: its refusal of our certificate
                self._tls_failure = describe_tls(e, str(self.address), self.tls,
                                                 handshake_done=True)
                reason = self._tls_failure
        except Exception as e:  # never leave callers hanging
            log.exception("slot_client reader crashed")
            reason = f"client reader failed: {e!r}"
        finally:
            self._shutdown(reason)

    def _dispatch(self, frame: dict[str, Any]) -> None:
        rid = frame.get("id")
        pending = self._pending.get(rid) if isinstance(rid, int) else None
        if "event" in frame and "ok" not in frame:
            cb = pending.on_event if pending is not None and pending.on_event else self.on_event
            if cb is not None:
                self._run_callback(cb, frame)
            return
        if pending is None:
            err = frame.get("error")
            if frame.get("ok") is False and isinstance(err, dict):
                # id 0 (or unknown id): e.g. too_large before the connection is dropped.
                self._orphan_error = err
                log.warning("slot_client: unmatched error for id %r: %s: %s", rid,
                            err.get("code"), err.get("message"))
            return
        del self._pending[rid]  # type: ignore[arg-type]
        if pending.future.done():
            return
        if frame.get("ok") is True:
            result = frame.get("result")
            pending.future.set_result(result if isinstance(result, dict) else {})
        else:
            err = frame.get("error")
            if isinstance(err, dict):
                pending.future.set_exception(SlotError(str(err.get("code", "internal")),
                                                       str(err.get("message", ""))))
            else:
                pending.future.set_exception(SlotError("internal",
                                                       f"malformed answer: {frame!r:.200}"))

    def _run_callback(self, cb: EventCallback, event: Event) -> None:
        try:
            ret = cb(event)
        except Exception:
            log.exception("slot_client: event callback failed")
            return
        if inspect.isawaitable(ret):
            async def _await(aw: Awaitable[None]) -> None:
                try:
                    await aw
                except Exception:
                    log.exception("slot_client: event callback failed")
            task = asyncio.get_running_loop().create_task(_await(ret))
            self._callback_tasks.add(task)
            task.add_done_callback(self._callback_tasks.discard)

    # ------------------------------------------------------------ calls
    async def call(self, op: str, args: Mapping[str, Any] | None = None,
                   timeout: float | None = None,
                   on_event: EventCallback | None = None) -> dict[str, Any]:
        """Send one request and wait for its final answer.

        Returns the `result` map, raises SlotError(code, message) on an error
        answer, ConnectionLost when the connection goes away first, and
        CallTimeout when `timeout` seconds pass (the late answer is dropped).
        Stream events for this request go to `on_event` (else the client's)."""
        if self._closed:
            raise ConnectionLost(f"{self._close_reason or 'connection closed'}; cannot send "
                                 f"{op!r} to {self.address}")
        rid = self._next_id
        self._next_id += 1
        message: dict[str, Any] = {"id": rid, "op": op}
        if args is not None:
            message["args"] = dict(args)
        frame = pack_frame(message, self.max_frame)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = _Pending(future, op, on_event)
        try:
            self._writer.write(frame)
            try:
                await self._writer.drain()
            except (OSError, RuntimeError) as e:
                self._shutdown(f"connection to the controller failed while sending: {e}")
            if timeout is None:
                return await future
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout)
            except asyncio.TimeoutError:
                if future.done() and not future.cancelled():
                    return future.result()
                raise CallTimeout(f"no answer to {op!r} from {self.address} within "
                                  f"{timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # mark retrieved

    # ------------------------------------------------------------ typed wrappers
    async def hello(self, token: str | None = None, client: str | None = None,
                    timeout: float | None = None, owner: str | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {}
        if token is not None:
            args["token"] = token
        if client is not None:
            args["client"] = client
        if owner is not None:
            args["owner"] = owner
        return await self.call("hello", args, timeout)

    async def status(self, profile: str | None = None,
                     timeout: float | None = None) -> dict[str, Any]:
        return await self.call("status", _opt(profile=profile), timeout)

    async def profiles(self, timeout: float | None = None) -> list[dict[str, Any]]:
        result = await self.call("profiles", {}, timeout)
        return list(result.get("profiles", []))

    async def agents(self, profile: str | None = None,
                     timeout: float | None = None) -> list[dict[str, Any]]:
        result = await self.call("agents", _opt(profile=profile), timeout)
        return list(result.get("agents", []))

    async def slots(self, profile: str | None = None, agent: str | None = None,
                    timeout: float | None = None) -> list[dict[str, Any]]:
        result = await self.call("slots", _opt(profile=profile, agent=agent), timeout)
        return list(result.get("slots", []))

    async def leases(self, timeout: float | None = None) -> list[dict[str, Any]]:
        result = await self.call("leases", {}, timeout)
        return list(result.get("leases", []))

    async def acquire(self, trajectory_id: str | None = None, profile: str | None = None,
                      timeout_ms: int | None = None,
                      timeout: float | None = None,
                      template: str | Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Lease a slot; the result's `slot` is the handle for later calls.
        `template`: the workspace starts as a copy-on-write view of this
        template, a name or {"name", "script", "base"} (the recipe that
        builds it on an agent that lacks it)."""
        args = _opt(trajectory_id=trajectory_id, profile=profile, timeout_ms=timeout_ms)
        if template is not None:
            args["template"] = template if isinstance(template, str) else dict(template)
        return await self.call("acquire", args, timeout)

    async def fork(self, slot: str, trajectory_id: str | None = None,
                   timeout: float | None = None) -> dict[str, Any]:
        """A new lease on the same agent whose workspace is a copy-on-write
        copy of `slot`'s as it is now (answered like acquire)."""
        return await self.call("fork", _opt(slot=slot, trajectory_id=trajectory_id), timeout)

    async def templates(self, profile: str | None = None,
                        timeout: float | None = None) -> list[dict[str, Any]]:
        """Each ready agent's templates: [{agent, profile, building, templates}]."""
        result = await self.call("templates", _opt(profile=profile), timeout)
        return list(result.get("agents", []))

    async def release(self, slot: str, reset: bool = True,
                      timeout: float | None = None) -> dict[str, Any]:
        return await self.call("release", {"slot": slot, "reset": reset}, timeout)

    async def exec(self, slot: str, tool: str = "bash", args: Mapping[str, Any] | None = None,
                   timeout_ms: int | None = None, timeout: float | None = None,
                   on_event: EventCallback | None = None) -> dict[str, Any]:
        """Run one tool on a slot (`bash` {command}, `read_file` {path},
        `write_file` {path, data|content}, or an agent op)."""
        req: dict[str, Any] = {"slot": slot, "tool": tool, "args": dict(args or {})}
        if timeout_ms is not None:
            req["timeout_ms"] = timeout_ms
        return await self.call("exec", req, timeout, on_event)

    async def batch(self, requests: Sequence[Mapping[str, Any]],
                    timeout_ms: int | None = None,
                    timeout: float | None = None) -> list[dict[str, Any]]:
        """Send many {slot, tool, args} requests as one `batch`; returns the
        per-request answers in order, each {"ok": True, "result": ...} or
        {"ok": False, "error": {"code", "message"}}."""
        args: dict[str, Any] = {"requests": [dict(r) for r in requests]}
        if timeout_ms is not None:
            args["timeout_ms"] = timeout_ms
        result = await self.call("batch", args, timeout)
        return list(result.get("results", []))

    async def read_artifact(self, slot: str, path: str, max_bytes: int | None = None,
                            sha256: bool = False,
                            timeout: float | None = None) -> dict[str, Any]:
        args: dict[str, Any] = {"slot": slot, "path": path}
        if max_bytes is not None:
            args["max_bytes"] = max_bytes
        if sha256:
            args["sha256"] = True
        return await self.call("read_artifact", args, timeout)

    async def list_artifacts(self, slot: str, path: str = ".", recursive: bool | None = None,
                             max_entries: int | None = None,
                             timeout: float | None = None) -> dict[str, Any]:
        args = {"slot": slot, "path": path, **_opt(recursive=recursive,
                                                   max_entries=max_entries)}
        return await self.call("list_artifacts", args, timeout)

    async def archive_artifacts(self, slot: str, path: str = ".", format: str = "tar.gz",
                                max_bytes: int | None = None,
                                timeout: float | None = None) -> dict[str, Any]:
        args = {"slot": slot, "path": path, "format": format, **_opt(max_bytes=max_bytes)}
        return await self.call("archive_artifacts", args, timeout)

    async def drain(self, agent: str, timeout: float | None = None) -> dict[str, Any]:
        return await self.call("drain", {"agent": agent}, timeout)


def _opt(**kw: Any) -> dict[str, Any]:
    """The keyword arguments that are not None."""
    return {k: v for k, v in kw.items() if v is not None}
