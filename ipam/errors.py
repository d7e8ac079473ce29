"""Errors that reach the CNI caller, with their codes.

Codes 0-99 are reserved by the CNI spec; pyabouts' own codes start at 100 and are documented in
docs/errors.md.
"""

from __future__ import annotations

# CNI spec codes.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # STATUS: the plugin cannot serve ADD now

# pyabouts codes.
RANGE_EXHAUSTED = 100
REQUESTED_IP_UNAVAILABLE = 101
STORE_REFUSED = 102  # the datastore answered, but refused (auth, permission, bad request)
INTERNAL_ERROR = 103  # a bug in pyabouts; the message names the exception
CORRUPT_BLOCK = 104  # a stored block is not in pyabouts' format (edited by hand?)
PEER_NOT_ALLOWED = 105  # the node agent refused a client running as a uid it does not serve
NO_FREE_SLICE = 106  # node_slice_size: every slice of a range is held by other nodes


class AllocationError(Exception):
    """The allocator cannot do what was asked: an outcome of the pool's state, not a fault.
    The plugin's edge gives each kind its CNI code (plugin.handler)."""


class RangeExhaustedError(AllocationError):
    """No address of a range is free."""


class RequestedAddressUnavailableError(AllocationError):
    """A requested address is taken, or no configured range can give it."""


class NoFreeSliceError(AllocationError):
    """node_slice_size: the node holds no slice of a range, and every slice is held."""


class CniError(Exception):
    """An error that is printed as CNI error JSON: a code, a message and optional details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def __repr__(self) -> str:
        return f"CniError({self.code}, {self.msg!r})"


class StoreUnavailableError(CniError):
    """The datastore could not be reached in time; the caller should try again later."""

    def __init__(self, msg: str, details: str = "") -> None:
        super().__init__(TRY_AGAIN_LATER, msg, details)


class StoreBusyError(StoreUnavailableError):
    """The store is up but busy: it accepted a request and did not answer in time, or it asked
    us to slow down (429). Retried until the deadline, not as an outage, and not before
    `retry_after` seconds (the server's Retry-After) when it gave some."""

    def __init__(self, msg: str, details: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(msg, details)
        self.retry_after = retry_after


class StoreRefusedError(CniError):
    """The datastore answered but refused the request (credentials, permissions); `content`:
    refused for what it carried (a 400, 413 or 422), not for who sent it."""

    def __init__(self, msg: str, details: str = "", *, content: bool = False) -> None:
        super().__init__(STORE_REFUSED, msg, details)
        self.content = content
