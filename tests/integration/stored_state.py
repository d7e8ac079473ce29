"""What the real stores hold, read back for the tests' assertions, and the stores opened
directly: etcd keys, IPPool objects, and the apiserver's own count of conflicting writes."""

from __future__ import annotations

import json
import time
from typing import Any

import etcd3
import netaddr

from bench.kube import conflicting_writes, requests_by_verb_and_code
from deploy.local.controlplane import ControlPlane
from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.pool import Owner
from pyabouts.ipam.store import PoolStore
from pyabouts.ipam.stores.etcd import EtcdStore
from pyabouts.ipam.stores.kubernetes import GROUP, KubernetesStore
from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam

STORE_TIMEOUT = 5.0  # seconds per request, as the plugin's


def etcd_store(server: EtcdServer) -> EtcdStore:
    """pyabouts' etcd store on `server`, with its TLS and credentials."""
    return EtcdStore.from_config(IpamConf.model_validate(etcd_ipam(server)), timeout=STORE_TIMEOUT)


def kubernetes_store(kubeconfig: str) -> KubernetesStore:
    """pyabouts' IPPool store, reaching the apiserver as `kubeconfig` says."""
    ipam = {"type": "pyabouts", "datastore": "kubernetes", "kubernetes": {"kubeconfig": kubeconfig}}
    return KubernetesStore.from_config(IpamConf.model_validate(ipam), timeout=STORE_TIMEOUT)


def owners_in(store: PoolStore, network: str) -> dict[str, Owner]:
    """address -> owner of every entry of `network` that `store` holds (both families)."""
    return {
        str(netaddr.IPAddress(address, block.key.pool.family)): owner
        for block in store.read_all_blocks()
        if block.key.pool.network == network
        for address, owner in block.entries.items()
    }


def owners_on(cluster: ControlPlane, network: str) -> dict[str, Owner]:
    """owners_in the IPPools of `cluster` (the server is shared: one network's only)."""
    store = kubernetes_store(str(cluster.kubeconfig))
    try:
        return owners_in(store, network)
    finally:
        store.close()


def stored_allocations(server: EtcdServer, network: str) -> dict[str, dict[str, str]]:
    """Every allocation of `network` as etcd holds it: offset-in-block keyed by block cidr."""
    client = etcd3.client(host=server.host, port=server.port)
    try:
        found: dict[str, dict[str, str]] = {}
        for value, _ in client.get_prefix(f"/pyabouts/v1/pools/4/{network}/"):
            doc = json.loads(value)
            for offset, owner in table_entries(doc["allocations"]).items():
                found[f"{doc['cidr']}+{offset}"] = without_node_and_time(owner)
        return found
    finally:
        client.close()


def table_entries(allocations: str) -> dict[str, dict[str, str]]:
    """A stored allocations table read by its header line, as a person reads it (not by the
    plugin's reader): offset -> {column: value}, leaving out empty ("-") values, and times and
    cooldowns of 0 (none)."""
    header, *lines = allocations.split("\n")
    columns = header.split(" ")
    assert columns[0] == "offset", header
    entries = {}
    for line in lines:
        offset, *values = line.split(" ")
        entries[offset] = {
            column: value
            for column, value in zip(columns[1:], values, strict=True)
            if value != "-" and not (column in _TIMES and value == "0")
        }
    return entries


_TIMES = {"allocated", "cooldown", "coolingUntil"}


def without_node_and_time(owner: dict[str, Any]) -> dict[str, Any]:
    """A stored entry without the node and the time that ADD recorded, each checked first: the
    node that allocated (this host's, or its agent's), and a time of this run."""
    assert owner.pop("node")
    given = int(owner.pop("allocated"))
    assert abs(given - time.time()) < 3600, given
    return owner


def stored(cluster: ControlPlane, network: str) -> dict[str, str]:
    """address -> containerID as the IPPools hold them; checks each object's status on the way."""
    listed = json.loads(
        cluster.kubectl("get", "ippools.pyabouts.io", "-n", "kube-system", "-o", "json")
    )
    held: dict[str, str] = {}
    for item in listed["items"]:
        spec = item["spec"]
        if spec["network"] != network:
            continue
        allocations = table_entries(spec["allocations"])
        assert item["status"]["allocated"] == len(allocations)  # status is never stale
        assert item["status"]["free"] == spec["capacity"] - len(allocations)
        prefix = spec["cidr"].split("/")[0].rsplit(".", 1)[0]
        base = int(spec["cidr"].split("/")[0].rsplit(".", 1)[1])
        for offset, owner in allocations.items():
            held[f"{prefix}.{base + int(offset)}"] = owner["containerID"]
    return held


def conflicts_at_the_apiserver(cluster: ControlPlane) -> int:
    """The writes to IPPools the apiserver refused as conflicting so far, from its /metrics."""
    status, body = cluster.request("GET", "/metrics")
    assert status == 200 and isinstance(body, str), status
    return conflicting_writes(requests_by_verb_and_code(body, GROUP))
