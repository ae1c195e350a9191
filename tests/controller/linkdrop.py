"""The check of test_reconnect.py's run_and_drop() for the backends with their
own suites (Docker in tests/images, ssh in test_exec_ssh.py, Nomad and Slurm
in tests/e2e): N streamed commands through the controller, the link dropped
once output flows, then each command completed once (a marker file per slot
with one line), its output byte-exact (sha256) and contiguous, one `started`
event each, the leases intact, the agent the same one (no agent_lost, no
replacement) with `reconnects` >= 1 and a `link_cause`.

It also measures the time from the drop (the call of drop()) to the
first resumed output byte: the client polls `agents` on the same connection
as the commands every 10 ms, and the first stdout event that arrives after
an answer showing the agent reconnecting (or reconnected) is the first byte
of a new stream (the controller writes to one connection in order). Standard library + slotwire
only; no conftest, so any suite can import it."""
from __future__ import annotations

import hashlib
import time
from typing import Callable

N = 32


def expected(i: int, lines: int) -> bytes:
    return b"".join(f"cmd{i:02d} line {j:04d} {'x' * 60}\n".encode() for j in range(lines))


def command(i: int, lines: int) -> str:
    # slow enough to be running when the link drops,
    # and a marker that counts how often it ran
    return (f"echo {i} >> runs; for j in $(seq 0 {lines - 1}); do "
            f"printf 'cmd%02d line %04d %s\\n' {i} $j {'x' * 60}; "
            f"[ $((j % 20)) = 0 ] && sleep 0.05; done; true")


def _agent(agents: list[dict], agent_id: str) -> dict:
    return next(a for a in agents if a["id"] == agent_id)


