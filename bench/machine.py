"""The machine a benchmark ran on, so that figures from different runs can be compared."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from bench.results import Machine
from deploy.local.etcd_server import etcd_version

CNI_PLUGINS_PACKAGE = "containernetworking-plugins"


def describe_machine(kube_apiserver: str = "-") -> Machine:
    return Machine(
        nproc=os.cpu_count() or 0,
        cpu_model=cpu_model(),
        python=platform.python_version(),
        kernel=platform.release(),
        etcd=etcd_version(),
        cni_plugins=debian_package_version(CNI_PLUGINS_PACKAGE),
        kube_apiserver=kube_apiserver,
        load_average=load_average(),
    )


def load_average() -> str:
    return " ".join(f"{load:.2f}" for load in os.getloadavg())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return "unknown"
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def debian_package_version(package: str) -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def code_commit() -> str:
    """The checkout's commit, "-dirty" when it has changes; "-" when it is not a git checkout."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "-"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "-"
