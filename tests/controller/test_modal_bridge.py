"""controller/modal/slot_modal_bridge.py (the `modal` backend's launch command)
against a FAKE Modal SDK (tests/controller/modal_fake: Modal's cloud cannot be
reached from here). The fake runs every sandbox as real local processes, so
real agent traffic flows: test -> bridge stdin -> fake exec of the real
`slot-agent --attach` -> the real agent daemon (the sandbox's own process) and
back. The last tests check the fake itself against the SDK's documented
behaviour."""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest

from conftest import AGENT_BIN, ROOT
from slotwire import Client, pack_frame

FAKE = Path(__file__).resolve().parent / "modal_fake"
BRIDGE = ROOT / "controller" / "modal" / "slot_modal_bridge.py"
PY = "/usr/bin/python3"
APP = "slot-test"

sys.path.insert(0, str(FAKE))
import modal  # noqa: E402 - the fake
from modal import _fake_state  # noqa: E402
from modal._fake_state import SandboxDir  # noqa: E402


def wait_for(pred, timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    return _fake_state.proc_starttime(pid) is not None


class BridgeProc:
    """One bridge process; `client` speaks the wire protocol over its stdio."""

    def __init__(self, argv: list[str], env: dict[str, str], err_path: Path) -> None:
        self.argv = argv
        self.err_path = err_path
        self._err = open(err_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PY, str(BRIDGE), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._err, env=env)
        assert self.proc.stdin and self.proc.stdout
        fd = self.proc.stdout.fileno()
        stdin = self.proc.stdin

        def read(n: int) -> bytes:
            ready, _, _ = select.select([fd], [], [], self.client.timeout)
            if not ready:
                raise TimeoutError(f"bridge sent nothing for {self.client.timeout} s")
            return os.read(fd, n)

        def write(b: bytes) -> None:
            stdin.write(b)
            stdin.flush()

        self.client = Client(read, write, stdin.close, timeout=30)

    def close_stdin(self) -> None:
        self.client.close()

    def wait(self, timeout: float = 15) -> int:
        return self.proc.wait(timeout)

    def finish(self, timeout: float = 15) -> tuple[int, str]:
        self.close_stdin()
        rc = self.wait(timeout)
        return rc, self.stderr()

    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f:
                    f.close()
            except OSError:
                pass
        self._err.close()


class FakeModal:
    """A private fake-Modal state directory and the env that selects it."""

    def __init__(self, dir: Path) -> None:
        self.dir = dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")
                    and not k.startswith("SLOT_FAKE_MODAL")}
        self.env.update(SLOT_FAKE_MODAL_DIR=str(dir), MODAL_TOKEN_ID="ak-fake",
                        MODAL_TOKEN_SECRET="as-fake", PYTHONPATH=str(FAKE),
                        MODAL_CONFIG_PATH=str(dir / "absent.toml"))
        self.bridges: list[BridgeProc] = []

    def _env(self, env: Optional[dict[str, Optional[str]]]) -> dict[str, str]:
        e = dict(self.env)
        for k, v in (env or {}).items():
            if v is None:
                e.pop(k, None)
            else:
                e[k] = v
        return e

    def attach(self, name: str, *extra: str, env: Optional[dict[str, Optional[str]]] = None,
               agent_bin: bool = True) -> BridgeProc:
        argv = ["attach", "--app", APP, "--name", name]
        if agent_bin:
            argv += ["--agent-bin", str(AGENT_BIN)]
        b = BridgeProc(argv + list(extra), self._env(env),
                       self.dir / f"bridge-{len(self.bridges)}.err")
        self.bridges.append(b)
        return b

    def run(self, *argv: str, env: Optional[dict[str, Optional[str]]] = None,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([PY, str(BRIDGE), *argv], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, env=self._env(env), timeout=timeout)

    def sandboxes(self, name: Optional[str] = None) -> list[SandboxDir]:
        return [sb for sb in _fake_state.sandboxes(self.dir)
                if name is None or sb.meta()["name"] == name]

    def running(self, name: str) -> Optional[SandboxDir]:
        found = [sb for sb in self.sandboxes(name) if sb.running()]
        assert len(found) <= 1, found
        return found[0] if found else None

    def add_secret(self, name: str, values: dict[str, str]) -> None:
        (self.dir / "secrets").mkdir(exist_ok=True)
        (self.dir / "secrets" / f"{name}.json").write_text(json.dumps(values))

    def cleanup(self) -> None:
        for b in self.bridges:
            b.kill()
        _fake_state.terminate_all(self.dir)


@pytest.fixture
def fm(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeModal]:
    d = Path(tempfile.mkdtemp(prefix="smf-", dir="/tmp"))  # short: Unix socket paths
    d.chmod(0o755)
    f = FakeModal(d)
    for k in list(os.environ):
        if k.startswith("MODAL_") or k.startswith("SLOT_FAKE_MODAL"):
            monkeypatch.delenv(k)
    for k in ("SLOT_FAKE_MODAL_DIR", "MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET", "MODAL_CONFIG_PATH"):
        monkeypatch.setenv(k, f.env[k])  # the fake used in-process by the tests, too
    try:
        yield f
    finally:
        f.cleanup()
        leftovers = [sb.object_id for sb in _fake_state.sandboxes(d)
                     if sb.process_pid() is not None]
        # The agents' own stderr went to the sandboxes' logs (ASan/UBSan builds).
        reports = [log.read_text(errors="replace")[-3000:]
                   for log in d.glob("sandboxes/*/log")
                   if any(m in log.read_text(errors="replace")
                          for m in ("Sanitizer", "runtime error:"))]
        shutil.rmtree(d, ignore_errors=True)
        assert not leftovers, f"sandbox processes survived cleanup: {leftovers}"
        assert not reports, "sanitizer report in a sandbox's log:\n" + "\n".join(reports)


def failure_line(err: str, code_reason: str) -> str:
    """The bridge's single `slot-modal-bridge:` line, which must come last
    (a `slot-modal-bridge: warning:` line, SLOT_MODAL_ANY_SDK, may come first)."""
    lines = [ln for ln in err.strip().splitlines()
             if not ln.startswith("slot-modal-bridge: warning:")]
    ours = [ln for ln in lines if ln.startswith("slot-modal-bridge:")]
    assert len(ours) == 1, err
    assert lines[-1] == ours[0], err
    assert code_reason in ours[0], err
    return ours[0]


def listed(fm: "FakeModal", *extra: str, env: Optional[dict[str, Optional[str]]] = None
           ) -> list[str]:
    r = fm.run("list", "--app", APP, *extra, env=env)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return r.stdout.splitlines()


def frames_end(buf: bytes | bytearray) -> tuple[int, int]:
    """(whole frames at the start of buf, where they end)."""
    pos = n = 0
    while pos + 4 <= len(buf):
        (size,) = struct.unpack(">I", buf[pos:pos + 4])
        if pos + 4 + size > len(buf):
            break
        pos += 4 + size
        n += 1
    return n, pos


def raw_out(b: BridgeProc, frames: Optional[int], timeout: float = 60) -> bytes:
    """The bridge's stdout, raw: the first `frames` whole frames, or (None)
    everything until it closes."""
    assert b.proc.stdout is not None
    fd = b.proc.stdout.fileno()
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        if frames is not None:
            n, end = frames_end(buf)
            if n >= frames:
                assert end == len(buf), "more output than asked for"
                return bytes(buf)
        left = deadline - time.monotonic()
        assert left > 0, f"bridge output stalled at {len(buf)} bytes"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            assert frames is None, f"bridge closed its stdout after {len(buf)} bytes"
            return bytes(buf)
        buf += chunk


def raw_in(b: BridgeProc, data: bytes) -> None:
    assert b.proc.stdin is not None
    b.proc.stdin.write(data)
    b.proc.stdin.flush()


def started_pid(c: Client, id: int) -> int:
    while True:
        f = c.recv_frame()
        assert f is not None, "stream closed"
        c.pending.setdefault(f.get("id", 0), []).append(f)
        if f.get("id") == id and f.get("event") == "started":
            return int(f["pid"])


# ---- through the bridge --------------------------------------------------------------

def test_hello_exec_then_eof_exits_0_and_sandbox_keeps_running(fm: FakeModal) -> None:
    b = fm.attach("n1")
    h = b.client.call("hello")
    attach_s = time.monotonic() - b.started
    assert h["slots"] == 4 and h["agent"] == "slot-agent"
    r = b.client.call("exec", {"slot": 0, "cmd": "echo hi; echo err >&2; exit 3"})
    assert (r["stdout"], r["stderr"], r["exit_code"]) == (b"hi\n", b"err\n", 3)
    sb = fm.running("n1")
    assert sb is not None
    agent_pid = sb.process_pid()
    assert agent_pid and alive(agent_pid)
    rc, err = b.finish()
    assert rc == 0 and err == "", err
    # The agent is the sandbox's own process: it outlives the stream.
    now = fm.running("n1")
    assert now is not None and now.path == sb.path and sb.process_pid() == agent_pid
    assert not list((sb.path / "execs").glob("*")), "the relay exec should have ended"
    args = sb.create_args()
    assert args["args"] == ["/usr/local/bin/slot-agent", "--listen", "unix:/run/slot-agent.sock",
                            "--slots", "4", "--data-dir", "/workspace", "--pass-env", "*"]
    assert args["image"] == {"ref": "debian:bookworm-slim",
                             "local_files": [[str(AGENT_BIN.resolve()), "/usr/local/bin/slot-agent"]]}
    assert sb.tags() == {"slot_bridge": "1", "slot_name": "n1"}
    assert args["timeout"] == 86400 and args["workdir"] == "/workspace"
    print(f"attach (create + relay + hello) took {attach_s:.3f} s")


@pytest.mark.parametrize("latency_ms", ["0", "3"])
def test_framing_is_transparent(fm: FakeModal, latency_ms: str) -> None:
    b = fm.attach("frames", env={"SLOT_FAKE_MODAL_LATENCY_MS": latency_ms})
    c = b.client
    c.timeout = 60
    data = os.urandom(1 << 20)
    assert c.call("write_file", {"slot": 1, "path": "blob", "data": data})["size"] == len(data)
    assert c.call("read_file", {"slot": 1, "path": "blob"})["data"] == data
    r = c.call("exec", {"slot": 1, "cmd": "sha256sum blob"})
    assert r["stdout"].split(b" ")[0].decode() == hashlib.sha256(data).hexdigest()
    # Above the SDK's 16 MiB stdin buffer: the bridge must chunk and drain.
    big = os.urandom(20 << 20)
    c.call("write_file", {"slot": 2, "path": "big", "data": big})
    assert c.call("read_file", {"slot": 2, "path": "big"})["data"] == big

    # Many pipelined requests, written in pieces that cut headers and bodies.
    n = 300
    blob = b"".join(pack_frame({"id": 1000 + i, "op": "exec" if i % 10 == 0 else "health",
                                "args": {"slot": 3, "cmd": f"echo {i}"} if i % 10 == 0 else {}})
                    for i in range(n))

    def writer() -> None:
        for i in range(0, len(blob), 997):
            c.send_raw(blob[i:i + 997])

    t = threading.Thread(target=writer)
    t.start()
    for i in range(n):
        resp, _ = c.wait(1000 + i, timeout=60)
        assert resp["ok"], resp
        if i % 10 == 0:
            assert resp["result"]["stdout"] == f"{i}\n".encode()
    t.join(30)
    rc, err = b.finish()
    assert rc == 0 and err == "", err


def test_second_bridge_finds_the_same_agent(fm: FakeModal) -> None:
    b1 = fm.attach("shared")
    c1 = b1.client
    inst = c1.call("hello")["instance"]
    c1.call("lease", {"slot": 1, "trajectory_id": "traj-7", "holder": "ctl-a"})
    r = c1.call("exec", {"slot": 2, "cmd": "sleep 1; echo done > out.txt", "detach": True})
    assert r["detached"]
    rc, err = b1.finish()
    assert rc == 0 and err == "", err

    b2 = fm.attach("shared", "--no-create")
    c2 = b2.client
    assert c2.call("hello")["instance"] == inst
    s = c2.call("slots", {"slot": 1})["slots"][0]
    assert s["leased"] and s["trajectory_id"] == "traj-7" and s["holder"] == "ctl-a"

    def out_file() -> Optional[bytes]:
        try:
            return c2.call("read_file", {"slot": 2, "path": "out.txt"})["data"]
        except Exception:  # noqa: BLE001 - not there yet
            return None

    assert wait_for(out_file, 10, "the background command's output") == b"done\n"
    # The first relay is gone: only this connection remains at the agent.
    wait_for(lambda: c2.call("health")["connections"] == 1, 5, "the first relay to end")
    rc, err = b2.finish()
    assert rc == 0 and err == "", err
    assert len(fm.sandboxes("shared")) == 1


def test_bridges_racing_to_create_share_one_sandbox(fm: FakeModal) -> None:
    bs = [fm.attach("race") for _ in range(3)]
    instances = {b.client.call("hello")["instance"] for b in bs}
    assert len(instances) == 1
    assert len(fm.sandboxes("race")) == 1
    for b in bs:
        rc, err = b.finish()
        assert rc == 0 and err == "", err


def test_no_credentials_exit_3(fm: FakeModal) -> None:
    none: dict[str, Optional[str]] = {"MODAL_TOKEN_ID": None, "MODAL_TOKEN_SECRET": None}
    b = fm.attach("nocred", env=none)
    assert b.wait() == 3
    failure_line(b.stderr(), "no usable Modal credentials: AuthError: Token missing")
    assert fm.sandboxes() == []
    r = fm.run("list", "--app", APP, env=none)
    assert r.returncode == 3 and r.stdout == ""
    failure_line(r.stderr, "AuthError")
    r = fm.run("terminate", "--app", APP, "--name", "x", env=none)
    assert r.returncode == 3
    failure_line(r.stderr, "AuthError")
    # Credentials from a ~/.modal.toml-style file work; an unknown profile does not.
    conf = fm.dir / "modal.toml"
    conf.write_text('[work]\ntoken_id = "ak-1"\ntoken_secret = "as-1"\nactive = true\n')
    from_file: dict[str, Optional[str]] = {**none, "MODAL_CONFIG_PATH": str(conf)}
    assert fm.run("list", "--app", APP, env=from_file).returncode == 0
    r = fm.run("list", "--app", APP, env={**from_file, "MODAL_PROFILE": "nope"})
    assert r.returncode == 3
    failure_line(r.stderr, "Profile 'nope' not found")


def test_creation_refused_exit_4(fm: FakeModal) -> None:
    msg = "Sandbox creation rate limit exceeded"
    b = fm.attach("refused", env={"SLOT_FAKE_MODAL_REFUSE_CREATE": msg})
    assert b.wait() == 4
    failure_line(b.stderr(), f"sandbox creation refused: ResourceExhaustedError: {msg}")
    b = fm.attach("refused", "--secret", "does-not-exist")
    assert b.wait() == 4
    failure_line(b.stderr(), "sandbox creation refused: NotFoundError: Secret 'does-not-exist'")
    assert fm.sandboxes() == []


def test_sandbox_killed_mid_command_exit_5(fm: FakeModal) -> None:
    b = fm.attach("doomed")
    c = b.client
    c.call("hello")
    id = c.send("exec", {"slot": 0, "cmd": "sleep 60", "stream": True})
    cmd_pid = started_pid(c, id)
    assert alive(cmd_pid)
    sb = fm.running("doomed")
    assert sb is not None
    agent_pid = sb.process_pid()
    assert agent_pid
    t0 = time.monotonic()
    os.kill(agent_pid, signal.SIGKILL)
    assert b.wait(10) == 5
    took = time.monotonic() - t0
    failure_line(b.stderr(), "sandbox gone: 'doomed' ended (exit code 137")
    assert took < 5, f"took {took:.1f} s to notice"
    assert listed(fm) == []
    # Like a container: nothing of the sandbox survives, execs included.
    wait_for(lambda: not alive(cmd_pid), 5, "the command to die with its sandbox")
    assert fm.running("doomed") is None
    assert not any(alive(int(p.name)) for p in (sb.path / "execs").glob("*"))


def test_sandbox_terminated_elsewhere_exit_5(fm: FakeModal) -> None:
    b = fm.attach("ended")
    b.client.call("hello")
    r = fm.run("terminate", "--app", APP, "--name", "ended")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert b.wait(10) == 5
    failure_line(b.stderr(), "sandbox gone: 'ended' ")
    assert listed(fm) == []


def test_exec_failed_when_the_agent_is_missing_exit_6(fm: FakeModal) -> None:
    app = modal.App.lookup(APP, create_if_missing=True)
    modal.Sandbox.create("sleep", "300", app=app, name="bare",
                         image=modal.Image.from_registry("alpine:3.21"))
    extras: list[list[str]] = [["--no-create"], []]
    for extra in extras:  # a running sandbox is reused as it is
        b = fm.attach("bare", *extra)
        assert b.wait() == 6
        err = b.stderr()
        assert 'sandbox: exec: "/usr/local/bin/slot-agent": no such file or directory' in err
        failure_line(err, "exec failed: slot-agent --attach exited with status 127: exec: "
                          '"/usr/local/bin/slot-agent": no such file or directory')
    assert len(fm.sandboxes("bare")) == 1


def test_no_create_and_no_sandbox_exit_5(fm: FakeModal) -> None:
    b = fm.attach("absent", "--no-create", agent_bin=False)
    assert b.wait() == 5
    failure_line(b.stderr(), "sandbox gone: no running sandbox 'absent' in app 'slot-test' "
                             "(--no-create)")
    assert fm.sandboxes() == []


def test_sigterm_detach_keeps_the_sandbox(fm: FakeModal) -> None:
    b = fm.attach("keep")  # --on-signal detach is the default
    c = b.client
    inst = c.call("hello")["instance"]
    started_pid(c, c.send("exec", {"slot": 0, "cmd": "sleep 1; echo late > late.txt",
                                   "stream": True}))
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait(10) == 0
    assert time.monotonic() - t0 < 5
    assert b.stderr() == ""
    sb = fm.running("keep")
    assert sb is not None
    b2 = fm.attach("keep", "--no-create")
    assert b2.client.call("hello")["instance"] == inst
    wait_for(lambda: b2.client.call("health")["connections"] == 1, 5, "the first relay to end")
    # The command in flight when the bridge stopped still ran to its end.
    wait_for(lambda: b2.client.error_code("stat", {"slot": 0, "path": "late.txt"}) is None,
             10, "the command in flight to finish")
    rc, err = b2.finish()
    assert rc == 0 and err == "", err


def test_sigterm_terminate_ends_the_sandbox(fm: FakeModal) -> None:
    b = fm.attach("gone", "--on-signal", "terminate")
    b.client.call("hello")
    sb = fm.running("gone")
    assert sb is not None
    agent_pid = sb.process_pid()
    assert agent_pid
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait(10) == 0
    assert b.stderr() == ""
    assert sb.poll() == 137
    assert fm.running("gone") is None
    wait_for(lambda: not alive(agent_pid), 5, "the agent to die")


@pytest.mark.parametrize("mode", ["detach", "terminate"])
def test_signal_during_setup(fm: FakeModal, mode: str) -> None:
    """A slow Modal (every call 700 ms): SIGTERM arrives before the stream runs."""
    b = fm.attach("slow", "--on-signal", mode, env={"SLOT_FAKE_MODAL_LATENCY_MS": "700"})
    time.sleep(1.6 if mode == "terminate" else 0.5)
    t0 = time.monotonic()
    b.proc.send_signal(signal.SIGTERM)
    assert b.wait(15) == 0
    assert time.monotonic() - t0 < 10
    assert b.stderr() == ""
    if mode == "terminate":  # nothing left behind, even a create that was in flight
        assert fm.running("slow") is None


def test_profile_fields_reach_create(fm: FakeModal) -> None:
    fm.add_secret("s1", {"TOKEN": "abc"})
    b = fm.attach("prof", "--image", "ghcr.io/acme/rl-env:7", "--slots", "2",
                  "--workdir", "/work/data", "--cpu", "2.5", "--memory", "4096", "--gpu", "T4",
                  "--timeout", "3600", "--idle-timeout", "600", "--secret", "s1",
                  "--env", "A=1", "--env", "B=x=y", "--cidr-allowlist", "10.0.0.0/8",
                  "--cidr-allowlist", "192.168.0.0/16", "--isolation", "best_effort")
    c = b.client
    assert c.call("hello")["slots"] == 2
    ws = c.call("slots", {"slot": 1})["slots"][0]["workspace"]
    sb = fm.running("prof")
    assert sb is not None
    assert ws.startswith(str(sb.root / "work" / "data") + "/")
    a = sb.create_args()
    assert a["args"] == ["/usr/local/bin/slot-agent", "--listen", "unix:/run/slot-agent.sock",
                         "--slots", "2", "--data-dir", "/work/data", "--pass-env", "*",
                         "--isolation", "best_effort"]
    assert a["image"]["ref"] == "ghcr.io/acme/rl-env:7"
    assert (a["cpu"], a["memory"], a["gpu"]) == (2.5, 4096, "T4")
    assert (a["timeout"], a["idle_timeout"], a["workdir"]) == (3600, 600, "/work/data")
    assert a["secrets"] == ["s1"] and a["env"] == {"A": "1", "B": "x=y"}
    assert a["block_network"] is False
    assert a["outbound_cidr_allowlist"] == ["10.0.0.0/8", "192.168.0.0/16"]
    assert a["app"] == APP and a["name"] == "prof"
    # The sandbox's process got the secrets as environment.
    pid = sb.process_pid()
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert (env["TOKEN"], env["A"], env["B"]) == ("abc", "1", "x=y")
    # ... and so do the commands in the slots (the agent runs with --pass-env '*')
    r = b.client.call("exec", {"slot": 0, "cmd": 'echo "$TOKEN|$A|$B"'})
    assert r["stdout"] == b"abc|1|x=y\n", r
    rc, err = b.finish()
    assert rc == 0 and err == "", err

    b = fm.attach("closed", "--block-network")
    b.client.call("hello")
    rc, err = b.finish()
    assert rc == 0, err
    sb = fm.running("closed")
    assert sb is not None
    a = sb.create_args()
    assert a["block_network"] is True and a["outbound_cidr_allowlist"] is None
    assert (a["cpu"], a["memory"], a["gpu"], a["idle_timeout"]) == (None, None, None, None)


@pytest.mark.parametrize("argv, reason", [
    (["attach", "--app", APP, "--name", "x" * 65], "is not a Modal name"),
    (["attach", "--app", APP, "--name", "bad/name"], "is not a Modal name"),
    (["attach", "--app", APP], "--name"),
    (["attach", "--app", APP, "--name", "n", "--block-network", "--cidr-allowlist", "1.2.3.0/24"],
     "exclude each other"),
    (["attach", "--app", APP, "--name", "n", "--workdir", "rel"], "must be absolute"),
    (["attach", "--app", APP, "--name", "n", "--slots", "0"], "must be > 0"),
    (["attach", "--app", APP, "--name", "n", "--timeout", "90000"],
     "--timeout is 90000 s; Modal sandboxes live at most 86400 s (24 h)"),
    (["attach", "--app", APP, "--name", "n", "--env", "NOEQUALS"], "KEY=VALUE"),
    (["attach", "--app", APP, "--name", "n", "--on-signal", "explode"], "invalid choice"),
    (["attach", "--app", APP, "--name", "n", "--agent-bin", "/nonexistent/slot-agent"],
     "--agent-bin /nonexistent/slot-agent: No such file or directory"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(fm: FakeModal, argv: list[str], reason: str) -> None:
    r = fm.run(*argv)
    assert r.returncode == 2, r.stderr
    failure_line(r.stderr, reason)
    assert fm.sandboxes() == []


def test_list_and_terminate(fm: FakeModal) -> None:
    for name in ("w-1", "w-2", "other-1"):
        b = fm.attach(name)
        b.client.call("hello")
        assert b.finish()[0] == 0
    app = modal.App.lookup(APP)
    modal.Sandbox.create("sleep", "300", app=app, name="w-3")  # not the bridge's
    other = modal.App.lookup("another-app", create_if_missing=True)
    modal.Sandbox.create("sleep", "300", app=other, name="w-9",
                         tags={"slot_bridge": "1", "slot_name": "w-9"})

    def names(*extra: str, app: str = APP) -> list[str]:
        r = fm.run("list", "--app", app, *extra)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return r.stdout.splitlines()

    assert names() == ["other-1", "w-1", "w-2"]
    assert names("--prefix", "w-") == ["w-1", "w-2"]
    assert names("--prefix", "zzz") == []
    assert names("--prefix", "w-", "--strip", "w-") == ["1", "2"]  # how the controller asks
    agent_pid = fm.running("w-1").process_pid()  # type: ignore[union-attr]
    r = fm.run("terminate", "--app", APP, "--name", "w-1")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert names("--prefix", "w-") == ["w-2"]
    assert agent_pid and not alive(agent_pid)
    for argv in (["--app", APP, "--name", "w-1"], ["--app", APP, "--name", "never"],
                 ["--app", "no-such-app", "--name", "w-2"]):
        r = fm.run("terminate", *argv)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    assert names(app="no-such-app") == []
    assert fm.running("w-2") is not None and fm.running("w-3") is not None


@pytest.mark.parametrize("version, ok", [
    ("1.4.0", True), ("1.5.4+fake", True), ("1.5.12", True),
    ("1.3.9", False), ("1.6.0", False), ("2.0.1", False), ("0.64.0", False), ("v1.5", False),
])
def test_modal_sdk_version_is_checked_by_every_subcommand(fm: FakeModal, version: str,
                                                          ok: bool) -> None:
    env: dict[str, Optional[str]] = {"SLOT_FAKE_MODAL_VERSION": version}
    runs = {
        "list": fm.run("list", "--app", APP, env=env),
        "terminate": fm.run("terminate", "--app", APP, "--name", "v", env=env),
        "attach": fm.run("attach", "--app", APP, "--name", "v", "--agent-bin", str(AGENT_BIN),
                         "--no-create", env=env),
    }
    if ok:
        assert runs["list"].returncode == 0 and runs["list"].stderr == ""
        assert runs["terminate"].returncode == 0 and runs["terminate"].stderr == ""
        assert runs["attach"].returncode == 5  # got past the check: no such sandbox
        return
    for cmd, r in runs.items():
        assert r.returncode == 2, (cmd, r.stderr)
        line = failure_line(r.stderr, "(supported: 1.4 to 1.5.x)")
        assert (f"Modal SDK {version} is not supported" in line
                or f"Modal SDK version {version!r} is not understood" in line), line
        assert "SLOT_MODAL_ANY_SDK=1" in line and "modal>=1.4,<1.6" in line
    assert fm.sandboxes() == [] and not (fm.dir / "apps" / f"{APP}.json").exists()


def test_any_sdk_override_warns_and_goes_on(fm: FakeModal) -> None:
    env: dict[str, Optional[str]] = {"SLOT_FAKE_MODAL_VERSION": "1.6.4",
                                     "SLOT_MODAL_ANY_SDK": "1"}
    warning = ("slot-modal-bridge: warning: Modal SDK 1.6.4 is not supported (supported: "
               "1.4 to 1.5.x); going on as SLOT_MODAL_ANY_SDK is set\n")
    r = fm.run("list", "--app", APP, env=env)
    assert r.returncode == 0 and r.stderr == warning
    b = fm.attach("anysdk", env=env)
    assert b.client.call("hello")["slots"] == 4
    rc, err = b.finish()
    assert rc == 0 and err == warning, err
    # ... and a failure still ends with its one line, after the warning
    b = fm.attach("absent", "--no-create", env=env)
    assert b.wait() == 5
    assert b.stderr().startswith(warning)
    failure_line(b.stderr(), "sandbox gone: no running sandbox 'absent'")


@pytest.mark.parametrize("kind, error", [("oserror", "ConnectionError"),
                                         ("unavailable", "ServiceError")])
def test_stdout_past_the_sdk_reconnect_budget_exits_7_and_the_sandbox_lives(
        fm: FakeModal, kind: str, error: str) -> None:
    """The fake breaks the exec's stdout connection after every 300 000 bytes;
    the SDK resumes at its offset 10 times in the stream's life, then raises."""
    every = 300_000
    b = fm.attach("brk")
    inst = b.client.call("hello")["instance"]
    blob = os.urandom(1 << 20)
    b.client.call("write_file", {"slot": 1, "path": "blob", "data": blob})
    assert b.finish()[0] == 0
    req = pack_frame({"id": 77, "op": "read_file", "args": {"slot": 1, "path": "blob"}})
    b = fm.attach("brk", "--no-create")
    raw_in(b, req)
    ref = raw_out(b, 1)  # the agent's answer, byte for byte, from an unbroken link
    assert b.finish()[0] == 0 and len(ref) > len(blob)

    b = fm.attach("brk", "--no-create", env={"SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY": str(every),
                                             "SLOT_FAKE_MODAL_LINK_ERROR": kind})
    raw_in(b, req * 4)
    out = raw_out(b, None)
    assert b.wait(20) == 7
    # 11 connections of `every` bytes each reached fd 1, exactly and in order:
    # three whole answers across 10 resumed breaks, then a part of the fourth.
    assert len(out) == 11 * every and 3 * len(ref) < len(out) < 4 * len(ref)
    assert out == (ref * 4)[:len(out)]
    failure_line(b.stderr(), f"the link to sandbox 'brk' ended (receiving: {error}")
    failure_line(b.stderr(), "the sandbox still runs: attach again")
    # A reconnect finds what it needs: the sandbox is listed, and the same agent answers.
    assert listed(fm) == ["brk"]
    b2 = fm.attach("brk", "--no-create")
    assert b2.client.call("hello")["instance"] == inst
    assert b2.client.call("read_file", {"slot": 1, "path": "blob"})["data"] == blob
    wait_for(lambda: b2.client.call("health")["connections"] == 1, 10, "the broken relay to end")
    rc, err = b2.finish()
    assert rc == 0 and err == "", err


@pytest.mark.parametrize("mode", ["", ":applied"])
def test_a_failed_drain_exits_7_and_the_partial_request_is_dropped(fm: FakeModal,
                                                                   mode: str) -> None:
    """The drain that crosses byte 1 200 000 of the relay's stdin fails for good
    (with :applied, its bytes did arrive but the reply was lost). The request
    was cut: the agent must drop it with the connection, never run a part."""
    b = fm.attach("upl")
    inst = b.client.call("hello")["instance"]
    assert b.finish()[0] == 0
    b = fm.attach("upl", "--no-create", env={"SLOT_FAKE_MODAL_STDIN_BREAK_AT": f"1200000{mode}"})
    blob = os.urandom(2 << 20)
    frame = pack_frame({"id": 5, "op": "write_file",
                        "args": {"slot": 1, "path": "big", "data": blob}})
    raw_in(b, frame[:1_500_000])  # the rest never comes: the link ends first
    assert b.wait(30) == 7
    failure_line(b.stderr(), "the link to sandbox 'upl' ended (sending: ConnectionError")
    assert listed(fm) == ["upl"]
    b2 = fm.attach("upl", "--no-create")
    c2 = b2.client
    assert c2.call("hello")["instance"] == inst
    wait_for(lambda: c2.call("health")["connections"] == 1, 10, "the cut relay to end")
    assert c2.error_code("stat", {"slot": 1, "path": "big"}) == "not_found"
    c2.call("write_file", {"slot": 1, "path": "big", "data": blob})
    assert c2.call("read_file", {"slot": 1, "path": "big"})["data"] == blob
    rc, err = b2.finish()
    assert rc == 0 and err == "", err


def test_exec_on_a_sandbox_gone_meanwhile_exits_5_and_it_is_not_listed(
        fm: FakeModal, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every call takes 1.5 s and the sandbox lives 1 s: it has timed out by the
    time the relay's exec reaches it (ConflictError)."""
    b = fm.attach("short", "--timeout", "1", env={"SLOT_FAKE_MODAL_LATENCY_MS": "1500"})
    assert b.wait(30) == 5
    failure_line(b.stderr(), "sandbox gone: 'short': ConflictError")
    (sb,) = fm.sandboxes("short")
    assert sb.poll() == 124
    assert listed(fm) == []
    # A listing that lags (it still holds the ended sandbox): `list` polls each.
    monkeypatch.setenv("SLOT_FAKE_MODAL_LIST_LAG_S", "600")
    app = modal.App.lookup(APP)
    assert [s.object_id for s in modal.Sandbox.list(app_id=app.app_id)] == [sb.object_id]
    assert listed(fm, env={"SLOT_FAKE_MODAL_LIST_LAG_S": "600"}) == []
    # ... and the bridge cannot attach to it either.
    b = fm.attach("short", "--no-create", env={"SLOT_FAKE_MODAL_LIST_LAG_S": "600"})
    assert b.wait(30) == 5
    failure_line(b.stderr(), "sandbox gone: no running sandbox 'short'")


# ---- the fake itself ----------------------------------------------------------------

def test_fake_stdin_buffers_until_drain(fm: FakeModal) -> None:
    async def go() -> None:
        app = await modal.App.lookup.aio("fake-io", create_if_missing=True)
        sb = await modal.Sandbox.create.aio("sleep", "300", app=app)
        p = await sb.exec.aio("cat", text=False)
        p.stdin.write(b"a" * 100)
        await asyncio.sleep(0.2)
        got = asyncio.ensure_future(p.stdout.read.aio())
        await asyncio.sleep(0.2)
        assert not got.done()
        p.stdin.write_eof()  # only a flag: cat still waits
        await asyncio.sleep(0.2)
        assert not got.done()
        with pytest.raises(ValueError):
            p.stdin.write(b"late")
        await p.stdin.drain.aio()  # now the data and the EOF go
        assert await asyncio.wait_for(got, 5) == b"a" * 100
        assert await p.wait.aio() == 0
        q = await sb.exec.aio("cat", text=False)
        q.stdin.write(b"x" * (16 << 20))
        with pytest.raises(BufferError):
            q.stdin.write(b"x")
        with pytest.raises(TypeError):
            q.stdin.write(42)  # type: ignore[arg-type]
        q.stdin.write_eof()
        drained = asyncio.ensure_future(q.stdin.drain.aio())
        sizes = []
        async for chunk in q.stdout:
            sizes.append(len(chunk))
        await drained
        assert sum(sizes) == 16 << 20 and max(sizes) <= 4096 and len(set(sizes)) > 1
        await sb.terminate.aio(wait=True)

    asyncio.run(go())


def test_fake_sandbox_lifecycle(fm: FakeModal) -> None:
    ex = modal.exception
    with pytest.raises(ex.NotFoundError):
        modal.App.lookup("fake-life")
    app = modal.App.lookup("fake-life", create_if_missing=True)
    with pytest.raises(ex.InvalidError):
        modal.Sandbox.create("sleep", "1", app=app, name="x" * 65)
    with pytest.raises(ex.InvalidError):
        modal.Sandbox.create("sleep", "1", name="no-app")
    with pytest.raises(ex.InvalidError):
        modal.Sandbox.create("sleep", "1", app=app, block_network=True,
                             outbound_cidr_allowlist=["10.0.0.0/8"])
    sb = modal.Sandbox.create("sleep", "300", app=app, name="life")
    with pytest.raises(ex.AlreadyExistsError):
        modal.Sandbox.create("sleep", "300", app=app, name="life")
    assert modal.Sandbox.from_name("fake-life", "life").object_id == sb.object_id
    assert [s.object_id for s in modal.Sandbox.list(app_id=app.app_id)] == [sb.object_id]
    assert sb.poll() is None

    async def exec_then_kill() -> None:
        p = await sb.exec.aio("sleep", "60", text=False)
        d = SandboxDir(fm.dir / "sandboxes" / sb.object_id)
        pid = d.process_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)  # the sandbox's process dies: its execs die too
        assert await asyncio.wait_for(p.stdout.read.aio(), 5) == b""
        with pytest.raises(ex.NotFoundError):  # its worker is gone: TaskExecWait says so
            await asyncio.wait_for(p.wait.aio(), 5)

    asyncio.run(exec_then_kill())
    assert sb.poll() == 137
    with pytest.raises(ex.NotFoundError):
        modal.Sandbox.from_name("fake-life", "life")
    with pytest.raises(ex.ConflictError):
        asyncio.run(sb.exec.aio("true", text=False))
    # The name is free again; a sandbox times out with 124; detach closes the handle only.
    sb2 = modal.Sandbox.create("sleep", "300", app=app, name="life", timeout=1)
    sb2.detach()
    with pytest.raises(ex.ClientClosed):
        sb2.poll()
    again = modal.Sandbox.from_name("fake-life", "life")
    wait_for(lambda: again.poll() is not None, 5, "the sandbox timeout")
    assert again.poll() == 124
    sb3 = modal.Sandbox.create("true", app=app)
    wait_for(lambda: sb3.poll() is not None, 5, "the sandbox to exit")
    assert sb3.poll() == 0
    assert list(modal.Sandbox.list(app_id=app.app_id)) == []


def test_fake_requires_its_state_dir(fm: FakeModal) -> None:
    env = fm._env({"SLOT_FAKE_MODAL_DIR": None})
    r = subprocess.run([PY, "-c", "import modal; modal.App.lookup('x', create_if_missing=True)"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode != 0 and "SLOT_FAKE_MODAL_DIR is not set" in r.stderr


def test_fake_version_knob(fm: FakeModal) -> None:
    code = "import modal; print(modal.__version__)"
    for env, want in (({}, "1.5.4+fake"), ({"SLOT_FAKE_MODAL_VERSION": "1.6.4"}, "1.6.4")):
        r = subprocess.run([PY, "-c", code], capture_output=True, text=True,
                           env=fm._env(env), timeout=30)  # type: ignore[arg-type]
        assert r.returncode == 0 and r.stdout.strip() == want, r.stderr


@pytest.mark.parametrize("kind, error", [("oserror", ConnectionError),
                                         ("unavailable", modal.exception.ServiceError)])
def test_fake_stdout_resumes_at_its_offset_within_the_budget(
        fm: FakeModal, monkeypatch: pytest.MonkeyPatch, kind: str, error: type) -> None:
    every = 100_000
    monkeypatch.setenv("SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY", str(every))
    monkeypatch.setenv("SLOT_FAKE_MODAL_LINK_ERROR", kind)

    async def go() -> None:
        app = await modal.App.lookup.aio("fake-brk", create_if_missing=True)
        sb = await modal.Sandbox.create.aio("sleep", "300", app=app)

        async def through_cat(data: bytes) -> tuple[bytes, Optional[BaseException], Any]:
            p = await sb.exec.aio("cat", text=False)
            p.stdin.write(data)
            p.stdin.write_eof()
            drained = asyncio.ensure_future(p.stdin.drain.aio())
            got = bytearray()
            failed: Optional[BaseException] = None
            try:
                async for chunk in p.stdout:
                    got += chunk
            except Exception as e:  # noqa: BLE001 - what the SDK raises is the point
                failed = e
            await drained
            return bytes(got), failed, p

        # 10 breaks (at 100 000, 200 000, ... 1 000 000): all resumed, nothing lost
        data = os.urandom(1_050_000)
        got, failed, p = await through_cat(data)
        assert failed is None and got == data
        assert p.stdout.retries_left == 0  # spent for good: never refunded
        assert await p.wait.aio() == 0
        # the 11th break raises; what came before is an exact prefix
        data = os.urandom(1_200_000)
        got, failed, p = await through_cat(data)
        assert isinstance(failed, error), failed
        assert got == data[:11 * every]
        with pytest.raises(StopAsyncIteration):  # the stream is over
            await p.stdout.__aiter__().__anext__()
        # stderr has its own budget and is not broken by this knob
        q = await sb.exec.aio("sh", "-c", "head -c 300000 /dev/zero >&2", text=False)
        q.stdin.write_eof()
        await q.stdin.drain.aio()
        assert len(await q.stderr.read.aio()) == 300_000
        assert await q.wait.aio() == 0
        await sb.terminate.aio(wait=True)  # also ends the cat whose stream broke
        with pytest.raises(modal.exception.NotFoundError):
            await p.wait.aio()

    asyncio.run(go())


@pytest.mark.parametrize("mode", ["", ":applied"])
def test_fake_drain_keeps_its_buffer_until_it_succeeds(fm: FakeModal,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        mode: str) -> None:
    """A drain that fails (its bytes lost, or with :applied delivered but the reply
    lost) keeps the buffer; drained again, the worker takes each byte once."""
    monkeypatch.setenv("SLOT_FAKE_MODAL_STDIN_BREAK_AT", f"1500{mode}")

    async def go() -> None:
        app = await modal.App.lookup.aio("fake-drain", create_if_missing=True)
        sb = await modal.Sandbox.create.aio("sleep", "300", app=app)
        p = await sb.exec.aio("cat", text=False)
        got = asyncio.ensure_future(p.stdout.read.aio())
        a, b = os.urandom(1000), os.urandom(1000)
        p.stdin.write(a)
        await p.stdin.drain.aio()
        p.stdin.write(b)
        with pytest.raises(ConnectionError):
            await p.stdin.drain.aio()  # crosses byte 1500
        p.stdin.write_eof()
        await p.stdin.drain.aio()  # b again (the worker keeps what it lacks), then EOF
        assert await asyncio.wait_for(got, 10) == a + b
        assert await p.wait.aio() == 0
        # What the SDK does wrong silently, the fake refuses loudly.
        monkeypatch.setenv("SLOT_FAKE_MODAL_LATENCY_MS", "200")
        q = await sb.exec.aio("cat", text=False)
        q.stdin.write(b"x")
        d = asyncio.ensure_future(q.stdin.drain.aio())
        await asyncio.sleep(0.05)
        with pytest.raises(RuntimeError, match="while a drain"):
            q.stdin.write(b"y")
        with pytest.raises(RuntimeError, match="two drain"):
            await q.stdin.drain.aio()
        await d
        q.stdin.write_eof()
        await q.stdin.drain.aio()
        assert await q.stdout.read.aio() == b"x"
        await sb.terminate.aio(wait=True)

    asyncio.run(go())
