"""A FAKE of the Modal SDK (`import modal`), for tests only.

Modal's cloud cannot be reached from the test machines, so the tests of
controller/modal/slot_modal_bridge.py put this directory first on PYTHONPATH.
It implements exactly the surface the bridge uses, with the behaviour
/work/shared/notes/modal.md records for the real SDK (modal-client 1.5.x), and
nothing the real SDK lacks. Sandboxes are real local processes; their state
lives on disk under $SLOT_FAKE_MODAL_DIR (required; see _fake_state.py for the
layout), so separate processes see the same sandboxes.

Surface (each async API is a callable with an `.aio` twin, as synchronicity
makes Modal's; the blocking form may not be called inside a running loop):

- `modal.__version__`: "1.5.4+fake", or $SLOT_FAKE_MODAL_VERSION (read at import).
- `App.lookup(name, *, create_if_missing=False)` -> App (`.app_id`, `.name`).
  Checks credentials first, like the first RPC of a real client does.
- `Image.from_registry(ref)`, `image.add_local_file(local, remote)`: recorded;
  `remote` inside the sandbox resolves to the local file (that is how the
  agent binary gets "into" a sandbox).
- `Secret.from_name(name)` (resolved at create from
  $SLOT_FAKE_MODAL_DIR/secrets/NAME.json, NotFoundError if missing),
  `Secret.from_dict(d)` (None values dropped).
- `Sandbox.create(*args, app, name, tags, image, env, secrets, timeout=300,
  idle_timeout, workdir, gpu, cpu, memory, block_network,
  outbound_cidr_allowlist)`. Validates like the SDK (app required, name <= 64
  chars of [A-Za-z0-9._-], workdir absolute, gpu not a list, timeout <= 24 h,
  args <= 64 KiB, block_network excludes the allowlist); a name running in the
  app gives AlreadyExistsError. Records every argument in create.json. The
  sandbox's process is `args`, run locally in its own session by a detached
  runtime (_fake_runtime.py) that outlives the creating process; absolute-path
  arguments and `unix:/path` arguments are mapped into SANDBOX_DIR/root (the
  sandbox's "/", which has /run, /tmp and the workdir), except a path added
  with add_local_file, which maps to that local file. Environment: PATH,
  LANG, then the secrets' variables.
- `Sandbox.from_name(app_name, name)`: the running sandbox, else NotFoundError.
- `Sandbox.list(*, app_id=None, tags=None)`: running sandboxes having at least
  those tags (an async generator under `.aio`).
- `sb.object_id`, `sb.poll()` (None or exit code), `sb.terminate(*, wait=False)`
  (kills its process group, what it left behind and its execs; code 137;
  with wait=True returns the code once all of that is gone), `sb.get_tags()`,
  `sb.detach()` (later calls on that handle raise ClientClosed; the sandbox
  runs on), `sb.exec(*args, text=False)` (text=True is not implemented).
  A sandbox whose process exited (code, or 128+signal), timed out (124) or was
  terminated (137) is finished: from_name raises NotFoundError, exec raises
  ConflictError, its running execs are killed and their wait() raises
  NotFoundError (the worker is gone, as TaskExecWait answers then).
- `ContainerProcess`: `stdin` (StreamWriter: `write()` only buffers and raises
  BufferError past 16 MiB, ValueError after write_eof, TypeError for non-bytes;
  `write_eof()` only sets a flag; `drain()` sends the buffer and, after
  write_eof, the EOF, as one offset-stamped write that the worker applies
  once: the buffer is cleared only when the drain succeeded, so a failed or
  cancelled drain called again resends the same bytes and nothing is doubled;
  a write() or a second drain() while a drain is in flight raises
  RuntimeError, where the SDK would silently lose or misplace bytes),
  `stdout`/`stderr` (async-iterable readers yielding raw bytes chunks cut at
  arbitrary 1 B - 4 KiB boundaries, resumed at their byte offset after a
  broken connection with a budget of 10 reconnects for the stream's whole
  life, as the SDK's `_stream_stdio_with_retries`; iterate each once;
  `read()`), `wait()` (exit code, 128+signal when killed). The classes are
  also reachable as modal.container_process / modal.io_streams, like the SDK's.

Behaviour the real SDK leaves undocumented, and what the fake does (?):
- exec of a file that does not exist in the sandbox: the process exits 127
  (126 when not executable) with `exec: "PATH": <reason>` on its stderr, as
  container runtimes report it;
- drain() after the exec ended drops the data silently.

Known differences: an exec is a child of the calling process here, so if that
process dies its exec's stdin closes (on Modal it stays open until the exec's
timeout); idle_timeout, gpu, cpu, memory, secrets' isolation and the network
options are recorded, not enforced; calls reach no server.

Fault injection (environment of the process using the fake):
- SLOT_FAKE_MODAL_REFUSE_CREATE=MESSAGE: Sandbox.create raises
  ResourceExhaustedError(MESSAGE), as Modal does for quotas and rate limits.
- SLOT_FAKE_MODAL_LATENCY_MS=N: every RPC-like call (lookup, from_name,
  create, exec, drain, poll, terminate, list, get_tags) first sleeps N ms.
- SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY=N: the connection of every exec's stdout
  stream breaks after each N bytes it delivered (the next chunk is lost in
  flight and sent again after the reconnect). Each break spends one of the
  stream's 10 reconnects; the 11th break raises, as the SDK does once the
  budget is spent, and the stream is over (its exec runs on).
- SLOT_FAKE_MODAL_STDIN_BREAK_AT=N[:applied]: the first drain that would take
  an exec's stdin past byte N fails, its retries spent (later drains work: the
  outage was transient); with `:applied` its bytes did reach the exec (the
  reply was lost). The buffer is kept, as the SDK keeps it, so a drain called
  again resends it at the same offset.
- SLOT_FAKE_MODAL_LINK_ERROR=oserror|unavailable: what a spent retry budget
  raises: the builtin ConnectionError (default; the SDK re-raises an OSError or
  a timeout so) or modal.exception.ServiceError (a gRPC UNAVAILABLE, converted).
- SLOT_FAKE_MODAL_LIST_LAG_S=S: Sandbox.list also returns sandboxes that
  ended less than S seconds ago, as a listing lagging behind the sandboxes'
  state would (?).
"""
from __future__ import annotations

