#!/usr/bin/env python3
"""What TLS costs an agent link (issue 19): one agent listening on both
tcp:127.0.0.1 (plaintext) and tls:127.0.0.1 in the same run, measured by
bench-agent-exec --tls (C, proto/tls.c: what the controller itself uses),
the two sides interleaved round by round:

- connect + hello (+ the TLS 1.3 handshake with client certificates),
  p50/p99 over 200 connects a side;
- a request round trip without a process (`health`) at concurrency 1;
- exec `true` p50 at concurrency 1, and the milliseconds TLS adds;
- exec `true` ops/s at concurrency 32, and TLS as a % of plaintext;
- bulk: write_file and read_file of 16 MiB, MB/s each way;
- the size of the agent binary of the build given.

Certificates (EC P-256: a CA, the agent's serverAuth certificate naming
"slot-bench-agent", a clientAuth certificate for the bench) and the token
are made with the openssl CLI in a temp dir, removed at the end. Prints a
table with plaintext beside each TLS figure and the issue's goals; asserts
nothing about speed (exit 0 whenever it could run). About 30 s.

    tests/bench/tls.py [--build build] [--ops 2000] [--json] [--baseline-agent PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH_TIMEOUT_S = 110
GOAL_ADDED_MS = 0.05
GOAL_THROUGHPUT = 0.95
GOAL_SIZE = 4 << 20


def openssl(*args: str, cwd: Path) -> None:
    p = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if p.returncode != 0:
        raise SystemExit(f"tls.py: openssl {args[0]}: {p.stderr.strip()}")


def make_pki(d: Path) -> None:
    """ca.pem, agent.pem/.key, client.pem/.key and token in d."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=slot-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for stem, cn, eku, san in (("agent", "slot-bench-agent", "serverAuth",
                                "DNS:slot-bench-agent"),
                               ("client", "slot-controller:bench", "clientAuth", None)):
        ext = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature",
               f"extendedKeyUsage={eku}"] + ([f"subjectAltName={san}"] if san else [])
        (d / f"{stem}.ext").write_text("\n".join(ext) + "\n")
        openssl("req", "-new", *ec, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
                "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{stem}.pem", "-days", "1",
                "-extfile", f"{stem}.ext", cwd=d)
        (d / f"{stem}.key").chmod(0o600)
    tok = d / "token"
    tok.write_text(os.urandom(16).hex() + "\n")
    tok.chmod(0o600)


def build(build_dir: Path) -> None:
    if not (build_dir / "build.ninja").exists():
        subprocess.run(["meson", "setup", str(build_dir), str(ROOT)], check=True,
                       stdout=subprocess.DEVNULL, timeout=300)
    subprocess.run(["meson", "compile", "-C", str(build_dir), "slot-agent", "bench-agent-exec"],
                   check=True, stdout=subprocess.DEVNULL, timeout=600)


