"""The reconciler's judgement, one rule at a time, without any store or API."""

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import netaddr
import pytest

from pyabouts.controller.leaks import (
    Leak,
    PodState,
    Policy,
    Reason,
    find_leaks,
    found_leak_wait,
    judge,
)
from pyabouts.controller.pods import network_status_ips, pod_state
from pyabouts.ipam.pool import Block, BlockKey, Owner, PoolId

NOW = 1_000_000.0
IP = "198.51.100.7"
OWNER = Owner("sandbox-1", "net1", "default/web-0", "uid-1")
RUNNING = PodState(
    namespace="default",
    name="web-0",
    uid="uid-1",
    phase="Running",
    created=NOW - 3600,
    deleting_by=None,
    disrupted=False,
    network_ips=frozenset({IP}),
)
POLICY = Policy(node_lost_grace=60)


def verdict(pod: PodState | None, owner: Owner = OWNER, policy: Policy = POLICY) -> Reason | None:
    return judge(owner, IP, pod, now=NOW, policy=policy)


def test_a_running_pod_keeps_its_address() -> None:
    assert verdict(RUNNING) is None


def test_a_pod_that_no_longer_exists_leaked_its_address() -> None:
    assert verdict(None) is Reason.POD_GONE


def test_an_allocation_without_a_pod_is_never_judged() -> None:
    assert verdict(None, owner=Owner("sandbox-1", "net1")) is None


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_a_finished_pod_gives_its_address_back_unless_configured_not_to(phase: str) -> None:
    finished = replace(RUNNING, phase=phase)
    assert verdict(finished) is Reason.POD_FINISHED
    assert verdict(finished, policy=Policy(free_finished=False)) is None


def test_a_pod_the_taint_manager_deleted_leaked_its_address_once_well_past_its_grace() -> None:
    grace = 60  # POLICY's
    evicted = replace(RUNNING, disrupted=True)
    # Its node is gone: no kubelet removed it after its grace period ended.
    assert verdict(replace(evicted, deleting_by=NOW - grace)) is Reason.NODE_LOST
    # Within its grace period, or just past it, it may be a healthy node's pod that a NoExecute
    # taint evicted: still running, and its kubelet runs its DEL.
    assert verdict(replace(evicted, deleting_by=NOW + 30)) is None
    assert verdict(replace(evicted, deleting_by=NOW - grace + 1)) is None
    # Being deleted alone is a graceful deletion: its DEL is still coming.
    assert verdict(replace(RUNNING, deleting_by=NOW - 3600)) is None


def test_by_default_a_lost_nodes_pod_keeps_its_address_until_it_is_gone() -> None:
    """Its node may be cut off from the API only, still running the pod on the attached
    network: the address is not given to another pod until Kubernetes removes this one."""
    evicted = replace(RUNNING, disrupted=True, deleting_by=NOW - 86400)
    assert verdict(evicted, policy=Policy()) is None
    assert verdict(None, policy=Policy()) is Reason.POD_GONE


def test_a_static_pods_address_is_kept_though_its_mirror_in_the_api_has_another_uid() -> None:
    # The runtime hears the UID its kubelet gave the static pod (recorded as K8S_POD_UID); the
    # API shows a mirror pod with a UID of its own, naming the kubelet's in an annotation.
    mirror = replace(RUNNING, uid="mirror-uid", mirror_of="uid-1", network_ips=None)
    assert verdict(mirror) is None
    assert verdict(replace(mirror, mirror_of="")) is Reason.POD_REPLACED
    assert verdict(replace(mirror, mirror_of="uid-2")) is Reason.POD_REPLACED


def test_a_static_pod_without_a_mirror_pod_keeps_its_address_while_its_node_exists() -> None:
    # As its kubelet runs it: the manifest's name and the node's, and the kubelet's own UID.
    static = Owner("sandbox-1", "net1", "kube-system/probe-worker-1", "0" * 31 + "a", "worker-1")
    # The API may not show it (a mirror pod refused, or not made yet): it runs all the same.
    assert judge(static, IP, None, now=NOW, policy=POLICY, nodes={"worker-1"}) is None
    assert judge(static, IP, None, now=NOW, policy=POLICY) is None  # nodes not listed
    # Its node is gone, and its pods with it.
    assert judge(static, IP, None, now=NOW, policy=POLICY, nodes={"worker-2"}) is Reason.POD_GONE
    # Recorded as the host names itself (an in-process call), listed as kubelet registers it.
    shouting = replace(static, node="Worker-1")
    assert judge(shouting, IP, None, now=NOW, policy=POLICY, nodes={"worker-1"}) is None
    # Neither a UID of the API's nor a name of another node's is a static pod's.
    for other in (
        replace(static, pod_uid="6b0c3cfa-0b5e-4d41-9a3b-4f2e8c1d7a90"),
        replace(static, pod="kube-system/probe-worker-2"),
        replace(static, node=""),
    ):
        assert judge(other, IP, None, now=NOW, policy=POLICY, nodes={"worker-1"}), other


