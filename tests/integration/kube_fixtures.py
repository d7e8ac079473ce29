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

from collections.abc import Iterator

import pytest

from deploy.local.controlplane import ControlPlane, ControlPlaneError, start_control_plane


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
