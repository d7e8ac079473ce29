"""`kubectl pyabouts` on the real apiserver, with pyabouts' IPPools and with real etcd: pool
usage over whole ranges, who holds an address and whether its pod is there, what a pod holds,
and releasing an address with compare-and-swap, refused while its pod exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from deploy.local.controlplane import KUBECTL, ControlPlane
from deploy.local.pod_objects import create_namespace, create_pod, delete_pod
from tests.integration.plugin_processes import cni, netconf

pytestmark = pytest.mark.integration

NAMESPACE = "operated"
BIN = Path(sys.executable).parent
CIDR = "10.71.0.0/24"


@dataclass
class Operated:
    cluster: ControlPlane
    flat_file: Path
    network: str

    def add(self, pod: str, uid: str, **ipam: Any) -> str:
        """The in-process plugin's ADD for `pod`'s net1, as kubelet calls it."""
        conf = netconf(
            type="pyabouts",
            range=CIDR,
            network_name=self.network,
            configuration_path=str(self.flat_file),
            **ipam,
        )
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME={pod};K8S_POD_UID={uid}"
        call = cni(str(BIN / "pyabouts"), "ADD", conf, f"sandbox-{pod}", args)
        return str(call.expect_success()["ips"][0]["address"].split("/")[0])

    def kubectl_pyabouts(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(BIN / "kubectl-pyabouts"),
                *argv,
                "--config",
                str(self.flat_file),
                "--kubeconfig",
                str(self.cluster.kubeconfig),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def json(self, *argv: str) -> Any:
        done = self.kubectl_pyabouts(*argv, "-o", "json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def networks_holding(self, address: str) -> list[str]:
        done = self.kubectl_pyabouts("who", address, "-o", "json")
        assert done.returncode in (0, 1), done.stderr  # 1: held nowhere
        return [h["network"] for h in json.loads(done.stdout)] if done.returncode == 0 else []

    def who(self, address: str) -> dict[str, Any]:
        """`who`'s answer for this test's network (the server and its ranges are shared)."""
        (found,) = [h for h in self.json("who", address) if h["network"] == self.network]
        assert isinstance(found, dict)
        return found


@pytest.fixture(params=["kubernetes", "etcd"])
def operated(
    request: pytest.FixtureRequest, pyabouts_cluster: ControlPlane, tmp_path: Path
) -> Iterator[Operated]:
    if request.param == "kubernetes":
        settings: dict[str, Any] = {
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": str(pyabouts_cluster.kubeconfig)},
        }
    else:
        server = request.getfixturevalue("etcd_server")
        settings = {"datastore": "etcd", "etcd_host": server.endpoint}
    create_namespace(pyabouts_cluster, NAMESPACE)
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(json.dumps(settings))
    yield Operated(pyabouts_cluster, flat, f"ops-{uuid.uuid4().hex[:8]}")


def pods(operated: Operated, count: int) -> dict[str, tuple[str, str]]:
    """`count` pods created and given an address each: name -> (UID, address)."""
    made = {}
    for i in range(count):
        name = f"web-{uuid.uuid4().hex[:6]}-{i}"
        uid = create_pod(operated.cluster, NAMESPACE, name)
        made[name] = (uid, operated.add(name, uid))
    return made


def test_pools_counts_the_whole_range_not_only_stored_blocks(operated: Operated) -> None:
    pods(operated, 3)
    (row,) = [p for p in operated.json("pools") if p["network"] == operated.network]
    assert row == {
        "network": operated.network,
        "family": 4,
        "ranges": [CIDR],
        "total": 254,
        "used": 3,
        "reserved": 0,
        "cooling": 0,
        "free": 251,
        "blocks": 1,
    }
    (from_yaml,) = [
        p
        for p in yaml.safe_load(operated.kubectl_pyabouts("pools", "-o", "yaml").stdout)
        if p["network"] == operated.network
    ]
    assert from_yaml == row
    table = operated.kubectl_pyabouts("pools").stdout.splitlines()
    assert table[0].split() == [
        "NETWORK", "FAMILY", "RANGE", "TOTAL", "USED", "RESERVED", "COOLING", "FREE", "BLOCKS",
        "SLICES",
    ]  # fmt: skip
    (line,) = [line.split() for line in table if line.startswith(operated.network)]
    assert line == [operated.network, "IPv4", CIDR, "254", "3", "0", "0", "251", "1", "-"]


def test_who_names_the_holder_and_whether_its_pod_is_there(operated: Operated) -> None:
    before = time.time()
    made = pods(operated, 2)
    (gone, (gone_uid, gone_address)), (kept, (_, kept_address)) = made.items()
    delete_pod(operated.cluster, NAMESPACE, gone)

    found = operated.who(gone_address)
    assert found["address"] == gone_address
    assert (found["network"], found["pod"], found["podUID"]) == (
        operated.network,
        f"{NAMESPACE}/{gone}",
        gone_uid,
    )
    assert (found["ifname"], found["containerID"], found["podExists"]) == (
        "net1",
        f"sandbox-{gone}",
        "no",
    )
    allocated = datetime.fromisoformat(found["allocated"]).timestamp()
    assert before - 1 <= allocated <= time.time() + 1
    assert operated.who(kept_address)["podExists"] == "yes"
    # The pod of that name created again (another UID) does not make the old holder live.
    create_pod(operated.cluster, NAMESPACE, gone)
    assert operated.who(gone_address)["podExists"] == "re-created"

    (holding,) = operated.json("pod", f"{NAMESPACE}/{kept}")
    assert holding["address"] == kept_address
    table = operated.kubectl_pyabouts("who", kept_address).stdout.splitlines()
    (row,) = [line.split() for line in table if f"{NAMESPACE}/{kept}" in line]
    assert row[:3] == [kept_address, operated.network, f"{NAMESPACE}/{kept}"]
    assert row[-2:] == ["yes", "held"]


def test_release_refuses_while_the_pod_exists_and_frees_with_compare_and_swap(
    operated: Operated,
) -> None:
    ((live, (_, address)),) = pods(operated, 1).items()
    # The same address in a second network: which one must be said.
    other = Operated(operated.cluster, operated.flat_file, f"{operated.network}-b")
    twin = f"twin-{uuid.uuid4().hex[:6]}"
    assert other.add(twin, create_pod(operated.cluster, NAMESPACE, twin)) == address
    several = operated.kubectl_pyabouts("release", address)
    assert several.returncode == 1
    assert "held in several networks" in several.stderr
    assert repr(operated.network) in several.stderr and repr(other.network) in several.stderr

    mine = ("--network", operated.network)
    refused = operated.kubectl_pyabouts("release", address, *mine)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1  # one line
    assert f"held by pod {NAMESPACE}/{live} (net1), which still exists" in refused.stderr
    dry = operated.json("release", address, *mine, "--force", "--dry-run")
    assert dry["released"] is False and dry["pod"] == f"{NAMESPACE}/{live}"
    assert operated.who(address)["pod"] == f"{NAMESPACE}/{live}"  # still held

    released = operated.json("release", address, *mine, "--force")
    assert released["released"] is True
    assert operated.network not in operated.networks_holding(address)
    assert other.who(address)["pod"] == f"{NAMESPACE}/{twin}"  # the other network's, kept
    # Free for the next pod: the lowest free address of the range again.
    newcomer = f"new-{uuid.uuid4().hex[:6]}"
    assert operated.add(newcomer, create_pod(operated.cluster, NAMESPACE, newcomer)) == address


def test_release_frees_a_gone_pods_address_without_force(operated: Operated) -> None:
    ((gone, (_, address)),) = pods(operated, 1).items()
    delete_pod(operated.cluster, NAMESPACE, gone)
    done = operated.kubectl_pyabouts("release", address, "--network", operated.network)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"released {address} (network {operated.network!r})")
    assert operated.network not in operated.networks_holding(address)


def test_errors_are_one_line_with_an_exit_code(operated: Operated, tmp_path: Path) -> None:
    for argv, code, text in [
        (["who", "not-an-ip"], 1, "'not-an-ip' is not an IP address"),
        (["who", "192.0.2.77"], 1, "192.0.2.77 is not allocated in any pool"),
        (["pod", f"{NAMESPACE}/nobody"], 1, f"pod {NAMESPACE}/nobody holds no address"),
        (["pod", "no-slash"], 1, "'no-slash' is not NAMESPACE/NAME"),
        (["release", "192.0.2.77"], 1, "192.0.2.77 is not allocated"),
    ]:
        done = operated.kubectl_pyabouts(*argv)
        assert (done.returncode, done.stdout) == (code, ""), done
        assert done.stderr.startswith("kubectl pyabouts: ") and text in done.stderr
        assert done.stderr.count("\n") == 1
    missing = subprocess.run(
        [str(BIN / "kubectl-pyabouts"), "pools", "--kubeconfig", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr


def test_kubectl_finds_it_as_a_plugin(pyabouts_cluster: ControlPlane) -> None:
    """kubectl runs `kubectl-pyabouts` from PATH for `kubectl pyabouts`, passing the rest."""
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env["KUBECONFIG"] = str(pyabouts_cluster.kubeconfig)
    done = subprocess.run(
        [KUBECTL, "pyabouts", "pools", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)


def test_pools_shows_node_slices(pyabouts_cluster: ControlPlane, tmp_path: Path) -> None:
    flat = tmp_path / "pyabouts.conf"
    flat.write_text(
        json.dumps(
            {
                "datastore": "kubernetes",
                "kubernetes": {"kubeconfig": str(pyabouts_cluster.kubeconfig)},
            }
        )
    )
    operated = Operated(pyabouts_cluster, flat, f"ops-{uuid.uuid4().hex[:8]}")
    create_namespace(pyabouts_cluster, NAMESPACE)
    for node in ("node-a", "node-b"):
        conf = netconf(
            type="pyabouts",
            range=CIDR,
            network_name=operated.network,
            configuration_path=str(flat),
            node_slice_size="/26",
        )
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={NAMESPACE};K8S_POD_NAME=on-{node}"
        cni(str(BIN / "pyabouts"), "ADD", conf, f"c-{node}", args, extra_env={"NODE_NAME": node})
    (row,) = [p for p in operated.json("pools") if p["network"] == operated.network]
    assert row["nodeSlices"] == {"size": "/26", "held": 2, "total": 4}
    assert (row["used"], row["total"]) == (2, 254)
    (line,) = [
        line for line in operated.kubectl_pyabouts("pools").stdout.splitlines()
        if line.startswith(operated.network)
    ]  # fmt: skip
    assert line.endswith("2/4 of /26")
