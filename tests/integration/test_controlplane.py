"""The local control plane is a real Kubernetes API server, not a look-alike.

Each test uses unique names (the session's server is shared by every test of an xdist worker)
and never deletes a namespace (without a controller-manager it would stay Terminating).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from deploy.local.controlplane import (
    KUBE_VERSION,
    ControlPlane,
    ControlPlaneError,
    KubectlError,
    start_control_plane,
)

pytestmark = pytest.mark.integration

GROUP = "test.pyabouts.io"
CRD_NAME = f"widgets.{GROUP}"
WIDGET_API = f"/apis/{GROUP}/v1"

WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": CRD_NAME},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {
                                    "size": {"type": "integer", "minimum": 0},
                                    "color": {"type": "string"},
                                },
                            }
                        },
                    }
                },
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {"name": "Color", "type": "string", "jsonPath": ".spec.color"},
                ],
            }
        ],
    },
}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def new_namespace(cp: ControlPlane) -> str:
    name = unique("t")
    cp.kubectl("create", "namespace", name)
    return name


def widget(namespace: str, name: str, size: int, color: str = "red") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"size": size, "color": color},
    }


@pytest.fixture(scope="module")
def widget_crd(kube_apiserver: ControlPlane) -> str:
    """The Widget CRD, applied and Established."""
    kube_apiserver.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    kube_apiserver.kubectl(
        "wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=30s"
    )
    return CRD_NAME


def test_namespaces_include_kube_system(kube_apiserver: ControlPlane) -> None:
    names = kube_apiserver.kubectl("get", "ns", "-o", "name").split()
    assert "namespace/kube-system" in names
    assert "namespace/default" in names


def test_server_version(kube_apiserver: ControlPlane) -> None:
    version = json.loads(kube_apiserver.kubectl("version", "-o", "json"))
    assert version["serverVersion"]["gitVersion"] == KUBE_VERSION
    assert (version["serverVersion"]["major"], version["serverVersion"]["minor"]) == ("1", "34")


def test_kubeconfig_context(kube_apiserver: ControlPlane) -> None:
    """The admin kubeconfig's context namespace is kube-system; the admin is system:masters."""
    assert kube_apiserver.server.startswith("https://127.0.0.1:")
    assert kube_apiserver.etcd_endpoint.startswith("http://127.0.0.1:")
    config = json.loads(kube_apiserver.kubectl("config", "view", "--minify", "-o", "json"))
    assert config["clusters"][0]["cluster"]["server"] == kube_apiserver.server
    assert config["contexts"][0]["context"]["namespace"] == "kube-system"
    assert kube_apiserver.kubectl("auth", "can-i", "*", "*").strip() == "yes"
    # Without -n, commands act on kube-system.
    name = unique("cm")
    kube_apiserver.kubectl("create", "configmap", name, "--from-literal=a=b")
    assert (
        kube_apiserver.kubectl("get", "configmap", name, "-n", "kube-system", "-o", "name").strip()
        == f"configmap/{name}"
    )


def test_custom_resource_with_printer_column(kube_apiserver: ControlPlane, widget_crd: str) -> None:
    ns = new_namespace(kube_apiserver)
    kube_apiserver.kubectl("apply", "-f", "-", input=json.dumps(widget(ns, "w1", 7, "blue")))
    table = kube_apiserver.kubectl("get", "widgets", "-n", ns).splitlines()
    assert table[0].split()[:3] == ["NAME", "SIZE", "COLOR"]
    assert table[1].split()[:3] == ["w1", "7", "blue"]
    # The schema is enforced by the server.
    with pytest.raises(KubectlError) as err:
        kube_apiserver.kubectl("apply", "-f", "-", input=json.dumps(widget(ns, "bad", -1)))
    assert "spec.size" in err.value.stderr


def test_stale_resource_version_is_a_conflict(
    kube_apiserver: ControlPlane, widget_crd: str
) -> None:
    ns = new_namespace(kube_apiserver)
    kube_apiserver.kubectl("create", "-f", "-", input=json.dumps(widget(ns, "w", 1)))
    stale = json.loads(kube_apiserver.kubectl("get", "widget", "w", "-n", ns, "-o", "json"))
    kube_apiserver.kubectl(
        "patch", "widget", "w", "-n", ns, "--type=merge", "-p", '{"spec": {"size": 2}}'
    )

    # kubectl replace with the stale resourceVersion.
    stale["spec"]["size"] = 3
    with pytest.raises(KubectlError) as err:
        kube_apiserver.kubectl("replace", "-f", "-", input=json.dumps(stale))
    assert "Conflict" in err.value.stderr or "has been modified" in err.value.stderr

    # The raw API says 409 with reason Conflict.
    path = f"{WIDGET_API}/namespaces/{ns}/widgets/w"
    status, body = kube_apiserver.request("PUT", path, stale)
    assert status == 409, body
    assert body["reason"] == "Conflict"

    # The current resourceVersion goes through.
    status, current = kube_apiserver.request("GET", path)
    assert status == 200
    assert current["spec"]["size"] == 2
    current["spec"]["size"] = 3
    status, body = kube_apiserver.request("PUT", path, current)
    assert status == 200, body
    assert body["spec"]["size"] == 3


