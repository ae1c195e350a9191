#!/usr/bin/python3
"""Run every test suite and print one closing line: `N passed, N failed`.

Suites: the static-link check, clang-format, the C unit tests (release and
sanitizer builds), the pytest integration suite against the release agent and
again against the ASan/UBSan agent (that one with the warm exec path off,
SLOT_AGENT_NO_WARM, so both paths run every suite), the isolation escapes, the controller
end-to-end suite (release and ASan/UBSan controller, agentctl and Python
client), the images suite (Docker images built from scratch, the agent and the
controller's exec backend in real containers, the SIF under Apptainer), the
Nomad suite (the nomad backend against a real Nomad dev agent built from the
Go module proxy; release and ASan/UBSan controller), the Slurm suite (the
slurm backend against a one-node Slurm cluster of Debian's packages; release
and ASan/UBSan controller; the Nomad and Slurm suites run side by side), and a
short fixed-length fuzz run (beside the images suite).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = "/usr/bin/python3"


class Tally:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.skipped = 0
        self.lines: list[str] = []

    def add(self, suite: str, p: int, f: int, s: int = 0) -> None:
        self.passed += p
        self.failed += f
        self.skipped += s
        self.lines.append(f"  {suite:<34} {p:5d} passed {f:4d} failed {s:4d} skipped")


def banner(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def static_check(t: Tally, build: Path) -> None:
    banner("slot-agent is statically linked")
    agent = build / "slot-agent"
    out = subprocess.run(["file", "-L", str(agent)], capture_output=True, text=True).stdout
    print(out.strip())
    ok = "statically linked" in out or "static-pie linked" in out
    if ok:
        print(f"size: {agent.stat().st_size} bytes")
    t.add("static link", int(ok), int(not ok))


def format_check(t: Tally) -> None:
    banner("clang-format")
    files = sorted(str(p.relative_to(ROOT)) for pat in ("agent/**/*.[ch]", "proto/*.[ch]",
                                                        "controller/**/*.[ch]", "tests/**/*.c")
                   for p in ROOT.glob(pat))
    r = subprocess.run(["clang-format", "--dry-run", "--Werror", *files], cwd=ROOT,
                       capture_output=True, text=True)
    sys.stdout.write(r.stderr[-3000:])
    bad = sorted({ln.split(":")[0] for ln in r.stderr.splitlines() if "clang-format-violations" in ln})
    print(f"{len(files)} files clean" if r.returncode == 0 else
          f"{len(bad)} of {len(files)} files need clang-format -i: {' '.join(bad)}")
    t.add("clang-format", int(r.returncode == 0), int(r.returncode != 0))


def cmocka(t: Tally, name: str, binary: Path) -> None:
    banner(f"unit: {name}")
    if not binary.exists():
        print(f"missing {binary}")
        t.add(name, 0, 1)
        return
    env = dict(os.environ, CMOCKA_MESSAGE_OUTPUT="stdout")
    r = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=600)
    sys.stdout.write(r.stdout[-6000:])
    sys.stdout.write(r.stderr[-3000:])
    out = r.stdout + r.stderr  # cmocka prints its summary on stderr
    passed = sum(int(m) for m in re.findall(r"\[  PASSED  \] (\d+) test", out))
    failed = sum(int(m) for m in re.findall(r"\[  FAILED  \] (\d+) test", out))
    if r.returncode != 0 and failed == 0:
        failed = 1  # crashed or aborted: count it
    t.add(name, passed, failed)


class Pytest:
    """One pytest run of a suite, started now and tallied by finish(). With
    quiet=True its output goes to a file, printed at finish(), so that two
    suites can run side by side without mixing their lines."""

    def __init__(self, name: str, build: Path, extra_env: dict[str, str],
                 path: str = "tests/integration", extra_args: tuple[str, ...] = (),
                 quiet: bool = False) -> None:
        self.name = name
        self.dir = tempfile.TemporaryDirectory()
        self.xml = Path(self.dir.name) / "junit.xml"
        self.out = tempfile.TemporaryFile(mode="w+") if quiet else None
        if not quiet:
            banner(f"pytest: {name}")
        env = dict(os.environ, SLOT_BUILD_DIR=str(build), **extra_env)
        self.proc = subprocess.Popen([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                      "--junitxml", str(self.xml), *extra_args, path], cwd=ROOT,
                                     env=env, stdout=self.out, stderr=self.out and subprocess.STDOUT)

    def finish(self, t: Tally) -> None:
        try:
            rc = self.proc.wait(timeout=3000)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        if self.out:
            banner(f"pytest: {self.name}")
            self.out.seek(0)
            sys.stdout.write(self.out.read())
            sys.stdout.flush()
        if not self.xml.exists():
            t.add(self.name, 0, 1)
            self.dir.cleanup()
            return
        root = ET.parse(self.xml).getroot()
        self.dir.cleanup()
        suites = [root] if root.tag == "testsuite" else list(root)
        tests = sum(int(s.get("tests", 0)) for s in suites)
        fails = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
        skips = sum(int(s.get("skipped", 0)) for s in suites)
        if rc not in (0, 1) and fails == 0:
            fails = 1
        t.add(self.name, tests - fails - skips, fails, skips)


def pytest(t: Tally, name: str, build: Path, extra_env: dict[str, str],
           path: str = "tests/integration", extra_args: tuple[str, ...] = ()) -> None:
    Pytest(name, build, extra_env, path, extra_args).finish(t)


def side_by_side(t: Tally, *runs: Pytest) -> None:
    """The Nomad and Slurm suites mostly wait on their clusters' daemons and
    share no port (Nomad 4646-4648 and its dynamic 20000-32000, Slurm
    6817-6818): they run together, which saves about 2.5 minutes a pass."""
    for r in runs:
        r.finish(t)


class Fuzz:
    """The fuzz run is CPU-bound and shares nothing with the suites (its own
    temporary directory, no ports): it runs beside the images suite, which
    mostly waits for Docker and Apptainer, and is collected at the end."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(["bash", "tests/fuzz/run.sh", str(runs)], cwd=ROOT,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def finish(self, t: Tally) -> None:
        banner(f"fuzz: frame reader and request decoder, {self.runs} runs")
        try:
            rc = self.proc.wait(timeout=1200)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            print("fuzz: timed out after 1200 s")
        self.log.seek(0)
        sys.stdout.write(self.log.read()[-6000:])
        t.add("fuzz (libFuzzer, ASan+UBSan)", int(rc == 0), int(rc != 0))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--asan", default="build-asan")
    ap.add_argument("--no-asan", action="store_true")
    ap.add_argument("--no-fuzz", action="store_true")
    ap.add_argument("--fuzz-runs", type=int, default=500000)
    a = ap.parse_args()
    build = (ROOT / a.build).resolve()
    asan = (ROOT / a.asan).resolve()
    t = Tally()
    static_check(t, build)
    format_check(t)
    cmocka(t, "unit (release)", build / "test-proto")
    cmocka(t, "unit screen (release)", build / "test-screen")
    cmocka(t, "unit untar (release)", build / "test-untar")
    pytest(t, "integration (release agent)", build, {})
    pytest(t, "isolation escapes (root/user/docker)", build, {}, "tests/isolation")
    pytest(t, "controller (release)", build, {}, "tests/controller")
    fuzz = None if a.no_fuzz else Fuzz(a.fuzz_runs)
    pytest(t, "images (docker, apptainer)", build, {}, "tests/images")
    side_by_side(t, Pytest("nomad (real Nomad 1.6.3 dev agent)", build, {}, "tests/e2e/nomad",
                           quiet=True),
                 Pytest("slurm (real one-node Slurm cluster)", build, {}, "tests/e2e/slurm",
                        quiet=True))
    if not a.no_asan:
        cmocka(t, "unit (ASan+UBSan)", asan / "test-proto")
        cmocka(t, "unit screen (ASan+UBSan)", asan / "test-screen")
        cmocka(t, "unit untar (ASan+UBSan)", asan / "test-untar")
        san = {
            "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=66",
            "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1:exitcode=67",
            "SLOT_SANITIZED": "1",
        }
        # The release suites run the warm exec path (the default), these the
        # cold one: every command a new shell.
        cold = dict(san, SLOT_AGENT_NO_WARM="1")
        pytest(t, "integration (ASan+UBSan agent, cold)", asan, cold)
        pytest(t, "controller (ASan+UBSan, cold)", asan, cold, "tests/controller")
        side_by_side(t, Pytest("nomad (ASan+UBSan controller)", asan, san, "tests/e2e/nomad",
                               quiet=True),
                     Pytest("slurm (ASan+UBSan controller)", asan, san, "tests/e2e/slurm",
                            quiet=True))
    if fuzz:
        fuzz.finish(t)
    banner("summary")
    print("\n".join(t.lines))
    line = f"{t.passed} passed, {t.failed} failed"
    if t.skipped:
        line += f", {t.skipped} skipped"
    print(line, flush=True)
    return 0 if t.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
