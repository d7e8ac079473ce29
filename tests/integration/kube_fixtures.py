"""pytest fixtures that run a real Kubernetes control plane (etcd + kube-apiserver) on loopback.

The Kubernetes datastore, the reconciler and the Multus runs need a real API server:
resourceVersion conflicts, RBAC and custom-resource validation are exactly what a fake would
get subtly wrong. ``deploy/local/controlplane.py`` runs kube-apiserver v1.34.3 (built by
``deploy/local/build_binaries.sh`` into ``~/.cache/pyabouts/bin/``) on Debian's etcd 3.4.

A control plane that cannot start (binary not built, a server that does not come up) makes the
fixture FAIL with the reason, never skip: a missing apiserver must not look like a green run.

Registered from ``tests/conftest.py``. Fixture (session-scoped; with pytest-xdist each worker
that uses it starts its own control plane, on its own free ports):

- ``kube_apiserver``: a :class:`deploy.local.controlplane.ControlPlane` with ``kubeconfig``
  (admin, context namespace ``kube-system``), ``server`` (``https://127.0.0.1:PORT``),
  ``ca_cert``, ``admin_cert``, ``admin_key``, ``etcd_endpoint``, and ``kubectl(*args)``,
  ``kubectl_run(*args)``, ``request(method, path, body)``,
  ``service_account_kubeconfig(ns, sa)`` and ``restart_apiserver()``.

There is no controller-manager: do not delete namespaces (they stay Terminating), create the
ServiceAccounts you need, and use unique names, since every test of a worker shares the server.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from deploy.local.controlplane import ControlPlane, ControlPlaneError, start_control_plane
from tests.kubeconfig_files import write_kubeconfig_document


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on 127.0.0.1 for the whole session (per xdist worker)."""
    state_dir = tmp_path_factory.mktemp("kube-apiserver")
    reason: str | None = None
    try:
        cp = start_control_plane(state_dir)
    except ControlPlaneError as exc:
        reason = str(exc)
    if reason is not None:
        # Outside the except block: the report shows the reason once, without a traceback.
        pytest.fail(f"the local kube-apiserver did not start: {reason}", pytrace=False)
    try:
        yield cp
    finally:
        cp.stop()


def kubeconfig(
    path: Path,
    cluster: ControlPlane,
    user: Mapping[str, object],
    trust: Mapping[str, object] | None = None,
) -> str:
    """A kubeconfig of the local cluster as `user`; `trust`: the cluster's TLS keys (default:
    the local CA, embedded)."""
    if trust is None:
        trust = {
            "certificate-authority-data": base64.b64encode(cluster.ca_cert.read_bytes()).decode()
        }
    return str(write_kubeconfig_document(path, user, {"server": cluster.server, **trust}))


def pyabouts_token(cluster: ControlPlane) -> str:
    """A token of the plugin's ServiceAccount (what a node's kubeconfig holds)."""
    return cluster.service_account_token("kube-system", "pyabouts")


def can(
    cluster: ControlPlane,
    verb: str,
    resource: str,
    namespace: str = "kube-system",
    service_account: str = "pyabouts",
) -> bool:
    """Whether kube-system's `service_account` may, as the real RBAC objects say."""
    answer = cluster.kubectl_run(
        "auth",
        "can-i",
        verb,
        resource,
        "-n",
        namespace,
        f"--as=system:serviceaccount:kube-system:{service_account}",
    )
    return answer.stdout.strip() == "yes"


def exec_kubeconfig(path: Path, cluster: ControlPlane, *, run_first: str = "") -> str:
    """A kubeconfig whose user is an exec plugin (a shell command) that prints a token of the
    plugin's ServiceAccount, after running `run_first` if given."""
    credential = {
        "apiVersion": "client.authentication.k8s.io/v1beta1",
        "kind": "ExecCredential",
        "status": {"token": pyabouts_token(cluster)},
    }
    script = f"echo '{json.dumps(credential)}'"
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": "/bin/sh",
            "args": ["-c", f"{run_first}; {script}" if run_first else script],
            "interactiveMode": "Never",
        }
    }
    return kubeconfig(path, cluster, user)


def forbidden_kubeconfig(cluster: ControlPlane, name: str) -> Path:
    """The kubeconfig of a new ServiceAccount `name` of kube-system, which no Role binds."""
    cluster.kubectl("create", "serviceaccount", name, "-n", "kube-system")
    return cluster.service_account_kubeconfig("kube-system", name)
