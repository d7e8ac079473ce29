"""Kubeconfigs of one context for the tests of ipam.stores.kubeconfig, in whatever shape a test
needs (deploy.local.kubeconfigs.write_kubeconfig writes only the two the local tooling uses)."""

import json
from collections.abc import Mapping
from pathlib import Path


def write_kubeconfig_document(
    path: Path,
    user: Mapping[str, object],
    cluster: Mapping[str, object],
    namespace: str = "kube-system",
) -> Path:
    """Context "here": `cluster` (its server and TLS keys), `user`, `namespace`; as JSON, which
    is YAML too."""
    document = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": dict(cluster)}],
        "users": [{"name": "someone", "user": dict(user)}],
        "contexts": [
            {
                "name": "here",
                "context": {"cluster": "local", "user": "someone", "namespace": namespace},
            }
        ],
        "current-context": "here",
    }
    path.write_text(json.dumps(document))
    return path
