"""A SWE-style end-to-end run through the controller, with no network.

The project is lazr.uri 1.0.6 (Canonical's RFC 3986 URI library), taken from
the Debian package python3-lazr.uri installed on this machine
(/usr/lib/python3/dist-packages/lazr/uri): its source (`lazr/uri/__init__.py`,
`lazr/uri/_uri.py`) and its unit tests (`lazr/uri/tests/test_uri.py`, 9
tests; `test_docs.py` is left out: it is a unittest `load_tests` doctest
harness that pytest does not collect). It is committed into a fresh git
repository (the base commit), cloned bare into a world-readable origin under
/var/tmp (the slots' boxes see the host's root read-only).

Three task instances, each a commit on top of the base that breaks one or
two tests (the task's broken commit), the fix (the base's `_uri.py`), a
plausible wrong fix, and the failing tests' node ids; all verified from the
host first (broken: exactly those fail; fixed: they pass; wrong: they fail;
base: the whole suite passes), so nothing here can pass vacuously.

Per task, a template "repo at the broken commit": the acquire recipe clones
the origin into `repo/`, checks the commit out and warms the bytecode
caches with `pytest --collect-only`. Then the example trainer loop: G=8
trajectories at once through ControllerToolBackend(template=recipe), each
checking it starts from the pristine broken checkout, writing a marker and
a candidate `_uri.py` (even index: the fix, odd: the wrong fix) with
write_file, running the failing tests with bash, reading the junit result
with read_file, and releasing with reset. One trajectory per task forks after
writing its patch; the fork writes the other candidate and runs the tests on
its own. Rewards must come out exactly as expected, no slot may see another's
files, each template must be built exactly once, and a fresh acquire of each
template afterwards must show the pristine broken checkout.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, Controller

sys.path.insert(0, str(ROOT / "controller" / "python"))
from slot_client import ControllerToolBackend, Slot  # noqa: E402

PROJECT = Path("/usr/lib/python3/dist-packages/lazr/uri")
PROJECT_FILES = ["__init__.py", "_uri.py", "tests/__init__.py", "tests/test_uri.py"]
SOURCE = "lazr/uri/_uri.py"  # the file every task breaks and every candidate rewrites
TEST_FILE = "lazr/uri/tests/test_uri.py"
G = 8  # trajectories per task
SLOTS = G + 1  # and one fork
PYTHON = "/usr/bin/python3"
GIT_ID = ["-c", "user.name=slot e2e", "-c", "user.email=slot-e2e@example.invalid"]

CONFIG = f"""
profiles:
  default:
    slots_per_agent: {SLOTS}
    min_agents: 1
    max_agents: 1
    acquire_timeout: 180s
    exec_timeout: 2m
