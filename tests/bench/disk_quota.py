#!/usr/bin/python3
"""Per-slot disk and inode budgets (issue 21): what the quota costs, beside
the same without it. Figures printed, never asserted.

One run, on a data dir under /var/tmp (parents mode 0755, so an agent running
as root gives every slot its own user), with agents of 8 slots each, side by
side on the same machine:
- none:  `--slot-disk off --slot-inodes off --disk-reserve 0`: nothing is
  counted (the base the others are compared with);
- off:   `--slot-disk off --slot-inodes off`: no budgets, the default
  --disk-reserve: the watcher counts only when the data filesystem is under
  its reserve (to know which slot to stop), so here nothing;
- watch: `--slot-disk 1G --slot-inodes 100K --disk-mode watch`: the watcher
  (a forked worker counts busy slots' writable places every --disk-interval,
  default 250 ms, paced to <= 10% of the time; RLIMIT_FSIZE per command);
- fs:    `--slot-disk 1G --slot-inodes 100K` (--disk-mode auto): an ext4
  filesystem per slot where the agent can make one (root, loop devices,
  mkfs.ext4); left out, with a note, where auto falls back to the watcher.

Every slot holds a SWE-sized repository: a tree made for the run from real
source files of this machine (the Python standard library and dist-packages
*.py, /usr/include *.h: ~5,000 files, 60 MiB) with a .git of one commit (one
pack), copied into each slot with `cp -a` run by the slot itself.

1. exec `true`: p50/p99 and ops/s at concurrency 1 (slot 0; slots 1-7 each
   run `sleep`, so all 8 slots are busy and counted) and 8 (a connection per
   slot, all 8 running `true` back to back), beside a floor: `bash -c true`
   spawned from Python (subprocess: posix_spawn), 1 or 8 threads.
2. exec `echo x >> f` at concurrency 8 (a write: the slot's RLIMIT_FSIZE and
   the watcher's count of it), beside the same floor.
3. reset + lease again of slot 0 (slots 1-7 busy as in 1.): with the repo
   in the workspace (re-copied between resets, outside the figures), and
   with a few files only.
4. The watcher's own cost, 8 busy slots, one side after the other: scans/s
   (`stats` disk_scans), `disk_scan_ms` of the last pass, and the workers'
   CPU: the agent's reaped children (cutime + cstime of /proc/PID/stat) while
   the 8 slots run `sleep` (the children that end are then the workers
   alone), and the agent's children at nice 10 (the workers renice
   themselves), polled every 20 ms, also while the 8 slots run `true` back
   to back.
After the first copy, how long until every slot is counted with the repo.

The sides are measured in rounds, interleaved, so they see the same host
load. Usage: tests/bench/disk_quota.py [--build DIR] [--ops N] [--resets N]
[--window S] [--no-fs] (--build defaults to $SLOT_BUILD_DIR, else build/).
"""
from __future__ import annotations

import argparse
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "integration"))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from slotwire import Client, pack_frame  # noqa: E402
from templates import Agent, human, pct  # noqa: E402

SLOTS = 8
TREE_FILES = 5000
TREE_BYTES = 60 << 20  # with the .git and block rounding: ~60 MiB allocated
MAX_FILE = 48 << 10    # a few generated giants would make the copies slow, not the counts
SOURCES = (  # (where, name in the tree, suffix): real source files of this machine
    (f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}", "Lib", ".py"),
    ("/usr/lib/python3/dist-packages", "site-packages", ".py"),
    ("/usr/include", "include", ".h"),
)
QUOTA = ["--slot-disk", "1G", "--slot-inodes", "100K"]
OFF = ["--slot-disk", "off", "--slot-inodes", "off"]
SIDES = (("none", OFF + ["--disk-reserve", "0"]),
         ("off", OFF),
         ("watch", QUOTA + ["--disk-mode", "watch"]),
         ("fs", QUOTA))
BASE = "none"  # what the others are compared with
FLOOR_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/tmp", "LANG": "C.UTF-8", "TERM": "dumb"}
CLK = os.sysconf("SC_CLK_TCK")
SYNC_S = [0.0]


# ---------------------------------------------------------------- helpers

