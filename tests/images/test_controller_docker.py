"""The controller's `exec` backend driving real Docker containers of the
slot-agent image: `docker run -i --rm IMAGE slot-agent --stdio` agents run
the example trainer to completion; a container killed mid-batch fails only
its own requests; daemon containers (`docker run -d`) reached through
`docker exec -i CTR slot-agent --attach` survive a controller kill -9 and are
found again through `docker ps`, with their leases, workspaces and running
commands, and a killed `docker exec` relay loses nothing (the controller
reconnects through a new one). Every container is labelled with this run's
id and removed at the end, whatever happened."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from images_lib import FIGURES, IMAGE, ROOT, docker

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
PY = "/usr/bin/python3"
TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"


def run_label() -> str:
    return f"slot-test-{uuid.uuid4().hex[:8]}"


def remove_labelled(label: str) -> None:
    r = docker("ps", "-aq", "--filter", f"label=slot.test={label}", check=False, timeout=60)
    ids = r.stdout.decode().split()
    if ids:
        docker("rm", "-f", *ids, check=False, timeout=120)


def containers(label: str) -> dict[str, str]:
    """agent id -> container id of this run's running containers."""
    out = docker("ps", "--filter", f"label=slot.test={label}", "--format",
                 '{{.Label "slot.agent"}} {{.ID}}', timeout=60).stdout.decode()
    return dict(line.split() for line in out.splitlines() if line.strip())


@pytest.fixture
def ctl_dir() -> Iterator[tuple[Path, str]]:
    import shutil
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="sd-", dir="/tmp"))
    label = run_label()
    made: list = []
    try:
        yield d, label, made  # type: ignore[misc]
    finally:
        for c in made:
            if c.proc and c.proc.poll() is None:
                c.stop()
        remove_labelled(label)
        shutil.rmtree(d, ignore_errors=True)


def config(label: str, block: dict, **fields) -> str:
    prof = {"backend": "exec", "image": IMAGE, "slots_per_agent": 4, "min_agents": 2,
            "max_agents": 4, "start_timeout": "60s", **fields, "exec": block}
    return json.dumps({"profiles": {"docker": prof}})


def stdio_block(label: str) -> dict:
    return {"launch": ["docker", "run", "-i", "--rm", "--name", "{controller}-{agent_id}",
                       "--label", f"slot.test={label}", "--label", "slot.agent={agent_id}",
                       "{image}", "slot-agent", "--stdio", "--slots", "{slots}",
                       "--data-dir", "/data"]}


def daemon_block(label: str) -> dict:
    name = "{controller}-{agent_id}"
    return {
        "start": ["docker", "run", "-d", "--name", name, "--label", f"slot.test={label}",
                  "--label", "slot.controller={controller}", "--label", "slot.agent={agent_id}",
                  "{image}", "slot-agent", "--listen", "unix:/run/slot-agent.sock",
                  "--slots", "{slots}", "--data-dir", "/data"],
        "launch": ["docker", "exec", "-i", name, "slot-agent", "--attach",
                   "unix:/run/slot-agent.sock"],
        "stop": ["docker", "rm", "-f", name],
        "list": ["docker", "ps", "--filter", f"label=slot.test={label}", "--filter",
                 "label=slot.controller={controller}", "--format", '{{.Label "slot.agent"}}'],
    }


def make(d: Path, made: list, text: str) -> Controller:
    sub = d / f"c{len(made)}"
    sub.mkdir()
    c = Controller(sub, text, wait_ready=False)
    made.append(c)
    return c


