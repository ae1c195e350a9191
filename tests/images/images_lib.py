"""Helpers shared by tests/images and tests/bench/images.py: the Docker CLI
with timeouts, containers that are always removed, the published port, and a
token-authenticated `hello` over TCP; the apptainer binary (found, or built
by tests/e2e/apptainer/build-apptainer.sh) and a stdio client whose reads
time out. Standard library + msgpack only."""
from __future__ import annotations

import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
from slotwire import AgentError, Client, ProtocolError  # noqa: E402

BUILD = Path(os.environ.get("SLOT_BUILD_DIR", ROOT / "build"))
AGENTCTL = BUILD / "agentctl"
ESCAPE = BUILD / "slot-escape"
BUILD_SH = ROOT / "images" / "build.sh"
SUITE = os.environ.get("SLOT_SUITE", "bookworm")
IMAGE = "slot-agent:latest"
BIN_IMAGE = "slot-agent-bin:latest"
BASE_IMAGE = f"slot-base:{SUITE}"
AGENT_PATH = "/usr/local/bin/slot-agent"
TOKEN_PATH = "/run/secrets/slot-token"

# figure name -> printed value, shown at the end of the test run
FIGURES: dict[str, str] = {}


def docker(*args: str, timeout: float = 120, check: bool = True,
           input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(["docker", *args], capture_output=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)} exited {r.returncode}: "
                           f"{r.stderr.decode(errors='replace').strip()}")
    return r


def docker_out(*args: str, timeout: float = 120) -> str:
    return docker(*args, timeout=timeout).stdout.decode().strip()


def image_size(tag: str) -> int:
    return int(docker_out("image", "inspect", "-f", "{{.Size}}", tag))