def pair(xs: list[float], digits: int = 2) -> str:
    """median/max: few samples (a nearest-rank p50 of two is the larger)."""
    return f"{statistics.median(xs):.{digits}f}/{max(xs):.{digits}f}" if xs else "-"


def sync() -> None:
    t0 = time.monotonic()
    os.sync()
    SYNC_S[0] += time.monotonic() - t0


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU ms of pid: utime+stime, cutime+cstime."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    ut, st, cut, cst = (int(x) for x in rest[11:15])
    return (ut + st) * 1000 / CLK, (cut + cst) * 1000 / CLK


def make_tree(dst: Path) -> tuple[int, int, int]:
    """Real source files (at most TREE_FILES, TREE_BYTES, none over MAX_FILE)
    under dst, and a
    .git of them: one commit, one pack (git fast-import). Returns (files,
    directories, bytes allocated) of the whole tree, .git included."""
    files: list[tuple[str, bytes]] = []
    size = 0
    for base, name, suffix in SOURCES:
        for dp, dns, fns in os.walk(base):
            dns[:] = sorted(d for d in dns if d != "__pycache__")
            for fn in sorted(fns):
                p = os.path.join(dp, fn)
                if (not fn.endswith(suffix) or os.path.islink(p) or len(files) >= TREE_FILES
                        or size >= TREE_BYTES or os.path.getsize(p) > MAX_FILE):
                    continue
                try:
                    data = Path(p).read_bytes()
                except OSError:
                    continue
                rel = f"{name}/{os.path.relpath(p, base)}"
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                (dst / rel).write_bytes(data)
                files.append((rel, data))
                size += len(data)
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q", "-b", "main", str(dst)], check=True)
        fi = subprocess.Popen(["git", "-C", str(dst), "fast-import", "--quiet"],
                              stdin=subprocess.PIPE)
        assert fi.stdin is not None
        w = fi.stdin
        for i, (_, data) in enumerate(files, 1):
            w.write(b"blob\nmark :%d\ndata %d\n%s\n" % (i, len(data), data))
        msg = b"the bench's repository"
        w.write(b"commit refs/heads/main\ncommitter bench <bench@localhost> 1700000000 +0000\n"
                b"data %d\n%s\n" % (len(msg), msg))
        for i, (rel, _) in enumerate(files, 1):
            w.write(b"M 100644 :%d %s\n" % (i, rel.encode()))
        w.write(b"\n")
        w.close()
        if fi.wait() != 0:
            raise RuntimeError("git fast-import failed")
        subprocess.run(["git", "-C", str(dst), "reset", "-q"], check=True)  # the index
    subprocess.run(["chmod", "-R", "a+rX", str(dst)], check=True)
    nfiles = ndirs = used = 0
    for dp, dns, fns in os.walk(dst):
        ndirs += len(dns)
        for fn in fns:
            nfiles += 1
            used += os.lstat(os.path.join(dp, fn)).st_blocks * 512
    return nfiles, ndirs, used


# ---------------------------------------------------------------- exec load

