"""`pyabouts-reconciler` one pass (the CronJob), on both datastores, with Pod objects on a real
kube-apiserver: what it frees, what it must keep, and that it never frees a live address while
ADDs run beside it."""

import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import netaddr
import pytest

from deploy.local.cluster_objects import apply
from deploy.local.controlplane import ControlPlane
from deploy.local.pod_objects import (
    create_node,
    create_pod,
    delete_node,
    delete_pod,
    lost_node_condition,
    set_network_status,
    set_status,
)
from pyabouts.controller.connect import connect, read_settings
from pyabouts.controller.leaks import Policy
from pyabouts.controller.pods import PodReader
from pyabouts.controller.reconciler import PassSummary, reconcile
from pyabouts.ipam.pool import BlockKey, Owner, PoolId
from pyabouts.ipam.stores.kubernetes import object_name
from tests.integration.kube_fixtures import can
from tests.integration.reconciler_env import (
    NAMESPACE,
    RECONCILER_SA,
    ReconcilerEnv,
    kubeconfig_that_may_not_list_nodes,
    pod_name,
    reconcile_once,
    run_reconciler,
)

pytestmark = pytest.mark.integration


def freed(summary: dict[str, object], reason: str) -> list[str]:
    addresses = summary["addresses"]
    assert isinstance(addresses, list)
    return sorted(a["ip"] for a in addresses if a["reason"] == reason)


def test_a_pod_deleted_without_del_is_reclaimed_once_it_is_gone(recon: ReconcilerEnv) -> None:
    live, gone = pod_name("live"), pod_name("gone")
    kept = recon.add(live, create_pod(recon.cluster, NAMESPACE, live))
    leaked = recon.add(gone, create_pod(recon.cluster, NAMESPACE, gone))

    # A graceful deletion: the pod is Terminating and its DEL is still to come. Keep it.
    delete_pod(recon.cluster, NAMESPACE, gone, grace_seconds=None)
    assert recon.reconcile()["addresses"] == []
    assert set(recon.held()) == {kept, leaked}

    delete_pod(recon.cluster, NAMESPACE, gone)  # gone from the API, and no DEL ever came
    summary = recon.reconcile()
    assert freed(summary, "pod-gone") == [leaked]
    assert set(recon.held()) == {kept}
    assert summary["freed"] >= 1 and "freed" in str(summary["summary"])


def test_a_stored_block_not_in_pyabouts_format_is_left_out_and_the_rest_reconciled(
    recon: ReconcilerEnv,
) -> None:
    """A block edited by hand into something pyabouts cannot read: every pass names it, and
    frees what leaked elsewhere (it failed whole, so one bad object stopped the cluster's GC)."""
    gone = pod_name("gone")
    leaked = recon.add(gone, create_pod(recon.cluster, NAMESPACE, gone))
    delete_pod(recon.cluster, NAMESPACE, gone, grace_seconds=0)
    other = pod_name("other")
    recon.add(other, create_pod(recon.cluster, NAMESPACE, other), cidr="10.71.0.0/24")
    with recon.block_broken("10.71.0.0/24") as broken:
        summary = recon.reconcile()
        assert freed(summary, "pod-gone") == [leaked]
        [why] = [u for u in summary["unreadable"] if broken in u]
        assert "not a pyabouts block" in why or "malformed" in why, why
        assert "1 unreadable block(s) left out" in summary["summary"]
    assert leaked not in recon.held()


