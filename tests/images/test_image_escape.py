"""The isolation escape suite (tests/isolation/test_escape.py, reused as is)
against the real slot-agent:latest image, under Docker's default seccomp
profile and no added capabilities: as root, with --user 1000, with
--read-only --tmpfs /data, and with --cap-drop ALL. The agent serves its real
TCP listener with a token; slot-escape (build/slot-escape, static) is mounted
read-only.

Where a condition takes a rung away, the test asserts what happens instead
of skipping: without the uid and namespaces rungs (--user 1000, --cap-drop
ALL) every slot runs as the same uid in one mount namespace and Landlock
restricts writes only, so a slot CAN read another slot's files; as root
without capabilities RLIMIT_NPROC does not bind, so only the container's
pids limit stops a fork bomb."""
from __future__ import annotations

import importlib.util
import sys
import time
import types
from pathlib import Path
from typing import Any, Iterator

import pytest

from images_lib import (CONTAINERS, ESCAPE, ESCAPE_FLAGS, ESCAPE_RESULTS, IMAGE, ROOT, TOKEN_PATH,
                        docker_out, hello, logs, pids_events_max, published_port, running)

ISO = ROOT / "tests" / "isolation"
AGENT_ARGS = ["--slots", "4", "--log-level", "info", "--slot-memory", "256M", "--slot-pids", "300"]
ESCAPE_IN = "/usr/local/bin/slot-escape"


