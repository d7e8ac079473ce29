"""What the reconciler talks to: the datastore the nodes use, and the Kubernetes API for pods.

Its settings are the nodes' flat file (datastore, etcd_*, kubernetes.kubeconfig), so one file
configures the plugin and the reconciler alike. Without a kubeconfig it uses the in-cluster
service account, as a CronJob or Deployment does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.config.config_exception import ConfigException

from pyabouts.ipam.config import IpamConf, flat_file_settings
from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores import open_store
from pyabouts.ipam.stores.flat_file import read_flat_file, read_own_flat_file
from pyabouts.ipam.stores.kubeconfig import DEFAULT_NAMESPACE, load_kubeconfig
from pyabouts.ipam.stores.kubernetes import KubernetesStore

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
USER_KUBECONFIG = Path("~/.kube/config")
STORE_TIMEOUT = 30.0  # seconds for one datastore request


@dataclass(frozen=True, slots=True)
class Connections:
    store: PoolStore
    api_client: k8s.ApiClient  # for pods (and the leader Lease)
    namespace: str  # where the IPPools (and the Lease) live

    def close(self) -> None:
        self.store.close()
        self.api_client.close()  # type: ignore[no-untyped-call]


def read_settings(config_path: str | None) -> IpamConf:
    """The flat file's keys as an IpamConf (`config_path`, else the plugin's search order);
    defaults (IPPools, in-cluster) when there is none."""
    flat = read_own_flat_file(config_path) if config_path else read_flat_file(None)
    return flat_file_settings(flat)


def connect(
    settings: IpamConf, kubeconfig: str | None = None, namespace: str | None = None
) -> Connections:
    """The store and API client `settings` name; `kubeconfig` overrides the flat file's, and
    `namespace` (of the IPPools) the kubeconfig's."""
    path = kubeconfig or settings.kubernetes.kubeconfig
    if path:
        configuration, namespace_in_use = load_kubeconfig(path)
    else:
        configuration, namespace_in_use = _in_cluster()
    namespace = namespace or namespace_in_use
    # The reconciler is no hot path: its API client (urllib3) retries a failed request, the
    # store a failed connection.
    configuration.retries = 3
    if settings.datastore == "etcd":
        store = open_store(settings, timeout=STORE_TIMEOUT)
    else:
        store = KubernetesStore.from_configuration(configuration, namespace, timeout=STORE_TIMEOUT)
    return Connections(store, k8s.ApiClient(configuration), namespace)


def connect_operator(
    config_path: str | None, kubeconfig: str | None, namespace: str
) -> Connections:
    """connect() for the tools an operator runs by hand (the migration, the kubectl plugin):
    the kubeconfig given, else the one kubectl would use, else the flat file's (on a node,
    the agent's own: the operator's credentials go first); the IPPools in `namespace`."""
    settings = read_settings(config_path)
    kubeconfig = kubeconfig or user_kubeconfig() or settings.kubernetes.kubeconfig
    return connect(settings, kubeconfig, namespace)


def user_kubeconfig() -> str | None:
    """The kubeconfig kubectl would use, when there is one."""
    path = Path(os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or USER_KUBECONFIG)
    return str(path.expanduser()) if path.expanduser().is_file() else None


def _in_cluster() -> tuple[k8s.Configuration, str]:
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except ConfigException as exc:
        raise CniError(
            INVALID_CONFIG, f"no kubeconfig given and not running in a cluster: {exc}"
        ) from exc
    try:
        namespace = IN_CLUSTER_NAMESPACE.read_text().strip()
    except OSError:
        namespace = DEFAULT_NAMESPACE
    return configuration, namespace
