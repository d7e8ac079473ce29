"""The files a network config names, as the in-process plugin follows them: only within the
directories the node keeps for them.

A NetworkAttachmentDefinition is written by namespace users, and the plugin runs as root on the
host. A kubeconfig it named anywhere could run an `exec` command as root or send the token of a
file it names to a server it names; a log file or run_dir anywhere would have root create and
append to any file (a script under /etc/profile.d). So a file the config itself names is
followed only where only root writes what it would read, or where what root writes is only
logs or queue tickets; the node's own flat file (in the standard places) names what it likes.
The agent follows none of these at all (plugin/agent/datastore.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pyabouts.ipam.errors import INVALID_CONFIG, CniError

#: Directories more to trust for every kind of named file, separated by ":": for tests and
#: single-user hosts. The runtime's environment, which no network config sets.
TRUSTED_DIRS_ENV = "PYABOUTS_TRUSTED_DIRS"
#: Where a config may name a file to read (a kubeconfig, a flat file, etcd's certificates): the
#: CNI configuration directories, where the flat file's standard places are.
READ_DIRS = ("/etc/cni/net.d", "/etc/kubernetes/cni/net.d")
#: Where it may name its log file (whereabouts' examples log to /tmp).
LOG_DIRS = ("/var/log", "/tmp")
#: Where it may put its run_dir (the node queue's ticket files).
RUN_DIRS = ("/run", "/var/run")

_READ_KEYS = ("configuration_path", "etcd_cert_file", "etcd_key_file", "etcd_ca_cert_file")


def check_named_files(inline: object, environ: Mapping[str, str]) -> None:
    """CniError 7 when the `ipam` section of a network config names a file outside the
    directories kept for its kind (or those TRUSTED_DIRS_ENV adds)."""
    if not isinstance(inline, dict):
        return  # the config's validation says what is wrong with it
    extra = [d for d in environ.get(TRUSTED_DIRS_ENV, "").split(":") if d]
    for key, path, allowed in _named(inline):
        if not _within(path, [*allowed, *extra]):
            raise CniError(
                INVALID_CONFIG,
                f"{key} {path!r} is outside the directories this node keeps for it "
                f"({', '.join(allowed)}): the plugin runs as root, and a network config may "
                f"name only files there (set it in the node's flat file instead)",
            )


def _named(inline: dict[str, Any]) -> Iterator[tuple[str, str, Sequence[str]]]:
    """(key, path, directories allowed) of each file `inline` names."""
    for key in _READ_KEYS:
        yield from _if_text(key, inline.get(key), READ_DIRS)
    kubernetes = inline.get("kubernetes")
    if isinstance(kubernetes, dict):
        yield from _if_text("kubernetes.kubeconfig", kubernetes.get("kubeconfig"), READ_DIRS)
    yield from _if_text("log_file", inline.get("log_file"), LOG_DIRS)
    yield from _if_text("run_dir", inline.get("run_dir"), RUN_DIRS)


def _if_text(
    key: str, value: object, allowed: Sequence[str]
) -> Iterator[tuple[str, str, Sequence[str]]]:
    if isinstance(value, str) and value:  # else validation refuses it, or it is not set
        yield key, value, allowed


def _within(path: str, directories: Sequence[str]) -> bool:
    """Whether `path`, its links and ".." resolved, is in one of `directories` (resolved too:
    /var/run is a link to /run)."""
    real = os.path.realpath(path)
    for directory in directories:
        top = os.path.realpath(directory)
        if os.path.commonpath([real, top]) == top:
            return True
    return False
