"""The IPAM plugins under test, and how each is called for one phase on one simulated node.

A contender only says how to call its plugin: the netconf (as a delegating plugin such as macvlan
passes it to its IPAM), any extra environment, and where its files go. Measuring is elsewhere
(bench.measure), so a new contender (whereabouts built from Go, say) is one more subclass here.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.kube import conflicting_writes
from deploy.local.agent_process import AgentProcess
from pyabouts.plugin.agent.metrics import CONFLICTS_METRIC
from pyabouts.plugin.install import install_shim, install_thin_plugin
from pyabouts.plugin.named_files import TRUSTED_DIRS_ENV

CNI_VERSION = "1.0.0"


@dataclass(frozen=True, slots=True)
class Phase:
    """One measured phase. `run_id` is unique per phase and run, so every phase starts with empty
    pools and fresh per-node state."""

    name: str  # "sequential", "spaced", "concurrent" or "pods"
    run_id: str
    nodes: int
    # Several networks: each pod is attached to all of them (as Multus does, one after the
    # other), each network with a pool of its own of `network_pool_size` addresses.
    networks: int = 1
    network_pool_size: int = 0

    def pool(self, contender_pool: PoolBounds, network: int) -> PoolBounds:
        """The pool of `network`: the contender's own, or with several networks the network's,
        in the /24s after the contender's pool (at most 254 addresses each)."""
        if self.networks == 1:
            return contender_pool
        if self.network_pool_size > 254:
            raise ValueError(f"{self.network_pool_size} addresses do not fit a /24")
        after = int(ipaddress.ip_network(contender_pool.cidr).broadcast_address) + 1
        first_24 = -(-after // 256)  # the first /24 wholly after the contender's pool
        base = ipaddress.IPv4Address((first_24 + network) * 256)
        return pool_of(str(base), self.network_pool_size)

    def network_name(self, network: int) -> str:
        return f"bench-{self.run_id}" + (f"-{network}" if self.networks > 1 else "")


@dataclass(frozen=True, slots=True)
class NodeSetup:
    """Everything needed to call a contender's plugin on one node in one phase."""

    netconf: bytes
    stderr_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ImportProbe:
    """For a plugin written in Python: what to time of its imports."""

    python: Path  # the interpreter the plugin runs on
    entry_modules: tuple[str, ...]  # imported by every call (VERSION included)
    add_path_module: str  # what ADD imports on top (config, allocator)
    store_module: str | None = None  # the datastore client, imported by ADD when it opens it


class Contender(ABC):
    """One IPAM plugin under test."""

    def __init__(
        self,
        name: str,
        executable: Path,
        workdir: Path,
        *,
        cluster_unique: bool,
        import_probe: ImportProbe | None = None,
    ) -> None:
        self.name = name
        self.executable = executable
        self.workdir = workdir / name
        self.cluster_unique = cluster_unique  # False: nodes allocate independently
        self.import_probe = import_probe
        #: The CPU time its datastore's server (kube-apiserver or etcd) used so far, where it
        #: has one.
        self.server_cpu: Callable[[], float] | None = None
        self.workdir.mkdir(parents=True, exist_ok=True)

    @abstractmethod
    def prepare_node(self, phase: Phase, node: int, network: int = 0) -> NodeSetup:
        """Create the node's files for `network` of `phase` and say how to call the plugin
        there."""

    def count_conflicts(self, phase: Phase) -> int | None:
        """Write conflicts the plugin reported so far in `phase`; None if it does not say."""
        return None

    def api_requests(self) -> Counter[str] | None:
        """Requests its datastore served so far, by "<VERB> <code>"; None if not counted."""
        return None

    def daemon_rss_mib(self) -> float | None:
        """The peak RSS of the node daemons it needs (an agent), if any."""
        return None

    def daemon_cpu_seconds(self) -> float | None:
        """The CPU time its node daemons (the agents of all nodes) used so far, if any."""
        return None

    def server_cpu_seconds(self) -> float | None:
        return None if self.server_cpu is None else self.server_cpu()

    def node_dir(self, phase: Phase, node: int, network: int = 0) -> Path:
        path = self.workdir / phase.run_id / f"node-{node}" / f"network-{network}"
        path.mkdir(parents=True, exist_ok=True)
        return path


class Pyabouts(Contender):
    """pyabouts; each node has its own flat file (datastore settings, run_dir) and log file."""

    def __init__(
        self,
        name: str,
        executable: Path,
        python: Path,
        workdir: Path,
        *,
        pool: PoolBounds,
        store_module: str,
        node_slice_size: str | None = None,
    ) -> None:
        probe = ImportProbe(
            python=python,
            entry_modules=("pyabouts.plugin.main", "pyabouts.plugin.handler"),
            add_path_module="pyabouts.plugin.commands",
            store_module=store_module,
        )
        super().__init__(name, executable, workdir, cluster_unique=True, import_probe=probe)
        self.pool = pool
        self.node_slice_size = node_slice_size  # each node allocating in a slice of its own

    @abstractmethod
    def datastore_settings(self) -> dict[str, Any]:
        """The flat file's keys: which datastore, and how to reach it."""

    def prepare_node(self, phase: Phase, node: int, network: int = 0) -> NodeSetup:
        node_dir = self.node_dir(phase, node, network)
        flat_file = node_dir / "pyabouts.conf"
        # Each simulated node has its own run_dir: the node-local queue is per node.
        node_settings = {"run_dir": str(node_dir.parent / "run")}
        flat_file.write_text(json.dumps(self.datastore_settings() | node_settings))
        pool = phase.pool(self.pool, network)
        ipam = {
            "type": "pyabouts",
            "range": pool.cidr,
            "range_start": pool.first,
            "range_end": pool.last,
            "network_name": phase.network_name(network),
            "configuration_path": str(flat_file),
            "log_file": str(node_dir / "pyabouts.log"),
        }
        if self.node_slice_size:
            ipam["node_slice_size"] = self.node_slice_size
        return NodeSetup(
            netconf=delegating_netconf(ipam, phase.network_name(network)),
            stderr_path=node_dir / "stderr.log",
            # The files above, in the run's directory: followed there (plugin/named_files.py).
            extra_env={TRUSTED_DIRS_ENV: str(node_dir.parent)},
        )


class PyaboutsEtcd(Pyabouts):
    """pyabouts with the etcd datastore. Its conflicts are not counted: etcd keeps no count of
    transactions whose compare failed, and the plugin processes are gone when a phase ends."""

    def __init__(
        self,
        executable: Path,
        python: Path,
        workdir: Path,
        *,
        etcd_endpoint: str,
        pool: PoolBounds,
        name: str = "pyabouts-etcd",
    ) -> None:
        super().__init__(
            name, executable, python, workdir, pool=pool, store_module="pyabouts.ipam.stores.etcd"
        )
        self.etcd_endpoint = etcd_endpoint

    def datastore_settings(self) -> dict[str, Any]:
        return {"datastore": "etcd", "etcd_host": self.etcd_endpoint}


class PyaboutsKubernetes(Pyabouts):
    """pyabouts with the Kubernetes datastore (IPPool custom resources on a kube-apiserver)."""

    def __init__(
        self,
        executable: Path,
        python: Path,
        workdir: Path,
        *,
        kubeconfig: Path,
        request_counter: Callable[[], Counter[str]],
        pool: PoolBounds,
        name: str = "pyabouts-kubernetes",
        node_slice_size: str | None = None,
    ) -> None:
        super().__init__(
            name,
            executable,
            python,
            workdir,
            pool=pool,
            store_module="pyabouts.ipam.stores.kubernetes",
            node_slice_size=node_slice_size,
        )
        self.kubeconfig = kubeconfig
        self.request_counter = request_counter

    def datastore_settings(self) -> dict[str, Any]:
        return {"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(self.kubeconfig)}}

    def api_requests(self) -> Counter[str]:
        return self.request_counter()

    def count_conflicts(self, phase: Phase) -> int:
        """The apiserver's own count of writes it refused as conflicting."""
        return conflicting_writes(self.request_counter())


class NodeAgents:
    """A pyabouts-agent per simulated node, started at the node's first call, and the client
    the plugin runs as: the node shim (`shim`, what the DaemonSet installs) or the thin Python
    plugin.

    Agents are per node, not per phase: on a real node the agent outlives any one burst. Their
    memory is the node's standing cost, reported apart from the plugin process's. Each serves
    the contender's datastore from a flat file of its own (`start` writes it from the
    settings given), as the DaemonSet's agents do, so its store client is opened when it
    starts, not by a phase's first call.
    """

    def __init__(
        self,
        directory: Path,
        *,
        start: Callable[[Path, dict[str, Any]], AgentProcess],
        shim: Path | None,
    ) -> None:
        self._directory = directory
        self._start = start
        self._running: dict[int, AgentProcess] = {}
        bin_dir, no_agent = directory / "bin", str(directory / "none.sock")
        self.client = (
            install_shim(bin_dir, shim, socket_path=no_agent)
            if shim
            else install_thin_plugin(bin_dir, socket_path=no_agent)
        )

    def serve(self, setup: NodeSetup, node: int, datastore: dict[str, Any]) -> NodeSetup:
        """`setup` with the plugin pointed at the node's agent (started now if need be)."""
        agent = self._running.get(node)
        if agent is None:
            agent = self._running[node] = self._start(self._directory / f"agent-{node}", datastore)
        return replace(
            setup, extra_env={**setup.extra_env, "PYABOUTS_AGENT_SOCKET": str(agent.socket)}
        )

    def peak_rss_mib(self) -> float | None:
        peaks = [a.peak_rss_mib() for a in self._running.values()]
        return max(peaks) if peaks else None

    def cpu_seconds(self) -> float:
        return sum(agent.cpu_seconds() for agent in self._running.values())

    def conflicts(self) -> int:
        """The blocks the agents' writes found changed by another node so far, as their
        metrics count them."""
        return sum(
            int(sample.value)
            for agent in self._running.values()
            for family in text_string_to_metric_families(agent.metrics())
            if family.name == CONFLICTS_METRIC
            for sample in family.samples
            if sample.name == f"{CONFLICTS_METRIC}_total"
        )


class AgentServed(Pyabouts):
    """A pyabouts contender whose calls its nodes' agents serve (`_agents`). Its conflicts are
    the agents' count, which outlives the phases, unlike plugin processes: on IPPools the writes
    kube-apiserver refused and those the agents did not send because their watch showed them
    bound to be refused."""

    _agents: NodeAgents

    def count_conflicts(self, phase: Phase) -> int:
        return self._agents.conflicts()

    def prepare_node(self, phase: Phase, node: int, network: int = 0) -> NodeSetup:
        setup = super().prepare_node(phase, node, network)
        return self._agents.serve(setup, node, self.datastore_settings())

    def daemon_rss_mib(self) -> float | None:
        return self._agents.peak_rss_mib()

    def daemon_cpu_seconds(self) -> float:
        return self._agents.cpu_seconds()


class PyaboutsAgent(AgentServed, PyaboutsKubernetes):
    """pyabouts through a node's client of its agent (NodeAgents), with IPPools."""

    def __init__(
        self,
        workdir: Path,
        *,
        kubeconfig: Path,
        request_counter: Callable[[], Counter[str]],
        pool: PoolBounds,
        agents: Callable[[Path, dict[str, Any]], AgentProcess],
        name: str = "pyabouts-agent",
        shim: Path | None = None,
        node_slice_size: str | None = None,
    ) -> None:
        self._agents = NodeAgents(workdir / name, start=agents, shim=shim)
        super().__init__(
            self._agents.client,
            Path(sys.executable),
            workdir,
            kubeconfig=kubeconfig,
            request_counter=request_counter,
            pool=pool,
            name=name,
            node_slice_size=node_slice_size,
        )
        self.import_probe = None  # its imports are _socket, os and sys: VERSION shows them


class PyaboutsAgentEtcd(AgentServed, PyaboutsEtcd):
    """pyabouts through the node shim to its agent (NodeAgents), with the etcd datastore."""

    def __init__(
        self,
        workdir: Path,
        *,
        etcd_endpoint: str,
        pool: PoolBounds,
        agents: Callable[[Path, dict[str, Any]], AgentProcess],
        name: str,
        shim: Path,
    ) -> None:
        self._agents = NodeAgents(workdir / name, start=agents, shim=shim)
        python = Path(sys.executable)
        client = self._agents.client
        super().__init__(client, python, workdir, etcd_endpoint=etcd_endpoint, pool=pool, name=name)
        self.import_probe = None


class Whereabouts(Contender):
    """whereabouts v0.9.4, built from its Go module: IPPools of its own CRD, a Lease around each
    allocation. Each node has its flat file (datastore, kubeconfig of its ServiceAccount)."""

    def __init__(
        self,
        executable: Path,
        workdir: Path,
        *,
        kubeconfig: Path,
        request_counter: Callable[[], Counter[str]],
        pool: PoolBounds,
        name: str = "whereabouts",
    ) -> None:
        super().__init__(name, executable, workdir, cluster_unique=True)
        self.kubeconfig = kubeconfig
        self.request_counter = request_counter
        self.pool = pool

    def prepare_node(self, phase: Phase, node: int, network: int = 0) -> NodeSetup:
        node_dir = self.node_dir(phase, node, network)
        flat_file = node_dir / "whereabouts.conf"
        settings = {"datastore": "kubernetes", "kubernetes": {"kubeconfig": str(self.kubeconfig)}}
        flat_file.write_text(json.dumps(settings))
        pool = phase.pool(self.pool, network)
        ipam = {
            "type": "whereabouts",
            "range": pool.cidr,
            "range_start": pool.first,
            "range_end": pool.last,
            "network_name": phase.network_name(network),
            "configuration_path": str(flat_file),
            "log_file": str(node_dir / "whereabouts.log"),
            "log_level": "error",
        }
        return NodeSetup(
            netconf=delegating_netconf(ipam, phase.network_name(network)),
            stderr_path=node_dir / "stderr.log",
        )

    def api_requests(self) -> Counter[str]:
        return self.request_counter()

    def count_conflicts(self, phase: Phase) -> int:
        """The apiserver's own count of writes it refused as conflicting."""
        return conflicting_writes(self.request_counter())


class HostLocal(Contender):
    """The reference host-local IPAM: a file store per node, so unique per node only."""

    def __init__(
        self,
        executable: Path,
        workdir: Path,
        *,
        pool: PoolBounds,
        name: str = "host-local",
    ) -> None:
        super().__init__(name, executable, workdir, cluster_unique=False)
        self.pool = pool

    def prepare_node(self, phase: Phase, node: int, network: int = 0) -> NodeSetup:
        node_dir = self.node_dir(phase, node, network)
        pool = phase.pool(self.pool, network)
        subnet = {"subnet": pool.cidr, "rangeStart": pool.first}
        ipam = {
            "type": "host-local",
            "ranges": [[subnet | {"rangeEnd": pool.last}]],
            "dataDir": str(node_dir / "data"),
        }
        return NodeSetup(
            netconf=delegating_netconf(ipam, phase.network_name(network)),
            stderr_path=node_dir / "stderr.log",
        )


def delegating_netconf(ipam: dict[str, Any], name: str) -> bytes:
    """The whole network config, as macvlan passes it to its IPAM plugin."""
    netconf = {"cniVersion": CNI_VERSION, "name": name, "type": "macvlan", "ipam": ipam}
    return json.dumps(netconf).encode()


@dataclass(frozen=True, slots=True)
class PoolBounds:
    """A pool of exactly `size` addresses: the first `size` hosts of `cidr`."""

    cidr: str
    first: str
    last: str
    size: int


def sliced_pool_of(base: str, nodes: int, slice_prefix: int) -> PoolBounds:
    """A range at `base` cut into aligned /`slice_prefix` slices, ending with the `nodes`-th: one
    slice per node (the network's own address, in the first slice, is not handed out)."""
    slice_size = 1 << (32 - slice_prefix)
    prefix = 32 - max(nodes * slice_size - 1, 1).bit_length()
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    first, last = network.network_address + 1, network.network_address + nodes * slice_size - 1
    return PoolBounds(str(network), str(first), str(last), nodes * slice_size - 1)


def pool_of(base: str, size: int) -> PoolBounds:
    """The smallest IPv4 network at `base` with room for `size` hosts, cut to exactly `size`."""
    prefix = 30
    while (1 << (32 - prefix)) - 2 < size:
        prefix -= 1
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    first = network.network_address + 1
    return PoolBounds(str(network), str(first), str(first + size - 1), size)
