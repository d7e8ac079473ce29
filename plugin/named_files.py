"""The files a network config names, as the in-process plugin follows them: only within the
directories the node keeps for them, and only where root alone could have put them there.

A NetworkAttachmentDefinition is written by namespace users, and the plugin runs as root on the
host. A kubeconfig it named anywhere could run an `exec` command as root or send the token of a
file it names to a server it names; a run_dir anywhere would have root create files in any
directory. So a file the config itself names is followed only within the directories kept for
its kind, and only if every directory on its way there (links resolved) is root's alone: what
nobody else can write, nobody else can swap between this check and the open. The node's own
flat file (in the standard places) names what it likes. A log file the config names elsewhere
is left out rather than refused: the calls go on, logging to stderr (see plugin/logs.py, which
opens a log file without following a link). The agent follows none of these at all
(plugin/agent/datastore.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pyabouts.ipam.errors import INVALID_CONFIG, CniError

#: Directories more to trust for every kind of named file, separated by ":": for tests and
#: single-user hosts. The runtime's environment, which no network config sets.
TRUSTED_DIRS_ENV = "PYABOUTS_TRUSTED_DIRS"
#: Where a config may name a file to read (a kubeconfig, a flat file, etcd's certificates): the
#: CNI configuration directories, where the flat file's standard places are.
READ_DIRS = ("/etc/cni/net.d", "/etc/kubernetes/cni/net.d")
#: Where it may put its run_dir (the node queue's ticket files).
RUN_DIRS = ("/run",)
#: Where it may name its log file (whereabouts' examples log to /tmp, whose sticky bit keeps
#: others from replacing root's files there).
LOG_DIRS = ("/var/log", "/tmp")

_READ_KEYS = ("configuration_path", "etcd_cert_file", "etcd_key_file", "etcd_ca_cert_file")


def check_named_files(inline: object, environ: Mapping[str, str]) -> None:
    """CniError 7 when the `ipam` section of a network config names a file to read, or a
    run_dir, outside what is kept for it (or what TRUSTED_DIRS_ENV adds)."""
    if not isinstance(inline, dict):
        return  # the config's validation says what is wrong with it
    extra = _extra(environ)
    for key, path, allowed in _named(inline):
        if why := _why_not(path, [*allowed, *extra]):
            raise CniError(
                INVALID_CONFIG,
                f"{key} {path!r} {why} ({', '.join(allowed)}, root's alone): the plugin runs as "
                f"root, and a network config may name only files there (set it in the node's "
                f"flat file instead)",
            )


def unkept_log_file(inline: object, environ: Mapping[str, str]) -> str | None:
    """Why the log file the `ipam` section of a network config names is not to be opened, or
    None (none named, or one kept for it)."""
    path = inline.get("log_file") if isinstance(inline, dict) else None
    if not isinstance(path, str) or not path:
        return None
    if why := _why_not(path, [*LOG_DIRS, *_extra(environ)]):
        return f"log_file {path!r} {why} ({', '.join(LOG_DIRS)})"
    return None


def _extra(environ: Mapping[str, str]) -> list[str]:
    return [d for d in environ.get(TRUSTED_DIRS_ENV, "").split(":") if d]


def _named(inline: dict[str, Any]) -> Iterator[tuple[str, str, Sequence[str]]]:
    """(key, path, directories allowed) of each file to read and run_dir `inline` names."""
    for key in _READ_KEYS:
        yield from _if_text(key, inline.get(key), READ_DIRS)
    kubernetes = inline.get("kubernetes")
    if isinstance(kubernetes, dict):
        yield from _if_text("kubernetes.kubeconfig", kubernetes.get("kubeconfig"), READ_DIRS)
    yield from _if_text("run_dir", inline.get("run_dir"), RUN_DIRS)


def _if_text(
    key: str, value: object, allowed: Sequence[str]
) -> Iterator[tuple[str, str, Sequence[str]]]:
    if isinstance(value, str) and value:  # else validation refuses it, or it is not set
        yield key, value, allowed


def _why_not(path: str, directories: Sequence[str]) -> str | None:
    """Why `path` (links and ".." resolved) is not in one of `directories` with every directory
    from that one down to it root's alone; None when it is."""
    try:
        real = os.path.realpath(path)
    except ValueError:  # a NUL byte
        return "is no path"
    for directory in directories:
        top = os.path.realpath(directory)
        if os.path.commonpath([real, top]) == top:
            return _not_roots_alone(top, real)
    return "is outside the directories this node keeps for it"


def _not_roots_alone(top: str, real: str) -> str | None:
    """Why someone other than root could change what `real` names below `top`, or None: `top`,
    a directory below it on the way or `real` itself is another user's, or others may write
    it (`top` may be sticky: others cannot replace root's entries in it). What does not exist
    yet, root makes, in a directory root's alone."""
    relative = os.path.relpath(real, top)
    chain = [top]
    if relative != ".":
        for part in relative.split(os.sep):
            chain.append(os.path.join(chain[-1], part))
    for depth, current in enumerate(chain):
        try:
            status = os.lstat(current)
        except FileNotFoundError:
            return None
        except OSError:
            return f"is in {current}, which cannot be looked at"
        if others_may_change(status, sticky_ok=depth == 0):
            return f"is in {current}, which is not root's alone"
    return None


def others_may_change(status: os.stat_result, *, sticky_ok: bool = True) -> bool:
    """Whether someone other than root could change the file `status` describes: another
    user's, or writable by others (a link's own mode means nothing; with `sticky_ok`, a sticky
    directory's keeps them from replacing root's entries in it)."""
    if status.st_uid != 0:
        return True
    others_write = status.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    sticky = sticky_ok and stat.S_ISDIR(status.st_mode) and status.st_mode & stat.S_ISVTX
    return bool(others_write) and not stat.S_ISLNK(status.st_mode) and not sticky
