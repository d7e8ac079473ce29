"""What a node (kubelet, containerd, kube-proxy, pods) leaves on a host, found and removed.

``down`` sweeps these after stopping the node's processes, so that even a run that was killed
half-way leaves nothing behind; the cluster's test uses the same finders to check that nothing
is left. Each finder looks only for what the local cluster makes (its mounts, containerd's
``cni-*`` network namespaces, ``KUBE-*`` chains, its processes): podman's containers, which
other tests run on the same host, have their own names and are left alone.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
from collections.abc import Iterable
from pathlib import Path

from deploy.local.commands import LocalToolError, run_command

NETNS_DIR = Path("/run/netns")
#: containerd names the network namespaces it makes for pod sandboxes cni-<uuid>.
POD_NETNS_PREFIX = "cni-"
KUBE_CHAIN_PREFIX = "KUBE-"
IPTABLES = ("iptables", "ip6tables")


def _unescape_mount_path(field: str) -> str:
    """/proc/self/mountinfo writes spaces and such as octal escapes (\\040)."""
    return field.encode().decode("unicode_escape")


def mounts_under(prefixes: Iterable[Path]) -> list[str]:
    """Mount points at or below any of ``prefixes``, deepest first (the order to unmount)."""
    roots = [str(p).rstrip("/") for p in prefixes]
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = _unescape_mount_path(line.split()[4])
        if any(point == root or point.startswith(root + "/") for root in roots):
            found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def pod_netns_mounts() -> list[str]:
    """Mount points of containerd's pod network namespaces."""
    return [m for m in mounts_under([NETNS_DIR]) if Path(m).name.startswith(POD_NETNS_PREFIX)]


def unmount(points: Iterable[str]) -> None:
    """Unmount each (lazily if it is busy: the processes holding it are gone or going)."""
    for point in points:
        if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def pod_netns() -> list[str]:
    """containerd's network namespaces (by name) in /run/netns."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(POD_NETNS_PREFIX))


def remove_pod_netns() -> None:
    unmount(pod_netns_mounts())
    for name in pod_netns():
        (NETNS_DIR / name).unlink(missing_ok=True)


def _rules(tool: str) -> dict[str, list[str]]:
    """table -> its rules and chain declarations, as ``<tool>-save`` prints them."""
    try:
        text = run_command([f"{tool}-save"])
    except LocalToolError:  # no such tool, or no IPv6 tables on this host
        return {}
    tables: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:]
            tables[current] = []
        elif current and (line.startswith(":") or line.startswith("-A ")):
            tables[current].append(line)
    return tables


def kube_chains() -> list[str]:
    """``tool table chain`` for every KUBE-* chain (kubelet's and kube-proxy's)."""
    found = []
    for tool in IPTABLES:
        for table, lines in _rules(tool).items():
            for line in lines:
                if line.startswith(":" + KUBE_CHAIN_PREFIX):
                    found.append(f"{tool} {table} {line[1:].split()[0]}")
    return found


def rules_mentioning(words: Iterable[str]) -> list[str]:
    """Rules (``tool table rule``) naming any of ``words`` (the bridge, the pod range)."""
    words = list(words)
    return [
        f"{tool} {table} {line}"
        for tool in IPTABLES
        for table, lines in _rules(tool).items()
        for line in lines
        if line.startswith("-A ") and any(w in line for w in words)
    ]


def remove_kube_chains() -> None:
    """Remove the jumps into KUBE-* chains, then flush and delete the chains themselves."""
    for tool in IPTABLES:
        for table, lines in _rules(tool).items():
            chains = [ln[1:].split()[0] for ln in lines if ln.startswith(":" + KUBE_CHAIN_PREFIX)]
            if not chains:
                continue
            for line in lines:
                args = shlex.split(line)
                if args[1].startswith(KUBE_CHAIN_PREFIX) or "-j" not in args:
                    continue
                if args[args.index("-j") + 1].startswith(KUBE_CHAIN_PREFIX):
                    run_command([tool, "-w", "-t", table, "-D", *args[1:]])
            for chain in chains:
                run_command([tool, "-w", "-t", table, "-F", chain])
            for chain in chains:
                run_command([tool, "-w", "-t", table, "-X", chain])


def _argv(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def processes_matching(argv0_names: Iterable[str], mentions: Iterable[str] = ()) -> list[str]:
    """``pid argv`` of live processes whose argv[0]'s name is one of ``argv0_names`` and whose
    command line contains every string in ``mentions``."""
    names, needed = set(argv0_names), list(mentions)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        argv = _argv(int(entry.name))
        if argv and Path(argv[0]).name in names:
            line = " ".join(argv)
            if all(m in line for m in needed):
                found.append(f"{entry.name} {line}")
    return found


def kill_processes(found: Iterable[str]) -> None:
    """SIGKILL each ``pid ...`` that :func:`processes_matching` returned."""
    for item in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(item.split()[0]), signal.SIGKILL)
