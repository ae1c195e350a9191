"""The SIF under Apptainer, run by an unprivileged user (as on an HPC login
or compute node: no root, no Docker, no setuid helper), three ways:

- `hello` through `apptainer exec --unsquash SIF slot-agent --stdio`: which
  rungs of the isolation ladder work there (printed as figures). The agent
  never uses bubblewrap (the image has none); Landlock and seccomp work, the
  uid rung does not (no capabilities), and Apptainer takes no rung away from
  what the same user gets on the host.
- The controller's exec backend launching such agents: the example trainer
  runs to completion; SIGKILL to one agent's apptainer process fails only
  that agent's requests (agent_lost) and the agent is replaced.
- The isolation escape suite (tests/isolation/test_escape.py, through
  test_image_escape.py's loader) against an agent in the SIF, reached over
  its stdio, with build/slot-escape bound in read-only. Where Apptainer
  differs from the other conditions the tests assert what really happens:
  the root filesystem is a read-only overlay (EROFS comes before Landlock),
  host directories such as /var/tmp and /dev/shm are bound writable (Landlock
  refuses the writes), the user's own host files are readable (Landlock
  restricts writes only), and the network namespace is the host's (a slot
  with network=true reaches a host listener on 127.0.0.1, as on the host).

The unprivileged user is created for this module (useradd --system) and
deleted at its end; every apptainer process runs as that user through
`setpriv` with no capabilities, unpacks the SIF into a directory of the test
(APPTAINER_TMPDIR; /dev/fuse is root's here, so --unsquash), and a process of
that user left at the end fails the run."""
from __future__ import annotations

import importlib.util
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from images_lib import BUILD, ESCAPE, ESCAPE_RESULTS, FIGURES, ROOT, stdio_client
from test_image_escape import AGENT_ARGS, Cond, esc

_spec = importlib.util.spec_from_file_location("ctl_conftest_apptainer",
                                               ROOT / "tests" / "controller" / "conftest.py")
assert _spec and _spec.loader
_ctl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ctl)
Controller = _ctl.Controller
PY = "/usr/bin/python3"
TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"
RUNGS = {"uid", "namespaces", "landlock", "seccomp", "rlimits", "cgroup", "containment"}
ESCAPE_IN = "/opt/slotbin/slot-escape"
START_TIMEOUT = 300  # each agent start unpacks the SIF (~10 s each here, 2 cores)


# -- the unprivileged user and its processes

@dataclass
class User:
    name: str
    uid: int
    gid: int
    base: Path  # root's, 0755 (the user must reach its directories); rm -rf at the end

    def dir(self, rel: str, owned: bool = True, mode: int = 0o755) -> Path:
        d = self.base / rel
        d.mkdir(parents=True)
        if owned:
            os.chown(d, self.uid, self.gid)
        os.chmod(d, mode)
        return d

    def argv(self, apptainer: str, tmpdir: Path, *args: str) -> list[str]:
        """`apptainer -q ARGS...` as this user with no capabilities at all;
        the SIF is unpacked in TMPDIR (--unsquash), removed by Apptainer when
        it exits normally."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--",
                "env", "HOME=/tmp", f"APPTAINER_TMPDIR={tmpdir}", apptainer, "-q", *args]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def user_procs(uid: int) -> dict[int, str]:
    """pid -> comm of the living (not zombie) processes whose real uid is UID."""
    out: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        status = _read(f"{d}/status").decode(errors="replace")
        m = re.search(r"^Uid:\s+(\d+)", status, re.M)
        st = re.search(r"^State:\s+(\S)", status, re.M)
        if m and int(m.group(1)) == uid and st and st.group(1) not in "ZX":
            out[int(d.name)] = _read(f"{d}/comm").decode(errors="replace").strip()
    return out


def apptainers(uid: int, tmpdir: Path) -> dict[str, int]:
    """agent id -> pid of the apptainer process (Apptainer's `starter`, what
    the controller launched) of the agents unpacked in TMPDIR. The starter's
    environment holds the container's, with the controller's SLOT_AGENT_ID."""
    out: dict[str, int] = {}
    for pid, comm in user_procs(uid).items():
        env = _read(f"/proc/{pid}/environ")
        if comm == "starter" and str(tmpdir).encode() in env:
            m = re.search(rb"SLOT_AGENT_ID=([A-Za-z0-9_.-]+)", env)
            if m:
                out[m.group(1).decode()] = pid
    return out


def agent_procs(uid: int, agent_id: str, data_dir: Path) -> list[int]:
    """Living processes of one agent: its own (the controller's environment)
    and its commands' (sanitized environment, but cwd in its data dir)."""
    pids = []
    for pid in user_procs(uid):
        env = _read(f"/proc/{pid}/environ")
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            cwd = ""
        if f"SLOT_AGENT_ID={agent_id}".encode() in env or cwd.startswith(str(data_dir)):
            pids.append(pid)
    return pids


def agent_child(starter: int, timeout: float = 10) -> int:
    """The pid of the agent `apptainer exec` (no --pid) started under STARTER:
    the same pid inside the container, whose PID namespace is the host's."""
    deadline = time.monotonic() + timeout
    while True:
        for t in Path(f"/proc/{starter}/task").glob("*/children"):
            for kid in _read(str(t)).split():
                if _read(f"/proc/{int(kid)}/comm").strip() == b"slot-agent":
                    return int(kid)
        assert time.monotonic() < deadline, f"no slot-agent under apptainer's pid {starter}"
        time.sleep(0.05)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} (after {timeout} s)"
        time.sleep(0.1)


