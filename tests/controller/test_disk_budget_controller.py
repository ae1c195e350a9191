"""Per-slot disk and inode budgets through the controller (issue 21): the
profile fields slot_disk and slot_inodes (parsing, `profiles`, the exec
backend's placeholders), a local profile's agents started with
--slot-disk/--slot-inodes (their hello and slots report the budgets, and
unset fields pass nothing), a command that writes past its slot's budget
failing at about the budget while another slot writes freely (whichever
mechanism the agent has: a filesystem per slot or the watcher), a command
stopped by the watcher (`--disk-mode watch` in local.args) answered with
disk_quota and a reason, and the Python client's texts for it, agentctl
slots, and reset giving the space back."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import AGENTCTL_BIN, CONTROLLER_BIN, ROOT, Controller
from slotwire import Client

sys.path.insert(0, str(ROOT / "controller" / "python"))
from slot_client import ControllerToolBackend  # noqa: E402
from slot_client import conventions as cv  # noqa: E402

MIB = 1 << 20
DISK = 64 * MIB
INODES = 5000

# Socket mode: the agents are daemons on STATE/agents/ID.sock, which the
# test can talk to directly (hello, slots) beside the controller.
CFG = ("profiles:\n  default:\n    slots_per_agent: 2\n    min_agents: 1\n    max_agents: 1\n"
       "    slot_disk: 64M\n    slot_inodes: {inodes}\n    local:\n      mode: socket\n"
       "      args: [{args}]\n")


def bash(c: Client, slot: str, command: str, timeout_ms: int = 60000) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "timeout_ms": timeout_ms,
                           "args": {"command": command}}, timeout=timeout_ms / 1000 + 30)


def run_check(tmp: Path, yaml: str, *args: str) -> subprocess.CompletedProcess:
    f = tmp / "c.yaml"
    f.write_text(yaml)
    return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check", *args],
                          capture_output=True, text=True, timeout=10)


def agentctl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLOT_AGENT", "SLOT_CONTROLLER", "SLOT_TOKEN_FILE")}
    return subprocess.run([str(AGENTCTL_BIN), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def the_agent(ctl: Controller) -> dict:
    c = ctl.client()
    try:
        ags = [a for a in c.call("agents")["agents"] if a["state"] == "ready"]
    finally:
        c.close()
    assert len(ags) == 1, ags
    return ags[0]


def agent_client(ag: dict) -> Client:
    assert ag["address"].startswith("unix:"), ag
    return Client.unix(ag["address"][len("unix:"):], 30)


def index(handle: str) -> int:
    return int(handle.split("/")[-2])


def slot_disk(a: Client, i: int) -> dict:
    return next(s for s in a.call("slots")["slots"] if s["slot"] == i)["disk"]


def wait_for(pred, what, timeout: float = 15.0):
    """what: a text, or a function whose text is shown when it times out."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        assert time.monotonic() < deadline, \
            f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.1)


# ---- configuration (no agent needed) ------------------------------------------


def test_profile_fields_parse_and_show_in_profiles(controller_factory, tmp_path) -> None:
    ctl = controller_factory("profiles:\n  default:\n    min_agents: 0\n    max_agents: 1\n"
                             "    slot_disk: 1.5G\n    slot_inodes: 500K\n  plain:\n"
                             "    min_agents: 0\n    max_agents: 1\n")
    c = ctl.client()
    profs = {p["name"]: p for p in c.call("profiles")["profiles"]}
    c.close()
    assert profs["default"]["slot_disk"] == 3 * 512 * MIB
    assert profs["default"]["slot_inodes"] == 500_000
    assert profs["plain"]["slot_disk"] == 0 and profs["plain"]["slot_inodes"] == 0
    # From the environment and flags too, like every profile field.
    r = run_check(tmp_path, "profiles:\n  default: {}\n", "--slot-disk", "2G",
                  "--set", "default.slot_inodes=2M")
    assert r.returncode == 0, r.stderr
    for yaml, needle in [
        ("profiles:\n  default:\n    slot_disk: lots\n", "expected a size"),
        ("profiles:\n  default:\n    slot_inodes: 5G\n", "expected a count"),
        ("profiles:\n  default:\n    slot_inodes: -3\n", "expected a count"),
    ]:
        r = run_check(tmp_path, yaml)
        assert r.returncode == 2 and needle in r.stderr, (yaml, r.stderr)


