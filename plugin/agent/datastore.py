"""The datastore the node agent serves, reached with the agent's own credentials.

NetworkAttachmentDefinitions are written by namespace users, and the agent runs as root on
every node. If a request's `kubernetes.kubeconfig`, `etcd_*` paths, `etcd_host` or
`configuration_path` were followed, anyone who can write a NAD could make the agent read a file,
run a kubeconfig `exec` command or connect to a host of their choosing. So the agent reads its
settings once, at start, from its own command line: a flat file of its own (`--config`, the
same keys as the nodes' flat file, which also fills what requests leave empty), a kubeconfig
(`--kubeconfig`), else the service account of its pod. A request's datastore keys are ignored
(a NAD ported from whereabouts names a kubeconfig, and keeps working); a request for the other
datastore is refused. `--trust-request-datastore` restores the plugin process's behaviour, for
tests and single-user hosts only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyabouts.ipam.config import FlatFile, IpamConf, flat_file_settings
from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores import open_store
from pyabouts.ipam.stores.etcd_settings import EtcdSettings
from pyabouts.ipam.stores.flat_file import read_own_flat_file
from pyabouts.ipam.stores.kube_api import ApiCredentials
from pyabouts.ipam.stores.kubeconfig import in_cluster_credentials, read_kubeconfig
from pyabouts.ipam.stores.kubernetes import KubernetesStore


@dataclass(frozen=True, slots=True)
class AgentDatastore:
    """What the agent serves: `settings` (its flat file's datastore keys), the kubeconfig it
    uses for IPPools (None: its pod's service account), and its flat file, if any."""

    settings: IpamConf
    kubeconfig: str | None
    flat_file: FlatFile | None

    def open_store(self, *, timeout: float) -> PoolStore:
        """A client with the agent's credentials, read afresh (tokens and certificates rotate)."""
        if self.settings.datastore == "etcd":
            return open_store(self.settings, timeout=timeout)
        return KubernetesStore.from_credentials(self._credentials(), timeout=timeout)

    def check_request(self, ipam: IpamConf) -> None:
        """Refuse a request for the datastore this agent does not serve."""
        if ipam.datastore != self.settings.datastore:
            raise CniError(
                INVALID_CONFIG,
                f"this node's pyabouts agent serves {self.describe()}; the network config asks "
                f"for datastore {ipam.datastore!r} (set its datastore, or the agent's --config)",
            )

    def describe(self) -> str:
        if self.settings.datastore == "etcd":
            endpoints = EtcdSettings.from_config(self.settings, timeout=0).describe()
            return f"datastore 'etcd' at {endpoints}"
        credentials = self._credentials()
        return (
            f"datastore 'kubernetes' (IPPools in namespace {credentials.namespace} "
            f"of {credentials.server})"
        )

    def _credentials(self) -> ApiCredentials:
        if self.kubeconfig:
            return read_kubeconfig(self.kubeconfig)
        return in_cluster_credentials(os.environ)


def agent_datastore(config: str | None, kubeconfig: str | None) -> AgentDatastore:
    """The agent's datastore from its command line; CniError 7 when it names no usable one.
    Credentials are read now, so a bad setting stops the agent at start, not at the first pod."""
    flat = read_own_flat_file(config) if config else None
    settings = flat_file_settings(flat)
    datastore = AgentDatastore(
        settings, kubeconfig or settings.kubernetes.kubeconfig or None, flat_file=flat
    )
    datastore.describe()  # reads the credentials or parses the endpoints: fail now if bad
    return datastore