def test_a_force_deleted_pods_address_is_freed_only_once_its_gone_grace_has_passed(
    recon: ReconcilerEnv,
) -> None:
    """A force-deleted pod's kubelet may still run it (for its grace, not known to the pass:
    --stop-grace) and tear its sandbox down, and runs the DEL after: the pass judges the
    address again --stop-grace and --gone-grace seconds after it found the pod gone, and frees
    it then. Meanwhile a new pod gets another address, not one the old sandbox may still have
    (freed at once, it was the lowest free one)."""
    name = pod_name("forced")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    delete_pod(recon.cluster, NAMESPACE, name, grace_seconds=0)
    newcomer = pod_name("new")
    newcomer_uid = create_pod(recon.cluster, NAMESPACE, newcomer)
    argv = recon.reconciler_argv("--gone-grace", "10", "--stop-grace", "5")
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as one:
        assert one.stderr is not None
        logged: list[str] = []
        while not logged or "judged again in 15 s" not in logged[-1]:
            line = one.stderr.readline()
            assert line, f"the pass ended without deferring: {''.join(logged)}"
            logged.append(line)
        assert recon.add(newcomer, newcomer_uid) != address
        assert address in recon.held()
        out, rest = one.communicate(timeout=60)
    assert one.returncode == 0, rest
    summary = json.loads(out)
    assert address in [a["ip"] for a in summary["addresses"] if a["reason"] == "pod-gone"]
    assert address not in recon.held()


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_block_the_api_refuses_to_update_is_named_and_the_other_leaks_freed(
    recon: ReconcilerEnv,
) -> None:
    """An admission policy refuses updates of one IPPool: the pass frees the leaks of the other
    blocks, names the refused one, and exits 1; once the policy is gone, the next pass frees
    it. (It stopped at the refused block, and what it had freed went uncounted.)"""
    leaked = {}
    for cidr in ("10.72.0.0/24", "10.73.0.0/24"):
        name = pod_name("gone")
        leaked[cidr] = recon.add(name, create_pod(recon.cluster, NAMESPACE, name), cidr=cidr)
        delete_pod(recon.cluster, NAMESPACE, name, grace_seconds=0)
    frozen = object_name(BlockKey(PoolId(recon.network, 4), int(netaddr.IPAddress("10.72.0.0"))))
    with refused_updates(recon.cluster, frozen):
        done = run_reconciler(recon.flat_file, recon.kubeconfig)
        assert done.returncode == 1, done.stderr
        summary = json.loads(done.stdout)
        assert leaked["10.73.0.0/24"] in [a["ip"] for a in summary["addresses"]]
        [why] = summary["failed"]
        assert frozen in why and "frozen by the test" in why, why
        assert "1 not freed (changed meanwhile, or failed); 1 failure(s)" in summary["summary"]
        assert set(recon.held()) == {leaked["10.72.0.0/24"]}
    assert freed(recon.reconcile(), "pod-gone") == [leaked["10.72.0.0/24"]]
    assert recon.held() == {}


@contextlib.contextmanager
def refused_updates(cluster: ControlPlane, ippool: str) -> Iterator[None]:
    """A ValidatingAdmissionPolicy that refuses updates of the IPPool named `ippool`, in force
    (an update of it, tried with dry-run, refused) from the block's start to its end."""
    policy = f"pyabouts-test-freeze-{uuid.uuid4().hex[:6]}"
    objects = [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": policy},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["pyabouts.io"],
                            "apiVersions": ["*"],
                            "operations": ["UPDATE"],
                            "resources": ["ippools"],
                            "resourceNames": [ippool],  # no other test's IPPool, ever
                        }
                    ]
                },
                "validations": [{"expression": "false", "message": "frozen by the test"}],
            },
        },
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": policy},
            "spec": {"policyName": policy, "validationActions": ["Deny"]},
        },
    ]
    probe = ["label", "--overwrite", "--dry-run=server", "-n", "kube-system", "ippool", ippool]

    def in_force() -> bool:
        tried = cluster.kubectl_run(*probe, "probe=1")
        assert tried.returncode == 0 or "frozen by the test" in tried.stderr, tried.stderr
        return tried.returncode != 0

    def wait_until(wanted: bool) -> None:
        deadline = time.monotonic() + 30
        while in_force() != wanted:
            assert time.monotonic() < deadline, f"the policy in force: never {wanted}"
            time.sleep(0.2)

    apply(cluster, *objects)
    try:
        wait_until(True)
        yield
    finally:
        kinds = "validatingadmissionpolicybinding,validatingadmissionpolicy"
        cluster.kubectl("delete", kinds, policy)
        wait_until(False)


def test_a_pod_of_a_lost_node_is_reclaimed_once_past_its_grace(recon: ReconcilerEnv) -> None:
    evicted = {}
    for name, grace in ((pod_name("lost"), 1), (pod_name("stopping"), 60)):
        address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name, node="node-down"))
        set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
        # The taint manager marks the pod and deletes it; no kubelet confirms.
        set_status(recon.cluster, NAMESPACE, name, {"conditions": [lost_node_condition()]})
        delete_pod(recon.cluster, NAMESPACE, name, grace_seconds=grace)
        evicted[grace] = address
    time.sleep(2.5)  # the first one's grace period (1 s, its deadline in whole seconds) ended
    # By default a lost node's pods keep their addresses: the node may still run them.
    assert freed(recon.reconcile(), "node-lost") == []
    assert {evicted[1], evicted[60]} <= set(recon.held())
    summary = recon.reconcile("--node-lost-grace", "0")
    assert freed(summary, "node-lost") == [evicted[1]]
    # Within its grace period it may be a healthy node's pod, evicted by a NoExecute taint,
    # running until its kubelet stops it and runs its DEL: kept.
    assert evicted[60] in recon.held()


