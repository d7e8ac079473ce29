"""The IPPool objects' names (ipam.stores.kubernetes.object_name): one per block, and a network
whose name has the form of another network's digest name creates no block (the real apiserver
stores blocks in tests/integration/test_kubernetes_datastore.py)."""

from __future__ import annotations

import json
from typing import Any

import netaddr
import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.kubernetes import KubernetesStore, object_name

BASE = int(netaddr.IPAddress("10.1.0.0"))


class RecordingApi:
    """Takes every write, answering a new resourceVersion."""

    server = "https://recording"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((method, path))
        return {"metadata": {"resourceVersion": str(len(self.calls))}}


def test_a_dns_safe_network_names_its_objects_and_another_takes_a_digest() -> None:
    assert object_name(BlockKey(PoolId("blue", 4), BASE)) == "blue-10.1.0.0-24"
    digest = object_name(BlockKey(PoolId("Blue Net", 4), BASE))
    assert digest.startswith("net-") and digest.endswith("-10.1.0.0-24")


def test_a_network_named_like_a_digest_creates_no_block_and_keeps_those_it_has() -> None:
    """A new block would be stored under the name of the network whose digest it is (taking
    its block, or failing on it at every ADD): refused. One stored before is still written."""
    taken = object_name(BlockKey(PoolId("", 4), BASE)).removesuffix("-10.1.0.0-24")
    api = RecordingApi()
    store = KubernetesStore(api, "kube-system")  # type: ignore[arg-type]
    owner = Owner("c1", "net1", "ns/p1")
    new = Block(BlockKey(PoolId(taken, 4), BASE), {BASE + 1: owner})
    with pytest.raises(CniError) as refused:
        store.write_blocks([new])
    assert refused.value.code == INVALID_CONFIG and taken in refused.value.msg
    assert api.calls == []
    stored = Block(BlockKey(PoolId(taken, 4), BASE), {BASE + 1: owner}, revision="7")
    assert store.write_blocks([stored]).conflicts == []
    assert api.calls == [
        ("PUT", f"/apis/pyabouts.io/v1alpha1/namespaces/kube-system/ippools/{taken}-10.1.0.0-24")
    ]


def test_a_network_named_like_a_digest_keeps_its_blocks_when_they_hold_nothing() -> None:
    """Deleted, such a block could not be created again (above): every ADD of a node that
    starts there would fail. The reconciler's delete leaves it, and sends nothing."""
    taken = object_name(BlockKey(PoolId("", 4), BASE)).removesuffix("-10.1.0.0-24")
    api = RecordingApi()
    store = KubernetesStore(api, "kube-system")  # type: ignore[arg-type]
    assert store.remove_block(Block(BlockKey(PoolId(taken, 4), BASE), revision="7")) is False
    assert api.calls == []
    assert store.remove_block(Block(BlockKey(PoolId("blue", 4), BASE), revision="7")) is True
    assert api.calls == [
        ("DELETE", "/apis/pyabouts.io/v1alpha1/namespaces/kube-system/ippools/blue-10.1.0.0-24")
    ]


def test_a_network_whose_block_name_another_network_holds_is_told_so() -> None:
    """A digest-shaped network stored before, and a network whose digest that name is: the
    latter's read finds a block of another pool under its name, code 7 (it looped on 409s until
    its deadline, code 11)."""
    squatted = object_name(BlockKey(PoolId("Blue Net", 4), BASE))
    squatter = squatted.removesuffix("-10.1.0.0-24")

    stored = Block(BlockKey(PoolId(squatter, 4), BASE), revision="5")
    held = json.loads(KubernetesStore(RecordingApi(), "kube-system")._object_json(stored))  # type: ignore[arg-type]

    class HoldingApi(RecordingApi):
        def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
            super().request(method, path)
            return dict(held)

    store = KubernetesStore(HoldingApi(), "kube-system")  # type: ignore[arg-type]
    with pytest.raises(CniError) as clash:
        store.read_blocks(PoolId("Blue Net", 4), BASE, BASE + 1)
    assert clash.value.code == INVALID_CONFIG
    assert "'Blue Net'" in clash.value.msg and repr(squatter) in clash.value.msg
