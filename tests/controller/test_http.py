"""controller/http.c (the asynchronous HTTP client the Nomad backend uses)
through build/http-probe, against a real HTTP server in this process: TCP,
a Unix socket and TLS (a CA and a server certificate made by openssl for the
test). Retries of 5xx and connection errors with bounded attempts, no retry
of 4xx, timeouts, cancellation, concurrency, the token header, the
X-Nomad-Index header and the answer size cap."""
from __future__ import annotations

import http.server
import os
import socket
import socketserver
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlparse

import pytest

from conftest import BUILD

PROBE = BUILD / "http-probe"


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[str, int] = {}
        self.inflight = 0
        self.max_inflight = 0
        self.tokens: list[str | None] = []


class Handler(http.server.BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # quiet
        pass

    def reply(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def handle_any(self) -> None:
        st = self.state
        u = urlparse(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        with st.lock:
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            st.tokens.append(self.headers.get("X-Nomad-Token"))
            key = q.get("key", u.path)
            st.counts[key] = st.counts.get(key, 0) + 1
            seen = st.counts[key]
        try:
            if u.path == "/ok":
                self.reply(200, b"hello " + (self.headers.get("X-Nomad-Token") or "-").encode(),
                           {"X-Nomad-Index": "42"})
            elif u.path == "/flaky":
                if seen <= int(q.get("n", "2")):
                    self.reply(503, b"no leader")
                else:
                    self.reply(200, b"recovered")
            elif u.path == "/missing":
                self.reply(404, b"job not found")
            elif u.path == "/slow":
                time.sleep(float(q.get("s", "2")))
                self.reply(200, b"slow done")
            elif u.path == "/echo":
                self.reply(200, self.command.encode() + b" " + body)
            elif u.path == "/big":
                self.reply(200, b"x" * ((64 << 20) + 10))
            else:
                self.reply(400, b"no such path")
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with st.lock:
                st.inflight -= 1

    do_GET = do_POST = do_PUT = do_DELETE = handle_any


class TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def get_request(self):  # BaseHTTPRequestHandler wants a (host, port) address
        s, _ = super().get_request()
        return s, ("unix", 0)


def serve(server) -> threading.Thread:
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return t


@pytest.fixture
def server() -> Iterator[tuple[str, State]]:
    st = State()
    handler = type("H", (Handler,), {"state": st})
    srv = TCPServer(("127.0.0.1", 0), handler)
    serve(srv)
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}", st
    finally:
        srv.shutdown()
        srv.server_close()


def probe(*args: str, timeout: float = 60) -> tuple[list[dict[str, str]], int, str]:
    r = subprocess.run([str(PROBE), *args], capture_output=True, text=True, timeout=timeout)
    assert "Sanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    answers = []
    total = -1
    for line in r.stdout.splitlines():
        if line.startswith("status="):
            head, _, body = line.partition(" body=")
            d = {}
            parts = head.split(" ")
            for p in parts:
                k, _, v = p.partition("=")
                d[k] = v
            # error= may hold spaces: take it verbatim
            d["error"] = head.partition(" error=")[2]
            d["body"] = body
            answers.append(d)
        elif line.startswith("attempts_total="):
            total = int(line.split("=")[1])
        elif line == "cancelled":
            answers.append({"cancelled": "1"})
    return answers, total, r.stderr


def test_answer_index_and_token(server) -> None:
    url, st = server
    (a,), total, _ = probe("--token", "s3cr3t", url, "GET", "/ok")
    assert a["status"] == "200" and a["index"] == "42" and a["attempts"] == "1"
    assert a["body"] == "hello s3cr3t" and total == 1
    (b,), _, _ = probe(url, "GET", "/ok")
    assert b["body"] == "hello -" and st.tokens[-1] is None


def test_5xx_is_retried_until_it_recovers_or_attempts_run_out(server) -> None:
    url, st = server
    (a,), total, _ = probe("--attempts", "4", "--backoff", "0.05", url, "GET", "/flaky?key=a&n=2")
    assert (a["status"], a["attempts"], a["body"], total) == ("200", "3", "recovered", 3)
    (b,), _, _ = probe("--attempts", "2", "--backoff", "0.05", url, "GET", "/flaky?key=b&n=5")
    assert (b["status"], b["attempts"], b["body"]) == ("503", "2", "no leader")
    assert st.counts["b"] == 2


def test_4xx_is_not_retried(server) -> None:
    url, st = server
    (a,), _, _ = probe("--attempts", "5", url, "GET", "/missing")
    assert (a["status"], a["attempts"], a["body"]) == ("404", "1", "job not found")
    assert st.counts["/missing"] == 1


def test_connection_refused_retries_then_says_why() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: nobody listens
    (a,), total, _ = probe("--attempts", "3", "--backoff", "0.05", f"http://127.0.0.1:{port}",
                           "GET", "/ok")
    assert a["status"] == "0" and a["attempts"] == "3" and total == 3
    assert "Couldn't connect" in a["error"] or "Connection refused" in a["error"], a


def test_attempt_timeout(server) -> None:
    url, st = server
    (a,), _, _ = probe("--timeout", "0.3", "--attempts", "2", "--backoff", "0.05", url, "GET",
                       "/slow?s=3&key=slow")
    assert a["status"] == "0" and a["attempts"] == "2"
    assert "timed out" in a["error"].lower() or "timeout" in a["error"].lower(), a
    assert st.counts["slow"] == 2


def test_requests_run_concurrently(server) -> None:
    url, st = server
    answers, total, _ = probe("--parallel", "16", "--timeout", "30", url, "GET", "/slow?s=1")
    assert len(answers) == 16 and all(a["status"] == "200" for a in answers)
    assert total == 16
    assert st.max_inflight >= 8, st.max_inflight


def test_methods_and_bodies(server) -> None:
    url, _ = server
    for m in ("POST", "PUT", "DELETE"):
        (a,), _, _ = probe(url, m, "/echo", '{"Job":{"ID":"x"}}')
        assert a["status"] == "200" and a["body"] == f'{m} {{"Job":{{"ID":"x"}}}}'


def test_cancel_calls_nothing_back(server) -> None:
    url, st = server
    answers, _, _ = probe("--cancel-after", "0.2", url, "GET", "/slow?s=3&key=c")
    assert answers == [{"cancelled": "1"}]
    assert st.counts["c"] == 1


def test_answers_over_the_cap_fail_cleanly(server) -> None:
    url, _ = server
    (a,), _, _ = probe("--attempts", "3", "--timeout", "60", url, "GET", "/big", timeout=120)
    assert a["status"] == "0" and a["attempts"] == "1" and "answer over" in a["error"]


def test_unix_socket(tmp_path) -> None:
    st = State()
    path = str(tmp_path / "nomad.sock")
    srv = UnixServer(path, type("H", (Handler,), {"state": st}))
    serve(srv)
    try:
        (a,), _, _ = probe("--token", "t", f"unix://{path}", "GET", "/ok")
        assert a["status"] == "200" and a["body"] == "hello t" and a["index"] == "42"
    finally:
        srv.shutdown()
        srv.server_close()


def test_bad_addresses_are_refused() -> None:
    for addr in ("127.0.0.1:4646", "ftp://x:1", "http://:80", "http://h:99999"):
        r = subprocess.run([str(PROBE), addr, "GET", "/"], capture_output=True, text=True,
                           timeout=30)
        assert r.returncode == 1 and "expected http://HOST:PORT" in r.stdout, (addr, r.stdout)


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[int, Path, State]]:
    d = tmp_path / "pki"
    d.mkdir()

    def ossl(*a: str) -> None:
        subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60, cwd=d)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
         "-days", "2", "-subj", "/CN=slot test CA")
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr",
         "-subj", "/CN=server.global.nomad")
    (d / "ext").write_text("subjectAltName=DNS:server.global.nomad\n")
    ossl("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-out", "srv.pem", "-days", "2", "-extfile", "ext")
    st = State()
    srv = TCPServer(("127.0.0.1", 0), type("H", (Handler,), {"state": st}))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    serve(srv)
    try:
        yield srv.server_address[1], d / "ca.pem", st
    finally:
        srv.shutdown()
        srv.server_close()


def test_tls_verification_server_name_and_skip(tls_server) -> None:
    port, ca, _ = tls_server
    url = f"https://127.0.0.1:{port}"
    # the certificate names server.global.nomad, not 127.0.0.1
    (a,), _, _ = probe("--attempts", "1", "--cacert", str(ca), url, "GET", "/ok")
    assert a["status"] == "0" and a["error"], a
    (b,), _, _ = probe("--cacert", str(ca), "--server-name", "server.global.nomad", url, "GET",
                       "/ok")
    assert b["status"] == "200" and b["body"] == "hello -", b
    (c,), _, _ = probe("--attempts", "1", "--server-name", "server.global.nomad", url, "GET",
                       "/ok")
    assert c["status"] == "0" and "certificate" in c["error"].lower(), c
    (e,), _, _ = probe("--skip-verify", url, "GET", "/ok")
    assert e["status"] == "200"
