"""Store adapters. Each is imported only when a config selects it: their clients are heavy."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyabouts.ipam.config import IpamConf
    from pyabouts.ipam.store import PoolStore


def open_store(ipam: IpamConf, *, timeout: float) -> PoolStore:
    """The store the config names; `timeout` bounds each request to it, in seconds."""
    if ipam.datastore == "etcd":
        from pyabouts.ipam.stores.etcd import EtcdStore  # noqa: PLC0415 - heavy (grpc), load on use

        return EtcdStore.from_config(ipam, timeout=timeout)
    from pyabouts.ipam.stores.kubernetes import KubernetesStore  # noqa: PLC0415 - heavy, load on use

    return KubernetesStore.from_config(ipam, timeout=timeout)
