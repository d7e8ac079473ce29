"""The etcd store's grpc client polls on the calling thread (GRPC_EXPERIMENTS in
ipam.stores.etcd): grpc's EventEngine client would hand each call to its own threads, with
several thread switches per call. A grpcio that no longer takes the setting fails here. And a
logged-in client starts no thread per call (etcd3's call credentials, dropped there)."""

import json
import os
import subprocess
import sys

import pytest

from tests.integration.etcd_fixtures import EtcdServer
from tests.integration.plugin_fixtures import etcd_ipam

pytestmark = pytest.mark.integration

CALLS = 400

# In a process of its own: grpc reads GRPC_EXPERIMENTS once, when it is imported. The
# EventEngine threads wake on timers of their own too: as many switches as they make over the
# same time spent asleep are taken off, so that a slow machine's longer calls do not count.
_CALLER = """
import json, os, sys, threading, time
from pyabouts.ipam.config import IpamConf
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId
from pyabouts.ipam.stores.etcd import EtcdStore

def event_engine_switches():
    switches = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/comm") as comm:
            if comm.read().strip() != "event_engine":
                continue
        with open(f"/proc/self/task/{task}/status") as status:
            switches += sum(int(l.split()[1]) for l in status if "ctxt_switches" in l)
    return switches

started = 0
thread_start = threading.Thread.start
def counted_start(thread):
    global started
    started += 1
    thread_start(thread)
threading.Thread.start = counted_start

store = EtcdStore.from_config(IpamConf.model_validate(json.loads(sys.argv[1])), timeout=5)
key = BlockKey(PoolId("client-threads-" + str(os.getpid()), 4), 0x0A000000)
store.read_blocks(key.pool, key.base, key.base)  # connected, logged in
before, began, started_before = event_engine_switches(), time.monotonic(), started
for n in range(int(sys.argv[2]) // 2):
    [block] = store.read_blocks(key.pool, key.base, key.base) or [Block(key)]
    block.put(key.base + n % 256, Owner(f"c{n}", "net1"))
    assert store.write_blocks([block]).conflicts == []
calls, took = event_engine_switches() - before, time.monotonic() - began
threads = started - started_before
time.sleep(took)
idle = event_engine_switches() - before - calls
print(json.dumps({"switches": calls - idle, "threads": threads}))
"""


def calls_threads(server: EtcdServer, experiments: str | None) -> dict[str, int]:
    """Over CALLS calls of the etcd store, in a process where GRPC_EXPERIMENTS is `experiments`
    (None: not set): the thread switches of grpc's EventEngine threads, less those of as long
    asleep ("switches"), and the Python threads started ("threads")."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if experiments is not None:
        env["GRPC_EXPERIMENTS"] = experiments
    argv = [sys.executable, "-c", _CALLER, json.dumps(etcd_ipam(server)), str(CALLS)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    counts: dict[str, int] = json.loads(done.stdout.splitlines()[-1])
    return counts


@pytest.mark.parametrize("fixture", ["etcd_server", "etcd_tls_auth_server"])
def test_etcd_calls_leave_grpcs_event_engine_threads_asleep(
    fixture: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(fixture)
    assert calls_threads(server, None)["switches"] < CALLS // 2


def test_a_logged_in_client_starts_no_thread_per_call(etcd_tls_auth_server: EtcdServer) -> None:
    # grpc runs call credentials' plugin on a thread of its own, started for the call; under
    # load the call then goes on on an EventEngine thread too.
    assert calls_threads(etcd_tls_auth_server, None)["threads"] == 0


def test_an_operators_grpc_experiments_are_kept(etcd_server: EtcdServer) -> None:
    # The empty setting is grpc's default: each call wakes the EventEngine's threads (five
    # to seven switches per call here). It also shows that the count above tells the two apart.
    assert calls_threads(etcd_server, "")["switches"] >= CALLS