def test_exec_placeholders_need_the_fields(tmp_path) -> None:
    launch = "    exec:\n      launch: [slot-agent, --stdio, --slot-disk, '{slot_disk}', " \
             "--slot-inodes, '{slot_inodes}']\n"
    base = "profiles:\n  default:\n    backend: exec\n"
    # Unset would expand to 0, which the agent reads as no budget at all.
    r = run_check(tmp_path, base + launch)
    assert r.returncode == 2 and "uses {slot_disk}" in r.stderr, r.stderr
    r = run_check(tmp_path, base + "    slot_disk: 1G\n" + launch)
    assert r.returncode == 2 and "uses {slot_inodes}" in r.stderr, r.stderr
    r = run_check(tmp_path, base + "    slot_disk: 1G\n    slot_inodes: 7K\n" + launch)
    assert r.returncode == 0, r.stderr


def test_python_texts_for_a_disk_quota_stop() -> None:
    res = {"exit_code": 137, "signal": 9, "cancelled": True, "disk_quota": True,
           "reason": "slot 1 is over its disk budget", "stdout": b"partial\n", "stderr": b""}
    ok, out, err, meta = cv.command(res, {"tool": "bash"}, cv.Conventions.trainer())
    # The trainer's texts: its own "Exit code: N"; why is in the metadata.
    assert (ok, out, err) == (False, "partial", "Exit code: 137")
    assert meta["exit_code"] == 137 and meta["disk_quota"] is True
    assert meta["reason"] == "slot 1 is over its disk budget"
    ok, out, err, meta = cv.command(res, {"tool": "bash"}, cv.Conventions.slot())
    assert not ok and err == "disk quota exceeded: slot 1 is over its disk budget"
    assert meta["disk_quota"] is True and meta["cancelled"] is True
    # Without disk_quota nothing changes.
    plain = dict(res, disk_quota=False)
    del plain["reason"]
    assert cv.command(plain, {"tool": "bash"}, cv.Conventions.trainer())[2] == "Exit code: 137"
    ok, _, err, meta = cv.command(plain, {"tool": "bash"}, cv.Conventions.slot())
    assert err == "cancelled" and "disk_quota" not in meta


