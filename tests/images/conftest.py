"""The images suite: builds the slot-agent images once per session with
`images/build.sh docker --no-cache` (every layer afresh; the debootstrap
rootfs tarballs under /var/cache/slot/images are reused while the package
lists are unchanged) and drives them with the real Docker engine.

SLOT_IMAGES_CACHED=1 builds with Docker's layer cache instead (for quick
iterations). Every container a test starts is removed at the end of the
session, whatever happened. The figures and the escape table are printed at
the end of the run.

The Apptainer tests need an apptainer binary: $APPTAINER, PATH, the cache of
tests/e2e/apptainer/build-apptainer.sh, or else that script builds one (once;
its failure fails those tests, they are never skipped). The SIF is built once
per session from the image the session built."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from images_lib import (AGENTCTL, BIN_IMAGE, BUILD_SH, CONTAINERS, ESCAPE, FIGURES, IMAGE, ROOT,
                        SIF, docker_out, ensure_apptainer, write_tokens)

BUILD_TIMEOUT = 3600  # a cold build runs debootstrap twice


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """Builds the images once; returns {"final": tag, "bin": tag}."""
    if not shutil.which("docker"):
        pytest.fail("docker is not installed: the images suite needs a Docker engine")
    for b in (AGENTCTL, ESCAPE):
        if not b.exists():
            pytest.fail(f"{b} is missing: run `make build` first")
    args = [str(BUILD_SH), "docker"]
    if os.environ.get("SLOT_IMAGES_CACHED") != "1":
        args.append("--no-cache")
    t0 = time.monotonic()
    try:
        r = subprocess.run(args, cwd=ROOT, capture_output=True, timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} did not finish within {BUILD_TIMEOUT} s")
    took = time.monotonic() - t0
    if r.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {r.returncode}:\n"
                    f"{r.stderr.decode(errors='replace')[-4000:]}")
    tags = r.stdout.decode().split()
    assert tags == [IMAGE, BIN_IMAGE], tags
    FIGURES[f"build.sh {' '.join(args[1:])}"] = f"{took:.1f} s"
    return {"final": IMAGE, "bin": BIN_IMAGE}


@pytest.fixture(scope="session")
def apptainer() -> str:
    """The apptainer binary; built by build-apptainer.sh when there is none.
    No apptainer fails the tests that need it, loudly."""
    t0 = time.monotonic()
    try:
        app = ensure_apptainer()
    except RuntimeError as e:
        err = str(e)
    else:
        err = ""
    if err:
        pytest.fail(f"no apptainer binary for the SIF tests: {err}", pytrace=False)
    FIGURES["apptainer binary"] = f"{app} ({time.monotonic() - t0:.1f} s to find or build)"
    return app


@pytest.fixture(scope="session")
def sif(images, apptainer) -> Path:
    """`images/build.sh sif`, once per session, from the image `images` built."""
    t0 = time.monotonic()
    r = subprocess.run([str(BUILD_SH), "sif"], cwd=ROOT, capture_output=True, timeout=1800,
                       env=dict(os.environ, APPTAINER=apptainer))
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-4000:]
    assert r.stdout.decode().split() == [IMAGE, BIN_IMAGE, str(SIF)]
    # built from the image this session built
    assert Path(f"{SIF}.image-id").read_text().strip() == \
        docker_out("image", "inspect", "-f", "{{.Id}}", IMAGE)
    FIGURES["build.sh sif"] = f"{time.monotonic() - t0:.1f} s"
    FIGURES["SIF size"] = f"{SIF.stat().st_size} bytes"
    return SIF


@pytest.fixture(scope="session")
def tokens() -> Iterator[tuple[Path, str, Path]]:
    """(token file, token, wrong-token file)."""
    d = Path(tempfile.mkdtemp(prefix="slot-img-", dir="/var/tmp"))
    try:
        yield write_tokens(d / "secrets")
    finally:
        CONTAINERS.rm_all()  # containers may still have the files mounted
        shutil.rmtree(d, ignore_errors=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    CONTAINERS.rm_all()


def pytest_terminal_summary(terminalreporter) -> None:
    from images_lib import ESCAPE_CONDITIONS, ESCAPE_RESULTS
    tr = terminalreporter
    if FIGURES:
        tr.write_line("")
        tr.write_line("images figures:")
        w = max(len(k) for k in FIGURES) + 2
        for k, v in FIGURES.items():
            tr.write_line(f"  {k:<{w}}{v}")
    if ESCAPE_RESULTS:
        attempts = list(dict.fromkeys(a for a, _ in ESCAPE_RESULTS))
        conds = [c for c in ESCAPE_CONDITIONS if any(k[1] == c for k in ESCAPE_RESULTS)]
        w = max(len(a) for a in attempts) + 2
        cw = max(len(c) for c in conds) + 2
        tr.write_line("")
        tr.write_line(f"escape attempts in {IMAGE} (Docker) and its SIF (Apptainer): blocked by "
                      "which rung (docker-*: Docker's default seccomp profile and capabilities "
                      "unless named)")
        for c in conds:
            tr.write_line(f"  {c}: {ESCAPE_CONDITIONS[c]}")
        tr.write_line(f"{'attempt':<{w}}" + "".join(f"{c:<{cw}}" for c in conds))
        for a in attempts:
            tr.write_line(f"{a:<{w}}" +
                          "".join(f"{ESCAPE_RESULTS.get((a, c), '-'):<{cw}}" for c in conds))
