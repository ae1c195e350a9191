"""agentctl against a real slot-agent: every command in human and --json
form, exit-code propagation, streaming, binary round trips, archives,
--agent-cmd over stdio, tokens, helpful errors and usage errors."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import AGENT_BIN, AGENTCTL_BIN, Agent, free_port


def run_ctl(args: list[str], stdin: bytes | None = None, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(AGENTCTL_BIN)] + args, input=stdin, capture_output=True,
                          timeout=timeout, env=env)


def ctl(agent: Agent, *args: str, stdin: bytes | None = None,
        extra: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return run_ctl(["--agent", f"unix:{agent.sock}"] + (extra or []) + list(args), stdin, timeout)


def ctl_json(agent: Agent, *args: str, stdin: bytes | None = None) -> Any:
    r = ctl(agent, "--json", *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def kv_lines(out: bytes) -> dict[str, str]:
    """Top-level `key: value` lines of human output."""
    d: dict[str, str] = {}
    for line in out.decode().splitlines():
        if line and not line.startswith(" ") and ":" in line:
            k, _, v = line.partition(":")
            d[k] = v.strip()
    return d


# -- informational commands


def test_hello_human_and_json(agent: Agent) -> None:
    r = ctl(agent, "hello")
    assert r.returncode == 0, r.stderr
    kv = kv_lines(r.stdout)
    assert kv["protocol"] == "1" and kv["agent"] == "slot-agent" and kv["slots"] == "4"
    assert kv["authenticated"] == "true"
    # Nested maps are indented under their key.
    assert b"\n  containment: true\n" in r.stdout
    assert b"\n  max_frame: " in r.stdout
    d = ctl_json(agent, "hello")
    assert d["protocol"] == 1 and d["slots"] == 4 and d["agent"] == "slot-agent"
    assert d["limits"]["max_frame"] > 0 and d["isolation"]["containment"] is True


def test_health_and_stats(agent: Agent) -> None:
    r = ctl(agent, "health")
    assert r.returncode == 0
    kv = kv_lines(r.stdout)
    assert kv["ok"] == "true" and kv["slots"] == "4"
    d = ctl_json(agent, "health")
    assert d["ok"] is True and d["running_execs"] == 0
    assert ctl(agent, "exec", "0", "--", "true").returncode == 0
    r = ctl(agent, "stats")
    assert r.returncode == 0 and b"\nexec:\n" in r.stdout and b"  started: 1\n" in r.stdout
    d = ctl_json(agent, "stats")
    assert d["exec"]["started"] == 1 and d["exec"]["finished"] == 1
    assert d["ops"]["exec"]["calls"] == 1


def size_short(n: int) -> str:
    """agentctl's table cells: 12.3M."""
    v, u = n / 1024, 0
    while v >= 1024 and u < 4:
        v, u = v / 1024, u + 1
    return f"{v:.1f}{'KMGTP'[u]}"


def test_slots_table_and_json(agent: Agent) -> None:
    assert ctl(agent, "lease", "2", "traj-table").returncode == 0
    r = ctl(agent, "slots")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split() == ["SLOT", "STATE", "LEASE", "QUEUED", "RUNNING", "EXECS", "DISK",
                                "FILES"]
    assert len(lines) == 5
    rows = [ln.split() for ln in lines[1:]]
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert rows[2][1:6] == ["idle", "traj-table", "0", "-", "0"]
    # Each slot's disk use against its budgets (the agent's defaults).
    budget = agent.client().call("hello")["disk_quota"]
    assert rows[2][6].endswith("/" + size_short(budget["slot_disk"])), rows[2]
    assert rows[2][7].endswith(f"/{budget['slot_inodes']}"), rows[2]
    assert rows[0][2] == "-"
    # Aligned: every column starts at the same offset on every line.
    starts = [lines[0].index(h) for h in ("STATE", "LEASE", "EXECS")]
    for ln in lines[1:]:
        assert all(ln[s - 1] == " " for s in starts)
    d = ctl_json(agent, "slots")
    assert [s["slot"] for s in d["slots"]] == [0, 1, 2, 3]
    assert d["slots"][2]["trajectory_id"] == "traj-table" and d["slots"][0]["trajectory_id"] is None