def host_probe(user: User) -> dict[str, bool]:
    """The rungs build/slot-agent finds as USER on the host, outside Apptainer."""
    r = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                        "--inh-caps=-all", "--bounding-set=-all", "--", str(BUILD / "slot-agent"),
                        "--probe", "--json"], capture_output=True, timeout=60, cwd="/")
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return {k: v["available"] for k, v in json.loads(r.stdout)["rungs"].items()}


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    name = f"slotapp{uuid.uuid4().hex[:6]}"
    r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                        "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                       capture_output=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"useradd {name}: {r.stderr.decode(errors='replace')}", pytrace=False)
    pw = pwd.getpwnam(name)
    base = Path(tempfile.mkdtemp(prefix="slot-app-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    left: dict[int, str] = {}
    try:
        yield User(name, pw.pw_uid, pw.pw_gid, base)
    finally:
        # Whatever the tests did, nothing of this user may outlive them.
        deadline = time.monotonic() + 15
        while user_procs(pw.pw_uid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = user_procs(pw.pw_uid)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # zombies still count as the user's until init reaps them
        deadline = time.monotonic() + 30
        while subprocess.run(["userdel", name], capture_output=True, timeout=60).returncode:
            if time.monotonic() > deadline:
                subprocess.run(["userdel", "-f", name], capture_output=True, timeout=60)
                break
            time.sleep(0.5)
        subprocess.run(["rm", "-rf", str(base)], timeout=120)
    assert not left, f"processes of {name} left behind: {left}"


# -- hello as an unprivileged user

@pytest.mark.parametrize("flags", [[], ["--containall", "--no-home"]],
                         ids=["exec", "exec-containall"])
def test_hello_as_unprivileged_user(apptainer, sif, user, flags) -> None:
    tag = "containall" if flags else "plain"
    data = user.dir(f"hello-{tag}/data")
    tmp = user.dir(f"hello-{tag}/apptmp", mode=0o700)
    log = user.base / f"hello-{tag}" / "agent.log"
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        p = subprocess.Popen(user.argv(apptainer, tmp, "exec", "--unsquash", *flags,
                                       "--bind", f"{data}:/data", str(sif), "slot-agent",
                                       "--stdio", "--data-dir", "/data", "--slots", "2"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf)
    try:
        c = stdio_client(p)
        h = c.call("hello", timeout=120)
        took = time.monotonic() - t0
        iso, det = h["isolation"], h["isolation_detail"]
        # the agent's own ladder, nothing else: no bubblewrap rung or wrapper
        assert set(iso) == RUNGS, iso
        assert iso["landlock"] and iso["seccomp"], iso
        assert iso["rlimits"] and iso["containment"], iso
        assert not iso["uid"] and det["root"] is False, (iso, det)
        assert det["landlock_abi"] >= 1, det
        # Apptainer (a user namespace of its own) takes no rung away from
        # what this user's agent gets on the host
        assert iso == host_probe(user), (iso, det["unavailable"])
        r = c.call("exec", {"slot": 0, "cmd": "id -u; pwd; command -v bwrap bubblewrap "
                                              "|| echo no bubblewrap"})
        assert r["exit_code"] == 0, r
        # a box (user namespace nested in Apptainer's) shows the workspace at
        # /workspace, the SIF's empty mount point
        seen = c.call("slots", {"slot": 0})["slots"][0]["cwd_path"]
        assert seen == ("/workspace" if iso["namespaces"] else "/data/slots/0/work"), seen
        assert r["stdout"] == f"{user.uid}\n{seen}\nno bubblewrap\n".encode(), r
        applied = set(r["isolation"])
        assert {"landlock", "seccomp", "rlimits", "containment"} <= applied <= RUNGS, applied
        assert (data / "slots" / "0" / "work").stat().st_uid == user.uid
        c.close()  # stdin closes: the agent exits 0, and so does apptainer
        assert p.wait(timeout=30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    # a clean exit leaves no unpacked rootfs behind
    assert list(tmp.iterdir()) == [], list(tmp.iterdir())
    if not flags:
        FIGURES["apptainer exec --unsquash to hello (non-root)"] = f"{took:.1f} s"
        for rung in sorted(RUNGS, key=["uid", "namespaces", "landlock", "seccomp", "rlimits",
                                       "cgroup", "containment"].index):
            why = det["unavailable"].get(rung, "")
            extra = f" (ABI {det['landlock_abi']})" if rung == "landlock" else ""
            FIGURES[f"apptainer non-root rung {rung}"] = \
                ("yes" + extra) if iso[rung] else f"no ({why})"
        FIGURES["apptainer non-root rungs applied to a command"] = ", ".join(r["isolation"])
    else:
        FIGURES["apptainer non-root rungs with --containall --no-home"] = \
            "the same (" + ", ".join(k for k in iso if iso[k]) + ")"


# -- the controller's exec backend

def sif_config(apptainer: str, sif: Path, user: User, ws: Path, tmp: Path, **fields) -> str:
    # The controller (root) creates {data_dir} (workspace_base/ID) as root,
    # mode 0755, before it launches the agent, and removes it when the agent
    # is gone; the agent runs as the unprivileged user and must write there.
    # So the launch command hands that one directory to the user and then
    # replaces itself (exec, no shell left behind) by setpriv -> apptainer:
    # the controller's child is still the apptainer process, which gets the
    # agent's stdin/stdout and the controller's SIGTERM. Each agent keeps its
    # own directory bound at /data (one user-owned base bound for all agents
    # would let every slot read the other agents' workspaces: same uid, and
    # Landlock restricts writes only). workspace_base is this test's
    # directory, which the user can reach (the controller's state dir is 0700).
    take = f'chown {user.uid}:{user.gid} "$0" && exec "$@"'
    launch = ["sh", "-c", take, "{data_dir}",
              *user.argv(apptainer, tmp, "exec", "--unsquash", "--bind", "{data_dir}:/data",
                         "{image}", "slot-agent", "--stdio", "--slots", "{slots}",
                         "--data-dir", "/data")]
    prof = {"backend": "exec", "image": str(sif), "slots_per_agent": 4, "min_agents": 2,
            "max_agents": 2, "start_timeout": f"{START_TIMEOUT}s", "workspace_base": str(ws),
            **fields, "exec": {"launch": launch}}
    return json.dumps({"profiles": {"sif": prof}})


@dataclass
class Run:
    ctl: Controller
    ws: Path    # workspace_base
    tmp: Path   # APPTAINER_TMPDIR


@pytest.fixture
def sif_controller(request, apptainer, sif, user) -> Iterator:
    """make(**profile fields) -> Run: a controller with one `sif` profile.
    At the end: controllers stopped, this test's apptainer processes gone."""
    d = Path(tempfile.mkdtemp(prefix="sa-", dir="/tmp"))  # short: the socket path
    made: list[Run] = []

    def make(**fields) -> Run:
        n = len(made)
        ws = user.dir(f"{request.node.name[:40]}-{n}/ws", owned=False)
        tmp = user.dir(f"{request.node.name[:40]}-{n}/apptmp", mode=0o700)
        sub = d / f"c{n}"
        sub.mkdir()
        ctl = Controller(sub, sif_config(apptainer, sif, user, ws, tmp, **fields),
                         wait_ready=False)
        made.append(Run(ctl, ws, tmp))
        return made[-1]

    try:
        yield make
    finally:
        for run in made:
            if run.ctl.proc and run.ctl.proc.poll() is None:
                run.ctl.stop()
            for pid in apptainers(user.uid, run.tmp).values():
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(d, ignore_errors=True)


def test_example_trainer_runs_on_apptainer_agents(sif_controller, user) -> None:
    run = sif_controller()
    ctl = run.ctl
    t0 = time.monotonic()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=START_TIMEOUT)
    FIGURES["controller: 2 apptainer agents ready (non-root)"] = \
        f"{time.monotonic() - t0:.1f} s"
    agents = apptainers(user.uid, run.tmp)
    assert len(agents) == 2, agents
    t0 = time.monotonic()
    r = subprocess.run([PY, str(TRAINER), "--address", ctl.addr, "--profile", "sif",
                        "--trajectories", "16", "--concurrency", "4", "--steps", "3"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr + ctl.log()[-3000:]
    assert "errors:        0" in r.stdout, r.stdout
    assert "trajectories:  16 (16 ok, 0 failed)" in r.stdout, r.stdout
    calls = re.search(r"^tool calls:\s+(\d+)", r.stdout, re.M)
    FIGURES["trainer on apptainer agents (16 traj, c=4, 3 steps)"] = \
        f"{time.monotonic() - t0:.1f} s, {calls.group(1) if calls else '?'} tool calls"
    c = ctl.client()
    a = c.call("acquire", {"trajectory_id": "where"})
    s = a["slot"]
    out = c.call("exec", {"slot": s, "tool": "bash",
                          "args": {"command": "id -u; pwd; stat -c %u /data; "
                                              "cat /etc/debian_version"}})
    lines = out["stdout"].split(b"\n")
    assert out["exit_code"] == 0 and lines[0] == str(user.uid).encode(), out
    assert lines[1] == a["cwd_path"].encode() and lines[2] == str(user.uid).encode(), out
    assert a["cwd_path"] == "/workspace" or a["cwd_path"].startswith("/data/slots/"), a
    agent = s.split("/")[0]
    assert agent in agents
    assert (run.ws / agent).stat().st_uid == user.uid  # handed over by the launch command
    c.close()
    assert ctl.stop() == 0
    # stdin closed and SIGTERM: the agents and their apptainer processes exit
    # cleanly, Apptainer removes the unpacked SIFs, the controller the data dirs
    wait_for(lambda: not apptainers(user.uid, run.tmp), 30, "apptainer processes left")
    for a in agents:
        wait_for(lambda: not agent_procs(user.uid, a, run.ws / a), 30,
                 f"processes of agent {a} left")
    wait_for(lambda: not any(run.tmp.iterdir()), 30,
             f"unpacked SIFs left in {run.tmp}: {list(run.tmp.iterdir())}")
    wait_for(lambda: not any(run.ws.iterdir()), 30,
             f"data dirs left in {run.ws}: {list(run.ws.iterdir())}")


def test_killed_apptainer_fails_only_its_requests(sif_controller, user) -> None:
    run = sif_controller(slots_per_agent=2)
    ctl = run.ctl
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=START_TIMEOUT)
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    agents = apptainers(user.uid, run.tmp)
    assert set(agents) == {s.split("/")[0] for s in slots}, (agents, slots)
    victim = slots[0].split("/")[0]
    rid = c.send("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 2; echo done"}} for s in slots]})
    time.sleep(0.7)
    os.kill(agents[victim], signal.SIGKILL)  # as `docker kill` does to a container
    res = c.wait(rid, timeout=60)[0]["result"]["results"]
    for s, r in zip(slots, res):
        if s.startswith(victim + "/"):
            assert r["error"]["code"] == "agent_lost" and victim in r["error"]["message"], r
        else:
            assert r["ok"] and r["result"]["stdout"] == b"done\n", r
    # the agent and its commands went with their apptainer process
    wait_for(lambda: not agent_procs(user.uid, victim, run.ws / victim), 30,
             f"processes of the killed agent {victim} left")
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2
                    and victim not in apptainers(user.uid, run.tmp), timeout=START_TIMEOUT)
    assert len(apptainers(user.uid, run.tmp)) == 2
    # the survivors' leases are intact
    for s in slots[1:]:
        if not s.startswith(victim + "/"):
            r = c.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo still"}})
            assert r["stdout"] == b"still\n", r
    c.close()
    assert ctl.stop() == 0
    wait_for(lambda: not apptainers(user.uid, run.tmp), 30, "apptainer processes left")
    # A SIGKILLed apptainer cannot remove the SIF it unpacked: only the
    # victim's rootfs stays in APPTAINER_TMPDIR (removed with the test's dir).
    left = [p.name for p in run.tmp.iterdir()]
    assert len(left) <= 1 and all(n.startswith("rootfs-") for n in left), left