def test_restart_apiserver_keeps_data(kube_apiserver: ControlPlane, widget_crd: str) -> None:
    ns = new_namespace(kube_apiserver)
    kube_apiserver.kubectl("create", "-f", "-", input=json.dumps(widget(ns, "survivor", 5)))
    before = json.loads(kube_apiserver.kubectl("get", "widget", "survivor", "-n", ns, "-o", "json"))
    server, pids = kube_apiserver.server, kube_apiserver.pids()

    t0 = time.monotonic()
    kube_apiserver.restart_apiserver()
    restart_s = time.monotonic() - t0

    assert kube_apiserver.server == server
    assert kube_apiserver.pids()["etcd"] == pids["etcd"]
    assert kube_apiserver.pids()["kube-apiserver"] != pids["kube-apiserver"]
    after = json.loads(kube_apiserver.kubectl("get", "widget", "survivor", "-n", ns, "-o", "json"))
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["spec"] == {"size": 5, "color": "red"}
    # Writes work again too.
    kube_apiserver.kubectl(
        "patch", "widget", "survivor", "-n", ns, "--type=merge", "-p", '{"spec": {"size": 6}}'
    )
    assert restart_s < 60


def _can_i(cp: ControlPlane, *args: str) -> str:
    proc = cp.kubectl_run("auth", "can-i", *args)
    # can-i exits 1 for "no"; anything else on stderr is a real error.
    assert proc.returncode in (0, 1), proc.stderr
    return proc.stdout.strip()


def test_service_account_permissions(kube_apiserver: ControlPlane, widget_crd: str) -> None:
    cp = kube_apiserver
    ns = new_namespace(cp)
    cp.kubectl("create", "serviceaccount", "ipam", "-n", ns)
    cp.kubectl(
        "create", "role", "widget-rw", "-n", ns,
        "--verb=get,list,watch,create,update,patch", f"--resource=widgets.{GROUP}",
    )  # fmt: skip
    cp.kubectl(
        "create", "rolebinding", "ipam-widget-rw", "-n", ns,
        "--role=widget-rw", f"--serviceaccount={ns}:ipam",
    )  # fmt: skip
    sa = f"system:serviceaccount:{ns}:ipam"

    # RBAC's authorizer reads through an informer: give the binding a moment to arrive.
    deadline = time.monotonic() + 15
    while _can_i(cp, "update", f"widgets.{GROUP}", "-n", ns, f"--as={sa}") != "yes":
        assert time.monotonic() < deadline, "the RoleBinding never took effect"
        time.sleep(0.2)
    assert _can_i(cp, "delete", f"widgets.{GROUP}", "-n", ns, f"--as={sa}") == "no"
    assert _can_i(cp, "list", f"widgets.{GROUP}", "-n", "kube-system", f"--as={sa}") == "no"
    assert _can_i(cp, "list", "secrets", "-n", ns, f"--as={sa}") == "no"

    # A bound token for the ServiceAccount authenticates for real and gets the same answers.
    sa_config = cp.service_account_kubeconfig(ns, "ipam")
    cp.kubectl("create", "-f", "-", input=json.dumps(widget(ns, "w", 1)), kubeconfig=sa_config)
    assert cp.kubectl("get", "widgets", "-o", "name", kubeconfig=sa_config).split() == [
        f"widget.{GROUP}/w"
    ]
    with pytest.raises(KubectlError) as err:
        cp.kubectl("delete", "widget", "w", kubeconfig=sa_config)
    assert "forbidden" in err.value.stderr.lower()


def test_own_instance_start_stop(tmp_path: Path, kube_apiserver: ControlPlane) -> None:
    """A second control plane runs beside the session's; stop() is idempotent and thorough."""
    cp = start_control_plane(tmp_path / "cp")
    try:
        assert cp.server != kube_apiserver.server
        assert cp.etcd_endpoint != kube_apiserver.etcd_endpoint
        assert "namespace/kube-system" in cp.kubectl("get", "ns", "-o", "name").split()
        pids = [p for p in cp.pids().values() if p is not None]
        assert len(pids) == 2
    finally:
        cp.stop()
    cp.stop()
    assert not cp.running()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still exists"


def test_missing_binary_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ControlPlaneError, match=r"build_binaries\.sh"):
        start_control_plane(tmp_path / "cp", apiserver_binary=tmp_path / "no-such-apiserver")
