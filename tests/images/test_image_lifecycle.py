"""The agent as the container's PID 1: `docker stop` (SIGTERM) ends it
cleanly, exit code 0, well inside the 10 s stop timeout, even with commands
running; and how long `docker run` takes to a first hello (a figure)."""
from __future__ import annotations

import time

from images_lib import (CONTAINERS, FIGURES, IMAGE, TOKEN_PATH, docker, docker_out, hello, logs,
                        median_ms, published_port, run_to_hello, running)


def test_docker_stop_exits_zero_quickly(images, tokens) -> None:
    token_file, token, _ = tokens
    # no --rm: the exit code is read after the stop
    name = CONTAINERS.run("slot-img-stop", "-p", "127.0.0.1::7070",
                          "-v", f"{token_file}:{TOKEN_PATH}:ro", IMAGE, rm=False)
    try:
        c, _ = hello(published_port(name), token, timeout=30, alive=lambda: running(name))
        # the entrypoint's sh exec'd: the agent itself is PID 1
        assert docker_out("exec", name, "cat", "/proc/1/comm") == "slot-agent"
        # commands that would outlive a careless shutdown: a plain one, one that
        # ignores SIGTERM, and a double-forked daemon
        for slot, cmd in ((0, "sleep 1000"), (1, "trap '' TERM; while :; do sleep 1; done"),
                          (2, "(setsid sleep 1000 &); sleep 1000")):
            c.call("exec", {"slot": slot, "cmd": cmd, "detach": True})
        time.sleep(0.3)
        assert c.call("health")["running_execs"] == 3
        c.close()
        t0 = time.monotonic()
        docker("stop", "-t", "10", name, timeout=60)
        took = time.monotonic() - t0
        state = docker_out("inspect", "-f", "{{.State.ExitCode}} {{.State.OOMKilled}}", name)
        log = logs(name)
        assert state == "0 false", f"{state}\n{log[-3000:]}"
        assert "shutting down: SIGTERM" in log, log[-3000:]
        assert took < 6.0, f"docker stop took {took:.1f} s"  # SIGKILL would come at 10 s
        FIGURES["docker stop (3 commands running)"] = f"{took * 1000:.0f} ms, exit code 0"
    finally:
        CONTAINERS.rm(name)


def test_docker_run_to_hello(images, tokens) -> None:
    token_file, token, _ = tokens
    times = run_to_hello(token_file, token, runs=10)
    assert len(times) == 10
    FIGURES["docker run -> hello over TCP (median of 10)"] = median_ms(times)