def test_a_recreated_pod_that_uses_the_address_keeps_it() -> None:
    assert verdict(replace(RUNNING, uid="uid-2")) is None


def test_a_recreated_pod_that_does_not_use_the_address_leaves_it_free() -> None:
    other = replace(RUNNING, uid="uid-2", network_ips=frozenset({"198.51.100.99"}))
    assert verdict(other) is Reason.POD_REPLACED


def test_a_recreated_pending_pod_without_network_status_gets_a_grace_period() -> None:
    pending = replace(RUNNING, uid="uid-2", phase="Pending", network_ips=None, created=NOW - 10)
    assert verdict(pending) is None
    assert verdict(replace(pending, created=NOW - 301)) is Reason.POD_REPLACED
    assert verdict(pending, policy=Policy(pending_grace=5)) is Reason.POD_REPLACED


def test_an_allocation_from_before_uids_were_recorded_is_kept_while_its_pod_lives() -> None:
    legacy = Owner("sandbox-1", "net1", "default/web-0")
    assert verdict(replace(RUNNING, uid="uid-2", network_ips=frozenset()), owner=legacy) is None


def test_leaks_are_found_across_blocks_in_address_order() -> None:
    pool = PoolId("blue", 4)
    base = int(netaddr.IPAddress("198.51.100.0"))
    gone = Owner("s2", "net1", "default/gone", "uid-9")
    block = Block(BlockKey.of(pool, base), {base + 9: gone, base + 7: OWNER, base + 8: gone})
    leaks = list(find_leaks([block], {RUNNING.ref: RUNNING}, now=NOW, policy=POLICY))
    assert [(leak.ip, leak.reason) for leak in leaks] == [
        ("198.51.100.8", Reason.POD_GONE),
        ("198.51.100.9", Reason.POD_GONE),
    ]


def test_a_pod_object_reduces_to_what_the_judgement_needs() -> None:
    pod = {
        "metadata": {
            "namespace": "default",
            "name": "web-0",
            "uid": "uid-1",
            "creationTimestamp": "2026-12-01T10:00:00Z",
            "deletionTimestamp": "2026-12-01T11:00:00Z",
            "annotations": {
                "kubernetes.io/config.mirror": "static-uid",
                "k8s.v1.cni.cncf.io/network-status": '[{"name": "default/blue", '
                '"interface": "net1", "ips": ["198.51.100.7", "2001:db8::7"]}]',
            },
        },
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}
            ],
        },
    }
    state = pod_state(pod)
    assert (state.ref, state.uid, state.phase, state.deleting, state.disrupted) == (
        "default/web-0",
        "uid-1",
        "Running",
        True,
        True,
    )
    assert state.deleting_by == datetime(2026, 12, 1, 11, tzinfo=UTC).timestamp()
    assert state.mirror_of == "static-uid"
    assert state.has_uid("static-uid") and state.has_uid("uid-1") and not state.has_uid("")
    assert state.network_ips == frozenset({"198.51.100.7", "2001:db8::7"})
    assert state.created == datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    "annotation",
    [None, "not json", '{"ips": []}', 7, "[" * 100_000],  # the last: past the parser
)
def test_a_missing_or_broken_network_status_counts_as_none_yet(annotation: object) -> None:
    assert network_status_ips(annotation) is None


@pytest.mark.parametrize("ips", ["5", "true", "1.5", '{"a": 1}', '"10.0.0.1"', "[5, null]"])
def test_network_status_ips_of_another_type_are_no_ips_and_never_stop_a_pass(ips: str) -> None:
    # Anybody who may create or patch a pod writes the annotation: a pass that raised on it
    # stopped every reclaim in the cluster (the CronJob's, and the controller's watch).
    annotation = f'[{{"name": "a", "ips": {ips}}}, {{"name": "b", "ips": ["10.0.0.2/24"]}}]'
    assert network_status_ips(annotation) == frozenset({"10.0.0.2"})
    pod = {
        "metadata": {"name": "p", "annotations": {"k8s.v1.cni.cncf.io/network-status": annotation}}
    }
    assert pod_state(pod).network_ips == frozenset({"10.0.0.2"})