# ---- with agents -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "watch"])
def test_budgets_reach_the_agent_and_stop_a_big_write(controller_factory, mode: str) -> None:
    ctl = controller_factory(CFG.format(inodes=INODES, args=f"--disk-mode, {mode}"))
    ag = the_agent(ctl)
    argv = Path(f"/proc/{ag['pid']}/cmdline").read_bytes().split(b"\0")
    i = argv.index(b"--slot-disk")
    assert argv[i + 1] == str(DISK).encode(), argv
    i = argv.index(b"--slot-inodes")
    assert argv[i + 1] == str(INODES).encode(), argv

    a = agent_client(ag)
    q = a.call("hello")["disk_quota"]
    assert q["slot_disk"] == DISK and q["slot_inodes"] == INODES, q
    assert q["mechanism"] != "none" and (mode == "auto" or q["mechanism"] == mode), q
    slots = a.call("slots")["slots"]
    for s in slots:
        assert s["disk"]["budget"] == DISK and s["disk"]["inodes_budget"] == INODES, s
    workspace = {s["slot"]: s["workspace"] for s in slots}

    c = ctl.client()
    big = c.call("acquire", {"trajectory_id": "big"})["slot"]
    small = c.call("acquire", {"trajectory_id": "small"})["slot"]
    r = bash(c, big, "head -c 100M /dev/zero > f")
    assert r["exit_code"] != 0 or r.get("signal"), r
    # Read from here: the slot is at its budget, and a command of its own
    # might be stopped for that. About the budget: a filesystem per slot
    # rounds to its blocks.
    size = (Path(workspace[index(big)]) / "f").stat().st_size
    assert 16 * MIB <= size <= DISK * 1.05, size
    # The other slot is not charged for it.
    r = bash(c, small, "head -c 10M /dev/zero > g && stat -c %s g")
    assert r["exit_code"] == 0 and int(r["stdout"]) == 10 * MIB, r

    # The agent's own view, and agentctl's.
    wait_for(lambda: slot_disk(a, index(big))["used"] >= 16 * MIB,
             lambda: f"the big slot's use: {slot_disk(a, index(big))}")
    t = agentctl("--agent", ag["address"], "slots")
    assert t.returncode == 0, t.stderr
    lines = t.stdout.splitlines()
    assert lines[0].split()[-2:] == ["DISK", "FILES"], lines
    row = next(ln.split() for ln in lines[1:] if ln.split()[0] == str(index(big)))
    assert row[-2].split("/")[1].rstrip("!") == "64.0M", row
    assert row[-1].split("/")[1].rstrip("!") == str(INODES), row

    # A reset gives the space back.
    c.call("release", {"slot": big, "reset": True})
    wait_for(lambda: slot_disk(a, index(big))["used"] < MIB,
             lambda: f"the reset slot's use to drop: {slot_disk(a, index(big))}")
    c.close()
    a.close()


def test_watcher_stop_answers_disk_quota_through_the_client(controller_factory) -> None:
    ctl = controller_factory(CFG.format(inodes=2000, args="--disk-mode, watch"))
    ag = the_agent(ctl)
    a = agent_client(ag)
    assert a.call("hello")["disk_quota"]["mechanism"] == "watch"
    a.close()
    # Many small files: under the byte budget, far over the inode budget;
    # the watcher stops it long before the loop would end on its own.
    forever = "for i in $(seq 200000); do : > f$i || exit 1; done"

    async def run() -> None:
        be = ControllerToolBackend(ctl.addr)
        await be.start()
        s = await be.acquire()
        slot_be = ControllerToolBackend(ctl.addr, conventions="slot")
        await slot_be.start()
        s2 = await slot_be.acquire()
        r = (await be.execute_batch([(s, "bash", {"command": forever})], timeout_s=60))[0]
        assert not r.success, r
        assert r.error.startswith("Exit code: "), r
        assert r.metadata["disk_quota"] is True and r.metadata["reason"], r.metadata
        r2 = (await slot_be.execute_batch([(s2, "bash", {"command": forever})],
                                          timeout_s=60))[0]
        assert not r2.success and r2.error.startswith("disk quota exceeded: "), r2
        assert r2.metadata["disk_quota"] is True, r2.metadata
        a = agent_client(ag)
        stops = [s["disk"]["stops"] for s in a.call("slots")["slots"]]
        a.close()
        assert all(n >= 1 for n in stops), stops
        # After a reset the slot runs commands again.
        await be.release(s, reset_workspace=True)
        s3 = await be.acquire()
        r3 = (await be.execute_batch([(s3, "bash", {"command": "echo ok"})]))[0]
        assert r3.success and r3.output == "ok", r3
        await be.release(s3, reset_workspace=True)
        await slot_be.release(s2, reset_workspace=True)
        await be.stop()
        await slot_be.stop()

    asyncio.run(run())


@pytest.mark.parametrize("fields", ["", "    slot_disk: 0\n    slot_inodes: 0\n"])
def test_unset_fields_pass_nothing(controller_factory, fields: str) -> None:
    ctl = controller_factory("profiles:\n  default:\n    slots_per_agent: 1\n"
                             "    min_agents: 1\n    max_agents: 1\n" + fields)
    ag = the_agent(ctl)
    argv = Path(f"/proc/{ag['pid']}/cmdline").read_bytes().split(b"\0")
    assert b"--slot-disk" not in argv and b"--slot-inodes" not in argv, argv