import asyncio
import atexit
import errno
import fcntl
import functools
import json
import os
import random
import re
import secrets as _secrets
import sys
import time
import tomllib
import weakref
from contextlib import asynccontextmanager
from pathlib import Path
from typing import (Any, AsyncIterator, Awaitable, Callable, Coroutine, Generic, Iterator,
                    Optional, Sequence, TypeVar)

from . import exception
from ._fake_state import (SandboxDir, base_dir, find_running, read_json, sandboxes,
                          write_json)
from .exception import (AlreadyExistsError, AuthError, ClientClosed, ConflictError, Error,
                        InvalidError, NotFoundError, ResourceExhaustedError)

__all__ = ["App", "ContainerProcess", "Error", "Image", "Sandbox", "Secret", "StreamReader",
           "StreamWriter", "exception"]

# The SDK release the fake stands for; SLOT_FAKE_MODAL_VERSION overrides it (read
# at import) so that tests can play other releases.
__version__ = os.environ.get("SLOT_FAKE_MODAL_VERSION") or "1.5.4+fake"

R = TypeVar("R")

_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_MAX_ARGS_BYTES = 2**16
_MAX_TIMEOUT_S = 24 * 3600
_STDIN_MAX_BUFFER = 16 * 1024 * 1024
# The SDK's reconnect budget of one exec stdio stream, for the stream's whole
# life (TaskCommandRouterClient.stream_stdio_max_retries; never refunded), and
# the first backoff delay (doubled per retry, reset by a chunk that arrives).
_STDIO_MAX_RETRIES = 10
_STDIO_RETRY_DELAY_S = 0.01
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RUNTIME = Path(__file__).with_name("_fake_runtime.py")


# ---- the `.aio` shape ------------------------------------------------------

def _blocking(coro: Coroutine[Any, Any, R]) -> R:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError("fake modal: use the .aio form inside a running event loop")


