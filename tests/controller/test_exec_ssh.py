"""The `exec` backend over ssh: a private sshd on loopback (its own host
key, config and authorized key, started and stopped by the test), and agents
launched with `ssh HOST slot-agent --stdio`. The example trainer runs to
completion through it; a killed ssh client fails only its agent's requests.
In the daemon form (`start` leaves `slot-agent --listen unix:...` behind
through ssh, `launch` is `ssh HOST slot-agent --attach unix:...`) a killed
ssh client loses nothing: the controller reconnects through a new ssh."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import AGENT_BIN, ROOT
from linkdrop import N, run_and_drop_timed

SSHD = "/usr/sbin/sshd"
PY = "/usr/bin/python3"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    if os.geteuid() != 0:
        pytest.fail("the ssh test runs a private sshd and logs in as root: run it as root")
    if not (os.path.exists(SSHD) and shutil.which("ssh")):
        pytest.fail("openssh-server and openssh-client are needed (make deps installs them)")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                       check=True, timeout=30)
    (d / "authorized_keys").write_text((d / "client.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "AcceptEnv SLOT_*\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation dir
    log = open(d / "sshd.log", "wb")
    p = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log,
                         stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                assert p.poll() is None, (d / "sshd.log").read_text()
                assert time.monotonic() < deadline, "sshd did not listen within 15 s"
                time.sleep(0.05)
        yield port, d / "client"
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        log.close()


def ssh_argv(port: int, key: Path) -> list[str]:
    return ["ssh", "-T", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "SendEnv=SLOT_AGENT_TOKEN", "root@127.0.0.1"]


def ssh_launch(port: int, key: Path) -> list[str]:
    return [*ssh_argv(port, key),
            str(AGENT_BIN), "--stdio", "--slots", "{slots}", "--data-dir", "{data_dir}"]


def ssh_sh(port: int, key: Path, script: str, *args: str) -> list[str]:
    """`sh -c SCRIPT ARGS...` on the ssh host: one command line for its shell."""
    return [*ssh_argv(port, key), " ".join(["sh", "-c", shlex.quote(script), *args])]


def ssh_daemon(port: int, key: Path) -> dict:
    """test_reconnect.py's daemon profile, each command through ssh: the agent
    daemon (its token passed by SendEnv/AcceptEnv into a 0600 file) on a Unix
    socket on the ssh host, the stream an `--attach` relay there."""
    sock = "unix:{state_dir}/exec/{agent_id}.sock"
    return {
        "start": ssh_sh(port, key,
                        'mkdir -p "$1" && (umask 077; printf %s "$SLOT_AGENT_TOKEN" > "$1/$2.tok")'
                        ' || exit 1; setsid "$0" --listen "$5" --token-file "$1/$2.tok" '
                        '--slots "$3" --data-dir "$4" </dev/null >>"$1/$2.log" 2>&1 & '
                        'echo $! > "$1/$2.pid"',
                        str(AGENT_BIN), "{state_dir}/exec", "{agent_id}", "{slots}",
                        "{data_dir}", sock),
        "launch": [*ssh_argv(port, key), str(AGENT_BIN), "--attach", sock],
        "stop": ssh_sh(port, key, 'kill $(cat "$0/$1.pid") 2>/dev/null; '
                       'rm -f "$0/$1.pid" "$0/$1.sock"', "{state_dir}/exec", "{agent_id}"),
        "list": ssh_sh(port, key, 'cd "$0" 2>/dev/null || exit 0; for f in *.pid; do '
                       '[ -e "$f" ] || continue; kill -0 $(cat "$f") 2>/dev/null && '
                       'echo "${f%.pid}"; done; exit 0', "{state_dir}/exec"),
    }


def config(launch: list[str] | dict, **fields) -> str:
    ex = launch if isinstance(launch, dict) else {"launch": launch}
    prof = {"backend": "exec", "slots_per_agent": 4, "min_agents": 2, "max_agents": 2,
            **fields, "exec": ex}
    return json.dumps({"profiles": {"ssh": prof}})


def test_example_trainer_over_ssh(controller_factory, sshd) -> None:
    port, key = sshd
    ctl = controller_factory(config(ssh_launch(port, key)), wait_ready=False)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=30)
    c = ctl.client()
    addrs = [a["address"] for a in c.call("agents")["agents"]]
    assert all(a.startswith("exec:ssh -T") for a in addrs), addrs
    c.close()
    r = subprocess.run([PY, str(ROOT / "controller/python/examples/trainer.py"), "--address",
                        ctl.addr, "--profile", "ssh", "--trajectories", "16", "--concurrency",
                        "8", "--steps", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "errors:        0" in r.stdout


def test_killed_ssh_client_fails_only_its_agents_requests(controller_factory, sshd) -> None:
    port, key = sshd
    ctl = controller_factory(config(ssh_launch(port, key), slots_per_agent=2),
                             wait_ready=False)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=30)
    c = ctl.client()
    slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    pids = {a["id"]: a["pid"] for a in c.call("agents")["agents"]}
    victim = slots[0].split("/")[0]
    rid = c.send("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "sleep 1.5; echo done"}} for s in slots]})
    time.sleep(0.5)
    os.kill(pids[victim], signal.SIGKILL)  # the local ssh client
    res = c.wait(rid, timeout=30)[0]["result"]["results"]
    for s, x in zip(slots, res):
        if s.startswith(victim + "/"):
            assert x["error"]["code"] == "agent_lost", x
        else:
            assert x["ok"] and x["result"]["stdout"] == b"done\n", x
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=30)
    c.close()


def test_refused_login_is_reported_with_ssh_words(controller_factory, sshd, tmp_path) -> None:
    port, _ = sshd
    other = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)],
                   check=True, timeout=30)
    ctl = controller_factory(config(ssh_launch(port, other), min_agents=1), wait_ready=False)
    c = ctl.client()
    r = c.call_raw("acquire", {"timeout_ms": 5000})
    assert r["error"]["code"] == "no_capacity"
    assert "Permission denied (publickey)" in r["error"]["message"], r
    c.close()


def test_killed_ssh_relay_mid_stream_loses_nothing(controller_factory, sshd) -> None:
    """The daemon form: N streamed commands running, the local ssh client of
    the stream killed (the agent's `pid`); every command completes once with
    byte-exact output, the leases stay, the agent is the same and
    reconnected. Prints the time to the first resumed output byte."""
    port, key = sshd
    ctl = controller_factory(config(ssh_daemon(port, key), slots_per_agent=N, min_agents=1,
                                    max_agents=1), wait_ready=False)
    ctl.wait_agents(lambda st: st["agents"]["ready"] == 1, timeout=30)
    c = ctl.client()
    a = c.call("agents")["agents"][0]
    assert a["address"].startswith("exec:ssh -T"), a
    assert Path(f"/proc/{a['pid']}/exe").resolve().name == "ssh", a
    r = run_and_drop_timed(c, lambda: os.kill(a["pid"], signal.SIGKILL), a["id"], "exec-ssh")
    b = r["agent"]
    assert b["pid"] != a["pid"] and "killed by signal 9" in b["link_cause"], b
    c.close()
