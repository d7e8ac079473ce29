"""`pyabouts-reconciler --watch` as processes against the real apiserver: it frees a deleted pod's
address within seconds, reports metrics and health, resumes its watch after "410 Gone", two
replicas hand over through the Lease when the leader dies, and one the API refuses its Lease (to
read or to write) says so and is not ready."""

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from deploy.local.pod_objects import (
    create_namespace,
    create_pod,
    delete_pod,
    lost_node_condition,
    set_status,
)
from deploy.local.ports import free_port
from pyabouts.controller.connect import connect, read_settings
from pyabouts.controller.pods import PodReader
from pyabouts.controller.watching import PodEvent, PodWatch, Relisted
from tests.integration.reconciler_env import (
    NAMESPACE,
    RECONCILER_SA,
    ReconcilerEnv,
    pod_name,
    reconciler_argv,
)
from tests.waiting import wait_for

LEASE_RBAC = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: {name}, namespace: kube-system}}
rules:
  - apiGroups: [coordination.k8s.io]
    resources: [leases]
    resourceNames: [{name}]
    verbs: [get, update]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: {name}, namespace: kube-system}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: {name}}}
subjects: [{{kind: ServiceAccount, name: {account}, namespace: kube-system}}]
"""

LEASE_READ_ONLY = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {{name: lease-reader, namespace: {namespace}}}
rules: [{{apiGroups: [coordination.k8s.io], resources: [leases], verbs: [get]}}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {{name: lease-reader, namespace: {namespace}}}
roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: Role, name: lease-reader}}
subjects: [{{kind: ServiceAccount, name: {account}, namespace: kube-system}}]
"""

pytestmark = pytest.mark.integration


