"""The warm exec path: a warm shell per slot box forks each stateless exec.

A command started warm must be indistinguishable from one started cold: the
same output, status, environment, shell state, descriptors, limits,
isolation and process relations (a differential run against an agent with
--no-warm), nothing left over from an earlier command, and the cold path
for what the warm one cannot serve, reported per request."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import AGENT_BIN, Agent
from helpers import AgentFactory, agent_factory  # noqa: F401 (fixture)
from helpers import stream_bytes, wait_until, workspace
from slotwire import Client

NUM = re.compile(rb"\d+")


@pytest.fixture(autouse=True)
def warm_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are about the warm path: a run of the suite with it off
    (SLOT_AGENT_NO_WARM) still runs them with it on."""
    monkeypatch.delenv("SLOT_AGENT_NO_WARM", raising=False)


def warm_shells(a: Agent) -> list[int]:
    """The agent's warm shells: its children running the builtin."""
    out = []
    for p in Path(f"/proc/{a.proc.pid}/task/{a.proc.pid}/children").read_text().split():
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"__slot_warm serve" in cmd:
            out.append(int(p))
    return out


def wait_gone(pid: int, timeout: float = 10.0) -> None:
    def gone() -> bool:
        try:
            return stat_fields(pid)[0] == "Z"
        except OSError:
            return True
    wait_until(gone, timeout)


def stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def ex(c: Client, cmd: str, **kw: Any) -> dict:
    return c.call("exec", {"slot": 0, "cmd": cmd, "timeout_ms": 20000, **kw})


# Each case: command, extra exec arguments, whether numbers are compared.
CASES: list[tuple[str, dict, bool]] = [
    ("declare -p", {}, False),
    ("declare -f; alias; trap -p; shopt; set -o; echo $-", {}, True),
    ("umask; ulimit -a", {}, True),
    ("ls -l /proc/self/fd | sed 's/.* [0-9][0-9]:[0-9][0-9] //'", {}, False),
    ("env | sort", {}, True),
    ('echo "$_|$0|$SHLVL|$BASH_EXECUTION_STRING|$OLDPWD|${#BASH_ARGV[@]}|$BASH_SUBSHELL"', {},
     True),
    ("exit 3", {}, True),
    ("kill -9 $$", {}, True),
    ("kill -TERM $$; echo survived", {}, True),
    ("if; then", {}, True),
    ("(exit 4)", {}, True),
    ("return 2", {}, True),
    ("local x=1", {}, True),
    ("set -e; false; echo no", {}, True),
    ("trap 'echo bye' EXIT; echo hi", {}, True),
    ("trap 'echo err $?' ERR; false; echo after", {}, True),
    ("cat", {"stdin": b"data\nmore"}, True),
    ("cat; echo rc=$?", {}, True),
    ("read -r line; echo \"[$line]\"", {"stdin": b"first\nsecond\n"}, True),
    ("pwd; echo $PWD; cd ..; pwd; cd - >/dev/null; pwd; echo $OLDPWD", {"cwd": "sub/dir"}, True),
    ('echo "$LANG $TZ [$FOO]"; locale | head -2; date -d @0 +%Z; type -P ls; echo ${#PATH}',
     {"env": {"LANG": "C", "TZ": "UTC0", "FOO": "bar baz", "PATH": "/bin:/usr/bin"}}, True),
    ("printf '%s\\n' \"$LC_ALL\" \"${HOME}\" \"${MY_VAR}\"; echo é | wc -c; x=é; echo ${#x}",
     {"env": {"LC_ALL": "C.UTF-8", "HOME": "/nowhere", "MY_VAR": "a=b=c"}}, True),
    ("ulimit -n; ulimit -t; ulimit -f; grep -E 'open files|cpu time|file size' /proc/self/limits",
     {"rlimits": {"nofile": 64, "cpu": 5, "fsize": 1 << 20}}, True),
    ("grep -E '^(Uid|Gid|Groups|NoNewPrivs|Seccomp|Seccomp_filters|Cap...|Sig(Blk|Ign|Cgt))'"
     " /proc/$$/status", {}, True),
    ("grep -E '^(NoNewPrivs|Seccomp|Seccomp_filters|Sig(Blk|Ign))' /proc/self/status", {}, True),
    ("touch /etc/slot-warm-probe; echo rc=$?; touch x && echo ok; rm -f x", {}, True),
    ("mkdir -p d1 d2; echo x > d1/f; ln d1/f d2/g && mv d2/g d1/h && mv d1 d2/ && echo moved;"
     " ln d2/d1/f /tmp/f; echo rc=$?; rm -rf d2 /tmp/f", {}, True),
    ("cat /proc/net/dev | wc -l; (exec 3<>/dev/tcp/127.0.0.1/9) 2>&1 | sed 's/.*: //'",
     {"network": False}, True),
    ("readlink /proc/self/ns/pid /proc/self/ns/mnt /proc/self/ns/net | sed 's/:.*//'", {}, True),
    ("enable -a | wc -l; compgen -b | wc -l; hash", {}, True),
    ("shopt -s extdebug; f(){ declare -p BASH_ARGV BASH_ARGC; }; f a b", {}, True),
    ('echo $(( BASHPID == $$ )); echo $(( PPID == 0 || PPID > 0 ))', {}, True),
    ("x=$(echo sub); echo $x; sleep 0.05 & wait $!; echo $?", {}, True),
    ("exec 3>&1; echo to3 >&3; exec /bin/echo replaced", {}, True),
    ("echo out; echo err >&2; exit 7", {}, True),
    ("set -m; sleep 0.01 & wait; echo $?; (exec -a renamed bash -c 'echo $0')", {}, True),
    ("bash -c 'echo nested $SHLVL'; sh -c 'echo sh'; command -v python3 >/dev/null; echo $?",
     {}, True),
    ("head -c 100000 /dev/zero | tr '\\0' x", {}, True),
    ("echo $RANDOM $SRANDOM $SECONDS | wc -w", {}, True),
]