def test_a_static_pods_address_is_kept_though_its_mirror_pod_has_another_uid(
    recon: ReconcilerEnv,
) -> None:
    # The kubelet runs a static pod under a UID of its own (the runtime's K8S_POD_UID) and
    # shows it in the API as a mirror pod, which gets another UID and names the kubelet's.
    name, kubelet_uid = pod_name("static"), "static-pod-config-hash"
    mirror = {"kubernetes.io/config.mirror": kubelet_uid}
    api_uid = create_pod(recon.cluster, NAMESPACE, name, annotations=mirror)
    assert api_uid != kubelet_uid
    set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
    address = recon.add(name, kubelet_uid)
    assert recon.reconcile()["addresses"] == []
    assert set(recon.held()) == {address}


def test_a_static_pod_without_a_mirror_pod_keeps_its_address_until_its_node_is_gone(
    recon: ReconcilerEnv,
) -> None:
    # A kubelet runs a static pod under the manifest's name and its node's, and a UID of its
    # own; the API may have no mirror pod of it (admission refused it, say). It runs all the same.
    # The node the plugin records: this one, or the agent's that serves it.
    live = pod_name("live")
    kept = recon.add(live, create_pod(recon.cluster, NAMESPACE, live), node=pod_name("node"))
    node = recon.held()[kept].node
    name = f"{pod_name('probe')}-{node}"
    create_node(recon.cluster, node)
    try:
        address = recon.add(name, uuid.uuid4().hex, node=node)
        assert recon.reconcile()["addresses"] == []
        assert address in recon.held()
    finally:
        delete_node(recon.cluster, node)
    # Its node is gone, and so are its pods. A reconciler that may not list nodes (its RBAC
    # not updated, say) cannot tell, and keeps the address.
    partial = reconcile_once(recon.flat_file, kubeconfig_that_may_not_list_nodes(recon.cluster))
    assert [a for a in partial["addresses"] if a["network"] == recon.network] == []
    assert address in recon.held()
    # One that may frees it, judged again a --gone-grace later with the nodes listed again.
    assert freed(recon.reconcile("--gone-grace", "1"), "pod-gone") == [address]
    assert set(recon.held()) == {kept}


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_reclaimed_unless_configured_to_keep_them(
    recon: ReconcilerEnv, phase: str
) -> None:
    name = pod_name(phase.lower())
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    set_status(recon.cluster, NAMESPACE, name, {"phase": phase})
    assert recon.reconcile("--keep-finished")["addresses"] == []
    assert freed(recon.reconcile(), "pod-finished") == [address]


def test_a_recreated_pod_of_the_same_name_keeps_its_address(recon: ReconcilerEnv) -> None:
    name = pod_name("web")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name), container="old")
    delete_pod(recon.cluster, NAMESPACE, name)
    new_uid = create_pod(recon.cluster, NAMESPACE, name)  # the StatefulSet makes it again

    # Pending, no network-status yet: within the grace period its address waits for it.
    assert recon.reconcile()["addresses"] == []
    assert recon.add(name, new_uid, container="new") == address
    set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
    set_network_status(recon.cluster, NAMESPACE, name, address)
    assert recon.reconcile()["addresses"] == []
    [(held_address, owner)] = recon.held().items()
    assert owner.node  # this host's, or its agent's
    assert (held_address, owner) == (
        address,
        Owner("new", "net1", f"{NAMESPACE}/{name}", new_uid, owner.node, "net"),
    )


def test_a_recreated_pod_that_does_not_use_the_address_frees_it(recon: ReconcilerEnv) -> None:
    name = pod_name("db")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    delete_pod(recon.cluster, NAMESPACE, name)
    create_pod(recon.cluster, NAMESPACE, name)
    # Running with its network set up elsewhere (another network, not this pool).
    set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
    set_network_status(recon.cluster, NAMESPACE, name, "203.0.113.50")
    assert freed(recon.reconcile(), "pod-replaced") == [address]


def test_a_leak_in_overlapping_ranges_is_freed_for_both(recon: ReconcilerEnv) -> None:
    # Two NADs of one network_name whose ranges overlap share the stored blocks, so freeing the
    # leak once gives the address back to both ranges.
    wide, narrow = "10.70.0.0/24", "10.70.0.0/30"
    first, second = pod_name("wide"), pod_name("narrow")
    taken = recon.add(first, create_pod(recon.cluster, NAMESPACE, first), cidr=wide)
    other = recon.add(second, create_pod(recon.cluster, NAMESPACE, second), cidr=narrow)
    assert (taken, other) == ("10.70.0.1", "10.70.0.2")
    delete_pod(recon.cluster, NAMESPACE, first)
    assert freed(recon.reconcile(), "pod-gone") == [taken]
    third = pod_name("narrow")
    assert recon.add(third, create_pod(recon.cluster, NAMESPACE, third), cidr=narrow) == taken