class _AioCallable(Generic[R]):
    """A blocking callable with an `.aio` coroutine twin."""

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, R]]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return _blocking(self._fn(*args, **kwargs))

    def aio(self, *args: Any, **kwargs: Any) -> Coroutine[Any, Any, R]:
        return self._fn(*args, **kwargs)


class _AioGenCallable(Generic[R]):
    """An iterator-returning callable whose `.aio` twin is an async generator."""

    def __init__(self, fn: Callable[..., AsyncIterator[R]]) -> None:
        self._fn = fn
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Iterator[R]:
        async def collect() -> list[R]:
            return [x async for x in self._fn(*args, **kwargs)]
        return iter(_blocking(collect()))

    def aio(self, *args: Any, **kwargs: Any) -> AsyncIterator[R]:
        return self._fn(*args, **kwargs)


class _method(Generic[R]):
    """Descriptor: an async method exposed as `obj.m(...)` and `obj.m.aio(...)`."""

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, R]]) -> None:
        self._fn = fn

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        return _AioCallable(functools.partial(self._fn, obj))


class _static(Generic[R]):
    """Descriptor: an async static method with an `.aio` twin."""

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, R]]) -> None:
        self._fn = fn

    def __get__(self, obj: Any, owner: Any = None) -> _AioCallable[R]:
        return _AioCallable(self._fn)


class _static_gen(Generic[R]):
    """Descriptor: an async-generator static method with an `.aio` twin."""

    def __init__(self, fn: Callable[..., AsyncIterator[R]]) -> None:
        self._fn = fn

    def __get__(self, obj: Any, owner: Any = None) -> _AioGenCallable[R]:
        return _AioGenCallable(self._fn)


# ---- plumbing ----------------------------------------------------------------

async def _rpc() -> None:
    """Stands in for a round trip to Modal (SLOT_FAKE_MODAL_LATENCY_MS)."""
    ms = os.environ.get("SLOT_FAKE_MODAL_LATENCY_MS")
    await asyncio.sleep(float(ms) / 1000 if ms else 0)


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    return int(v) if v else None


def _link_error(what: str) -> Exception:
    """What the SDK raises once the retries of a router call are spent
    (task_command_router_client.py): an OSError or timeout is re-raised as the
    builtin ConnectionError; a retryable gRPC status (UNAVAILABLE) leaves
    grpc_error_converter as ServiceError (SLOT_FAKE_MODAL_LINK_ERROR=unavailable)."""
    if os.environ.get("SLOT_FAKE_MODAL_LINK_ERROR") == "unavailable":
        return exception.ServiceError(f"fake modal: {what}: the worker is unreachable")
    return ConnectionError(f"[Errno 104] Connection reset by peer ({what}, fake modal)")


def _check_credentials() -> None:
    """What the real client's first RPC does (modal/config.py, client.py)."""
    token_id = os.environ.get("MODAL_TOKEN_ID")
    token_secret = os.environ.get("MODAL_TOKEN_SECRET")
    path = Path(os.environ.get("MODAL_CONFIG_PATH") or Path.home() / ".modal.toml")
    profiles: dict[str, Any] = {}
    if path.is_file():
        try:
            profiles = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InvalidError(f"cannot parse {path}: {e}") from None
    env_profile = os.environ.get("MODAL_PROFILE")
    active = [k for k, v in profiles.items() if isinstance(v, dict) and v.get("active") is True]
    if len(active) > 1:
        raise InvalidError(f"More than one Modal profile is active: {', '.join(active)}")
    profile = env_profile or (active[0] if active else "default")
    if env_profile and env_profile not in profiles:
        raise AuthError(f"Profile '{env_profile}' not found in {path}")
    conf = profiles.get(profile, {})
    if not isinstance(conf, dict):
        conf = {}
    token_id = token_id or conf.get("token_id")
    token_secret = token_secret or conf.get("token_secret")
    if not token_id or not token_secret:
        raise AuthError(
            "Token missing. Could not authenticate client. If you have token credentials, see "
            "modal.com/docs/reference/modal.config for setup help. If you are a new user, "
            "register an account at modal.com, then run `modal token new`.")


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidError(
            f"Invalid {kind} name: '{name}'. Names may contain only alphanumeric characters, "
            "dashes, periods, and underscores, and must be shorter than 64 characters.")