def _load(name: str, path: Path, conftest: types.ModuleType | None = None) -> types.ModuleType:
    """Import PATH as module NAME; `from conftest import ...` inside it sees
    CONFTEST (this suite's results) instead of whichever conftest pytest
    loaded last."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    saved = sys.modules.get("conftest")
    if conftest is not None:
        sys.modules["conftest"] = conftest
    try:
        spec.loader.exec_module(mod)
    finally:
        if conftest is not None:
            if saved is None:
                sys.modules.pop("conftest", None)
            else:
                sys.modules["conftest"] = saved
    return mod


_iso = _load("slot_isolation_conftest", ISO / "conftest.py")
Cond = _iso.Cond
_shim = types.ModuleType("conftest")
_shim.RESULTS = ESCAPE_RESULTS  # type: ignore[attr-defined]
_shim.Cond = Cond  # type: ignore[attr-defined]
esc = _load("slot_isolation_test_escape", ISO / "test_escape.py", _shim)

# Every escape test of the isolation suite runs here unchanged, except the two
# defined below, which run unchanged where their rungs exist.
_OVERRIDDEN = {"test_write_outside_workspace", "test_read_other_slot", "test_fork_bomb"}
for _name in dir(esc):
    if _name.startswith("test_") and _name not in _OVERRIDDEN:
        globals()[_name] = getattr(esc, _name)


@pytest.fixture(scope="module", params=list(ESCAPE_FLAGS))
def cond(request, images, tokens) -> Iterator[Any]:
    token_file, token, _ = tokens
    name = CONTAINERS.run(
        "slot-img-esc", *ESCAPE_FLAGS[request.param], "-p", "127.0.0.1::7070",
        "-v", f"{token_file}:{TOKEN_PATH}:ro", "-v", f"{ESCAPE}:{ESCAPE_IN}:ro", IMAGE,
        "--listen", "tcp:0.0.0.0:7070", "--insecure", "--token-file", TOKEN_PATH, "--data-dir", "/data",
        *AGENT_ARGS)
    try:
        port = published_port(name)
        client, res = hello(port, token, timeout=30, alive=lambda: running(name))
        cd = Cond(request.param, client, 1, ESCAPE_IN, "/data")
        cd.rungs = res["isolation"]
        cd.detail = res["isolation_detail"]
        cd.container = name
        yield cd
        client.close()
        assert running(name), f"the agent died:\n{logs(name)[-3000:]}"
    finally:
        CONTAINERS.rm(name)


def test_condition_rungs(cond) -> None:
    """What each condition leaves of the ladder (the rest of this file relies
    on it)."""
    r, d = cond.rungs, cond.detail
    assert r["landlock"] and r["seccomp"] and r["rlimits"] and r["containment"], r
    assert not r["namespaces"], "Docker's default seccomp profile refuses unshare"
    assert d["root"] is (cond.name != "docker-user1000"), d
    # slot uids need CAP_SETUID/SETGID/CHOWN: root with Docker's default set
    assert r["uid"] is (cond.name in ("docker-root", "docker-readonly")), r
    out = esc.run(cond, "id -u")["stdout"].strip()
    expect = {"docker-user1000": b"1000", "docker-capdrop": b"0"}.get(cond.name, b"20000")
    assert out == expect


def test_write_outside_workspace(cond) -> None:
    if "--read-only" not in ESCAPE_FLAGS[cond.name]:
        esc.test_write_outside_workspace(cond)
        return
    # The read-only root filesystem refuses first (EROFS comes before
    # Landlock's check); the ladder's own answer shows where the filesystem
    # is writable, in test_write_data_dir_outside_workspace.
    out, r = esc.escape(cond, "write", "/etc/slot-escape-probe")
    assert esc.blocked(out) == "EROFS", out
    ESCAPE_RESULTS[("write outside workspace", cond.name)] = "read-only fs"
    esc.still_fine(cond)


def test_write_data_dir_outside_workspace(cond) -> None:
    """/data is writable by the agent in every condition (for --user 1000 it
    is the agent's uid, which the slots share)."""
    out, r = esc.escape(cond, "write", f"{cond.data}/slot-escape-probe")
    assert esc.blocked(out) == "EACCES", out
    esc.record(cond, "write to /data, outside workspace", esc.applied(r, "landlock", "uid"))
    esc.still_fine(cond)


def test_read_other_slot(cond) -> None:
    if cond.rungs["uid"] or cond.rungs["namespaces"]:
        esc.test_read_other_slot(cond)
        return
    # Neither rung: slots share the agent's uid and mount namespace, and
    # Landlock restricts writes only. The read works; writing there does not.
    esc.run(cond, "echo secret > secret.txt", slot=esc.VICTIM)
    other = esc.workspace(cond, esc.VICTIM)
    out, r = esc.escape(cond, "read", f"{other}/secret.txt")
    assert out == "escaped file read", out
    assert "uid" not in r["isolation"] and "namespaces" not in r["isolation"], r["isolation"]
    ESCAPE_RESULTS[("read other slot's workspace", cond.name)] = "NOT BLOCKED"
    out, r = esc.escape(cond, "write", f"{other}/planted")
    assert esc.blocked(out) == "EACCES" and "landlock" in r["isolation"]
    esc.still_fine(cond)


def test_fork_bomb(cond) -> None:
    if not (cond.detail["root"] and not cond.rungs["uid"]):
        esc.test_fork_bomb(cond)
        return
    # Root without CAP_SETUID: commands run as uid 0, which RLIMIT_NPROC
    # never limits. Show it, then let the container's pids limit stop the bomb.
    r = esc.run(cond, "for i in $(seq 20); do sleep 5 & done; jobs -p | wc -l; kill $(jobs -p)",
                rlimits={"nproc": 8})
    assert "rlimits" in r["isolation"] and r["stdout"].strip() == b"20", r
    cid = docker_out("inspect", "-f", "{{.Id}}", cond.container)
    before = pids_events_max(cid)
    t0 = time.monotonic()
    rid = cond.client.send("exec", {"slot": esc.ATTACKER, "cmd": "b(){ b | b & }; b; sleep 5",
                                    "timeout_ms": 6000, "rlimits": {"nproc": 64}})
    time.sleep(1.0)
    assert cond.client.call("health") is not None  # the agent answers during the bomb
    resp = cond.client.wait(rid, timeout=60)[0]
    assert "result" in resp, resp
    assert b"Resource temporarily unavailable" in resp["result"]["stderr"], resp["result"]
    after = pids_events_max(cid)
    if before is not None and after is not None:
        assert after > before, "the pids cgroup refused no fork: something else stopped the bomb"
    ESCAPE_RESULTS[("fork bomb", cond.name)] = "pids-limit"
    assert time.monotonic() - t0 < 60
    # nothing of it is left: the container holds the agent and this ps
    time.sleep(0.5)
    r = esc.run(cond, "ps -e --no-headers -o comm")
    assert len(r["stdout"].split()) < 10, r["stdout"]
    esc.still_fine(cond)
