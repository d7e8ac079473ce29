"""Which allocations have leaked: pure decisions over a snapshot of the store and of the pods.

No I/O. The reconciler reads the blocks first and lists the pods after, so an allocation in the
snapshot was made for a pod that existed before the listing began: if the listing does not show
that pod, it is gone. What is freed is then freed only if the entry is still exactly the one
judged here (see controller.reclaim), so an allocation created or reused meanwhile is kept.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum

import netaddr

from pyabouts.ipam.pool import Block, BlockKey, Owner


class Reason(StrEnum):
    POD_GONE = "pod-gone"  # no pod of that namespace/name exists (a static pod: nor its node)
    POD_REPLACED = "pod-replaced"  # another pod (another UID) of that name, not using it
    POD_FINISHED = "pod-finished"  # Succeeded or Failed: its sandbox is torn down
    # deleted by the taint manager (a node lost, or a NoExecute taint), and still there well
    # after its grace period ended: no kubelet is left to run its DEL
    NODE_LOST = "node-lost"
    # sticky, and no StatefulSet covers the pod's name (none of that name, or scaled below it)
    NOT_IN_STATEFULSET = "not-in-statefulset"
    # released with a cooldown that has ended: the entry goes, so rests do not pile up
    REST_ENDED = "rest-ended"


# What a pod's address may have leaked by while its kubelet still runs it or tears its sandbox
# down (and runs the DEL, which frees it): freed only --gone-grace seconds after the kubelet
# stopped it (PodState.stopped_by; found_leak_wait where a pass cannot tell).
SANDBOX_MAY_REMAIN = frozenset({Reason.POD_GONE, Reason.POD_REPLACED, Reason.POD_FINISHED})
# Of those, the leaks whose pod a pass cannot see (gone from the API): whether and how long its
# kubelet still runs it is not known there (see PodState.stopped_by), and is taken as up to
# DEFAULT_STOP_GRACE_SECONDS, Kubernetes' default terminationGracePeriodSeconds.
POD_UNSEEN = frozenset({Reason.POD_GONE, Reason.POD_REPLACED})
DEFAULT_STOP_GRACE_SECONDS = 30.0
# What a kubelet gives a container to stop beyond its grace at the most: a preStop hook may take
# the whole grace, and SIGTERM still comes this long before SIGKILL (pkg/kubelet/kuberuntime,
# minimumGracePeriodInSeconds).
KILL_WINDOW_SECONDS = 2.0

# The UID a kubelet gives a static pod whose manifest names none: the hex MD5 of the manifest
# (pkg/kubelet/config/common.go), where the API gives its objects RFC 4122 UUIDs.
_STATIC_POD_UID = re.compile(r"[0-9a-f]{32}")


def is_static_pod(owner: Owner) -> bool:
    """Whether `owner` is a static pod's, as its kubelet runs it: a UID of the kubelet's own,
    and the name the kubelet gives it (the manifest's, "-", its node's, lower-cased)."""
    return bool(
        owner.node
        and _STATIC_POD_UID.fullmatch(owner.pod_uid)
        and owner.pod.endswith(f"-{owner.node.lower()}")
    )


#: "namespace/name" of each StatefulSet -> the ordinals its replicas have now.
StatefulSets = Mapping[str, range]


def in_statefulset(pod: str, statefulsets: StatefulSets) -> bool:
    """Whether "namespace/name" is the name of a pod a StatefulSet has now ("<set>-<ordinal>"
    with the ordinal among its replicas', written as Kubernetes writes it: no leading zero)."""
    stem, _, ordinal = pod.rpartition("-")
    if not re.fullmatch(r"0|[1-9][0-9]*", ordinal):
        return False
    return int(ordinal) in statefulsets.get(stem, range(0))


@dataclass(frozen=True, slots=True)
class PodState:
    """What the reconciler needs to know of one pod."""

    namespace: str
    name: str
    uid: str
    phase: str  # Pending, Running, Succeeded, Failed, Unknown
    created: float  # metadata.creationTimestamp, epoch seconds
    # metadata.deletionTimestamp, epoch seconds: when its grace period ends (None: not deleted)
    deleting_by: float | None
    disrupted: bool  # a DisruptionTarget condition from the taint manager
    network_ips: frozenset[str] | None  # the network-status annotation's IPs; None: none yet
    # A static pod's mirror in the API: the UID its kubelet gave the runtime (K8S_POD_UID, what
    # allocations record), from its `kubernetes.io/config.mirror` annotation; "" for others.
    mirror_of: str = ""
    node: str = ""  # spec.nodeName: where it runs ("" while unscheduled)
    stop_grace: float = DEFAULT_STOP_GRACE_SECONDS  # spec.terminationGracePeriodSeconds
    # Deleted with grace period 0 (metadata.deletionGracePeriodSeconds): a force-delete, or its
    # kubelet's last word once it had stopped it; its deletionTimestamp is then the deletion's.
    deleted_at_once: bool = False
    # Every container's status says terminated (status.containerStatuses; False without any).
    containers_terminated: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def has_uid(self, uid: str) -> bool:
        """Whether `uid` (an allocation's K8S_POD_UID) is this pod's: its own, or for a static
        pod the one its kubelet knows it by, as the API's mirror pod has a UID of its own."""
        return uid in (self.uid, self.mirror_of) if uid else False

    @property
    def deleting(self) -> bool:
        return self.deleting_by is not None

    @property
    def finished(self) -> bool:
        """Succeeded or Failed: its containers ended for good, and its sandbox is torn down."""
        return self.phase in ("Succeeded", "Failed")

    def stopped_by(self, gone: float) -> float:
        """When its kubelet has stopped its containers at the latest (epoch seconds), this
        being its state as its deletion at `gone` left it. A finished pod's have stopped (a
        kubelet moves a pod it stopped to a terminal phase before it deletes it). A graceful
        deletion's end is its deletionTimestamp. A pod removed from the API at once
        (force-deleted, or by the pod garbage collector) its kubelet still stops with its own
        terminationGracePeriodSeconds, counted from when it hears of it: it kills the pod as
        its own copy has it, which never shows that deletion (pkg/kubelet/pod_workers.go,
        calculateEffectiveGracePeriod). Its sandbox, and its address, live that long, and
        KILL_WINDOW_SECONDS more at the most. A pod whose containers had all terminated (a
        kubelet's own last deletion, where it did not move the pod to a terminal phase) has
        stopped."""
        if self.finished or self.containers_terminated:
            return gone
        if self.deleting_by is not None and not self.deleted_at_once:
            return max(gone, self.deleting_by + KILL_WINDOW_SECONDS)
        return gone + max(0.0, self.stop_grace) + KILL_WINDOW_SECONDS

    def lost_since(self, policy: Policy) -> float | None:
        """When its address may be freed as NODE_LOST (epoch seconds); None: not a lost pod, or
        the policy frees none."""
        if not self.disrupted or self.deleting_by is None or policy.node_lost_grace is None:
            return None
        return self.deleting_by + policy.node_lost_grace


DEFAULT_PENDING_GRACE = 300.0  # seconds
# A gone pod's addresses are judged no sooner than this after its kubelet has stopped its
# containers (PodState.stopped_by): it then tears the sandbox down and runs the DEL, which
# frees the address itself; freed before, the address could be given to another pod while the
# old sandbox still has it.
DEFAULT_GONE_GRACE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class Policy:
    free_finished: bool = True  # free the addresses of Succeeded and Failed pods
    # How long a re-created Pending pod without network-status is waited for.
    pending_grace: float = DEFAULT_PENDING_GRACE
    # How long past its deletion's deadline a pod the taint manager deleted keeps its address;
    # None (the default): until the pod is gone. A node cut off from the API may still run it,
    # holding the address on the attached network; Kubernetes removes such pods once the node is
    # deleted or tainted out-of-service, and its kubelet runs their DEL if it comes back.
    node_lost_grace: float | None = None


@dataclass(frozen=True, slots=True)
class Leak:
    """An allocation to free: where it is, who holds it (as read), and why it is a leak."""

    key: BlockKey
    address: int
    owner: Owner
    reason: Reason

    @property
    def ip(self) -> str:
        return str(netaddr.IPAddress(self.address, self.key.pool.family))

    def describe(self) -> str:
        network = self.key.pool.network or "-"
        owner = f"{self.owner.pod} {self.owner.ifname}"
        return f"{self.ip} (network {network}) of {owner}: {self.reason}"


def found_leak_wait(leak: Leak, gone_grace: float, stop_grace: float) -> float:
    """How long after a pass found `leak` (one of SANDBOX_MAY_REMAIN), with no deletion of its
    pod seen, it is judged again: `gone_grace`, and before it `stop_grace` (the pod's
    terminationGracePeriodSeconds, as far as anyone knows) when the pod is not to be seen."""
    return gone_grace + (stop_grace if leak.reason in POD_UNSEEN else 0.0)


def find_leaks(
    blocks: Iterable[Block],
    pods: Mapping[str, PodState],
    *,
    now: float,
    policy: Policy,
    statefulsets: StatefulSets | None = None,
    nodes: Collection[str] | None = None,
) -> Iterator[Leak]:
    """The allocations in `blocks` that no live pod uses, in block and address order.
    `statefulsets` judges sticky allocations, `nodes` static pods' without a mirror pod;
    without them they are kept (see judge)."""
    for block in blocks:
        for address, owner in sorted(block.entries.items()):
            ip = str(netaddr.IPAddress(address, block.key.pool.family))
            pod = pods.get(owner.pod)
            reason = judge(
                owner, ip, pod, now=now, policy=policy, statefulsets=statefulsets, nodes=nodes
            )
            if reason is not None:
                yield Leak(block.key, address, owner, reason)


def _reserved(owner: Owner, pod: PodState | None, *, now: float, policy: Policy) -> Reason | None:
    """A reservation no StatefulSet covers: kept while the pod may still take its address
    back (the same pod, not finished nor being deleted, whose sandbox comes back; or a pod of
    that name created again and still setting up, within the grace); else it ends."""
    if pod is None or pod.deleting or pod.finished:
        return Reason.NOT_IN_STATEFULSET
    if not owner.pod_uid or pod.has_uid(owner.pod_uid):
        return None
    setting_up = pod.phase == "Pending" and now - pod.created < policy.pending_grace
    return None if setting_up else Reason.NOT_IN_STATEFULSET


def judge(
    owner: Owner,
    ip: str,
    pod: PodState | None,
    *,
    now: float,
    policy: Policy,
    statefulsets: StatefulSets | None = None,
    nodes: Collection[str] | None = None,
) -> Reason | None:
    """Why the allocation of `ip` to `owner` is a leak, given its pod as listed; None: keep it.

    A static pod (is_static_pod) runs from its node's manifest whether the API shows it or not:
    its mirror pod may be missing (refused by admission, a namespace that does not exist, a
    kubelet that has not made it yet). Without one it is kept while its node is in `nodes`, the
    cluster's Nodes listed after the pods, and always without `nodes`; its DEL frees it.

    A sticky allocation (sticky_statefulsets) of a pod that a StatefulSet has now is kept
    whatever became of the pod: the StatefulSet makes a pod of that name again, and its ADD
    takes the address back. Without `statefulsets` (they could not be listed) every sticky
    allocation is kept: better late than a duplicate. One reserved after its pod's DEL that no
    StatefulSet covers is kept only while its pod may still take it back (see _reserved).
    """
    if owner.cooling:  # released already (release_cooldown): nobody holds it
        return Reason.REST_ENDED if owner.cooling_until <= now else None
    if not owner.pod:
        return None  # not a pod's (no K8S_POD_NAME): nothing to judge it by; CNI GC covers it
    if owner.sticky:
        if statefulsets is None or in_statefulset(owner.pod, statefulsets):
            return None
        if owner.reserved:
            return _reserved(owner, pod, now=now, policy=policy)
    if pod is None:
        # Node names as the API lists them are lower-case (kubelet lower-cases the host name).
        if is_static_pod(owner) and (nodes is None or owner.node.lower() in nodes):
            return None
        return Reason.POD_GONE
    if owner.pod_uid and not pod.has_uid(owner.pod_uid):
        # A pod of the same name was created again (a StatefulSet's, say). Its ADD takes this
        # address back (ADD is idempotent on the pod name) and records its own UID; until then,
        # keep the address while the new pod may still be setting up its network.
        if pod.network_ips is not None and ip in pod.network_ips:
            return None
        if pod.network_ips is None and not pod.deleting and pod.phase == "Pending":
            return None if now - pod.created < policy.pending_grace else Reason.POD_REPLACED
        return Reason.POD_REPLACED
    if policy.free_finished and pod.finished:
        return Reason.POD_FINISHED
    # The taint manager also evicts the pods of a healthy node (a NoExecute taint they do not
    # tolerate): those run until their grace period ends, and their kubelet runs their DEL.
    lost_since = pod.lost_since(policy)
    if lost_since is not None and now >= lost_since:
        return Reason.NODE_LOST
    return None
