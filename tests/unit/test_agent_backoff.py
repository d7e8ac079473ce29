"""The node agent's transactions wait after a lost race as their datastore needs
(ipam.transaction.conflict_backoff_max): briefly on etcd, whether the agent serves its own
etcd or one a request names. (Opening an etcd client connects nowhere until its first call.)"""

import json
from pathlib import Path

from pyabouts.ipam.coalescing import CoalescingTransactions
from pyabouts.ipam.transaction import BACKOFF_MAX, ETCD_BACKOFF_MAX
from pyabouts.plugin.agent.backend import WarmBackend
from pyabouts.plugin.agent.datastore import agent_datastore
from pyabouts.plugin.agent.metrics import AgentMetrics

ETCD = {"datastore": "etcd", "etcd_host": "127.0.0.1:2379"}


def netconf(ipam: dict[str, str]) -> bytes:
    config = {"type": "pyabouts", "range": "10.60.0.0/24", **ipam}
    return json.dumps({"cniVersion": "1.0.0", "name": "blue", "ipam": config}).encode()


def backoff_max(backend: WarmBackend, request: bytes) -> float:
    config = backend.config(json.loads(request), request)
    try:
        with backend.transactions(config.ipam, [], writes_by=None) as transactions:
            assert isinstance(transactions, CoalescingTransactions)
            return transactions.backoff_max
    finally:
        backend.close()


def test_an_agent_serving_its_own_etcd_tries_a_lost_race_again_sooner(tmp_path: Path) -> None:
    flat = tmp_path / "agent.conf"
    flat.write_text(json.dumps(ETCD))
    backend = WarmBackend(AgentMetrics(), "node-0", agent_datastore(str(flat), None))
    assert backoff_max(backend, netconf({})) == ETCD_BACKOFF_MAX < BACKOFF_MAX


def test_an_agent_serving_the_etcd_a_request_names_tries_a_lost_race_again_sooner() -> None:
    trusting = WarmBackend(AgentMetrics(), "node-0", None)
    assert backoff_max(trusting, netconf(ETCD)) == ETCD_BACKOFF_MAX