@asynccontextmanager
async def _locked(base: Path, timeout: float = 30.0) -> AsyncIterator[None]:
    fd = os.open(base / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise exception.ServiceError("fake modal: state lock timed out") from None
                await asyncio.sleep(0.005)
        yield
    finally:
        os.close(fd)


# ---- App, Image, Secret ----------------------------------------------------

class App:
    def __init__(self, name: str, app_id: str) -> None:
        self.name = name
        self.app_id = app_id

    def __repr__(self) -> str:
        return f"App({self.name!r}, app_id={self.app_id!r})"

    @_static
    async def lookup(name: str, *, create_if_missing: bool = False) -> "App":  # type: ignore[misc]
        _check_credentials()
        await _rpc()
        _check_name(name, "App")
        base = base_dir()
        path = base / "apps" / f"{name}.json"
        if not path.exists():
            if not create_if_missing:
                raise NotFoundError(f"Lookup failed for App '{name}' in the default environment")
            async with _locked(base):
                if not path.exists():
                    write_json(path, {"name": name, "app_id": "ap-" + _secrets.token_hex(11)})
        d = read_json(path)
        return App(d["name"], d["app_id"])


class Image:
    def __init__(self, ref: str, files: tuple[tuple[str, str], ...] = ()) -> None:
        self._ref = ref
        self._files = files

    @staticmethod
    def from_registry(tag: str) -> "Image":
        if not isinstance(tag, str) or not tag:
            raise InvalidError("Image.from_registry needs an image tag")
        return Image(tag)

    def add_local_file(self, local_path: str | os.PathLike[str], remote_path: str) -> "Image":
        if not str(remote_path).startswith("/"):
            raise InvalidError(f"remote_path must be absolute, got {remote_path!r}")
        local = os.path.abspath(os.fspath(local_path))
        return Image(self._ref, self._files + ((local, str(remote_path)),))


class Secret:
    def __init__(self, name: Optional[str], values: Optional[dict[str, str]]) -> None:
        self._name = name
        self._values = values

    @staticmethod
    def from_name(name: str) -> "Secret":
        _check_name(name, "Secret")
        return Secret(name, None)

    @staticmethod
    def from_dict(env_dict: dict[str, Optional[str]] = {}) -> "Secret":  # noqa: B006 - as the SDK
        if not isinstance(env_dict, dict) or not all(
                isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in env_dict.items()):
            raise InvalidError("Secret.from_dict() expects a dict of str to str")
        return Secret(None, {k: v for k, v in env_dict.items() if v is not None})

    def _resolve(self, base: Path) -> dict[str, str]:
        if self._values is not None:
            return dict(self._values)
        path = base / "secrets" / f"{self._name}.json"
        if not path.is_file():
            raise NotFoundError(f"Secret '{self._name}' not found in the default environment")
        return {str(k): str(v) for k, v in read_json(path).items()}


# ---- streams and processes -----------------------------------------------------

class _ExecStdin:
    """The worker's end of an exec's stdin (TaskExecStdinWrite(offset, data, eof)):
    bytes are applied at their offset exactly once, a resend of bytes it already
    has is ignored, and the EOF closes the process's stdin."""

    def __init__(self, pipe: asyncio.StreamWriter) -> None:
        self._pipe = pipe
        self.received = 0
        self._closed = False
        self._broke = False
        fault = os.environ.get("SLOT_FAKE_MODAL_STDIN_BREAK_AT", "")
        at, _, mode = fault.partition(":")
        self._break_at = int(at) if at else None
        self._break_applied = mode == "applied"

    def _apply(self, offset: int, data: bytes, eof: bool) -> None:
        if offset > self.received:
            raise InvalidError(f"fake modal: stdin write at offset {offset}, but only "
                               f"{self.received} bytes were received (a gap)")
        new = data[self.received - offset:]
        self.received += len(new)
        if self._closed:
            return  # the exec has ended, or its EOF was sent: the data goes nowhere (?)
        try:
            if new:
                self._pipe.write(new)
            if eof:
                self._pipe.close()
                self._closed = True
        except (BrokenPipeError, ConnectionResetError):
            self._closed = True

    async def write(self, offset: int, data: bytes, eof: bool) -> None:
        if (not self._broke and self._break_at is not None
                and offset + len(data) > self._break_at):
            self._broke = True  # once: the outage was transient
            if self._break_applied:
                self._apply(offset, data, eof)  # it arrived; the reply was lost
            await asyncio.sleep(_STDIO_RETRY_DELAY_S * 10)  # the SDK's retries, abridged
            raise _link_error("writing the exec's stdin")
        self._apply(offset, data, eof)
        try:
            await self._pipe.drain()
        except (BrokenPipeError, ConnectionResetError):
            self._closed = True


class StreamWriter:
    """An exec's stdin, as the SDK's router-backed writer (io_streams.py
    `_StreamWriterThroughCommandRouterBuffer`): write() only buffers (BufferError
    past 16 MiB, ValueError after write_eof); write_eof() only sets a flag;
    drain() sends the whole buffer, and the EOF once write_eof was called, as one
    TaskExecStdinWrite at the writer's offset, and clears the buffer and
    advances the offset only once that call succeeded. So a drain that failed
    or was cancelled, called again, resends the same bytes at the same offset
    and the worker keeps only what it lacked: nothing is lost or doubled.
    The SDK loses bytes written while a drain is in flight (the buffer is
    cleared after the call) and misplaces them when two drains overlap; the
    fake raises RuntimeError for both, so that tests notice."""

    def __init__(self, server: Optional[_ExecStdin]) -> None:
        self._server = server
        self._buffer = bytearray()
        self._is_closed = False
        self._offset = 0
        self._draining = False

    def write(self, data: bytes | bytearray | memoryview | str) -> None:
        if self._is_closed:
            raise ValueError("Stdin is closed. Cannot write to it.")
        if self._draining:
            raise RuntimeError("fake modal: stdin.write() while a drain() is in flight; "
                               "the SDK would lose these bytes")
        if isinstance(data, (bytes, bytearray, memoryview, str)):
            if isinstance(data, str):
                data = data.encode("utf-8")
            if len(self._buffer) + len(data) > _STDIN_MAX_BUFFER:
                raise BufferError("Buffer size exceed limit. Call drain to flush the buffer.")
            self._buffer.extend(data)
        else:
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__}")

    def write_eof(self) -> None:
        self._is_closed = True

    async def _drain(self) -> None:
        if self._draining:
            raise RuntimeError("fake modal: two drain() calls in flight on one stdin; "
                               "the SDK would misplace their bytes")
        eof = self._is_closed
        if not self._buffer and not eof:
            return
        self._draining = True
        try:
            await _rpc()
            data = bytes(self._buffer)
            if self._server is not None:
                await self._server.write(self._offset, data, eof)
            self._buffer.clear()
            self._offset += len(data)
        finally:
            self._draining = False

    drain = _method(_drain)


