"""The `exec` backend without containers: launch templates that run the real
agent directly (--stdio), daemons started by a `start` template and reached
through `slot-agent --attach` (reattached after a controller kill -9),
launchers that fail and say why, and config errors. The same backend driving
docker and apptainer is tested in tests/images."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import AGENT_BIN, AGENTCTL_BIN, CONTROLLER_BIN, Controller
from slotwire import Client

AB = str(AGENT_BIN)


def acquire(c: Client, traj: str = "t", **kw) -> str:
    return c.call("acquire", {"trajectory_id": traj, **kw})["slot"]


def bash(c: Client, slot: str, command: str, **kw) -> dict:
    return c.call("exec", {"slot": slot, "tool": "bash", "args": {"command": command, **kw}})


def cfg(exec_block: dict, **fields) -> str:
    """A one-profile config; JSON is YAML, and keeps the templates exact."""
    prof = {"backend": "exec", "slots_per_agent": 2, "min_agents": 1, "max_agents": 2,
            **fields, "exec": exec_block}
    return json.dumps({"profiles": {"default": prof}})


STDIO = {"launch": [AB, "--stdio", "--slots", "{slots}", "--data-dir", "{data_dir}"]}

# A daemon per agent on a Unix socket in STATE/exec, its pid in a file; the
# stream is a relay (slot-agent --attach) to it.
DAEMON = {
    "start": ["sh", "-c",
              'mkdir -p "$1" || exit 1; setsid "$0" --listen "unix:$1/$2.sock" --slots "$3" '
              '--data-dir "$4" </dev/null >>"$1/$2.log" 2>&1 & echo $! > "$1/$2.pid"',
              AB, "{state_dir}/exec", "{agent_id}", "{slots}", "{data_dir}"],
    "launch": [AB, "--attach", "unix:{state_dir}/exec/{agent_id}.sock"],
    "stop": ["sh", "-c", 'kill $(cat "$0/$1.pid") 2>/dev/null; rm -f "$0/$1.pid" "$0/$1.sock"',
             "{state_dir}/exec", "{agent_id}"],
    "list": ["sh", "-c",
             'cd "$0" 2>/dev/null || exit 0; for f in *.pid; do [ -e "$f" ] || continue; '
             'kill -0 $(cat "$f") 2>/dev/null && echo "${f%.pid}"; done; exit 0',
             "{state_dir}/exec"],
}


def daemon_pids(ctl: Controller) -> dict[str, int]:
    out = {}
    for f in (ctl.state_dir / "exec").glob("*.pid"):
        try:
            out[f.stem] = int(f.read_text().strip())
        except ValueError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def daemons():
    """Kill the daemons the tests start, whatever happens."""
    ctls: list[Controller] = []
    yield ctls
    for ctl in ctls:
        for pid in daemon_pids(ctl).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def agents(ctl: Controller) -> dict:
    c = ctl.client()
    try:
        return c.call("agents")
    finally:
        c.close()


# ---- launch only ----------------------------------------------------------


def test_stdio_launch_serves_trainers_and_stops_with_the_controller(controller_factory):
    ctl = controller_factory(cfg(STDIO, min_agents=2))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"t{i}") for i in range(4)]
    r = c.call("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": f"echo {i} > f; cat f"}}
        for i, s in enumerate(slots)]})["results"]
    assert [x["result"]["stdout"] for x in r] == [f"{i}\n".encode() for i in range(4)]
    ags = agents(ctl)["agents"]
    assert all(a["address"].startswith("exec:" + AB) for a in ags), ags
    pids = [a["pid"] for a in ags]
    c.close()
    assert ctl.stop() == 0
    time.sleep(0.2)
    assert not any(alive(p) for p in pids)


def test_placeholders_env_and_literal_braces(controller_factory, tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    launch = ["sh", "-c",
              'printf "%s\\n" "$@" > "$0/$SLOT_AGENT_ID.args"; '
              'echo "$SLOT_AGENT_TOKEN" > "$0/$SLOT_AGENT_ID.token"; '
              f'exec {AB} --stdio --slots 2 --data-dir "$SLOT_DATA_DIR"',
              str(seen), "{agent_id}", "{profile}", "{controller}", "{slots}", "{image}",
              "{cpu}", "{memory}", "{memory_mb}", "{slot_memory}", "{gpu}", "{isolation}",
              "{{.Names}}", "x{slots}y", "{data_dir}"]
    ctl = controller_factory(cfg({"launch": launch}, min_agents=1, image="img:1", cpu=1.5,
                                 memory="512M", gpu="a100:2"))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    aid = agents(ctl)["agents"][0]["id"]
    args = (seen / f"{aid}.args").read_text().splitlines()
    ctl_id = args[2]
    assert args == [aid, "default", ctl_id, "2", "img:1", "1.5", str(512 << 20), "512",
                    str(256 << 20), "a100:2", "best_effort", "{{.Names}}", "x2y",
                    str(ctl.state_dir / "data" / aid)]
    assert ctl_id.startswith("slot-controller") and "@" not in ctl_id
    token = (ctl.state_dir / "agent-token").read_text().strip()
    assert len(token) == 32 and (seen / f"{aid}.token").read_text().strip() == token
    assert oct((ctl.state_dir / "agent-token").stat().st_mode & 0o777) == "0o600"
    assert token not in " ".join(args) and token not in ctl.log()
    c = ctl.client()
    s = acquire(c)
    assert bash(c, s, "echo ok")["stdout"] == b"ok\n"


def test_a_launcher_that_fails_is_reported_with_its_stderr(controller_factory):
    launch = ["sh", "-c", 'echo "Unable to find image nosuch:latest locally" >&2; '
              'echo "docker: Error response from daemon: pull access denied for nosuch" >&2; '
              "exit 125"]
    ctl = controller_factory(cfg({"launch": launch}), wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 1500})
    assert r["error"]["code"] == "no_capacity"
    assert "pull access denied for nosuch" in r["error"]["message"], r
    failed = c.call("agents")["failed"]
    assert failed and "pull access denied" in failed[-1]["error"]
    assert "status 125" in failed[-1]["error"], failed
    out = subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, "agents"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "recent failures:" in out.stdout and "pull access denied" in out.stdout


def test_a_launcher_that_is_not_there(controller_factory):
    ctl = controller_factory(cfg({"launch": ["/nonexistent/runtime", "run"]}), wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 1500})
    assert r["error"]["code"] == "no_capacity"
    assert "cannot run /nonexistent/runtime" in r["error"]["message"], r


def test_killed_launcher_fails_only_its_requests_and_is_replaced(controller_factory):
    ctl = controller_factory(cfg(STDIO, min_agents=2))
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    c = ctl.client()
    slots = [acquire(c, f"t{i}") for i in range(4)]
    pid = {a["id"]: a["pid"] for a in agents(ctl)["agents"]}
    victim = slots[0].split("/")[0]
    rid = c.send("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 1.5; echo done"}} for s in slots]})
    time.sleep(0.5)
    os.kill(pid[victim], signal.SIGKILL)
    res = c.wait(rid, timeout=20)[0]["result"]["results"]
    for s, r in zip(slots, res):
        if s.startswith(victim + "/"):
            assert r["error"]["code"] == "agent_lost" and victim in r["error"]["message"], r
        else:
            assert r["ok"] and r["result"]["stdout"] == b"done\n", r
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2
                    and victim not in {a["id"] for a in agents(ctl)["agents"]})


# ---- daemons: start, attach, stop, list ------------------------------------


def test_daemons_survive_a_controller_kill9_and_are_reattached(controller_factory, daemons):
    ctl = controller_factory(cfg(DAEMON, min_agents=2))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2)
    before = daemon_pids(ctl)
    assert len(before) == 2 and all(alive(p) for p in before.values())
    c = ctl.client()
    slots = [acquire(c, f"traj-{i}") for i in range(3)]
    for i, s in enumerate(slots):
        bash(c, s, f"echo {i} > state.txt")
    c.send("exec", {"slot": slots[0], "args": {"command": "sleep 2; echo bg > late.txt"}})
    time.sleep(0.3)
    ctl.kill9()
    c.close()
    assert all(alive(p) for p in before.values())
    ctl.expect_clean_exit = True
    ctl.start()
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 3)
    assert daemon_pids(ctl) == before
    ags = agents(ctl)["agents"]
    assert all(a["reattached"] for a in ags) and {a["id"] for a in ags} == set(before)
    c = ctl.client()
    leases = {x["slot"]: x["trajectory_id"] for x in c.call("leases")["leases"]}
    assert leases == {s: f"traj-{i}" for i, s in enumerate(slots)}
    for i, s in enumerate(slots):
        assert bash(c, s, "cat state.txt")["stdout"] == f"{i}\n".encode()
    time.sleep(2)
    assert bash(c, slots[0], "cat late.txt")["stdout"] == b"bg\n"
    c.close()
    # a clean stop leaves daemons running too (they are persistent)
    assert ctl.stop() == 0
    assert all(alive(p) for p in before.values())


def test_idle_daemon_is_stopped_through_the_stop_template(controller_factory, daemons):
    ctl = controller_factory(cfg(DAEMON, min_agents=0, idle_timeout="1s"), wait_ready=False)
    daemons.append(ctl)
    c = ctl.client()
    s = acquire(c, timeout_ms=20000)
    pid = daemon_pids(ctl)[s.split("/")[0]]
    assert alive(pid)
    c.call("release", {"slot": s})
    ctl.wait_agents(lambda st: st["agents"]["total"] == 0, timeout=30)
    # The stop template kills the daemon, then removes its files: the daemon
    # can be gone a moment before its pid file is, so wait for both.
    deadline = time.monotonic() + 10
    while (alive(pid) or daemon_pids(ctl)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid)
    assert daemon_pids(ctl) == {}


def test_killed_relay_reconnects_and_the_command_completes_once(controller_factory, daemons):
    ctl = controller_factory(cfg(DAEMON, min_agents=1, max_agents=1))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)["agents"][0]
    c = ctl.client()
    s = acquire(c)
    rid = c.send("exec", {"slot": s, "args": {
        "command": "echo run >> runs; sleep 1.5; seq 1 20000"}})
    time.sleep(0.3)
    os.kill(a["pid"], signal.SIGKILL)  # the relay, not the daemon
    resp, _ = c.wait(rid, timeout=20)
    assert resp.get("ok"), resp
    assert resp["result"]["stdout"] == "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert bash(c, s, "cat runs")["stdout"] == b"run\n"
    b = agents(ctl)["agents"][0]
    assert b["id"] == a["id"] and b["state"] == "ready" and b["reconnects"] == 1, b
    assert b["pid"] != a["pid"] and "killed by signal 9" in b["link_cause"], b
    out = subprocess.run([str(AGENTCTL_BIN), "--controller", ctl.addr, "agents"],
                         capture_output=True, text=True, timeout=10).stdout
    assert "RECONNECTS" in out and "last stream ended" in out, out


def test_killed_daemon_is_lost_and_replaced(controller_factory, daemons):
    ctl = controller_factory(cfg(DAEMON, min_agents=1, max_agents=1))
    daemons.append(ctl)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1)
    a = agents(ctl)["agents"][0]
    dpid = daemon_pids(ctl)[a["id"]]
    c = ctl.client()
    s = acquire(c)
    rid = c.send("exec", {"slot": s, "args": {"command": "sleep 5"}})
    time.sleep(0.3)
    t0 = time.monotonic()
    os.kill(dpid, signal.SIGKILL)  # the agent itself
    resp, _ = c.wait(rid, timeout=20)
    assert resp["error"]["code"] == "agent_lost", resp
    assert "the agent is gone" in resp["error"]["message"], resp
    assert time.monotonic() - t0 < 10
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1
                    and a["id"] not in {x["id"] for x in agents(ctl)["agents"]})


def test_a_start_that_fails_is_reported(controller_factory):
    ex = {"start": ["sh", "-c", "echo 'no space left on device' >&2; exit 1"],
          "stop": ["true"], "launch": ["true"]}
    ctl = controller_factory(cfg(ex), wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 1500})
    assert r["error"]["code"] == "no_capacity"
    assert "start command exited with status 1: no space left on device" in r["error"]["message"]


def test_a_hung_start_is_killed_after_command_timeout(controller_factory):
    ex = {"start": ["sleep", "60"], "stop": ["true"], "launch": ["true"],
          "command_timeout": "500ms"}
    ctl = controller_factory(cfg(ex), wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 3000})
    assert r["error"]["code"] == "no_capacity"
    assert "start command killed by signal 9" in r["error"]["message"], r


# ---- configuration ----------------------------------------------------------


def check(tmp_path: Path, text: str, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return subprocess.run([str(CONTROLLER_BIN), "--config", str(f), "--check"],
                          capture_output=True, text=True, timeout=30,
                          env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("block,extra,needle", [
    ({}, {}, "needs exec.launch"),
    ({"launch": ["x"], "start": ["y"]}, {}, "exec.start needs exec.stop"),
    ({"launch": ["x", "{agentid}"]}, {}, "unknown placeholder {agentid}"),
    ({"launch": ["docker", "run", "{image}"]}, {}, "uses {image} but the profile has no image"),
    ({"launch": "a 'b"}, {}, "unterminated ' quote"),
    ({"launch": ["x"], "nope": 1}, {}, "unknown key 'exec.nope'"),
    ({"launch": [["x"]]}, {}, "items must be strings"),
])
def test_bad_exec_configs(tmp_path, block, extra, needle):
    r = check(tmp_path, cfg(block, **extra))
    assert r.returncode != 0 and needle in r.stderr, r.stderr


def test_argv_from_a_string_splits_words_without_a_shell(controller_factory):
    ctl = controller_factory(
        cfg({"launch": ["placeholder"]}, min_agents=0),
        env={"SLOT_PROFILE_DEFAULT_EXEC_LAUNCH":
             f"{AB} --stdio --data-dir '{{data_dir}}' \"--slots\" 2 a\\ b $HOME"},
        wait_ready=False)
    c = ctl.client()
    prof = c.call("profiles")["profiles"][0]
    assert prof["exec"]["launch"] == [AB, "--stdio", "--data-dir", "{data_dir}", "--slots", "2",
                                      "a b", "$HOME"]
