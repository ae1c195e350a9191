"""Command lifecycle: bounded output, timeouts, streaming, detach and attach,
cancel and reset, and that no process a command started survives it."""
from __future__ import annotations

import os
import random
import time
from pathlib import Path

from helpers_proc import children, is_zombie, wait_gone, wait_present
from slotwire import Client


def marker() -> str:
    # sleep accepts fractions: a unique duration is a unique argv word.
    return f"1000.{random.randrange(10**8):08d}"


def test_binary_output_round_trip_1mib(client: Client, agent) -> None:
    data = os.urandom(1 << 20)
    ws = client.call("slots", {"slot": 0})["slots"][0]["workspace"]
    with open(os.path.join(ws, "blob"), "wb") as f:
        f.write(data)
    r = client.call("exec", {"slot": 0, "cmd": "cat blob"})
    assert r["stdout"] == data and r["stdout_truncated"] is False
    assert r["stdout_bytes"] == len(data)


def test_flood_bounded_by_max_output_keeps_head_and_tail(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "seq 1 2000000", "max_output": 1000})
    assert r["exit_code"] == 0
    assert r["stdout_truncated"] is True
    assert r["stdout_bytes"] == sum(len(str(i)) + 1 for i in range(1, 2000001))
    out = r["stdout"]
    assert out.startswith(b"1\n2\n3\n")
    assert out.endswith(b"1999999\n2000000\n")
    assert b"bytes dropped ...]" in out
    assert len(out) < 1100


def test_yes_flood_stopped_by_timeout(client: Client) -> None:
    t0 = time.monotonic()
    r = client.call("exec", {"slot": 1, "cmd": "yes", "timeout_ms": 500, "max_output": 4096})
    assert r["timed_out"] is True and r["signal"] == 9
    assert r["stdout_bytes"] > 4096 and r["stdout_truncated"]
    assert len(r["stdout"]) < 4096 + 100
    assert time.monotonic() - t0 < 5


def test_idle_timeout_is_reported_apart(client: Client) -> None:
    r = client.call("exec", {"slot": 0, "cmd": "echo start; sleep 30",
                             "idle_timeout_ms": 300, "timeout_ms": 20000})
    assert r["idle_timed_out"] is True and r["timed_out"] is False
    assert r["stdout"] == b"start\n"
    r = client.call("exec", {"slot": 0, "cmd": "for i in 1 2 3 4 5; do echo $i; sleep 0.1; done",
                             "idle_timeout_ms": 1000})
    assert r["idle_timed_out"] is False and r["exit_code"] == 0


def test_background_children_die_when_command_ends(client: Client) -> None:
    m1, m2, m3 = marker(), marker(), marker()
    cmd = (f"sleep {m1} & setsid sleep {m2} & (sleep {m3} &) ; "
           "sleep 0.1; echo done")
    r = client.call("exec", {"slot": 0, "cmd": cmd})
    assert r["stdout"] == b"done\n"
    for m in (m1, m2, m3):
        assert wait_gone(m) == [], f"sleep {m} survived its command"


def test_double_forked_daemon_dies_on_timeout(client: Client) -> None:
    m = marker()
    cmd = f"setsid bash -c 'trap \"\" TERM HUP; sleep {m}' </dev/null >/dev/null 2>&1 & sleep 60"
    r = client.call("exec", {"slot": 0, "cmd": cmd, "timeout_ms": 400})
    assert r["timed_out"]
    assert wait_gone(m) == []


def test_cancel_by_exec_id_and_by_slot_kills_the_tree(client: Client) -> None:
    m = marker()
    rid = client.send("exec", {"slot": 1, "cmd": f"sleep {m} & sleep {m}; wait",
                               "stream": True})
    started = client.recv_frame()
    assert started is not None and started["event"] == "started"
    assert wait_present(m)
    assert client.call("cancel", {"exec_id": started["exec_id"]})["cancelled"] == 1
    resp = client.wait(rid)[0]["result"]
    assert resp["cancelled"] is True and resp["signal"] == 9
    assert wait_gone(m) == []
    m2 = marker()
    rid = client.send("exec", {"slot": 2, "cmd": f"sleep {m2}"})
    assert wait_present(m2)
    assert client.call("cancel", {"slot": 2})["cancelled"] == 1
    assert client.wait(rid)[0]["result"]["cancelled"]
    assert wait_gone(m2) == []
    assert client.error_code("cancel", {"exec_id": 999999}) == "not_found"
    assert client.error_code("cancel", {}) == "bad_request"
    # cancelling something finished is not an error: nothing to cancel
    assert client.call("cancel", {"exec_id": resp["exec_id"]})["cancelled"] == 0