# -- exec


def test_exec_exit_code_and_streams(agent: Agent) -> None:
    r = ctl(agent, "exec", "0", "--", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    assert ctl(agent, "exec", "0", "--", "exit 0").returncode == 0
    r = ctl(agent, "exec", "0", "--", "kill -9 $$")
    assert r.returncode == 137


def test_exec_argv_vs_shell(agent: Agent) -> None:
    # Several words: an argv, no shell, so spaces and $ survive literally.
    r = ctl(agent, "exec", "0", "--", "printf", "%s|", "a b", "$HOME")
    assert r.returncode == 0 and r.stdout == b"a b|$HOME|"
    # One word: a shell string.
    r = ctl(agent, "exec", "0", "--", "printf '%s|' \"a b\" $SLOT_INDEX")
    assert r.stdout == b"a b|0|"


def test_exec_options(agent: Agent, tmp_path: Path) -> None:
    r = ctl(agent, "exec", "1", "-e", "FOO=bar", "-e", "EMPTY=", "-e", "EQ=a=b", "--",
            "echo \"$FOO|$EMPTY|$EQ\"")
    assert r.stdout == b"bar||a=b\n"
    assert ctl(agent, "exec", "1", "--", "mkdir -p sub/dir").returncode == 0
    r = ctl(agent, "exec", "1", "--cwd", "sub/dir", "--", "pwd")
    assert r.stdout.decode().rstrip().endswith("/sub/dir")
    r = ctl(agent, "exec", "1", "--stdin-file", "-", "--", "wc -c", stdin=b"12345")
    assert r.stdout.strip() == b"5"
    f = tmp_path / "in.txt"
    f.write_bytes(b"from a file\n")
    r = ctl(agent, "exec", "1", "--stdin-file", str(f), "--", "cat")
    assert r.stdout == b"from a file\n"
    # Without --stdin-file the command's stdin is /dev/null, not ours.
    r = ctl(agent, "exec", "1", "--", "cat", stdin=b"not forwarded")
    assert r.returncode == 0 and r.stdout == b""


def test_exec_timeout_is_124(agent: Agent) -> None:
    t0 = time.monotonic()
    r = ctl(agent, "exec", "0", "--timeout-ms", "300", "--", "sleep 30")
    assert r.returncode == 124 and b"timed out" in r.stderr
    assert time.monotonic() - t0 < 10
    r = ctl(agent, "--json", "exec", "0", "--timeout-ms", "300", "--", "sleep 30")
    assert r.returncode == 124 and json.loads(r.stdout)["timed_out"] is True


def test_exec_streams_in_order_as_it_runs(agent: Agent) -> None:
    # Output must arrive while the command runs, not at the end.
    p = subprocess.Popen([str(AGENTCTL_BIN), "--agent", f"unix:{agent.sock}", "exec", "0", "--",
                          "echo first; sleep 3; echo second"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None
    t0 = time.monotonic()
    line = p.stdout.readline()
    assert line == b"first\n" and time.monotonic() - t0 < 2.5
    out, err = p.communicate(timeout=30)
    assert out == b"second\n" and p.returncode == 0
    # Many chunks keep their order.
    r = ctl(agent, "exec", "0", "--", "for i in $(seq 1 300); do echo line$i; sleep 0.001; done")
    assert r.stdout.decode().split() == [f"line{i}" for i in range(1, 301)]
    # Interleaved stdout/stderr go to the right streams.
    r = ctl(agent, "exec", "0", "--", "for i in 1 2 3; do echo o$i; echo e$i >&2; done")
    assert r.stdout == b"o1\no2\no3\n" and r.stderr == b"e1\ne2\ne3\n"


def test_exec_json_result(agent: Agent) -> None:
    r = ctl(agent, "--json", "exec", "1", "--", "echo hi; printf '\\377\\376' >&2; exit 3")
    assert r.returncode == 3
    d = json.loads(r.stdout)
    assert d["stdout"] == "hi\n" and d["exit_code"] == 3 and d["timed_out"] is False
    # Non-UTF-8 bytes come back as base64.
    assert d["stderr"] == {"base64": "//4="}
    assert isinstance(d["exec_id"], int) and isinstance(d["isolation"], list)


def test_exec_large_streamed_output(agent: Agent) -> None:
    r = ctl(agent, "exec", "0", "--", "head -c 3000000 /dev/zero | tr '\\0' x")
    assert r.returncode == 0 and r.stdout == b"x" * 3000000


def test_exec_sigint_cancels_the_remote_command(agent: Agent) -> None:
    p = subprocess.Popen([str(AGENTCTL_BIN), "--agent", f"unix:{agent.sock}", "exec", "3", "--",
                          "echo go; sleep 60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None
    assert p.stdout.readline() == b"go\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=20)
    assert p.returncode == 137, err
    assert b"cancel" in err
    d = ctl_json(agent, "slots")
    assert d["slots"][3]["running"] == [] and d["slots"][3]["state"] == "idle"


# -- files


def test_put_cat_round_trip_3mib_binary(agent: Agent) -> None:
    data = os.urandom(3 << 20)
    r = ctl(agent, "put", "0", "deep/dir/blob.bin", stdin=data)
    assert r.returncode == 0, r.stderr
    assert b"wrote deep/dir/blob.bin" in r.stdout
    assert hashlib.sha256(data).hexdigest().encode() in r.stdout
    r = ctl(agent, "cat", "0", "deep/dir/blob.bin")
    assert r.returncode == 0 and r.stdout == data
    d = ctl_json(agent, "put", "0", "deep/dir/blob.bin", stdin=data)
    assert d["size"] == len(data) and d["sha256"] == hashlib.sha256(data).hexdigest()


def test_cat_reads_in_ranges_past_8mib(agent: Agent) -> None:
    # Larger than one 8 MiB read_file range, so cat must loop.
    data = os.urandom(9 << 20) + b"tail"
    assert ctl(agent, "put", "1", "big.bin", stdin=data).returncode == 0
    r = ctl(agent, "cat", "1", "big.bin")
    assert r.returncode == 0 and len(r.stdout) == len(data) and r.stdout == data


def test_cat_json_and_empty_file(agent: Agent) -> None:
    assert ctl(agent, "put", "0", "t.txt", stdin=b"caf\xc3\xa9 \"q\"\n").returncode == 0
    d = ctl_json(agent, "cat", "0", "t.txt")
    assert d["data"] == "caf\u00e9 \"q\"\n" and d["size"] == 10 and d["path"] == "t.txt"
    assert ctl(agent, "put", "0", "bin", stdin=b"\x00\xff").returncode == 0
    assert ctl_json(agent, "cat", "0", "bin")["data"] == {"base64": "AP8="}
    assert ctl(agent, "put", "0", "empty", stdin=b"").returncode == 0
    r = ctl(agent, "cat", "0", "empty")
    assert r.returncode == 0 and r.stdout == b""


def test_ls_and_stat(agent: Agent) -> None:
    ctl(agent, "put", "1", "src/a.py", stdin=b"print(1)\n")
    ctl(agent, "put", "1", "top.txt", stdin=b"x" * 1234)
    ctl(agent, "exec", "1", "--", "ln -s src/a.py link; chmod 0750 src")
    r = ctl(agent, "ls", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    # list entries carry no symlink target, so every line ends with the name.
    assert [ln.split()[-1] for ln in lines] == ["link", "src", "top.txt"]
    by_name = {ln.split()[-1]: ln for ln in lines}
    assert by_name["src"].startswith("drwxr-x--- ")
    assert by_name["top.txt"].startswith("-rw-r--r-- ") and " 1234 " in by_name["top.txt"]
    assert by_name["link"].startswith("lrwxrwxrwx ")
    r = ctl(agent, "ls", "1", "-R")
    names = [ln.split()[-1] for ln in r.stdout.decode().splitlines()]
    assert names == ["link", "src", "src/a.py", "top.txt"]
    r = ctl(agent, "ls", "1", "src", "-R")
    assert r.stdout.decode().split()[-1] == "a.py"
    d = ctl_json(agent, "ls", "1", "src")
    assert [e["path"] for e in d["entries"]] == ["a.py"] and d["truncated"] is False
    assert d["entries"][0]["type"] == "file" and d["entries"][0]["size"] == 9

    r = ctl(agent, "stat", "1", "src/a.py")
    kv = kv_lines(r.stdout)
    assert kv["type"] == "file" and kv["size"] == "9" and kv["mode"].startswith("0644")
    d = ctl_json(agent, "stat", "1", "link")
    assert d["type"] == "symlink" and d["target"] == "src/a.py"
    r = ctl(agent, "stat", "1", "missing")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: ")


def test_archive_tar_gz_and_tar(agent: Agent, tmp_path: Path) -> None:
    ctl(agent, "put", "2", "src/a.py", stdin=b"print(1)\n")
    ctl(agent, "put", "2", "src/b/c.txt", stdin=b"c")
    r = ctl(agent, "archive", "2", ".")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "a.tgz"
    out.write_bytes(r.stdout)
    tar = subprocess.run(["tar", "-tzf", str(out)], capture_output=True, text=True, check=True)
    assert "./src/a.py" in tar.stdout and "./src/b/c.txt" in tar.stdout
    # Default path is the workspace.
    assert ctl(agent, "archive", "2").stdout[:2] == b"\x1f\x8b"
    r = ctl(agent, "archive", "2", "src", "--format", "tar")
    plain = tmp_path / "a.tar"
    plain.write_bytes(r.stdout)
    with tarfile.open(plain, "r:") as tf:
        names = tf.getnames()
        assert "./a.py" in names
        member = tf.extractfile("./a.py")
        assert member is not None and member.read() == b"print(1)\n"
    d = ctl_json(agent, "archive", "2", "src", "--format", "tar.gz")
    assert d["format"] == "tar.gz" and d["entries"] >= 3 and "base64" in d["data"]


def test_archive_refuses_a_terminal(agent: Agent) -> None:
    import pty
    master, slave = pty.openpty()
    try:
        r = subprocess.run([str(AGENTCTL_BIN), "--agent", f"unix:{agent.sock}", "archive", "0"],
                           stdout=slave, stderr=subprocess.PIPE, timeout=10)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 1 and b"terminal" in r.stderr


def test_reset_lease_unlease_cancel(agent: Agent) -> None:
    ctl(agent, "put", "1", "f", stdin=b"x")
    r = ctl(agent, "reset", "1")
    assert r.returncode == 0 and kv_lines(r.stdout)["slot"] == "1"
    assert ctl(agent, "ls", "1").stdout == b""
    assert ctl_json(agent, "reset", "1")["slot"] == 1

    r = ctl(agent, "lease", "2", "traj-a")
    assert r.returncode == 0 and kv_lines(r.stdout)["trajectory_id"] == "traj-a"
    r = ctl(agent, "lease", "2", "traj-b")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: slot_busy: ")
    d = ctl_json(agent, "lease", "2", "traj-a")  # idempotent
    assert d["trajectory_id"] == "traj-a" and d["slot"] == 2
    assert ctl(agent, "unlease", "2").returncode == 0
    r = ctl(agent, "unlease", "2")
    assert r.returncode == 1 and b"not_leased" in r.stderr
    assert ctl_json(agent, "lease", "2", "traj-c")["generation"] >= 2
    assert ctl_json(agent, "unlease", "2") == {"slot": 2}

    r = ctl(agent, "cancel", "424242")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: ")


def test_cancel_a_running_exec(agent: Agent) -> None:
    p = subprocess.Popen([str(AGENTCTL_BIN), "--agent", f"unix:{agent.sock}", "exec", "0", "--",
                          "echo started; sleep 60"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"started\n"
    running = ctl_json(agent, "slots")["slots"][0]["running"]
    assert len(running) == 1
    r = ctl(agent, "cancel", str(running[0]))
    assert r.returncode == 0 and kv_lines(r.stdout)["cancelled"] == "1"
    _, err = p.communicate(timeout=20)
    assert p.returncode == 137 and b"cancelled" in err


# -- transports and auth


def test_agent_cmd_over_stdio(tmpdir_short: Path) -> None:
    cmd = f"{AGENT_BIN} --stdio --slots 2 --data-dir {tmpdir_short}/d --log-level warn"
    r = run_ctl(["--agent-cmd", cmd, "exec", "1", "--", "echo stdio $SLOT_INDEX; exit 5"],
                timeout=30)
    assert (r.returncode, r.stdout) == (5, b"stdio 1\n")
    data = os.urandom(1 << 20)
    assert run_ctl(["--agent-cmd", cmd, "put", "0", "x.bin"], stdin=data).returncode == 0
    r = run_ctl(["--agent-cmd", cmd, "cat", "0", "x.bin"])
    assert r.returncode == 0 and r.stdout == data
    r = run_ctl(["--agent-cmd", cmd, "--json", "hello"])
    assert json.loads(r.stdout)["slots"] == 2
    # The agent command is reaped: nothing left running with our data dir.
    time.sleep(0.2)
    ps = subprocess.run(["pgrep", "-f", f"--data-dir {tmpdir_short}/d"], capture_output=True)
    assert ps.stdout == b""


def test_agent_cmd_that_fails(tmpdir_short: Path) -> None:
    r = run_ctl(["--agent-cmd", "echo boom >&2; exit 3", "hello"], timeout=30)
    assert r.returncode == 1
    assert b"boom" in r.stderr and b"status 3" in r.stderr


def test_address_from_env(agent: Agent) -> None:
    env = dict(os.environ, SLOT_AGENT=f"unix:{agent.sock}")
    r = run_ctl(["--json", "health"], env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True


def test_token_file_flow(agent_factory, tmp_path: Path) -> None:
    a = agent_factory(token="ctl-secret", tcp=True)
    r = ctl(a, "slots")
    assert r.returncode == 1 and b"unauthorized" in r.stderr and b"token" in r.stderr
    r = ctl(a, "hello", extra=["--token-file", a.token_file])
    assert r.returncode == 0 and kv_lines(r.stdout)["authenticated"] == "true"
    assert b"ctl-secret" not in r.stdout + r.stderr
    r = ctl(a, "exec", "0", "--", "echo ok", extra=["--token-file", a.token_file])
    assert r.returncode == 0 and r.stdout == b"ok\n"
    # TCP and the SLOT_TOKEN_FILE variable.
    env = dict(os.environ, SLOT_TOKEN_FILE=a.token_file)
    r = run_ctl(["--agent", f"tcp:127.0.0.1:{a.port}", "--json", "slots"], env=env)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["slots"]) == 4
    # A wrong token is refused and never echoed.
    bad = tmp_path / "bad"
    bad.write_text("wrong-token-value\n")
    r = ctl(a, "health", extra=["--token-file", str(bad)])
    assert r.returncode == 1 and b"unauthorized" in r.stderr
    assert b"wrong-token-value" not in r.stdout + r.stderr
    r = ctl(a, "health", extra=["--token-file", str(tmp_path / "nope")])
    assert r.returncode == 1 and b"token file" in r.stderr


# -- errors


def test_missing_agent_is_explained(tmpdir_short: Path) -> None:
    sock = f"{tmpdir_short}/none.sock"
    r = run_ctl(["--agent", f"unix:{sock}", "hello"], timeout=10)
    assert r.returncode == 1
    assert f"no agent at unix:{sock}".encode() in r.stderr
    assert f"slot-agent --listen unix:{sock}".encode() in r.stderr
    port = free_port()
    r = run_ctl(["--agent", f"tcp:127.0.0.1:{port}", "health"], timeout=10)
    assert r.returncode == 1 and b"slot-agent --listen tcp:127.0.0.1:" in r.stderr
    r = run_ctl(["--agent", "carrier-pigeon:x", "health"], timeout=10)
    assert r.returncode == 1 and b"unix:PATH or tcp:HOST:PORT" in r.stderr


def test_wait_for_a_starting_agent(tmpdir_short: Path) -> None:
    sock = f"{tmpdir_short}/late.sock"
    p = subprocess.Popen([str(AGENTCTL_BIN), "--agent", f"unix:{sock}", "--wait", "10", "--json",
                          "health"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(0.5)
    ag = subprocess.Popen([str(AGENT_BIN), "--listen", f"unix:{sock}", "--slots", "1",
                           "--data-dir", f"{tmpdir_short}/d", "--log-level", "warn"])
    try:
        out, err = p.communicate(timeout=20)
        assert p.returncode == 0, err
        assert json.loads(out)["ok"] is True
    finally:
        ag.terminate()
        ag.wait(10)


def test_agent_errors_are_code_and_message(agent: Agent) -> None:
    r = ctl(agent, "cat", "0", "../../etc/passwd")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: path_escape: ")
    r = ctl(agent, "exec", "99", "--", "true")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: unknown_slot: ")
    r = ctl(agent, "exec", "0", "--", "no-such-binary-xyz", "arg")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: not_found: ")


@pytest.mark.parametrize("args", [
    [],
    ["frobnicate"],
    ["cat", "0"],
    ["cat", "0", "a", "b"],
    ["put", "0"],
    ["exec", "0"],
    ["exec", "0", "--"],
    ["exec", "0", "true"],
    ["exec", "x", "--", "true"],
    ["exec", "-1", "--", "true"],
    ["exec", "0", "--timeout-ms", "soon", "--", "true"],
    ["exec", "0", "-e", "NOEQUALS", "--", "true"],
    ["exec", "0", "--bogus", "--", "true"],
    ["ls"],
    ["ls", "0", "a", "b"],
    ["archive", "0", ".", "--format", "zip"],
    ["lease", "0"],
    ["cancel"],
    ["cancel", "abc"],
    ["--timeout", "never", "health"],
    ["--no-such-option", "health"],
])
def test_usage_errors_exit_2(agent: Agent, args: list[str]) -> None:
    r = ctl(agent, *args)
    assert r.returncode == 2, (args, r.stderr)
    assert b"usage:" in r.stderr and r.stdout == b""


def test_usage_without_agent_and_help() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SLOT_AGENT"}
    r = run_ctl(["health"], env=env)
    assert r.returncode == 2 and b"--agent" in r.stderr
    r = run_ctl(["--help"])
    assert r.returncode == 0 and r.stdout.startswith(b"usage: agentctl") and r.stderr == b""


def test_small_max_frame_is_respected(agent_factory) -> None:
    a = agent_factory(extra=["--max-frame", str(1 << 20)])
    # A 3 MiB file built from pieces that each fit one frame; cat must then
    # read it in ranges below the agent's limit.
    data = os.urandom(3 << 20)
    piece = 768 << 10
    assert ctl(a, "put", "0", "f.bin", stdin=data[:piece]).returncode == 0
    for off in range(piece, len(data), piece):
        r = ctl(a, "exec", "0", "--stdin-file", "-", "--", "cat >> f.bin",
                stdin=data[off:off + piece])
        assert r.returncode == 0, r.stderr
    r = ctl(a, "cat", "0", "f.bin")
    assert r.returncode == 0 and r.stdout == data
    # put refuses input the agent could not take, before sending it.
    r = ctl(a, "put", "0", "big.bin", stdin=os.urandom(2 << 20))
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: too_large: ")


def test_silent_agent_times_out(tmpdir_short: Path) -> None:
    import socket
    path = f"{tmpdir_short}/mute.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    try:
        t0 = time.monotonic()
        r = run_ctl(["--agent", f"unix:{path}", "--timeout", "1", "health"], timeout=20)
        assert r.returncode == 1 and r.stderr.startswith(b"agentctl: timeout: ")
        assert time.monotonic() - t0 < 10
    finally:
        srv.close()


def test_agent_dying_mid_request(tmpdir_short: Path) -> None:
    # An agent command that answers nothing and exits: a clear error, not a hang.
    r = run_ctl(["--agent-cmd", "head -c 2 >/dev/null; exit 0", "hello"], timeout=20)
    assert r.returncode == 1 and b"agent_lost" in r.stderr
