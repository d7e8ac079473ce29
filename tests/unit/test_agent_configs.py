"""The node agent validates each network config once: its nodes' pods send the same few configs
on every call. Its own flat file fills what they leave empty; a bad config is refused on every
call, never kept."""

import json
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.plugin.agent.backend import CACHED_NETCONF_BYTES, WarmBackend
from pyabouts.plugin.agent.datastore import agent_datastore
from pyabouts.plugin.agent.metrics import AgentMetrics


@pytest.fixture
def backend(tmp_path: Path) -> WarmBackend:
    """An agent serving etcd from its own flat file (opening no connection here)."""
    flat = tmp_path / "agent.conf"
    flat.write_text(json.dumps({"datastore": "etcd", "etcd_host": "127.0.0.1:2379"}))
    return WarmBackend(AgentMetrics(), "node-0", agent_datastore(str(flat), None))


def netconf(range_: str, **extra: Any) -> bytes:
    ipam = {"type": "pyabouts", "range": range_}
    return json.dumps({"cniVersion": "1.0.0", "name": "blue", "ipam": ipam, **extra}).encode()


def test_a_config_is_validated_once_and_its_ranges_come_from_its_own_bytes(
    backend: WarmBackend, tmp_path: Path
) -> None:
    blue, green = netconf("10.60.0.0/24"), netconf("10.61.0.0/24")
    first = backend.config(json.loads(blue), blue)
    assert backend.config(json.loads(blue), blue) is first  # not validated again
    assert first.flat_file == str(tmp_path / "agent.conf")  # the agent's, filling the gaps
    assert first.ipam.etcd_host == "127.0.0.1:2379"
    other = backend.config(json.loads(green), green)
    assert [r.text for r in first.ranges] == ["10.60.0.0/24"]
    assert [r.text for r in other.ranges] == ["10.61.0.0/24"]


def test_a_bad_config_is_refused_on_every_call(backend: WarmBackend) -> None:
    bad = netconf("10.60.0.0/33")
    for _ in range(2):
        with pytest.raises(CniError) as refused:
            backend.config(json.loads(bad), bad)
        assert refused.value.code == INVALID_CONFIG


def test_a_config_too_large_to_keep_is_validated_on_each_call(backend: WarmBackend) -> None:
    large = netconf("10.60.0.0/24", padding="x" * CACHED_NETCONF_BYTES)
    first = backend.config(json.loads(large), large)
    again = backend.config(json.loads(large), large)
    assert again is not first and again == first
