"""images/seccomp-slot.json (docs/docker-seccomp.md): Docker's default seccomp
profile plus the calls a slot's box needs. With it, the agent in
slot-agent:latest, as root with Docker's default capabilities and no
--privileged, builds its boxes in a user namespace: the namespaces rung is
available, commands start in /workspace and cannot see the other slots, and
the uid rung says why it is gone. Without it (Docker's default profile) the
agent still works, without boxes, as before."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from images_lib import (CONTAINERS, FIGURES, IMAGE, ROOT, TOKEN_PATH, hello, logs,
                        published_port, running)

PROFILE = ROOT / "images" / "seccomp-slot.json"
AGENT_ARGS = ["--slots", "3", "--log-level", "info"]
# What the profile allows beyond Docker's default, unconditionally.
ADDED = {"unshare", "setns", "mount", "umount", "umount2", "open_tree", "move_mount",
         "mount_setattr", "fsopen", "fsconfig", "fsmount", "chroot"}


def _rules(p: dict) -> list[dict]:
    return p["syscalls"]


def test_profile_is_docker_default_plus_the_box() -> None:
    """The file parses, denies by default, and its only rule beyond Docker's
    default is the documented one; the default's own conditional rules (by
    capability and architecture) are kept, so Docker resolves them as it does
    for its built-in profile."""
    p = json.loads(PROFILE.read_text())
    assert p["defaultAction"] == "SCMP_ACT_ERRNO"
    assert p["archMap"][0]["architecture"] == "SCMP_ARCH_X86_64"
    ours = [r for r in _rules(p) if r.get("comment", "").startswith("slot-agent")]
    assert len(ours) == 1 and set(ours[0]["names"]) == ADDED, ours
    assert ours[0]["action"] == "SCMP_ACT_ALLOW" and not ours[0]["args"]
    assert not ours[0]["includes"] and not ours[0]["excludes"]
    # Docker's rules: the unconditional allowlist, then conditional ones.
    base = [r for r in _rules(p) if r not in ours]
    allow = base[0]
    assert allow["action"] == "SCMP_ACT_ALLOW" and not allow["includes"]
    assert not ADDED & set(allow["names"]), "the default allowlist already lists a box call"
    for dangerous in ("bpf", "ptrace", "kexec_load", "init_module", "perf_event_open", "keyctl",
                      "add_key", "pivot_root", "clone3", "sethostname"):
        assert dangerous not in allow["names"], dangerous
    sys_admin = [r for r in base if r["includes"].get("caps") == ["CAP_SYS_ADMIN"]]
    assert len(sys_admin) == 1 and {"unshare", "mount", "bpf"} <= set(sys_admin[0]["names"])
    clone3 = [r for r in base if r["names"] == ["clone3"] and r["action"] == "SCMP_ACT_ERRNO"]
    assert {r["errnoRet"] for r in clone3} == {38, 89}  # ENOSYS (MIPS: 89), as Docker's
    masked = [r for r in base if r["names"] == ["clone"] and r["args"]]
    assert masked and all(a["value"] == 0x7E020000 for r in masked for a in r["args"])


def _start(prefix: str, token_file: Path, *flags: str) -> str:
    return CONTAINERS.run(prefix, *flags, "-p", "127.0.0.1::7070",
                          "-v", f"{token_file}:{TOKEN_PATH}:ro", IMAGE,
                          "--listen", "tcp:0.0.0.0:7070", "--insecure", "--token-file", TOKEN_PATH,
                          "--data-dir", "/data", *AGENT_ARGS)


@pytest.fixture(scope="module")
def own_token(tmp_path_factory) -> tuple[Path, str]:
    """A token file as docs/docker-seccomp.md advises: owned by a uid other
    than 0, mode 0400. The agent (root with CAP_DAC_OVERRIDE) reads it; a
    box, whose user namespace maps uid 0 only, cannot."""
    d = tmp_path_factory.mktemp("seccomp-token")
    os.chmod(d, 0o755)
    token = os.urandom(24).hex()
    f = d / "slot-token"
    f.write_text(token + "\n")
    os.chown(f, 65534, 65534)
    os.chmod(f, 0o400)
    return f, token


@pytest.fixture(scope="module")
def boxed(images, own_token) -> Iterator[Any]:
    """The agent under images/seccomp-slot.json: root, Docker's default
    capabilities, no --privileged, a pids limit (RLIMIT_NPROC does not bind
    uid 0, which box commands run as)."""
    token_file, token = own_token
    name = _start("slot-img-seccomp", token_file, "--security-opt", f"seccomp={PROFILE}",
                  "--pids-limit", "512")
    try:
        client, res = hello(published_port(name), token, timeout=30, alive=lambda: running(name))
        yield name, client, res
        client.close()
        assert running(name), f"the agent died:\n{logs(name)[-3000:]}"
    finally:
        CONTAINERS.rm(name)


def _exec(client, slot: int, cmd: str, **kw) -> dict:
    r = client.call("exec", {"slot": slot, "cmd": cmd, **kw}, timeout=60)
    assert r["exit_code"] == 0, r
    return r


def test_profile_gives_boxes(boxed) -> None:
    name, client, res = boxed
    iso, d = res["isolation"], res["isolation_detail"]
    assert iso["namespaces"] is True, d
    assert iso["landlock"] and iso["seccomp"] and iso["rlimits"] and iso["containment"], iso
    assert d["root"] is True and d["user_namespace"] is True, d
    assert d["network_namespace"] is True, d
    assert res["workspace_view"] == "/workspace", res
    # A box's user namespace maps uid 0 alone: no slot users, and it says so.
    assert iso["uid"] is False
    assert "maps only uid 0" in d["unavailable"]["uid"], d["unavailable"]
    FIGURES["seccomp-slot.json: uid rung"] = d["unavailable"]["uid"]


def test_commands_see_workspace_not_other_slots(boxed) -> None:
    _, client, _ = boxed
    r = _exec(client, 0, "echo secret > secret.txt; pwd; echo $$")
    pwd, pid = r["stdout"].decode().split()
    assert pwd == "/workspace" and int(pid) < 100, r  # a PID namespace of its own
    assert "namespaces" in r["isolation"], r["isolation"]
    r = _exec(client, 1, "pwd; echo $SLOT_WORKSPACE; ls /data/slots; ls /workspace; "
                         "cat /data/slots/0/work/secret.txt 2>&1 || true")
    lines = r["stdout"].decode().splitlines()
    assert lines[:3] == ["/workspace", "/workspace", "1"], lines  # siblings hidden
    assert "secret.txt" not in lines and "No such file" in lines[-1], lines
    # nor write there: the box shows no such directory
    r = client.call("exec", {"slot": 1, "cmd": "echo x > /data/slots/0/work/planted"},
                    timeout=60)
    assert r["exit_code"] != 0, r
    r = _exec(client, 0, "cat secret.txt; ls")
    assert r["stdout"] == b"secret\nsecret.txt\n", r


def test_box_keeps_tmp_network_and_token(boxed, own_token) -> None:
    _, client, _ = boxed
    _exec(client, 0, "touch /tmp/mine-0")
    r = _exec(client, 2, "ls /tmp")
    assert b"mine-0" not in r["stdout"], r
    # network=false: an empty network namespace (only lo)
    r = _exec(client, 2, "cat /proc/net/dev", network=False)
    ifaces = [ln.split(b":")[0].strip() for ln in r["stdout"].splitlines()[2:]]
    assert ifaces == [b"lo"], r["stdout"]
    # the token file (uid 65534, 0400) is out of the box's reach
    r = client.call("exec", {"slot": 0, "cmd": f"cat {TOKEN_PATH}"}, timeout=60)
    assert r["exit_code"] != 0 and b"Permission denied" in r["stderr"], r
    assert own_token[1].encode() not in r["stdout"]
    # nor can it mount, unshare or chroot: the agent's own filter
    r = client.call("exec", {"slot": 0, "cmd": "unshare -U true; mount -t tmpfs x /tmp"},
                    timeout=60)
    assert r["exit_code"] != 0 and b"Operation not permitted" in r["stderr"], r
    assert "seccomp" in r["isolation"], r


def test_default_profile_still_works(images, own_token) -> None:
    """Docker's default profile: no box (unshare is refused, also with a user
    namespace), slot users instead; commands run in the host path."""
    token_file, token = own_token
    name = _start("slot-img-noseccomp", token_file)
    try:
        client, res = hello(published_port(name), token, timeout=30, alive=lambda: running(name))
        iso, d = res["isolation"], res["isolation_detail"]
        assert iso["namespaces"] is False and iso["uid"] is True, d
        assert "unshare: Operation not permitted" in d["unavailable"]["namespaces"], d
        assert res["workspace_view"] == "/data/slots/{slot}/work", res
        r = _exec(client, 1, "id -u; pwd")
        assert r["stdout"] == b"20001\n/data/slots/1/work\n", r
        assert "namespaces" not in r["isolation"] and "uid" in r["isolation"], r
        client.close()
        assert running(name), logs(name)[-3000:]
    finally:
        CONTAINERS.rm(name)


def _template_roundtrip(client) -> dict:
    """A template built in the container, leased by two slots: each sees it,
    changes stay their own."""
    r = client.call("template_build", {"name": "t", "script": "mkdir src; echo base > src/f"},
                    timeout=120)
    assert r["built"] is True, r
    out = {}
    for slot in (0, 1):
        lr = client.call("lease", {"slot": slot, "trajectory_id": f"t{slot}", "template": "t"},
                         timeout=120)
        out[slot] = lr
    _exec(client, 0, "echo changed > src/f")
    assert _exec(client, 1, "cat src/f")["stdout"] == b"base\n"
    assert _exec(client, 0, "cat src/f")["stdout"] == b"changed\n"
    return out


def test_templates_overlay_with_the_profile_and_a_volume(images, own_token) -> None:
    """With the profile and the data dir on a volume (overlayfs cannot put
    its upper layer on the container's own overlayfs), slots stand on
    templates as overlays made in the box's user namespace."""
    token_file, token = own_token
    vol = f"slot-img-tpl-{os.urandom(4).hex()}"
    name = CONTAINERS.run("slot-img-tpl", "--security-opt", f"seccomp={PROFILE}",
                          "--pids-limit", "512", "-v", f"{vol}:/data", "-p", "127.0.0.1::7070",
                          "-v", f"{token_file}:{TOKEN_PATH}:ro", IMAGE,
                          "--listen", "tcp:0.0.0.0:7070", "--insecure", "--token-file", TOKEN_PATH,
                          "--data-dir", "/data", *AGENT_ARGS)
    try:
        client, res = hello(published_port(name), token, timeout=30, alive=lambda: running(name))
        assert res["templates"]["mode"] == "overlay", res["templates"]
        leases = _template_roundtrip(client)
        assert {x["workspace_mode"] for x in leases.values()} == {"overlay"}, leases
        client.close()
    finally:
        CONTAINERS.rm(name)
        import subprocess
        subprocess.run(["docker", "volume", "rm", "-f", vol], capture_output=True, timeout=60)


def test_templates_copy_without_the_profile(images, own_token) -> None:
    """Docker's default profile: no box, so templates are copies; they work."""
    token_file, token = own_token
    name = _start("slot-img-tplcopy", token_file)
    try:
        client, res = hello(published_port(name), token, timeout=30, alive=lambda: running(name))
        assert res["templates"]["mode"] == "copy" and res["templates"]["why"], res["templates"]
        leases = _template_roundtrip(client)
        assert {x["workspace_mode"] for x in leases.values()} == {"copy"}, leases
        client.close()
    finally:
        CONTAINERS.rm(name)
