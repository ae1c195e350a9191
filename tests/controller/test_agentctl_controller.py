"""agentctl against a real slot-controller: the pool commands (status,
agents, slots, leases, profiles) as tables and --json, acquire/release, the
slot commands through the controller (exec with streaming and exit codes,
cat/put/ls/stat/archive, reset), drain, `top` (one frame, and live in tmux),
and the errors people see (no controller, agent-only commands, bad handles).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import AGENTCTL_BIN, Controller

HANDLE_RE = re.compile(r"^[^/\s]+/\d+/\d+$")

SMALL_CONFIG = """
profiles:
  small:
    slots_per_agent: 1
    min_agents: 1
    max_agents: 1
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("SLOT_AGENT", "SLOT_CONTROLLER", "SLOT_TOKEN_FILE")}
    env.update(extra)
    return env


def run_ctl(args: list[str], stdin: bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(AGENTCTL_BIN)] + args, input=stdin, capture_output=True,
                          timeout=timeout, env=env if env is not None else clean_env())


def ctl(c: Controller, *args: str, stdin: bytes | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return run_ctl(["--controller", c.addr, *args], stdin, timeout)


def ctl_json(c: Controller, *args: str, stdin: bytes | None = None) -> Any:
    r = ctl(c, "--json", *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def acquire(c: Controller, *extra: str) -> str:
    r = ctl(c, "acquire", *extra)
    assert r.returncode == 0, r.stderr
    handle = r.stdout.decode().strip()
    assert HANDLE_RE.match(handle), r.stdout
    return handle


def table(out: bytes) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table whose cells hold no spaces."""
    lines = [ln for ln in out.decode().splitlines() if ln.strip()]
    return lines[0].split(), [ln.split() for ln in lines[1:]]


# -- pool commands


def test_status_human_and_json(controller: Controller) -> None:
    r = ctl(controller, "status")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    lines = out.splitlines()
    assert lines[0].startswith("controller ") and " up " in lines[0]
    assert re.search(r"^agents +\d+ ready, \d+ starting, \d+ draining, \d+ reconnecting \(\d+ total\)$", out, re.M)
    assert re.search(r"^slots +\d+ free, \d+ leased, \d+ executing \(\d+ total\); \d+ waiters$",
                     out, re.M)
    assert re.search(r"^exec +[\d.]+/s +p50 \S+ +p90 \S+ +p99 \S+", out, re.M)
    # The per-profile table.
    i = next(i for i, ln in enumerate(lines) if ln.startswith("PROFILE"))
    head = lines[i].split()
    assert head == ["PROFILE", "AGENTS", "READY", "SLOTS", "FREE", "LEASED", "EXEC", "WAITERS"]
    row = lines[i + 1].split()
    assert row[0] == "default" and int(row[3]) >= 4

    d = ctl_json(controller, "status")
    assert d["agents"]["ready"] >= 1 and d["slots"]["total"] >= 4
    assert d["slots"]["free"] + d["slots"]["leased"] <= d["slots"]["total"]
    assert "default" in d["profiles"] and d["waiters"] == 0
    assert {"rate", "p50_us", "p99_us"} <= set(d["exec"])
    # The human summary says what the JSON says.
    assert f"{d['slots']['total']} total)" in out


def test_hello_through_the_controller(controller: Controller) -> None:
    d = ctl_json(controller, "hello")
    assert d["protocol"] == 1 and d["server"] == "slot-controller"
    assert d["default_profile"] == "default"
    r = ctl(controller, "hello")
    assert r.returncode == 0 and b"server: slot-controller\n" in r.stdout


def test_agents_table_and_json(controller: Controller) -> None:
    d = ctl_json(controller, "agents")
    ags = d["agents"]
    assert len(ags) >= 1
    a = next(a for a in ags if a["state"] == "ready")
    assert a["profile"] == "default" and a["slots"] == 4
    r = ctl(controller, "agents")
    assert r.returncode == 0, r.stderr
    head, rows = table(r.stdout)
    assert head == ["AGENT", "PROFILE", "STATE", "SLOTS", "LEASED", "EXEC", "AGE", "REQUESTS",
                    "RECONNECTS", "PID", "ADDRESS"]
    row = next(rw for rw in rows if rw[0] == a["id"])
    assert row[1:4] == ["default", "ready", "4"]
    assert re.match(r"^\d+(\.\d)?(ms|s)$|^\d+m\d\ds$|^\d+h\d\dm$", row[6]), row[6]
    # Aligned: text columns start under their header, numbers end under it.
    lines = r.stdout.decode().splitlines()
    line = next(ln for ln in lines if ln.startswith(a["id"] + " "))
    assert line.index(" ready ") + 1 == lines[0].index("STATE")
    assert line[:lines[0].index("SLOTS") + len("SLOTS")].endswith(" 4")
    # Filtered by profile.
    assert ctl_json(controller, "agents", "--profile", "default")["agents"]
    r = ctl(controller, "agents", "--profile")
    assert r.returncode == 2


def test_slots_leases_and_profiles(controller: Controller) -> None:
    h = acquire(controller, "--trajectory", "traj-tables")
    agent_id, index, _gen = h.split("/")

    d = ctl_json(controller, "slots")
    mine = [s for s in d["slots"] if s["slot"] == h]
    assert len(mine) == 1 and mine[0]["state"] == "leased"
    assert mine[0]["trajectory_id"] == "traj-tables" and mine[0]["index"] == int(index)
    r = ctl(controller, "slots")
    assert r.returncode == 0, r.stderr
    head, rows = table(r.stdout)
    assert head == ["AGENT", "INDEX", "PROFILE", "STATE", "SLOT", "TRAJECTORY", "EXEC", "LEASED"]
    row = next(rw for rw in rows if rw[4] == h)
    assert row[:4] == [agent_id, index, "default", "leased"] and row[5] == "traj-tables"
    free = [rw for rw in rows if rw[3] == "free"]
    assert free and all(rw[4] == "-" and rw[7] == "-" for rw in free)
    # Filters.
    d = ctl_json(controller, "slots", "--agent", agent_id)
    assert d["slots"] and all(s["agent"] == agent_id for s in d["slots"])
    d = ctl_json(controller, "slots", "--profile", "default")
    assert any(s["slot"] == h for s in d["slots"])

    d = ctl_json(controller, "leases")
    le = next(x for x in d["leases"] if x["slot"] == h)
    assert le["trajectory_id"] == "traj-tables" and le["agent"] == agent_id
    r = ctl(controller, "leases")
    head, rows = table(r.stdout)
    assert head == ["SLOT", "TRAJECTORY", "OWNER", "GRACE", "PROFILE", "EXEC", "AGE", "IDLE"]
    row = next(rw for rw in rows if rw[0] == h)
    # agentctl's acquire is unbound: the lease outlives its connection
    assert row[2] == le["owner"] and row[2].startswith("conn-") and le["bound"] is False
    assert [h, "traj-tables", le["owner"], "unbound", "default", "0"] == row[:6]

    d = ctl_json(controller, "profiles")
    p = next(x for x in d["profiles"] if x["name"] == "default")
    assert p["slots_per_agent"] == 4 and p["max_agents"] == 4 and p["backend"] == "local"
    r = ctl(controller, "profiles")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["PROFILE", "BACKEND", "SLOTS/AGENT", "AGENTS", "MIN-MAX",
                                "SLOTS", "WAITERS", "TIMEOUT", "ERROR"]
    row = lines[1].split()
    assert row[:3] == ["default", "local", "4"] and row[4] == "1-4" and row[7] == "10m00s"


def test_acquire_release_and_capacity(controller_factory) -> None:
    c = controller_factory(SMALL_CONFIG)
    r = ctl(c, "--json", "acquire", "--trajectory", "t-1", "--timeout-ms", "10000")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    h = d["slot"]
    assert HANDLE_RE.match(h) and d["trajectory_id"] == "t-1" and d["profile"] == "small"
    assert d["workspace"].startswith("/")
    # The only slot is taken: an immediate acquire has no capacity.
    r = ctl(c, "acquire", "--timeout-ms", "0")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: no_capacity: "), r.stderr
    assert r.stdout == b""
    # An unknown profile is the caller's mistake.
    r = ctl(c, "acquire", "--profile", "nope")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: bad_request: "), r.stderr
    # A waiter is served once the slot comes back.
    p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", c.addr, "acquire", "--timeout-ms",
                          "20000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env())
    try:
        c.wait_agents(lambda st: st["waiters"] == 1)
        r = ctl(c, "release", h)
        assert r.returncode == 0 and r.stdout == f"released {h}\n".encode(), r.stderr
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, err
    h2 = out.decode().strip()
    assert HANDLE_RE.match(h2) and h2 != h
    # The old handle is stale now.
    r = ctl(c, "exec", h, "--", "true")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_leased: "), r.stderr
    r = ctl(c, "release", h)
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_leased: "), r.stderr
    d = ctl_json(c, "release", h2, "--no-reset")
    assert d["slot"] == h2 and d["reset"] is False


def test_release_resets_the_workspace(controller_factory) -> None:
    c = controller_factory(SMALL_CONFIG)
    h = acquire(c)
    assert ctl(c, "put", h, "left.txt", stdin=b"x").returncode == 0
    assert ctl(c, "release", h).returncode == 0
    h2 = acquire(c, "--timeout-ms", "20000")
    assert h2.rsplit("/", 1)[0] == h.rsplit("/", 1)[0]  # the same slot, a new generation
    r = ctl(c, "cat", h2, "left.txt")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: "), r.stderr
    # Without the reset the files stay for the next holder.
    assert ctl(c, "put", h2, "kept.txt", stdin=b"y").returncode == 0
    assert ctl(c, "release", h2, "--no-reset").returncode == 0
    h3 = acquire(c, "--timeout-ms", "20000")
    r = ctl(c, "cat", h3, "kept.txt")
    assert r.returncode == 0 and r.stdout == b"y", r.stderr


# -- slot commands through the controller


def test_exec_output_and_exit_code(controller: Controller) -> None:
    h = acquire(controller)
    r = ctl(controller, "exec", h, "--", "echo hi; echo oops >&2; exit 3")
    assert r.returncode == 3 and r.stdout == b"hi\n" and r.stderr == b"oops\n"
    # Several words are an argv, not a shell line.
    r = ctl(controller, "exec", h, "--", "printf", "%s|", "a b", "$HOME")
    assert r.returncode == 0 and r.stdout == b"a b|$HOME|", r.stderr
    # Options: environment, working directory, stdin.
    assert ctl(controller, "exec", h, "--", "mkdir -p sub").returncode == 0
    r = ctl(controller, "exec", h, "--cwd", "sub", "-e", "GREETING=hey", "--stdin-file", "-",
            "--", 'echo "$GREETING $(basename "$PWD") $(cat)"', stdin=b"from-stdin")
    assert r.returncode == 0 and r.stdout == b"hey sub from-stdin\n", r.stderr
    # Killed by a signal: 128 + signal, as a shell reports it.
    r = ctl(controller, "exec", h, "--", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM
    # --json gives the whole result, output included.
    r = ctl(controller, "--json", "exec", h, "--", "echo json; exit 5")
    assert r.returncode == 5, r.stderr
    d = json.loads(r.stdout)
    assert d["exit_code"] == 5 and d["stdout"] == "json\n" and d["timed_out"] is False
    # Errors of the agent come through with their code.
    r = ctl(controller, "exec", h, "--", "no-such-binary-xyz", "arg")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: "), r.stderr


def test_exec_timeout_is_124(controller: Controller) -> None:
    h = acquire(controller)
    t0 = time.monotonic()
    r = ctl(controller, "exec", h, "--timeout-ms", "500", "--", "echo before; sleep 30")
    assert r.returncode == 124, r.stderr
    assert r.stdout == b"before\n" and b"timed out" in r.stderr
    assert time.monotonic() - t0 < 15


def test_exec_streams_output_as_it_comes(controller: Controller) -> None:
    h = acquire(controller)
    p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", controller.addr, "exec", h, "--",
                          "echo first; echo err1 >&2; sleep 3; echo second"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    assert p.stdout is not None and p.stderr is not None
    t0 = time.monotonic()
    assert p.stdout.readline() == b"first\n"
    assert p.stderr.readline() == b"err1\n"
    # Both arrived while the command was still sleeping.
    assert time.monotonic() - t0 < 2.5 and p.poll() is None
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out == b"second\n" and err == b""


def test_exec_sigint_cancels_the_command(controller: Controller) -> None:
    h = acquire(controller)
    p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", controller.addr, "exec", h, "--",
                          "echo go; sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env())
    assert p.stdout is not None
    assert p.stdout.readline() == b"go\n"
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert time.monotonic() - t0 < 10
    assert p.returncode == 128 + signal.SIGKILL, err
    assert b"cancel" in err
    # The slot is free for the next command.
    d = ctl_json(controller, "slots")
    assert next(s for s in d["slots"] if s["slot"] == h)["executing"] == 0
    r = ctl(controller, "exec", h, "--", "echo again")
    assert r.returncode == 0 and r.stdout == b"again\n"


def test_put_cat_ls_stat_round_trip(controller: Controller) -> None:
    h = acquire(controller)
    data = os.urandom(3 << 20)
    r = ctl(controller, "put", h, "deep/dir/blob.bin", stdin=data)
    assert r.returncode == 0, r.stderr
    assert b"wrote deep/dir/blob.bin" in r.stdout
    assert hashlib.sha256(data).hexdigest().encode() in r.stdout
    r = ctl(controller, "cat", h, "deep/dir/blob.bin")
    assert r.returncode == 0 and r.stdout == data
    d = ctl_json(controller, "put", h, "notes.txt", stdin=b"hello\n")
    assert d["size"] == 6 and d["sha256"] == hashlib.sha256(b"hello\n").hexdigest()
    d = ctl_json(controller, "cat", h, "notes.txt")
    assert d["data"] == "hello\n" and d["size"] == 6

    r = ctl(controller, "ls", h)
    assert r.returncode == 0, r.stderr
    names = [ln.split()[-1] for ln in r.stdout.decode().splitlines()]
    assert names == ["deep", "notes.txt"]
    assert r.stdout.decode().splitlines()[0].startswith("drwx")
    r = ctl(controller, "ls", h, ".", "-R")
    names = [ln.split()[-1] for ln in r.stdout.decode().splitlines()]
    assert names == ["deep", "deep/dir", "deep/dir/blob.bin", "notes.txt"]
    d = ctl_json(controller, "ls", h, "deep", "-R")
    assert [e["path"] for e in d["entries"]] == ["dir", "dir/blob.bin"]
    assert d["entries"][1]["size"] == len(data)

    r = ctl(controller, "stat", h, "notes.txt")
    assert r.returncode == 0 and b"type: file\nsize: 6\n" in r.stdout
    r = ctl(controller, "cat", h, "../../etc/passwd")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: path_escape: "), r.stderr


def test_archive_both_formats(controller: Controller, tmp_path: Path) -> None:
    h = acquire(controller)
    assert ctl(controller, "put", h, "src/a.c", stdin=b"int a;\n").returncode == 0
    assert ctl(controller, "put", h, "src/b/c.txt", stdin=b"c" * 5000).returncode == 0
    for fmt, mode in (("tar.gz", "r:gz"), ("tar", "r:")):
        r = ctl(controller, "archive", h, "src", "--format", fmt)
        assert r.returncode == 0, r.stderr
        # Not a terminal: no progress line.
        assert r.stderr == b""
        data = io.BytesIO(r.stdout)
        with tarfile.open(fileobj=data, mode=mode) as tf:  # type: ignore[call-overload]
            names = sorted(n.lstrip("./") for n in tf.getnames() if n not in (".", "./"))
            assert names == ["a.c", "b", "b/c.txt"]
            member = next(m for m in tf.getmembers() if m.name.endswith("a.c"))
            f = tf.extractfile(member)
            assert f is not None and f.read() == b"int a;\n"
    d = ctl_json(controller, "archive", h, "src", "--format", "tar")
    assert d["format"] == "tar" and d["entries"] >= 3


def test_archive_progress_on_a_terminal(controller: Controller, tmp_path: Path) -> None:
    """stderr on a pty: a progress line, then the summary."""
    import pty
    h = acquire(controller)
    assert ctl(controller, "exec", h, "--",
               "mkdir -p big && head -c 3000000 /dev/urandom > big/r.bin").returncode == 0
    out_file = tmp_path / "a.tar"
    master, slave = pty.openpty()
    try:
        with open(out_file, "wb") as out:
            p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", controller.addr, "archive",
                                  h, "big", "--format", "tar"], stdout=out, stderr=slave,
                                 env=clean_env())
            os.close(slave)
            slave = -1
            p.wait(60)
        err = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            err += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert p.returncode == 0, err
    # The progress line is redrawn in place, then cleared for the summary.
    assert err.startswith(b"\ragentctl: archive: "), err
    summary = rb"\r\x1b\[Karchived 2 entries, 3002\d\d\d bytes \(2\.9 MiB, tar\)\r\n$"
    assert re.search(summary, err), err
    with tarfile.open(out_file) as tf:
        assert any(n.endswith("r.bin") for n in tf.getnames())


def test_reset_empties_the_workspace(controller: Controller) -> None:
    h = acquire(controller)
    assert ctl(controller, "put", h, "f.txt", stdin=b"data").returncode == 0
    r = ctl(controller, "reset", h)
    assert r.returncode == 0, r.stderr
    assert b"killed:" in r.stdout
    r = ctl(controller, "ls", h)
    assert r.returncode == 0 and r.stdout == b""
    # The lease is kept.
    r = ctl(controller, "exec", h, "--", "echo still mine")
    assert r.returncode == 0 and r.stdout == b"still mine\n"
    d = ctl_json(controller, "reset", h)
    assert "killed" in d


# -- drain


def test_drain_an_agent(controller_factory) -> None:
    c = controller_factory("""
profiles:
  default:
    slots_per_agent: 2
    min_agents: 1
    max_agents: 2
""")
    h = acquire(c)
    agent_id = h.split("/")[0]
    r = ctl(c, "drain", agent_id)
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.startswith(f"agent {agent_id}: draining, 1 lease left"), out
    d = ctl_json(c, "agents")
    assert next(a for a in d["agents"] if a["id"] == agent_id)["state"] == "draining"
    # A draining agent takes no new leases: the next slot comes from another agent.
    h2 = acquire(c, "--timeout-ms", "20000")
    assert h2.split("/")[0] != agent_id
    # Its lease still works until released; then the agent stops.
    assert ctl(c, "exec", h, "--", "true").returncode == 0
    assert ctl(c, "release", h).returncode == 0
    deadline = time.monotonic() + 20
    while True:
        ids = [a["id"] for a in ctl_json(c, "agents")["agents"]
               if a["state"] in ("ready", "draining")]
        if agent_id not in ids:
            break
        assert time.monotonic() < deadline, ids
        time.sleep(0.1)
    r = ctl(c, "drain", "no-such-agent")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: "), r.stderr


# -- top


def test_top_once_is_plain_text(controller: Controller) -> None:
    agent_id = ctl_json(controller, "agents")["agents"][0]["id"]
    r = ctl(controller, "top", "--once")
    assert r.returncode == 0, r.stderr
    assert b"\x1b" not in r.stdout
    out = r.stdout.decode()
    assert out.startswith("agentctl top  " + controller.addr)
    assert re.search(r"^agents +\d+ ready", out, re.M)
    assert re.search(r"^slots +\d+ free, \d+ leased, \d+ executing", out, re.M)
    assert re.search(r"^exec +[\d.]+/s +p50 \S+ +p90 \S+ +p99 \S+", out, re.M)
    assert re.search(r"^AGENT +PROFILE +STATE +SLOTS +LEASED +EXEC +AGE +REQUESTS +RECONNECTS$", out, re.M)
    assert re.search(rf"^{re.escape(agent_id)} +default +ready +4 ", out, re.M)
    assert re.search(r"^PROFILE +AGENTS", out, re.M)
    r = ctl(controller, "--json", "top")
    assert r.returncode == 2


@pytest.fixture
def tmux_session(tmp_path: Path):
    if not shutil.which("tmux"):
        subprocess.run(["apt-get", "install", "-y", "-q", "tmux"], capture_output=True,
                       timeout=300)
    if not shutil.which("tmux"):
        pytest.skip("tmux is not installed and cannot be")
    name = f"agentctl-top-{os.getpid()}"
    sock = f"/tmp/tmux-act-{os.getpid()}"
    env = clean_env(TERM="xterm-256color", PS1="$ ")

    def t(*args: str, check: bool = True) -> str:
        r = subprocess.run(["tmux", "-S", sock, *args], capture_output=True, timeout=10, env=env)
        if check:
            assert r.returncode == 0, r.stderr
        return r.stdout.decode(errors="replace")

    t("-f", "/dev/null", "new-session", "-d", "-s", name, "-x", "140", "-y", "40",
      "bash --norc --noprofile -i")
    try:
        yield t, name
    finally:
        t("kill-server", check=False)
        if os.path.exists(sock):
            os.unlink(sock)


def wait_pane(t, name: str, pred, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        screen = t("capture-pane", "-p", "-t", name)
        if pred(screen):
            return screen
        if time.monotonic() > deadline:
            raise AssertionError(f"pane never matched; it shows:\n{screen}")
        time.sleep(0.1)


def exited(screen: str) -> bool:
    """The shell printed top's exit status (not just the typed `echo EXIT=$?`)."""
    return re.search(r"^EXIT=\d+$", screen, re.M) is not None


def test_top_live_in_tmux(controller: Controller, tmux_session) -> None:
    t, name = tmux_session
    h = acquire(controller, "--trajectory", "traj-top")
    agent_id = h.split("/")[0]
    t("send-keys", "-t", name,
      f"{AGENTCTL_BIN.resolve()} --controller {controller.addr} top --interval 0.2; "
      "echo EXIT=$?", "Enter")
    screen = wait_pane(t, name, lambda s: "agentctl top" in s and agent_id in s)
    # The alternate screen, no cursor, and the header and table.
    assert t("display-message", "-p", "-t", name, "#{alternate_on}").strip() == "1"
    assert t("display-message", "-p", "-t", name, "#{cursor_flag}").strip() == "0"
    assert re.search(r"^agents +\d+ ready", screen, re.M)
    assert re.search(r"^slots +\d+ free, 1 leased, 0 executing", screen, re.M)
    assert re.search(r"^AGENT +PROFILE +STATE", screen, re.M)
    # It refreshes: a command that runs shows up as executing.
    p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", controller.addr, "exec", h, "--",
                          "sleep 3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=clean_env())
    try:
        wait_pane(t, name, lambda s: re.search(r"^slots .* 1 executing", s, re.M) is not None)
    finally:
        p.kill()
        p.wait()
    # q quits and restores the terminal.
    t("send-keys", "-t", name, "q")
    screen = wait_pane(t, name, exited)
    assert re.search(r"^EXIT=0$", screen, re.M), screen
    assert t("display-message", "-p", "-t", name, "#{alternate_on}").strip() == "0"
    assert t("display-message", "-p", "-t", name, "#{cursor_flag}").strip() == "1"
    # What top drew is gone with the alternate screen.
    assert "AGENT " not in screen and "agentctl top" not in screen
    # Canonical mode and echo are back.
    t("send-keys", "-t", name, "clear; stty -a | tr ' ' '\\n' | grep -E '^-?(icanon|echo)$'",
      "Enter")
    screen = wait_pane(t, name, lambda s: re.search(r"^-?echo$", s, re.M) is not None)
    assert re.search(r"^icanon$", screen, re.M) and re.search(r"^echo$", screen, re.M), screen


def test_top_ctrl_c_quits_and_restores(controller: Controller, tmux_session) -> None:
    t, name = tmux_session
    t("send-keys", "-t", name,
      f"{AGENTCTL_BIN.resolve()} --controller {controller.addr} top; echo EXIT=$?", "Enter")
    wait_pane(t, name, lambda s: "agentctl top" in s and "AGENT" in s)
    t("send-keys", "-t", name, "C-c")
    screen = wait_pane(t, name, exited)
    assert re.search(r"^EXIT=0$", screen, re.M), screen
    assert t("display-message", "-p", "-t", name, "#{alternate_on}").strip() == "0"
    t("send-keys", "-t", name, "clear; stty -a | tr ' ' '\\n' | grep -E '^-?icanon$'", "Enter")
    screen = wait_pane(t, name, lambda s: re.search(r"^-?icanon$", s, re.M) is not None)
    assert re.search(r"^icanon$", screen, re.M), screen


def test_top_reports_a_lost_controller(controller_factory, tmux_session) -> None:
    c = controller_factory()
    t, name = tmux_session
    t("send-keys", "-t", name,
      f"{AGENTCTL_BIN.resolve()} --controller {c.addr} top --interval 0.2; echo EXIT=$?",
      "Enter")
    wait_pane(t, name, lambda s: "agentctl top" in s)
    c.stop()
    screen = wait_pane(t, name, exited)
    assert re.search(r"^EXIT=1$", screen, re.M) and "agentctl: " in screen, screen
    assert t("display-message", "-p", "-t", name, "#{alternate_on}").strip() == "0"


# -- errors without a controller


def test_no_controller_is_explained(tmp_path: Path) -> None:
    sock = f"{tmp_path}/none.sock"
    r = run_ctl(["--controller", f"unix:{sock}", "status"], timeout=10)
    assert r.returncode == 1 and r.stdout == b""
    msg = r.stderr.decode()
    assert msg.startswith(f"agentctl: no controller at unix:{sock} (ENOENT). "), msg
    assert "Start one with: slot-controller --config FILE" in msg
    assert "--agent ADDR" in msg
    # A socket file nobody listens on.
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    r = run_ctl(["--controller", f"unix:{dead}", "agents"], timeout=10)
    assert r.returncode == 1
    assert f"no controller at unix:{dead} (ECONNREFUSED)".encode() in r.stderr


def test_default_controller_address(tmp_path: Path) -> None:
    # $XDG_RUNTIME_DIR first.
    r = run_ctl(["status"], env=clean_env(XDG_RUNTIME_DIR=str(tmp_path)), timeout=10)
    assert r.returncode == 1
    want = f"no controller at unix:{tmp_path}/slot-controller.sock (ENOENT)"
    assert want.encode() in r.stderr, r.stderr
    # Its default needs no --listen in the hint.
    assert b"--listen" not in r.stderr
    # $SLOT_CONTROLLER over that.
    env = clean_env(XDG_RUNTIME_DIR=str(tmp_path), SLOT_CONTROLLER=f"unix:{tmp_path}/other.sock")
    r = run_ctl(["status"], env=env, timeout=10)
    assert f"no controller at unix:{tmp_path}/other.sock".encode() in r.stderr, r.stderr
    assert f"--listen unix:{tmp_path}/other.sock".encode() in r.stderr
    # Neither: a per-user socket in /tmp.
    env = clean_env()
    env.pop("XDG_RUNTIME_DIR", None)
    path = f"/tmp/slot-controller-{os.getuid()}.sock"
    if os.path.exists(path):
        pytest.skip(f"{path} exists on this machine")
    r = run_ctl(["leases"], env=env, timeout=10)
    assert r.returncode == 1 and f"no controller at unix:{path} (ENOENT)".encode() in r.stderr


def test_wait_for_a_starting_controller(tmpdir_short: Path) -> None:
    """--wait retries while the socket is missing: start the controller late."""
    import conftest
    d = tmpdir_short
    sock = f"{d}/late.sock"
    p = subprocess.Popen([str(AGENTCTL_BIN), "--controller", f"unix:{sock}", "--wait", "15",
                          "--json", "profiles"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=clean_env())
    time.sleep(0.5)
    cfg = d / "c.yaml"
    cfg.write_text(conftest.DEFAULT_CONFIG)
    ctl_proc = subprocess.Popen([str(conftest.CONTROLLER_BIN), "--config", str(cfg), "--listen",
                                 f"unix:{sock}", "--state-dir", str(d / "state"), "--agent-bin",
                                 str(conftest.AGENT_BIN)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert json.loads(out)["profiles"][0]["name"] == "default"
    finally:
        ctl_proc.terminate()
        ctl_proc.wait(15)
        conftest.kill_stray_agents(d / "state")


@pytest.mark.parametrize("args,needle", [
    (["health"], b"--agent"),
    (["stats"], b"--agent"),
    (["lease", "0", "t"], b"--agent"),
    (["cancel", "3"], b"--agent"),
    (["exec", "0", "--", "true"], b"slot handle"),
    (["cat", "1", "f"], b"slot handle"),
    (["release"], b"usage: agentctl release SLOT"),
    (["release", "a/1/2", "--bogus"], b"usage: agentctl release SLOT"),
    (["acquire", "--timeout-ms", "soon"], b"--timeout-ms"),
    (["acquire", "extra"], b"usage: agentctl acquire"),
    (["drain"], b"usage: agentctl drain AGENT"),
    (["top", "--interval", "0"], b"--interval"),
    (["slots", "--agent"], b"usage: agentctl slots"),
    (["leases", "x"], b"usage: agentctl leases"),
])
def test_usage_errors_with_the_controller(tmp_path: Path, args: list[str],
                                          needle: bytes) -> None:
    r = run_ctl(["--controller", f"unix:{tmp_path}/none.sock", *args], timeout=10)
    assert r.returncode == 2, (args, r.stderr)
    assert needle in r.stderr and r.stdout == b""


def test_mode_selection(tmp_path: Path) -> None:
    # Controller commands need the controller.
    r = run_ctl(["--agent", f"unix:{tmp_path}/a.sock", "status"], timeout=10)
    assert r.returncode == 2 and b"controller command" in r.stderr
    # $SLOT_AGENT selects an agent unless --controller is given.
    env = clean_env(SLOT_AGENT=f"unix:{tmp_path}/a.sock")
    r = run_ctl(["agents"], env=env, timeout=10)
    assert r.returncode == 2 and b"--controller" in r.stderr
    r = run_ctl(["--controller", f"unix:{tmp_path}/c.sock", "agents"], env=env, timeout=10)
    assert r.returncode == 1 and b"no controller at" in r.stderr
    r = run_ctl(["--controller", "unix:/x", "--agent", "unix:/y", "hello"], timeout=10)
    assert r.returncode == 2 and b"not both" in r.stderr
    r = run_ctl(["--help"])
    assert r.returncode == 0 and b"--controller ADDR" in r.stdout and b"top" in r.stdout


def test_stop_ends_agents_and_controller_and_returns_when_done(controller_factory):
    c = controller_factory(SMALL_CONFIG)
    pid = c.proc.pid
    r = ctl(c, "stop", "--bogus")
    assert r.returncode == 2 and b"usage: agentctl stop [--purge]" in r.stderr
    r = ctl(c, "stop")
    assert r.returncode == 0, r.stderr
    out = r.stdout.decode()
    assert out.splitlines() == ["stopping 1 agent (0 leased slots)", "controller stopped"], out
    # the controller had exited by the time agentctl returned
    assert c.proc.wait(1) == 0 and c.proc.pid == pid
    r = ctl(c, "status")
    assert r.returncode == 1 and b"controller" in r.stderr


def test_attach_is_an_interactive_terminal_in_the_slot(controller: Controller,
                                                       tmux_session) -> None:
    t, name = tmux_session
    h = acquire(controller, "--trajectory", "traj-attach")
    t("send-keys", "-t", name,
      f"{AGENTCTL_BIN.resolve()} --controller {controller.addr} attach {h}; echo EXIT=$?",
      "Enter")
    wait_pane(t, name, lambda s: "Ctrl-] detaches" in s)
    # typed keys run in the slot: its workspace, its user
    t("send-keys", "-t", name, "cd sub 2>/dev/null || mkdir sub && cd sub; pwd; id -u", "Enter")
    # (/workspace in the slot's box, else the host path)
    screen = wait_pane(t, name, lambda s: re.search(r"(/slots/\d+/work|^/workspace)/sub$", s,
                                                    re.M) is not None)
    # the window size follows the local terminal, also when it changes
    t("send-keys", "-t", name, "stty size", "Enter")
    wait_pane(t, name, lambda s: re.search(r"^40 140$", s, re.M) is not None)
    t("resize-window", "-t", name, "-x", "100", "-y", "30")
    t("send-keys", "-t", name, "clear; stty size", "Enter")
    wait_pane(t, name, lambda s: re.search(r"^30 100$", s, re.M) is not None)
    # a full-screen program and Ctrl-C go through as keys
    t("send-keys", "-t", name, "sleep 100", "Enter")
    time.sleep(0.3)
    t("send-keys", "-t", name, "C-c")
    t("send-keys", "-t", name, "echo after-$((40+2))", "Enter")
    wait_pane(t, name, lambda s: re.search(r"^after-42$", s, re.M) is not None)
    # state made in the session is in the slot's files
    t("send-keys", "-t", name, "echo kept > attached.txt", "Enter")
    time.sleep(0.3)
    r = ctl(controller, "exec", h, "--", "ps -eo pid,args")
    assert b"--noprofile" in r.stdout, r.stdout  # the attached shell, seen from the slot
    # Ctrl-] detaches: agentctl exits 0 and the terminal is sane again
    t("send-keys", "-t", name, "C-]")
    screen = wait_pane(t, name, exited)
    assert re.search(r"^EXIT=0$", screen, re.M) and "[detached]" in screen, screen
    r = ctl(controller, "cat", h, "sub/attached.txt")
    assert r.returncode == 0 and r.stdout == b"kept\n", r.stderr
    # the session was closed: no shell of it is left in the slot (the slot's
    # processes share its box, so ps run there sees them)
    r = ctl(controller, "exec", h, "--", "ps -eo pid,args")
    assert r.returncode == 0, r.stderr
    assert b"--noprofile" not in r.stdout and b"sleep 100" not in r.stdout, r.stdout
    # the shell's exit ends an attach too
    t("send-keys", "-t", name,
      f"clear; {AGENTCTL_BIN.resolve()} --controller {controller.addr} attach {h}; echo EXIT=$?",
      "Enter")
    wait_pane(t, name, lambda s: "Ctrl-] detaches" in s)
    t("send-keys", "-t", name, "exit", "Enter")
    screen = wait_pane(t, name, exited)
    assert "[session ended]" in screen and re.search(r"^EXIT=0$", screen, re.M), screen
