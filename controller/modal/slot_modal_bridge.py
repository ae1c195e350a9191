#!/usr/bin/python3
"""slot-modal-bridge: a slot-agent in a Modal sandbox, reached over stdin/stdout.

The controller's `modal` backend runs this as an agent's launch command: the
bridge's stdin/stdout *is* the agent's wire stream (proto/PROTOCOL.md), carried
byte for byte, never reframed. Inside the sandbox the agent runs as the
sandbox's own long-lived process on a Unix socket, and each bridge is one
`slot-agent --attach` exec relaying to it, so a bridge that ends (or dies)
loses nothing: the next bridge for the same name finds the same agent, its
leases and its running commands. Standard library plus Modal's SDK only.

Usage
-----
  slot-modal-bridge attach --app APP --name NAME
      [--image REF]          registry image (default debian:bookworm-slim; it must have /run)
      [--agent-bin PATH]     local static slot-agent to put in the image (default: slot-agent
                             next to this file, else on PATH); needed only to create
      [--slots N]            slots of a new agent (default 4)
      [--workdir DIR]        sandbox workdir and the agent's --data-dir (default /workspace)
      [--cpu F] [--memory MIB] [--gpu G]
      [--timeout SECONDS]    sandbox lifetime (default 86400, Modal's maximum; more is refused)
      [--idle-timeout SECONDS]  Modal's idle timeout (default: none; see below)
      [--secret NAME]...     Modal secrets (modal.Secret.from_name) as environment
      [--env K=V]...         environment of the sandbox
      [--block-network] [--cidr-allowlist CIDR]...
      [--isolation best_effort|required]   the agent's default isolation
      [--slot-disk SIZE] [--slot-inodes N] the agent's per-slot budgets (default: its own)
      [--on-signal detach|terminate]       on SIGTERM/SIGINT (default detach)
      [--no-create]          only attach to a running sandbox
  slot-modal-bridge list --app APP [--prefix P] [--strip S]
      prints the names of the app's running sandboxes made by this bridge
      (tag slot_bridge=1) that start with P, one per line, without their
      leading S (the controller strips "APP-" to get its agent ids); exit 0.
      Each listed sandbox is polled first (`sb.poll()`), so one that has ended
      but is still in Modal's listing is left out: a name printed is a
      sandbox that runs, one to attach to again.
  slot-modal-bridge terminate --app APP --name NAME
      terminates that sandbox (waits for it to end); exit 0 also when it does not exist

attach: `App.lookup(APP, create_if_missing=True)`; reuse the running sandbox
named NAME (`Sandbox.from_name`), else create it (unless --no-create) from
`Image.from_registry(REF).add_local_file(AGENT_BIN, "/usr/local/bin/slot-agent")`
with tags {slot_bridge: "1", slot_name: NAME}, the profile's resources, and as
its process `/usr/local/bin/slot-agent --listen unix:/run/slot-agent.sock
--slots N --data-dir WORKDIR --pass-env '*' [--isolation I] [--slot-disk SIZE]
[--slot-inodes N]` (commands see the
sandbox's environment: the image's ENV, the Secrets, --env). A lost creation race
(AlreadyExistsError) attaches to the winner. An existing sandbox is reused as
it is: its image, resources and slots are not compared with the flags. Then
`sb.exec("/usr/local/bin/slot-agent", "--attach", "unix:/run/slot-agent.sock",
"--attach-timeout", "30", text=False)`: the relay itself waits (bounded) for
the agent's socket of a sandbox that is still starting. Bytes are pumped both
ways: stdin in chunks of at most 1 MiB, each `write` followed by `drain`;
local EOF becomes `write_eof` + `drain`; exec stdout is written to fd 1 as it
arrives. The exec's stderr is copied to ours, each line prefixed `sandbox: `.

Modal SDK versions
------------------
Every subcommand first checks `modal.__version__` against the releases this
bridge is written for: 1.4 to 1.5.x (SDK_MIN, SDK_MAX). 1.4.0 fixed an exec
that hung when its sandbox died right after creation, and the exec transport
the bridge relies on (offset-resumed stdio straight to the worker, 1.2.3) and
64-character sandbox names (1.2.2) are older; the SDK surface used here was
checked against 1.5.4's source. Later releases (1.6 is out) are refused until
someone checks the signatures again. Outside the range: exit 2 with
`slot-modal-bridge: Modal SDK V is not supported (supported: 1.4 to 1.5.x) ...`.
SLOT_MODAL_ANY_SDK=1 lets any version through, with one line
`slot-modal-bridge: warning: ...` first on stderr.

Exit codes (attach; list and terminate use 0, 2, 3 and 1)
--------------------------------------------------------
  0  the stream ended normally: local EOF and the exec finished; or a
     SIGTERM/SIGINT was handled (--on-signal detach: the sandbox and its agent
     keep running; terminate: the sandbox was terminated)
  1  anything else (Modal unreachable, a step timed out, the agent closed the
     stream on its own, local stdout closed, the link failed and the
     sandbox's state could not be learnt, internal error)
  2  usage (bad flags, bad name, agent binary not found, --timeout above
     Modal's 24 h) or an unsupported Modal SDK version
  3  no usable Modal credentials (modal.exception.AuthError)
  4  sandbox creation refused (quota, rate limit, invalid request, missing secret)
  5  sandbox gone: it ended (exit code, 124 when its timeout passed, 137 when
     terminated or its agent was killed) or no longer exists (an exec or a
     poll gave ConflictError or NotFoundError); also --no-create and no such
     running sandbox. `list` does not print it. Reason `sandbox gone: ...`
  6  the exec failed (could not start, or the relay exited non-zero, e.g. the
     agent binary is missing in the sandbox or its socket never appeared)
  7  the link to the sandbox ended and the sandbox still runs: attach again.
     The exec's stdout stream or a stdin drain failed for good (the SDK
     resumes a broken stream itself, but with a budget of 10 reconnects for
     the stream's whole life, and retries a drain 10 times; then it raises
     ConnectionError, ServiceError, ...), and polling the sandbox (bounded:
     about GONE_GRACE s, each poll at most POLL_TIMEOUT s) found it running.
     Reason `the link to sandbox 'N' ended (...); the sandbox still runs:
     attach again`. A new bridge with the same flags reaches the same agent.
Every failure prints exactly one line `slot-modal-bridge: <reason>` on stderr,
last; nothing else is printed by the bridge except the exec's `sandbox: ` lines
(and the SLOT_MODAL_ANY_SDK warning).

The bytes, and what a link that ends may cost
---------------------------------------------
Each direction is an exact prefix of its source, in order, no byte twice and
none skipped, up to where the link ended:
- up: the relay's stdin gets the bytes read from fd 0. Each read (at most
  1 MiB, whatever has arrived, so its ends fall anywhere in a frame) is one
  `write` + `drain`. The SDK sends a drain as one offset-stamped
  TaskExecStdinWrite, retries it itself and keeps its buffer until it
  succeeded, so the worker applies it once or not at all. The bridge never
  calls write or drain while a drain is in flight (the SDK would lose those
  bytes), never writes the same bytes twice, and a drain that fails for good
  ends the bridge.
- down: fd 1 gets the relay's stdout. Each chunk the SDK yields is written
  to fd 1 completely before the next is read; the SDK resumes a broken
  stream at its byte offset, so nothing is lost or doubled while its budget
  lasts.
When the bridge ends any other way than a clean EOF, it sends the relay an
EOF (bounded; the drain resends at the same offset whatever a failed drain
left, which the worker keeps only if it lacked it), so the agent closes that
connection. The last request may then have reached the agent only in part
(the agent drops a partial frame with its connection) and the last response
may have reached fd 1 only in part (the reader must drop a partial frame when
the link ends). Bytes read from fd 0 but not sent die with this bridge: the
next bridge opens a new connection to the agent and starts at whatever the
controller sends it, which resends whole requests with their idempotency
keys. No bridge ever writes a byte, so half a frame, twice.

Modal's idle timeout (--idle-timeout)
-------------------------------------
Modal's guide counts a sandbox as active while an exec runs, while its stdin
is written or while a tunnel has a connection; its own process (here the
agent) is not on that list. So a sandbox with a bridge attached (a relay exec
running) is never idle, and one without is idle even while its agent runs
commands: with --idle-timeout T, Modal terminates it T s after its last relay
exec ended, agent, leases, running commands and files with it. Between two
bridges (a reconnect, a controller restart) the clock runs: a T shorter than
that gap loses the agent. Without --idle-timeout the bridge gives Modal none,
and only --timeout (or terminate) ends the sandbox. A relay left behind by a
bridge killed with SIGKILL keeps running (Modal cannot end one exec) and so
keeps the sandbox active.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, NoReturn, Optional, TypeVar

if TYPE_CHECKING:
    import modal

PROG = "slot-modal-bridge"

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_AUTH = 3
EXIT_CREATE = 4
EXIT_GONE = 5
EXIT_EXEC = 6
EXIT_LINK = 7

# Modal SDK releases this bridge is written for (major, minor), inclusive.
SDK_MIN = (1, 4)
SDK_MAX = (1, 5)
ANY_SDK_ENV = "SLOT_MODAL_ANY_SDK"

AGENT_REMOTE = "/usr/local/bin/slot-agent"
AGENT_ADDR = "unix:/run/slot-agent.sock"
TAG_BRIDGE = "slot_bridge"
TAG_NAME = "slot_name"
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_TIMEOUT_S = 86400  # Modal's cap on a sandbox's lifetime (24 h)
RC_TIMEOUT = 124  # a sandbox's exit code when its timeout passed
RC_TERMINATED = 137  # ... when it was terminated (or its process got SIGKILL)

UP_CHUNK = 1 << 20  # per write+drain; the SDK refuses more than 16 MiB buffered
ATTACH_WAIT_S = 30  # the relay's own wait for the agent's socket

# Bounds on every wait (seconds).
LOOKUP_TIMEOUT = 60.0
CREATE_TIMEOUT = 600.0  # the first create may build the image
EXEC_TIMEOUT = 180.0  # the first exec waits for the sandbox to be scheduled
WAIT_TIMEOUT = 10.0  # exec exit code after its stdout ended
POLL_TIMEOUT = 15.0
GONE_GRACE = 3.0  # how long a stream that ended or failed is checked for a dead sandbox
UP_FAIL_GRACE = 3.0  # after a drain failed: time for the exec's stdout to end on its own
WATCH_INTERVAL = 15.0  # safety-net poll of the sandbox while streaming
SIGNAL_EOF_TIMEOUT = 1.5  # on a signal: EOF to the relay, and its exit
SIGNAL_SETUP_GRACE = 3.0  # on a signal during setup with --on-signal terminate
DETACH_TIMEOUT = 5.0
TERMINATE_TIMEOUT = 4.0  # on a signal; the controller kills us after ~5 s
TERMINATE_CMD_TIMEOUT = 60.0
LIST_POLLS = 16  # list: polls in flight at once

T = TypeVar("T")


class Failure(Exception):
    """Ends the bridge with `code` and the one-line `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = " ".join(reason.split())  # one line, always


def describe(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def ended(rc: int) -> str:
    if rc == RC_TIMEOUT:
        return f"exit code {rc}: its timeout passed"
    if rc == RC_TERMINATED:
        return f"exit code {rc}: terminated, or its agent was killed"
    return f"exit code {rc}"


# ---- the Modal SDK's version ---------------------------------------------------------

def sdk_range() -> str:
    return f"{SDK_MIN[0]}.{SDK_MIN[1]} to {SDK_MAX[0]}.{SDK_MAX[1]}.x"


def sdk_problem(version: object) -> Optional[str]:
    """Why `version` (modal.__version__) is not one this bridge supports, or None."""
    m = re.match(r"^(\d+)\.(\d+)", version) if isinstance(version, str) else None
    if m is None:
        return f"Modal SDK version {version!r} is not understood (supported: {sdk_range()})"
    if not SDK_MIN <= (int(m[1]), int(m[2])) <= SDK_MAX:
        return f"Modal SDK {version} is not supported (supported: {sdk_range()})"
    return None


def check_sdk(version: object) -> None:
    """Refuses (exit 2) an SDK outside SDK_MIN..SDK_MAX unless SLOT_MODAL_ANY_SDK is set."""
    problem = sdk_problem(version)
    if problem is None:
        return
    if os.environ.get(ANY_SDK_ENV, "").lower() in ("1", "true", "yes"):
        print(f"{PROG}: warning: {problem}; going on as {ANY_SDK_ENV} is set", file=sys.stderr)
        return
    raise Failure(EXIT_USAGE, f"{problem}; pip install 'modal>={SDK_MIN[0]}.{SDK_MIN[1]},"
                              f"<{SDK_MAX[0]}.{SDK_MAX[1] + 1}', or set {ANY_SDK_ENV}=1 to "
                              "try this one")


# ---- command line ----------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0: {s!r}")
    return v


def modal_name(s: str) -> str:
    if not NAME_RE.match(s):
        raise argparse.ArgumentTypeError(
            f"{s!r} is not a Modal name (1-64 characters of A-Z a-z 0-9 . _ -)")
    return s


def env_pair(s: str) -> tuple[str, str]:
    k, sep, v = s.partition("=")
    if not sep or not k or "\0" in s:
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {s!r}")
    return k, v


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog=PROG, description="A slot-agent in a Modal sandbox, over stdin/stdout.",
               epilog="Exit codes: 0 ok, 1 other error, 2 usage or unsupported Modal SDK, "
                      "3 no credentials, 4 creation refused, 5 sandbox gone, 6 exec failed, "
                      "7 link ended but the sandbox runs (attach again).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{attach,list,terminate}",
                           parser_class=Parser)

    a = sub.add_parser("attach", help="relay stdin/stdout to the agent of sandbox NAME")
    a.add_argument("--app", required=True, type=modal_name)
    a.add_argument("--name", required=True, type=modal_name)
    a.add_argument("--image", default="debian:bookworm-slim")
    a.add_argument("--agent-bin")
    a.add_argument("--slots", type=positive_int, default=4)
    a.add_argument("--workdir", default="/workspace")
    a.add_argument("--cpu", type=positive_float)
    a.add_argument("--memory", type=positive_int, help="MiB")
    a.add_argument("--gpu")
    a.add_argument("--timeout", type=positive_int, default=MAX_TIMEOUT_S)
    a.add_argument("--idle-timeout", type=positive_int)
    a.add_argument("--secret", action="append", default=[], type=modal_name)
    a.add_argument("--env", action="append", default=[], type=env_pair)
    a.add_argument("--block-network", action="store_true")
    a.add_argument("--cidr-allowlist", action="append", default=[])
    a.add_argument("--isolation", choices=["best_effort", "required"])
    a.add_argument("--slot-disk")
    a.add_argument("--slot-inodes")
    a.add_argument("--on-signal", choices=["detach", "terminate"], default="detach")
    a.add_argument("--no-create", action="store_true")

    ls = sub.add_parser("list", help="names of the app's running bridge sandboxes")
    ls.add_argument("--app", required=True, type=modal_name)
    ls.add_argument("--prefix", default="")
    ls.add_argument("--strip", default="")

    t = sub.add_parser("terminate", help="terminate sandbox NAME (ok if absent)")
    t.add_argument("--app", required=True, type=modal_name)
    t.add_argument("--name", required=True, type=modal_name)

    args = p.parse_args(argv)
    if args.cmd == "attach":
        if not args.workdir.startswith("/"):
            p.error(f"--workdir must be absolute, got {args.workdir!r}")
        if args.timeout > MAX_TIMEOUT_S:
            p.error(f"--timeout is {args.timeout} s; Modal sandboxes live at most "
                    f"{MAX_TIMEOUT_S} s (24 h)")
        if args.block_network and args.cidr_allowlist:
            p.error("--block-network and --cidr-allowlist exclude each other")
        if not args.image:
            p.error("--image must not be empty")
    return args


def find_agent_bin(given: Optional[str]) -> str:
    """The local agent binary to put in a new sandbox's image."""
    if given:
        path = given
    else:
        here = os.path.join(os.path.dirname(os.path.realpath(__file__)), "slot-agent")
        path = here if os.path.isfile(here) else (shutil.which("slot-agent") or "")
        if not path:
            raise Failure(EXIT_USAGE, "no slot-agent next to the bridge or on PATH; "
                                      "pass --agent-bin")
    try:
        st = os.stat(path)
    except OSError as e:
        raise Failure(EXIT_USAGE, f"--agent-bin {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or not os.access(path, os.X_OK):
        raise Failure(EXIT_USAGE, f"--agent-bin {path}: not an executable file")
    return os.path.abspath(path)


# ---- local stdin/stdout ------------------------------------------------------------

class LocalIn:
    """fd 0 as an asyncio reader; a thread reads it when it cannot be polled."""

    def __init__(self) -> None:
        self._reader: Optional[asyncio.StreamReader] = None
        self._queue: Optional[asyncio.Queue[bytes]] = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=UP_CHUNK, loop=loop)
        try:
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                                         os.fdopen(0, "rb", buffering=0, closefd=False))
            self._reader = reader
        except (OSError, ValueError):  # a regular file or /dev/null: cannot be polled
            queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
            self._queue = queue

            def pump() -> None:
                while True:
                    try:
                        data = os.read(0, UP_CHUNK)
                    except OSError:
                        data = b""
                    try:
                        asyncio.run_coroutine_threadsafe(queue.put(data), loop).result()
                    except Exception:  # noqa: BLE001 - the loop is gone: we are exiting
                        return
                    if not data:
                        return

            threading.Thread(target=pump, name="stdin", daemon=True).start()

    async def read(self) -> bytes:
        """Up to UP_CHUNK bytes; b"" at EOF, and when fd 0 fails (its writer is gone)."""
        if self._reader is not None:
            try:
                return await self._reader.read(UP_CHUNK)
            except OSError:
                return b""
        assert self._queue is not None
        return await self._queue.get()


class LocalClosed(Exception):
    pass


class LocalOut:
    """fd 1, written fully and promptly (no buffering beyond the pipe's)."""

    def __init__(self) -> None:
        self._writer: Optional[asyncio.StreamWriter] = None
        self._socket = False

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        if stat.S_ISSOCK(os.fstat(1).st_mode):
            # A socketpair (how slot-controller runs us): fd 0 and fd 1 are one
            # socket, so a write-pipe transport would take the controller's
            # next request on it for the far end closing. Write by hand.
            self._socket = True
            return
        try:
            transport, protocol = await loop.connect_write_pipe(
                asyncio.streams.FlowControlMixin, os.fdopen(1, "wb", buffering=0, closefd=False))
            # drain() returns only once the pipe took every byte: nothing waits
            # in our buffer when the bridge exits (fd 1 is an exact prefix).
            transport.set_write_buffer_limits(high=0)
            self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
        except (OSError, ValueError):
            self._writer = None  # a regular file: plain blocking writes are fine

    async def _write_socket(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(1, view):]
            except BlockingIOError:  # non-blocking: fd 0's reader shares the flag
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(1, lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_writer(1)

    async def write(self, data: bytes) -> None:
        try:
            if self._socket:
                await self._write_socket(data)
            elif self._writer is not None:
                if self._writer.transport.is_closing():
                    raise LocalClosed()
                self._writer.write(data)
                await self._writer.drain()
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(1, view):]
        except OSError as e:  # EPIPE, ECONNRESET, ...: our reader is gone
            raise LocalClosed(describe(e)) from e


# ---- the bridge ---------------------------------------------------------------------

@dataclass
class Session:
    """State of one attach run."""

    args: argparse.Namespace
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sb: Optional["modal.Sandbox"] = None
    local_eof: bool = False  # fd 0 ended and the EOF was handed to the SDK
    eof_failed: bool = False  # ... but its drain did not succeed (yet)
    last_exec_stderr: str = ""


def auth_failure(e: BaseException) -> Failure:
    return Failure(EXIT_AUTH, f"no usable Modal credentials: {describe(e)}")


async def bounded(what: str, aw: Awaitable[T], timeout: float) -> T:
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise Failure(EXIT_ERROR, f"timed out after {timeout:.0f} s {what}") from None


class Bridge:
    def __init__(self, args: argparse.Namespace) -> None:
        import modal
        import modal.exception

        self.modal = modal
        self.mx = modal.exception
        self.s = Session(args)

    # -- setup

    async def lookup_app(self, create: bool) -> "modal.App":
        a = self.s.args
        try:
            return await bounded("looking up the Modal app",
                                 self.modal.App.lookup.aio(a.app, create_if_missing=create),
                                 LOOKUP_TIMEOUT)
        except self.mx.AuthError as e:
            raise auth_failure(e) from None
        except self.mx.Error as e:
            raise Failure(EXIT_ERROR, f"looking up app {a.app!r}: {describe(e)}") from None

    async def running_sandbox(self) -> Optional["modal.Sandbox"]:
        a = self.s.args
        try:
            sb = await bounded("looking up the sandbox",
                               self.modal.Sandbox.from_name.aio(a.app, a.name), LOOKUP_TIMEOUT)
            rc = await bounded("polling the sandbox", sb.poll.aio(), POLL_TIMEOUT)
        except self.mx.NotFoundError:
            return None
        except self.mx.AuthError as e:
            raise auth_failure(e) from None
        except self.mx.Error as e:
            raise Failure(EXIT_ERROR, f"looking up sandbox {a.name!r}: {describe(e)}") from None
        return sb if rc is None else None

    async def create_sandbox(self, app: "modal.App") -> "modal.Sandbox":
        a = self.s.args
        m = self.modal
        agent_bin = find_agent_bin(a.agent_bin)
        image = m.Image.from_registry(a.image).add_local_file(agent_bin, AGENT_REMOTE)
        # --pass-env '*': commands get what the image, the Secrets and --env
        # put in the sandbox's environment, as Modal's own exec would give.
        entry = [AGENT_REMOTE, "--listen", AGENT_ADDR, "--slots", str(a.slots),
                 "--data-dir", a.workdir, "--pass-env", "*"]
        if a.isolation:
            entry += ["--isolation", a.isolation]
        if a.slot_disk:
            entry += ["--slot-disk", a.slot_disk]
        if a.slot_inodes:
            entry += ["--slot-inodes", a.slot_inodes]
        kw: dict[str, Any] = {
            "app": app, "name": a.name, "tags": {TAG_BRIDGE: "1", TAG_NAME: a.name},
            "image": image, "timeout": a.timeout, "workdir": a.workdir,
            "secrets": [m.Secret.from_name(s) for s in a.secret],
        }
        if a.env:
            kw["env"] = dict(a.env)
        if a.cpu is not None:
            kw["cpu"] = a.cpu
        if a.memory is not None:
            kw["memory"] = a.memory
        if a.gpu:
            kw["gpu"] = a.gpu
        if a.idle_timeout is not None:
            kw["idle_timeout"] = a.idle_timeout
        if a.block_network:
            kw["block_network"] = True
        if a.cidr_allowlist:
            kw["outbound_cidr_allowlist"] = list(a.cidr_allowlist)
        try:
            return await bounded("creating the sandbox", m.Sandbox.create.aio(*entry, **kw),
                                 CREATE_TIMEOUT)
        except self.mx.AlreadyExistsError:
            raise
        except self.mx.AuthError as e:
            raise auth_failure(e) from None
        except (self.mx.Error, OSError) as e:
            raise Failure(EXIT_CREATE, f"sandbox creation refused: {describe(e)}") from None

    async def find_or_create(self) -> "modal.Sandbox":
        a = self.s.args
        app = await self.lookup_app(create=True)
        for _ in range(3):
            sb = await self.running_sandbox()
            if sb is not None:
                return sb
            if a.no_create:
                raise Failure(EXIT_GONE, f"sandbox gone: no running sandbox {a.name!r} in app "
                                         f"{a.app!r} (--no-create)")
            try:
                return await self.create_sandbox(app)
            except self.mx.AlreadyExistsError:
                continue  # lost a creation race: attach to the winner
        raise Failure(EXIT_ERROR, f"sandbox {a.name!r} kept appearing and vanishing")

    async def start_relay(self, sb: "modal.Sandbox") -> "modal.container_process.ContainerProcess":
        try:
            return await bounded(
                "starting the relay exec",
                sb.exec.aio(AGENT_REMOTE, "--attach", AGENT_ADDR,
                            "--attach-timeout", str(ATTACH_WAIT_S), text=False),
                EXEC_TIMEOUT)
        except (self.mx.ConflictError, self.mx.NotFoundError) as e:
            # The sandbox ended (or went) between the lookup and the exec.
            raise Failure(EXIT_GONE, f"sandbox gone: {self.s.args.name!r}: {describe(e)}") from None
        except self.mx.AuthError as e:
            raise auth_failure(e) from None
        except (self.mx.Error, OSError) as e:
            raise Failure(EXIT_EXEC, f"exec failed: {describe(e)}") from None

    async def setup(self) -> "modal.container_process.ContainerProcess":
        sb = await self.find_or_create()
        self.s.sb = sb
        return await self.start_relay(sb)

    # -- pumps

    async def pump_up(self, p: Any, local: LocalIn) -> None:
        """fd 0 to the relay's stdin: one write + drain per read, one at a time
        (never a write or a drain while a drain is in flight; a drain that
        fails ends this task, and its bytes are never written again)."""
        while True:
            data = await local.read()
            if not data:
                break
            p.stdin.write(data)
            await p.stdin.drain.aio()
        self.s.local_eof = True
        self.s.eof_failed = True
        p.stdin.write_eof()
        await p.stdin.drain.aio()
        self.s.eof_failed = False

    async def pump_down(self, p: Any, out: LocalOut) -> None:
        async for chunk in p.stdout:
            await out.write(chunk)

    async def pump_err(self, p: Any) -> None:
        pending = b""
        async for chunk in p.stderr:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.exec_stderr_line(line)
        if pending:
            self.exec_stderr_line(pending)

    def exec_stderr_line(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:
            self.s.last_exec_stderr = text
            sys.stderr.write(f"sandbox: {text}\n")
            sys.stderr.flush()

    async def watch(self, sb: "modal.Sandbox") -> int:
        """Returns the sandbox's exit code once it has ended (a safety net: the
        exec stream normally ends first)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                rc = await asyncio.wait_for(sb.poll.aio(), POLL_TIMEOUT)
            except (asyncio.TimeoutError, self.mx.Error):
                continue
            if rc is not None:
                return int(rc)

    async def sandbox_state(self, grace: float) -> tuple[str, str]:
        """Whether the sandbox still runs, polled for `grace` s (each poll at most
        POLL_TIMEOUT s) so that one dying with the stream is seen to end:
        ("gone", why) once it has ended or is not found; ("running", "") if it
        answered "running" and did not end meanwhile; ("unknown", why) if it
        never answered."""
        sb = self.s.sb
        assert sb is not None
        deadline = time.monotonic() + grace
        seen_running = False
        why = "no answer"
        while True:
            try:
                rc = await asyncio.wait_for(sb.poll.aio(), POLL_TIMEOUT)
            except asyncio.TimeoutError:
                why = f"polling it timed out after {POLL_TIMEOUT:.0f} s"
            except self.mx.NotFoundError as e:
                return "gone", f"not found ({describe(e)})"
            except (self.mx.Error, OSError) as e:
                why = f"polling it failed: {describe(e)}"
            else:
                if rc is not None:
                    return "gone", f"ended ({ended(int(rc))})"
                seen_running = True
            if time.monotonic() >= deadline:
                return ("running", "") if seen_running else ("unknown", why)
            await asyncio.sleep(0.1)

    def is_link_error(self, e: BaseException) -> bool:
        """An error of the exec's streams that ends the link but tells nothing of
        the sandbox: what the SDK raises once its retries are spent (the builtin
        ConnectionError for an OSError or a timeout; ServiceError, InternalError,
        ... for a gRPC status; grpclib's StreamTerminatedError), or any other
        Modal error. Not: LocalClosed, or a bug of ours."""
        if isinstance(e, (OSError, asyncio.TimeoutError, self.mx.Error)):
            return True
        return any(c.__name__ == "StreamTerminatedError" for c in type(e).__mro__)

    async def link_failed(self, p: Any, error: BaseException, where: str,
                          end_relay: bool = True) -> NoReturn:
        """The exec's stream failed with `error` in `where`: a gone sandbox (5),
        a link that ended while the sandbox runs (7), or neither known (1)."""
        name = self.s.args.name
        state, why = await self.sandbox_state(GONE_GRACE)
        if state == "gone":
            raise Failure(EXIT_GONE, f"sandbox gone: {name!r} {why}")
        if end_relay:
            await self.end_relay(p)
        await self.detach()
        cause = f"{where}: {describe(error)}"
        if not self.is_link_error(error):
            raise Failure(EXIT_ERROR, f"internal error in the exec stream ({cause})")
        if state == "running":
            raise Failure(EXIT_LINK, f"the link to sandbox {name!r} ended ({cause}); "
                                     "the sandbox still runs: attach again")
        raise Failure(EXIT_ERROR, f"the link to sandbox {name!r} ended ({cause}) and the "
                                  f"sandbox's state is unknown: {why}")

    # -- the session

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.s.stop.set)
        local_in, local_out = LocalIn(), LocalOut()
        await local_in.open()
        await local_out.open()

        setup = asyncio.create_task(self.setup())
        stopper = asyncio.create_task(self.s.stop.wait())
        await asyncio.wait({setup, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not setup.done():
            return await self.signal_during_setup(setup)
        stopper.cancel()
        p = setup.result()  # raises Failure
        return await self.stream(p, local_in, local_out)

    async def signal_during_setup(self, setup: asyncio.Task[Any]) -> int:
        if self.s.args.on_signal == "terminate":
            # Let a create in flight finish so that nothing is left behind.
            try:
                await asyncio.wait_for(asyncio.shield(setup), SIGNAL_SETUP_GRACE)
            except BaseException:  # noqa: B036 - any outcome: we are stopping
                pass
        setup.cancel()
        try:
            await setup
        except BaseException:  # noqa: B036
            pass
        return await self.finish_on_signal(None)

    async def finish_on_signal(self, p: Any) -> int:
        sb = self.s.sb
        if self.s.args.on_signal == "terminate":
            if sb is None:
                try:  # a create that was cut short may still have made it
                    sb = await asyncio.wait_for(self.running_sandbox(), SIGNAL_SETUP_GRACE)
                except (asyncio.TimeoutError, Failure):
                    sb = None
            if sb is not None:
                try:
                    await asyncio.wait_for(sb.terminate.aio(wait=True), TERMINATE_TIMEOUT)
                except asyncio.TimeoutError:
                    pass  # asked for; it ends on Modal's side
                except self.mx.Error as e:
                    raise Failure(EXIT_ERROR, f"terminating the sandbox: {describe(e)}") from None
            return EXIT_OK
        if p is not None and not self.s.local_eof:
            # End the relay in the sandbox: the agent then closes this connection
            # (its leases and commands stay). The pumps are stopped: no drain is
            # in flight.
            await self.end_relay(p)
        await self.detach()
        return EXIT_OK

    async def detach(self) -> None:
        if self.s.sb is not None:
            try:
                await asyncio.wait_for(self.s.sb.detach.aio(), DETACH_TIMEOUT)
            except (asyncio.TimeoutError, self.mx.Error):
                pass

    async def stream(self, p: Any, local_in: LocalIn, local_out: LocalOut) -> int:
        sb = self.s.sb
        assert sb is not None
        up = asyncio.create_task(self.pump_up(p, local_in))
        down = asyncio.create_task(self.pump_down(p, local_out))
        err = asyncio.create_task(self.pump_err(p))
        watch = asyncio.create_task(self.watch(sb))
        stopper = asyncio.create_task(self.s.stop.wait())
        pending: set[asyncio.Task[Any]] = {up, down, watch, stopper}
        limit: Optional[float] = None  # set once sending failed: the exec may be ending
        try:
            while True:
                done, pending = await asyncio.wait(pending, timeout=limit,
                                                   return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    up.cancel()
                    down.cancel()
                    await asyncio.gather(up, down, return_exceptions=True)
                    return await self.finish_on_signal(p)
                if watch in done:
                    raise Failure(EXIT_GONE, f"sandbox gone: {self.s.args.name!r} ended "
                                             f"({ended(watch.result())})")
                if down in done:
                    return await self.stream_ended(p, down, up, err)
                if not done:  # sending failed and the exec's stdout did not end
                    down.cancel()
                    await asyncio.gather(down, return_exceptions=True)
                    e = up.exception()
                    assert e is not None
                    await self.link_failed(p, e, "sending")
                if up in done and up.exception() is not None:
                    limit = UP_FAIL_GRACE
        finally:
            for t in (up, down, err, watch, stopper):
                t.cancel()
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: never logged at exit

    async def stream_ended(self, p: Any, down: asyncio.Task[None], up: asyncio.Task[None],
                           err: asyncio.Task[None]) -> int:
        if not up.done():
            up.cancel()
        # Never touch stdin while a drain may be in flight (the SDK would lose bytes).
        await asyncio.gather(up, return_exceptions=True)
        up_error = None if up.cancelled() else up.exception()
        down_error = down.exception()
        if isinstance(down_error, LocalClosed):
            await self.end_relay(p)
            await self.detach()
            raise Failure(EXIT_ERROR, "local stdout closed")
        if down_error is not None:
            await self.link_failed(p, down_error, "receiving")
        # The exec's stdout ended: the relay exited, or the sandbox is ending.
        rc: Optional[int] = None
        wait_error: Optional[BaseException] = None
        try:
            rc = int(await asyncio.wait_for(p.wait.aio(), WAIT_TIMEOUT))
        except asyncio.TimeoutError:
            rc = None
        except (self.mx.Error, OSError) as e:
            wait_error = e
        try:  # the relay's last words, for the reason
            await asyncio.wait_for(asyncio.shield(err), 1.0)
        except BaseException:  # noqa: B036
            pass
        if rc == 0 and self.s.local_eof:
            await self.detach()
            return EXIT_OK
        if rc is None and (wait_error or up_error) is not None:
            cause = wait_error or up_error
            assert cause is not None
            await self.link_failed(p, cause, "waiting for the relay" if wait_error else "sending",
                                   end_relay=False)
        state, why = await self.sandbox_state(GONE_GRACE)
        if state == "gone":
            raise Failure(EXIT_GONE, f"sandbox gone: {self.s.args.name!r} {why}")
        await self.detach()
        if rc is None:
            raise Failure(EXIT_ERROR, "the relay exec did not report an exit code")
        if rc != 0:
            why = f": {self.s.last_exec_stderr}" if self.s.last_exec_stderr else ""
            raise Failure(EXIT_EXEC, f"exec failed: slot-agent --attach exited with status {rc}{why}")
        raise Failure(EXIT_ERROR, "the agent closed the stream")

    async def end_relay(self, p: Any, wait: bool = True) -> None:
        """End the relay in the sandbox (EOF, then its exit; each bounded), so
        that the agent drops this connection. Called only when no drain is in
        flight; a drain that failed left its bytes in the SDK's buffer, and this
        drain resends them at the same offset (the worker keeps only what it
        lacked)."""
        if not self.s.local_eof or self.s.eof_failed:
            try:
                p.stdin.write_eof()
                await asyncio.wait_for(p.stdin.drain.aio(), SIGNAL_EOF_TIMEOUT)
            except (asyncio.TimeoutError, ValueError, self.mx.Error, OSError):
                pass
        if wait:
            try:
                await asyncio.wait_for(p.wait.aio(), SIGNAL_EOF_TIMEOUT)
            except (asyncio.TimeoutError, self.mx.Error, OSError):
                pass


# ---- list and terminate ------------------------------------------------------------

async def cmd_list(args: argparse.Namespace) -> int:
    import modal
    import modal.exception as mx

    limit = asyncio.Semaphore(LIST_POLLS)

    async def runs(sb: "modal.Sandbox") -> bool:
        async with limit:
            try:
                return await bounded("polling a sandbox", sb.poll.aio(), POLL_TIMEOUT) is None
            except mx.NotFoundError:
                return False

    try:
        app = await bounded("looking up the Modal app", modal.App.lookup.aio(args.app),
                            LOOKUP_TIMEOUT)
        found: list[tuple[str, "modal.Sandbox"]] = []
        async for sb in modal.Sandbox.list.aio(app_id=app.app_id, tags={TAG_BRIDGE: "1"}):
            tags = await bounded("reading tags", sb.get_tags.aio(), LOOKUP_TIMEOUT)
            name = tags.get(TAG_NAME, "")
            if name and name.startswith(args.prefix):
                found.append((name, sb))
        # Modal's listing may still hold a sandbox that has just ended: only
        # those that answer "running" are printed.
        running = await asyncio.gather(*(runs(sb) for _, sb in found))
        names = [name for (name, _), r in zip(found, running) if r]
    except mx.NotFoundError:
        return EXIT_OK  # no such app: no sandboxes
    except mx.AuthError as e:
        raise auth_failure(e) from None
    except mx.Error as e:
        raise Failure(EXIT_ERROR, f"listing sandboxes: {describe(e)}") from None
    for n in sorted(set(names)):
        print(n[len(args.strip):] if args.strip and n.startswith(args.strip) else n)
    sys.stdout.flush()
    return EXIT_OK


async def cmd_terminate(args: argparse.Namespace) -> int:
    import modal
    import modal.exception as mx

    try:
        sb = await bounded("looking up the sandbox",
                           modal.Sandbox.from_name.aio(args.app, args.name), LOOKUP_TIMEOUT)
        await bounded("terminating the sandbox", sb.terminate.aio(wait=True),
                      TERMINATE_CMD_TIMEOUT)
    except mx.NotFoundError:
        return EXIT_OK
    except mx.AuthError as e:
        raise auth_failure(e) from None
    except mx.Error as e:
        raise Failure(EXIT_ERROR, f"terminating {args.name!r}: {describe(e)}") from None
    return EXIT_OK


# ---- main ------------------------------------------------------------------------------

async def amain(args: argparse.Namespace) -> int:
    if args.cmd == "list":
        return await cmd_list(args)
    if args.cmd == "terminate":
        return await cmd_terminate(args)
    return await Bridge(args).run()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        import modal  # fail here, once, with one line
    except ImportError as e:
        print(f"{PROG}: the Modal SDK is not installed ({e}); pip install modal", file=sys.stderr)
        return EXIT_ERROR
    try:
        check_sdk(getattr(modal, "__version__", None))
        return asyncio.run(amain(args))
    except Failure as f:
        print(f"{PROG}: {f.reason}", file=sys.stderr)
        return f.code
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"{PROG}: internal error: {describe(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