@dataclass
class RunningController:
    process: subprocess.Popen[str]
    port: int
    identity: str
    log: IO[str]  # its stderr: a file, never a pipe (a full pipe would block its logging)

    def get(self, path: str) -> tuple[int, str]:
        try:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=5) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:
            return 0, str(exc)

    def stderr(self) -> str:
        """What it wrote so far, read without moving the offset it shares with the process
        (a seek here would make its next line overwrite the start of the file)."""
        return os.pread(self.log.fileno(), 1 << 24, 0).decode(errors="replace")

    def wait_ready(self, what: str, timeout: float = 60) -> None:
        """Until /readyz answers 200."""
        self.wait_until(lambda: self.get("/readyz")[0] == 200, timeout, what)

    def wait_logged(self, text: str, timeout: float = 30) -> None:
        """Until `text` is in its log."""
        self.wait_until(lambda: text in self.stderr(), timeout, f"{text!r} in its log")

    def wait_until(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """wait_for, and on a timeout the failure says what the process said."""
        try:
            wait_for(condition, timeout, what)
        except AssertionError as exc:
            tail = "\n".join(self.stderr().splitlines()[-30:])
            raise AssertionError(f"{exc}; exit {self.process.poll()}, stderr:\n{tail}") from None

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample in /metrics, or None when it is absent."""
        _, text = self.get("/metrics")
        for line in text.splitlines():
            match = re.match(rf"^{name}(\{{(.*)\}})? (\S+)$", line)
            if match and all(f'{k}="{v}"' in (match.group(2) or "") for k, v in labels.items()):
                return float(match.group(3))
        return None


@contextlib.contextmanager
def controllers(
    recon: ReconcilerEnv, count: int, *extra: str, kubeconfig: Path | None = None
) -> Iterator[list[RunningController]]:
    """`count` replicas of `pyabouts-reconciler --watch`, as the test's ServiceAccount (or as
    `kubeconfig`)."""
    started: list[RunningController] = []
    with contextlib.ExitStack() as logs:
        try:
            for n in range(count):
                port, identity = free_port(), f"replica-{n}-{uuid.uuid4().hex[:4]}"
                argv = reconciler_argv(
                    recon.flat_file,
                    kubeconfig or recon.kubeconfig,
                    *("--watch", "--listen", f"127.0.0.1:{port}", "--identity", identity, *extra),
                )
                log = logs.enter_context(tempfile.TemporaryFile("w+"))
                process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, text=True)
                started.append(RunningController(process, port, identity, log))
            yield started
        finally:
            for controller in started:
                controller.process.kill()
                controller.process.wait(timeout=30)


def test_the_controller_frees_a_deleted_pods_address_once_past_the_gone_grace_not_before(
    recon: ReconcilerEnv,
) -> None:
    """A pod force-deleted (no DEL comes): its kubelet still stops it with its own
    terminationGracePeriodSeconds (2 s here), then tears its sandbox down. Freed within
    seconds of that and --gone-grace (3 s here) after the deletion, and not before, by a
    targeted pass or by the full passes (one a second here) meanwhile."""
    live, doomed = pod_name("live"), pod_name("doomed")
    kept = recon.add(live, create_pod(recon.cluster, NAMESPACE, live))
    address = recon.add(doomed, create_pod(recon.cluster, NAMESPACE, doomed, termination_grace=2))
    args = ("--no-leader-election", "--resync", "1", "--gone-grace", "3")
    with controllers(recon, 1, *args) as [controller]:
        controller.wait_ready("ready after its first pass")
        assert controller.get("/healthz") == (200, "ok")
        pool = {"network": recon.network, "family": "4"}
        assert controller.metric("pyabouts_pool_addresses", **pool, state="used") == 2
        assert controller.metric("pyabouts_pool_addresses", **pool, state="total") == 254

        def full_passes() -> float:
            return controller.metric("pyabouts_reconciler_passes_total", kind="full") or 0

        delete_pod(recon.cluster, NAMESPACE, doomed)  # force-deleted, no DEL
        deleted, passes = time.monotonic(), full_passes()
        seconds = wait_for(lambda: address not in recon.held(), 20, f"{address} freed")
        assert time.monotonic() - deleted >= 4.9  # both graces, from when the watch told
        assert full_passes() - passes >= 2  # full passes ran meanwhile, and spared it
        assert set(recon.held()) == {kept}
        reclaimed = controller.metric("pyabouts_reconciler_reclaimed_total", reason="pod-gone")
        assert reclaimed is not None and reclaimed >= 1
        found = controller.metric("pyabouts_reconciler_leaks_found_total", reason="pod-gone")
        assert found is not None and found >= reclaimed
        assert controller.metric("pyabouts_reconciler_passes_total", kind="targeted") >= 1  # type: ignore[operator]
    print(f"freed {seconds:.1f} s after the deletion")


def test_the_controller_frees_a_lost_nodes_pod_once_past_its_grace_not_before(
    recon: ReconcilerEnv,
) -> None:
    name = pod_name("lost")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name, node="node-down"))
    set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
    args = ("--no-leader-election", "--resync", "600", "--node-lost-grace", "3")
    with controllers(recon, 1, *args) as [controller]:
        controller.wait_ready("ready after its first pass")
        # The taint manager marks the pod and deletes it: a watch event, and then none more.
        set_status(recon.cluster, NAMESPACE, name, {"conditions": [lost_node_condition()]})
        delete_pod(recon.cluster, NAMESPACE, name, grace_seconds=2)
        deleted = time.monotonic()
        seconds = wait_for(lambda: address not in recon.held(), 20, f"{address} freed")
        # Not before its grace period (2 s) and the reconciler's (3 s) had ended: a second off
        # at most, as deletionTimestamp is in whole seconds.
        assert time.monotonic() - deleted >= 3.5
        # (At least: the server and the store are shared, and an earlier test's evicted pod,
        # kept then, may be lost by now as well.)
        lost = controller.metric("pyabouts_reconciler_reclaimed_total", reason="node-lost")
        assert lost is not None and lost >= 1
    print(f"freed {seconds:.1f} s after the deletion")


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_controller_started_after_a_pod_was_lost_frees_it_in_time(recon: ReconcilerEnv) -> None:
    name = pod_name("lost-before")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name, node="node-down"))
    set_status(recon.cluster, NAMESPACE, name, {"phase": "Running"})
    set_status(recon.cluster, NAMESPACE, name, {"conditions": [lost_node_condition()]})
    delete_pod(recon.cluster, NAMESPACE, name, grace_seconds=2)
    # Its first full pass finds the pod within its grace; the listing says when it is due.
    args = ("--no-leader-election", "--resync", "600", "--node-lost-grace", "3")
    with controllers(recon, 1, *args) as [controller]:
        controller.wait_ready("ready after its first pass")
        wait_for(lambda: address not in recon.held(), 20, f"{address} freed before a resync")


def test_a_leak_no_watch_event_told_of_is_freed_only_past_the_gone_grace(
    recon: ReconcilerEnv,
) -> None:
    """A pod force-deleted before this replica led (as here), while a full pass read the
    store, or in a gap of the watch: its kubelet may still run it (its grace is not known
    here: --stop-grace), then tear its sandbox down. The first full pass that finds the leak
    leaves it, and a full pass frees it once --stop-grace and --gone-grace have passed since
    (before, the first pass freed it at once)."""
    name = pod_name("unseen")
    address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name))
    delete_pod(recon.cluster, NAMESPACE, name)  # force-deleted, no DEL, no event to come
    args = ("--no-leader-election", "--resync", "600", "--gone-grace", "1", "--stop-grace", "2")
    with controllers(recon, 1, *args) as [controller]:
        controller.wait_ready("ready after its first pass")
        ready = time.monotonic()
        assert address in recon.held()
        wait_for(lambda: address not in recon.held(), 20, f"{address} freed")
        # 3 s from the first pass, which ended before the replica was ready
        assert time.monotonic() - ready >= 2.0
        # by a full pass come early for it (no event names it, and the resync is 600 s)
        full = controller.metric("pyabouts_reconciler_passes_total", kind="full")
        assert full is not None and full >= 2


@pytest.mark.parametrize("recon", ["etcd"], indirect=True)
def test_the_periodic_full_pass_frees_what_no_watch_event_points_at(recon: ReconcilerEnv) -> None:
    graces = ("--gone-grace", "2", "--stop-grace", "0")
    with controllers(recon, 1, "--no-leader-election", "--resync", "2", *graces) as [controller]:
        controller.wait_ready("ready after its first pass")
        # An ADD for a pod that never existed: no pod event will ever name it.
        address = recon.add(pod_name("never-existed"), "no-such-uid")
        wait_for(lambda: address not in recon.held(), 20, f"{address} freed by a full pass")
        full = controller.metric("pyabouts_reconciler_passes_total", kind="full")
        assert full is not None and full >= 2


@pytest.mark.timeout(180)
@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_the_watch_resumes_after_an_apiserver_restart_and_lists_again_on_410(
    recon: ReconcilerEnv,
) -> None:
    # A restarted apiserver starts a new watch cache: resuming from the resourceVersion seen
    # before is answered "410 Gone" (verified by hand), so the watch must list again.
    connections = connect(read_settings(str(recon.flat_file)), str(recon.kubeconfig))
    watch = PodWatch(connections.api_client, PodReader(connections.api_client))
    stop = threading.Event()
    name = pod_name("after-restart")
    ref = f"{NAMESPACE}/{name}"
    try:
        for event in watch.events(stop):
            if isinstance(event, Relisted) and watch.relists == 1:
                recon.cluster.restart_apiserver()
                create_pod(recon.cluster, NAMESPACE, name)  # while the watch is away
            elif isinstance(event, Relisted) and ref in event.listing.pods:
                break  # the listing after 410 Gone has it
            elif isinstance(event, PodEvent) and event.pod.ref == ref:
                break
    finally:
        stop.set()
        connections.close()
    assert watch.relists == 2  # the first listing, and the one after 410 Gone


@contextlib.contextmanager
def lease_granted(recon: ReconcilerEnv, lease: str) -> Iterator[None]:
    """deploy/'s Role grants its own Lease by name alone: another --lease-name (this test's, so
    that tests running at once hold Leases of their own) needs a Role of its own, as for users."""
    rbac = LEASE_RBAC.format(name=lease, account=RECONCILER_SA)
    recon.cluster.kubectl("apply", "-f", "-", input=rbac)
    try:
        yield
    finally:
        recon.cluster.kubectl("delete", "--ignore-not-found", "-f", "-", input=rbac)


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_follower_takes_over_when_the_leader_is_killed(recon: ReconcilerEnv) -> None:
    lease = f"pyabouts-reconciler-{uuid.uuid4().hex[:6]}"
    timing = ("--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "1")
    with (
        lease_granted(recon, lease),
        controllers(recon, 2, "--lease-name", lease, *timing) as replicas,
    ):

        def holder() -> str:
            path = f"/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/{lease}"
            status, body = recon.cluster.request("GET", path)
            return str(body["spec"].get("holderIdentity", "")) if status == 200 else ""

        wait_for(lambda: holder() != "", 60, "one replica holds the Lease")
        [leader] = [r for r in replicas if r.identity == holder()]
        [follower] = [r for r in replicas if r is not leader]
        leader.wait_ready("the leader made its first pass")
        follower.wait_ready("standing by is ready")
        assert (
            leader.metric("pyabouts_reconciler_leader"),
            follower.metric("pyabouts_reconciler_leader"),
        ) == (1, 0)

        leader.process.send_signal(signal.SIGKILL)
        leader.process.wait(timeout=30)
        wait_for(lambda: holder() == follower.identity, 30, "the follower takes the Lease")
        name = pod_name("after-failover")
        address = recon.add(name, create_pod(recon.cluster, NAMESPACE, name, termination_grace=0))
        delete_pod(recon.cluster, NAMESPACE, name)
        wait_for(lambda: address not in recon.held(), 30, f"{address} freed by the new leader")
        assert follower.metric("pyabouts_reconciler_leader") == 1


@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
def test_a_replica_the_api_refuses_its_lease_says_so_and_is_not_ready(recon: ReconcilerEnv) -> None:
    """Another --lease-name and no Role for it: the election alone logged the 403 at INFO and
    stood by as ready for ever, never acting."""
    lease = f"pyabouts-reconciler-{uuid.uuid4().hex[:6]}"
    with controllers(recon, 1, "--lease-name", lease) as [replica]:
        replica.wait_logged(f"refuses this replica the Lease kube-system/{lease} (403")
        time.sleep(1)  # its stand-by beats
        assert replica.get("/healthz")[0] == 200
        assert replica.get("/readyz")[0] != 200
        assert replica.metric("pyabouts_reconciler_leader") == 0
        with lease_granted(recon, lease):
            leads = lambda: replica.metric("pyabouts_reconciler_leader") == 1  # noqa: E731
            wait_for(leads, 60, "it leads once granted the Lease")
            replica.wait_ready("ready after its first pass")


@pytest.mark.parametrize("plugin_mode", ["agent"], indirect=True)  # it allocates nothing
@pytest.mark.parametrize("recon", ["kubernetes"], indirect=True)
@pytest.mark.parametrize("held", [False, True], ids=["create", "update"])
def test_a_replica_that_may_read_its_lease_but_not_write_it_is_not_ready(
    recon: ReconcilerEnv, held: bool, tmp_path: Path
) -> None:
    """A namespace where a Role grants this replica `get` on Leases alone. With no Lease there,
    it reads 404 and its create is refused; with one a replica gone held, its update is. Each
    try of the election reads the Lease again, which is granted: the refused write must still
    keep it from being ready, and the Lease stays as it was."""
    namespace, lease = f"lease-{uuid.uuid4().hex[:6]}", "pyabouts-reconciler"
    leases = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    create_namespace(recon.cluster, namespace)
    rbac = LEASE_READ_ONLY.format(namespace=namespace, account=RECONCILER_SA)
    recon.cluster.kubectl("apply", "-f", "-", input=rbac)
    if held:
        spec = {"holderIdentity": "gone", "leaseDurationSeconds": 1}
        lease_body = {"metadata": {"name": lease}, "spec": spec}
        assert recon.cluster.request("POST", leases, lease_body)[0] == 201
    # The IPPools and the Lease live in the kubeconfig's namespace.
    kubeconfig = recon.cluster.service_account_kubeconfig(
        "kube-system", RECONCILER_SA, tmp_path / "kubeconfig", context_namespace=namespace
    )
    timing = ("--lease-duration", "3", "--renew-deadline", "2", "--retry-period", "1")
    call = "replace_namespaced_lease" if held else "create_namespaced_lease"
    try:
        with controllers(recon, 1, *timing, kubeconfig=kubeconfig) as [replica]:
            refusal = f"the Lease {namespace}/{lease} (403 Forbidden on {call})"
            replica.wait_logged(refusal)
            # Its stand-by beats every 5 s once it has read the Lease, and the election tries
            # every second, each try a read (granted) and a write (refused): several of both.
            for _ in range(12):
                time.sleep(1)
                assert replica.get("/healthz")[0] == 200
                assert replica.get("/readyz")[0] != 200
            assert replica.metric("pyabouts_reconciler_leader") == 0
            assert replica.stderr().count(refusal) == 1  # logged once, not at every try
        status, body = recon.cluster.request("GET", f"{leases}/{lease}")
        if held:
            assert status == 200 and body["spec"]["holderIdentity"] == "gone"
        else:
            assert status == 404
    finally:
        recon.cluster.kubectl("delete", "namespace", namespace, "--wait=false")
