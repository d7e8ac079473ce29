"""The local cluster's pod network on this host, and undoing it.

Pods get ``eth0`` on the bridge ``cni0`` (198.18.0.1/24, a test range: see
shared/notes/environment.md, never 203.0.113.0/24) from the reference ``bridge`` and
``host-local`` plugins, through a network config in /etc/cni/net.d, where containerd looks. The
bridge is made before kube-apiserver starts, because kube-apiserver listens on its address (pods
reach it there and through the ``kubernetes`` Service).

The config is a single plugin's ``.conf``, not a ``.conflist``: Multus v4.2.3 in thick mode
passes a conflist cluster network to its DEL with each plugin cut down to the keys it knows
(Multus #1449, fixed after that release by #1521), so host-local's DEL lost its ``dataDir``
and ranges and gave nothing back; after some 250 sandboxes the /24 was full.

Everything put outside the state directory (the bridge, the config, plugins copied into
/opt/cni/bin, directories made for them, sysctls changed) is recorded in a
:class:`HostChanges`, which the state file keeps, and :func:`undo_pod_network` takes back.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deploy.local.commands import run_command

BRIDGE = "cni0"
BRIDGE_ADDRESS = "198.18.0.1"
POD_CIDR = "198.18.0.0/24"
NETWORK_NAME = "pyabouts-cluster"
CNI_CONF_DIR = Path("/etc/cni/net.d")
CNI_BIN_DIR = Path("/opt/cni/bin")
#: Sorts before podman's 87-podman-bridge.conflist: containerd takes the first config.
NETWORK_CONF = CNI_CONF_DIR / f"10-{NETWORK_NAME}.conf"
REFERENCE_PLUGINS = Path("/usr/lib/cni")
#: libcni's cache of ADD results (containerd's), one file per pod interface until its DEL.
CNI_RESULTS_DIR = Path("/var/lib/cni/results")
#: Pods reach the apiserver through the bridge (ip_forward) and each other's Services through
#: kube-proxy's rules on bridged traffic (bridge-nf-call-iptables).
SYSCTLS = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables")


@dataclass
class HostChanges:
    """What setting up the pod network changed outside the state directory."""

    bridge: bool = False
    files: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)
    #: sysctl name -> the value it had before.
    sysctls: dict[str, str] = field(default_factory=dict)
    #: / was made a shared mount (it was private).
    root_shared: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostChanges:
        return cls(
            bridge=bool(data.get("bridge", False)),
            files=[str(f) for f in data.get("files", [])],
            directories=[str(d) for d in data.get("directories", [])],
            sysctls={str(k): str(v) for k, v in data.get("sysctls", {}).items()},
            root_shared=bool(data.get("root_shared", False)),
        )


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def network_conf(host_local_dir: Path) -> dict[str, Any]:
    """bridge + host-local; no masquerading or port mapping, whose iptables chains would
    outlive a pod's DEL if it were ever missed."""
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipMasq": False,
        "hairpinMode": True,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_ADDRESS}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            # Its leases in the state directory, not /var/lib/cni/networks.
            "dataDir": str(host_local_dir),
        },
    }


def pod_network_leases(host_local_dir: Path) -> set[str]:
    """The pod network's addresses host-local holds: a file named by each (beside its lock and
    last_reserved_ip files)."""
    held = set()
    for lease in (host_local_dir / NETWORK_NAME).glob("*"):
        try:
            held.add(str(ipaddress.ip_address(lease.name)))
        except ValueError:
            continue
    return held


def _make_dirs(path: Path, changes: HostChanges) -> None:
    """mkdir -p, recording each directory made (outermost first)."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir()
        changes.directories.append(str(directory))


def set_up_pod_network(host_local_dir: Path) -> HostChanges:
    """The bridge with its address, the sysctls, the plugins and the config; and / a shared
    mount, as on systemd hosts: Multus' DaemonSets mount /opt/cni/bin with Bidirectional
    propagation, which the runtime refuses on a private mount."""
    changes = HostChanges()
    if run_command(["findmnt", "-no", "PROPAGATION", "/"]).strip() == "private":
        run_command(["mount", "--make-shared", "/"])
        changes.root_shared = True
    if not link_exists(BRIDGE):
        run_command(["ip", "link", "add", BRIDGE, "type", "bridge"])
        changes.bridge = True
    addresses = run_command(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE])
    if f" {BRIDGE_ADDRESS}/" not in addresses:
        run_command(["ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE])
    run_command(["ip", "link", "set", BRIDGE, "up"])
    for name in SYSCTLS:
        path = _sysctl_path(name)
        if not path.exists():  # br_netfilter not loaded (and modules cannot be loaded here)
            continue
        old = path.read_text().strip()
        if old != "1":
            path.write_text("1\n")
            changes.sysctls[name] = old
    _make_dirs(CNI_BIN_DIR, changes)
    for plugin in sorted(REFERENCE_PLUGINS.iterdir()):
        target = CNI_BIN_DIR / plugin.name
        if not target.exists():
            shutil.copy2(plugin, target)
            changes.files.append(str(target))
    _make_dirs(CNI_CONF_DIR, changes)
    host_local_dir.mkdir(parents=True, exist_ok=True)
    NETWORK_CONF.write_text(json.dumps(network_conf(host_local_dir), indent=2) + "\n")
    changes.files.append(str(NETWORK_CONF))
    return changes


def cached_results() -> list[Path]:
    """libcni's cached results for pods of this network and of containerd's loopback one
    ("cni-loopback"): left behind when a DEL never ran."""
    found = [
        p for name in (NETWORK_NAME, "cni-loopback") for p in CNI_RESULTS_DIR.glob(f"{name}-*")
    ]
    return sorted(found)


def undo_pod_network(changes: HostChanges) -> None:
    """Take back what :func:`set_up_pod_network` did (after the pods are gone), and what pods
    whose DEL never ran (a killed kubelet or containerd) left."""
    for result in cached_results():
        result.unlink(missing_ok=True)
    for name in changes.files:
        Path(name).unlink(missing_ok=True)
    for directory in reversed(changes.directories):
        path = Path(directory)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    for name, value in changes.sysctls.items():
        _sysctl_path(name).write_text(value + "\n")
    if changes.root_shared:
        run_command(["mount", "--make-private", "/"])
    # The bridge is ours even when an earlier, killed run made it: its address is the one
    # nothing else on this host may use.
    if link_exists(BRIDGE):
        # Veths of pods whose DEL never ran: deleting the bridge would leave them unattached.
        for port in sorted(Path("/sys/class/net", BRIDGE, "brif").glob("*")):
            subprocess.run(["ip", "link", "del", port.name], capture_output=True, check=False)
        run_command(["ip", "link", "del", BRIDGE])
