"""Python client for slot-controller (sandboxed slot agents for RL trainers).

- `AsyncClient`: one pipelined asyncio connection, the controller ops as
  methods (`acquire`, `release`, `exec`, `batch`, `read_artifact`, ...).
- `ControllerToolBackend`: the ToolBackend shape trainers use (`acquire` a
  `Slot`, `execute_batch` tool calls into `ExecutionResult`s, `release`).
"""
from __future__ import annotations

from .client import AsyncClient, EventCallback
from .errors import CallTimeout, ConnectError, ConnectionLost, SlotError
from .tool_backend import ControllerToolBackend, ExecutionResult, Slot
from .wire import MAX_FRAME, Address, default_address, pack_frame, parse_address, read_frame

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AsyncClient",
    "CallTimeout",
    "ConnectError",
    "ConnectionLost",
    "ControllerToolBackend",
    "EventCallback",
    "ExecutionResult",
    "MAX_FRAME",
    "Slot",
    "SlotError",
    "default_address",
    "pack_frame",
    "parse_address",
    "read_frame",
]
