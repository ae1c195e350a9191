"""FAKE `modal.io_streams` (see __init__.py): where the SDK defines the exec
streams' StreamReader and StreamWriter."""
from . import StreamReader, StreamWriter

__all__ = ["StreamReader", "StreamWriter"]
