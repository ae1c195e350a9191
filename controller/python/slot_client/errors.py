"""Exceptions raised by the slot controller client."""
from __future__ import annotations


class SlotError(Exception):
    """An error answer from the controller (or a client-side failure).

    `code` is one of the protocol's error codes (`not_leased`, `no_capacity`,
    `bad_request`, ...) or a client-side code (`connection_lost`,
    `connect_failed`, `timeout`, `too_large`).
    """

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code: str = code
        self.message: str = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.code, self.message))


class ConnectionLost(SlotError, ConnectionError):
    """The connection to the controller closed with requests unanswered.

    Every call in flight on the connection fails with this error, and so does
    every later call on the same client: reconnect to retry.
    """

    def __init__(self, message: str = "connection to the controller was lost",
                 code: str = "connection_lost") -> None:
        SlotError.__init__(self, code, message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.message, self.code))


class ConnectError(ConnectionLost):
    """The controller could not be reached at all (no socket, refused, ...)."""

    def __init__(self, message: str = "cannot connect to the controller",
                 code: str = "connect_failed") -> None:
        ConnectionLost.__init__(self, message, code)


class CallTimeout(SlotError, TimeoutError):
    """No answer arrived within the client-side timeout of `call`."""

    def __init__(self, message: str = "no answer in time", code: str = "timeout") -> None:
        SlotError.__init__(self, code, message)

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.message, self.code))