class StreamReader:
    """An exec's stdout or stderr: raw bytes chunks at arbitrary boundaries,
    read as the SDK's router stream does: the client asks for its byte offset,
    and after a broken connection (SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY) it
    reconnects at that offset, so the chunk in flight is sent again, never
    lost or doubled. Each reconnect spends one of the stream's
    _STDIO_MAX_RETRIES for its whole life; a break with none left raises
    _link_error and ends the iteration for good."""

    def __init__(self, fd: int, source: Optional[asyncio.StreamReader], canned: bytes = b"") -> None:
        self._fd = fd
        self._source = source
        self._canned = canned
        self._gen: Optional[AsyncIterator[bytes]] = None
        self._rng = random.Random()
        self.offset = 0  # bytes delivered (the offset the client would ask for)
        self.retries_left = _STDIO_MAX_RETRIES
        self._discard: Optional[asyncio.Future[None]] = None

    @property
    def file_descriptor(self) -> int:
        return self._fd

    async def _chunks(self) -> AsyncIterator[bytes]:
        server = bytearray(self._canned)  # output the worker holds past our offset
        source_eof = self._source is None
        every = _env_int("SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY") if self._fd == 1 else None
        attempt_bytes = 0  # delivered since the last (re)connect
        delay = _STDIO_RETRY_DELAY_S
        while True:
            if not server:
                if source_eof:
                    return
                assert self._source is not None
                data = await self._source.read(65536)
                if not data:
                    source_eof = True
                    continue
                server += data
            if every and attempt_bytes >= every:
                # The connection breaks with the next chunk in flight; it never arrives.
                if self.retries_left <= 0:
                    # Nobody reads this stream again; the worker keeps taking the
                    # exec's output, so the exec is not blocked by a full pipe.
                    self._discard = asyncio.ensure_future(self._drop_rest())
                    raise _link_error(f"reading the exec's fd {self._fd}")
                self.retries_left -= 1
                await asyncio.sleep(delay)
                delay *= 2
                attempt_bytes = 0
                continue
            n = self._rng.randint(1, 4096)
            if every:
                n = min(n, every - attempt_bytes)
            chunk = bytes(server[:n])
            del server[:n]
            attempt_bytes += len(chunk)
            self.offset += len(chunk)
            delay = _STDIO_RETRY_DELAY_S
            yield chunk

    async def _drop_rest(self) -> None:
        if self._source is not None:
            while await self._source.read(65536):
                pass

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._gen is None:
            self._gen = self._chunks()
        return self._gen

    async def _read(self) -> bytes:
        return b"".join([c async for c in self])

    read = _method(_read)


