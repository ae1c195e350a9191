"""The controller's nomad backend against a real Nomad 1.6.3 dev agent
(built from the Go module proxy by build-nomad.sh, started and stopped by
nomad-dev.sh for this session, docker and raw_exec drivers): agents as one
job each from the templates in nomad/, reached over TLS (certificates from
the controller's CA, checked by agent id) with their token;
scaling that never stops a leased agent; a controller kill -9 and restart;
an allocation stopped under a running batch; the controller's TCP
connection to an agent reset mid-stream (reconnected, nothing lost); and the
errors people meet, in Nomad's own words."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ctl_conftest",
                                               ROOT / "tests" / "controller" / "conftest.py")
assert _spec and _spec.loader
ctl_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ctl_conftest)
Controller = ctl_conftest.Controller
_spec = importlib.util.spec_from_file_location("linkdrop",
                                               ROOT / "tests" / "controller" / "linkdrop.py")
assert _spec and _spec.loader
linkdrop = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(linkdrop)
AGENT_BIN = ctl_conftest.AGENT_BIN
AGENTCTL = ctl_conftest.AGENTCTL_BIN


def free_base_port() -> int:
    """A port p with p, p+1, p+2 free (HTTP, RPC, serf)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 60000:
            continue
        ok = True
        for q in (p + 1, p + 2):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", q))
                except OSError:
                    ok = False
        if ok:
            return p
    raise RuntimeError("no three free ports in a row")


class Nomad:
    """Nomad's HTTP API as the tests use it (with the CA and token of an
    agent that has TLS or ACLs on)."""

    def __init__(self, addr: str, token: str | None = None, cacert: str | None = None,
                 dir: Path | None = None) -> None:
        self.addr = addr
        self.token = token
        self.cacert = cacert
        self.dir = dir

    def _open(self, path: str, method: str = "GET", body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.addr + path, data=body, method=method)
        if self.token:
            req.add_header("X-Nomad-Token", self.token)
        ctx = ssl.create_default_context(cafile=self.cacert) if self.cacert else None
        return urllib.request.urlopen(req, timeout=30, context=ctx)

    def get(self, path: str) -> Any:
        with self._open(path) as r:
            return json.loads(r.read())

    def status(self, path: str) -> int:
        try:
            with self._open(path) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def post(self, path: str, body: dict | None = None) -> Any:
        with self._open(path, "POST", json.dumps(body or {}).encode()) as r:
            return json.loads(r.read())

    def delete(self, path: str) -> None:
        self._open(path, "DELETE").close()

    def jobs(self, prefix: str = "slot-") -> list[dict]:
        return [j for j in self.get(f"/v1/jobs?prefix={prefix}") if not j.get("Stop")]

    def purge_all(self, prefix: str = "slot-") -> None:
        for j in self.get(f"/v1/jobs?prefix={prefix}"):
            self.delete(f"/v1/job/{j['ID']}?purge=true")


def start_nomad(**env_extra: str) -> tuple[Nomad, Path, dict[str, str]]:
    """A Nomad agent from nomad-dev.sh on free ports; NOMAD_DEV_* in env_extra."""
    d = Path(tempfile.mkdtemp(prefix="slot-nomad-", dir="/var/tmp"))
    port = free_base_port()
    env = dict(os.environ, NOMAD_DEV_HTTP_PORT=str(port), **env_extra)
    r = subprocess.run([str(HERE / "nomad-dev.sh"), "start", str(d)], capture_output=True,
                       text=True, timeout=1800, env=env)
    if r.returncode != 0:
        subprocess.run(["rm", "-rf", str(d)], timeout=120)
        pytest.fail(f"nomad-dev.sh start failed:\n{r.stderr[-3000:]}")
    kv = dict(line.split("=", 1) for line in (d / "env").read_text().splitlines() if "=" in line)
    return Nomad(kv["NOMAD_ADDR"], kv.get("NOMAD_TOKEN"), kv.get("NOMAD_CACERT"), d), d, env


def stop_nomad(d: Path, env: dict[str, str]) -> None:
    s = subprocess.run([str(HERE / "nomad-dev.sh"), "stop", str(d)], capture_output=True,
                       text=True, timeout=300, env=env)
    subprocess.run(["rm", "-rf", str(d)], timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]


