"""FAKE `modal.exception` (see modal/__init__.py): the classes of the real module
(modal-labs/modal-client py/modal/exception.py) that the bridge can meet, with
the real hierarchy (note: ConflictError is an InvalidError). The real ones also
inherit from grpclib.GRPCError for compatibility; the fake does not need grpclib.
"""
from __future__ import annotations


class Error(Exception):
    """Base class for all Modal errors."""


class AlreadyExistsError(Error):
    """A resource creation conflicts with an existing resource (ALREADY_EXISTS)."""


class AuthError(Error):
    """Missing or invalid authentication (UNAUTHENTICATED, or no token at all)."""


class InternalError(Error):
    """An internal error in the Modal system (INTERNAL)."""


class InvalidError(Error):
    """The user did something invalid (INVALID_ARGUMENT, OUT_OF_RANGE)."""


class ConflictError(InvalidError):
    """Request conflicts with the current state (FAILED_PRECONDITION, ABORTED)."""


class NotFoundError(Error):
    """A requested resource was not found (NOT_FOUND)."""


class PermissionDeniedError(Error):
    """No permission for the operation (PERMISSION_DENIED)."""


class ResourceExhaustedError(Error):
    """A quota or rate limit was hit (RESOURCE_EXHAUSTED)."""


class ServiceError(Error):
    """Client/server communication failed (UNAVAILABLE, CANCELLED, ...)."""


class TimeoutError(Error):  # noqa: A001 - the real module shadows the builtin too
    """Base class for Modal timeouts."""


class SandboxTimeoutError(TimeoutError):
    """A Sandbox exceeded its execution duration limit."""


class ExecTimeoutError(TimeoutError):
    """A container process exceeded its execution duration limit."""


class SandboxTerminatedError(Error):
    """A Sandbox was terminated for an internal reason."""


class ExecutionError(Error):
    """Something unexpected happened during runtime."""


class ClientClosed(Error):
    """The client (or a detached Sandbox handle) is closed."""