class ContainerProcess:
    """What Sandbox.exec returns."""

    def __init__(self, proc: Optional[asyncio.subprocess.Process], sb: SandboxDir,
                 failed: Optional[tuple[int, bytes]] = None) -> None:
        self._proc = proc
        self._sb = sb
        self._failed = failed
        self._returncode: Optional[int] = None
        if proc is not None:
            assert proc.stdin is not None
            self.stdin = StreamWriter(_ExecStdin(proc.stdin))
            self.stdout = StreamReader(1, proc.stdout)
            self.stderr = StreamReader(2, proc.stderr)
        else:
            assert failed is not None
            self.stdin = StreamWriter(None)
            self.stdout = StreamReader(1, None)
            self.stderr = StreamReader(2, None, failed[1])

    @property
    def returncode(self) -> int:
        if self._returncode is None:
            raise InvalidError("You must call wait() before accessing the returncode. "
                               "To poll for the status of a running process, use poll() instead.")
        return self._returncode

    async def _wait(self) -> int:
        if self._proc is None:
            assert self._failed is not None
            self._returncode = self._failed[0]
            return self._returncode
        rc = await self._proc.wait()
        self._sb.unregister_exec(self._proc.pid)
        if self._sb.poll() is not None:
            # The sandbox is gone, and its worker with it: the router answers
            # TaskExecWait with NOT_FOUND (task_command_router_client.exec_wait).
            raise NotFoundError(f"Task for sandbox {self._sb.object_id} not found")
        self._returncode = 128 - rc if rc < 0 else rc
        return self._returncode

    wait = _method(_wait)


# A fake exec is a child process of its caller, so a caller that exits while
# one runs would have asyncio complain (on stderr, past its closed loop) about
# the transport: not what Modal's SDK does. Closing our end of the pipes at exit
# ends such an exec's stdin, as documented above.
_live_execs: "weakref.WeakSet[asyncio.subprocess.Process]" = weakref.WeakSet()


@atexit.register
def _quiet_live_execs() -> None:
    for proc in list(_live_execs):
        transport = getattr(proc, "_transport", None)
        if transport is not None and not transport.is_closing():
            transport._closed = True  # asyncio's own flag: its __del__ then stays quiet


# ---- Sandbox -------------------------------------------------------------------

def _map_arg(arg: str, root: Path, files: dict[str, str]) -> str:
    """A path inside the sandbox, as seen from this machine."""
    if arg in files:
        return files[arg]
    if arg.startswith("/"):
        return str(root) + arg
    if arg.startswith("unix:/"):
        return "unix:" + str(root) + arg[5:]
    return arg


