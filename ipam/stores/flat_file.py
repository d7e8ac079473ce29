"""Finding and reading the flat file: the JSON file of `ipam` keys that fills what a network
config leaves empty (in practice the datastore settings a cluster shares), and that the node
agent and the reconciler are given as their own. An edge: ipam.config.load_config only takes
what was read here.
"""

from __future__ import annotations

import json
from pathlib import Path

from pyabouts.ipam.config import FlatFile
from pyabouts.ipam.errors import INVALID_CONFIG, CniError

FLAT_FILE_PATHS = (  # searched after `configuration_path`, in this order (whereabouts' places)
    "/etc/kubernetes/cni/net.d/pyabouts.d/pyabouts.conf",
    "/etc/cni/net.d/pyabouts.d/pyabouts.conf",
)


def read_flat_file(configuration_path: object) -> FlatFile | None:
    """The first flat file found (`configuration_path`, then the standard places), or None."""
    candidates = [configuration_path] if isinstance(configuration_path, str) else []
    for candidate in [*candidates, *FLAT_FILE_PATHS]:
        path = Path(candidate)
        if not path.is_file():
            continue
        try:
            flat = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            # json's messages give the position, never the text: the file may be secret.
            raise CniError(INVALID_CONFIG, f"flat file {path}: {exc}") from exc
        if not isinstance(flat, dict):
            raise CniError(INVALID_CONFIG, f"flat file {path}: must hold a JSON object")
        return FlatFile(str(path), flat)
    return None


def read_own_flat_file(path: str) -> FlatFile:
    """The flat file a long-running process is given (--config); CniError 7 when missing."""
    flat = read_flat_file(path)
    if flat is None or flat.path != path:
        raise CniError(INVALID_CONFIG, f"config {path}: no such file")
    return flat
