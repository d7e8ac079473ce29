"""Kubeconfigs the local tooling writes: self-contained (certificates embedded), one context."""

from __future__ import annotations

import base64
from pathlib import Path

CONTEXT_NAME = "pyabouts-local"
CONTEXT_NAMESPACE = "kube-system"


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    ca_cert: Path,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    token: str | None = None,
    user: str = "admin",
    namespace: str = CONTEXT_NAMESPACE,
) -> Path:
    """Write a self-contained kubeconfig (certificates embedded) with one context."""
    if token is not None:
        creds = f"    token: {token}\n"
    elif client_cert is not None and client_key is not None:
        creds = (
            f"    client-certificate-data: {_b64(client_cert)}\n"
            f"    client-key-data: {_b64(client_key)}\n"
        )
    else:
        raise ValueError("a kubeconfig needs a token or a client certificate and key")
    text = (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    certificate-authority-data: {_b64(ca_cert)}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"{creds}"
        "contexts:\n"
        f"- name: {CONTEXT_NAME}\n"
        "  context:\n"
        f"    cluster: {CONTEXT_NAME}\n"
        f"    user: {user}\n"
        f"    namespace: {namespace}\n"
        f"current-context: {CONTEXT_NAME}\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.chmod(0o600)
    tmp.replace(path)
    return path