class Conn:
    """One Unix-socket connection with one exec in flight at a time."""

    def __init__(self, path: str, slot: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.slot = slot
        self.buf = bytearray()
        self.id = 0
        self.t0 = 0.0

    def send(self, cmd: str) -> None:
        self.id += 1
        self.t0 = time.perf_counter()
        self.sock.sendall(pack_frame({"id": self.id, "op": "exec", "args": {
            "slot": self.slot, "cmd": cmd, "timeout_ms": 60_000}}))

    def frames(self) -> list[dict]:
        out = []
        while len(self.buf) >= 4:
            (n,) = struct.unpack(">I", self.buf[:4])
            if len(self.buf) < 4 + n:
                break
            out.append(msgpack.unpackb(bytes(self.buf[4:4 + n]), raw=False,
                                       strict_map_key=False))
            del self.buf[:4 + n]
        return out


@dataclass
class Run:
    lat: list[float] = field(default_factory=list)
    wall: float = 0.0
    errors: int = 0
    first_error: str = ""

    def add(self, o: "Run") -> None:
        self.lat += o.lat
        self.wall += o.wall
        self.errors += o.errors
        self.first_error = self.first_error or o.first_error

    @property
    def ops(self) -> float:
        return len(self.lat) / self.wall if self.wall else 0.0


def drive(sock: str, slots: list[int], cmd: str, n: int = 0, secs: float = 0.0) -> Run:
    """exec cmd on slots, one connection per slot with one exec in flight
    each, n in all (or until secs have passed); latency from send to the
    whole answer."""
    conns = [Conn(sock, s) for s in slots]
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    res = Run()
    sent = inflight = 0
    start = time.perf_counter()
    deadline = start + secs

    def more() -> bool:
        return sent < n if n else time.perf_counter() < deadline

    for c in conns:
        if more():
            c.send(cmd)
            sent += 1
            inflight += 1
    try:
        while inflight:
            ready = sel.select(timeout=60)
            if not ready:
                raise RuntimeError(f"no answer from the agent in 60 s ({sock})")
            for key, _ in ready:
                c = key.data
                data = c.sock.recv(1 << 16)
                if not data:
                    raise RuntimeError(f"the agent closed the connection ({sock})")
                c.buf += data
                for f in c.frames():
                    if "event" in f:
                        continue
                    res.lat.append((time.perf_counter() - c.t0) * 1000)
                    inflight -= 1
                    r = f.get("result") or {}
                    if not f.get("ok") or r.get("exit_code") != 0 or r.get("disk_quota"):
                        res.errors += 1
                        res.first_error = res.first_error or str(
                            f.get("error") or {k: r.get(k) for k in (
                                "exit_code", "stderr", "disk_quota", "reason")})[:300]
                    if more():
                        c.send(cmd)
                        sent += 1
                        inflight += 1
    finally:
        res.wall = time.perf_counter() - start
        sel.close()
        for c in conns:
            c.sock.close()
    return res


def floor(conc: int, cmd: str, n: int) -> Run:
    """The same command spawned by this process: /bin/bash -c cmd with
    subprocess (posix_spawn: absolute path, close_fds=False, no cwd), stdin
    /dev/null, stdout/stderr to pipes drained to EOF, conc threads."""
    res = Run()
    lock = threading.Lock()

    def worker(k: int) -> None:
        for _ in range(k):
            t0 = time.perf_counter()
            r = subprocess.run(["/bin/bash", "-c", cmd], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               close_fds=False, env=FLOOR_ENV, check=False)
            dt = (time.perf_counter() - t0) * 1000
            with lock:
                res.lat.append(dt)
                if r.returncode:
                    res.errors += 1
                    res.first_error = res.first_error or r.stderr.decode(errors="replace")[:300]

    start = time.perf_counter()
    if conc == 1:
        worker(n)
    else:
        with ThreadPoolExecutor(conc) as ex:
            for f in [ex.submit(worker, n // conc + (i < n % conc)) for i in range(conc)]:
                f.result()
    res.wall = time.perf_counter() - start
    return res


def interleaved(sides: dict[str, Callable[[int], Run]], n: int, rounds: int,
                warm: int) -> dict[str, Run]:
    """n operations per side in `rounds` rounds, the order rotating, after
    `warm` operations per side that are not counted."""
    out = {k: Run() for k in sides}
    for fn in sides.values():
        fn(warm)
    names = list(sides)
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            out[k].add(sides[k](n // rounds))
    return out


# ---------------------------------------------------------------- agents

class Sleepers:
    """One `sleep` exec in each of the given slots: busy slots (the watcher
    counts them every pass) that use no CPU and are not reaped meanwhile."""

    def __init__(self, a: Agent, slots: list[int]) -> None:
        self.slots = slots
        self.c = a.client()
        self.ids = [self.c.send("exec", {"slot": s, "cmd": "exec sleep 3600",
                                         "timeout_ms": 3_600_000}) for s in slots]
        deadline = time.monotonic() + 20
        while True:
            st = self.c.call("slots")["slots"]
            if all(st[s].get("running") for s in slots):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the sleepers did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        for s in self.slots:
            self.c.call("cancel", {"slot": s})
        for i in self.ids:
            self.c.wait(i, timeout=30)
        self.c.close()


def exec_all(jobs: list[tuple[Agent, int, str]]) -> list[float]:
    """Run every (agent, slot, cmd) at once (one client per agent, the
    requests pipelined: different slots run in parallel); their duration_ms."""
    clients = {id(a): a.client() for a, _, _ in jobs}
    ids = [(clients[id(a)], s, cmd, clients[id(a)].send(
        "exec", {"slot": s, "cmd": cmd, "timeout_ms": 1_200_000})) for a, s, cmd in jobs]
    out = []
    for c, s, cmd, i in ids:
        f = c.wait(i, timeout=1500)[0]
        r = f.get("result") or {}
        if not f.get("ok") or r.get("exit_code") != 0:
            raise RuntimeError(f"slot {s}: `{cmd}`: {f.get('error') or r.get('stderr', b'')[-300:]}")
        out.append(float(r.get("duration_ms", 0)))
    for c in clients.values():
        c.close()
    return out


@dataclass
class Side:
    name: str
    agent: Agent
    start_ms: float

    @property
    def sock(self) -> str:
        return self.agent.sock

    @property
    def quota(self) -> dict[str, Any]:
        return self.agent.hello.get("disk_quota") or {}

    def stats(self) -> dict[str, Any]:
        c = self.agent.client()
        try:
            return c.call("stats")
        finally:
            c.close()

    def disk(self, slot: int) -> dict[str, Any]:
        c = self.agent.client()
        try:
            return c.call("slots", {"slot": slot})["slots"][0].get("disk") or {}
        finally:
            c.close()


def lease(c: Client, slot: int, tid: str) -> None:
    c.call("lease", {"slot": slot, "trajectory_id": tid})


# ---------------------------------------------------------------- 3. reset

@dataclass
class Reset:
    reset: list[float] = field(default_factory=list)
    relet: list[float] = field(default_factory=list)


def reset_once(side: Side, k: int, res: Reset) -> None:
    c = side.agent.client()
    try:
        t0 = time.perf_counter()
        c.call("reset", {"slot": 0}, timeout=600)
        t1 = time.perf_counter()
        c.call("unlease", {"slot": 0})
        lease(c, 0, f"reset-{k}")
        t2 = time.perf_counter()
    finally:
        c.close()
    res.reset.append((t1 - t0) * 1000)
    res.relet.append((t2 - t1) * 1000)


# ---------------------------------------------------------------- 4. watcher

def kids(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


class Workers(threading.Thread):
    """CPU of the agent's children at nice 10 (the disk watcher's counting
    workers renice themselves to 10; commands do not), polled every 20 ms:
    a pass's last < 20 ms are missed once it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.base: dict[int, float] = {}
        self.seen: dict[int, float] = {}
        self.halt = threading.Event()
        self.poll(first=True)

    def poll(self, first: bool = False) -> None:
        for k in kids(self.pid):
            try:
                with open(f"/proc/{k}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(rest[16]) != 10:  # field 19, nice
                continue
            cpu = (int(rest[11]) + int(rest[12])) * 1000 / CLK
            if first:
                self.base[k] = cpu
            self.seen[k] = max(self.seen.get(k, 0.0), cpu)

    def run(self) -> None:
        while not self.halt.wait(0.02):
            self.poll()

    def stop(self) -> float:
        self.halt.set()
        self.join()
        return sum(v - self.base.get(k, 0.0) for k, v in self.seen.items())


@dataclass
class Window:
    secs: float = 0.0
    scans: int = 0
    scan_ms: list[float] = field(default_factory=list)
    own_ms: float = 0.0
    child_ms: float = 0.0
    worker_ms: float = 0.0
    execs: int = 0
    counted: int = 0  # slots whose disk shows the repo, counted within the window

    def per_s(self, v: float) -> float:
        return v / self.secs if self.secs else 0.0


def window(side: Side, secs: float, load: Callable[[float], Any] | None,
           entries: int) -> Window:
    """What the agent, its reaped children and its nice-10 children (the
    counting workers) spent over secs, with `load` running (or just
    waiting); disk_scan_ms read after each pass (stats polled every 100 ms)."""
    w = Window()
    halt = threading.Event()
    c = side.agent.client()

    def sample() -> None:
        last = -1
        while not halt.wait(0.1):
            st = c.call("stats")
            if st.get("disk_scans", 0) != last and last >= 0:
                w.scan_ms.append(float(st.get("disk_scan_ms", 0)))
            last = st.get("disk_scans", 0)

    s0 = c.call("stats")
    own0, ch0 = proc_cpu(side.agent.proc.pid)
    t0 = time.perf_counter()
    workers = Workers(side.agent.proc.pid)
    workers.start()
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    if load:
        load(secs)
    else:
        time.sleep(secs)
    halt.set()
    th.join()
    w.worker_ms = workers.stop()
    w.secs = time.perf_counter() - t0
    own1, ch1 = proc_cpu(side.agent.proc.pid)
    s1 = c.call("stats")
    for x in c.call("slots")["slots"]:
        d = x.get("disk") or {}
        w.counted += (d.get("inodes", 0) >= 0.95 * entries
                      and 0 <= d.get("scanned_ms_ago", -1) <= w.secs * 1000)
    c.close()
    w.scans = s1.get("disk_scans", 0) - s0.get("disk_scans", 0)
    w.own_ms, w.child_ms = own1 - own0, ch1 - ch0
    w.execs = s1["exec"]["finished"] - s0["exec"]["finished"]
    return w


def counted_after(sides: list[Side], entries: int, limit: float) -> dict[str, float]:
    """Seconds until every slot's `disk` shows the repo (inodes >= 95% of
    its entries), per side with a count; limit when it never did."""
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    todo = [s for s in sides if s.quota.get("mechanism") != "none"]
    while todo and time.perf_counter() - t0 < limit:
        for s in list(todo):
            c = s.agent.client()
            st = c.call("slots")["slots"]
            c.close()
            if all((x.get("disk") or {}).get("inodes", 0) >= 0.95 * entries for x in st):
                out[s.name] = time.perf_counter() - t0
                todo.remove(s)
        time.sleep(0.05)
    for s in todo:
        out[s.name] = -limit
    return out


# ---------------------------------------------------------------- report

def table(title: str, names: list[str], rows: list[tuple[str, list[str]]]) -> None:
    print(title)
    print(f"  {'':<36}" + "".join(f"{n:>15}" for n in names))
    for label, cells in rows:
        print(f"  {label:<36}" + "".join(f"{x:>15}" for x in cells))


def vs(v: float, base: float | None, digits: int = 2) -> str:
    """v, and its difference to base in brackets."""
    if base is None:
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} ({v - base:+.{digits}f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.environ.get("SLOT_BUILD_DIR", "build"),
                    help="meson build dir ($SLOT_BUILD_DIR, else build/)")
    ap.add_argument("--ops", type=int, default=400,
                    help="exec operations per side and level (default 400)")
    ap.add_argument("--resets", type=int, default=2,
                    help="resets of the repo per side (default 2; 5x as many of a few files)")
    ap.add_argument("--window", type=float, default=3.0,
                    help="seconds of each watcher-cost window (default 3)")
    ap.add_argument("--no-fs", action="store_true", help="leave out the fs side")
    o = ap.parse_args()
    build = (ROOT / o.build).resolve() if not Path(o.build).is_absolute() else Path(o.build)
    if not (build / "slot-agent").exists():
        print(f"no slot-agent in {build}", file=sys.stderr)
        return 1
    t_start = time.monotonic()
    load0 = os.getloadavg()[0]
    laps: list[tuple[str, float]] = []
    last = [t_start]

    def lap(name: str) -> None:
        now = time.monotonic()
        laps.append((name, now - last[0]))
        last[0] = now

    run = Path(tempfile.mkdtemp(prefix="slot-bench-dq-", dir="/var/tmp"))
    run.chmod(0o755)
    sides: list[Side] = []
    notes: list[str] = []
    try:
        src = run / "src"
        nfiles, ndirs, used = make_tree(src)
        entries = nfiles + ndirs
        lap("tree")
        print("slot disk quota benchmark: what the quota costs, beside the same without it; "
              "figures, never asserted")
        fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "-T", str(run)],
                                capture_output=True, text=True, check=False).stdout.strip()
        print(f"repo: {nfiles:,} files + {ndirs:,} dirs, {human(used)} allocated (real sources: "
              f"{', '.join(f'{b} *{x}' for b, _, x in SOURCES)}; .git: one commit, one pack), "
              f"made in {laps[-1][1]:.1f} s at {src}")
        print(f"data dirs: {run}/*/data on {fstype or '?'}; {os.cpu_count()} cpus, load "
              f"{load0:.1f} at start")
        for name, flags in SIDES:
            if name == "fs" and o.no_fs:
                continue
            t0 = time.perf_counter()
            a = Agent(name, run, build, SLOTS, flags)
            side = Side(name, a, (time.perf_counter() - t0) * 1000)
            if name == "fs" and side.quota.get("mechanism") != "fs":
                notes.append(f"fs: not measured: --disk-mode auto gives mechanism "
                             f"'{side.quota.get('mechanism')}' here ({side.quota.get('why')}), "
                             f"the watch side")
                a.stop()
                continue
            sides.append(side)
        names = [s.name for s in sides]
        print(f"agents, {SLOTS} slots each (`slot-agent --listen unix:... --slots {SLOTS} "
              f"--data-dir ...` and):")
        for s in sides:
            q = s.quota
            mech = q.get("mechanism", "?")
            what = {"none": "no budgets",
                    "watch": f"budgets counted every {q.get('interval_ms')} ms, RLIMIT_FSIZE",
                    "fs": "budgets of an ext4 filesystem per slot (loop device)"}.get(mech, mech)
            rsv = (f"; reserve {human(q['reserve'])}: slots counted only under it"
                   if mech == "none" and q.get("reserve") else
                   "; no reserve: nothing counted" if mech == "none" else "")
            print(f"  {s.name:<6} {' '.join(s.agent.extra):<52} {mech}: {what}{rsv}; "
                  f"started in {s.start_ms:.0f} ms")
        for n in notes:
            print("  " + n)

        # Every slot leased, the repo copied in by the slot itself.
        for s in sides:
            c = s.agent.client()
            for k in range(SLOTS):
                lease(c, k, f"dq-{k}")
            c.close()
        copy = f"cp -a {src}/. ."
        t0 = time.perf_counter()
        durs = exec_all([(s.agent, k, copy) for s in sides for k in range(SLOTS)])
        wall = time.perf_counter() - t0
        print(f"the repo copied into all {len(sides) * SLOTS} slots at once (`{copy}` in "
              f"each): {wall:.1f} s; one copy p50: " + ", ".join(
                  f"{s.name} {pct(durs[i * SLOTS:(i + 1) * SLOTS], .5) / 1000:.1f} s"
                  for i, s in enumerate(sides)))
        lag = counted_after(sides, entries, 6.0)
        if lag:
            print("  every slot counted with the repo (inodes >= 95% of it), after the copies "
                  "ended: " + ", ".join(f"{k} {'> ' if v < 0 else ''}{abs(v):.1f} s"
                                        for k, v in lag.items()))
            for s in sides:
                if s.name in lag and s.quota.get("mechanism") != "fs":
                    st = s.stats()
                    print(f"    {s.name}: {st.get('disk_scans')} passes so far, the last took "
                          f"{st.get('disk_scan_ms')} ms (disk_scan_ms): the next starts "
                          f"{9 * st.get('disk_scan_ms', 0) / 1000:.1f} s after it ended "
                          f"(<= 10% of the time)")
        for s in sides:
            if s.quota.get("mechanism") == "none":
                continue
            d = s.disk(0)
            print(f"  {s.name}: slot 0 counted {human(d.get('used', 0))}, "
                  f"{d.get('inodes', 0):,} files+dirs; budget {human(d.get('budget', 0))}, "
                  f"{d.get('inodes_budget', 0):,} files+dirs (0: none); scanned_ms_ago "
                  f"{d.get('scanned_ms_ago')}")
        lap("agents+copy")

        # 1. exec true
        rounds = 4
        warm = 40
        res1: dict[int, dict[str, Run]] = {}
        for conc in (1, 8):
            sl = [Sleepers(s.agent, list(range(1, SLOTS))) for s in sides] if conc == 1 else []
            fns: dict[str, Callable[[int], Run]] = {
                s.name: (lambda n, s=s, conc=conc: drive(s.sock, list(range(conc)), "true", n))
                for s in sides}
            fns["floor"] = lambda n, conc=conc: floor(conc, "true", n)
            res1[conc] = interleaved(fns, o.ops, rounds, warm)
            for x in sl:
                x.stop()
        lap("1.")
        # 2. a small write
        fpath = run / "floor-f"
        fns = {s.name: (lambda n, s=s: drive(s.sock, list(range(SLOTS)), "echo x >> f", n))
               for s in sides}
        fns["floor"] = lambda n: floor(8, f"echo x >> {fpath}", n)
        res2 = interleaved(fns, o.ops, rounds, warm)
        lap("2.")

        cols = names + ["floor"]
        has_base = BASE in names

        def p50(r: dict[str, Run], n: str) -> str:
            base = pct(r[BASE].lat, .5) if has_base and n not in (BASE, "floor") else None
            return vs(pct(r[n].lat, .5), base)

        rows: list[tuple[str, list[str]]] = []
        for conc in (1, 8):
            rr = res1[conc]
            rows.append((f"c={conc}: p50 ms (vs {BASE})", [p50(rr, n) for n in cols]))
            rows.append((f"c={conc}: p99 ms", [f"{pct(rr[n].lat, .99):.2f}" for n in cols]))
            rows.append((f"c={conc}: ops/s", [f"{rr[n].ops:.0f}" for n in cols]))
        rows.append(("errors", [str(res1[1][n].errors + res1[8][n].errors) for n in cols]))
        print()
        table(f"1. exec `true`, client-side ms; {o.ops} per side and level in {rounds} "
              f"interleaved rounds (after {warm} not counted); c=1: slot 0 while slots 1-7 "
              f"each run `sleep` (all 8 busy); c=8: slots 0-7", cols, rows)
        rows = [(f"c=8: p50 ms (vs {BASE})", [p50(res2, n) for n in cols]),
                ("c=8: p99 ms", [f"{pct(res2[n].lat, .99):.2f}" for n in cols]),
                ("c=8: ops/s", [f"{res2[n].ops:.0f}" for n in cols]),
                ("errors", [str(res2[n].errors) for n in cols])]
        print()
        table("2. exec `echo x >> f` (a small write), c=8, client-side ms", cols, rows)
        print("  floor: `/bin/bash -c CMD` spawned from this Python (subprocess.run: "
              "posix_spawn, pipes drained), 1 or 8 threads; at c=8 it is bound by this "
              "process (the GIL), not a ceiling")
        for n in cols:
            for r in (res1[1][n], res1[8][n], res2[n]):
                if r.first_error:
                    print(f"  {n}: first error: {r.first_error}")
                    break

        # 3. reset
        sl = [Sleepers(s.agent, list(range(1, SLOTS))) for s in sides]
        repo = {s.name: Reset() for s in sides}
        few = {s.name: Reset() for s in sides}
        for k in range(o.resets):
            if k:
                exec_all([(s.agent, 0, copy) for s in sides])
            sync()
            for i in range(len(sides)):
                s = sides[(i + k) % len(sides)]
                reset_once(s, k, repo[s.name])
        mk = "echo a > a.txt && mkdir -p d && echo b > d/b.txt && echo c > d/c.txt"
        for k in range(5 * o.resets):
            exec_all([(s.agent, 0, mk) for s in sides])
            sync()
            for i in range(len(sides)):
                s = sides[(i + k) % len(sides)]
                reset_once(s, 100 + k, few[s.name])
        for x in sl:
            x.stop()
        exec_all([(s.agent, 0, copy) for s in sides])  # the repo back in slot 0, for 4.
        lap("3.")
        rows = [(f"repo ({entries:,} entries): reset", [pair(repo[n].reset, 0) for n in names]),
                ("  then unlease + lease", [pair(repo[n].relet, 1) for n in names]),
                ("few files (4 entries): reset", [pair(few[n].reset, 1) for n in names]),
                ("  then unlease + lease", [pair(few[n].relet, 1) for n in names])]
        print()
        table(f"3. reset of slot 0, then unlease + lease, ms median/max ({o.resets} resets of the "
              f"repo per side, {5 * o.resets} of a few files; slots 1-7 hold the repo and run "
              f"`sleep` meanwhile; the repo is re-copied and `sync` runs before each reset, "
              f"outside the figures)", names, rows)

        # 4. the watcher's own cost
        idle: dict[str, Window] = {}
        busy: dict[str, Window] = {}
        for s in sides:
            sl1 = Sleepers(s.agent, list(range(SLOTS)))
            time.sleep(0.3)
            idle[s.name] = window(s, o.window, None, entries)
            sl1.stop()
            busy[s.name] = window(s, o.window, lambda secs, s=s: drive(
                s.sock, list(range(SLOTS)), "true", secs=secs), entries)
        lap("4.")

        def scans(w: Window) -> str:
            return f"{pct(w.scan_ms, .5):.0f}/{max(w.scan_ms):.0f}" if w.scan_ms else "-"

        rows = [
            ("8 x `sleep`: scans/s", [f"{idle[n].per_s(idle[n].scans):.2f}" for n in names]),
            ("  last pass ms p50/max", [scans(idle[n]) for n in names]),
            ("  slots counted with the repo", [f"{idle[n].counted}/{SLOTS}" for n in names]),
            ("  worker CPU ms/s (reaped children)",
             [f"{idle[n].per_s(idle[n].child_ms):.0f}" for n in names]),
            ("  worker CPU ms/s (nice-10 children)",
             [f"{idle[n].per_s(idle[n].worker_ms):.0f}" for n in names]),
            ("  agent's own CPU ms/s", [f"{idle[n].per_s(idle[n].own_ms):.1f}" for n in names]),
            ("8 x `true` back to back: execs/s",
             [f"{busy[n].per_s(busy[n].execs):.0f}" for n in names]),
            ("  scans/s", [f"{busy[n].per_s(busy[n].scans):.2f}" for n in names]),
            ("  last pass ms p50/max", [scans(busy[n]) for n in names]),
            ("  slots counted with the repo", [f"{busy[n].counted}/{SLOTS}" for n in names]),
            ("  worker CPU ms/s (nice-10 children)",
             [f"{busy[n].per_s(busy[n].worker_ms):.0f}" for n in names]),
            ("  commands+worker CPU ms/s (reaped)",
             [f"{busy[n].per_s(busy[n].child_ms):.0f}" for n in names]),
            ("  agent's own CPU ms/s", [f"{busy[n].per_s(busy[n].own_ms):.0f}" for n in names]),
        ]
        print()
        table(f"4. the watcher's own cost, all {SLOTS} slots busy holding the repo, "
              f"{o.window:.0f} s per window per side, one side after the other (`stats` "
              f"disk_scans, disk_scan_ms; CPU from /proc)", names, rows)
        print("  reaped children = cutime + cstime of the agent's /proc/PID/stat: with `sleep` "
              "in every slot only the counting workers end (and are reaped) in the window. "
              "nice-10 children: the workers (they renice to 10), their utime + stime polled "
              f"every 20 ms (a pass's last < 20 ms missed), so also under load, where the "
              f"reaped children are mostly the commands. Clock ticks: {1000 // CLK} ms. "
              f"Slots counted: `slots` disk.inodes >= 95% of the repo's {entries:,} entries, "
              f"scanned within the window.")
    finally:
        for s in sides:
            s.agent.stop()
        subprocess.run(["chmod", "-R", "u+rwx", str(run)], check=False,
                       stderr=subprocess.DEVNULL)
        # One rm per agent's data dir at once: ~45,000 files each.
        rms = [subprocess.Popen(["rm", "-rf", "--one-file-system", str(d)])
               for d in run.iterdir()]
        for r in rms:
            r.wait()
        shutil.rmtree(run, ignore_errors=True)
        lap("cleanup")
    print("\nwall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in laps))
    print(f"done in {time.monotonic() - t_start:.0f} s (of which {SYNC_S[0]:.0f} s in a sync "
          f"before each reset, outside the figures; load {os.getloadavg()[0]:.1f} at the end); "
          f"agents stopped, {run} removed")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
