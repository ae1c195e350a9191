"""How controller answers become observations: `Conventions` (the trainer's
texts and limits, or slot's richer forms) and the functions that turn one
controller answer into (success, output, error, metadata).

The trainer's conventions are those of its reference sandbox server: output
stripped and capped at 50,000 characters with a marker, `Exit code: N`,
`Command timed out after 2.0s`, 100,000-byte file limits, small metadata
with nothing that changes from run to run. Everything here is pure: no I/O.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, replace
from typing import Any, Literal, Mapping, Union

TRUNCATED_MARKER = "\n... (output truncated)"


@dataclass(frozen=True)
class Conventions:
    """What observations look like. `Conventions.trainer()` (the default)
    matches the trainer's reference server; `Conventions.slot()` keeps
    slot's full forms. Fields can be mixed with `dataclasses.replace`."""

    texts: Literal["trainer", "slot"] = "trainer"
    output_limit: int | None = 50_000  # characters per stream; None: no cap
    truncation: Literal["head", "head_tail"] = "head"
    strip_output: bool = True
    file_limit: int | None = 100_000  # read_file / write_file bytes; None: none
    run_metadata: bool = False  # exec_id, duration_ms, isolation, signal

    @classmethod
    def trainer(cls) -> "Conventions":
        return cls()

    @classmethod
    def slot(cls) -> "Conventions":
        return cls(texts="slot", output_limit=None, truncation="head_tail", strip_output=False,
                   file_limit=None, run_metadata=True)

    @classmethod
    def of(cls, spec: Union["Conventions", str, None]) -> "Conventions":
        if spec is None or spec == "trainer":
            return cls.trainer()
        if spec == "slot":
            return cls.slot()
        if isinstance(spec, Conventions):
            return spec
        raise ValueError(f"conventions must be 'trainer', 'slot' or a Conventions (got {spec!r})")

    def but(self, **changes: Any) -> "Conventions":
        return replace(self, **changes)


Outcome = tuple[bool, str, str, dict[str, Any]]  # success, output, error, metadata