# -- the escape suite (tests/isolation/test_escape.py) in the SIF

# Every escape test of the isolation suite runs here unchanged, except the
# one defined below (Apptainer's read-only root answers before Landlock).
_OVERRIDDEN = {"test_write_outside_workspace"}
for _name in dir(esc):
    if _name.startswith("test_") and _name not in _OVERRIDDEN:
        globals()[_name] = getattr(esc, _name)


@pytest.fixture(scope="module", params=["apptainer"])
def cond(request, apptainer, sif, user) -> Iterator[Cond]:
    """The agent in the SIF as the test user: `apptainer exec --unsquash`
    without --containall (the host's PID and network namespaces, host /tmp,
    /var/tmp, /dev/shm bound), its data dir a host directory of the user's,
    slot-escape bound read-only; reached over its stdio."""
    base = user.dir("escape", owned=False)
    data = user.dir("escape/data")
    tmp = user.dir("escape/apptmp", mode=0o700)
    log = base / "agent.log"
    with open(log, "wb") as logf:
        p = subprocess.Popen(user.argv(apptainer, tmp, "exec", "--unsquash",
                                       "--bind", f"{data}:/data",
                                       "--bind", f"{ESCAPE}:{ESCAPE_IN}:ro", str(sif),
                                       "slot-agent", "--stdio", "--data-dir", "/data",
                                       *AGENT_ARGS),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=logf)
    try:
        client = stdio_client(p)
        res = client.call("hello", timeout=120)
        cd = Cond(request.param, client, agent_child(p.pid), ESCAPE_IN, "/data")
        cd.rungs = res["isolation"]
        cd.detail = res["isolation_detail"]
        cd.base = base
        cd.user = user
        yield cd
        client.close()
        rc = p.wait(timeout=30)
        text = log.read_text(errors="replace")
        assert rc == 0, f"the agent exited {rc}:\n{text[-3000:]}"
        assert "Sanitizer" not in text
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_apptainer_condition_rungs(cond) -> None:
    """What the condition leaves of the ladder (the rest relies on it)."""
    r, d = cond.rungs, cond.detail
    # namespaces: the boxes nest a user namespace in Apptainer's, which an
    # unprivileged (non-setuid) Apptainer needs anyway; no uid rung without
    # capabilities; cgroup v1 is root's here
    assert r == {"uid": False, "namespaces": True, "landlock": True, "seccomp": True,
                 "rlimits": True, "cgroup": False, "containment": True}, (r, d["unavailable"])
    assert d["root"] is False and d["user_namespace"] is True, d
    assert d["network_namespace"] is True, d  # network=false boxes get an empty one
    out = esc.run(cond, "id -u")
    assert out["stdout"].strip() == str(cond.user.uid).encode(), out