def test_a_dry_run_reports_the_leaks_and_frees_nothing(recon: ReconcilerEnv) -> None:
    name = pod_name("dry")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    delete_pod(recon.cluster, NAMESPACE, name)
    summary = recon.reconcile("--dry-run")
    assert summary["dryRun"] is True and summary["freed"] == 0
    assert freed(summary, "pod-gone") == [address]
    assert set(recon.held()) == {address}


@pytest.mark.xdist_group("processes")
@pytest.mark.machine_wide  # hundreds of plugin processes at once
def test_200_adds_while_the_reconciler_loops_lose_no_live_address(recon: ReconcilerEnv) -> None:
    """Each pod is created just before its ADD, as after scheduling, while passes run back to
    back; leaks seeded beforehand show that the passes really free what they should."""
    seeded = set()
    for n in range(20):
        name = pod_name(f"leak{n}")
        recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
        delete_pod(recon.cluster, NAMESPACE, name)
        seeded.add(f"{NAMESPACE}/{name}")

    connections = connect(read_settings(str(recon.flat_file)), str(recon.kubeconfig))
    reader = PodReader(connections.api_client)
    summaries: list[PassSummary] = []
    done = threading.Event()

    def loop() -> None:
        while not done.is_set():
            summaries.append(reconcile(connections.store, lambda: reader.list_all().pods, Policy()))

    def start_pod(n: int) -> tuple[str, str]:
        name = f"race-{recon.network}-{n:03d}"
        return name, recon.add(name, create_pod(recon.cluster, NAMESPACE, name))

    looping = threading.Thread(target=loop)
    looping.start()
    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            live = dict(pool.map(start_pod, range(200)))
        time.sleep(0.5)
    finally:
        done.set()
        looping.join(timeout=120)
        connections.close()

    assert len(summaries) >= 3, "the reconciler must have run beside the ADDs"
    live_refs = {f"{NAMESPACE}/{name}" for name in live}
    wrongly_freed = [leak for s in summaries for leak in s.freed if leak.owner.pod in live_refs]
    assert wrongly_freed == []
    held = recon.held()
    assert {address: held[address].pod for address in live.values()} == {
        address: f"{NAMESPACE}/{name}" for name, address in live.items()
    }
    # The seeded leaks were freed during the run (and their addresses went to new pods).
    assert {leak.owner.pod for s in summaries for leak in s.freed} >= seeded
    assert not {owner.pod for owner in held.values()} & seeded


def test_the_reconciler_rbac_allows_exactly_what_it_needs(pyabouts_cluster: ControlPlane) -> None:
    def may(verb: str, resource: str, namespace: str = "kube-system") -> bool:
        return can(pyabouts_cluster, verb, resource, namespace, service_account=RECONCILER_SA)

    for verb in ("get", "list", "watch"):
        assert may(verb, "pods", NAMESPACE), verb
    for verb in ("get", "list", "update", "delete"):  # delete: blocks that hold nothing
        assert may(verb, "ippools.pyabouts.io"), verb
    # Its own Lease alone: the control plane's leader elections hold theirs in kube-system too.
    assert may("create", "leases.coordination.k8s.io")
    for verb in ("get", "update"):
        assert may(verb, "leases.coordination.k8s.io/pyabouts-reconciler"), verb
        assert not may(verb, "leases.coordination.k8s.io/kube-controller-manager"), verb
    assert may("list", "nodes") and may("list", "statefulsets.apps", NAMESPACE)
    assert not may("update", "statefulsets.apps", NAMESPACE)
    assert not may("create", "leases.coordination.k8s.io", NAMESPACE)
    assert not may("delete", "pods", NAMESPACE)
    assert not may("update", "pods", NAMESPACE)
    assert not may("create", "ippools.pyabouts.io")
    assert not may("delete", "ippools.pyabouts.io", NAMESPACE)  # only its own namespace's
    assert not may("get", "secrets")


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_reconciler_that_may_not_list_pods_says_so_and_frees_nothing(
    recon: ReconcilerEnv,
) -> None:
    name = pod_name("kept")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    delete_pod(recon.cluster, NAMESPACE, name)
    # The plugin's ServiceAccount may read and write IPPools, but not list pods.
    plugin = recon.cluster.service_account_kubeconfig("kube-system", "pyabouts")
    argv = [*recon.reconciler_argv()[:-2], "--kubeconfig", str(plugin)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert "Forbidden" in done.stderr and "Traceback" not in done.stderr
    assert set(recon.held()) == {address}