def linkage(path: Path) -> str:
    try:
        out = subprocess.run(["file", "-b", str(path)], capture_output=True, text=True,
                             timeout=10).stdout
    except OSError:
        return "?"
    return "static" if "statically linked" in out else "dynamic" if "dynamic" in out else "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=str(ROOT / "build"), help="meson build dir")
    ap.add_argument("--ops", type=int, default=2000,
                    help="exec ops a side at c=1 (twice that at c=32)")
    ap.add_argument("--no-build", action="store_true", help="use the binaries as they are")
    ap.add_argument("--json", action="store_true", help="print the bench's JSON as well")
    ap.add_argument("--baseline-agent", metavar="PATH",
                    help="an agent built without TLS (e.g. from the commit before), whose size "
                         "is printed beside")
    args = ap.parse_args()
    bdir = Path(args.build).resolve()
    if not args.no_build:
        build(bdir)
    agent, bench = bdir / "slot-agent", bdir / "bench-agent-exec"
    tmp = Path(tempfile.mkdtemp(prefix="slot-bench-tls-pki-"))
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    try:
        make_pki(tmp)
        p = subprocess.Popen([str(bench), "--agent", str(agent), "--tls", str(tmp),
                              "--ops", str(args.ops)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=BENCH_TIMEOUT_S)
        except BaseException:
            # SIGTERM first: the bench then stops its agent and removes its
            # directory; SIGKILL only if that hangs
            p.terminate()
            try:
                out, err = p.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                out, err = p.communicate()
            sys.stderr.write(err)
            print(f"tls.py: the bench did not finish within {BENCH_TIMEOUT_S} s",
                  file=sys.stderr)
            return 1
        sys.stderr.write(err)
        if p.returncode != 0:
            print(f"tls.py: bench-agent-exec --tls exited {p.returncode}", file=sys.stderr)
            return 1
        res = json.loads(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(res, indent=1))
    report(res, agent, time.monotonic() - t0,
           Path(args.baseline_agent) if args.baseline_agent else None)
    print(f"host: {os.cpu_count()} CPUs, load average {load0:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    return 0


def report(res: dict, agent: Path, secs: float, baseline: Path | None = None) -> None:
    pl, tl = res["sides"]["plaintext"], res["sides"]["tls"]
    print(f"TLS against plaintext: one agent on tcp:127.0.0.1 and tls:127.0.0.1, same run, "
          f"interleaved ({res['rounds']} rounds); {res['cipher']}; mutual certificates "
          f"(EC P-256) + token")
    print(f"{'figure':44} {'plaintext':>10} {'TLS':>10} {'TLS - plain':>14}  goal")

    def row(name: str, a: float, b: float, diff: str, goal: str = "") -> None:
        print(f"{name:44} {a:10.3f} {b:10.3f} {diff:>14}  {goal}")

    for q in ("p50", "p99"):
        a, b = pl["handshake"][f"{q}_ms"], tl["handshake"][f"{q}_ms"]
        row(f"connect + hello, {q} ms ({pl['handshake']['n']} a side)", a, b, f"{b - a:+.3f} ms",
            "(TLS: + handshake)" if q == "p50" else "")
    a, b = pl["health_c1"]["p50_ms"], tl["health_c1"]["p50_ms"]
    row("request round trip (health) p50 ms, c=1", a, b, f"{b - a:+.3f} ms",
        "(the link alone)")
    a, b = pl["exec_c1"]["p50_ms"], tl["exec_c1"]["p50_ms"]
    added = b - a
    row(f"exec true p50 ms, c=1 ({pl['exec_c1']['n']} a side)", a, b, f"{added:+.3f} ms",
        f"<= +{GOAL_ADDED_MS} ms {'ok' if added <= GOAL_ADDED_MS else 'MISS'}")
    a, b = pl["exec_c1"]["p99_ms"], tl["exec_c1"]["p99_ms"]
    row("exec true p99 ms, c=1", a, b, f"{b - a:+.3f} ms")
    a, b = pl["c32"]["ops_per_s"], tl["c32"]["ops_per_s"]
    ratio = b / a if a else float("nan")
    print(f"{'exec true ops/s, c=32 (' + str(pl['c32']['ops']) + ' a side)':44} {a:10.0f} "
          f"{b:10.0f} {ratio * 100:13.1f}%  >= {GOAL_THROUGHPUT:.0%} of plaintext "
          f"{'ok' if ratio >= GOAL_THROUGHPUT else 'MISS'}")
    mib = res["sides"]["plaintext"]["bulk_bytes"] >> 20
    for key, what in (("write_file_mb_s", f"write_file {mib} MiB, MB/s (median)"),
                      ("read_file_mb_s", f"read_file {mib} MiB, MB/s (median)")):
        a, b = pl[key], tl[key]
        print(f"{what:44} {a:10.1f} {b:10.1f} {(b / a * 100 if a else 0):13.1f}%")
    size = agent.stat().st_size
    base = baseline.stat().st_size if baseline is not None else None
    print(f"{'agent binary, bytes (' + linkage(agent) + ')':44} "
          f"{base if base is not None else '':>10} {size:10d} "
          f"{(f'{size - base:+d} B' if base is not None else f'{size / (1 << 20):.2f} MiB'):>14}"
          f"  <= 4 MiB ({size / (1 << 20):.2f} MiB) {'ok' if size <= GOAL_SIZE else 'MISS'}")
    if base is None:
        print("  (--baseline-agent PATH: an agent built without TLS, printed beside)")
    errs = res.get("errors", 0)
    print(f"errors: {errs}; {secs:.0f} s. Figures, not assertions: both sides ran on this "
          f"host at the same time, so compare columns, not machines.")


if __name__ == "__main__":
    sys.exit(main())
