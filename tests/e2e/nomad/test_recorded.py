"""The nomad backend's reading of allocation JSON (`slot-controller
--nomad-alloc-address`, the same function the backend uses) against
allocations recorded from the real Nomad 1.6.3 dev agent (docker, raw_exec,
Apptainer under raw_exec) and against the older layouts (Shared.Networks,
per-task Networks) that Nomad clients before 0.12 reported."""
from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
BUILD = Path(os.environ.get("SLOT_BUILD_DIR", ROOT / "build"))
CTL = BUILD / "slot-controller"


def address(path: Path, label: str = "agent") -> tuple[int, str, str]:
    r = subprocess.run([str(CTL), "--nomad-alloc-address", str(path), label],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, r.stdout.strip(), r.stderr


@pytest.mark.parametrize("driver", ["docker", "raw", "apptainer"])
def test_recorded_allocations(driver: str) -> None:
    f = HERE / "recorded" / f"alloc-{driver}.json"
    alloc = json.loads(f.read_text())
    port = next(p for p in alloc["AllocatedResources"]["Shared"]["Ports"]
                if p["Label"] == "agent")
    rc, out, err = address(f)
    assert rc == 0, err
    assert out == f"{port['HostIP']}:{port['Value']}"
    if driver == "docker":
        assert port["To"] == 7070 and port["Value"] != 7070  # the host port, not the container's


def test_older_layouts(tmp_path: Path) -> None:
    base = json.loads((HERE / "recorded" / "alloc-raw.json").read_text())
    # Shared.Networks only (no Shared.Ports)
    a = copy.deepcopy(base)
    del a["AllocatedResources"]["Shared"]["Ports"]
    a["AllocatedResources"]["Shared"]["Networks"] = [
        {"IP": "10.1.2.3", "DynamicPorts": [{"Label": "agent", "Value": 23456}]}]
    (tmp_path / "a.json").write_text(json.dumps(a))
    assert address(tmp_path / "a.json")[1] == "10.1.2.3:23456"
    # per-task networks with a reserved (static) port
    b = copy.deepcopy(base)
    b["AllocatedResources"]["Shared"] = {}
    b["AllocatedResources"]["Tasks"] = {"agent": {"Networks": [
        {"IP": "10.9.8.7", "ReservedPorts": [{"Label": "agent", "Value": 7000}],
         "DynamicPorts": [{"Label": "other", "Value": 1}]}]}}
    (tmp_path / "b.json").write_text(json.dumps(b))
    assert address(tmp_path / "b.json")[1] == "10.9.8.7:7000"


def test_missing_label_and_bad_json(tmp_path: Path) -> None:
    rc, _, err = address(HERE / "recorded" / "alloc-docker.json", "nope")
    assert rc == 1 and "no port labelled 'nope'" in err
    (tmp_path / "bad.json").write_text('{"AllocatedResources": ')
    rc, _, err = address(tmp_path / "bad.json")
    assert rc == 1 and "bad.json:1" in err
    (tmp_path / "zero.json").write_text(json.dumps({"AllocatedResources": {"Shared": {"Ports": [
        {"Label": "agent", "HostIP": "", "Value": 0}]}}}))
    assert address(tmp_path / "zero.json")[0] == 1