def run_and_drop_timed(c, drop: Callable[[], None], agent_id: str, backend: str,
                       slots: list[str] | None = None, lines: int = 400,
                       timeout: float = 120.0, poll: float = 0.01) -> dict:
    """c: a slotwire Client on the controller (made with Client.unix). All of
    `slots` (default: N acquired here) must be on agent agent_id. Returns
    {"first_byte_ms", "reconnect_ms", "agent", "slots"} and prints the
    figure line."""
    if slots is None:
        slots = [c.call("acquire", {"trajectory_id": f"t{i}"})["slot"] for i in range(N)]
    assert all(s.startswith(agent_id + "/") for s in slots), (agent_id, slots)
    before = _agent(c.call("agents")["agents"], agent_id)
    assert before["state"] == "ready", before
    rids = [c.send("exec", {"slot": s, "tool": "bash",
                            "args": {"command": command(i, lines), "stream": True}})
            for i, s in enumerate(slots)]
    frames: dict[int, list[dict]] = {r: [] for r in rids}
    done: set[int] = set()
    sock = c.sock
    old_timeout = sock.gettimeout()

    def pump(until: Callable[[], bool], limit: float, on_frame=None) -> None:
        deadline = time.monotonic() + limit
        sock.settimeout(poll)
        while not until():
            assert time.monotonic() < deadline, (
                f"{backend}: not done within {limit} s; answered "
                f"{len(done)}/{len(rids)}; bytes per command "
                f"{[sum(len(f.get('data', b'')) for f in frames[r]) for r in rids]}")
            if on_frame is not None:
                on_frame(None)
            try:
                f = c.recv_frame(timeout=poll)
            except TimeoutError:
                continue
            assert f is not None, "the controller closed the connection"
            if on_frame is not None and on_frame(f):
                continue
            fid = f.get("id", 0)
            if fid in frames:
                frames[fid].append(f)
                if "event" not in f:
                    done.add(fid)
            else:
                c.pending.setdefault(fid, []).append(f)

    def streaming() -> bool:
        return all(any(f.get("event") == "stdout" for f in frames[r]) for r in rids)

    try:
        # every command is running and its output flowing (a slow relay
        # such as `docker exec` or srun included)
        pump(streaming, 60)
        time.sleep(0.2)
        # times count from the call of drop(): a kill acts at once; a
        # command (`ss -K`) acts after its start-up, printed as "drop() took"
        t0 = time.monotonic()
        drop()
        t_drop = time.monotonic() - t0
        st = {"polls": set(), "last_poll": 0.0, "seen": None, "first": None, "states": [],
              "stop": False}

        def on_frame(f: dict | None) -> bool:
            now = time.monotonic()
            if f is None:  # between reads: poll `agents` while it matters
                if st["first"] is None and not st["stop"] and now - st["last_poll"] >= poll:
                    pid = c.send("agents")
                    c.pending.pop(pid, None)
                    st["polls"].add(pid)
                    st["last_poll"] = now
                return False
            fid = f.get("id", 0)
            if fid in st["polls"]:
                st["polls"].discard(fid)
                a = _agent(f["result"]["agents"], agent_id)
                if st["seen"] is None:
                    st["states"].append(a["state"])
                    if a["state"] == "reconnecting" or a["reconnects"] > before["reconnects"]:
                        st["seen"] = now - t0
                return True
            if (st["seen"] is not None and st["first"] is None and fid in frames
                    and f.get("event") == "stdout"):
                st["first"] = now - t0
            return False

        pump(lambda: len(done) == len(rids), timeout, on_frame)
        # the answers to the last polls
        st["stop"] = True
        pump(lambda: not st["polls"], 10, on_frame)
    finally:
        sock.settimeout(old_timeout)
        for r in rids:
            c.pending.pop(r, None)

    for i, rid in enumerate(rids):
        fr = frames[rid]
        resp, events = fr[-1], fr[:-1]
        assert "event" not in resp and all("event" in e for e in events), (i, fr[-3:])
        assert resp.get("ok"), (i, resp)
        out = bytearray()
        for ev in events:
            if ev.get("event") == "stdout":
                assert ev["offset"] == len(out), (i, ev["offset"], len(out))
                out += ev["data"]
        out += resp["result"]["stdout"]
        want = expected(i, lines)
        assert hashlib.sha256(out).hexdigest() == hashlib.sha256(want).hexdigest(), \
            (i, len(out), len(want))
        assert sum(1 for ev in events if ev.get("event") == "started") == 1, i
        assert resp["result"]["exit_code"] == 0, (i, resp["result"])
    # each ran once: one line in its slot's marker file
    runs = c.call("batch", {"requests": [
        {"slot": s, "tool": "bash", "args": {"command": "cat runs; rm runs"}} for s in slots]},
        timeout=60)
    for i, r in enumerate(runs["results"]):
        assert r.get("ok") and r["result"]["stdout"] == f"{i}\n".encode(), (i, r)
    # the leases are intact
    leases = {x["slot"] for x in c.call("leases")["leases"]}
    assert set(slots) <= leases, sorted(set(slots) - leases)
    # the same agent (not lost, not replaced), reconnected, with a cause
    after = _agent(c.call("agents")["agents"], agent_id)
    assert after["state"] == "ready", after
    assert after["instance"] == before["instance"], (before, after)
    assert after["reconnects"] >= before["reconnects"] + 1, (before, after)
    assert after["link_cause"], after
    first = st["first"]
    fig = ("n/a (no stdout event after the reconnect was seen)" if first is None
           else f"{first * 1000:.0f} ms")
    print(f"\nreconnect figure {backend}: first resumed byte after {fig} "
          f"(drop() took {t_drop * 1000:.0f} ms; reconnecting "
          f"seen after {(st['seen'] or 0) * 1000:.0f} ms; controller's reconnect_ms "
          f"{after.get('reconnect_ms')}; link_cause: {after['link_cause']!r}; "
          f"reconnects {after['reconnects']})")
    return {"first_byte_ms": None if first is None else first * 1000,
            "reconnect_ms": after.get("reconnect_ms"), "agent": after, "slots": slots}
