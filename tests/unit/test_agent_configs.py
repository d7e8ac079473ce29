"""The node agent validates each network config once: its node's pods send the same few configs
on every ADD. Its own flat file fills what they leave empty; a bad config is refused on every
call, and one the runtime fills per call (prevResult, GC's attachments) is never kept. An agent
that trusts requests reads the flat file each names, every time."""

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyabouts.ipam import config as ipam_config
from pyabouts.ipam.config import FlatFile, PluginConfig
from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.plugin.agent import backend as agent_backend
from pyabouts.plugin.agent.backend import CACHED_NETCONF_BYTES, WarmBackend
from pyabouts.plugin.agent.datastore import AgentDatastore, agent_datastore
from pyabouts.plugin.agent.metrics import AgentMetrics


@pytest.fixture
def backend(tmp_path: Path) -> WarmBackend:
    """An agent serving etcd from its own flat file (opening no connection here)."""
    flat = tmp_path / "agent.conf"
    flat.write_text(json.dumps({"datastore": "etcd", "etcd_host": "127.0.0.1:2379"}))
    return WarmBackend(AgentMetrics(), "node-0", agent_datastore(str(flat), None))


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The network configs the agent validated, as JSON, in order."""
    seen: list[bytes] = []

    def counted(raw: dict[str, Any], flat: FlatFile | None = None) -> PluginConfig:
        seen.append(json.dumps(raw).encode())
        return ipam_config.load_config(raw, flat)

    monkeypatch.setattr(agent_backend, "load_config", counted)
    return seen


def netconf(range_: str, **extra: Any) -> bytes:
    ipam = {"type": "pyabouts", "range": range_}
    return json.dumps({"cniVersion": "1.0.0", "name": "blue", "ipam": ipam, **extra}).encode()


def test_a_config_is_validated_once_and_its_ranges_come_from_its_own_bytes(
    backend: WarmBackend, tmp_path: Path, validations: list[bytes]
) -> None:
    blue, green = netconf("10.60.0.0/24"), netconf("10.61.0.0/24")
    first = backend.config(json.loads(blue), blue)
    assert backend.config(json.loads(blue), blue) is first
    assert len(validations) == 1  # not validated again
    assert first.flat_file == str(tmp_path / "agent.conf")  # the agent's, filling the gaps
    assert first.ipam.etcd_host == "127.0.0.1:2379"
    other = backend.config(json.loads(green), green)
    assert [r.text for r in first.ranges] == ["10.60.0.0/24"]
    assert [r.text for r in other.ranges] == ["10.61.0.0/24"]


def test_a_bad_config_is_refused_on_every_call(
    backend: WarmBackend, validations: list[bytes]
) -> None:
    bad = netconf("10.60.0.0/33")
    for _ in range(2):
        with pytest.raises(CniError) as refused:
            backend.config(json.loads(bad), bad)
        assert refused.value.code == INVALID_CONFIG
    assert len(validations) == 2  # the refusal was not kept


@pytest.mark.parametrize(
    "per_call",
    [
        {"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.60.0.5/24"}]}},
        {"cni.dev/valid-attachments": [{"containerID": "c1", "ifname": "net1"}]},
    ],
)
def test_a_config_the_runtime_fills_per_call_is_validated_every_time_and_not_kept(
    backend: WarmBackend, validations: list[bytes], per_call: dict[str, Any]
) -> None:
    """A DEL's or CHECK's prevResult, a GC's attachments: each call's bytes differ, and kept
    they would push out the configs that ADDs send again."""
    with_it = netconf("10.60.0.0/24", **per_call)
    for _ in range(2):
        backend.config(json.loads(with_it), with_it)
    assert len(validations) == 2
    plain = netconf("10.60.0.0/24")
    for _ in range(2):
        backend.config(json.loads(plain), plain)
    assert len(validations) == 3


def test_an_agent_trusting_requests_reads_the_flat_file_they_name_on_every_call(
    tmp_path: Path,
) -> None:
    flat = tmp_path / "node.conf"
    flat.write_text(json.dumps({"datastore": "etcd", "etcd_host": "10.0.0.1:2379"}))
    trusting = WarmBackend(AgentMetrics(), "node-0", None)
    named = netconf("10.60.0.0/24")
    raw = json.loads(named)
    raw["ipam"]["configuration_path"] = str(flat)
    named = json.dumps(raw).encode()
    assert trusting.config(json.loads(named), named).ipam.etcd_host == "10.0.0.1:2379"
    flat.write_text(json.dumps({"datastore": "etcd", "etcd_host": "10.0.0.2:2379"}))
    assert trusting.config(json.loads(named), named).ipam.etcd_host == "10.0.0.2:2379"


def test_a_config_too_large_to_keep_is_validated_on_each_call(
    backend: WarmBackend, validations: list[bytes]
) -> None:
    large = netconf("10.60.0.0/24", padding="x" * CACHED_NETCONF_BYTES)
    first = backend.config(json.loads(large), large)
    assert backend.config(json.loads(large), large) == first
    assert len(validations) == 2


def transactions_for(backend: WarmBackend, cidr: str) -> Callable[[], object]:
    """What serves a request of a network on `cidr` now (the store client's transactions)."""
    config = backend.config(json.loads(netconf(cidr)), netconf(cidr))
    pools = [r.pool for r in config.ranges]

    def transactions() -> object:
        with backend.transactions(config.ipam, pools, writes_by=None) as opened:
            return opened

    return transactions


def age_clients_past_their_time(backend: WarmBackend) -> None:
    """Make every store client of `backend` due for a fresh one (credentials rotate)."""
    for client in backend._clients.values():
        client.opened -= agent_backend.CLIENT_MAX_AGE_SECONDS + 1


def test_a_fresh_client_that_cannot_be_opened_leaves_the_current_one_serving(
    backend: WarmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 10 minutes the agent opens a fresh store client (credentials rotate). One that
    cannot be opened then (a file caught mid-rewrite) leaves the current client serving,
    rather than failing the request (code 7) with a client that works."""
    transactions = transactions_for(backend, "10.62.0.0/24")
    current = transactions()
    age_clients_past_their_time(backend)

    tries: list[float] = []

    def unopenable(self: object, *, timeout: float) -> None:
        tries.append(timeout)
        raise CniError(INVALID_CONFIG, "etcd_ca_cert_file: no such file")

    with monkeypatch.context() as patched:
        patched.setattr(AgentDatastore, "open_store", unopenable)
        assert transactions() is current  # served on, no error
        assert transactions() is current
    assert len(tries) == 1  # not tried again at every request
    monkeypatch.setattr(agent_backend, "CLIENT_REOPEN_SECONDS", 0.0)
    age_clients_past_their_time(backend)
    assert transactions() is not current  # once it can be opened, a fresh one


def test_while_a_fresh_client_opens_slowly_the_current_one_serves_the_other_requests(
    backend: WarmBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a client may run a kubeconfig's exec plugin (a cloud's token helper, seconds).
    The request that opens it waits for it; the node's other requests meanwhile are served by
    the current client, not queued behind it."""
    transactions = transactions_for(backend, "10.63.0.0/24")
    current = transactions()
    age_clients_past_their_time(backend)
    opening, release = threading.Event(), threading.Event()
    open_store = AgentDatastore.open_store

    def slow(self: AgentDatastore, *, timeout: float) -> object:
        opening.set()
        assert release.wait(10)
        return open_store(self, timeout=timeout)

    monkeypatch.setattr(AgentDatastore, "open_store", slow)
    fresh: list[object] = []
    opener = threading.Thread(target=lambda: fresh.append(transactions()))
    opener.start()
    try:
        assert opening.wait(10)
        started = time.monotonic()
        assert transactions() is current  # at once, from the current client
        assert time.monotonic() - started < 1
    finally:
        release.set()
        opener.join(10)
    assert fresh and fresh[0] is not current
    assert transactions() is fresh[0]