"""


@dataclass
class Task:
    name: str
    failing: list[str]  # pytest node ids
    old: str  # a line of the base's _uri.py ...
    broken: str  # ... as the task's broken commit has it
    wrong: str  # ... as a plausible wrong fix has it
    # filled in by make_origin
    broken_sha: str = ""
    base_text: str = ""  # the fix: _uri.py as the base has it
    broken_text: str = ""
    wrong_text: str = ""
    fix_patch: str = ""  # `git diff broken base`, for the record
    template: str = ""
    rewards: list[float] = field(default_factory=list)


def node(test: str) -> str:
    return f"{TEST_FILE}::URITestCase::{test}"


TASKS = [
    # merge() ignores has_authority: test_merge fails.
    Task("merge-authority", [node("test_merge")],
         "    if has_authority and basepath == '':\n",
         "    if basepath == '':\n",
         "    if not has_authority and basepath == '':\n"),
    # The default port is looked up by host: ':80' stays, two tests fail.
    Task("default-port", [node("test_normalisation"), node("test_hashable")],
         "            if self.port == _default_port.get(self.scheme):\n",
         "            if self.port == _default_port.get(self.host):\n",
         "            if self.port == 80:\n"),  # the port is a str: never equal
    # underDomain() compares strings, not labels: 'unchpad.dev' matches.
    Task("underdomain-labels", [node("test_underDomain_doesnt_match_non_subdomain")],
         "        return our_segments[-len(domain_segments):] == domain_segments\n",
         "        return self.host.endswith(domain)\n",
         "        return domain in self.host\n"),
]


def git(cwd: Path, *args: str) -> str:
    r = subprocess.run(["git", *GIT_ID, *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"git {' '.join(args)}: {r.stderr}"
    return r.stdout


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("PYTEST") and k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}


def make_origin(root: Path) -> Path:
    """The project at its base commit, a broken commit per task (branch
    task/NAME), cloned bare into root/origin.git. Fills the tasks in."""
    work = root / "work"
    (work / "lazr").mkdir(parents=True)
    for rel in PROJECT_FILES:
        dst = work / "lazr" / "uri" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROJECT / rel, dst)
    # Upstream's lazr/__init__.py is a namespace declaration; a plain package
    # here makes the checkout's copy win over the installed one.
    (work / "lazr" / "__init__.py").write_text("# lazr namespace (plain package in this repo)\n")
    (work / ".gitignore").write_text("__pycache__/\n.pytest_cache/\n")
    (work / "README").write_text("lazr.uri 1.0.6, source and unit tests from Debian's "
                                 "python3-lazr.uri\n")
    git(work, "init", "-q", "-b", "main")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "lazr.uri 1.0.6 (from python3-lazr.uri)")
    base = git(work, "rev-parse", "HEAD").strip()
    base_text = (work / SOURCE).read_text()
    for t in TASKS:
        assert base_text.count(t.old) == 1, t.name
        t.base_text = base_text
        t.broken_text = base_text.replace(t.old, t.broken)
        t.wrong_text = base_text.replace(t.old, t.wrong)
        git(work, "checkout", "-q", "-b", f"task/{t.name}", base)
        (work / SOURCE).write_text(t.broken_text)
        git(work, "commit", "-q", "-am", f"task {t.name}: break it")
        t.broken_sha = git(work, "rev-parse", "HEAD").strip()
        t.fix_patch = git(work, "diff", t.broken_sha, base)
        changed = [ln for ln in t.fix_patch.splitlines()[4:] if ln[:1] in "+-"]
        assert changed == ["-" + t.broken.rstrip("\n"), "+" + t.old.rstrip("\n")], t.fix_patch
    git(work, "checkout", "-q", "main")
    origin = root / "origin.git"
    git(root, "clone", "-q", "--bare", str(work), str(origin))
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return origin


def verify_on_host(root: Path, origin: Path) -> None:
    """Each task's tests fail at its broken commit (exactly those), pass with
    the fix, fail with the wrong fix; the base passes the whole suite."""
    runs = []

    def start(name: str, sha: str, text: str | None, nodes: list[str]) -> None:
        d = root / "host" / name
        git(root, "clone", "-q", str(origin), str(d))
        git(d, "checkout", "-q", "--detach", sha)
        if text is not None:
            (d / SOURCE).write_text(text)
        p = subprocess.Popen([PYTHON, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider",
                              *nodes], cwd=d, env=clean_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
        runs.append((name, p))

    start("base", "main", None, [])
    for t in TASKS:
        start(f"{t.name}-broken", t.broken_sha, None, [])  # the whole suite
        start(f"{t.name}-fixed", t.broken_sha, t.base_text, t.failing)
        start(f"{t.name}-wrong", t.broken_sha, t.wrong_text, t.failing)
    out = {}
    for name, p in runs:
        text, _ = p.communicate(timeout=120)
        out[name] = (p.returncode, text)
    rc, text = out["base"]
    assert rc == 0 and "9 passed" in text, text
    for t in TASKS:
        rc, text = out[f"{t.name}-broken"]
        failed = sorted(line.split()[1] for line in text.splitlines()
                        if line.startswith("FAILED "))
        assert rc == 1 and failed == sorted(t.failing), (t.name, text)
        assert f"{9 - len(t.failing)} passed" in text, (t.name, text)
        rc, text = out[f"{t.name}-fixed"]
        assert rc == 0 and f"{len(t.failing)} passed" in text, (t.name, text)
        rc, text = out[f"{t.name}-wrong"]
        assert rc == 1 and f"{len(t.failing)} failed" in text, (t.name, text)


def recipe(t: Task, origin: Path) -> dict:
    script = f"""set -eu
