"""The images themselves: slot-agent:latest is slot-base plus one static
binary and /data; slot-agent-bin:latest holds the binary and nothing else."""
from __future__ import annotations

import hashlib
import io
import json
import struct
import subprocess
import tarfile
from pathlib import Path

from images_lib import (AGENT_PATH, BASE_IMAGE, BIN_IMAGE, CONTAINERS, FIGURES, IMAGE, docker,
                        docker_out, image_size)


def _inspect(tag: str) -> dict:
    return json.loads(docker_out("image", "inspect", tag))[0]


def _copy_out(image: str, path: str, dest: Path) -> bytes:
    name = CONTAINERS.new_name("slot-img-cp")
    try:
        docker("create", "--name", name, image, "/none")
        docker("cp", f"{name}:{path}", str(dest))
    finally:
        CONTAINERS.rm(name)
    return dest.read_bytes()


def _elf_is_static(data: bytes) -> bool:
    """No PT_INTERP program header: nothing to load at run time."""
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def test_final_image_config(images) -> None:
    cfg = _inspect(IMAGE)["Config"]
    assert cfg["Entrypoint"][:2] == ["/bin/sh", "-c"]
    assert cfg["Cmd"] == ["--listen", "tcp:0.0.0.0:7070", "--insecure", "--token-file",
                          "/run/secrets/slot-token", "--data-dir", "/data"]
    assert "7070/tcp" in cfg["ExposedPorts"]
    # options alone, or a command (as controller/examples/docker.yaml runs it)
    for args in (["--version"], ["slot-agent", "--version"], [AGENT_PATH, "--version"]):
        r = docker("run", "--rm", IMAGE, *args, timeout=60)
        assert r.stdout.startswith(b"slot-agent "), (args, r.stdout)
    r = docker("run", "--rm", IMAGE, "bash", "-c", "echo $0", timeout=60)
    assert r.stdout == b"bash\n"
    # the base's tools for agent tasks, and /data
    r = docker("run", "--rm", "--entrypoint", "/bin/bash", IMAGE, "-c",
               "for t in bash git python3 curl ps; do command -v $t >/dev/null || echo missing $t; done;"
               " test -d /data && stat -c '%U %a' /data", timeout=60)
    assert r.stdout == b"root 755\n", r.stdout


def test_agent_in_image_is_static(images, tmp_path: Path) -> None:
    data = _copy_out(IMAGE, AGENT_PATH, tmp_path / "slot-agent")
    out = subprocess.run(["file", "-L", str(tmp_path / "slot-agent")], capture_output=True,
                         text=True, timeout=30).stdout
    assert "statically linked" in out or "static-pie linked" in out, out
    assert _elf_is_static(data)
    # the same bytes as the agent-only image's
    other = _copy_out(BIN_IMAGE, AGENT_PATH, tmp_path / "slot-agent-bin")
    assert hashlib.sha256(data).digest() == hashlib.sha256(other).digest()
    FIGURES["slot-agent binary"] = f"{len(data)} bytes"


def test_agent_only_image_has_nothing_else(images, tmp_path: Path) -> None:
    tar = tmp_path / "bin.tar"
    docker("save", "-o", str(tar), BIN_IMAGE, timeout=120)
    with tarfile.open(tar) as t:
        manifest = json.load(t.extractfile("manifest.json"))  # type: ignore[arg-type]
        layers = manifest[0]["Layers"]
        assert len(layers) == 1, layers
        layer = t.extractfile(layers[0]).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(layer)) as lt:
        members = {m.name.rstrip("/"): m for m in lt.getmembers()}
    assert set(members) == {"usr", "usr/local", "usr/local/bin", "usr/local/bin/slot-agent"}, \
        sorted(members)
    agent = members["usr/local/bin/slot-agent"]
    assert agent.isfile() and agent.mode & 0o111
    size = image_size(BIN_IMAGE)
    assert size == agent.size, (size, agent.size)
    FIGURES["slot-agent-bin image size"] = f"{size} bytes"


def test_final_adds_only_the_agent_to_the_base(images) -> None:
    base, final = _inspect(BASE_IMAGE), _inspect(IMAGE)
    bl, fl = base["RootFS"]["Layers"], final["RootFS"]["Layers"]
    assert fl[:len(bl)] == bl, "slot-agent:latest is not built on slot-base"
    added = final["Size"] - base["Size"]
    agent = image_size(BIN_IMAGE)
    # the binary, plus /data's directory entry
    assert agent <= added <= agent + 64 * 1024, (added, agent)
    # the history above the base: the COPY of the agent and mkdir /data carry bytes
    rows = docker_out("history", "--no-trunc", "--format", "{{.ID}}\t{{.Size}}\t{{.CreatedBy}}",
                      IMAGE).splitlines()
    above = []
    for row in rows:
        iid, size, *rest = row.split("\t", 2)
        created = rest[0] if rest else ""
        if iid == base["Id"]:
            break
        above.append((size, created))
    sized = [c for s, c in above if s not in ("0B", "0")]
    assert len(sized) == 1 and "COPY" in sized[0], above
    FIGURES["bytes the agent adds to slot-base"] = \
        f"{added} bytes (base {base['Size']} -> {final['Size']})"