def test_write_outside_workspace(cond) -> None:
    # The container's root is a read-only overlay: EROFS comes before
    # Landlock's check. Where the filesystem is writable, see below.
    out, _ = esc.escape(cond, "write", "/etc/slot-escape-probe")
    assert esc.blocked(out) == "EROFS", out
    ESCAPE_RESULTS[("write outside workspace", cond.name)] = "read-only fs"
    esc.still_fine(cond)


def test_write_host_dirs_outside_workspace(cond) -> None:
    """Writable places Apptainer binds from the host: the data dir outside
    the workspace (the agent user's), and the host's /var/tmp and /dev/shm."""
    probe = f"slot-escape-{uuid.uuid4().hex[:8]}"
    for attempt, path, host in (
            ("write to /data, outside workspace", f"{cond.data}/{probe}", None),
            ("write to host /var/tmp", f"/var/tmp/{probe}", Path("/var/tmp") / probe),
            ("write to host /dev/shm", f"/dev/shm/{probe}", Path("/dev/shm") / probe)):
        try:
            out, r = esc.escape(cond, "write", path)
            assert esc.blocked(out) == "EACCES", (path, out)
            esc.record(cond, attempt, esc.applied(r, "landlock"))
        finally:
            if host is not None and host.exists():
                host.unlink()
    esc.still_fine(cond)


def test_host_files_of_the_agent_user(cond) -> None:
    """Landlock lets commands read anywhere, and without the uid rung they
    run as the agent's user: under Apptainer that includes the host files of
    that user (its home, /var/tmp, ...; Docker shows a container's files
    only). Reading works; writing is refused."""
    secret = cond.base / "host-secret"
    secret.write_text("host secret\n")
    os.chown(secret, cond.user.uid, cond.user.gid)
    os.chmod(secret, 0o600)
    out, r = esc.escape(cond, "read", str(secret))
    assert out == "escaped file read", out
    ESCAPE_RESULTS[("read a host file of the agent's user", cond.name)] = "NOT BLOCKED"
    out, r = esc.escape(cond, "write", str(secret))
    assert esc.blocked(out) == "EACCES", out
    esc.record(cond, "write a host file of the agent's user", esc.applied(r, "landlock"))
    assert secret.read_text() == "host secret\n"
    esc.still_fine(cond)
