#!/usr/bin/python3
"""Nomad backend figures, printed, never asserted, against a real Nomad dev
agent (tests/e2e/nomad/nomad-dev.sh; Nomad built once by build-nomad.sh).

Per driver (raw_exec with the static agent; docker with slot-agent:dev):

1. start -> first slot: from spawning slot-controller (min_agents 1) to the
   answer of an `acquire` sent as soon as its socket accepts.
2. 5 agents under load: with every slot of the first agent running a
   command, 10 acquires (5 agents x 2 slots) queue at once; the time until
   the last one is answered, i.e. until 5 new jobs are registered,
   placed, started, connected and greeted.
3. idle request rate: the controller reaches Nomad through a counting HTTP
   proxy; after the pool settles (6 agents, no leases) the requests of an
   idle window (--idle-minutes) are counted, per minute.

Usage: tests/bench/nomad.py [--build build] [--drivers raw_exec,docker]
       [--idle-minutes 2] [--json]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "e2e" / "nomad"))
sys.path.insert(0, str(ROOT / "tests" / "integration"))

from slotwire import Client  # noqa: E402
from test_nomad import start_nomad, stop_nomad  # noqa: E402


class CountingProxy:
    """HTTP/1.1 reverse proxy to Nomad that logs (time, method, path)."""

    def __init__(self, upstream: str) -> None:
        u = urlparse(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 4646
        self.log: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _any(self) -> None:
                with proxy.lock:
                    proxy.log.append((time.monotonic(), self.command, self.path))
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                up = http.client.HTTPConnection(proxy.host, proxy.port, timeout=700)
                hdrs = {k: v for k, v in self.headers.items()
                        if k.lower() not in ("host", "connection")}
                try:
                    up.request(self.command, self.path, body=body, headers=hdrs)
                    r = up.getresponse()
                    data = r.read()
                except OSError as e:
                    self.send_error(502, str(e))
                    return
                finally:
                    up.close()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # the controller cancelled a request (a watch, at stop)

        self.srv = Server(("127.0.0.1", 0), Handler)
        self.addr = f"http://127.0.0.1:{self.srv.server_address[1]}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def since(self, t: float) -> list[tuple[float, str, str]]:
        with self.lock:
            return [x for x in self.log if x[0] >= t]

    def close(self) -> None:
        self.srv.shutdown()
        self.srv.server_close()


def controller_argv(build: Path, d: Path, cfg: dict) -> list[str]:
    (d / "c.yaml").write_text(json.dumps(cfg))
    return [str(build / "slot-controller"), "--config", str(d / "c.yaml"), "--listen",
            f"unix:{d}/ctl.sock", "--state-dir", str(d / "state"), "--agent-bin",
            str(build / "slot-agent"), "--log-level", "info", "--name", f"bench-{d.name}"]


def connect(sock: str, deadline: float) -> Client:
    while True:
        try:
            return Client.unix(sock, 300)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def ensure_docker_image() -> str:
    r = subprocess.run(["docker", "image", "inspect", "slot-agent:latest"], capture_output=True)
    if r.returncode != 0:
        subprocess.run([str(ROOT / "images" / "build.sh"), "docker"], check=True)
    subprocess.run(["docker", "tag", "slot-agent:latest", "slot-agent:dev"], check=True)
    return "slot-agent:dev"


def run_driver(build: Path, driver: str, proxy: CountingProxy, idle_min: float) -> dict:
    d = Path(tempfile.mkdtemp(prefix="bn-", dir="/tmp"))
    prof: dict[str, Any] = {"backend": "nomad", "slots_per_agent": 2, "min_agents": 1,
                            "max_agents": 6, "idle_timeout": "1h", "start_timeout": "120s",
                            "max_starts_per_second": 10}
    if driver == "docker":
        prof["image"] = ensure_docker_image()
        prof["nomad"] = {"addr": proxy.addr, "job": str(ROOT / "nomad" /
                                                        "slot-agent-docker.nomad.hcl")}
    else:
        prof["nomad"] = {"addr": proxy.addr, "job": str(ROOT / "nomad" /
                                                        "slot-agent-raw.nomad.hcl"),
                         "vars": {"agent_bin": str(build / "slot-agent")}}
    argv = controller_argv(build, d, {"profiles": {"b": prof}})
    log = open(d / "ctl.log", "wb")
    out: dict[str, Any] = {"driver": driver}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        cl = connect(f"{d}/ctl.sock", t0 + 30)
        first = cl.call("acquire", {"trajectory_id": "first", "timeout_ms": 120000})["slot"]
        out["first_slot_s"] = time.monotonic() - t0
        second = cl.call("acquire", {"trajectory_id": "second", "timeout_ms": 60000})["slot"]
        # load: both slots of the first agent busy for the whole measurement
        busy = [cl.send("exec", {"slot": h, "tool": "bash",
                                 "args": {"command": "sleep 600"}}) for h in (first, second)]
        t1 = time.monotonic()
        ids = [cl.send("acquire", {"trajectory_id": f"w{i}", "timeout_ms": 180000})
               for i in range(10)]
        handles = [cl.wait(i, timeout=240)[0]["result"]["slot"] for i in ids]
        out["add_5_agents_s"] = time.monotonic() - t1
        st = cl.call("status")
        out["agents_ready"] = st["agents"]["ready"]
        # idle: no leases, no commands; the pool keeps its 6 agents
        for h in (first, second):
            cl.call("release", {"slot": h})
        for h in handles:
            cl.call("release", {"slot": h})
        for i in busy:
            cl.wait(i, timeout=60)
        time.sleep(5)
        t2 = time.monotonic()
        time.sleep(idle_min * 60)
        reqs = proxy.since(t2)
        out["idle_minutes"] = idle_min
        out["idle_requests"] = len(reqs)
        out["idle_requests_per_min"] = len(reqs) / idle_min
        out["idle_requests_per_min_per_agent"] = len(reqs) / idle_min / out["agents_ready"]
        cl.close()
    finally:
        subprocess.run([str(build / "agentctl"), "--controller", f"unix:{d}/ctl.sock", "stop",
                        "--purge"], capture_output=True, timeout=150)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(d, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--drivers", default="raw_exec,docker")
    ap.add_argument("--idle-minutes", type=float, default=2.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    build = Path(a.build).resolve()
    drivers = a.drivers.split(",")
    n, nd, env = start_nomad(NOMAD_DEV_DRIVERS=" ".join(drivers))
    proxy = CountingProxy(n.addr)
    results = []
    try:
        for drv in drivers:
            results.append(run_driver(build, drv, proxy, a.idle_minutes))
    finally:
        proxy.close()
        stop_nomad(nd, env)
    if a.json:
        print(json.dumps(results, indent=2))
        return 0
    nomad_ver = subprocess.run(["sh", "-c", "ls -d /var/cache/slot/nomad-* | head -1"],
                               capture_output=True, text=True).stdout.strip()
    print(f"nomad backend, {os.cpu_count()} cores, Nomad dev agent ({os.path.basename(nomad_ver)})")
    for r in results:
        print(f"  {r['driver']:9} start -> first slot {r['first_slot_s']:6.2f} s; "
              f"+5 agents under load {r['add_5_agents_s']:6.2f} s "
              f"({r['agents_ready']} ready); idle {r['idle_requests_per_min']:.2f} Nomad "
              f"requests/min ({r['idle_requests_per_min_per_agent']:.2f} per agent, "
              f"{r['idle_requests']} in {r['idle_minutes']:g} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
