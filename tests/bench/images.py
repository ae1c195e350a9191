#!/usr/bin/python3
"""Figures of the slot-agent images (prints them; asserts nothing):

  - bytes the agent adds to the base image (slot-agent:latest - slot-base)
  - the agent-only image's size (slot-agent-bin:latest)
  - docker run -> first authenticated hello over TCP, median of N runs
  - with Apptainer (on PATH, $APPTAINER, or built by
    tests/e2e/apptainer/build-apptainer.sh): the SIF's size and
    `apptainer exec SIF slot-agent --stdio` -> hello, median of N runs

usage: tests/bench/images.py [--runs N] [--build] [--no-apptainer] [--json]
  --build   run images/build.sh first (docker, and sif when Apptainer is there)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "images"))
from images_lib import (BASE_IMAGE, BIN_IMAGE, BUILD_APPTAINER, BUILD_SH, CONTAINERS,  # noqa: E402
                        IMAGE, SIF, Client, apptainer_root_args, cached_apptainer, docker,
                        image_size, run_to_hello, write_tokens)



def find_apptainer() -> str | None:
    found = cached_apptainer()
    if found or not BUILD_APPTAINER.exists():
        return found
    r = subprocess.run(["bash", str(BUILD_APPTAINER)], capture_output=True, text=True,
                       timeout=3600)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines or not os.access(lines[-1], os.X_OK):
        print(f"apptainer: {BUILD_APPTAINER} failed: {r.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return lines[-1]


def apptainer_exec_to_hello(app: str, sif: Path, runs: int) -> list[float]:
    times: list[float] = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="slot-bench-", dir="/var/tmp") as d:
            t0 = time.monotonic()
            p = subprocess.Popen([app, "exec", *apptainer_root_args(), "--bind", f"{d}:/data",
                                  str(sif), "slot-agent",
                                  "--stdio", "--data-dir", "/data", "--slots", "4"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            try:
                c = Client.stdio(p, timeout=30)
                c.call("hello", {"client": "tests/bench/images.py"}, timeout=30)
                times.append(time.monotonic() - t0)
                c.close()  # stdin closes: the agent exits
                p.wait(timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=10)
    return times


def ms(xs: list[float]) -> str:
    return (f"{statistics.median(xs) * 1000:.0f} ms "
            f"(min {min(xs) * 1000:.0f}, max {max(xs) * 1000:.0f}, n={len(xs)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--build", action="store_true")
    ap.add_argument("--no-apptainer", action="store_true")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.runs < 1:
        ap.error("--runs is at least 1")

    app = None if a.no_apptainer else find_apptainer()
    if a.build:
        subprocess.run([str(BUILD_SH), "all" if app else "docker"], check=True, timeout=3600,
                       stdout=subprocess.DEVNULL, env=dict(os.environ, **({"APPTAINER": app} if app else {})))
    for tag in (IMAGE, BIN_IMAGE, BASE_IMAGE):
        if docker("image", "inspect", tag, check=False).returncode != 0:
            print(f"{tag} is missing: run images/build.sh (or pass --build)", file=sys.stderr)
            return 1

    fig: dict[str, object] = {}
    base, final, only = image_size(BASE_IMAGE), image_size(IMAGE), image_size(BIN_IMAGE)
    fig["agent_adds_to_base_bytes"] = final - base
    fig["agent_only_image_bytes"] = only
    with tempfile.TemporaryDirectory(prefix="slot-bench-", dir="/var/tmp") as d:
        token_file, token, _ = write_tokens(Path(d) / "secrets")
        try:
            t = run_to_hello(token_file, token, runs=a.runs)
        finally:
            CONTAINERS.rm_all()
    fig["docker_run_to_hello_ms"] = [round(x * 1000, 1) for x in t]
    lines = [f"bytes the agent adds to {BASE_IMAGE}: {final - base} ({base} -> {final})",
             f"{BIN_IMAGE} image size: {only} bytes",
             f"docker run -> hello over TCP: {ms(t)}"]

    if app:
        sif = SIF
        if not sif.exists():
            subprocess.run([str(BUILD_SH), "sif"], check=True, timeout=3600,
                           stdout=subprocess.DEVNULL, env=dict(os.environ, APPTAINER=app))
        built_from = Path(f"{sif}.image-id")
        current = docker("image", "inspect", "-f", "{{.Id}}", IMAGE).stdout.decode().strip()
        if not built_from.exists() or built_from.read_text().strip() != current:
            print(f"note: {sif} was not built from the current {IMAGE} "
                  "(images/build.sh sif, or --build, rebuilds it)", file=sys.stderr)
        fig["sif_bytes"] = sif.stat().st_size
        ta = apptainer_exec_to_hello(app, sif, a.runs)
        fig["apptainer_exec_to_hello_ms"] = [round(x * 1000, 1) for x in ta]
        lines += [f"SIF size ({sif}): {sif.stat().st_size} bytes",
                  f"apptainer exec --stdio -> hello: {ms(ta)}"]
    else:
        lines.append("apptainer: not available (no apptainer on PATH, $APPTAINER or "
                     "tests/e2e/apptainer/build-apptainer.sh); SIF figures skipped")
    print(json.dumps(fig) if a.json else "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
