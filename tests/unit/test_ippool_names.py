"""The IPPool objects' names (ipam.stores.kubernetes.object_name): one per block, never the same
for two pools."""

from __future__ import annotations

import netaddr
import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.pool import BlockKey, PoolId
from pyabouts.ipam.stores.kubernetes import object_name

BASE = int(netaddr.IPAddress("10.1.0.0"))


def test_a_dns_safe_network_names_its_objects_and_another_takes_a_digest() -> None:
    assert object_name(BlockKey(PoolId("blue", 4), BASE)) == "blue-10.1.0.0-24"
    digest = object_name(BlockKey(PoolId("Blue Net", 4), BASE))
    assert digest.startswith("net-") and digest.endswith("-10.1.0.0-24")


def test_a_network_named_like_a_digest_is_refused_rather_than_given_anothers_objects() -> None:
    """Else its ADDs would write the objects of the network whose digest it names, which then
    finds them foreign and fails every ADD of that block."""
    taken = object_name(BlockKey(PoolId("", 4), BASE)).removesuffix("-10.1.0.0-24")
    with pytest.raises(CniError) as refused:
        object_name(BlockKey(PoolId(taken, 4), BASE))
    assert refused.value.code == INVALID_CONFIG
    assert taken in refused.value.msg