class Sandbox:
    def __init__(self, sb: SandboxDir) -> None:
        self._sb = sb
        self._detached = False

    def __repr__(self) -> str:
        return f"Sandbox({self.object_id})"

    @property
    def object_id(self) -> str:
        return self._sb.object_id

    def _ensure_attached(self) -> None:
        if self._detached:
            raise ClientClosed("Unable to perform operation on a detached sandbox")

    @_static
    async def create(
        *args: str,
        app: Optional[App] = None,
        name: Optional[str] = None,
        tags: Optional[dict[str, str]] = None,
        image: Optional[Image] = None,
        env: Optional[dict[str, Optional[str]]] = None,
        secrets: Optional[Sequence[Secret]] = None,
        timeout: int = 300,
        idle_timeout: Optional[int] = None,
        workdir: Optional[str] = None,
        gpu: Optional[str] = None,
        cpu: Optional[float | tuple[float, float]] = None,
        memory: Optional[int | tuple[int, int]] = None,
        block_network: bool = False,
        outbound_cidr_allowlist: Optional[Sequence[str]] = None,
    ) -> "Sandbox":
        if not all(isinstance(a, str) for a in args):
            raise InvalidError("All entrypoint arguments must be strings")
        if sum(len(a) for a in args) > _MAX_ARGS_BYTES:
            raise InvalidError(f"Total length of CMD arguments cannot exceed {_MAX_ARGS_BYTES} bytes")
        if name is not None:
            _check_name(name, "Sandbox")
        if isinstance(gpu, list):
            raise InvalidError("Sandboxes do not support configuring a list of GPUs.")
        if workdir is not None and not workdir.startswith("/"):
            raise InvalidError(f"workdir must be an absolute path, got: {workdir}")
        if block_network and outbound_cidr_allowlist is not None:
            raise InvalidError("`outbound_cidr_allowlist` cannot be used when `block_network` is enabled")
        if app is None:
            raise InvalidError("Sandboxes require an App when created outside of a Modal container.")
        if not (0 < timeout <= _MAX_TIMEOUT_S):
            raise InvalidError(f"timeout must be between 1 and {_MAX_TIMEOUT_S} seconds")
        if idle_timeout is not None and idle_timeout <= 0:
            raise InvalidError("idle_timeout must be positive")
        await _rpc()
        refuse = os.environ.get("SLOT_FAKE_MODAL_REFUSE_CREATE")
        if refuse:
            raise ResourceExhaustedError(refuse)
        base = base_dir()
        image = image or Image("debian_slim")
        for local, _ in image._files:
            if not os.path.isfile(local):
                raise FileNotFoundError(errno.ENOENT, "local file not found", local)
        all_secrets = list(secrets or [])
        if env:
            all_secrets.append(Secret.from_dict(env))
        sandbox_env = {"PATH": _DEFAULT_PATH, "LANG": "C.UTF-8"}
        for s in all_secrets:
            sandbox_env.update(s._resolve(base))
        dict_env: dict[str, str] = {}
        for s in all_secrets:
            if s._values is not None:
                dict_env.update(s._values)
        record = {
            "args": list(args), "app_id": app.app_id, "app": app.name, "name": name,
            "tags": dict(tags or {}),
            "image": {"ref": image._ref, "local_files": [list(f) for f in image._files]},
            "env": dict_env, "secrets": [s._name for s in all_secrets if s._name is not None],
            "timeout": timeout, "idle_timeout": idle_timeout, "workdir": workdir, "gpu": gpu,
            "cpu": list(cpu) if isinstance(cpu, tuple) else cpu,
            "memory": list(memory) if isinstance(memory, tuple) else memory,
            "block_network": block_network,
            "outbound_cidr_allowlist": (list(outbound_cidr_allowlist)
                                        if outbound_cidr_allowlist is not None else None),
        }
        async with _locked(base):
            if name is not None and find_running(base, app.app_id, name) is not None:
                raise AlreadyExistsError(f"Sandbox with name '{name}' already exists in App "
                                         f"'{app.name}'")
            sbdir = SandboxDir(base / "sandboxes" / ("sb-" + _secrets.token_hex(11)))
            sbdir.path.mkdir()
            for d in ("run", "tmp"):  # what an image's root has
                (sbdir.root / d).mkdir(parents=True)
            (sbdir.root / "tmp").chmod(0o1777)
            cwd = sbdir.root / (workdir or "/").lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
            files = {remote: local for local, remote in image._files}
            write_json(sbdir.path / "create.json", record)
            write_json(sbdir.path / "tags.json", dict(tags or {}))
            write_json(sbdir.path / "spec.json", {
                "argv": [_map_arg(a, sbdir.root, files) for a in args] or ["sleep", str(timeout)],
                "cwd": str(cwd), "env": sandbox_env, "timeout": timeout})
            launcher = await asyncio.create_subprocess_exec(
                sys.executable, "-s", "-E", str(_RUNTIME), str(sbdir.path),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True)
            out, _ = await asyncio.wait_for(launcher.communicate(), 20)
            if launcher.returncode != 0:
                raise exception.InternalError(f"fake modal runtime failed: {out.decode(errors='replace')}")
            write_json(sbdir.path / "meta.json", {"object_id": sbdir.object_id, "app_id": app.app_id,
                                                  "name": name, "created": time.time()})
        return Sandbox(sbdir)

    @_static
    async def from_name(app_name: str, name: str) -> "Sandbox":  # type: ignore[misc]
        _check_credentials()
        await _rpc()
        base = base_dir()
        path = base / "apps" / f"{app_name}.json"
        if not path.exists():
            raise NotFoundError(f"App '{app_name}' not found")
        sb = find_running(base, read_json(path)["app_id"], name)
        if sb is None:
            raise NotFoundError(f"Sandbox with name '{name}' not found in App '{app_name}'")
        return Sandbox(sb)

    @_static_gen
    async def list(*, app_id: Optional[str] = None,  # type: ignore[misc]
                   tags: Optional[dict[str, str]] = None) -> AsyncIterator["Sandbox"]:
        _check_credentials()
        await _rpc()
        lag_s = os.environ.get("SLOT_FAKE_MODAL_LIST_LAG_S")
        lag = float(lag_s) if lag_s else None
        for sb in sandboxes(base_dir()):
            if app_id is not None and sb.meta()["app_id"] != app_id:
                continue
            have = sb.tags()
            if tags and any(have.get(k) != v for k, v in tags.items()):
                continue
            if sb.running() or (lag is not None and sb.ended_within(lag)):
                yield Sandbox(sb)

    async def _get_tags(self) -> dict[str, str]:
        self._ensure_attached()
        await _rpc()
        return self._sb.tags()

    get_tags = _method(_get_tags)

    async def _poll(self) -> Optional[int]:
        self._ensure_attached()
        await _rpc()
        return self._sb.poll()

    poll = _method(_poll)

    async def _terminate(self, *, wait: bool = False) -> Optional[int]:
        self._ensure_attached()
        await _rpc()
        self._sb.request_terminate()
        if not wait:
            return None
        deadline = time.monotonic() + 30
        while not self._sb.finished() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if not self._sb.finished():
            self._sb.force_finish()
        return self._sb.returncode()

    terminate = _method(_terminate)

    async def _detach(self) -> None:
        self._detached = True

    detach = _method(_detach)

    async def _exec(self, *args: str, text: bool = True) -> ContainerProcess:
        self._ensure_attached()
        if not args or not all(isinstance(a, str) for a in args):
            raise InvalidError("exec needs at least one argument, all strings")
        if text:
            raise NotImplementedError("the fake modal implements exec(..., text=False) only")
        await _rpc()
        rc = self._sb.poll()
        if rc is not None:
            raise ConflictError(f"Sandbox {self.object_id} has already finished (exit code {rc})")
        spec = read_json(self._sb.path / "spec.json")
        files = {remote: local for local, remote in self._sb.create_args()["image"]["local_files"]}
        argv = [_map_arg(a, self._sb.root, files) for a in args]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=spec["cwd"], env=spec["env"],
                start_new_session=True)
        except OSError as e:
            code = 126 if e.errno in (errno.EACCES, errno.ENOEXEC) else 127
            return ContainerProcess(None, self._sb,
                                    (code, f'exec: "{args[0]}": {e.strerror.lower()}\n'.encode()))
        self._sb.register_exec(proc.pid)
        _live_execs.add(proc)
        if self._sb.poll() is not None:  # it ended meanwhile: the runtime may have missed this exec
            self._sb.kill_execs()
        return ContainerProcess(proc, self._sb)

    exec = _method(_exec)


from . import container_process, io_streams  # noqa: E402 - the SDK's submodules, as `import modal` loads them
