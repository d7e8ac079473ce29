"""Credentials for the IPPool store, from a kubeconfig or from a `kubernetes` Configuration.

A node's kubeconfig (a service-account token, or a client certificate) is read here directly:
parsing it with PyYAML costs a few milliseconds, loading the `kubernetes` client's loader
~0.15 s. What only that loader can do (exec plugins, auth providers, basic auth) is left to it.
Paths in a kubeconfig are relative to its directory, as kubectl reads them.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyabouts.ipam.errors import INVALID_CONFIG, CniError
from pyabouts.ipam.stores.kube_api import ApiCredentials

if TYPE_CHECKING:
    from kubernetes.client import Configuration

DEFAULT_NAMESPACE = "kube-system"
SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# User keys that need the kubernetes client's loader.
_DELEGATED_USER_KEYS = frozenset({"exec", "auth-provider", "username", "password"})


def read_kubeconfig(path: str) -> ApiCredentials:
    """The credentials of kubeconfig `path`'s current context; CniError 7 if it has none."""
    try:
        document = _parse(Path(path).read_text())
        context, cluster, user = _current(document)
        if _DELEGATED_USER_KEYS & user.keys():
            return _through_kubernetes_client(path)
        return _credentials(Path(path).parent, context, cluster, user)
    except (OSError, ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise CniError(INVALID_CONFIG, f"kubeconfig {path}: {_describe(exc)}") from exc


def in_cluster_credentials(
    environ: Mapping[str, str], directory: Path = SERVICE_ACCOUNT_DIR
) -> ApiCredentials:
    """The pod's own service account: the API behind KUBERNETES_SERVICE_HOST/PORT, trusted by
    the cluster's CA, the token read per request (kubelet rotates it in place), and the pod's
    namespace for the IPPools (the reconciler's too)."""
    host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise CniError(
            INVALID_CONFIG,
            "not running in a cluster (KUBERNETES_SERVICE_HOST/PORT unset): give a kubeconfig",
        )
    try:
        namespace = (directory / "namespace").read_text().strip()
        return ApiCredentials(
            server=f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}",
            namespace=namespace or DEFAULT_NAMESPACE,
            ca_pem=(directory / "ca.crt").read_text(),
            authorization=_bearer(directory, {"tokenFile": "token"}),
        )
    except OSError as exc:
        raise CniError(INVALID_CONFIG, f"in-cluster service account: {exc}") from exc


def credentials_from_configuration(configuration: Configuration, namespace: str) -> ApiCredentials:
    """The same for a client the `kubernetes` library configured (in-cluster, exec plugins);
    its API key is asked for on every request, so the library's token refresh still works."""

    def authorization() -> str | None:
        bearer = configuration.auth_settings().get("BearerToken")
        return str(bearer["value"]) if bearer and bearer.get("value") else None

    return ApiCredentials(
        server=configuration.host,
        namespace=namespace,
        ca_pem=_read_optional(configuration.ssl_ca_cert),
        insecure=not configuration.verify_ssl,
        client_cert_pem=_read_optional(configuration.cert_file),
        client_key_pem=_read_optional(configuration.key_file),
        tls_server_name=configuration.tls_server_name,
        proxy=configuration.proxy,
        authorization=authorization,
    )


def load_kubeconfig(path: str) -> tuple[Configuration, str]:
    """A `kubernetes` Configuration of kubeconfig `path` (for the controllers' pod and Lease
    clients), and its context's namespace."""
    from kubernetes import client as k8s  # noqa: PLC0415 - heavy, and off the plugin's path
    from kubernetes import config as k8s_config  # noqa: PLC0415
    from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415

    configuration = k8s.Configuration()
    try:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=path, client_configuration=configuration
        )
        _, active = k8s_config.list_kube_config_contexts(  # type: ignore[no-untyped-call]
            config_file=path
        )
        if hook := _token_file_refresh(path):
            configuration.refresh_api_key_hook = hook  # type: ignore[assignment]
    except (ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        raise CniError(INVALID_CONFIG, f"kubeconfig {path}: {exc}") from exc
    namespace = (active or {}).get("context", {}).get("namespace") or DEFAULT_NAMESPACE
    return configuration, namespace


def _token_file_refresh(path: str) -> Callable[[Configuration], None] | None:
    """A refresh hook (in place of the loader's) reading the current user's tokenFile again
    before each request: the library's loader reads it once, and refreshes only what expires
    (exec plugins, auth providers), where kubelet rotates a projected token in place; None for
    another user."""
    _, _, user = _current(_parse(Path(path).read_text()))
    if _DELEGATED_USER_KEYS & user.keys() or not user.get("tokenFile") or user.get("token"):
        return None
    bearer = _bearer(Path(path).parent, user)

    def refresh(configuration: Configuration) -> None:
        if token := bearer():
            configuration.api_key["BearerToken"] = token  # the key the loader sets

    return refresh


def _parse(text: str) -> dict[str, Any]:
    import yaml  # noqa: PLC0415 - only when a kubeconfig is read

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        document = yaml.load(text, Loader=loader)  # a safe loader (C if built)
    except yaml.YAMLError as exc:
        # Its message quotes the offending text: say where only, the file may be secret.
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"not YAML{where}") from None
    if not isinstance(document, dict):
        raise ValueError("not a kubeconfig (no mapping at the top)")
    return document


