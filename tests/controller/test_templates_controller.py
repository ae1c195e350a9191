"""Templates through the controller and real local agents: acquire with a
template name or recipe (built once per agent in the slot that is then
leased; later acquires placed on an agent that holds it), a failing recipe,
an unknown template, fork as a controller call and through the Python
client, eviction past the profile's template_disk_budget, and agentctl
templates."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from conftest import AGENTCTL_BIN, ROOT, Controller
from slotwire import AgentError, Client

sys.path.insert(0, str(ROOT / "controller" / "python"))
from slot_client import ControllerToolBackend  # noqa: E402

CFG = ("profiles:\n  default:\n    slots_per_agent: {slots}\n    min_agents: {agents}\n"
       "    max_agents: {agents}\n{extra}")
RECIPE = {"name": "proj", "script": "mkdir -p src && echo 'print(1)' > src/main.py &&"
                                    " echo v1 > VERSION && sleep 0.3"}


def cfg(slots: int = 3, agents: int = 1, extra: str = "") -> str:
    return CFG.format(slots=slots, agents=agents, extra=extra)


def bash(c: Client, slot: str, command: str) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "args": {"command": command}})


def out(c: Client, slot: str, command: str) -> str:
    r = bash(c, slot, command)
    assert r["exit_code"] == 0, r
    return r["stdout"].decode() if isinstance(r["stdout"], bytes) else r["stdout"]


def agentctl(ctl: Controller, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLOT_AGENT", "SLOT_CONTROLLER", "SLOT_TOKEN_FILE")}
    return subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def test_acquire_builds_once_then_reuses(controller_factory) -> None:
    ctl = controller_factory(cfg(slots=3))
    c = ctl.client()
    ids = [c.send("acquire", {"trajectory_id": f"t{i}", "template": RECIPE}) for i in range(3)]
    leases = [c.wait(i)[0] for i in ids]
    for r in leases:
        assert r["ok"] is True, r
    res = [r["result"] for r in leases]
    assert {x["template"] for x in res} == {"proj"}
    assert {x["workspace_mode"] for x in res} <= {"overlay", "copy"}
    for x in res:
        assert out(c, x["slot"], "cat VERSION src/main.py") == "v1\nprint(1)\n"
    # Each workspace is its own.
    out(c, res[0]["slot"], "echo v2 > VERSION")
    assert out(c, res[1]["slot"], "cat VERSION") == "v1\n"
    ag = c.call("templates")["agents"]
    assert len(ag) == 1 and ag[0]["builds"] == 1, ag
    assert [t["name"] for t in ag[0]["templates"]] == ["proj"]
    # The controller learns the agent's counts after each lease on a template.
    import time
    deadline = time.monotonic() + 5
    while c.call("templates")["agents"][0]["templates"][0]["in_use"] != 3:
        assert time.monotonic() < deadline, c.call("templates")
        time.sleep(0.05)
    for x in res:
        c.call("release", {"slot": x["slot"], "reset": True})
    # By name only, now that the agent holds it: no second build.
    r = c.call("acquire", {"template": "proj"})
    assert out(c, r["slot"], "cat VERSION") == "v1\n"
    assert c.call("templates")["agents"][0]["builds"] == 1
    c.call("release", {"slot": r["slot"]})
    text = agentctl(ctl, "templates")
    assert text.returncode == 0, text.stderr
    assert "proj" in text.stdout and ag[0]["agent"] in text.stdout, text.stdout
    c.close()


def test_failed_recipe_and_unknown_template(controller_factory) -> None:
    ctl = controller_factory(cfg(slots=2))
    c = ctl.client()
    r = c.call_raw("acquire", {"template": {"name": "bad", "script": "echo nope >&2; exit 7"}})
    assert r["ok"] is False and r["error"]["code"] == "bad_request", r
    assert "exit 7" in r["error"]["message"] and "nope" in r["error"]["message"]
    r = c.call_raw("acquire", {"template": "never-built"})
    assert r["ok"] is False and r["error"]["code"] == "not_found", r
    r = c.call_raw("acquire", {"template": {"name": "x", "color": "red"}})
    assert r["ok"] is False and r["error"]["code"] == "bad_request", r
    # The slots are free and usable after all that.
    st = ctl.status()
    assert st["slots"]["free"] == 2, st
    a = c.call("acquire", {})
    assert out(c, a["slot"], "echo ok") == "ok\n"
    c.close()


def test_fork_through_controller_and_client(controller_factory) -> None:
    ctl = controller_factory(cfg(slots=3))
    c = ctl.client()
    a = c.call("acquire", {"trajectory_id": "root", "template": RECIPE})
    out(c, a["slot"], "echo mid > state.txt")
    f = c.call("fork", {"slot": a["slot"], "trajectory_id": "branch"})
    assert f["agent"] == a["agent"] and f["slot"] != a["slot"]
    assert f["trajectory_id"] == "branch"
    assert out(c, f["slot"], "cat state.txt VERSION") == "mid\nv1\n"
    out(c, a["slot"], "echo root > state.txt")
    assert out(c, f["slot"], "cat state.txt") == "mid\n"
    leases = {x["slot"]: x for x in c.call("leases")["leases"]}
    assert leases[f["slot"]]["trajectory_id"] == "branch"
    # A fork needs a free slot on the same agent.
    f2 = c.call("fork", {"slot": a["slot"]})
    r = c.call_raw("fork", {"slot": a["slot"]})
    assert r["ok"] is False and r["error"]["code"] == "no_capacity", r
    for h in (a["slot"], f["slot"], f2["slot"]):
        c.call("release", {"slot": h})
    r = c.call_raw("fork", {"slot": a["slot"]})
    assert r["ok"] is False and r["error"]["code"] == "not_leased", r

    async def client_side() -> None:
        be = ControllerToolBackend(ctl.addr, template=RECIPE)
        await be.start()
        s = await be.acquire()
        assert s.metadata["template"] == "proj"
        r1 = await be.execute_batch([(s, "bash", {"command": "echo x > mine; cat VERSION"})])
        assert r1[0].success and r1[0].output.strip() == "v1", r1
        s2 = await be.fork(s)
        r2 = await be.execute_batch([(s2, "bash", {"command": "cat mine"})])
        assert r2[0].output.strip() == "x", r2
        await be.release(s2, reset_workspace=True)
        await be.release(s, reset_workspace=True)
        await be.stop()

    asyncio.run(client_side())
    c.close()


def test_eviction_past_the_disk_budget(controller_factory) -> None:
    ctl = controller_factory(cfg(slots=2, extra="    template_disk_budget: 300K\n"))
    c = ctl.client()
    for i in range(4):
        a = c.call("acquire", {"template": {"name": f"t{i}",
                                            "script": "head -c 200000 /dev/urandom > blob"}})
        c.call("release", {"slot": a["slot"]})

    def names() -> list[str]:
        return sorted(t["name"] for t in c.call("templates")["agents"][0]["templates"])

    def evicted() -> int:
        return c.call("templates")["agents"][0]["evicted"]

    import time
    # A template leaves the controller's list when its delete is sent, and
    # counts as evicted when the agent answers: wait for both.
    deadline = time.monotonic() + 10
    while (names() != ["t3"] or evicted() != 3) and time.monotonic() < deadline:
        time.sleep(0.1)
    # 200 KB each against a 300 KB budget: only the newest fits.
    assert names() == ["t3"], names()
    assert c.call("templates")["agents"][0]["evicted"] == 3
    c.close()