class Containers:
    """Every container started through here is removed by rm_all(), whatever
    happened; names are unique per run."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def new_name(self, prefix: str) -> str:
        name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        return name

    def run(self, prefix: str, *args: str, rm: bool = True, timeout: float = 60) -> str:
        """docker run -d [--rm] --name NAME ARGS...; returns NAME."""
        name = self.new_name(prefix)
        docker("run", "-d", *(["--rm"] if rm else []), "--name", name, *args, timeout=timeout)
        return name

    def rm(self, name: str) -> None:
        docker("rm", "-f", "-v", name, check=False, timeout=60)
        if name in self.names:
            self.names.remove(name)

    def rm_all(self) -> None:
        for name in list(self.names):
            self.rm(name)


CONTAINERS = Containers()


def published_port(name: str, timeout: float = 10) -> int:
    """The host port of NAME's 7070/tcp (published with -p 127.0.0.1::7070)."""
    deadline = time.monotonic() + timeout
    while True:
        r = docker("port", name, "7070/tcp", check=False, timeout=30)
        for line in r.stdout.decode().splitlines():
            host, _, port = line.strip().rpartition(":")
            if host in ("127.0.0.1", "0.0.0.0") and port.isdigit():
                return int(port)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no published port for 7070/tcp: "
                               f"{r.stderr.decode(errors='replace').strip()}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hello(port: int, token: str, timeout: float = 30,
          alive: Callable[[], bool] | None = None) -> tuple[Client, dict]:
    """Connect to 127.0.0.1:PORT and authenticate, retrying while the agent
    is not listening yet (docker-proxy accepts and closes until it is).
    A refused token is raised at once (AgentError)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        c: Client | None = None
        try:
            c = Client.tcp("127.0.0.1", port, timeout=5)
            res = c.call("hello", {"token": token, "client": "tests/images"}, timeout=5)
            return c, res
        except AgentError:
            if c is not None:
                c.close()
            raise
        except (OSError, TimeoutError, ProtocolError) as e:
            last = e
            if c is not None:
                c.close()
            if alive is not None and not alive():
                break
            time.sleep(0.01)
    raise RuntimeError(f"no hello from 127.0.0.1:{port} within {timeout} s: {last!r}")


def running(name: str) -> bool:
    r = docker("inspect", "-f", "{{.State.Running}}", name, check=False, timeout=30)
    return r.stdout.strip() == b"true"


def logs(name: str) -> str:
    r = docker("logs", name, check=False, timeout=30)
    return (r.stdout + r.stderr).decode(errors="replace")


def write_tokens(d: Path) -> tuple[Path, str, Path]:
    """A token file the agent reads (0644: also readable under --user 1000)
    and a wrong one."""
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o755)
    token = uuid.uuid4().hex + uuid.uuid4().hex
    good = d / "slot-token"
    good.write_text(token + "\n")
    os.chmod(good, 0o644)
    bad = d / "wrong-token"
    bad.write_text("not-" + token + "\n")
    os.chmod(bad, 0o644)
    return good, token, bad


def run_to_hello(token_file: Path, token: str, runs: int = 10,
                 image: str = IMAGE) -> list[float]:
    """Seconds from `docker run` to the agent answering an authenticated
    hello over the published port, once per fresh container."""
    times: list[float] = []
    for _ in range(runs):
        port = free_port()
        name = CONTAINERS.new_name("slot-img-start")
        try:
            t0 = time.monotonic()
            docker("run", "-d", "--rm", "--name", name, "-p", f"127.0.0.1:{port}:7070",
                   "-v", f"{token_file}:{TOKEN_PATH}:ro", image, timeout=60)
            c, _ = hello(port, token, timeout=30)
            times.append(time.monotonic() - t0)
            c.close()
        finally:
            CONTAINERS.rm(name)
    return times


def median_ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1000:.0f} ms (min {min(xs) * 1000:.0f}, " \
           f"max {max(xs) * 1000:.0f}, n={len(xs)})"


# -- the escape suite (tests/isolation/test_escape.py) against the real image

# condition name -> docker run flags; every one keeps Docker's default seccomp
# profile and adds no capability. Names start with "docker": test_escape.py
# knows such agents do not share the host's network.
ESCAPE_FLAGS: dict[str, list[str]] = {
    "docker-root": [],
    "docker-user1000": ["--user", "1000", "--tmpfs", "/data:uid=1000"],
    "docker-readonly": ["--read-only", "--tmpfs", "/data"],
    # As root without capabilities RLIMIT_NPROC does not bind (the kernel
    # exempts uid 0 of the initial user namespace), so a fork bomb would reach
    # the host: the container gets a pids limit, as any such deployment needs.
    "docker-capdrop": ["--cap-drop", "ALL", "--pids-limit", "512"],
}
ESCAPE_CONDITIONS: dict[str, str] = {
    "docker-root": "agent as root (default capabilities)",
    "docker-user1000": "--user 1000 --tmpfs /data:uid=1000",
    "docker-readonly": "--read-only --tmpfs /data (root)",
    "docker-capdrop": "--cap-drop ALL --pids-limit 512 (root without capabilities)",
    # tests/images/test_apptainer_controller.py: the SIF, no Docker involved
    "apptainer": "the SIF: apptainer -q exec --unsquash as an unprivileged test user "
                 "(no capabilities; the host's network)",
}
# (attempt, condition) -> the rung that blocked it, or NOT BLOCKED
ESCAPE_RESULTS: dict[tuple[str, str], str] = {}


def pids_events_max(container_id: str) -> int | None:
    """The `max` counter of the container's pids cgroup (forks refused by
    --pids-limit), or None when the cgroup cannot be found (v1 or v2 layout)."""
    for p in (Path("/sys/fs/cgroup/pids/docker") / container_id / "pids.events",
              Path("/sys/fs/cgroup/system.slice") / f"docker-{container_id}.scope" / "pids.events",
              Path("/sys/fs/cgroup/docker") / container_id / "pids.events"):
        try:
            for line in p.read_text().splitlines():
                k, _, v = line.partition(" ")
                if k == "max":
                    return int(v)
        except OSError:
            continue
    return None


# -- Apptainer

CACHE = Path(os.environ.get("SLOT_CACHE", "/var/cache/slot"))
SIF = CACHE / "images" / "slot-agent.sif"
BUILD_APPTAINER = ROOT / "tests" / "e2e" / "apptainer" / "build-apptainer.sh"

_CAPS = ["CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
         "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN",
         "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE",
         "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME",
         "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
         "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
         "PERFMON", "BPF", "CHECKPOINT_RESTORE"]


def cached_apptainer() -> str | None:
    """An apptainer binary that is already there: $APPTAINER, PATH, or the
    one build-apptainer.sh left in the cache (never builds one)."""
    if os.environ.get("APPTAINER"):
        return os.environ["APPTAINER"]
    found = shutil.which("apptainer")
    if found:
        return found
    for p in sorted(CACHE.glob("apptainer-*/bin/apptainer"), reverse=True):
        if os.access(p, os.X_OK):
            return str(p)
    return None


BUILD_APPTAINER_TIMEOUT = 1800  # a cold build fetches and compiles Apptainer's Go module


def ensure_apptainer(timeout: float = BUILD_APPTAINER_TIMEOUT) -> str:
    """cached_apptainer(), else the one tests/e2e/apptainer/build-apptainer.sh
    builds (the last line of its stdout). Raises RuntimeError, with the
    script's stderr, when there is none and the build fails."""
    found = cached_apptainer()
    if found:
        if not os.access(found, os.X_OK):
            raise RuntimeError(f"apptainer binary {found} is not executable "
                               "(from $APPTAINER or PATH)")
        return found
    try:
        r = subprocess.run([str(BUILD_APPTAINER)], cwd=ROOT, capture_output=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        err = (e.stderr or b"").decode(errors="replace")[-4000:]
        raise RuntimeError(f"{BUILD_APPTAINER} did not finish within {timeout} s:\n{err}") from e
    err = r.stderr.decode(errors="replace")[-4000:]
    lines = r.stdout.decode(errors="replace").strip().splitlines()
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{BUILD_APPTAINER} exited {r.returncode} (no apptainer binary in "
                           f"$APPTAINER, PATH or {CACHE}):\n{err}")
    path = lines[-1].strip()
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{BUILD_APPTAINER} printed {path!r}, which is not an executable:\n"
                           f"{err}")
    return path


def stdio_client(proc: subprocess.Popen, timeout: float = 120.0) -> Client:
    """Client.stdio, but a read that waits longer than TIMEOUT fails
    (TimeoutError) instead of hanging the run when the agent does."""
    assert proc.stdin is not None and proc.stdout is not None
    fd = proc.stdout.fileno()

    def read(n: int) -> bytes:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise socket.timeout(f"nothing from the agent's stdout within {timeout} s")
        return os.read(fd, n)

    def write(b: bytes) -> None:
        proc.stdin.write(b)  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]

    return Client(read, write, proc.stdin.close, timeout)


def apptainer_root_args() -> list[str]:
    """Apptainer run by root asks for every capability and fails
    ("Requesting capability set ...") where the bounding set lacks some, as on
    this VM (no CAP_SYS_RESOURCE): drop exactly those."""
    if os.geteuid() != 0:
        return []
    bnd = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapBnd:"):
            bnd = int(line.split()[1], 16)
    missing = [f"CAP_{n}" for i, n in enumerate(_CAPS) if not bnd & (1 << i)]
    return ["--drop-caps", ",".join(missing)] if missing else []
