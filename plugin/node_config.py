"""What the installer writes for the node besides the plugin: a flat file and a kubeconfig.

The kubeconfig carries the node agent's service account token, so the node can reach IPPools
with the agent's identity when a plugin runs in-process, or a NAD ported from whereabouts names
a kubeconfig: ``pyabouts.d/pyabouts.kubeconfig``, mode 0600 (it is a credential), next to the
flat file ``pyabouts.d/pyabouts.conf`` that names it. The pod's token rotates (kubelet rewrites
the projected file); the host's copy is a copy, so :func:`keep_node_config_current` rewrites it
when the token or the CA changes. Every write is a rename, so a reader never sees half a file.

The files stay when the pod stops for a rolling update or a drain (the node keeps working);
:func:`daemonset_deleted` tells those apart from an uninstall, after which they go. It judges
the DaemonSet :class:`OwnDaemonSet` read when the pod started: a name that did not resolve then
(a kustomize namePrefix renames the DaemonSet, not the flag) never reads as deleted later.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pyabouts.ipam.errors import CniError
from pyabouts.ipam.stores.kube_api import ApiStatusError, KubeApi
from pyabouts.ipam.stores.kubeconfig import SERVICE_ACCOUNT_DIR, in_cluster_credentials

KUBECONFIG_NAME = "pyabouts.kubeconfig"
# What the API answers for a DaemonSet that is not there, or that this account may not read.
GONE = frozenset({401, 403, 404})
FLAT_FILE_NAME = "pyabouts.conf"
USER = "pyabouts-node"


def write_file_atomically(path: Path, content: str | bytes, mode: int) -> bool:
    """Write `content` to `path` by renaming a temporary file over it, created 0600 (readable by
    nobody else for a moment) and then given `mode`; False, and nothing written, when the file
    already holds `content`."""
    data = content.encode() if isinstance(content, str) else content
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o7777) == mode:
            return False
    except OSError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own (O_EXCL, never a link followed): two installers on one node (the pid
    # of each is 1 in its container) must not write into each other's file.
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    partial = Path(name)
    try:
        with os.fdopen(descriptor, "wb") as file:
            os.fchmod(descriptor, mode)
            file.write(data)
            file.flush()
            os.fsync(descriptor)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)  # the rename itself survives a crash of the node
    return True


def _sync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def service_account_kubeconfig(environ: Mapping[str, str], account_dir: Path) -> str:
    """A kubeconfig of the pod's service account: the API behind KUBERNETES_SERVICE_HOST/PORT,
    its CA, the token as it is now and the pod's namespace (where the IPPools live)."""
    credentials = in_cluster_credentials(environ, account_dir)
    token = (account_dir / "token").read_text().strip()
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "cluster",
                "cluster": {
                    "server": credentials.server,
                    "certificate-authority-data": base64.b64encode(
                        (credentials.ca_pem or "").encode()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": USER, "user": {"token": token}}],
        "contexts": [
            {
                "name": USER,
                "context": {"cluster": "cluster", "user": USER, "namespace": credentials.namespace},
            }
        ],
        "current-context": USER,
    }
    return yaml.safe_dump(document, sort_keys=False)


@dataclass(slots=True)
class NodeConfig:
    """Where the node's files go: `directory` as this process sees it, `host_directory` as the
    node's runtime does (the flat file names the kubeconfig by the host's path)."""

    directory: Path
    host_directory: Path
    # The kubeconfig this process wrote (or found as it would write it) last.
    _written: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def kubeconfig(self) -> Path:
        return self.directory / KUBECONFIG_NAME

    @property
    def flat_file(self) -> Path:
        return self.directory / FLAT_FILE_NAME

    def flat_file_text(self) -> str:
        settings = {
            "datastore": "kubernetes",
            "kubernetes": {"kubeconfig": str(self.host_directory / KUBECONFIG_NAME)},
        }
        return json.dumps(settings, indent=2) + "\n"

    def write(self, environ: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR) -> bool:
        """Write both files if they differ from what they should hold; True if one changed.
        The kubeconfig goes first: the flat file never names one that is not there."""
        kubeconfig = service_account_kubeconfig(environ, account_dir)
        changed = write_file_atomically(self.kubeconfig, kubeconfig, 0o600)
        self._written = kubeconfig
        return write_file_atomically(self.flat_file, self.flat_file_text(), 0o644) or changed

    def written_by_another(self) -> bool:
        """Whether the node's kubeconfig is not the one this process wrote last: another
        installer's (the pod that replaced this one: a force-deleted pod's is made at once),
        whose node files are not this one's to remove."""
        try:
            return self.kubeconfig.read_text() != self._written
        except OSError:
            return False

    def remove(self) -> list[Path]:
        """Delete both files (and the directory, once empty); the paths removed."""
        removed = []
        for path in (self.flat_file, self.kubeconfig):
            if path.exists():
                path.unlink()
                removed.append(path)
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            with contextlib.suppress(OSError):  # another installer's file came meanwhile
                self.directory.rmdir()
                removed.append(self.directory)
        return removed


def keep_node_config_current(
    config: NodeConfig,
    environ: Mapping[str, str],
    *,
    interval: float,
    stop: threading.Event,
    account_dir: Path = SERVICE_ACCOUNT_DIR,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Write the files now, then again whenever the token, the CA or the files themselves
    change, every `interval` seconds, until `stop` is set. A failed write (the token between
    kubelet's renames) is tried again at the next tick; `on_tick` runs at each. Once another
    installer has written the kubeconfig (the pod that replaced this one, which a force delete
    starts before this one stops), the files are its own: this one writes them no more."""
    first, yielded = True, False
    while True:
        if on_tick is not None:
            on_tick()
        try:
            if not first and config.written_by_another():
                if not yielded:
                    print(f"{config.kubeconfig} is another installer's now: left to it", flush=True)
                    yielded = True
            elif config.write(environ, account_dir):
                print(f"wrote {config.kubeconfig} and {config.flat_file}", flush=True)
            first = False
        except (OSError, CniError) as exc:
            print(f"node config not written, trying again: {exc}", flush=True)
        if stop.wait(interval):
            return


class OwnDaemonSet:
    """DaemonSet `name` in this pod's namespace, as first read: its UID tells its deletion by
    later. read() until the API answers (an unreachable API at start is asked again); a
    DaemonSet not found or not allowed then (renamed) is unknown for good, never deleted."""

    def __init__(
        self, name: str, environ: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR
    ) -> None:
        self.name, self._environ, self._account_dir = name, environ, account_dir
        self.uid: str | None = None
        self.answered = False  # whether the API answered a read (with it or with an error)

    def read(self) -> None:
        if self.answered:
            return
        found = _daemonset(self.name, self._environ, self._account_dir)
        if found is None or (isinstance(found, ApiStatusError) and found.status not in GONE):
            return  # unreachable, or busy (5xx, 429): asked again at the next read
        self.answered = True
        if isinstance(found, dict):
            self.uid = str(found["metadata"]["uid"])
        else:
            print(
                f"daemonset {self.name} cannot be read ({found.status}: {found.message}): "
                "what this pod installed stays when it stops",
                flush=True,
            )

    def deleted(self) -> bool:
        """Whether it was read and is now gone (daemonset_deleted)."""
        if self.uid is None:
            return False
        return daemonset_deleted(self.name, self.uid, self._environ, self._account_dir)


def daemonset_deleted(
    name: str, uid: str, environ: Mapping[str, str], account_dir: Path = SERVICE_ACCOUNT_DIR
) -> bool:
    """Whether DaemonSet `name`, which had `uid` when this pod started, is gone or going, as it
    is when `kubectl delete -k` uninstalls: not found, being deleted, another one of that name,
    or this pod's account no longer allowed or known (that delete removes the RBAC and the
    ServiceAccount too; they worked when `uid` was read). When the API cannot be asked, False:
    the files stay rather than break a node that still needs them."""
    found = _daemonset(name, environ, account_dir)
    if found is None:
        return False
    if isinstance(found, ApiStatusError):
        return found.status in GONE
    metadata = found.get("metadata", {})
    return bool(metadata.get("deletionTimestamp")) or metadata.get("uid") != uid


def _daemonset(
    name: str, environ: Mapping[str, str], account_dir: Path
) -> dict[str, Any] | ApiStatusError | None:
    """DaemonSet `name` as the API answers it, its error status, or None if unreachable."""
    try:
        credentials = in_cluster_credentials(environ, account_dir)
    except CniError:
        return None
    api = KubeApi(credentials, timeout=5.0)
    try:
        return api.request(
            "GET", f"/apis/apps/v1/namespaces/{credentials.namespace}/daemonsets/{name}"
        )
    except ApiStatusError as exc:
        return exc
    except CniError:  # unreachable, or busy
        return None
    finally:
        api.close()
