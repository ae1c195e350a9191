"""FAKE `modal.container_process` (see __init__.py): where the SDK defines
ContainerProcess, the type `Sandbox.exec` returns."""
from . import ContainerProcess

__all__ = ["ContainerProcess"]