@pytest.fixture(scope="module")
def nomad() -> Iterator[Nomad]:
    n, d, env = start_nomad()
    try:
        yield n
    finally:
        stop_nomad(d, env)


@pytest.fixture(scope="module")
def docker_image() -> str:
    """slot-agent:dev (a `latest` tag would make Nomad pull)."""
    r = subprocess.run(["docker", "image", "inspect", "slot-agent:latest"], capture_output=True,
                       timeout=60)
    if r.returncode != 0:
        b = subprocess.run([str(ROOT / "images" / "build.sh"), "docker"], capture_output=True,
                           text=True, timeout=3600)
        assert b.returncode == 0, b.stderr[-3000:]
    subprocess.run(["docker", "tag", "slot-agent:latest", "slot-agent:dev"], check=True,
                   timeout=60)
    return "slot-agent:dev"


@pytest.fixture
def controllers(nomad) -> Iterator[list]:
    made: list = []
    tmp = Path(tempfile.mkdtemp(prefix="sn-", dir="/tmp"))
    yield [tmp, made]  # type: ignore[misc]
    for c in made:
        if c.proc and c.proc.poll() is None:
            c.stop()
        log = c.log()
        assert "Sanitizer" not in log and "runtime error:" not in log, log[-3000:]
    # every job the tests made goes, whatever happened
    nomad.purge_all()
    subprocess.run(["rm", "-rf", str(tmp)], timeout=60)


def make(controllers, nomad: Nomad, job: str, name: str = "raw", wait: bool = True,
         addr: str | None = None, **fields) -> Any:
    tmp, made = controllers
    prof: dict[str, Any] = {"backend": "nomad", "slots_per_agent": 2, "min_agents": 1,
                            "max_agents": 3, "start_timeout": "60s", **fields}
    nomad_block = {"addr": addr or nomad.addr, "job": str(ROOT / "nomad" / job)}
    if "docker" not in job:
        nomad_block["vars"] = {"agent_bin": str(AGENT_BIN)}
    nomad_block.update(prof.pop("nomad_extra", {}))
    prof["nomad"] = nomad_block
    d = tmp / f"c{len(made)}"
    d.mkdir()
    c = Controller(d, json.dumps({"profiles": {name: prof}}), wait_ready=False)
    made.append(c)
    if wait:
        c.wait_agents(lambda st: st["agents"]["ready"] >= prof["min_agents"], timeout=90)
    return c


def agents(c) -> list[dict]:
    cl = c.client()
    try:
        return cl.call("agents")["agents"]
    finally:
        cl.close()


