"""Python client for slot-controller (sandboxed slot agents for RL trainers).

- `AsyncClient`: one pipelined asyncio connection, the controller ops as
  methods (`acquire`, `release`, `exec`, `batch`, `read_artifact`, ...).
- `ControllerToolBackend`: the tool backend a trainer's executor drives
  (`acquire` a `Slot`, `execute_batch` tool calls into `ExecutionResult`s,
  `release`, artifacts, `get_stats`), with the trainer's observation
  conventions by default (`Conventions`).
- `tls:HOST:PORT` addresses: TLS 1.3 with client certificates through the
  standard `ssl` module (`tls_cert`, `tls_key`, `tls_ca`; see `TLSConfig`).
- `slot_client.atropos`: `install()` makes an atropos-style trainer's
  `create_tool_backend` accept `tool_pool_mode = "slot"`.
"""
from __future__ import annotations

from .client import AsyncClient, EventCallback
from .errors import CallTimeout, ConnectError, ConnectionLost, SlotError
from .conventions import Conventions
from .results import ExecutionResult, Slot, SlotState, ToolResult
from .tls import TLSConfig
from .tool_backend import ControllerToolBackend
from .wire import MAX_FRAME, Address, default_address, pack_frame, parse_address, read_frame

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncClient",
    "CallTimeout",
    "ConnectError",
    "ConnectionLost",
    "ControllerToolBackend",
    "Conventions",
    "EventCallback",
    "ExecutionResult",
    "MAX_FRAME",
    "Slot",
    "SlotError",
    "SlotState",
    "TLSConfig",
    "ToolResult",
    "default_address",
    "pack_frame",
    "parse_address",
    "read_frame",
]