# The origin belongs to another user (root, the slots run as their own):
# git wants it declared safe (-c would not reach the upload-pack it runs).
export GIT_CONFIG_GLOBAL="$(mktemp)"
git config --global safe.directory {origin}
git clone -q --no-hardlinks {origin} repo
cd repo
git checkout -q --detach {t.broken_sha}
test "$(git rev-parse HEAD)" = {t.broken_sha}
test -z "$(git status --porcelain)"
{PYTHON} -m pytest --collect-only -q -p no:cacheprovider >/dev/null
"""
    return {"name": t.template, "script": script}


@dataclass
class Outcome:
    tid: str
    task: str
    candidate: str  # "fix" or "wrong"
    reward: float
    seconds: float
    forked_from: str | None = None
    uid: str = ""  # the slot's user, as its commands see it
    mode: str = ""  # workspace_mode


class Failure(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)


async def run_task(backend: ControllerToolBackend, t: Task, fork_index: int) -> list[Outcome]:
    timeout = 120.0

    async def calls(slot: Slot, *cs: tuple[str, dict]) -> list:
        return await backend.execute_batch([(slot, tool, args) for tool, args in cs],
                                           timeout_s=timeout)

    async def markers(slot: Slot) -> set[str]:
        [r] = await calls(slot, ("bash", {"command": "ls -A"}))
        check(r.success, f"ls: {r.error} {r.output}")
        return {n for n in r.output.split() if n.startswith("marker-")}

    async def evaluate(slot: Slot, tid: str, candidate: str) -> float:
        """Run the task's failing tests; the reward from the exit code,
        cross-checked against the junit file read back."""
        junit = f"junit-{tid}.xml"
        cmd = (f"cd repo && {PYTHON} -m pytest -q -p no:cacheprovider "
               f"--junitxml=../{junit} {' '.join(t.failing)}")
        [r] = await calls(slot, ("bash", {"command": cmd}))
        code = r.metadata.get("exit_code")
        # 0: passed, 1: tests failed; anything else (usage, collection) is a broken run
        check(code in (0, 1), f"{tid}: pytest exit {code}: {r.error}\n{r.output[-2000:]}")
        check(r.success == (code == 0), f"{tid}: success {r.success} vs exit {code}")
        [x] = await calls(slot, ("read_file", {"path": junit}))
        check(x.success, f"{tid}: read_file {junit}: {x.error}")
        suite = ET.fromstring(x.output)
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n, bad = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors"))
        check(n == len(t.failing), f"{tid}: junit ran {n} tests, wanted {len(t.failing)}")
        check((bad == 0) == (code == 0), f"{tid}: junit {bad} bad vs exit {code}")
        want_fail = 0 if candidate == "fix" else len(t.failing)
        check(bad == want_fail, f"{tid}: {bad} failed with the {candidate}, wanted {want_fail}:"
                                f"\n{r.output[-2000:]}")
        return 1.0 if code == 0 else 0.0

    def text_of(candidate: str) -> str:
        return t.base_text if candidate == "fix" else t.wrong_text

    async def branch(slot: Slot, tid: str, candidate: str, parent: str, t0: float) -> Outcome:
        """The fork: it starts where its parent was (the parent's marker and
        candidate), writes its own marker and the other candidate."""
        try:
            other = "wrong" if candidate == "fix" else "fix"
            [r] = await calls(slot, ("read_file", {"path": f"repo/{SOURCE}"}))
            check(r.success and r.output == text_of(other),
                  f"{tid}: the fork does not start from its parent's candidate")
            check(await markers(slot) == {f"marker-{parent}"}, f"{tid}: markers at fork")
            [u] = await calls(slot, ("bash", {"command": "id -u && git -C repo rev-parse HEAD"}))
            check(u.success and u.output.split()[1:] == [t.broken_sha], f"{tid}: {u}")
            w = await calls(slot, ("write_file", {"path": f"marker-{tid}", "content": tid}),
                            ("write_file", {"path": f"repo/{SOURCE}",
                                            "content": text_of(candidate)}))
            check(all(x.success for x in w), f"{tid}: write_file: {[x.error for x in w]}")
            reward = await evaluate(slot, tid, candidate)
            check(await markers(slot) == {f"marker-{parent}", f"marker-{tid}"},
                  f"{tid}: markers after the run")
            return Outcome(tid, t.name, candidate, reward, time.monotonic() - t0, parent,
                           uid=u.output.split()[0])
        finally:
            await backend.release(slot, reset_workspace=True)

    async def trajectory(i: int) -> list[Outcome]:
        tid = f"{t.name}-{i}"
        candidate = "fix" if i % 2 == 0 else "wrong"
        t0 = time.monotonic()
        slot = await backend.acquire(trajectory_id=tid)
        forked: asyncio.Task | None = None
        try:
            check(slot.metadata.get("template") == t.template, f"{tid}: {slot.metadata}")
            check(slot.metadata.get("workspace_mode") in ("overlay", "copy"), str(slot.metadata))
            # The pristine broken checkout: nobody's patch, marker or result.
            first = await calls(slot, ("bash", {"command": "id -u; ls -A; cd repo && "
                                                           "git rev-parse HEAD && "
                                                           "git status --porcelain"}),
                                ("read_file", {"path": f"repo/{SOURCE}"}))
            check(first[0].success, f"{tid}: {first[0].error}: {first[0].output}")
            uid, *lines = first[0].output.split()
            check(lines == ["repo", t.broken_sha], f"{tid}: start state {first[0].output!r}")
            check(first[1].success and first[1].output == t.broken_text,
                  f"{tid}: _uri.py is not the broken commit's")
            w = await calls(slot, ("write_file", {"path": f"marker-{tid}", "content": tid}),
                            ("write_file", {"path": f"repo/{SOURCE}",
                                            "content": text_of(candidate)}))
            check(all(x.success for x in w), f"{tid}: write_file: {[x.error for x in w]}")
            if i == fork_index:
                child = await backend.fork(slot, trajectory_id=tid + "-fork")
                check(child.slot_id != slot.slot_id and child.alloc_id == slot.alloc_id,
                      f"{tid}: fork {child} of {slot}")
                other = "wrong" if candidate == "fix" else "fix"
                forked = asyncio.ensure_future(branch(child, tid + "-fork", other, tid, t0))
            reward = await evaluate(slot, tid, candidate)
            check(await markers(slot) == {f"marker-{tid}"}, f"{tid}: markers after the run")
            [r] = await calls(slot, ("read_file", {"path": f"repo/{SOURCE}"}))
            check(r.output == text_of(candidate), f"{tid}: someone changed this slot's patch")
            mine = Outcome(tid, t.name, candidate, reward, time.monotonic() - t0, uid=uid,
                           mode=str(slot.metadata.get("workspace_mode")))
        finally:
            await backend.release(slot, reset_workspace=True)
            if forked is not None and not forked.done():
                await asyncio.wait([forked])
        return [mine] + ([forked.result()] if forked is not None else [])

    groups = await asyncio.gather(*(trajectory(i) for i in range(G)))
    return [o for g in groups for o in g]


async def pristine(backend: ControllerToolBackend, t: Task) -> None:
    """A fresh acquire of the template (by name: no recipe, no build) shows
    the broken commit untouched."""
    slot = await backend.acquire(trajectory_id=f"check-{t.name}", template=t.template)
    try:
        rs = await backend.execute_batch([
            (slot, "bash", {"command": "ls -A; cd repo && git rev-parse HEAD && "
                                       "git status --porcelain --ignored=no && echo END"}),
            (slot, "read_file", {"path": f"repo/{SOURCE}"})], timeout_s=60)
        assert rs[0].success, rs[0]
        assert rs[0].output.split() == ["repo", t.broken_sha, "END"], rs[0].output
        assert rs[1].success and rs[1].output == t.broken_text
    finally:
        await backend.release(slot, reset_workspace=True)


@pytest.fixture
def swe_root() -> Iterator[Path]:
    """World-readable (0755 parents), so the slots' boxes can clone the
    origin, and so the agent's data dir under it lets an agent running as
    root give each slot a user of its own (the controller fixture's /tmp
    directory is 0700). Requested before controller_factory, so it goes
    after the controller has stopped."""
    d = Path(tempfile.mkdtemp(prefix="slot-swe-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_swe_tasks_through_templates(swe_root: Path, controller_factory, capsys) -> None:
    if not (PROJECT / "_uri.py").is_file():
        pytest.skip("python3-lazr.uri is not installed")
    t_start = time.monotonic()
    origin = make_origin(swe_root)
    for t in TASKS:
        t.template = f"swe-{t.name}-{t.broken_sha[:10]}"
    verify_on_host(swe_root, origin)
    t_host = time.monotonic() - t_start

    (swe_root / "data").mkdir(mode=0o755)
    ctl: Controller = controller_factory(CONFIG + f"    workspace_base: {swe_root / 'data'}\n")
    c = ctl.client(timeout=120)
    outcomes: list[Outcome] = []
    task_seconds: dict[str, float] = {}

    async def main() -> None:
        for k, t in enumerate(TASKS):
            t0 = time.monotonic()
            backend = ControllerToolBackend(ctl.addr, template=recipe(t, origin),
                                            acquire_timeout_s=180)
            await backend.start()
            try:
                outcomes.extend(await run_task(backend, t, fork_index=k % G))
            finally:
                await backend.stop()
            task_seconds[t.name] = time.monotonic() - t0
            # Built once, by the first of the G acquires; the rest waited for it.
            ag = c.call("templates")["agents"]
            assert len(ag) == 1 and ag[0]["builds"] == k + 1, ag
        backend = ControllerToolBackend(ctl.addr, acquire_timeout_s=180)
        await backend.start()
        try:
            for t in TASKS:
                await pristine(backend, t)
        finally:
            await backend.stop()

    asyncio.run(main())

    ag = c.call("templates")["agents"]
    c.close()
    assert len(ag) == 1 and ag[0]["builds"] == len(TASKS), ag
    names = [x["name"] for x in ag[0]["templates"]]
    assert sorted(names) == sorted(t.template for t in TASKS), names

    # Rewards, exactly: even index the fix (1.0), odd the wrong fix (0.0),
    # each fork the other candidate of its parent.
    by_tid = {o.tid: o for o in outcomes}
    assert len(by_tid) == len(outcomes) == len(TASKS) * (G + 1), sorted(by_tid)
    for k, t in enumerate(TASKS):
        for i in range(G):
            o = by_tid[f"{t.name}-{i}"]
            assert o.reward == (1.0 if i % 2 == 0 else 0.0), o
        f = by_tid[f"{t.name}-{k % G}-fork"]
        assert f.forked_from == f"{t.name}-{k % G}"
        assert f.reward == (0.0 if (k % G) % 2 == 0 else 1.0), f
        t.rewards = [by_tid[f"{t.name}-{i}"].reward for i in range(G)] + [f.reward]

    total = time.monotonic() - t_start
    secs = sorted(o.seconds for o in outcomes)
    with capsys.disabled():
        print(f"\nSWE e2e: lazr.uri 1.0.6, {len(TASKS)} tasks x {G} trajectories + 1 fork each; "
              f"host setup+verify {t_host:.1f} s, total {total:.1f} s")
        for t in TASKS:
            mine = [o.seconds for o in outcomes if o.task == t.name]
            print(f"  {t.name:20s} rewards {' '.join(f'{r:g}' for r in t.rewards[:G])} "
                  f"fork {t.rewards[G]:g}  task {task_seconds[t.name]:.1f} s, trajectory "
                  f"mean {sum(mine) / len(mine):.2f} s max {max(mine):.2f} s")
        print(f"  trajectory time: min {secs[0]:.2f} s, median {secs[len(secs) // 2]:.2f} s, "
              f"max {secs[-1]:.2f} s; workspaces {sorted({o.mode for o in outcomes if o.mode})}, "
              f"{len({o.uid for o in outcomes})} distinct slot users")
