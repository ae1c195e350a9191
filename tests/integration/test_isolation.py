"""Escape attempts against the isolation rungs available on this host
(Landlock, seccomp, rlimits, no_new_privs). Each attempt is made for real by
a command in a slot and must fail; the agent and the other slots must keep
working. Rungs the host lacks are reported by --probe, and their attempts fail
loudly here rather than being skipped."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest

from conftest import AGENT_BIN
from slotwire import Client

PY = "/usr/bin/python3"


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


@pytest.fixture
def iso(agent_factory):
    a = agent_factory()
    c = a.client()
    avail = c.call("hello")["isolation"]
    for rung in ("landlock", "seccomp", "rlimits"):
        assert avail[rung], f"{rung} unavailable on this host: the escape suite needs it"
    return a, c


def run(c: Client, slot: int, cmd, **kw) -> dict:
    args = {"slot": slot, **kw}
    args["argv" if isinstance(cmd, list) else "cmd"] = cmd
    return c.call("exec", args, timeout=60)


def still_fine(c: Client) -> None:
    for s in range(4):
        assert run(c, s, "echo ok")["stdout"] == b"ok\n"


def test_exec_reports_and_applies_the_rungs(iso) -> None:
    a, c = iso
    r = run(c, 0, "grep NoNewPrivs /proc/self/status; grep Seccomp: /proc/self/status")
    assert b"NoNewPrivs:\t1" in r["stdout"] and b"Seccomp:\t2" in r["stdout"]
    assert {"landlock", "seccomp", "rlimits", "containment"} <= set(r["isolation"])


def test_write_outside_workspace_is_denied(iso, tmpdir_short) -> None:
    a, c = iso
    target = tmpdir_short / f"escape-{random.randrange(10**9)}"
    r = run(c, 0, f"echo x > {target}")
    assert r["exit_code"] != 0 and b"ermission denied" in r["stderr"]
    assert not target.exists()
    # through a symlink into another slot's workspace
    other = Path(c.call("slots", {"slot": 1})["slots"][0]["workspace"])
    r = run(c, 0, f"ln -s {other} other && echo x > other/planted")
    assert r["exit_code"] != 0 and not (other / "planted").exists()
    # but the workspace, the slot's tmp and /dev/null are writable
    r = run(c, 0, "echo a > f && echo b > $TMPDIR/t && echo c > /dev/null && cat f $TMPDIR/t")
    assert r["exit_code"] == 0 and r["stdout"] == b"a\nb\n"
    still_fine(c)


def test_signalling_the_agent_and_other_slots_is_denied(iso) -> None:
    a, c = iso
    d = c.call("exec", {"slot": 1, "cmd": "sleep 30", "detach": True})
    for pid in (a.proc.pid, d["pid"]):
        r = run(c, 0, f"kill -TERM {pid}")
        # Landlock's signal scope says "not permitted"; a PID namespace
        # hides the process altogether.
        assert r["exit_code"] != 0 and (b"not permitted" in r["stderr"] or
                                        b"No such process" in r["stderr"]), r
    assert a.proc.poll() is None
    assert c.call("cancel", {"exec_id": d["exec_id"]})["cancelled"] == 1
    # signalling its own children still works
    assert run(c, 0, "sleep 30 & kill $!; wait $!; echo $?")["stdout"] == b"143\n"


def test_ptrace_mount_unshare_are_denied(iso, tmpdir_short) -> None:
    a, c = iso
    d = c.call("exec", {"slot": 0, "cmd": "sleep 30", "detach": True})
    r = run(c, 0, py(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.ptrace(16, {d["pid"]}, 0, 0)  # PTRACE_ATTACH
        print(rc, os.strerror(ctypes.get_errno()))
    """))
    assert r["stdout"].startswith(b"-1 Operation not permitted"), r
    c.call("cancel", {"exec_id": d["exec_id"]})
    r = run(c, 0, "mkdir -p m && mount -t tmpfs none m")
    assert r["exit_code"] != 0
    for flag in ("-U", "-n", "-m", "-p -f"):
        r = run(c, 0, f"unshare {flag} true")
        assert r["exit_code"] != 0, (flag, r)
    still_fine(c)


