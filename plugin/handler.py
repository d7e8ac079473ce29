"""The one function that serves a CNI request: environment and stdin in, exit code and stdout out.

The executable (plugin.main) is a thin wrapper around it, and so can other transports be. It
never raises: every failure becomes CNI error JSON. Heavy modules (pydantic, netaddr, store
clients) are imported only by commands that use them, so VERSION and early errors stay cheap.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyabouts.ipam.errors import (
    INTERNAL_ERROR,
    INVALID_ENVIRONMENT,
    NO_FREE_SLICE,
    RANGE_EXHAUSTED,
    REQUESTED_IP_UNAVAILABLE,
    AllocationError,
    CniError,
    NoFreeSliceError,
    RangeExhaustedError,
    RequestedAddressUnavailableError,
)
from pyabouts.plugin.cni import (
    COMMAND_SINCE,
    LATEST_VERSION,
    check_version,
    decode_netconf,
    parse_cni_args,
    render_error,
    render_version,
)

if TYPE_CHECKING:
    from pyabouts.plugin.backend import Backend


ALLOCATION_CODES: dict[type[AllocationError], int] = {
    RangeExhaustedError: RANGE_EXHAUSTED,
    RequestedAddressUnavailableError: REQUESTED_IP_UNAVAILABLE,
    NoFreeSliceError: NO_FREE_SLICE,
}


def allocation_code(refused: AllocationError) -> int:
    """The CNI code of an allocator's refusal, by its kind (a subclass's too); 103 for a kind
    this table does not know, which is a bug."""
    for kind, code in ALLOCATION_CODES.items():
        if isinstance(refused, kind):
            return code
    return INTERNAL_ERROR


@dataclass(frozen=True, slots=True)
class Reply:
    exit_code: int
    stdout: bytes


def handle_request(
    env: Mapping[str, str],
    stdin: bytes,
    backend: Backend | None = None,
    *,
    deadline: float | None = None,
) -> Reply:
    """Serve one request; `backend` gives the commands their stores (default: one per call),
    `deadline` (time.monotonic()) bounds the command (default: commands.DEADLINE_SECONDS)."""
    command = env.get("CNI_COMMAND", "")
    version = LATEST_VERSION
    try:
        if command == "VERSION":
            return _success(render_version())
        if command not in COMMAND_SINCE:
            raise CniError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND={command!r} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION",
            )
        raw = decode_netconf(stdin)
        given = raw.get("cniVersion")
        version = given if isinstance(given, str) and given else version
        check_version(command, version)
        cni_args = parse_cni_args(env.get("CNI_ARGS", ""))

        from pyabouts.plugin.backend import OneShotBackend  # noqa: PLC0415 - heavy imports, load on use
        from pyabouts.plugin.commands import run_command  # noqa: PLC0415

        served_by = backend or OneShotBackend()
        result = run_command(
            command, env, cni_args, raw, netconf=stdin, backend=served_by, deadline=deadline
        )
        return _success(result)
    except CniError as error:
        return _failure(version, error)
    except AllocationError as refused:
        return _failure(version, CniError(allocation_code(refused), str(refused)))
    except Exception as exc:  # a bug: still CNI error JSON, never a traceback on stdout
        _log_bug(exc)
        bug = CniError(INTERNAL_ERROR, f"internal error: {type(exc).__name__}: {exc}")
        return _failure(version, bug)


def _success(result: dict[str, Any] | None) -> Reply:
    return Reply(0, json.dumps(result).encode() if result is not None else b"")


def _failure(version: str, error: CniError) -> Reply:
    return Reply(1, json.dumps(render_error(version, error)).encode())


def _log_bug(exc: Exception) -> None:
    import logging  # noqa: PLC0415 - only on the unexpected path

    logging.getLogger("pyabouts").error("unexpected error", exc_info=exc)
