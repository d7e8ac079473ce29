"""The Kubernetes API as the IPPool store uses it: JSON over HTTPS (ipam.stores.http_connections).

Not the `kubernetes` client: importing it takes ~0.2 s, which every plugin process serving a
call in-process would pay, and it runs every body through its generic model (de)serialisation.
The store needs four verbs on one resource. Where the credentials come from is
ipam.stores.kubeconfig; the `kubernetes` library still loads what only it can (exec plugins,
auth providers, the in-cluster service account) and serves the controllers.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import tempfile
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from pyabouts.ipam.errors import (
    INVALID_CONFIG,
    CniError,
    StoreBusyError,
    StoreRefusedError,
    StoreUnavailableError,
)
from pyabouts.ipam.stores.http_connections import (
    AnswerTimeoutError,
    Connections,
    Endpoint,
    Request,
)

#: Who writes, as the apiserver records it (an IPPool's managedFields, audit logs).
USER_AGENT = "pyabouts"
CONNECTIONS_KEPT = 16  # idle connections kept for the agent's concurrent requests
# Status reasons of an apiserver that is up but overloaded (metav1.StatusReason).
_BUSY_REASONS = frozenset({"TooManyRequests", "Timeout", "ServerTimeout"})


@dataclass(frozen=True, slots=True)
class ApiCredentials:
    """Where the API is and how to prove who we are."""

    server: str  # e.g. https://10.0.0.1:6443
    namespace: str  # the context's: where the IPPools live
    ca_pem: str | None = None  # trust only this CA (else the system's)
    insecure: bool = False  # insecure-skip-tls-verify
    client_cert_pem: str | None = None  # certificate and key, PEM
    client_key_pem: str | None = None
    tls_server_name: str | None = None
    proxy: str | None = None
    #: The Authorization header for the next request, or None. A function: tokens rotate.
    authorization: Callable[[], str | None] = lambda: None


class ApiStatusError(Exception):
    """The API answered with an error status; `reason` is its Status object's (e.g. Timeout),
    `retry_after` the seconds its Retry-After header asked for."""

    def __init__(
        self, status: int, message: str, reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.reason = reason
        self.retry_after = retry_after

    @property
    def busy(self) -> bool:
        """Whether the server said it is overloaded or timed out: it is up, try again soon."""
        return self.status in (429, 504) or self.reason in _BUSY_REASONS


#: The object as PartialObjectMetadata: a write's answer without the object's body, which the
#: server then need not encode, nor the client decode (a block is some 40 KB of JSON). A server
#: that cannot (none since Kubernetes 1.15) answers with the next type, the whole object.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
#: The same for a list: names, labels and resourceVersions, not some 40 KB per object.
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"


class KubeApi:
    """JSON requests to one API server; thread-safe, connections kept alive."""

    def __init__(self, credentials: ApiCredentials, *, timeout: float, retries: int = 0) -> None:
        """`retries`: how many more times to try connecting when a connection cannot be made.
        CniError 7 for a server or proxy URL it cannot use."""
        self._credentials = credentials
        self._server = credentials.server.rstrip("/")
        self._timeout = timeout
        try:
            endpoint = Endpoint.parse(
                self._server,
                tls=lambda: _ssl_context(credentials),
                server_hostname=credentials.tls_server_name,
                proxy=credentials.proxy,
            )
        except ValueError as exc:
            raise CniError(INVALID_CONFIG, f"Kubernetes API: {exc}") from exc
        self._http = Connections(endpoint, kept=CONNECTIONS_KEPT, connect_retries=retries)

    @property
    def server(self) -> str:
        return self._server

    def request(
        self,
        method: str,
        path: str,
        *,
        query: dict[str, str | int | None] | None = None,
        body: dict[str, Any] | str | None = None,
        accept: str = "application/json",
    ) -> dict[str, Any]:
        """The decoded JSON answer (`accept` METADATA_ONLY or METADATA_LIST: its metadata
        alone); ApiStatusError on an error status, StoreUnavailableError when the server cannot
        be reached or answers nonsense. `body`: an object, or one already encoded (JSON text)."""
        headers = self._headers(accept)
        data = None
        if body is not None:
            headers["Content-Type"] = "application/json"
            text = body if isinstance(body, str) else json.dumps(body, separators=(",", ":"))
            data = text.encode()
        try:
            response = self._http.exchange(
                Request(method, _target(path, query), data, headers, self._timeout)
            )
        except AnswerTimeoutError as exc:
            # It accepted the connection but did not answer in time: up, and busy.
            raise StoreBusyError(
                f"Kubernetes API at {self._server} did not answer in time: {type(exc).__name__}"
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            # Not an outage: a server answers, and not with the certificate the kubeconfig
            # trusts. Trying again for the outage grace would not change that.
            raise StoreRefusedError(
                f"Kubernetes API at {self._server}: its certificate cannot be verified "
                f"({exc.verify_message}): check the kubeconfig's certificate-authority and "
                f"tls-server-name"
            ) from exc
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc
        if response.status >= 300:
            # Not always a Status object: kube-apiserver's overload and shutdown refusals (429)
            # are plain text, as are a front proxy's errors.
            error = _status_error(response.status, response.reason, _json_or_text(response.data))
            error.retry_after = response.retry_after
            raise error
        try:
            answer = json.loads(response.data) if response.data else {}
        except ValueError as exc:
            raise StoreUnavailableError(
                f"Kubernetes API at {self._server} answered {response.status} with no JSON"
            ) from exc
        if not isinstance(answer, dict):
            raise StoreUnavailableError(f"Kubernetes API at {self._server} answered a non-object")
        return answer

    def watch(
        self, path: str, query: dict[str, str | int | None], *, accept: str, idle_timeout: float
    ) -> Generator[dict[str, Any], None, None]:
        """The events of a watch of `path` from `query`'s resourceVersion, decoded, until the
        server ends it (timeoutSeconds); ApiStatusError on an error status, StoreUnavailableError
        when the connection fails or stays silent for `idle_timeout` seconds."""
        try:
            status, reason, lines, close = self._http.stream(
                _target(path, {"watch": "true", **query}),
                headers=self._headers(accept),
                connect_timeout=self._timeout,
                idle_timeout=idle_timeout,
            )
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise self._unreachable(exc) from exc
        try:
            if status >= 300:
                raise _status_error(status, reason, _json_or_text(b"".join(lines)))
            for line in lines:  # one JSON event per line
                if line.strip():
                    yield json.loads(line)
        except (http.client.HTTPException, OSError, ValueError) as exc:
            raise StoreUnavailableError(
                f"watch of {path} at {self._server} broke: {type(exc).__name__}"
            ) from exc
        finally:
            close()  # never kept: a watch's connection is done with when the watch is

    def close(self) -> None:
        self._http.clear()

    def _unreachable(self, exc: Exception) -> StoreUnavailableError:
        # A ValueError is a request it could not write (a header value with a line break, say):
        # its text would quote the header, a token perhaps.
        detail = "" if isinstance(exc, ValueError) else f": {exc}"
        return StoreUnavailableError(
            f"Kubernetes API at {self._server} is unreachable: {type(exc).__name__}{detail}"
        )

    def _headers(self, accept: str) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        try:
            authorization = self._credentials.authorization()
        except Exception as exc:  # a token file being replaced, an exec plugin that failed
            raise StoreUnavailableError(
                f"credentials for the Kubernetes API at {self._server} could not be read: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if authorization:
            headers["Authorization"] = authorization
        return headers


def _target(path: str, query: dict[str, str | int | None] | None) -> str:
    given = {k: v for k, v in (query or {}).items() if v is not None}
    return path + ("?" + urlencode(given) if given else "")


def _json_or_text(data: bytes) -> object:
    """`data` decoded as JSON, else its first line as text (at most 200 characters)."""
    try:
        return json.loads(data)
    except ValueError:
        lines = data.decode(errors="replace").strip().splitlines()
        return lines[0][:200] if lines else None


def _status_error(status: int, fallback: str | None, answer: object) -> ApiStatusError:
    """The error of a non-2xx answer, with the message and reason of its Status object (the
    text itself when `answer` is one)."""
    if isinstance(answer, str) and answer:
        return ApiStatusError(status, answer)
    fields = answer if isinstance(answer, dict) else {}
    message = str(fields.get("message") or fallback or "")
    return ApiStatusError(status, message, str(fields.get("reason") or ""))


def _ssl_context(credentials: ApiCredentials) -> ssl.SSLContext:
    """The TLS context of `credentials`; CniError 7 when its CA or client certificate and key
    cannot be used (not a certificate, a key of another certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if credentials.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif credentials.ca_pem:
            context.load_verify_locations(cadata=credentials.ca_pem)
        else:
            context.load_default_certs()
        if credentials.client_cert_pem and credentials.client_key_pem:
            cert, key = credentials.client_cert_pem, credentials.client_key_pem
            _load_client_certificate(context, cert, key)
    except (ssl.SSLError, ValueError, TypeError) as exc:  # TypeError: a CA not in ASCII
        raise CniError(
            INVALID_CONFIG,
            f"Kubernetes API: the kubeconfig's certificate-authority or client certificate "
            f"and key cannot be used: {exc}",
        ) from exc
    return context


def _load_client_certificate(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    # ssl loads a certificate chain from files only: a private directory, gone once loaded.
    with tempfile.TemporaryDirectory(prefix="pyabouts-tls-") as directory:
        paths = []
        for name, pem in (("cert.pem", cert_pem), ("key.pem", key_pem)):
            path = os.path.join(directory, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
                out.write(pem)
            paths.append(path)
        context.load_cert_chain(paths[0], paths[1])
