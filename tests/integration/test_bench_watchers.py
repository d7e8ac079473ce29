"""The watches bench.write_cost keeps open beside a row's writes (bench/watchers.py), on the real
apiserver: each one hears every write of the row, as an agent's watch does, and all of them
end when the row's object is deleted."""

import contextlib
from dataclasses import replace

import pytest

from bench import watchers
from bench.watchers import IPPoolWatchers
from bench.write_cost import NAMESPACE, OwnBlockWriter, _ensure_namespace
from deploy.local.controlplane import ControlPlane
from pyabouts.ipam.stores.kube_api import KubeApi
from pyabouts.ipam.stores.kubeconfig import read_kubeconfig
from pyabouts.ipam.stores.kubernetes import KubernetesStore

pytestmark = pytest.mark.integration

WATCHERS = 3
UPDATES = 5


def test_every_watch_hears_each_write_and_ends_with_the_deletion(
    pyabouts_cluster: ControlPlane,
) -> None:
    credentials = read_kubeconfig(str(pyabouts_cluster.kubeconfig))
    api = KubeApi(credentials, timeout=10)
    with contextlib.closing(api):
        _ensure_namespace(api, NAMESPACE)
        writer = OwnBlockWriter(api, KubernetesStore(api, NAMESPACE), NAMESPACE, 4)
        with IPPoolWatchers(credentials, NAMESPACE, WATCHERS) as watching:
            # Every watcher has listed by now: each hears the create as an event of its watch.
            writer.create()
            try:
                watching.wait_until_heard(1)
                for n in range(UPDATES):
                    writer.update(n)
                watching.wait_until_heard(1 + UPDATES)
            finally:
                writer.delete()
        # Out of the block, every watch heard the deletion too, and stopped.
        assert watching.events_heard() == [1 + UPDATES + 1] * WATCHERS
        assert watching.open_watches() == 0


def test_a_watch_still_open_when_the_row_ends_is_an_error(
    pyabouts_cluster: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(watchers, "STOP_TIMEOUT_S", 1.0)
    credentials = read_kubeconfig(str(pyabouts_cluster.kubeconfig))
    api = KubeApi(credentials, timeout=10)
    with contextlib.closing(api):
        _ensure_namespace(api, NAMESPACE)
        writer = OwnBlockWriter(api, KubernetesStore(api, NAMESPACE), NAMESPACE, 4)
        try:
            with (
                pytest.raises(RuntimeError, match="2 watches never heard the row's deletion"),
                IPPoolWatchers(credentials, NAMESPACE, 2) as watching,
            ):
                writer.create()
                watching.wait_until_heard(1)
        finally:
            writer.delete()  # which ends them


def test_a_refused_watch_fails_the_row(pyabouts_cluster: ControlPlane) -> None:
    # No client certificate, no token: anonymous, refused.
    credentials = replace(
        read_kubeconfig(str(pyabouts_cluster.kubeconfig)),
        client_cert_pem=None,
        client_key_pem=None,
        authorization=lambda: None,
    )
    watching = IPPoolWatchers(credentials, NAMESPACE, 1)
    with pytest.raises(RuntimeError, match="a watch failed"), watching:
        pass
    assert watching.open_watches() == 0
