"""Real escape attempts from slot 0, under each condition of conftest.py.
Every attempt must be blocked, the agent must survive it and the other slots
must keep working; the rung that blocked it goes into the closing table."""
from __future__ import annotations

import socket
import threading
import time

from conftest import RESULTS, Cond

ATTACKER, VICTIM, BYSTANDER = 0, 1, 2


def run(cd: Cond, cmd, slot: int = ATTACKER, **kw) -> dict:
    args = {"slot": slot, **kw}
    args["argv" if isinstance(cmd, list) else "cmd"] = cmd
    return cd.client.call("exec", args, timeout=90)


def escape(cd: Cond, *argv: str, **kw) -> tuple[str, dict]:
    r = run(cd, [cd.escape, *argv], **kw)
    out = r["stdout"].decode(errors="replace").strip()
    assert r["exit_code"] in (0, 1), r
    return out, r


def record(cd: Cond, attempt: str, rung: str) -> None:
    assert rung, f"{attempt}: blocked, but by no rung this agent reports"
    RESULTS[(attempt, cd.name)] = rung


def applied(r: dict, *candidates: str) -> str:
    """The first rung of candidates (in ladder order) this command had."""
    for c in candidates:
        if c in r["isolation"]:
            return c
    return ""


def still_fine(cd: Cond) -> None:
    h = cd.client.call("health")
    assert h is not None
    r = run(cd, "echo ok", slot=BYSTANDER)
    assert r["exit_code"] == 0 and r["stdout"] == b"ok\n", r


def workspace(cd: Cond, slot: int) -> str:
    return f"{cd.data}/slots/{slot}/work"


def blocked(out: str) -> str:
    assert out.startswith("blocked "), out
    return out.split()[1]


def test_write_outside_workspace(cond: Cond) -> None:
    out, r = escape(cond, "write", "/etc/slot-escape-probe")
    err = blocked(out)
    record(cond, "write outside workspace", applied(r, "landlock", "uid") if err == "EACCES"
           else applied(r, "namespaces"))
    still_fine(cond)


def test_read_other_slot(cond: Cond) -> None:
    run(cond, "echo secret > secret.txt", slot=VICTIM)
    out, r = escape(cond, "read", f"{workspace(cond, VICTIM)}/secret.txt")
    err = blocked(out)
    record(cond, "read other slot's workspace",
           "namespaces" if err == "ENOENT" else applied(r, "uid"))
    still_fine(cond)


def test_symlink_into_other_slot(cond: Cond) -> None:
    run(cond, "rm -f other; ln -s " + workspace(cond, VICTIM) + " other")
    out, r = escape(cond, "write", "other/planted")
    err = blocked(out)
    record(cond, "symlink into other slot",
           "namespaces" if err == "ENOENT" else applied(r, "uid", "landlock"))
    ls = run(cond, "ls", slot=VICTIM)
    assert b"planted" not in ls["stdout"]
    still_fine(cond)


def test_signal_other_slot_and_agent(cond: Cond) -> None:
    d = cond.client.call("exec", {"slot": VICTIM, "cmd": "sleep 60", "detach": True})
    try:
        for who, pid in (("other slot", d["pid"]), ("agent", cond.agent_pid)):
            out, r = escape(cond, "kill", str(pid))
            err = blocked(out)
            rung = "namespaces" if err == "ESRCH" else applied(r, "uid", "landlock")
            record(cond, f"signal {who}", rung)
        assert cond.client.call("health") is not None
        # the victim is still running
        sl = cond.client.call("slots", {"slot": VICTIM})["slots"][0]
        assert sl["running"] == [d["exec_id"]], sl
    finally:
        cond.client.call("cancel", {"exec_id": d["exec_id"]})
    still_fine(cond)


def test_ptrace_sibling(cond: Cond) -> None:
    out, r = escape(cond, "ptrace")
    blocked(out)
    record(cond, "ptrace sibling", applied(r, "seccomp"))
    still_fine(cond)


def test_mount_tmpfs(cond: Cond) -> None:
    out, r = escape(cond, "mount")
    blocked(out)
    record(cond, "mount tmpfs", applied(r, "seccomp"))
    still_fine(cond)


def test_unshare_user_and_net(cond: Cond) -> None:
    for what in ("user", "net"):
        out, r = escape(cond, f"unshare-{what}")
        blocked(out)
        record(cond, f"unshare -{what[0].upper()}", applied(r, "seccomp"))
    still_fine(cond)


