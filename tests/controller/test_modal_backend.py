"""The controller's `modal` backend end to end against the FAKE Modal SDK of
tests/controller/modal_fake (Modal's cloud cannot be reached from here; see
test_modal_bridge.py): the controller runs build/slot-modal-bridge per agent,
the fake runs each sandbox as real local processes, so the example trainer's
traffic really flows controller -> bridge -> fake exec of `slot-agent
--attach` -> the agent daemon that is the sandbox's own process. Covered: the
trainer on a modal profile next to a local one in the same controller;
profile aliases and `agentctl profiles`; a sandbox dying mid-batch
(agent_lost for its requests only, then a replacement); a controller kill -9
and restart finding the same sandboxes by name with leases and workspaces
intact; a bridge whose link ends (the SDK's reconnect budget spent) replaced
by a new one on the same agent; idle scale-down and `agentctl stop`
terminating sandboxes; the 24 h lifetime cap and the idle timeout checks."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (AGENTCTL_BIN, BUILD, ROOT, Controller, assert_leases_and_files,
                      assert_only_victim_lost)
from test_modal_bridge import FakeModal, alive, fm, wait_for  # noqa: F401 (fixture)

TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"
BRIDGE = BUILD / "slot-modal-bridge"


def config(app: str, **cpu: Any) -> str:
    prof: dict[str, Any] = {"backend": "modal", "slots_per_agent": 4, "min_pool": 1,
                            "max_pool": 3, "image": "debian:bookworm-slim",
                            "start_timeout": "60s", "env_vars": {"MODE": "rl"},
                            "modal": {"app": app, "bridge": [str(BRIDGE)]}, **cpu}
    return json.dumps({"profiles": {
        "cpu": prof,
        "loc": {"backend": "local", "slots_per_agent": 2, "min_agents": 1, "max_agents": 1},
    }})


def start(controller_factory, fm: FakeModal, app: str = "rlapp", **cpu: Any) -> Controller:
    c = controller_factory(config(app, **cpu), env=fm.env, wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] >= 2, timeout=60)
    return c


def agents(c: Controller, profile: str = "cpu") -> list[dict]:
    cl = c.client()
    try:
        return [a for a in cl.call("agents")["agents"] if a["profile"] == profile]
    finally:
        cl.close()


def sandbox_of(fm: FakeModal, agent_id: str, app: str = "rlapp"):
    return fm.running(f"{app}-{agent_id}")


def ctl(c: Controller, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(AGENTCTL_BIN), "--controller", c.addr, *args],
                          capture_output=True, text=True, timeout=120)


# fm comes first in every signature: fixtures are torn down in reverse, so the
# controller stops before the fake's cleanup ends its sandboxes (else it would
# start replacements that nobody ends).


def test_trainer_on_modal_next_to_a_local_profile(fm: FakeModal, controller_factory) -> None:
    c = start(controller_factory, fm)
    r = subprocess.run(["/usr/bin/python3", str(TRAINER), "--address", c.addr, "--profile",
                        "cpu", "--trajectories", "24", "--concurrency", "8", "--steps", "3"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "errors:        0" in r.stdout, r.stdout + r.stderr
    # 8 at a time on 4-slot agents: the pool grew (the trainer may be done
    # before the new agents are ready), one sandbox per ready agent (an
    # agent still starting may not have its sandbox yet)
    assert 2 <= len(agents(c)) <= 3, agents(c)
    ags = wait_for(lambda: [a for a in agents(c) if a["state"] == "ready"][1:] and
                   [a for a in agents(c) if a["state"] == "ready"], 60, "a second ready agent")
    assert len(ags) <= 3, agents(c)
    for a in ags:
        sb = sandbox_of(fm, a["id"])
        assert sb is not None, a
        assert sb.create_args()["image"]["ref"] == "debian:bookworm-slim"
        assert sb.create_args()["env"] == {"MODE": "rl"}
        # no modal.idle_timeout: Modal gets none and never ends an idle sandbox
        assert sb.create_args()["idle_timeout"] is None
        assert sb.create_args()["timeout"] == 86400
    # the other profile is served by the same controller
    cl = c.client()
    h = cl.call("acquire", {"profile": "loc", "trajectory_id": "l"})["slot"]
    assert h.startswith("loc-")
    m = cl.call("acquire", {"profile": "cpu", "trajectory_id": "m"})["slot"]
    out = cl.call("exec", {"slot": m, "tool": "bash", "args": {"command": "echo $MODE"}})
    assert out["stdout"] == b"rl\n"
    cl.close()
    p = ctl(c, "profiles")
    assert p.returncode == 0, p.stderr
    rows = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:] if ln.strip()}
    assert "modal" in rows["cpu"] and "local" in rows["loc"], p.stdout
    pj = json.loads(ctl(c, "--json", "profiles").stdout)
    cpu = next(x for x in pj["profiles"] if x["name"] == "cpu")
    assert (cpu["min_agents"], cpu["max_agents"]) == (1, 3)  # min_pool / max_pool
    assert cpu["modal"]["app"] == "rlapp"


def test_sandbox_dying_mid_batch_fails_only_its_requests(fm: FakeModal,
                                                         controller_factory) -> None:
    c = start(controller_factory, fm, min_pool=2, max_pool=2)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(8)]
    victim = hs[0].split("/")[0]
    sb = sandbox_of(fm, victim)
    assert sb is not None
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash", "args": {"command": "sleep 3; echo done"}} for h in hs]})
    time.sleep(0.8)
    os.kill(sb.process_pid(), signal.SIGKILL)  # the sandbox's agent dies: Modal ends it
    res = cl.wait(rid, timeout=60)[0]["result"]["results"]
    assert_only_victim_lost(hs, res, victim)
    st = c.wait_agents(lambda st: st["agents"]["ready"] == 3
                       and victim not in {a["id"] for a in agents(c)}, timeout=60)
    assert st["agents"]["ready"] == 3  # two modal agents again, plus the local one
    assert fm.running(f"rlapp-{victim}") is None
    cl.close()


def test_controller_kill9_and_restart_finds_the_same_sandboxes(fm: FakeModal,
                                                                controller_factory) -> None:
    c = start(controller_factory, fm, min_pool=2, max_pool=2)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"traj-{i}"})["slot"] for i in range(3)]
    for i, h in enumerate(hs):
        cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": f"echo {i} > f"}})
    cl.send("exec", {"slot": hs[0], "tool": "bash",
                     "args": {"command": "sleep 2; echo bg > g"}})
    time.sleep(0.3)
    before = {a["id"]: sandbox_of(fm, a["id"]).process_pid() for a in agents(c)}
    c.kill9()
    cl.close()
    c.expect_clean_exit = True
    c.start(wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] == 3 and st["slots"]["leased"] == 3,
                  timeout=60)
    after = {a["id"]: sandbox_of(fm, a["id"]).process_pid() for a in agents(c)}
    assert after == before  # same agents in the same sandbox processes
    assert all(a["reattached"] for a in agents(c))
    cl = c.client()
    assert_leases_and_files(cl, hs, "f")
    time.sleep(2)
    r = cl.call("exec", {"slot": hs[0], "tool": "bash", "args": {"command": "cat g"}})
    assert r["stdout"] == b"bg\n"
    cl.close()


def test_bridge_whose_link_ends_is_reattached_and_nothing_is_lost(fm: FakeModal,
                                                                  controller_factory) -> None:
    """Every bridge's exec stdout breaks after each 100 000 bytes; the SDK's 10
    reconnects carry a bridge through 1.1 MB, then it exits 7 (the sandbox
    runs). The controller's `list` still shows the sandbox, a new bridge
    reaches the same agent, and the request in flight is resent."""
    env = dict(fm.env, SLOT_FAKE_MODAL_STDOUT_BREAK_EVERY="100000")
    c = controller_factory(config("rlapp", min_pool=1, max_pool=1), env=env, wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] >= 2, timeout=60)
    (a,) = agents(c)
    sb = sandbox_of(fm, a["id"])
    assert sb is not None
    pid = sb.process_pid()
    cl = c.client()
    h = cl.call("acquire", {"profile": "cpu", "trajectory_id": "t"})["slot"]
    for i in range(8):  # 1.6 MB of output in all
        r = cl.call("exec", {"slot": h, "tool": "bash", "args": {
            "command": f"head -c 200000 /dev/zero | tr '\\0' '{i}'"}}, timeout=120)
        assert r["stdout"] == str(i).encode() * 200000, (len(r["stdout"]), r.get("exit_code"))
    (b,) = agents(c)
    assert b["id"] == a["id"] and b["instance"] == a["instance"] and b["reconnects"] >= 1, b
    assert "status 7" in b["link_cause"] and "the sandbox still runs" in b["stderr"], b
    assert len(fm.sandboxes()) == 1 and sandbox_of(fm, a["id"]).process_pid() == pid
    assert cl.call("leases")["leases"][0]["slot"] == h
    cl.close()


def test_idle_scale_down_and_stop_terminate_sandboxes(fm: FakeModal,
                                                      controller_factory) -> None:
    c = start(controller_factory, fm, min_pool=1, max_pool=3, scale_down_idle="1s")
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}", "timeout_ms": 60000})["slot"]
          for i in range(6)]
    ids = sorted({h.split("/")[0] for h in hs})
    assert len(ids) == 2
    keep = hs[0].split("/")[0]
    for h in hs:
        if not h.startswith(keep + "/"):
            cl.call("release", {"slot": h})
    gone = next(i for i in ids if i != keep)
    wait_for(lambda: fm.running(f"rlapp-{gone}") is None, 30, "the idle sandbox to end")
    assert fm.running(f"rlapp-{keep}") is not None  # leased: never stopped
    cl.close()
    r = ctl(c, "stop")
    assert r.returncode == 0 and "controller stopped" in r.stdout, r.stderr
    assert c.proc.wait(5) == 0
    assert fm.running(f"rlapp-{keep}") is None
    assert not [sb for sb in fm.sandboxes() if sb.running()]


def test_modal_profile_errors_are_clear(tmp_path: Path) -> None:
    from conftest import CONTROLLER_BIN

    def check(prof: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "c.yaml"
        f.write_text(json.dumps({"profiles": {"m": {"backend": "modal", **prof}}}))
        return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check"],
                              capture_output=True, text=True, timeout=10)

    r = check({"modal": {"bridge": [str(BRIDGE)], "on_signal": "explode"}})
    assert r.returncode == 2 and "modal.on_signal is detach or terminate" in r.stderr
    r = check({"modal": {"bridge": [str(BRIDGE)], "app": "x" * 60}})
    assert r.returncode == 2 and "at most 64" in r.stderr
    r = check({"modal": {"bridge": [str(BRIDGE)]}, "exec": {"launch": ["cat"]}})
    assert r.returncode == 2 and "makes its own exec templates" in r.stderr
    # found beside slot-controller by default
    r = check({"gpu": "A10G", "secrets": ["hf"], "workdir": "/w"})
    assert r.returncode == 0, r.stderr
    assert f"exec.launch: {BRIDGE} attach --app slot --name slot-{{agent_id}}" in r.stdout
    assert "--gpu {gpu}" in r.stdout and "--secret hf" in r.stdout and "--workdir /w" in r.stdout
    assert "--timeout 86400 " in r.stdout and "--idle-timeout" not in r.stdout
    assert r.stderr == ""


def test_modal_lifetimes_past_24h_are_refused(tmp_path: Path) -> None:
    from conftest import CONTROLLER_BIN

    def check(prof: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "c.yaml"
        f.write_text(json.dumps({"profiles": {"m": {"backend": "modal",
                                                    "modal": {"bridge": [str(BRIDGE)]}, **prof}}}))
        return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check"],
                              capture_output=True, text=True, timeout=10)

    r = check({"modal": {"bridge": [str(BRIDGE)], "timeout": "25h"}})
    assert r.returncode == 2, r.stderr
    assert ("profile 'm': modal.timeout is 90000 s; Modal sandboxes live at most 86400 s (24 h)"
            in r.stderr)
    r = check({"max_lifetime": "90000s"})
    assert r.returncode == 2, r.stderr
    assert ("profile 'm': max_lifetime is 90000 s; Modal sandboxes live at most 86400 s (24 h)"
            in r.stderr)
    # Exactly 24 h is fine; max_lifetime + 1 h of grace is cut at Modal's 24 h.
    r = check({"modal": {"bridge": [str(BRIDGE)], "timeout": "24h"}})
    assert r.returncode == 0 and "--timeout 86400 " in r.stdout, r.stderr
    r = check({"max_lifetime": "23.5h"})
    assert r.returncode == 0 and "--timeout 86400 " in r.stdout, r.stderr
    r = check({"max_lifetime": "2h"})
    assert r.returncode == 0 and "--timeout 10800 " in r.stdout, r.stderr
    r = check({"max_lifetime": "3h", "modal": {"bridge": [str(BRIDGE)], "timeout": "2h"}})
    assert r.returncode == 0 and "--timeout 7200 " in r.stdout, r.stderr
    assert "max_lifetime (10800 s) is longer than modal.timeout (7200 s)" in r.stderr


def test_modal_idle_timeout_checks(tmp_path: Path) -> None:
    from conftest import CONTROLLER_BIN

    def check(prof: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        f = tmp_path / "c.yaml"
        f.write_text(json.dumps({"profiles": {"m": {"backend": "modal", **prof}}}))
        return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check"],
                              capture_output=True, text=True, timeout=10)

    r = check({"modal": {"bridge": [str(BRIDGE)], "idle_timeout": "30s"}})
    assert r.returncode == 0 and "--idle-timeout 30 " in r.stdout, r.stderr
    assert "profile 'm': modal.idle_timeout is 30 s, less than 60 s" in r.stderr
    assert "its agent is lost" in r.stderr
    r = check({"modal": {"bridge": [str(BRIDGE)], "idle_timeout": "2m"}})
    assert r.returncode == 0 and "--idle-timeout 120 " in r.stdout, r.stderr
    assert "idle_timeout" not in r.stderr


def test_modal_timeout_past_24h_stops_the_controller_at_start(fm: FakeModal,
                                                               controller_factory) -> None:
    cfg = json.loads(config("rlapp"))
    cfg["profiles"]["cpu"]["modal"]["timeout"] = "25h"
    with pytest.raises(RuntimeError) as e:
        controller_factory(json.dumps(cfg), env=fm.env, wait_ready=False)
    assert "controller exited 2" in str(e.value)
    assert ("profile 'cpu': modal.timeout is 90000 s; Modal sandboxes live at most 86400 s "
            "(24 h)") in str(e.value)
    assert fm.sandboxes() == []


def test_modal_idle_timeout_reaches_the_sandbox(fm: FakeModal, controller_factory) -> None:
    cfg = json.loads(config("rlapp"))
    cfg["profiles"]["cpu"]["modal"]["idle_timeout"] = "5m"
    c = controller_factory(json.dumps(cfg), env=fm.env, wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] >= 2, timeout=60)
    (a,) = agents(c)
    sb = sandbox_of(fm, a["id"])
    assert sb is not None and sb.create_args()["idle_timeout"] == 300


def test_killed_bridge_mid_stream_loses_nothing(fm: FakeModal, controller_factory) -> None:
    """32 streamed commands on one sandbox's agent, its bridge killed with
    SIGKILL: `list` still shows the sandbox, a new bridge reaches the same
    agent, and every command completes once, byte-exact (linkdrop)."""
    from linkdrop import N, run_and_drop_timed
    c = controller_factory(config("rlapp", slots_per_agent=N, min_pool=1, max_pool=1),
                           env=fm.env, wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] >= 2, timeout=60)
    (a,) = agents(c)
    cl = c.client()
    slots = [cl.call("acquire", {"profile": "cpu", "trajectory_id": f"t{i}"})["slot"]
             for i in range(N)]
    res = run_and_drop_timed(cl, lambda: os.kill(a["pid"], signal.SIGKILL), a["id"], "modal",
                             slots=slots)
    (b,) = agents(c)
    assert b["id"] == a["id"] and b["instance"] == a["instance"] and b["reconnects"] >= 1, b
    assert b["pid"] != a["pid"] and "killed by signal 9" in b["link_cause"], b
    assert len(fm.sandboxes()) == 1, res
    cl.close()