class Refused(Exception):
    """A call refused by the client, before it reaches the controller:
    `text` is the trainer's wording, when it has one."""

    def __init__(self, code: str, message: str, text: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.text = code, message, text


def text(data: Any) -> str:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    return "" if data is None else str(data)


def cap(s: str, conv: Conventions, truncated: bool = False) -> str:
    """One stream capped at the conventions' limit, with the marker when cut
    here or upstream (the agent keeps head and tail of a long stream)."""
    lim = conv.output_limit
    if lim is not None and len(s) > lim:
        if conv.truncation == "head_tail":
            half = lim // 2
            return s[:half] + TRUNCATED_MARKER + "\n" + s[-(lim - half):]
        return s[:lim] + TRUNCATED_MARKER
    if truncated and lim is not None:  # cut upstream: marked as if cut here
        return s + TRUNCATED_MARKER
    return s


def join_streams(out: str, err: str) -> str:
    if not err:
        return out
    return out + "\n[stderr]\n" + err if out else err


def seconds(timeout_s: float | None) -> str:
    """The trainer's way of printing a timeout: a float, `2.0`."""
    return str(float(timeout_s if timeout_s is not None else 0.0))


def policy_error(code: str, message: str, ctx: Mapping[str, Any]) -> str | None:
    """The trainer's texts for an isolation the agent cannot give."""
    if code != "isolation_unavailable":
        return None
    why = message or "the agent cannot isolate commands here"
    if ctx.get("network_isolation") and not ctx.get("sandbox"):
        return f"Network isolation requested but {why}"
    return f"Sandboxing required but {why}"


def failure(code: str, message: str, ctx: Mapping[str, Any], conv: Conventions) -> Outcome:
    """A request the controller or agent refused (no command result)."""
    tool = ctx.get("tool")
    meta: dict[str, Any] = {"code": code}
    if conv.texts == "slot":
        return False, "", f"{code}: {message}" if message else code, {**meta, "tool": tool}
    pe = policy_error(code, message, ctx)
    if pe:
        return False, "", pe, meta
    path = ctx.get("path")
    if tool in ("read_file", "write_file") and path is not None:
        if code == "path_escape":
            return False, "", "Access denied: path outside workspace", meta
        if code == "not_found" and tool == "read_file":
            return False, "", f"File not found: {path}", meta
        if code in ("bad_request", "exists") and ("directory" in message or code == "exists"):
            return False, "", f"Not a file: {path}", meta
    if tool == "tmux" and code == "timeout" and message.startswith("tmux blocked keys"):
        return False, "", message, meta  # the controller words it as the trainer does
    if code == "timeout" and tool in ("bash", "bash_stateful"):
        return False, "", f"Command timed out after {seconds(ctx.get('timeout_s'))}s", \
            {"exit_code": -1, "timeout": True}
    return False, "", f"{code}: {message}" if message else code, meta


def isolation_flags(res: Mapping[str, Any], ctx: Mapping[str, Any]) -> dict[str, bool]:
    if "isolation" not in res:
        # A session's command: its rungs were fixed when the shell opened,
        # and are known for sure only when they were required (asked for,
        # or implied by allow_network false).
        sandboxed = bool(ctx.get("sandbox") or ctx.get("network_isolation"))
        return {"sandboxed": sandboxed,
                "network_isolated": sandboxed and ctx.get("network") is False}
    rungs = set(res.get("isolation") or [])
    sandboxed = {"landlock", "seccomp"} <= rungs
    return {"sandboxed": sandboxed,
            "network_isolated": sandboxed and res.get("network", ctx.get("network", True)) is False}


def command(res: Mapping[str, Any], ctx: Mapping[str, Any], conv: Conventions) -> Outcome:
    """bash and bash_stateful: an exec or session_exec result."""
    stateful = ctx.get("tool") == "bash_stateful"
    if "output" in res and "stdout" not in res:  # a pty session: one stream
        out = cap(text(res.get("output")), conv, bool(res.get("output_truncated")))
        err = ""
    else:
        out = cap(text(res.get("stdout")), conv, bool(res.get("stdout_truncated")))
        err = cap(text(res.get("stderr")), conv, bool(res.get("stderr_truncated")))
    joined = join_streams(out, err)
    if conv.strip_output:
        joined = joined.strip()
    exit_code = res.get("exit_code")
    timed_out = bool(res.get("timed_out")) or bool(res.get("idle_timed_out"))
    # Stopped because its slot went over its disk (or inode) budget: the
    # agent says why in `reason`.
    disk_quota = bool(res.get("disk_quota"))
    reason = text(res.get("reason"))
    success = exit_code == 0 and not timed_out and not disk_quota
    meta: dict[str, Any]
    if conv.texts == "trainer":
        if timed_out:
            meta = {"exit_code": -1, "timeout": True}
            if stateful:
                meta["stateful"] = True
            return False, "", f"Command timed out after {seconds(ctx.get('timeout_s'))}s", meta
        meta = {"exit_code": exit_code, **isolation_flags(res, ctx)}
        if stateful:
            meta["stateful"] = True
        if disk_quota:
            # The trainer's texts stay its own ("Exit code: N"); why is in
            # the metadata, where its reward code does not look.
            meta.update(disk_quota=True, reason=reason)
            return False, joined, f"Exit code: {exit_code}", meta
        return success, joined, "" if success else f"Exit code: {exit_code}", meta
    error = ""
    if not success:
        if res.get("idle_timed_out"):
            error = f"idle timeout after {res.get('duration_ms')} ms"
        elif timed_out:
            error = f"timed out after {ctx.get('timeout_ms') or res.get('duration_ms')} ms"
        elif disk_quota:
            error = f"disk quota exceeded: {reason}" if reason else "disk quota exceeded"
        elif res.get("cancelled"):
            error = "cancelled"
        elif res.get("signal"):
            error = f"exit code {exit_code} (signal {res.get('signal')})"
        else:
            error = f"exit code {exit_code}"
    meta = {"tool": ctx.get("tool"), "exit_code": exit_code, "timed_out": timed_out,
            "signal": res.get("signal", 0),
            "stdout_truncated": bool(res.get("stdout_truncated")),
            "stderr_truncated": bool(res.get("stderr_truncated")),
            "cancelled": bool(res.get("cancelled")), **isolation_flags(res, ctx)}
    if disk_quota:
        meta["disk_quota"] = True
    if stateful:
        meta["stateful"] = True
        meta["session_alive"] = res.get("session_alive")
    if conv.run_metadata:
        meta.update(isolation=list(res.get("isolation") or []), duration_ms=res.get("duration_ms"),
                    exec_id=res.get("exec_id"))
    return success, joined, error, meta


def screen_text(res: Mapping[str, Any], entire: bool) -> str:
    rows = [text(r) for r in (res.get("rows") or [])]
    if entire:
        rows = [text(r) for r in (res.get("history") or [])] + rows
    return "\n".join(rows)


def tmux(res: Mapping[str, Any], ctx: Mapping[str, Any], conv: Conventions) -> Outcome:
    action = ctx.get("action")
    meta: dict[str, Any] = {"action": action}
    if conv.texts == "slot":
        meta["tool"] = "tmux"
    if action == "start":
        return True, "started", "", meta
    if action == "send_keys":
        if conv.texts == "slot":
            meta.update(written=res.get("written"), prompt=res.get("prompt"))
        return True, "ok", "", meta
    if action == "stop":
        return True, "stopped", "", meta
    if action == "stream":
        meta.update(offset=res.get("next_offset"), start_offset=res.get("offset"))
        return True, text(res.get("data")), "", meta
    out = screen_text(res, bool(ctx.get("capture_entire")))
    lim = conv.output_limit
    if lim is not None and len(out) > lim:
        out = out[:lim] + TRUNCATED_MARKER
    return True, out, "", meta


def workspace_path(workspace_dir: str, path: str) -> str:
    rel = posixpath.normpath(path)
    return posixpath.join(workspace_dir or "/workspace", "" if rel == "." else rel)


def read_file(res: Mapping[str, Any], ctx: Mapping[str, Any], conv: Conventions) -> Outcome:
    size = int(res.get("size") or 0)
    lim = conv.file_limit
    if lim is not None and size > lim:
        return False, "", f"File too large: {size} bytes (max {lim})", {"code": "too_large"}
    data = res.get("data")
    if conv.texts == "trainer":
        return True, text(data), "", {"path": workspace_path(ctx.get("workspace_dir", ""),
                                                             ctx.get("path", "")), "size": size}
    meta = {"tool": "read_file", "path": ctx.get("path"), "size": size, "mode": res.get("mode"),
            "eof": res.get("eof")}
    if conv.run_metadata:
        meta["mtime"] = res.get("mtime")
    if "sha256" in res:
        meta["sha256"] = res["sha256"]
    return True, text(data), "", meta


def write_file(res: Mapping[str, Any], ctx: Mapping[str, Any], conv: Conventions) -> Outcome:
    path = ctx.get("path")
    n = ctx.get("length", 0)
    if conv.texts == "trainer":
        return True, f"Successfully wrote {n} bytes to {path}", "", \
            {"path": workspace_path(ctx.get("workspace_dir", ""), str(path)), "size": res.get("size")}
    return True, f"wrote {n} bytes to {path}", "", \
        {"tool": "write_file", "path": res.get("path", path), "size": res.get("size"),
         "sha256": res.get("sha256")}


def json_safe(value: Any) -> Any:
    """A copy of value that json.dumps takes: bytes become text."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return text(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def other(res: Mapping[str, Any], ctx: Mapping[str, Any]) -> Outcome:
    """Agent ops used as tools (stat, list, archive, reset, cancel, ...)."""
    shown = {k: v for k, v in res.items() if not isinstance(v, (bytes, bytearray))}
    return True, repr(shown), "", {"tool": ctx.get("tool"), "result": json_safe(res)}