@pytest.mark.parametrize("name,nr,args", [
    ("bpf", 321, (0, 0, 0)),
    ("keyctl", 250, (0, 0, 0)),
    ("add_key", 248, (0, 0, 0)),
    ("perf_event_open", 298, (0, 0, -1)),
    ("userfaultfd", 323, (0, 0, 0)),
    ("io_uring_setup", 425, (1, 0, 0)),
    ("kexec_load", 246, (0, 0, 0)),
    ("init_module", 175, (0, 0, 0)),
    ("open_by_handle_at", 304, (0, 0, 0)),
    ("clock_settime", 227, (0, 0, 0)),
    ("clone3", 435, (0, 0, 0)),
])
def test_dangerous_syscalls_fail_cleanly(iso, name, nr, args) -> None:
    a, c = iso
    r = run(c, 0, py(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall({nr}, {args[0]}, {args[1]}, {args[2]})
        print(rc, ctypes.get_errno())
    """))
    rc, errno = r["stdout"].split()
    want = b"38" if name == "clone3" else b"1"  # ENOSYS so libc falls back; else EPERM
    assert (rc, errno) == (b"-1", want), (name, r)
    assert a.proc.poll() is None


def test_network_false_blocks_inet_sockets_true_allows(iso) -> None:
    a, c = iso
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    probe = py(f"""
        import socket
        out = []
        for fam, typ in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_INET, socket.SOCK_DGRAM),
                         (socket.AF_INET6, socket.SOCK_STREAM), (socket.AF_PACKET, socket.SOCK_RAW)):
            try:
                s = socket.socket(fam, typ)
                out.append("open")
                s.close()
            except OSError as e:
                out.append(str(e.errno))
        try:
            s = socket.create_connection(("127.0.0.1", {port}), timeout=5)
            out.append("connected")
        except OSError as e:
            out.append("refused" if e.errno is None else str(e.errno))
        u = socket.socket(socket.AF_UNIX)
        out.append("unix")
        print(" ".join(out))
    """)
    r = run(c, 0, probe, network=False)
    words = r["stdout"].decode().split()
    assert words[:4] == ["1", "1", "1", "1"], r  # EPERM for every non-Unix family
    assert words[4] != "connected" and words[5] == "unix"
    r = run(c, 0, probe, network=True)
    assert r["stdout"].decode().split()[4] == "connected", r
    srv.close()


def test_rlimits_file_size_memory_cpu(iso) -> None:
    a, c = iso
    r = run(c, 0, "head -c 3000000 /dev/zero > big", rlimits={"fsize": 1000000})
    assert r["exit_code"] != 0 and os.path.getsize(
        Path(c.call("slots", {"slot": 0})["slots"][0]["workspace"]) / "big") <= 1000000
    r = run(c, 0, py("bytearray(1 << 30)"), rlimits={"as": 256 << 20})
    assert r["exit_code"] != 0 and b"MemoryError" in r["stderr"]
    r = run(c, 0, py("while True: pass"), rlimits={"cpu": 1}, timeout_ms=20000)
    assert r["signal"] in (9, 24) and not r["timed_out"], r  # SIGXCPU, then SIGKILL
    assert c.error_code("exec", {"slot": 0, "cmd": "true",
                                 "rlimits": {"cpu": 10**9}}) == "bad_request"
    assert c.error_code("exec", {"slot": 0, "cmd": "true",
                                 "rlimits": {"bogus": 1}}) == "bad_request"
    still_fine(c)


def test_probe_command(tmpdir_short) -> None:
    import json
    import subprocess
    from conftest import AGENT_BIN
    out = subprocess.run([str(AGENT_BIN), "--probe", "--json"], capture_output=True,
                         text=True, timeout=10, check=True).stdout
    d = json.loads(out)
    assert set(d["rungs"]) == {"uid", "namespaces", "landlock", "seccomp", "rlimits", "cgroup",
                               "containment"}
    assert d["rungs"]["containment"]["available"] is True
    human = subprocess.run([str(AGENT_BIN), "--probe"], capture_output=True, text=True,
                           timeout=10, check=True).stdout
    assert "landlock" in human and "seccomp" in human


def test_config_file_adds_seccomp_denials(agent_factory, tmpdir_short) -> None:
    cfg = tmpdir_short / "agent.conf"
    cfg.write_text("# extra denials for this fleet\nseccomp-deny = uname, getcwd\n"
                   "rlimit nproc=300\n")
    a = agent_factory(extra=["--config", str(cfg)])
    c = a.client()
    r = c.call("exec", {"slot": 0, "argv": ["/bin/uname"]})
    assert r["exit_code"] != 0 and b"Operation not permitted" in r["stderr"]
    r = c.call("exec", {"slot": 0, "cmd": "ulimit -u"})
    assert r["stdout"] == b"300\n"
    # the agent itself is not filtered
    assert c.call("hello")["isolation"]["seccomp"] is True


def test_config_file_errors_name_the_line(tmpdir_short) -> None:
    cfg = tmpdir_short / "bad.conf"
    cfg.write_text("slots 2\n\nno-such-option 1\n")
    r = subprocess.run([str(AGENT_BIN), "--config", str(cfg), "--stdio"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2 and f"{cfg}:3: unknown key 'no-such-option'" in r.stderr
    cfg.write_text("seccomp-deny not_a_syscall\n")
    r = subprocess.run([str(AGENT_BIN), "--config", str(cfg), "--stdio"], capture_output=True,
                       text=True, timeout=10)
    assert r.returncode == 2 and "unknown system call 'not_a_syscall'" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop one capability")
@pytest.mark.parametrize("cap", ["fowner", "kill", "dac_override"])
def test_uid_rung_needs_all_its_capabilities_and_slots_stay_usable(tmpdir_short, cap) -> None:
    """Root missing one capability the uid rung needs (docker --cap-drop ALL
    --cap-add SETUID,SETGID,CHOWN) reports the rung unavailable, and the
    slots still work as the agent's own user."""
    import time as _t
    sock = tmpdir_short / "a.sock"
    data = tmpdir_short / "data"
    p = subprocess.Popen(["setpriv", f"--bounding-set=-{cap}", "--inh-caps=-all", "--",
                          str(AGENT_BIN), "--listen", f"unix:{sock}", "--slots", "2",
                          "--data-dir", str(data)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    try:
        deadline = _t.monotonic() + 10
        while not sock.exists():
            assert p.poll() is None and _t.monotonic() < deadline, p.stderr.read()
            _t.sleep(0.02)
        c = Client.unix(str(sock))
        h = c.call("hello")
        assert h["isolation"]["uid"] is False
        assert f"CAP_{cap.upper()}" in h["isolation_detail"]["unavailable"]["uid"], h
        r = run(c, 1, "echo hi > f && cat f && id -u")
        assert r["exit_code"] == 0 and r["stdout"] == b"hi\n0\n", r
        c.call("write_file", {"slot": 0, "path": "w", "data": b"x"})
        assert c.call("read_file", {"slot": 0, "path": "w"})["data"] == b"x"
        c.close()
    finally:
        p.terminate()
        assert p.wait(10) == 0
