"""The benchmark's phases, run for real with host-local: pods on several networks get one
address per network from that network's own pool, a pod's calls run one after the other, and
a spaced phase rests between calls without counting the rests."""

import argparse
import contextlib
import ipaddress
import time
from pathlib import Path

import pytest

from bench.contenders import HostLocal, Phase, pool_of, sliced_pool_of
from bench.measure import Attachment, measure_command, measure_phase
from bench.process import Spawner
from bench.quiet import Quiet
from bench.run_benchmark import PYABOUTS_SHIM_ETCD, Servers, _contender

HOST_LOCAL = Path("/usr/lib/cni/host-local")


@pytest.fixture
def host_local(tmp_path: Path) -> HostLocal:
    return HostLocal(HOST_LOCAL, tmp_path, pool=pool_of("10.75.0.0", 20))


def test_each_network_of_a_phase_has_its_own_pool_after_the_contenders() -> None:
    own = pool_of("10.75.0.0", 1000)
    phase = Phase("pods", "run", nodes=2, networks=16, network_pool_size=128)
    pools = [phase.pool(own, network) for network in range(16)]
    networks = [ipaddress.ip_network(own.cidr), *(ipaddress.ip_network(p.cidr) for p in pools)]
    assert all(not a.overlaps(b) for i, a in enumerate(networks) for b in networks[i + 1 :]), (
        networks
    )
    assert {p.size for p in pools} == {128}
    assert Phase("sequential", "run", nodes=1).pool(own, 0) == own
    with pytest.raises(ValueError, match="do not fit"):
        Phase("pods", "run", nodes=1, networks=2, network_pool_size=255).pool(own, 1)


def test_a_sliced_pool_ends_with_the_last_nodes_slice() -> None:
    # Ten nodes, a /24 each: the /20 holding them, from its first host to the tenth /24's end.
    pool = sliced_pool_of("10.81.0.0", 10, 24)
    assert (pool.cidr, pool.first, pool.last, pool.size) == (
        "10.81.0.0/20",
        "10.81.0.1",
        "10.81.9.255",
        2559,
    )
    assert sliced_pool_of("10.81.0.0", 16, 24).cidr == "10.81.0.0/20"  # exactly full
    assert sliced_pool_of("10.81.0.0", 17, 24).cidr == "10.81.0.0/19"
    assert sliced_pool_of("10.81.0.0", 1, 25).cidr == "10.81.0.0/25"


def test_pods_on_several_networks_get_an_address_of_each_networks_pool(
    host_local: HostLocal, tmp_path: Path
) -> None:
    # Pools of 4 addresses, of which host-local keeps the first for the gateway: room for 3 pods.
    phase = Phase("pods", "pods-1", nodes=1, networks=3, network_pool_size=4)
    (add,) = measure_phase(host_local, phase, 3, 3, Spawner(scratch=tmp_path), commands=("ADD",))
    assert (add.calls, add.ok, add.failures, add.duplicates) == (9, 9, {}, 0)
    assert add.networks == 3
    assert add.pod_p50_s is not None and add.pod_max_s is not None
    assert 0 < add.pod_p50_s <= add.pod_max_s <= add.wall_s
    # Network 1's pool is full, and it is its own: one more pod there finds no address in it.
    setup = host_local.prepare_node(phase, 0, 1)
    extra = measure_command(
        host_local,
        phase,
        "ADD",
        [[Attachment("pods-1-extra", "pod-extra", setup, "net2")]],
        concurrency=1,
        spawner=Spawner(scratch=tmp_path),
    )
    assert extra.ok == 0
    (message,) = extra.failure_samples.values()
    assert phase.pool(host_local.pool, 1).last in message, message


def test_each_command_is_settled_before_and_after_its_calls_and_records_it(
    host_local: HostLocal, tmp_path: Path
) -> None:
    # The benchmark settles with bench.quiet.wait_for_quiet: the CPUs quiet after the last one.
    phase = Phase("settled", "settled-1", nodes=1)
    data = host_local.node_dir(phase, 0, 0) / "data"
    held_when_settled = []

    def settle() -> Quiet:
        time.sleep(0.3)
        held = [f for f in data.rglob("*") if f.is_file() and f.name[0].isdigit()]
        held_when_settled.append(len(held))  # host-local's files: one per address given
        return Quiet(waited_s=0.3, busy=0.04)

    add, delete = measure_phase(host_local, phase, 2, 1, Spawner(scratch=tmp_path), settle=settle)
    assert (add.ok, delete.ok) == (2, 2)
    assert held_when_settled == [0, 2, 2, 0]  # before and after the ADDs, then the DELs
    assert (add.quiet_wait_s, add.busy_at_start) == (0.3, 0.04)
    assert (delete.quiet_wait_s, delete.busy_at_start) == (0.3, 0.04)
    assert add.wall_s < 0.3 and delete.wall_s < 0.3  # host-local's calls take milliseconds


def test_a_spaced_phase_rests_between_calls_and_does_not_count_the_rests(
    host_local: HostLocal, tmp_path: Path
) -> None:
    phase = Phase("spaced", "spaced-1", nodes=1)
    started = time.perf_counter()
    add, delete = measure_phase(host_local, phase, 3, 1, Spawner(scratch=tmp_path), gap_s=0.4)
    elapsed = time.perf_counter() - started
    assert (add.ok, delete.ok) == (3, 3)
    assert elapsed >= 3 * 0.4  # the ADDs rested, the DELs did not
    assert add.wall_s < 3 * 0.4  # host-local's calls take milliseconds: no rest counted
    with pytest.raises(ValueError, match="one pod at a time"):
        measure_phase(host_local, phase, 2, 2, Spawner(scratch=tmp_path), gap_s=0.1)


def test_the_etcd_contender_counts_etcds_cpu_and_its_agents_conflicts(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The shim and an agent per node on the run's etcd, as bench/run.sh races them: the phase
    reports etcd's CPU as the server's, and the conflicts the agents counted (how many, the
    timing decides)."""
    # A short directory: the agents' sockets are in it, and a unix socket's path has at most
    # 107 bytes (a test's own tmp_path under a pytest-xdist worker is longer).
    tmp_path = tmp_path_factory.mktemp("bench")
    args = argparse.Namespace(calls=60, nodes=3)
    with contextlib.ExitStack() as stack:
        contender = _contender(PYABOUTS_SHIM_ETCD, Servers(stack, tmp_path), args)
        phase = Phase("concurrent", "etcd-1", nodes=3)
        add, delete = measure_phase(contender, phase, 60, 12, Spawner(scratch=tmp_path))
    assert (add.ok, add.duplicates, delete.ok) == (60, 0, 60), add.failure_samples
    assert add.server_cpu_ms is not None and add.server_cpu_ms > 0
    assert add.daemon_cpu_ms is not None and add.daemon_cpu_ms > 0
    assert add.conflicts is not None and delete.conflicts is not None