@pytest.mark.parametrize(
    ("change", "stopped_by"),
    [
        # Removed without a graceful deletion (kubectl delete --force, the pod GC): its kubelet
        # still stops it with its own terminationGracePeriodSeconds, from when it hears.
        # (And 2 s more at the most: SIGTERM comes that long before SIGKILL, whatever a
        # preStop hook took.)
        ({}, NOW + 32),
        ({"stop_grace": 120.0}, NOW + 122),
        ({"stop_grace": 0.0}, NOW + 2),
        # Deleted gracefully first: stopped by the end of that grace period at the latest.
        ({"deleting_by": NOW + 7}, NOW + 9),
        ({"deleting_by": NOW - 5}, NOW),
        # Deleted with grace 0 (the deletion's own deletionTimestamp): as a force-delete.
        ({"deleting_by": NOW, "deleted_at_once": True}, NOW + 32),
        # Every container had terminated (a kubelet's own last deletion, the phase not moved).
        ({"deleting_by": NOW, "deleted_at_once": True, "containers_terminated": True}, NOW),
        # Finished: its containers had ended.
        ({"phase": "Succeeded", "stop_grace": 600.0}, NOW),
        ({"phase": "Failed", "deleting_by": NOW + 50}, NOW),
    ],
)
def test_a_deleted_pod_is_stopped_by_its_kubelet_within_its_grace(
    change: dict[str, Any], stopped_by: float
) -> None:
    assert replace(RUNNING, **change).stopped_by(NOW) == stopped_by


@pytest.mark.parametrize(("grace", "at_once"), [(0, True), (30, False), (None, False)])
def test_a_deletion_with_grace_0_is_told_from_a_graceful_one(
    grace: int | None, at_once: bool
) -> None:
    meta: dict[str, Any] = {"name": "p", "deletionTimestamp": "2026-12-01T11:00:00Z"}
    if grace is not None:
        meta["deletionGracePeriodSeconds"] = grace
    assert pod_state({"metadata": meta}).deleted_at_once is at_once
    assert pod_state({"metadata": {"name": "p"}}).deleted_at_once is False


@pytest.mark.parametrize(
    ("grace", "read"),
    [(120, 120.0), (0, 0.0), (None, 30.0), ("45", 30.0), (-1, 30.0), (True, 30.0)],
)
def test_the_pods_termination_grace_is_read_and_defaults_as_the_api_defaults_it(
    grace: object, read: float
) -> None:
    spec = {} if grace is None else {"terminationGracePeriodSeconds": grace}
    assert pod_state({"metadata": {"name": "p"}, "spec": spec}).stop_grace == read


@pytest.mark.parametrize(
    ("reason", "wait"),
    [(Reason.POD_GONE, 40.0), (Reason.POD_REPLACED, 40.0), (Reason.POD_FINISHED, 10.0)],
)
def test_a_leak_found_with_no_deletion_seen_waits_for_its_pod_to_be_stopped_when_unseen(
    reason: Reason, wait: float
) -> None:
    # A pass cannot see a gone (or replaced) pod's grace: Kubernetes' default is taken; a
    # finished pod's containers have ended.
    leak = Leak(BlockKey.of(PoolId("blue", 4), 5), 5, OWNER, reason)
    assert found_leak_wait(leak, gone_grace=10.0, stop_grace=30.0) == wait


@pytest.mark.parametrize(
    ("statuses", "terminated"),
    [
        ([{"state": {"terminated": {"exitCode": 0}}}, {"state": {"terminated": {}}}], True),
        ([{"state": {"terminated": {}}}, {"state": {"running": {}}}], False),
        ([], False),
        (None, False),
        ("nonsense", False),
        ([{"state": "terminated"}], False),
    ],
)
def test_containers_count_as_terminated_only_when_every_status_says_so(
    statuses: object, terminated: bool
) -> None:
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": statuses}}
    assert pod_state(pod).containers_terminated is terminated


@pytest.mark.parametrize(
    ("others", "terminated"),
    [
        # A native sidecar (an init container that keeps running) shares the sandbox.
        ({"initContainerStatuses": [{"state": {"running": {}}}]}, False),
        ({"initContainerStatuses": [{"state": {"terminated": {"exitCode": 0}}}]}, True),
        ({"ephemeralContainerStatuses": [{"state": {"running": {}}}]}, False),
        ({"initContainerStatuses": "nonsense"}, False),
    ],
)
def test_sidecars_and_ephemeral_containers_count_among_the_pods_containers(
    others: dict[str, object], terminated: bool
) -> None:
    ended = [{"state": {"terminated": {"exitCode": 0}}}]
    pod = {"metadata": {"name": "p"}, "status": {"containerStatuses": ended, **others}}
    assert pod_state(pod).containers_terminated is terminated
