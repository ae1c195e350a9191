"""The controller's slurm backend against a real one-node Slurm cluster
(Debian's Slurm 22.05, started and stopped by slurm-dev.sh for this module):
agents as batch jobs reached through `srun --jobid --overlap` steps; the
example trainer on the static agent and on the SIF under Apptainer; scancel
mid-batch, a job hitting its time limit, a profile asking for more than the
node has, a controller kill -9 and restart, slurmctld restarted mid-run, the
`srun` step of a stream killed mid-stream (reconnected, nothing lost), and
`agentctl stop`."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ctl_conftest",
                                               ROOT / "tests" / "controller" / "conftest.py")
assert _spec and _spec.loader
ctl_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ctl_conftest)
Controller = ctl_conftest.Controller
_spec = importlib.util.spec_from_file_location("linkdrop",
                                               ROOT / "tests" / "controller" / "linkdrop.py")
assert _spec and _spec.loader
linkdrop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linkdrop)
AGENT_BIN = ctl_conftest.AGENT_BIN
AGENTCTL = ctl_conftest.AGENTCTL_BIN
TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"


def free_port_pair() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 60000:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two free ports in a row")


class Cluster:
    def __init__(self, dir: Path, env: dict[str, str]) -> None:
        self.dir = dir
        self.env = env
        self.conf = str(dir / "slurm.conf")

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, SLURM_CONF=self.conf))

    def jobs(self, states: str = "PENDING,RUNNING") -> dict[str, tuple[str, str, str]]:
        """name -> (id, state, reason) of the jobs in these states."""
        r = self.run("squeue", "-h", "-t", states, "-o", "%j %i %T %r")
        assert r.returncode == 0, r.stderr
        out = {}
        for ln in r.stdout.splitlines():
            name, id, state, reason = ln.split(None, 3)
            out[name] = (id, state, reason)
        return out

    def state(self, job_id: str) -> str:
        r = self.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T %r")
        return r.stdout.strip()

    def cancel_all(self) -> None:
        ids = [v[0] for v in self.jobs().values()]
        if ids:
            self.run("scancel", *ids)
        deadline = time.monotonic() + 30
        while self.jobs() and time.monotonic() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    d = Path(tempfile.mkdtemp(prefix="slot-slurm-", dir="/var/tmp"))
    d.chmod(0o755)
    # 16 CPUs on this 2-core VM: enough one-CPU jobs for the tests at once
    env = dict(os.environ, SLURM_DEV_PORT=str(free_port_pair()), SLURM_DEV_CPUS="16",
               SLURM_DEV_MEM_MB="16000")
    script = HERE / "slurm-dev.sh"
    r = subprocess.run([str(script), "start", str(d)], capture_output=True, text=True,
                       timeout=600, env=env)
    if r.returncode != 0:
        subprocess.run([str(script), "stop", str(d)], capture_output=True, timeout=120, env=env)
        pytest.fail(f"slurm-dev.sh start failed:\n{r.stderr[-3000:]}")
    try:
        yield Cluster(d, env)
    finally:
        s = subprocess.run([str(script), "stop", str(d)], capture_output=True, text=True,
                           timeout=300, env=env)
        subprocess.run(["rm", "-rf", str(d)], timeout=120)
        assert s.returncode == 0, s.stderr[-2000:]


@pytest.fixture
def controllers(cluster: Cluster) -> Iterator[list]:
    made: list = []
    tmp = Path(tempfile.mkdtemp(prefix="ss-", dir="/tmp"))
    yield [tmp, made]  # type: ignore[misc]
    for c in made:
        if c.proc and c.proc.poll() is None:
            c.stop()
        log = c.log()
        assert "Sanitizer" not in log and "runtime error:" not in log, log[-3000:]
    cluster.cancel_all()  # whatever happened
    subprocess.run(["rm", "-rf", str(tmp)], timeout=60)
    # no launcher outlives its controller (a pending job's wait included)
    deadline = time.monotonic() + 20
    while True:
        left = subprocess.run(["pgrep", "-f", f"slot-slurm attach .*{cluster.dir}"],
                              capture_output=True, text=True).stdout.split()
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"slot-slurm attach processes left: {left}"


def make(controllers, cluster: Cluster, name: str, wait: bool = True, **fields: Any) -> Any:
    tmp, made = controllers
    prof: dict[str, Any] = {"backend": "slurm", "slots_per_agent": 2, "min_agents": 1,
                            "max_agents": 3, "start_timeout": "60s", "memory": "200M",
                            **fields}
    prof.setdefault("slurm", {})
    prof["slurm"].setdefault("workspace", str(cluster.dir / "ws"))
    d = tmp / f"c{len(made)}"
    d.mkdir()
    c = Controller(d, json.dumps({"profiles": {name: prof}}), wait_ready=False,
                   env={"SLURM_CONF": cluster.conf})
    made.append(c)
    if wait:
        c.wait_agents(lambda st: st["agents"]["ready"] >= prof["min_agents"], timeout=90)
    return c


def agents(c) -> list[dict]:
    cl = c.client()
    try:
        return cl.call("agents")["agents"]
    finally:
        cl.close()


def job_of(cluster: Cluster, agent_id: str) -> str:
    return next(v[0] for k, v in cluster.jobs().items() if k.endswith("-" + agent_id))


def no_capacity(c, timeout_ms: int) -> str:
    cl = c.client(timeout=timeout_ms / 1000 + 30)
    try:
        r = cl.call_raw("acquire", {"timeout_ms": timeout_ms}, timeout=timeout_ms / 1000 + 30)
        assert r["error"]["code"] == "no_capacity", r
        return r["error"]["message"]
    finally:
        cl.close()


def run_trainer(c, profile: str, n: int = 16, conc: int = 6) -> str:
    r = subprocess.run(["/usr/bin/python3", str(TRAINER), "--address", c.addr, "--profile",
                        profile, "--trajectories", str(n), "--concurrency", str(conc),
                        "--steps", "3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "errors:        0" in r.stdout, r.stdout
    return r.stdout


def test_agents_are_jobs_and_the_trainer_runs(controllers, cluster) -> None:
    c = make(controllers, cluster, "hpc", min_agents=3, max_agents=3, cpu=0.5)
    jobs = cluster.jobs()
    ours = {k: v for k, v in jobs.items() if k.startswith("slot-")}
    assert len(ours) == 3 and all(v[1] == "RUNNING" for v in ours.values()), jobs
    ids = {a["id"] for a in agents(c)}
    assert {k.rsplit("-", 2)[-2] + "-" + k.rsplit("-", 1)[-1] for k in ours} == ids
    run_trainer(c, "hpc")
    cl = c.client()
    a = cl.call("acquire", {"trajectory_id": "x"})
    h = a["slot"]
    r = cl.call("exec", {"slot": h, "tool": "bash",
                         "args": {"command": "echo $SLURM_JOB_ID; id -u; pwd"}})
    job = job_of(cluster, h.split("/")[0])
    out = r["stdout"].decode().split()
    assert out[0] == job and out[1].startswith("200"), out
    # the workspace lives under the node's --workspace; commands see it at
    # /workspace in their box (cwd_path says where)
    assert a["workspace"].startswith(str(cluster.dir / "ws")), a
    assert out[2] == a["cwd_path"] and a["cwd_path"] in ("/workspace", a["workspace"]), (out, a)
    cl.close()


def test_the_sif_under_apptainer(controllers, cluster) -> None:
    import sys
    sys.path.insert(0, str(ROOT / "tests" / "images"))
    from images_lib import SIF, apptainer_root_args, ensure_apptainer  # type: ignore
    app = ensure_apptainer()
    if not Path(SIF).exists():
        b = subprocess.run([str(ROOT / "images" / "build.sh"), "sif"], capture_output=True,
                           text=True, timeout=3600, env=dict(os.environ, APPTAINER=str(app)))
        assert b.returncode == 0, b.stderr[-3000:]
    c = make(controllers, cluster, "sif", min_agents=2, max_agents=2, image=str(SIF),
             slurm={"container": [str(app), "-q", "exec", *apptainer_root_args(), "{image}"],
                    "agent": "/usr/local/bin/slot-agent"})
    run_trainer(c, "sif", n=8, conc=4)
    cl = c.client()
    h = cl.call("acquire", {"trajectory_id": "x"})["slot"]
    r = cl.call("exec", {"slot": h, "tool": "bash",
                         "args": {"command": "head -1 /etc/os-release"}})
    assert b"Debian" in r["stdout"], r
    cl.close()


def test_scancel_mid_batch_fails_only_that_agents_requests(controllers, cluster) -> None:
    c = make(controllers, cluster, "cx", min_agents=2, max_agents=2)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    victim = hs[0].split("/")[0]
    job = job_of(cluster, victim)
    # the victim's commands outlast any delay of Slurm's signals under load;
    # `&&`: Slurm's SIGTERM reaches the job's processes too, and a shell
    # whose sleep it killed must not go on to say done
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash",
         "args": {"command": ("sleep 90" if h.startswith(victim + "/") else "sleep 3")
                  + " && echo done"}} for h in hs]})
    time.sleep(1)
    assert cluster.run("scancel", job).returncode == 0
    res = cl.wait(rid, timeout=60)[0]["result"]["results"]
    # scancel sends SIGTERM to the agent and the relay at once: the agent may
    # answer the commands it kills before its stream goes
    ctl_conftest.assert_only_victim_lost(hs, res, victim, needle="CANCELLED", or_killed=True)
    lost = [x for h, x in zip(hs, res) if h.startswith(victim + "/") and not x.get("ok")]
    if not lost:  # then the agent itself is reported lost, with Slurm's word for why
        deadline = time.monotonic() + 30
        while "CANCELLED" not in c.status()["profiles"]["cx"]["last_error"]:
            assert time.monotonic() < deadline, c.status()["profiles"]["cx"]
            time.sleep(0.2)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2
                  and victim not in {a["id"] for a in agents(c)}, timeout=60)
    cl.close()


def test_a_job_hitting_its_time_limit(controllers, cluster) -> None:
    c = make(controllers, cluster, "tl", min_agents=1, max_agents=1,
             slurm={"sbatch_args": ["--time=1"]})
    cl = c.client(timeout=200)
    h = cl.call("acquire", {"trajectory_id": "t"})["slot"]
    job = job_of(cluster, h.split("/")[0])
    # runs into the limit (enforced 0-30 s after the minute)
    r = cl.call_raw("exec", {"slot": h, "tool": "bash", "args": {"command": "sleep 200"}},
                    timeout=150)
    assert r["error"]["code"] == "agent_lost", r
    assert "TIMEOUT" in r["error"]["message"] and job in r["error"]["message"], r
    assert cluster.state(job).startswith("TIMEOUT")
    # replaced
    c.wait_agents(lambda st: st["agents"]["ready"] == 1, timeout=60)
    cl.close()


def test_more_memory_than_the_node_is_a_clear_error(controllers, cluster) -> None:
    c = make(controllers, cluster, "big", wait=False, memory="10T")
    t0 = time.monotonic()
    msg = no_capacity(c, 5000)
    assert time.monotonic() - t0 < 30
    assert "sbatch refused the job" in msg and "Memory specification" in msg, msg
    assert not [k for k in cluster.jobs() if k.startswith("slot-")]


def test_a_job_pending_past_the_start_timeout_shows_slurms_reason(controllers,
                                                                   cluster) -> None:
    c = make(controllers, cluster, "wide", wait=False, cpu=512, start_timeout="4s",
             max_agents=1)
    msg = no_capacity(c, 8000)
    assert "PENDING" in msg and "PartitionConfig" in msg, msg
    out = subprocess.run([str(AGENTCTL), "--controller", c.addr, "agents"],
                         capture_output=True, text=True, timeout=30).stdout
    assert "PartitionConfig" in out, out
    # the controller cancels what it gives up on before it tries again:
    # never more pending jobs than max_agents
    for _ in range(30):
        assert len([k for k in cluster.jobs() if k.startswith("slot-wide-")
                    or "-wide-" in k]) <= 1
        time.sleep(0.2)
    log = c.log()
    assert "not ready after 4 s" in log, log[-2000:]


def test_controller_kill9_and_restart_reattach(controllers, cluster) -> None:
    c = make(controllers, cluster, "rs", min_agents=2, max_agents=2)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"traj-{i}"})["slot"] for i in range(3)]
    for i, h in enumerate(hs):
        cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": f"echo {i} > f"}})
    cl.send("exec", {"slot": hs[0], "tool": "bash",
                     "args": {"command": "sleep 3; echo bg > g"}})
    time.sleep(0.5)
    jobs_before = {k: v[0] for k, v in cluster.jobs().items() if k.startswith("slot-")}
    c.kill9()
    cl.close()
    c.expect_clean_exit = True
    c.start(wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 3,
                  timeout=60)
    assert {k: v[0] for k, v in cluster.jobs().items() if k.startswith("slot-")} == jobs_before
    assert all(a["reattached"] for a in agents(c))
    cl = c.client()
    ctl_conftest.assert_leases_and_files(cl, hs, "f")
    time.sleep(3)
    r = cl.call("exec", {"slot": hs[0], "tool": "bash", "args": {"command": "cat g"}})
    assert r["stdout"] == b"bg\n"
    cl.close()


def test_slurmctld_restarted_mid_run(controllers, cluster) -> None:
    c = make(controllers, cluster, "cr", min_agents=2, max_agents=3)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    for i, h in enumerate(hs):
        cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": f"echo {i} > s"}})
    ids = {a["id"] for a in agents(c)}
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash", "args": {"command": "sleep 5; cat s"}} for h in hs]})
    done: dict[str, Any] = {}

    def restart() -> None:
        done["r"] = subprocess.run([str(HERE / "slurm-dev.sh"), "restart-ctld", str(cluster.dir)],
                                   capture_output=True, text=True, timeout=120, env=cluster.env)

    th = threading.Thread(target=restart)
    th.start()
    # commands keep running while slurmctld is away: the steps talk to slurmd
    r = cl.call("exec", {"slot": hs[1], "tool": "bash", "args": {"command": "cat s"}})
    assert r["stdout"] == b"1\n"
    th.join(150)
    assert done["r"].returncode == 0, done["r"].stderr[-2000:]
    res = cl.wait(rid, timeout=60)[0]["result"]["results"]
    assert [x["result"]["stdout"] for x in res] == [f"{i}\n".encode() for i in range(4)], res
    assert {a["id"] for a in agents(c)} == ids and c.status()["agents"]["ready"] == 2
    # and scaling up goes through the restarted slurmctld
    more = [cl.call("acquire", {"trajectory_id": f"n{i}", "timeout_ms": 60000})["slot"]
            for i in range(2)]
    assert {h.split("/")[0] for h in more} - ids
    cl.close()


def srun_of(launcher: int) -> int:
    """The `srun --overlap` step that carries the stream: the launcher's
    (`slot-slurm attach`) srun child."""
    kids = subprocess.run(["pgrep", "-P", str(launcher), "-x", "srun"], capture_output=True,
                          text=True, timeout=30).stdout.split()
    assert len(kids) == 1, (launcher, kids)
    return int(kids[0])


def test_killed_srun_step_mid_stream_loses_nothing(controllers, cluster) -> None:
    """32 streamed commands running, the `srun --overlap` step of the stream
    killed (SIGKILL to the launcher's srun child; the job and its agent
    daemon stay): `slot-slurm list` still names the job, so the controller
    attaches a new step and resends: every command completes once with
    byte-exact output, the leases stay, the agent is the same and
    reconnected. Prints the time to the first resumed output byte."""
    c = make(controllers, cluster, "rl", min_agents=1, max_agents=1,
             slots_per_agent=linkdrop.N)
    cl = c.client()
    a = cl.call("agents")["agents"][0]
    job = job_of(cluster, a["id"])
    srun = srun_of(a["pid"])
    r = linkdrop.run_and_drop_timed(cl, lambda: os.kill(srun, 9), a["id"], "slurm")
    b = r["agent"]
    assert b["link_cause"], b
    assert job_of(cluster, a["id"]) == job  # the same job
    assert srun_of(b["pid"]) != srun
    cl.close()


def test_stop_cancels_every_job(controllers, cluster) -> None:
    c = make(controllers, cluster, "st", min_agents=2, max_agents=2)
    assert len([k for k in cluster.jobs() if k.startswith("slot-")]) == 2
    r = subprocess.run([str(AGENTCTL), "--controller", c.addr, "stop"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "controller stopped" in r.stdout, r.stderr
    assert c.proc.wait(5) == 0
    deadline = time.monotonic() + 20
    while [k for k in cluster.jobs() if k.startswith("slot-")] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [k for k in cluster.jobs() if k.startswith("slot-")]


def test_scale_down_cancels_only_idle_agents(controllers, cluster) -> None:
    c = make(controllers, cluster, "sd", min_agents=0, max_agents=2, idle_timeout="1s",
             wait=False)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}", "timeout_ms": 60000})["slot"]
          for i in range(3)]
    by: dict[str, list[str]] = {}
    for h in hs:
        by.setdefault(h.split("/")[0], []).append(h)
    assert len(by) == 2
    keep = next(a for a, v in by.items() if len(v) == 2)
    gone = next(a for a in by if a != keep)
    cl.call("release", {"slot": by[gone][0]})
    c.wait_agents(lambda st: st["agents"]["total"] == 1, timeout=60)
    deadline = time.monotonic() + 20
    while any(k.endswith("-" + gone) for k in cluster.jobs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    names = set(cluster.jobs())
    assert not any(k.endswith("-" + gone) for k in names)
    assert any(k.endswith("-" + keep) for k in names)  # leased: never cancelled
    r = cl.call("exec", {"slot": by[keep][0], "tool": "bash", "args": {"command": "echo ok"}})
    assert r["stdout"] == b"ok\n"
    cl.close()