def test_raw_exec_agents_are_jobs_with_tokens(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl")
    cl = c.client()
    s = [cl.call("acquire", {"trajectory_id": f"t{i}", "timeout_ms": 60000})["slot"]
         for i in range(3)]
    r = cl.call("exec", {"slot": s[2], "tool": "bash", "args": {"command": "echo hi; id -u"}})
    assert r["stdout"] == b"hi\n20000\n"
    ags = agents(c)
    assert len(ags) == 2 and all(a["address"].startswith("tls:127.0.0.1:") for a in ags)
    # what was said while waiting for Nomad is gone once the agent is ready
    assert all(not a.get("error") for a in ags), ags
    jobs = nomad.jobs()
    assert len(jobs) == 2
    for j in jobs:
        full = nomad.get(f"/v1/job/{j['ID']}")
        assert full["Meta"]["slot_controller"] == "slot-controller@" + os.uname().nodename \
            or full["Meta"]["slot_controller"].startswith("slot-controller")
        assert full["TaskGroups"][0]["Count"] == 1
    # the agents demand the token too: a client with a certificate of the
    # controller's CA but without the token is refused
    r = agent_call_tls(c, ags[0], "exec", {"slot": 0, "command": "true"})
    assert r["error"]["code"] == "unauthorized", r
    # the token is in no log and no answer
    secret = (c.state_dir / "nomad-secret").read_text()
    assert secret not in c.log()
    cl.close()


def agent_tls(c, agent: dict, cert: str = "controller") -> ssl.SSLSocket:
    """A TLS connection to a Nomad agent's port, as the controller's CA
    allows (STATE/tls/CERT.pem), checking the agent's name."""
    host, port = agent["address"].split()[0].split(":", 1)[1].rsplit(":", 1)
    tls = c.state_dir / "tls"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(str(tls / "ca.pem"))
    ctx.load_cert_chain(str(tls / f"{cert}.pem"), str(tls / f"{cert}.key"))
    raw = socket.create_connection((host, int(port)), timeout=30)
    return ctx.wrap_socket(raw, server_hostname=agent["id"])


def agent_call_tls(c, agent: dict, op: str, args: dict) -> dict:
    import msgpack
    import struct
    with agent_tls(c, agent) as s:
        body = msgpack.packb({"id": 1, "op": op, "args": args})
        s.sendall(struct.pack(">I", len(body)) + body)
        buf = b""
        while len(buf) < 4 or len(buf) < 4 + struct.unpack(">I", buf[:4])[0]:
            chunk = s.recv(65536)
            assert chunk, "the agent closed the connection"
            buf += chunk
        return msgpack.unpackb(buf[4:4 + struct.unpack(">I", buf[:4])[0]], raw=False)


def test_links_to_agents_are_tls(controllers, nomad) -> None:
    """The shipped template's agent listens on tls: with the certificate the
    controller issued it (CN = its id): a plaintext client gets no answer, a
    TLS client checking the agent's name against the controller's CA is
    served (TLS 1.3), and the controller reports the certificate's end."""
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", max_agents=1)
    a = agents(c)[0]
    assert a["address"].startswith("tls:"), a
    host, port = a["address"].split()[0].split(":", 1)[1].rsplit(":", 1)
    import msgpack
    import struct
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        body = msgpack.packb({"id": 1, "op": "hello", "args": {}})
        raw.sendall(struct.pack(">I", len(body)) + body)
        raw.settimeout(10)
        got = b""
        try:
            while chunk := raw.recv(4096):
                got += chunk
        except (ConnectionResetError, socket.timeout):
            pass
        assert b"instance" not in got, got
    with agent_tls(c, a) as s:
        assert s.version() == "TLSv1.3"
        subject = dict(x[0] for x in s.getpeercert()["subject"])
        assert subject["commonName"] == a["id"]
    if "tls_not_after" in a:
        assert a["tls_not_after"] > time.time() + 3600, a
    # the certificate and key travelled as job variables, not in any log
    assert "BEGIN" not in c.log() and "PRIVATE KEY" not in c.log()
    cl = c.client()
    s = cl.call("acquire", {"trajectory_id": "t", "timeout_ms": 60000})["slot"]
    r = cl.call("exec", {"slot": s, "tool": "bash", "args": {"command": "echo tls"}})
    assert r["stdout"] == b"tls\n"
    cl.close()


def test_scale_down_deregisters_only_idle_agents(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", min_agents=0, idle_timeout="1s",
             wait=False)
    cl = c.client()
    s = [cl.call("acquire", {"trajectory_id": f"t{i}", "timeout_ms": 60000})["slot"]
         for i in range(3)]
    by_agent: dict[str, list[str]] = {}
    for h in s:
        by_agent.setdefault(h.split("/")[0], []).append(h)
    assert len(by_agent) == 2
    keep = next(a for a, hs in by_agent.items() if len(hs) == 2)
    gone = next(a for a in by_agent if a != keep)
    cl.call("release", {"slot": by_agent[gone][0]})
    c.wait_agents(lambda st: st["agents"]["total"] == 1, timeout=60)
    # the agent is gone from the pool at once; its job goes when Nomad
    # answers the (asynchronous) deregister
    deadline = time.monotonic() + 30
    while True:
        ids = {j["ID"] for j in nomad.jobs()}
        if not any(i.endswith(gone.split("-")[-1]) for i in ids) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(i.endswith(keep.split("-")[-1]) for i in ids)
    assert not any(i.endswith(gone.split("-")[-1]) for i in ids)
    # purged, not just stopped
    assert all(nomad.status(f"/v1/job/{i}") in (200,) for i in ids)
    r = cl.call("exec", {"slot": by_agent[keep][0], "tool": "bash",
                         "args": {"command": "echo still"}})
    assert r["stdout"] == b"still\n"
    cl.close()


def test_controller_kill9_and_restart_reattach(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", min_agents=2)
    cl = c.client()
    s = [cl.call("acquire", {"trajectory_id": f"traj-{i}"})["slot"] for i in range(3)]
    for i, h in enumerate(s):
        cl.call("exec", {"slot": h, "tool": "bash", "args": {"command": f"echo {i} > f"}})
    cl.send("exec", {"slot": s[0], "tool": "bash", "args": {"command": "sleep 2; echo bg > g"}})
    time.sleep(0.3)
    jobs_before = {j["ID"] for j in nomad.jobs()}
    c.kill9()
    cl.close()
    c.expect_clean_exit = True
    c.start(wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2 and st["slots"]["leased"] == 3,
                  timeout=60)
    assert {j["ID"] for j in nomad.jobs()} == jobs_before
    assert all(a["reattached"] for a in agents(c))
    cl = c.client()
    ctl_conftest.assert_leases_and_files(cl, s, "f")
    time.sleep(2)
    r = cl.call("exec", {"slot": s[0], "tool": "bash", "args": {"command": "cat g"}})
    assert r["stdout"] == b"bg\n"
    cl.close()


def test_agent_killed_under_nomad_fails_only_its_requests(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", min_agents=2, max_agents=2)
    cl = c.client()
    s = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    victim = s[0].split("/")[0]
    addr = next(a["address"] for a in agents(c) if a["id"] == victim)
    alloc8 = addr.split("alloc ")[1].rstrip(")")
    job = next(j["ID"] for j in nomad.jobs() if j["ID"].endswith(victim.split("-")[-1]))
    alloc = next(a for a in nomad.get(f"/v1/job/{job}/allocations")
                 if a["ID"].startswith(alloc8))
    # the agent dies under Nomad (raw_exec: a host process of that allocation)
    pids = subprocess.run(["pgrep", "-f", f"alloc/{alloc['ID']}/"], capture_output=True,
                          text=True, timeout=30).stdout.split()
    agent_pids = [p for p in pids
                  if Path(f"/proc/{p}/exe").resolve() == AGENT_BIN.resolve()]
    assert agent_pids, pids
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash", "args": {"command": "sleep 6; echo done"}} for h in s]})
    time.sleep(0.5)
    for p in agent_pids:
        os.kill(int(p), 9)
    res = cl.wait(rid, timeout=60)[0]["result"]["results"]
    ctl_conftest.assert_only_victim_lost(s, res, victim)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2
                  and victim not in {a["id"] for a in agents(c)}, timeout=90)
    cl.close()


def reset_tcp(c, agent: dict) -> str:
    """Resets the controller's TCP connection to the agent, as a network
    failure would: `ss -K` destroys the controller's socket (it gets
    ECONNABORTED, the agent an RST). A kernel without socket destroy
    (CONFIG_INET_DIAG_DESTROY) kills nothing: then `agentctl reconnect`
    (the controller shuts the stream down both ways). Returns which."""
    hostport = agent["address"].split()[0].split(":", 1)[1]
    host, port = hostport.rsplit(":", 1)
    r = subprocess.run(["ss", "-K", "-t", "dst", host, "dport", "=", port],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 0 and f":{port}" in r.stdout:
        return "ss -K"
    out = subprocess.run([str(AGENTCTL), "--controller", c.addr, "reconnect", agent["id"]],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "reconnecting" in out.stdout, (r, out)
    return f"agentctl reconnect (ss -K killed nothing: {r.returncode} {r.stdout!r} {r.stderr!r})"


def test_tcp_connection_reset_mid_stream_loses_nothing(controllers, nomad) -> None:
    """32 streamed commands running on a raw_exec agent, the controller's TCP
    connection to it reset (reset_tcp: `ss -K`, else `agentctl reconnect`);
    the allocation still runs, so the controller opens a new connection and
    resends: every command completes once with byte-exact output, the leases
    stay, the agent is the same and reconnected. Prints the time to the
    first resumed output byte."""
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", slots_per_agent=linkdrop.N,
             min_agents=1, max_agents=1)
    cl = c.client()
    a = cl.call("agents")["agents"][0]
    assert a["address"].startswith("tls:127.0.0.1:"), a
    how: list[str] = []
    r = linkdrop.run_and_drop_timed(cl, lambda: how.append(reset_tcp(c, a)), a["id"], "nomad")
    print(f"nomad: the connection was reset by {how[0]}")
    assert r["agent"]["link_cause"], r["agent"]
    assert {j["ID"] for j in nomad.jobs()} and len(nomad.jobs()) == 1
    cl.close()


def test_docker_driver(controllers, nomad, docker_image) -> None:
    c = make(controllers, nomad, "slot-agent-docker.nomad.hcl", name="dock", image=docker_image,
             cpu=0.2, memory="256M")
    cl = c.client()
    h = cl.call("acquire", {"trajectory_id": "d"})["slot"]
    r = cl.call("exec", {"slot": h, "tool": "bash",
                         "args": {"command": "head -1 /etc/os-release; pwd"}})
    assert r["exit_code"] == 0 and b"Debian" in r["stdout"], r
    job = nomad.jobs()[0]
    full = nomad.get(f"/v1/job/{job['ID']}")
    res = full["TaskGroups"][0]["Tasks"][0]["Resources"]
    assert res["CPU"] == 200 and res["MemoryMB"] == 256
    cl.close()


# ---- errors ------------------------------------------------------------------


def no_capacity(c, timeout_ms: int = 20000) -> str:
    cl = c.client(timeout=timeout_ms / 1000 + 30)
    try:
        r = cl.call_raw("acquire", {"timeout_ms": timeout_ms}, timeout=timeout_ms / 1000 + 30)
        assert r["error"]["code"] == "no_capacity", r
        return r["error"]["message"]
    finally:
        cl.close()


def test_unreachable_nomad(controllers, nomad) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", wait=False,
             addr=f"http://127.0.0.1:{port}")
    msg = no_capacity(c, 8000)
    assert f"Nomad unreachable at http://127.0.0.1:{port}" in msg, msg


def test_template_nomad_refuses(controllers, nomad, tmp_path) -> None:
    bad = tmp_path / "bad.nomad.hcl"
    bad.write_text('job "x" {\n  group "g" {\n    task "t" {\n      driver = \n')
    c = make(controllers, nomad, str(bad), wait=False)
    msg = no_capacity(c, 8000)
    assert "parsing the job template" in msg and "HTTP" in msg, msg


def test_missing_image_shows_the_task_event(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-docker.nomad.hcl", name="dock", wait=False,
             image="slot-nosuch:dev", start_timeout="40s")
    msg = no_capacity(c, 45000)
    assert "slot-nosuch" in msg, msg


def test_driver_that_is_not_enabled(controllers, nomad, tmp_path) -> None:
    src = (ROOT / "nomad" / "slot-agent-raw.nomad.hcl").read_text()
    tpl = tmp_path / "qemu.nomad.hcl"
    tpl.write_text(src.replace('driver = "raw_exec"', 'driver = "qemu"'))
    c = make(controllers, nomad, str(tpl), wait=False)
    msg = no_capacity(c, 15000)
    assert "missing drivers" in msg, msg


def test_a_plaintext_agent_fails_the_tls_handshake_and_tls_off_reaches_it(controllers, nomad,
                                                                          tmp_path) -> None:
    """A template of one's own that keeps a plaintext `--listen tcp:` (with
    --insecure): a profile with TLS on (the default) fails the agent's start
    with the handshake's one-line reason; `tls: off` reaches it."""
    import re
    src = (ROOT / "nomad" / "slot-agent-raw.nomad.hcl").read_text()
    tpl = tmp_path / "plain.nomad.hcl"
    # plaintext, without the TLS files (their variables stay declared: an
    # empty one would wait for a Nomad Variable)
    plain = src.replace('"--listen", "tls:', '"--insecure", "--listen", "tcp:')
    plain = "".join(line for line in plain.splitlines(keepends=True) if '"--tls-' not in line)
    plain = re.sub(r"\n      template \{\n        data        = local\.tls_\w+\n.*?\n      \}\n",
                   "\n", plain, flags=re.S)
    assert plain != src and "tls.pem" not in plain and "--tls" not in plain
    tpl.write_text(plain)
    c = make(controllers, nomad, str(tpl), wait=False, start_timeout="40s", max_agents=1)
    msg = no_capacity(c, 12000)
    assert "tls handshake with tcp:127.0.0.1:" in msg and "failed: " in msg, msg
    d = make(controllers, nomad, str(tpl), name="plain", tls="off", max_agents=1)
    a = agents(d)[0]
    assert a["address"].startswith("tcp:127.0.0.1:"), a
    cl = d.client()
    s = cl.call("acquire", {"trajectory_id": "t", "timeout_ms": 60000})["slot"]
    assert cl.call("exec", {"slot": s, "tool": "bash",
                            "args": {"command": "echo plain"}})["stdout"] == b"plain\n"
    cl.close()


# ---- the example trainer, faults and scaling ---------------------------------

TRAINER = ROOT / "controller" / "python" / "examples" / "trainer.py"


def run_trainer(c, profile: str, n: int = 30, conc: int = 10) -> str:
    r = subprocess.run(["/usr/bin/python3", str(TRAINER), "--address", c.addr, "--profile",
                        profile, "--trajectories", str(n), "--concurrency", str(conc),
                        "--steps", "3"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "errors:        0" in r.stdout, r.stdout
    return r.stdout


def test_example_trainer_on_docker_3_agents_x_10_slots(controllers, nomad, docker_image) -> None:
    c = make(controllers, nomad, "slot-agent-docker.nomad.hcl", name="dock", image=docker_image,
             slots_per_agent=10, min_agents=3, max_agents=3)
    run_trainer(c, "dock")
    assert len(agents(c)) == 3 and len(nomad.jobs()) == 3


def test_example_trainer_on_raw_exec(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", slots_per_agent=10, min_agents=3,
             max_agents=3)
    run_trainer(c, "raw")


def test_example_trainer_on_apptainer_under_raw_exec(controllers, nomad) -> None:
    sys_path = str(ROOT / "tests" / "images")
    import sys
    if sys_path not in sys.path:
        sys.path.insert(0, sys_path)
    from images_lib import SIF, apptainer_root_args, ensure_apptainer  # type: ignore
    app = ensure_apptainer()
    if not Path(SIF).exists():
        b = subprocess.run([str(ROOT / "images" / "build.sh"), "sif"], capture_output=True,
                           text=True, timeout=3600, env=dict(os.environ, APPTAINER=str(app)))
        assert b.returncode == 0, b.stderr[-3000:]
    flags = json.dumps(list(apptainer_root_args()))
    c = make(controllers, nomad, "slot-agent-apptainer.nomad.hcl", name="sif",
             slots_per_agent=4, min_agents=2, max_agents=2,
             nomad_extra={"vars": {"sif": str(SIF), "apptainer": str(app),
                                   "apptainer_flags": flags}})
    out = run_trainer(c, "sif", n=12, conc=6)
    assert "trajectories:  12 (12 ok" in out


def test_docker_kill_mid_batch(controllers, nomad, docker_image) -> None:
    c = make(controllers, nomad, "slot-agent-docker.nomad.hcl", name="dock", image=docker_image,
             min_agents=2, max_agents=2)
    cl = c.client()
    s = [cl.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(4)]
    victim = s[0].split("/")[0]
    addr = next(a["address"] for a in agents(c) if a["id"] == victim)
    alloc8 = addr.split("alloc ")[1].rstrip(")")
    ids = subprocess.run(["docker", "ps", "-q", "--filter", "label=com.hashicorp.nomad.alloc_id"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    mine = [i for i in ids if subprocess.run(
        ["docker", "inspect", "-f", '{{index .Config.Labels "com.hashicorp.nomad.alloc_id"}}', i],
        capture_output=True, text=True, timeout=30).stdout.startswith(alloc8)]
    assert len(mine) == 1, (ids, alloc8)
    # the commands outlast the kill by far, however slow the docker CLI is
    rid = cl.send("batch", {"requests": [
        {"slot": h, "tool": "bash", "args": {"command": "sleep 6; echo done"}} for h in s]})
    time.sleep(0.5)
    subprocess.run(["docker", "kill", mine[0]], check=True, capture_output=True, timeout=60)
    res = cl.wait(rid, timeout=60)[0]["result"]["results"]
    ctl_conftest.assert_only_victim_lost(s, res, victim)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2
                  and victim not in {a["id"] for a in agents(c)}, timeout=120)
    cl.close()


def test_scale_up_under_waiters_and_down_to_min_keeping_leases(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", slots_per_agent=2, min_agents=1,
             max_agents=3, idle_timeout="2s")
    cl = c.client()
    rids = [cl.send("acquire", {"trajectory_id": f"w{i}", "timeout_ms": 60000})
            for i in range(6)]
    handles = [cl.wait(r, timeout=90)[0]["result"]["slot"] for r in rids]
    assert len({h.split("/")[0] for h in handles}) == 3 and len(nomad.jobs()) == 3
    keep = handles[0]
    for h in handles[1:]:
        cl.call("release", {"slot": h})
    c.wait_agents(lambda st: st["agents"]["total"] == 1, timeout=90)
    # `status` counts no stopping agent; `agents` lists them until their
    # jobs are gone: the one left serving is the one with the lease.
    assert [a["id"] for a in agents(c) if a["state"] != "stopping"] == [keep.split("/")[0]]
    deadline = time.monotonic() + 30
    while len(nomad.jobs()) > 1 and time.monotonic() < deadline:
        time.sleep(0.1)  # deregisters are answered asynchronously
    assert len(nomad.jobs()) == 1
    r = cl.call("exec", {"slot": keep, "tool": "bash", "args": {"command": "echo kept"}})
    assert r["stdout"] == b"kept\n"
    cl.close()


# ---- stop --------------------------------------------------------------------


def all_jobs(nomad: Nomad) -> dict[str, dict]:
    return {j["ID"]: j for j in nomad.get("/v1/jobs?prefix=slot-")}


def wait_allocs_done(nomad: Nomad, job_ids, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        live = [a["ID"][:8] for j in job_ids for a in nomad.get(f"/v1/job/{j}/allocations")
                if a["ClientStatus"] in ("pending", "running")]
        if not live:
            return
        assert time.monotonic() < deadline, f"allocations still running: {live}"
        time.sleep(0.5)


def test_agentctl_stop_deregisters_and_purge_purges(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", min_agents=2)
    cl = c.client()
    cl.call("acquire", {"trajectory_id": "held"})
    first = {j["ID"] for j in nomad.jobs()}
    assert len(first) == 2
    r = subprocess.run([str(AGENTCTL), "--controller", c.addr, "stop"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["stopping 2 agents (1 leased slot)", "controller stopped"]
    assert c.proc.wait(5) == 0
    cl.close()
    # stopped, not purged: `nomad job status` still shows them, dead
    jobs = all_jobs(nomad)
    assert first <= set(jobs) and all(jobs[j]["Stop"] for j in first)
    wait_allocs_done(nomad, first)
    # a new controller does not take stopped jobs back: it starts its own
    c.start(wait_ready=False)
    c.wait_agents(lambda st: st["agents"]["ready"] == 2, timeout=90)
    second = {j["ID"] for j in nomad.jobs()}
    assert len(second) == 2 and not second & first
    r = subprocess.run([str(AGENTCTL), "--controller", c.addr, "stop", "--purge"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Nomad jobs are purged" in r.stdout
    assert c.proc.wait(5) == 0
    for j in second:
        assert nomad.status(f"/v1/job/{j}") == 404
    assert all(nomad.status(f"/v1/job/{j}") == 200 for j in first)  # left as they were


def test_controller_stop_flag_cleans_up_after_a_killed_controller(controllers, nomad) -> None:
    c = make(controllers, nomad, "slot-agent-raw.nomad.hcl", min_agents=2)
    jobs = {j["ID"] for j in nomad.jobs()}
    c.kill9()
    assert {j["ID"] for j in nomad.jobs()} == jobs  # the agents outlive it
    r = subprocess.run(c.argv() + ["--stop", "--purge"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "reattaching agent" in out and "stopped every agent" in out, out
    for j in jobs:
        assert nomad.status(f"/v1/job/{j}") == 404
