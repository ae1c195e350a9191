"""slot-agent:latest run the documented way (its own CMD: TCP on 7070, token
file at /run/secrets/slot-token), published on a random loopback port and
driven by build/agentctl over TCP."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
from typing import Iterator

import pytest

from images_lib import AGENTCTL, CONTAINERS, IMAGE, TOKEN_PATH, hello, logs, published_port, running


class Agent:
    def __init__(self, name: str, port: int, token_file: str, bad_token_file: str) -> None:
        self.name = name
        self.addr = f"tcp:127.0.0.1:{port}"
        self.token_file = token_file
        self.bad_token_file = bad_token_file

    def ctl(self, *args: str, stdin: bytes | None = None, token_file: str | None = "",
            timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        tf = self.token_file if token_file == "" else token_file
        opts = ["--agent", self.addr] + (["--token-file", tf] if tf else [])
        env = {k: v for k, v in os.environ.items() if k not in ("SLOT_TOKEN_FILE", "SLOT_AGENT")}
        return subprocess.run([str(AGENTCTL), *opts, *args], input=stdin, capture_output=True,
                              timeout=timeout, env=env)


@pytest.fixture(scope="module")
def agent(images, tokens) -> Iterator[Agent]:
    token_file, token, bad = tokens
    name = CONTAINERS.run("slot-img-ctl", "-p", "127.0.0.1::7070",
                          "-v", f"{token_file}:{TOKEN_PATH}:ro", IMAGE)
    try:
        port = published_port(name)
        c, _ = hello(port, token, timeout=30, alive=lambda: running(name))
        c.close()
        yield Agent(name, port, str(token_file), str(bad))
        assert running(name), logs(name)[-3000:]
    finally:
        CONTAINERS.rm(name)


def test_hello_over_tcp_with_token(agent: Agent) -> None:
    r = agent.ctl("hello")
    assert r.returncode == 0, r.stderr
    assert b"authenticated: true" in r.stdout and b"auth_required: true" in r.stdout
    assert b"slots: 10" in r.stdout


def test_wrong_or_missing_token_refused(agent: Agent) -> None:
    r = agent.ctl("hello", token_file=agent.bad_token_file)
    assert r.returncode == 1 and b"unauthorized" in r.stderr, r
    r = agent.ctl("exec", "0", "--", "true", token_file=agent.bad_token_file)
    assert r.returncode == 1 and b"unauthorized" in r.stderr, r
    r = agent.ctl("exec", "0", "--", "true", token_file=None)
    assert r.returncode == 1 and b"token" in r.stderr, r
    # and the agent still serves the right token
    assert agent.ctl("exec", "0", "--", "true").returncode == 0


def test_exec(agent: Agent) -> None:
    r = agent.ctl("exec", "0", "--", "echo hi from $SLOT_INDEX; id -u; pwd; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout.split() == [b"hi", b"from", b"0", b"20000", b"/data/slots/0/work"]
    # an argv, with the base image's tools
    r = agent.ctl("exec", "1", "--", "python3", "-c", "print(6*7)")
    assert r.returncode == 0 and r.stdout == b"42\n", r
    r = agent.ctl("exec", "1", "--", "git init -q . && git status --short && echo git ok")
    assert r.returncode == 0 and r.stdout.endswith(b"git ok\n"), r
    r = agent.ctl("exec", "2", "--timeout-ms", "500", "--", "sleep 1000 & sleep 30")
    assert r.returncode == 124


def test_files_put_cat_ls(agent: Agent) -> None:
    data = bytes(range(256)) * 4096 + b"\x00end"
    r = agent.ctl("put", "3", "deep/dir/blob.bin", stdin=data)
    assert r.returncode == 0, r.stderr
    r = agent.ctl("cat", "3", "deep/dir/blob.bin")
    assert r.returncode == 0 and r.stdout == data
    r = agent.ctl("ls", "3", "-R")
    assert r.returncode == 0 and b"blob.bin" in r.stdout, r.stdout
    # the file is the slot's, seen by its commands
    r = agent.ctl("exec", "3", "--", "wc -c < deep/dir/blob.bin")
    assert r.stdout.strip() == str(len(data)).encode()
    # and cannot leave the workspace
    r = agent.ctl("put", "3", "../../escape.txt", stdin=b"x")
    assert r.returncode == 1


def test_archive(agent: Agent) -> None:
    assert agent.ctl("put", "4", "src/a.py", stdin=b"print(1)\n").returncode == 0
    assert agent.ctl("put", "4", "src/b/c.txt", stdin=b"c").returncode == 0
    r = agent.ctl("archive", "4", ".", "--format", "tar.gz")
    assert r.returncode == 0, r.stderr
    with tarfile.open(fileobj=io.BytesIO(r.stdout), mode="r:gz") as t:
        names = {m.name.lstrip("./").rstrip("/") for m in t.getmembers()}
        assert {"src/a.py", "src/b/c.txt"} <= names, names
        assert t.extractfile([m for m in t.getmembers() if m.name.endswith("a.py")][0]) \
            .read() == b"print(1)\n"  # type: ignore[union-attr]
    r = agent.ctl("reset", "4")
    assert r.returncode == 0
    r = agent.ctl("ls", "4")
    assert b"src" not in r.stdout