@pytest.fixture
def pair(agent_factory: AgentFactory) -> tuple[Agent, Agent]:
    return agent_factory(slots=2), agent_factory(slots=2, extra=["--no-warm"])


def test_warm_and_cold_agents_report_it(pair: tuple[Agent, Agent]) -> None:
    warm, cold = pair
    hw, hc = warm.client().call("hello", {}), cold.client().call("hello", {})
    assert hw["warm"] == {"active": True, "why": None}
    assert hc["warm"]["active"] is False and "--no-warm" in hc["warm"]["why"]


def test_probe_reports_warm_and_the_flag_and_env_turn_it_off() -> None:
    txt = subprocess.run([str(AGENT_BIN), "--probe"], capture_output=True, text=True).stdout
    assert "warm exec: yes" in txt
    off = subprocess.run([str(AGENT_BIN), "--probe", "--no-warm"], capture_output=True,
                         text=True).stdout
    assert "warm exec: no (turned off (--no-warm))" in off
    import json
    j = json.loads(subprocess.run([str(AGENT_BIN), "--probe", "--json"], capture_output=True,
                                  text=True).stdout)
    assert j["warm"] == {"active": True, "why": ""}


def test_env_switch_turns_it_off(agent_factory: AgentFactory, monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    monkeypatch.setenv("SLOT_AGENT_NO_WARM", "1")
    a = agent_factory(slots=1)
    c = a.client()
    assert c.call("hello", {})["warm"] == {"active": False,
                                          "why": "turned off (SLOT_AGENT_NO_WARM)"}
    assert ex(c, "true")["warm"] is False
    assert warm_shells(a) == []


def norm(b: bytes, numbers: bool, paths: list[str]) -> bytes:
    for p in paths:
        b = b.replace(p.encode(), b"WS")
    b = re.sub(rb"pipe:\[\d+\]", b"pipe:[N]", b)
    return b if numbers else NUM.sub(b"N", b)


def test_warm_matches_cold(pair: tuple[Agent, Agent]) -> None:
    warm, cold = pair
    cw, cc = warm.client(), cold.client()
    paths = []
    for a, c in ((warm, cw), (cold, cc)):
        (workspace(c, 0) / "sub" / "dir").mkdir(parents=True)
        paths += [str(workspace(c, 0)), str(a.data_dir)]
    assert ex(cw, "true")["warm"] is True  # the shell is up
    diffs = []
    for cmd, kw, numbers in CASES:
        numeric = numbers and "RANDOM" not in cmd
        rw, rc = ex(cw, cmd, **kw), ex(cc, cmd, **kw)
        assert rw["warm"] is True, cmd
        assert rc["warm"] is False, cmd
        for k in ("stdout", "stderr"):
            if norm(rw[k], numeric, paths) != norm(rc[k], numeric, paths):
                diffs.append(f"{cmd!r} {k}:\n  warm {rw[k][:2000]!r}\n  cold {rc[k][:2000]!r}")
        for k in ("exit_code", "signal", "isolation", "network", "timed_out"):
            if rw[k] != rc[k]:
                diffs.append(f"{cmd!r} {k}: warm {rw[k]!r} cold {rc[k]!r}")
    assert not diffs, "\n".join(diffs)


def test_nothing_leaks_into_the_next_command(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    ws = str(workspace(c, 0))
    fresh = ex(c, "umask; ulimit -n; ulimit -u; ls /proc/self/fd | wc -l")
    first = ex(c, "X=1; export Y=2; cd /tmp; f(){ echo f; }; alias ll=ls; "
                  "trap 'echo t' EXIT USR1; umask 077; exec 7>/tmp/fd7; set -o noglob; "
                  "shopt -s extglob; ulimit -n 100; ulimit -S -u 50; HISTFILE=/x; "
                  "sleep 31 & disown; (setsid sleep 32 &); echo set",
               env={"SECRET": "s3"})
    assert first["warm"] is True and first["stdout"] == b"set\nt\n"
    r = ex(c, 'echo "X=$X Y=$Y S=${SECRET-unset} H=${HISTFILE-unset}"; pwd; type f ll 2>&1; '
              "alias; trap -p; set -o | grep -w noglob; shopt extglob; jobs; "
              "pgrep -c -x sleep || true")
    assert r["warm"] is True
    assert r["stdout"].decode().splitlines() == [
        "X= Y= S=unset H=unset", _box_or(ws, r), "/bin/bash: line 1: type: f: not found",
        "/bin/bash: line 1: type: ll: not found", "noglob         \toff", "extglob        \toff", "0"]
    again = ex(c, "umask; ulimit -n; ulimit -u; ls /proc/self/fd | wc -l")
    assert again["stdout"] == fresh["stdout"]
    assert fresh["warm"] and again["warm"]


def _box_or(ws: str, r: dict) -> str:
    return "/workspace" if "namespaces" in r["isolation"] else ws


def test_process_relations_and_kill_paths(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    ex(c, "true")
    d = ex(c, "sleep 30", detach=True)
    pid = d["pid"]
    f = stat_fields(pid)  # state ppid pgrp session ...
    assert int(f[1]) == a.proc.pid, "the agent is the command's parent"
    assert int(f[2]) == pid and int(f[3]) == pid, "own session and process group"
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(r"^NoNewPrivs:\s+1", status, re.M)
    c.call("cancel", {"exec_id": d["exec_id"]})
    res = c.call("exec_attach", {"exec_id": d["exec_id"]})
    assert res["cancelled"] and res["signal"] == signal.SIGKILL and res["warm"] is True
    wait_gone(pid)
    t = ex(c, "sleep 30 & sleep 31; echo no", timeout_ms=300)
    assert t["timed_out"] and t["warm"] and t["stdout"] == b""
    i = ex(c, "echo a; sleep 30", idle_timeout_ms=300)
    assert i["idle_timed_out"] and i["stdout"] == b"a\n"
    kb = ex(c, "sleep 45 & echo $!", keep_background=True)
    assert kb["warm"] is True
    wait_until(lambda: any(b"sleep\x0045" in Path(f"/proc/{p}/cmdline").read_bytes()
                           for p in os.listdir("/proc") if p.isdigit()
                           and os.path.exists(f"/proc/{p}/cmdline")), 5)
    c.call("reset", {"slot": 0})
    wait_until(lambda: not any(b"sleep\x0045" in _cmdline(p) for p in os.listdir("/proc")
                               if p.isdigit()), 10)
    final, events = c.call_stream("exec", {"slot": 0, "cmd": "echo one; sleep 0.1; echo two",
                                           "stream": True})
    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and final["result"]["warm"] is True
    assert stream_bytes(events) == b"one\ntwo\n"
    # ps and pgrep see the command as they would a cold one (the argument
    # area keeps its size: NULs pad it).
    d = ex(c, "sleep 20; : marker-ps", detach=True)
    assert _cmdline(str(d["pid"])).rstrip(b"\0") == b"/bin/bash\0-c\0sleep 20; : marker-ps"
    assert str(d["pid"]).encode() in subprocess.run(
        ["pgrep", "-f", "^/bin/bash -c sleep 20; : marker-ps"], capture_output=True).stdout
    c.call("cancel", {"exec_id": d["exec_id"]})


def _cmdline(p: str) -> bytes:
    try:
        return Path(f"/proc/{p}/cmdline").read_bytes()
    except OSError:
        return b""


def test_what_the_warm_shell_cannot_serve_runs_cold(agent_factory: AgentFactory,
                                                    tmp_path: Path) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    assert ex(c, "true")["warm"] is True
    assert c.call("exec", {"slot": 0, "argv": ["echo", "argv"]})["warm"] is False
    rc_file = workspace(c, 0) / "rc.sh"
    rc_file.write_text("echo sourced\n")
    cases = [
        ({"BASH_ENV": str(rc_file) if "namespaces" not in ex(c, "true")["isolation"]
          else "/workspace/rc.sh"}, "echo body", b"sourced\nbody\n"),
        ({"BASH_FUNC_f%%": "() { echo from-env; }"}, "f", b"from-env\n"),
        ({"SHELLOPTS": "xtrace"}, "echo x 2>/dev/null", b"x\n"),
        ({"PWD": "/elsewhere"}, "echo $PWD", None),
        ({"A-B": "1"}, "env | grep -c '^A-B=' || true", None),
        ({"SHLVL": "5"}, "echo $SHLVL", b"6\n"),
    ]
    for env, cmd, want in cases:
        r = ex(c, cmd, env=env)
        assert r["warm"] is False, env
        if want is not None:
            assert r["stdout"] == want, (env, r)
    big = ex(c, "#" + "x" * 60000 + "\necho big")
    assert big["warm"] is False and big["stdout"] == b"big\n"
    # A command line must fit the warm shell's argument area (3,800 bytes).
    fits = ex(c, "#" + "x" * 3700 + "\necho fits")
    assert fits["warm"] is True and fits["stdout"] == b"fits\n"
    over = ex(c, "#" + "x" * 3800 + "\necho over")
    assert over["warm"] is False and over["stdout"] == b"over\n"
    assert ex(c, "echo back")["warm"] is True


def test_a_killed_or_stopped_warm_shell_is_replaced(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    assert ex(c, "true")["warm"] is True
    [w] = warm_shells(a)
    os.kill(w, signal.SIGKILL)
    wait_until(lambda: w not in warm_shells(a), 5)
    r = ex(c, "echo after")
    assert r["exit_code"] == 0 and r["stdout"] == b"after\n"
    wait_until(lambda: ex(c, "true")["warm"] is True, 10)
    [w2] = warm_shells(a)
    assert w2 != w
    os.kill(w2, signal.SIGSTOP)
    t0 = time.monotonic()
    r = ex(c, "echo while-stopped")
    assert r["stdout"] == b"while-stopped\n" and r["warm"] is False
    assert time.monotonic() - t0 < 10
    wait_until(lambda: w2 not in warm_shells(a), 5)
    assert "did not answer" in a.log()
    wait_until(lambda: ex(c, "true")["warm"] is True, 10)


def test_commands_cannot_signal_their_warm_shell(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    r = ex(c, "true")
    if "landlock" not in r["isolation"]:
        pytest.skip("needs the landlock rung")
    [w] = warm_shells(a)
    k = ex(c, "for p in $(pgrep -f '^/bin/bash -c enable -f'); do kill -STOP $p; done; echo tried")
    assert k["stdout"] == b"tried\n" and b"Operation not permitted" in k["stderr"], k
    assert stat_fields(w)[0] != "T"
    assert ex(c, "echo fine")["warm"] is True


def test_reset_replaces_the_warm_shell(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=1)
    c = a.client()
    ex(c, "true")
    [w] = warm_shells(a)
    c.call("reset", {"slot": 0})
    wait_gone(w)
    assert ex(c, "echo new")["warm"] is True
    [w2] = warm_shells(a)
    assert w2 != w
    st = c.call("stats", {})
    assert st["exec"]["warm"] >= 2


def test_concurrent_warm_execs_across_slots(agent_factory: AgentFactory) -> None:
    a = agent_factory(slots=4)
    errors: list[str] = []

    def run(slot: int) -> None:
        c = a.client()
        for i in range(25):
            r = c.call("exec", {"slot": slot, "cmd": f"echo {slot}-{i} $SLOT_INDEX",
                                "timeout_ms": 20000})
            if r["stdout"] != f"{slot}-{i} {slot}\n".encode() or r["exit_code"] != 0:
                errors.append(repr(r))
            if i and not r["warm"]:
                errors.append(f"slot {slot} exec {i} cold")

    ts = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors[:5]
    assert len(warm_shells(a)) == 4
