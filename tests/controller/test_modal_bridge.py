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
    """The bridge's single `slot-modal-bridge:` line, which must come last."""
    lines = err.strip().splitlines()
    ours = [ln for ln in lines if ln.startswith("slot-modal-bridge:")]
    assert len(ours) == 1, err
    assert lines[-1] == ours[0], err
    assert code_reason in ours[0], err
    return ours[0]


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
    failure_line(b.stderr(), "sandbox terminated (exit code 137)")
    assert took < 5, f"took {took:.1f} s to notice"
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
    failure_line(b.stderr(), "sandbox terminated")


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
    failure_line(b.stderr(), "no running sandbox 'absent' in app 'slot-test' (--no-create)")
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

    async def exec_then_kill() -> int:
        p = await sb.exec.aio("sleep", "60", text=False)
        d = SandboxDir(fm.dir / "sandboxes" / sb.object_id)
        pid = d.process_pid()
        assert pid
        os.kill(pid, signal.SIGKILL)  # the sandbox's process dies: its execs die too
        return await asyncio.wait_for(p.wait.aio(), 5)

    assert asyncio.run(exec_then_kill()) == 137
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
