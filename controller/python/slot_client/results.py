"""The value types a trainer's tool executor handles: `SlotState`, `Slot`,
`ExecutionResult` and `ToolResult`, with the names, fields, defaults and
methods of the trainer's own (see docs: the trainer interface)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class SlotState(str, Enum):
    AVAILABLE = "available"
    ACQUIRED = "acquired"
    EXECUTING = "executing"
    RELEASING = "releasing"
    ERROR = "error"


@dataclass
class Slot:
    """A workspace leased to a trajectory. `slot_id` is the controller's
    handle (AGENT/INDEX/GENERATION); `workspace_dir` is the path commands
    see as their working directory."""

    slot_id: str
    alloc_id: str
    container_addr: str
    workspace_dir: str = ""
    state: SlotState = SlotState.AVAILABLE
    trajectory_id: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def is_available(self) -> bool:
        return self.state == SlotState.AVAILABLE

    def is_acquired(self) -> bool:
        return self.state in (SlotState.ACQUIRED, SlotState.EXECUTING)

    def acquire(self, trajectory_id: str) -> None:
        if self.state != SlotState.AVAILABLE:
            raise RuntimeError(f"slot {self.slot_id} is {self.state.value}, not available")
        self.state = SlotState.ACQUIRED
        self.trajectory_id = trajectory_id

    def start_execution(self) -> None:
        if self.state == SlotState.ACQUIRED:
            self.state = SlotState.EXECUTING

    def end_execution(self) -> None:
        if self.state == SlotState.EXECUTING:
            self.state = SlotState.ACQUIRED

    def release(self) -> None:
        self.state = SlotState.AVAILABLE
        self.trajectory_id = None

    def mark_error(self, message: str) -> None:
        self.state = SlotState.ERROR
        self.metadata["error"] = message

    def to_dict(self) -> dict[str, Any]:
        return {"slot_id": self.slot_id, "alloc_id": self.alloc_id,
                "container_addr": self.container_addr, "workspace_dir": self.workspace_dir,
                "state": self.state.value, "trajectory_id": self.trajectory_id,
                "metadata": dict(self.metadata)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Slot":
        return cls(slot_id=str(d["slot_id"]), alloc_id=str(d.get("alloc_id", "")),
                   container_addr=str(d.get("container_addr", "")),
                   workspace_dir=str(d.get("workspace_dir", "")),
                   state=SlotState(d.get("state", "available")),
                   trajectory_id=d.get("trajectory_id"), metadata=dict(d.get("metadata") or {}))

    def __repr__(self) -> str:
        return (f"Slot(slot_id={self.slot_id!r}, state={self.state.value}, "
                f"trajectory_id={self.trajectory_id!r}, container_addr={self.container_addr!r})")


@dataclass
class ToolResult:
    """What the model sees of a tool call, shaped like the trainer's own;
    `to_tool_result()` returns the trainer's class when it is importable."""

    success: bool
    output: str = ""
    error: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    uniq_id: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"success": self.success, "output": self.output}
        if self.uniq_id:
            d["uniq_id"] = self.uniq_id
        if self.error:
            d["error"] = self.error
        if self.metadata:
            d["metadata"] = self.metadata
        return d

    def to_xml(self) -> str:
        return f"<tool_response>{json.dumps(self.to_dict())}</tool_response>"


def _trainer_tool_result() -> Any:
    """The trainer's ToolResult class when the trainer is loaded (a trainer
    that runs this backend has imported it; nothing is searched for on
    every result otherwise)."""
    if "atropos" not in sys.modules:
        return ToolResult
    for mod in ("atropos.tools.base", "atropos.tools"):
        try:
            m = __import__(mod, fromlist=["ToolResult"])
        except Exception:  # noqa: BLE001 - any import problem: use ours
            continue
        cls = getattr(m, "ToolResult", None)
        if cls is not None:
            return cls
    return ToolResult


@dataclass
class ExecutionResult:
    """The outcome of one tool call. `error` is "" on success; `metadata`
    holds only values `json.dumps` takes."""

    success: bool
    output: str = ""
    error: str = ""
    execution_id: str = ""
    slot_id: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_tool_result(self) -> Any:
        cls = _trainer_tool_result()
        return cls(success=self.success, output=self.output, error=self.error,
                   metadata=dict(self.metadata), uniq_id=self.execution_id)
