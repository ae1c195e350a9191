"""agentctl against a real agent: every command, human and --json output,
exit codes, streaming, --agent-cmd and tokens."""
from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

from conftest import AGENT_BIN, AGENTCTL_BIN


def ctl(agent, *args: str, stdin: bytes | None = None, extra: list[str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [str(AGENTCTL_BIN), "--agent", f"unix:{agent.sock}"] + (extra or []) + list(args)
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def test_hello_health_stats_slots(agent) -> None:
    r = ctl(agent, "hello")
    assert r.returncode == 0 and b"protocol: 1" in r.stdout and b"containment: true" in r.stdout
    r = ctl(agent, "--json", "hello")
    assert json.loads(r.stdout)["slots"] == 4
    assert ctl(agent, "health").returncode == 0
    assert json.loads(ctl(agent, "--json", "stats").stdout)["exec"]["started"] == 0
    r = ctl(agent, "slots")
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["SLOT", "STATE", "LEASE"] and len(lines) == 5


def test_exec_streams_and_propagates_exit_code(agent) -> None:
    r = ctl(agent, "exec", "0", "--", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out\n", b"err\n")
    r = ctl(agent, "exec", "0", "--", "printf", "%s-", "a b", "c")
    assert r.stdout == b"a b-c-"
    r = ctl(agent, "exec", "0", "--timeout-ms", "300", "--", "sleep 10")
    assert r.returncode == 124 and b"timed out" in r.stderr
    r = ctl(agent, "exec", "0", "-e", "FOO=bar", "--", "echo $FOO")
    assert r.stdout == b"bar\n"
    r = ctl(agent, "exec", "0", "--stdin-file", "-", "--", "wc -c", stdin=b"12345")
    assert r.stdout.strip() == b"5"
    r = ctl(agent, "--json", "exec", "1", "--", "echo hi")
    d = json.loads(r.stdout)
    assert d["stdout"] == "hi\n" and d["exit_code"] == 0
    r = ctl(agent, "exec", "0", "--", "kill -9 $$")
    assert r.returncode == 137


def test_put_cat_round_trip_binary(agent) -> None:
    data = os.urandom(3 << 20)
    r = ctl(agent, "put", "0", "dir/blob.bin", stdin=data)
    assert r.returncode == 0 and b"wrote dir/blob.bin" in r.stdout
    r = ctl(agent, "cat", "0", "dir/blob.bin")
    assert r.returncode == 0 and r.stdout == data


def test_ls_stat_archive_reset(agent, tmp_path: Path) -> None:
    ctl(agent, "put", "1", "src/a.py", stdin=b"print(1)\n")
    r = ctl(agent, "ls", "1", "-R")
    assert b"src/a.py" in r.stdout and r.stdout.startswith(b"d")
    r = ctl(agent, "--json", "ls", "1", "src")
    assert [e["path"] for e in json.loads(r.stdout)["entries"]] == ["a.py"]
    assert b"src/a.py" not in ctl(agent, "stat", "1", "src/a.py").stderr
    r = ctl(agent, "archive", "1", ".")
    out = tmp_path / "a.tgz"
    out.write_bytes(r.stdout)
    assert "./src/a.py" in tarfile.open(out).getnames()
    tar = subprocess.run(["tar", "-tzf", str(out)], capture_output=True, text=True, check=True)
    assert "./src/a.py" in tar.stdout
    assert ctl(agent, "reset", "1").returncode == 0
    assert ctl(agent, "ls", "1").stdout == b""


def test_lease_unlease_cancel(agent) -> None:
    assert ctl(agent, "lease", "2", "traj").returncode == 0
    r = ctl(agent, "lease", "2", "other")
    assert r.returncode == 1 and b"slot_busy" in r.stderr
    assert b"traj" in ctl(agent, "slots").stdout
    assert ctl(agent, "unlease", "2").returncode == 0
    r = ctl(agent, "cancel", "424242")
    assert r.returncode == 1 and b"not_found" in r.stderr


def test_errors_and_usage(agent, tmpdir_short) -> None:
    r = ctl(agent, "cat", "0", "../../etc/passwd")
    assert r.returncode == 1 and r.stderr.startswith(b"agentctl: path_escape")
    assert ctl(agent, "frobnicate").returncode == 2
    assert ctl(agent, "cat", "0").returncode == 2
    assert ctl(agent, "exec", "0").returncode == 2
    assert ctl(agent, "exec", "x", "--", "true").returncode == 2
    r = subprocess.run([str(AGENTCTL_BIN), "--agent", f"unix:{tmpdir_short}/none.sock", "hello"],
                       capture_output=True, timeout=10)
    assert r.returncode == 1 and b"slot-agent --listen" in r.stderr
    r = subprocess.run([str(AGENTCTL_BIN), "--help"], capture_output=True, timeout=10)
    assert r.returncode == 0 and b"usage" in r.stdout


def test_agent_cmd_over_stdio(tmpdir_short) -> None:
    cmd = f"{AGENT_BIN} --stdio --slots 2 --data-dir {tmpdir_short}/d"
    r = subprocess.run([str(AGENTCTL_BIN), "--agent-cmd", cmd, "exec", "1", "--",
                        "echo stdio $SLOT_INDEX"], capture_output=True, timeout=30)
    assert r.returncode == 0 and r.stdout == b"stdio 1\n"


def test_token_file(agent_factory) -> None:
    a = agent_factory(token="ctl-secret")
    r = ctl(a, "slots")
    assert r.returncode == 1 and b"unauthorized" in r.stderr
    r = ctl(a, "hello", extra=["--token-file", a.token_file])
    assert r.returncode == 0 and b"authenticated: true" in r.stdout
    assert b"ctl-secret" not in r.stdout + r.stderr
