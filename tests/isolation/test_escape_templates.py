"""Templates under attack, in each condition of conftest.py: slot 0 stands on
a template (an overlay where a box can mount one, else a copy) and tries to
reach the template's layer, another slot's upper layer, and to change the
template through its own workspace (writes, chmod, hardlinks, renames,
forged overlay xattrs and whiteouts, mounts). Afterwards a fresh slot on the
same template sees exactly the original files, and so does the victim."""
from __future__ import annotations

import io
import tarfile

from conftest import RESULTS, Cond
from test_escape import ATTACKER, BYSTANDER, VICTIM, applied, blocked, escape, run, still_fine

FILES = {"repo/a.txt": b"alpha\n", "repo/sub/b.txt": b"beta\n", "repo/untouched.txt": b"u\n",
         "keep.txt": b"keep\n"}
CHECK = "cat repo/a.txt repo/sub/b.txt keep.txt; ls -A repo; stat -c %a repo/a.txt"


def tar() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in FILES.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mode = 0o644
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def lease(cd: Cond, slot: int) -> dict:
    c = cd.client
    c.call("reset", {"slot": slot})
    c.call("unlease", {"slot": slot}) if c.call("slots", {"slot": slot})["slots"][0]["leased"] \
        else None
    return c.call("lease", {"slot": slot, "trajectory_id": f"esc-{slot}", "template": "esc"})


def view(cd: Cond, slot: int) -> bytes:
    r = run(cd, CHECK, slot=slot)
    assert r["exit_code"] == 0, r
    return r["stdout"]


def test_template_cannot_be_changed_from_a_slot(cond: Cond) -> None:
    c = cond.client
    if not any(t["name"] == "esc" for t in c.call("template_list")["templates"]):
        c.call("template_put", {"name": "esc", "data": tar(), "done": True})
    mode = c.call("hello")["templates"]["mode"]
    for slot in (ATTACKER, VICTIM, BYSTANDER):
        assert lease(cond, slot)["workspace_mode"] == mode
    original = view(cond, BYSTANDER)
    layer = f"{cond.data}/templates/esc/layer"
    upper_of_victim = f"{cond.data}/overlay/{VICTIM}"

    # The template's layer and the victim's upper layer by path.
    for what, path in (("write template layer", f"{layer}/keep.txt"),
                       ("write into template layer", f"{layer}/planted"),
                       ("list other slot's upper layer", upper_of_victim)):
        out, r = escape(cond, "list" if "list" in what else "write", path)
        err = blocked(out)
        RESULTS[(what, cond.name)] = "namespaces" if err == "ENOENT" else \
            applied(r, "uid", "landlock")
        assert RESULTS[(what, cond.name)], (what, out)
    # Through the workspace: every change stays the slot's own.
    r = run(cond, "echo evil >> repo/a.txt; chmod 777 repo/a.txt; ln repo/a.txt hard;"
                  " echo more >> hard; mv repo/sub repo/moved || cp -r repo/sub repo/moved;"
                  " rm -rf repo/sub keep.txt; ln -s /etc/passwd keep.txt; true")
    assert r["exit_code"] == 0, r
    # Forged overlay metadata: refused, or stored as the slot's own data
    # (overlayfs escapes user.overlay.* written through it), never read as
    # a marker by the layers made from it (checked below).
    for name in ("user.overlay.opaque", "trusted.overlay.opaque"):
        out, r = escape(cond, "xattr", "repo", name)
        if out.startswith("blocked"):
            RESULTS[(f"forge {name}", cond.name)] = \
                applied(r, "uid", "seccomp", "landlock") or "kernel"
    out, r = escape(cond, "whiteout", "repo/untouched.txt.wh")
    if out.startswith("blocked"):
        RESULTS[("forge a whiteout", cond.name)] = applied(r, "seccomp") or "kernel"
    out, r = escape(cond, "mount")
    blocked(out)
    # A template made from the attacker's workspace holds its changes, and
    # only those: the forged markers hide nothing of the template beneath.
    made = c.call("template_from_slot", {"slot": ATTACKER, "name": "esc-derived"})["template"]
    assert made["name"] == "esc-derived"
    c.call("reset", {"slot": BYSTANDER, "template": "esc-derived"})
    rd = run(cond, "cat repo/a.txt repo/untouched.txt; ls -A repo", slot=BYSTANDER)
    derived = rd["stdout"]
    if mode == "overlay":
        assert derived.startswith(b"alpha\nevil\nmore\nu\n"), (rd["stderr"], made)
        assert b"untouched.txt\n" in derived and b"moved" in derived, derived
    # In copy mode the workspace is a plain directory of the agent's
    # filesystem: what a forged marker does there (Docker's own overlayfs
    # may honour it) is the slot's own view, copied as the agent sees it.
    # The template, the victim and a fresh slot are untouched.
    assert view(cond, VICTIM) == original
    c.call("reset", {"slot": BYSTANDER, "template": "esc"})
    assert view(cond, BYSTANDER) == original
    lst = {t["name"]: t for t in c.call("template_list")["templates"]}
    assert lst["esc"]["files"] == 6, lst["esc"]
    for slot in (ATTACKER, VICTIM, BYSTANDER):
        c.call("reset", {"slot": slot})
        c.call("unlease", {"slot": slot})
    c.call("template_delete", {"name": "esc-derived"})
    still_fine(cond)