def test_reset_kills_cancels_queue_empties_workspace_keeps_lease(client: Client) -> None:
    client.call("lease", {"slot": 3, "trajectory_id": "keep"})
    client.call("write_file", {"slot": 3, "path": "d/f", "data": b"x", "mkdirs": True})
    client.call("exec", {"slot": 3, "cmd": "echo t > $TMPDIR/t; chmod 000 d"})
    m = marker()
    running = client.send("exec", {"slot": 3, "cmd": f"setsid sleep {m} & sleep {m}"})
    queued = client.send("exec", {"slot": 3, "cmd": "echo never"})
    assert wait_present(m)
    r = client.call("reset", {"slot": 3})
    assert r["slot"] == 3 and r["killed"] >= 1
    assert client.wait(running)[0]["result"]["cancelled"] is True
    q = client.wait(queued)[0]
    assert q["ok"] is False and q["error"]["code"] == "cancelled"
    assert wait_gone(m) == []
    assert client.call("list", {"slot": 3})["entries"] == []
    assert client.call("exec", {"slot": 3, "cmd": "ls -A $TMPDIR"})["stdout"] == b""
    s = client.call("slots", {"slot": 3})["slots"][0]
    assert s["leased"] and s["trajectory_id"] == "keep" and s["state"] == "idle"
    assert client.call("exec", {"slot": 3, "cmd": "echo usable"})["stdout"] == b"usable\n"


def test_stream_events_are_ordered_and_contiguous(client: Client) -> None:
    resp, events = client.call_stream("exec", {
        "slot": 0, "stream": True,
        "cmd": "for i in $(seq 1 50); do echo line$i; echo e$i >&2; done"})
    assert events[0]["event"] == "started"
    out = [e for e in events if e["event"] == "stdout"]
    err = [e for e in events if e["event"] == "stderr"]
    off = 0
    for e in out:
        assert e["offset"] == off
        off += len(e["data"])
    assert b"".join(e["data"] for e in out) == b"".join(f"line{i}\n".encode()
                                                      for i in range(1, 51))
    assert b"".join(e["data"] for e in err).count(b"\n") == 50
    r = resp["result"]
    assert r["stdout"] == b"" and r["stdout_bytes"] == off  # streamed, not repeated


def test_detach_then_attach_replays_from_offsets(agent) -> None:
    c = agent.client()
    r = c.call("exec", {"slot": 0, "detach": True,
                        "cmd": "for i in 1 2 3 4 5; do echo line$i; sleep 0.1; done"})
    assert r["detached"] is True
    # the slot is free while the detached command runs
    assert c.call("exec", {"slot": 0, "cmd": "echo other"})["stdout"] == b"other\n"
    c2 = agent.client()
    resp, events = c2.call_stream("exec_attach", {"exec_id": r["exec_id"], "offset": 6})
    data = b"".join(e["data"] for e in events if e["event"] == "stdout")
    assert data == b"line2\nline3\nline4\nline5\n"
    assert [e["offset"] for e in events if e["event"] == "stdout"][0] == 6
    assert resp["result"]["exit_code"] == 0
    # finished results can still be attached, from any offset
    resp, events = c2.call_stream("exec_attach", {"exec_id": r["exec_id"]})
    assert b"".join(e["data"] for e in events) == b"".join(f"line{i}\n".encode()
                                                          for i in range(1, 6))
    assert c2.error_code("exec_attach", {"exec_id": 123456}) == "not_found"


def test_command_survives_its_connection(agent) -> None:
    c = agent.client()
    c.send("exec", {"slot": 1, "cmd": "sleep 0.5; echo survived"})
    deadline = time.monotonic() + 5
    c2 = agent.client()
    while not c2.call("slots", {"slot": 1})["slots"][0]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    eid = c2.call("slots", {"slot": 1})["slots"][0]["running"][0]
    c.close()
    resp, events = c2.call_stream("exec_attach", {"exec_id": eid})
    assert b"".join(e["data"] for e in events) == b"survived\n"
    assert resp["result"]["exit_code"] == 0


def test_no_zombies_accumulate(agent) -> None:
    c = agent.client()
    for i in range(30):
        c.call("exec", {"slot": i % 4, "cmd": "(sleep 0.01 &) ; sleep 0.02 & true"})
    deadline = time.monotonic() + 5
    exe = os.readlink(f"/proc/{agent.proc.pid}/exe")

    def is_holder(pid: int) -> bool:
        # The namespace holders of the slots are forks of the agent itself;
        # the warm shells run its builtin.
        try:
            return ((os.readlink(f"/proc/{pid}/exe") == exe
                     or b"__slot_warm serve" in Path(f"/proc/{pid}/cmdline").read_bytes())
                    and not is_zombie(pid))
        except OSError:
            return False

    while True:
        kids = [k for k in children(agent.proc.pid) if not is_holder(k)]
        zombies = [k for k in kids if is_zombie(k)]
        if not kids or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert kids == [] and zombies == []
    holders = [k for k in children(agent.proc.pid) if is_holder(k)]
    # At most one box and one warm shell per slot used, and the guardian of
    # per-slot filesystems.
    fs = c.call("hello")["disk_quota"]["mechanism"] == "fs"
    assert len(holders) <= 8 + fs


def test_sigterm_kills_running_commands_and_exits_zero(agent) -> None:
    c = agent.client()
    m = marker()
    rid = c.send("exec", {"slot": 0, "cmd": f"sleep {m}"})
    assert wait_present(m)
    agent.proc.terminate()
    resp = c.wait(rid)[0]
    assert resp["result"]["cancelled"] is True
    assert agent.proc.wait(10) == 0
    assert wait_gone(m) == []