def test_bpf_keyctl_perf(cond: Cond) -> None:
    for what in ("bpf", "keyctl", "perf"):
        out, r = escape(cond, what)
        blocked(out)
        record(cond, {"perf": "perf_event_open"}.get(what, what), applied(r, "seccomp"))
    still_fine(cond)


def _listener() -> tuple[socket.socket, int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    s.settimeout(30)

    def accept() -> None:
        try:
            while True:
                c, _ = s.accept()
                c.close()
        except OSError:
            pass
    threading.Thread(target=accept, daemon=True).start()
    return s, s.getsockname()[1]


def test_sockets_without_network(cond: Cond) -> None:
    lst, port = _listener()
    try:
        for kind in ("raw", "tcp", "udp"):
            out, r = escape(cond, "socket", kind, str(port), network=False)
            err = blocked(out)
            record(cond, f"{kind} socket, network=false",
                   applied(r, "seccomp") if err == "EPERM" else applied(r, "landlock"))
        # allowed with network=true: a UDP socket anywhere, a TCP connection to
        # a listener where the agent shares our network
        out, _ = escape(cond, "socket", "udp", network=True)
        assert out.startswith("escaped"), out
        if not cond.name.startswith("docker"):  # containers have their own network
            out, _ = escape(cond, "socket", "tcp", str(port), network=True)
            assert out == "escaped connected", out
    finally:
        lst.close()
    still_fine(cond)


def test_fork_bomb(cond: Cond) -> None:
    t0 = time.monotonic()
    rid = cond.client.send("exec", {"slot": ATTACKER, "cmd": "b(){ b | b & }; b; sleep 5",
                                    "timeout_ms": 6000, "rlimits": {"nproc": 64}})
    time.sleep(1.0)
    still_fine(cond)  # during the bomb
    resp = cond.client.wait(rid, timeout=60)[0]
    assert "result" in resp, resp
    # the shell's forks were refused: the process limit, not luck, stopped it
    assert b"Resource temporarily unavailable" in resp["result"]["stderr"], resp["result"]
    record(cond, "fork bomb", applied(resp["result"], "rlimits"))
    assert time.monotonic() - t0 < 60
    # nothing of it is left
    r = run(cond, "ps -e -o comm 2>/dev/null | wc -l || echo 0", slot=ATTACKER)
    assert r["exit_code"] == 0
    still_fine(cond)


def test_memory_ten_times_the_limit(cond: Cond) -> None:
    limit = 256 << 20
    out, r = escape(cond, "alloc", str(10 * limit), rlimits={"as": limit})
    blocked(out)
    record(cond, "10x memory limit", applied(r, "rlimits"))
    still_fine(cond)


def test_disk_fill_beyond_fsize(cond: Cond) -> None:
    out, r = escape(cond, "fill", "big", str(10 << 20), rlimits={"fsize": 1 << 20})
    assert blocked(out) == "EFBIG"
    record(cond, "fill disk beyond fsize", applied(r, "rlimits"))
    run(cond, "rm -f big")
    still_fine(cond)


def test_process_ignoring_sigterm(cond: Cond) -> None:
    r = run(cond, "trap '' TERM; while :; do sleep 1; done", timeout_ms=1000)
    assert r["timed_out"] is True
    record(cond, "ignores SIGTERM", "containment")
    still_fine(cond)


def test_double_forked_daemon(cond: Cond) -> None:
    mark = f"4{int(time.time() * 1000) % 100000:05d}"
    r = run(cond, f"(setsid sleep {mark} &) ; echo started")
    assert r["exit_code"] == 0
    time.sleep(0.5)
    ps = run(cond, "ps -e -o args 2>/dev/null || ps", slot=ATTACKER)
    assert f"sleep {mark}".encode() not in ps["stdout"], ps["stdout"]
    # and with a timeout instead of a normal end
    r = run(cond, f"(setsid sleep {mark} &) ; sleep 30", timeout_ms=500)
    assert r["timed_out"] is True
    time.sleep(0.5)
    ps = run(cond, "ps -e -o args 2>/dev/null || ps", slot=ATTACKER)
    assert f"sleep {mark}".encode() not in ps["stdout"], ps["stdout"]
    record(cond, "double-forked daemon", "namespaces" if "namespaces" in r["isolation"]
           else "containment")
    still_fine(cond)