def test_example_trainer_runs_on_docker_agents(images, ctl_dir) -> None:
    d, label, made = ctl_dir
    ctl = make(d, made, config(label, stdio_block(label)))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=120)
    assert len(containers(label)) == 2
    r = subprocess.run([PY, str(TRAINER), "--address", ctl.addr, "--profile", "docker",
                        "--trajectories", "24", "--concurrency", "8", "--steps", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "errors:        0" in r.stdout, r.stdout
    c = ctl.client()
    a = c.call("acquire", {"trajectory_id": "where"})
    s = a["slot"]
    out = c.call("exec", {"slot": s, "tool": "bash",
                          "args": {"command": "cat /etc/debian_version; id -u; pwd"}})
    # no box under Docker's default seccomp profile: the host path, as reported
    assert out["exit_code"] == 0 and out["stdout"].split(b"\n")[2] == a["cwd_path"].encode()
    assert a["cwd_path"].startswith("/data/slots/"), a
    c.close()
    assert ctl.stop() == 0
    # docker run --rm: the containers went with their agents
    deadline = time.monotonic() + 30
    while containers(label) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert containers(label) == {}


def test_killed_container_fails_only_its_requests(images, ctl_dir) -> None:
    d, label, made = ctl_dir
    ctl = make(d, made, config(label, stdio_block(label), slots_per_agent=2, max_agents=2))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=120)
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    victim = slots[0].split("/")[0]
    rid = c.send("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 2; echo done"}} for s in slots]})
    time.sleep(0.7)
    docker("kill", containers(label)[victim])
    res = c.wait(rid, timeout=60)[0]["result"]["results"]
    for s, r in zip(slots, res):
        if s.startswith(victim + "/"):
            assert r["error"]["code"] == "agent_lost" and victim in r["error"]["message"], r
        else:
            assert r["ok"] and r["result"]["stdout"] == b"done\n", r
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and victim not in containers(label),
                    timeout=120)
    c.close()


def test_daemon_containers_survive_a_controller_kill9(images, ctl_dir) -> None:
    d, label, made = ctl_dir
    ctl = make(d, made, config(label, daemon_block(label)))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=120)
    before = containers(label)
    assert len(before) == 2
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"traj-{i}"})["slot"] for i in range(3)]
    for i, s in enumerate(slots):
        c.call("exec", {"slot": s, "tool": "bash", "args": {"command": f"echo {i} > state"}})
    c.send("exec", {"slot": slots[0], "tool": "bash",
                    "args": {"command": "sleep 3; echo bg > late"}})
    time.sleep(0.5)
    ctl.kill9()
    c.close()
    ctl.expect_clean_exit = True
    ctl.start(wait_ready=False)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 3,
                    timeout=120)
    assert containers(label) == before
    c = ctl.client()
    ctl_conftest.assert_leases_and_files(c, slots, "state")
    time.sleep(3)
    r = c.call("exec", {"slot": slots[0], "tool": "bash", "args": {"command": "cat late"}})
    assert r["stdout"] == b"bg\n"
    # a drained agent goes through the stop template: its container is removed
    for s in slots:
        c.call("release", {"slot": s})
    gone = slots[0].split("/")[0]
    c.call("drain", {"agent": gone})
    c.close()
    deadline = time.monotonic() + 60
    while gone in containers(label) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert gone not in containers(label)
    assert docker("ps", "-aq", "--filter", f"id={before[gone]}", check=False).stdout == b""


def test_killed_docker_exec_relay_mid_stream_loses_nothing(images, ctl_dir) -> None:
    """A daemon container behind `docker exec -i CTR slot-agent --attach`:
    32 streamed commands running, the `docker exec` relay (the agent's
    `pid`) killed; every command completes once with byte-exact output, the
    leases stay, the agent (and its container) is the same and reconnected.
    Prints the time to the first resumed output byte."""
    d, label, made = ctl_dir
    ctl = make(d, made, config(label, daemon_block(label), slots_per_agent=linkdrop.N,
                               min_agents=1, max_agents=1))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1, timeout=120)
    before = containers(label)
    c = ctl.client()
    a = c.call("agents")["agents"][0]
    assert a["address"].startswith("exec:docker exec -i"), a
    assert Path(f"/proc/{a['pid']}/exe").resolve().name == "docker", a
    r = linkdrop.run_and_drop_timed(c, lambda: os.kill(a["pid"], signal.SIGKILL), a["id"],
                                    "exec-docker")
    b = r["agent"]
    assert b["pid"] != a["pid"] and "killed by signal 9" in b["link_cause"], b
    assert containers(label) == before
    if r["first_byte_ms"] is not None:
        FIGURES["reconnect exec-docker: first resumed byte"] = f"{r['first_byte_ms']:.0f} ms"
    c.close()


def test_image_that_does_not_exist_is_reported(images, ctl_dir) -> None:
    d, label, made = ctl_dir
    ctl = make(d, made, config(label, stdio_block(label), image="slot-nosuch:never",
                               min_agents=1))
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 8000})
    assert r["error"]["code"] == "no_capacity"
    assert "slot-nosuch" in r["error"]["message"], r
    c.close()
