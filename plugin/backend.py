"""Where commands get their transactions: a store opened for one call (the plugin process), or
the node agent's warm, coalescing ones (plugin.agent.backend)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from pyabouts.ipam.config import IpamConf, PluginConfig
    from pyabouts.ipam.pool import PoolId, PoolView
    from pyabouts.ipam.ranges import AddressRange
    from pyabouts.ipam.transaction import Transactions

T = TypeVar("T")

REQUEST_TIMEOUT_SECONDS = 5.0  # for one request to the datastore


class Backend(Protocol):
    #: Whether a request's log_file and log_level configure the process's logging (a plugin
    #: process serves one request; the agent keeps its own logging).
    configures_logging: bool
    #: The node this backend serves: recorded in every allocation (CNI GC is scoped to it).
    node: str
    #: Whether each node starts its search in a block of its own (the agent), or at the lowest
    #: free address as whereabouts does (a plugin process).
    spreads_nodes: bool

    def config(self, raw: dict[str, Any], netconf: bytes) -> PluginConfig:
        """The request's configuration, validated: `raw`, the network config decoded from
        `netconf` (stdin), with what its `ipam` leaves empty taken from the flat file."""
        ...

    def transactions(
        self, ipam: IpamConf, pools: Sequence[PoolId], *, writes_by: float | None
    ) -> AbstractContextManager[Transactions]:
        """Transactions on the store `ipam` names, for a command over `pools`; `writes_by` (a
        deadline) when the command may write them."""
        ...


def config_with_named_flat_file(raw: dict[str, Any]) -> PluginConfig:
    """`raw` validated, with the flat file its `configuration_path` names, else the one in the
    standard places (as whereabouts)."""
    from pyabouts.ipam.config import load_config  # noqa: PLC0415 - heavy, loaded on use
    from pyabouts.ipam.stores.flat_file import read_flat_file  # noqa: PLC0415

    inline = raw.get("ipam")
    return load_config(
        raw, read_flat_file(inline.get("configuration_path")) if isinstance(inline, dict) else None
    )


class OneShotBackend:
    """A store per call, closed after it; writers of a pool on this node take turns.

    `agent_unreachable` says why the thin plugin serves in-process (no agent answered): then
    `agent_fallback: fail`, in the node's flat file, the request's config or the flat file it
    names, gets code 11 instead, before any file the request names is opened for writing or
    its store is reached. The node's word comes from the flat file in the standard places,
    read first: a request can make the fallback stricter, never allow it where the node
    refuses it.
    """

    configures_logging = True
    spreads_nodes = False

    def __init__(self, agent_unreachable: str | None = None) -> None:
        self.agent_unreachable = agent_unreachable
        # The runtime's environment rarely names the node; the host name, lower-cased, is what
        # kubelet registers by default.
        self.node = os.environ.get("NODE_NAME") or os.uname().nodename.lower()

    def config(self, raw: dict[str, Any], netconf: bytes) -> PluginConfig:
        from pyabouts.plugin.named_files import check_named_files  # noqa: PLC0415

        raw = _without_an_unkept_log_file(raw)
        inline = raw.get("ipam")
        if not self.agent_unreachable:
            check_named_files(inline, os.environ)  # before any of them is opened
            return config_with_named_flat_file(raw)
        from pyabouts.ipam.errors import TRY_AGAIN_LATER, CniError  # noqa: PLC0415
        from pyabouts.ipam.stores.flat_file import read_flat_file  # noqa: PLC0415 - fallback only

        node = read_flat_file(None)  # the standard places alone: the node's own word
        _refuse_a_refused_fallback(
            self.agent_unreachable,
            {
                "the node's flat file": node.keys.get("agent_fallback") if node else None,
                "the network config": inline.get("agent_fallback")
                if isinstance(inline, dict)
                else None,
            },
        )
        try:
            check_named_files(inline, os.environ)
        except CniError as exc:  # the agent, which follows none of them, will serve it
            reason = f"{self.agent_unreachable}, and in-process {exc.msg}"
            raise CniError(TRY_AGAIN_LATER, reason) from exc
        named = inline.get("configuration_path") if isinstance(inline, dict) else None
        if isinstance(named, str):
            config = config_with_named_flat_file(raw)
        else:  # the node's flat file, read once
            from pyabouts.ipam.config import load_config  # noqa: PLC0415 - heavy, loaded on use

            config = load_config(raw, node)
        # The flat file the config names (configuration_path) may say it too: still before any
        # file the config names is opened for writing, or the store.
        named = {f"the flat file {config.flat_file}": config.ipam.agent_fallback}
        _refuse_a_refused_fallback(self.agent_unreachable, named)
        return config

    @contextlib.contextmanager
    def transactions(
        self, ipam: IpamConf, pools: Sequence[PoolId], *, writes_by: float | None
    ) -> Iterator[Transactions]:
        with contextlib.ExitStack() as stack:
            yield _FirstUseTransactions(ipam, pools, writes_by, stack)


def _without_an_unkept_log_file(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the log file its `ipam` names where none is kept for it (the flat file's,
    if any, applies then, else stderr), said on stderr: logging elsewhere is no reason to fail
    the call (plugin/named_files.py)."""
    from pyabouts.plugin.named_files import unkept_log_file  # noqa: PLC0415

    inline = raw.get("ipam")
    why = unkept_log_file(inline, os.environ)
    if why is None or not isinstance(inline, dict):
        return raw
    sys.stderr.write(f"pyabouts: {why}: not opened\n")
    return {**raw, "ipam": {k: v for k, v in inline.items() if k != "log_file"}}


def _refuse_a_refused_fallback(agent_unreachable: str, said: Mapping[str, object]) -> None:
    """CniError 11 when any of `said` (where: its agent_fallback) is 'fail'."""
    from pyabouts.ipam.errors import TRY_AGAIN_LATER, CniError  # noqa: PLC0415 - fallback only

    for where, value in said.items():
        if value == "fail":
            reason = f"{agent_unreachable}, and {where} says agent_fallback 'fail'"
            raise CniError(TRY_AGAIN_LATER, reason)


class _FirstUseTransactions:
    """Opens the store (and waits for this node's turn) on the first transaction, so a command
    that refuses its input first does no I/O at all."""

    def __init__(
        self,
        ipam: IpamConf,
        pools: Sequence[PoolId],
        writes_by: float | None,
        stack: contextlib.ExitStack,
    ) -> None:
        self._ipam, self._pools, self._writes_by, self._stack = ipam, pools, writes_by, stack
        self._opened: Transactions | None = None

    def run(
        self,
        ranges: Sequence[AddressRange],
        decide: Callable[[PoolView], T],
        *,
        deadline: float,
        watch_checked: bool = False,
    ) -> T:
        if self._opened is None:
            self._opened = self._open()
        return self._opened.run(ranges, decide, deadline=deadline, watch_checked=watch_checked)

    def _open(self) -> Transactions:
        from pyabouts.ipam.stores import open_store  # noqa: PLC0415 - heavy store clients, load on use
        from pyabouts.ipam.transaction import (  # noqa: PLC0415
            DirectTransactions,
            conflict_backoff_max,
        )
        from pyabouts.plugin.node_queue import node_queue  # noqa: PLC0415

        store = open_store(self._ipam, timeout=REQUEST_TIMEOUT_SECONDS)
        self._stack.callback(store.close)
        if self._writes_by is not None:
            self._stack.enter_context(
                node_queue(self._ipam.run_dir, self._pools, deadline=self._writes_by)
            )
        return DirectTransactions(store, backoff_max=conflict_backoff_max(self._ipam.datastore))