def _current(document: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The current context, and the cluster and user it names."""
    name = document.get("current-context")
    if not name:
        raise ValueError("no current-context")
    context = _named(document, "contexts", "context", name)
    cluster = _named(document, "clusters", "cluster", context.get("cluster"))
    user = _named(document, "users", "user", context.get("user")) if context.get("user") else {}
    return context, cluster, user


def _named(document: dict[str, Any], section: str, key: str, name: object) -> dict[str, Any]:
    for entry in document.get(section) or []:
        if isinstance(entry, dict) and entry.get("name") == name:
            value = entry.get(key) or {}
            if not isinstance(value, dict):
                raise ValueError(f"{section} entry {name!r} is not a mapping")
            return value
    raise ValueError(f"no {key} named {name!r}")


def _credentials(
    base: Path, context: dict[str, Any], cluster: dict[str, Any], user: dict[str, Any]
) -> ApiCredentials:
    server = cluster.get("server")
    if not server:
        raise ValueError("the cluster has no server")
    ca_pem = _pem(base, cluster, "certificate-authority")
    insecure = _flag(cluster, "insecure-skip-tls-verify")
    if insecure and ca_pem:  # refused as kubectl refuses it: which of the two was meant?
        raise ValueError("insecure-skip-tls-verify and a certificate-authority: choose one")
    client_cert_pem = _pem(base, user, "client-certificate")
    client_key_pem = _pem(base, user, "client-key")
    if bool(client_cert_pem) != bool(client_key_pem):  # one alone proves nothing: a 401 later
        raise ValueError("a client certificate needs its client key, and a key its certificate")
    return ApiCredentials(
        server=str(server),
        namespace=str(context.get("namespace") or DEFAULT_NAMESPACE),
        ca_pem=ca_pem,
        insecure=insecure,
        client_cert_pem=client_cert_pem,
        client_key_pem=client_key_pem,
        tls_server_name=cluster.get("tls-server-name"),
        proxy=cluster.get("proxy-url"),
        authorization=_bearer(base, user),
    )


def _flag(section: dict[str, Any], key: str) -> bool:
    """A boolean key, absent meaning false. Anything but true or false is refused, as kubectl
    refuses it: a templated "false" must not turn TLS verification off."""
    value = section.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{key} is {value!r}, not true or false")
    return value


def _pem(base: Path, section: dict[str, Any], key: str) -> str | None:
    """`key`-data (base64, line breaks allowed, as `base64` wraps it) or the file `key` names."""
    data = section.get(f"{key}-data")
    if data:
        return base64.b64decode("".join(str(data).split()), validate=True).decode()
    path = section.get(key)
    return (base / path).read_text() if path else None


def _bearer(base: Path, user: dict[str, Any]) -> Callable[[], str | None]:
    token = user.get("token")
    if token:
        header = f"Bearer {str(token).strip()}"  # `token: |` in YAML ends in a line break
        return lambda: header
    token_file = user.get("tokenFile")
    if token_file:
        path = base / token_file
        path.read_text()  # unreadable: say so now, not at the first request
        # Read per request: the kubelet rotates projected service-account tokens in place.
        return lambda: f"Bearer {path.read_text().strip()}"
    return lambda: None


def _through_kubernetes_client(path: str) -> ApiCredentials:
    configuration, namespace = load_kubeconfig(path)
    return credentials_from_configuration(configuration, namespace)


def _read_optional(path: str | None) -> str | None:
    return Path(path).read_text() if path else None


def _describe(exc: Exception) -> str:
    if isinstance(exc, binascii.Error):
        return f"bad base64 data ({exc})"
    return str(exc)
