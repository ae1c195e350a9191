"""The nomad backend against Nomad agents set up the way operators run them:
ACLs and HTTPS on (the connection settings of the Nomad CLI, from the
profile and from NOMAD_* variables; a refused token and bad TLS settings
give clear errors, never a hang), and a Nomad agent with persistent state
restarted under a running trainer (the agents keep serving while Nomad is
away, and nothing is lost or replaced)."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from test_nomad import (AGENT_BIN, AGENTCTL, HERE, ROOT, Controller, Nomad, agents,
                        no_capacity, start_nomad, stop_nomad)

RAW_JOB = str(ROOT / "nomad" / "slot-agent-raw.nomad.hcl")


@pytest.fixture(scope="module")
def secure_nomad() -> Iterator[Nomad]:
    n, d, env = start_nomad(NOMAD_DEV_ACL="1", NOMAD_DEV_TLS="1", NOMAD_DEV_DRIVERS="raw_exec")
    assert n.addr.startswith("https://localhost:") and n.token and n.cacert
    try:
        yield n
    finally:
        stop_nomad(d, env)


@pytest.fixture(scope="module")
def persistent_nomad() -> Iterator[Nomad]:
    n, d, env = start_nomad(NOMAD_DEV_PERSIST="1", NOMAD_DEV_DRIVERS="raw_exec")
    n.env = env  # type: ignore[attr-defined]
    try:
        yield n
    finally:
        stop_nomad(d, env)


@pytest.fixture
def made() -> Iterator[tuple[Path, list]]:
    tmp = Path(tempfile.mkdtemp(prefix="so-", dir="/tmp"))
    lst: list = []
    yield tmp, lst
    for c in lst:
        if c.proc and c.proc.poll() is None:
            c.stop()
        log = c.log()
        assert "Sanitizer" not in log and "runtime error:" not in log, log[-3000:]
    for n in {id(c.nomad): c.nomad for c in lst}.values():
        n.purge_all()
    subprocess.run(["rm", "-rf", str(tmp)], timeout=60)


def controller(made, nomad: Nomad, block: dict[str, Any], env: dict[str, str] | None = None,
               wait: bool = True, **fields: Any) -> Any:
    tmp, lst = made
    prof: dict[str, Any] = {"backend": "nomad", "slots_per_agent": 2, "min_agents": 1,
                            "max_agents": 2, "start_timeout": "60s", **fields}
    prof["nomad"] = {"job": RAW_JOB, "vars": {"agent_bin": str(AGENT_BIN)}, **block}
    d = tmp / f"c{len(lst)}"
    d.mkdir()
    c = Controller(d, json.dumps({"profiles": {"p": prof}}), wait_ready=False, env=env)
    c.nomad = nomad
    lst.append(c)
    if wait:
        c.wait_agents(lambda st: st["agents"]["ready"] >= prof["min_agents"], timeout=90)
    return c


def bash(cl, h: str, cmd: str) -> dict:
    return cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": cmd}})


# ---- ACLs and TLS --------------------------------------------------------------


def test_token_and_tls_from_the_nomad_cli_variables(made, secure_nomad) -> None:
    n = secure_nomad
    c = controller(made, n, {}, env={"NOMAD_ADDR": n.addr, "NOMAD_CACERT": n.cacert,
                                     "NOMAD_TOKEN": n.token})
    cl = c.client()
    h = cl.call("acquire", {"trajectory_id": "t"})["slot"]
    assert bash(cl, h, "echo over-https")["stdout"] == b"over-https\n"
    assert len(n.jobs()) == 1
    # the ACL token is never shown: not in the log, the API or agentctl
    out = subprocess.run([str(AGENTCTL), "--controller", c.addr, "--json", "profiles"],
                         capture_output=True, text=True, timeout=30).stdout
    out += subprocess.run([str(AGENTCTL), "--controller", c.addr, "agents"],
                          capture_output=True, text=True, timeout=30).stdout
    assert n.token not in out and n.token not in c.log()
    cl.close()


def test_settings_in_the_profile_win_over_the_environment(made, secure_nomad) -> None:
    n = secure_nomad
    c = controller(made, n, {"addr": n.addr, "cacert": n.cacert, "token": n.token},
                   env={"NOMAD_ADDR": "http://127.0.0.1:1", "NOMAD_TOKEN": "wrong"})
    assert agents(c)[0]["state"] == "ready"


@pytest.mark.parametrize("token,needle", [
    (None, "Permission denied"),
    ("00000000-0000-0000-0000-000000000000", "ACL token not found"),
])
def test_refused_acl_token_is_a_clear_error(made, secure_nomad, token, needle) -> None:
    n = secure_nomad
    block = {"addr": n.addr, "cacert": n.cacert}
    if token:
        block["token"] = token
    c = controller(made, n, block, wait=False)
    t0 = time.monotonic()
    msg = no_capacity(c, 5000)
    assert time.monotonic() - t0 < 30
    assert "Nomad refused the ACL token" in msg and needle in msg, msg
    out = subprocess.run([str(AGENTCTL), "--controller", c.addr, "agents"], capture_output=True,
                         text=True, timeout=30).stdout
    assert "Nomad refused the ACL token" in out, out
    assert not n.jobs()


def test_tls_errors_are_clear_and_the_server_name_setting_fixes_one(made, secure_nomad) -> None:
    n = secure_nomad
    port = n.addr.rsplit(":", 1)[1]
    # no CA: the test CA is unknown to the system store
    c = controller(made, n, {"addr": n.addr, "token": n.token}, wait=False)
    msg = no_capacity(c, 5000)
    assert "Nomad unreachable" in msg and "certificate" in msg.lower(), msg
    c.stop()
    # the certificate names localhost and server.global.nomad, not 127.0.0.1
    ip = f"https://127.0.0.1:{port}"
    c = controller(made, n, {"addr": ip, "token": n.token, "cacert": n.cacert}, wait=False)
    msg = no_capacity(c, 5000)
    assert "Nomad unreachable" in msg and "127.0.0.1" in msg.lower(), msg
    c.stop()
    c = controller(made, n, {"addr": ip, "token": n.token, "cacert": n.cacert,
                             "tls_server_name": "server.global.nomad"})
    assert agents(c)[0]["state"] == "ready"
    c.stop()
    # plain HTTP to an HTTPS listener
    c = controller(made, n, {"addr": f"http://localhost:{port}", "token": n.token}, wait=False)
    msg = no_capacity(c, 5000)
    assert "Nomad" in msg and ("HTTP 400" in msg or "unreachable" in msg), msg
    c.stop()
    # skip_verify, as NOMAD_SKIP_VERIFY=1 does for the CLI
    c = controller(made, n, {"token": n.token},
                   env={"NOMAD_ADDR": ip, "NOMAD_SKIP_VERIFY": "1"})
    assert agents(c)[0]["state"] == "ready"


# ---- Nomad restarted under a running trainer ------------------------------------


def test_nomad_agent_restarted_mid_run(made, persistent_nomad) -> None:
    n = persistent_nomad
    c = controller(made, n, {"addr": n.addr}, min_agents=2, max_agents=3)
    cl = c.client()
    hs = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    for i, h in enumerate(hs):
        bash(cl, h, f"echo {i} > state")
    jobs = {j["ID"] for j in n.jobs()}
    ids = {a["id"] for a in agents(c)}
    # a batch that runs across the restart
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash", "args": {"command": "sleep 8; cat state"}} for h in hs]})
    done: dict[str, Any] = {}

    def restart() -> None:
        done["r"] = subprocess.run([str(HERE / "nomad-dev.sh"), "restart", str(n.dir)],
                                   capture_output=True, text=True, timeout=300,
                                   env=dict(n.env, NOMAD_DEV_STOP_TIMEOUT="20"))  # type: ignore[attr-defined]

    th = threading.Thread(target=restart)
    th.start()
    # while Nomad is away the agents still serve: they are reached directly
    down_seen = False
    deadline = time.monotonic() + 60
    while th.is_alive() and time.monotonic() < deadline:
        if not _up(n):
            down_seen = True
            r = cl.call("exec", {"slot": hs[1], "tool": "bash", "args": {"command": "cat state"}})
            assert r["stdout"] == b"1\n"
        time.sleep(0.2)
    th.join(240)
    r = done["r"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert down_seen
    res = cl.wait(rid, timeout=120)[0]["result"]["results"]
    assert [x["result"]["stdout"] for x in res] == [f"{i}\n".encode() for i in range(4)], res
    # same jobs, same agents, nothing lost or replaced
    assert {j["ID"] for j in n.jobs()} == jobs
    st = c.status()
    assert st["agents"]["ready"] == 2 and {a["id"] for a in agents(c)} == ids, st
    assert "agent_lost" not in c.log() and "stopping agent" not in c.log()
    # and the controller uses Nomad again: scaling up registers a new job
    h5 = cl.call("acquire", {"trajectory_id": "t5", "timeout_ms": 90000})["slot"]
    h6 = cl.call("acquire", {"trajectory_id": "t6", "timeout_ms": 90000})["slot"]
    assert len({j["ID"] for j in n.jobs()} - jobs) == 1
    assert bash(cl, h6, "echo new")["stdout"] == b"new\n" and h5
    cl.close()


def _up(n: Nomad) -> bool:
    try:
        return n.status("/v1/status/leader") == 200
    except OSError:
        return False
