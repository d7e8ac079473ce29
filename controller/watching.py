"""A pod watch that does not lose events: resourceVersion resume, bookmarks, "410 Gone", reconnect.

It reads the watch stream as raw JSON lines (no model classes). After a dropped connection it
resumes from the last resourceVersion it saw; when that is too old (410 Gone) it lists again
and says so, since events may have been missed: the caller then makes a full pass.
"""

from __future__ import annotations

import json
import logging
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from pyabouts.controller.leaks import PodState
from pyabouts.controller.pods import PodListing, PodReader, pod_state

log = logging.getLogger(__name__)

WATCH_SECONDS = 240  # the server ends each watch after this; it is then resumed
RECONNECT_FIRST = 0.5  # seconds, doubling up to RECONNECT_MAX
RECONNECT_MAX = 15.0


@dataclass(frozen=True, slots=True)
class PodEvent:
    kind: str  # ADDED, MODIFIED, DELETED
    pod: PodState


@dataclass(frozen=True, slots=True)
class Relisted:
    """A fresh listing: events before it may be lost, so everything must be looked at again."""

    listing: PodListing


class _Gone(Exception):  # noqa: N818 - the server's word, not ours
    """The resourceVersion to resume from is too old."""


class PodWatch:
    def __init__(self, api_client: k8s.ApiClient, reader: PodReader) -> None:
        self._api = k8s.CoreV1Api(api_client)
        self._reader = reader
        self.resource_version: str | None = None
        self.reconnects = 0
        self.relists = 0

    def events(self, stop: threading.Event) -> Iterator[PodEvent | Relisted]:
        """Pod events until `stop` is set; a Relisted first, and after every "410 Gone"."""
        pause = RECONNECT_FIRST
        while not stop.is_set():
            try:
                if self.resource_version is None:
                    listing = self._reader.list_all()
                    self.resource_version = listing.resource_version
                    self.relists += 1
                    yield Relisted(listing)
                for event in self._stream(self.resource_version):
                    pause = RECONNECT_FIRST
                    yield event
                    if stop.is_set():
                        return
            except _Gone:
                log.info(
                    "watch resourceVersion %s expired (410 Gone): listing again",
                    self.resource_version,
                )
                self.resource_version = None
            except (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                self.reconnects += 1
                log.warning("pod watch interrupted (%s); resuming in %.1f s", exc, pause)
                stop.wait(pause * random.uniform(0.5, 1.0))
                pause = min(RECONNECT_MAX, pause * 2)

    def _stream(self, resource_version: str) -> Iterator[PodEvent]:
        response: Any = self._api.list_pod_for_all_namespaces(
            watch=True,
            resource_version=resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_SECONDS,
            _preload_content=False,
            _request_timeout=(10, WATCH_SECONDS + 30),
        )
        try:
            for line in response:
                if not line.strip():
                    continue
                event: dict[str, Any] = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        raise _Gone
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                self.resource_version = (obj.get("metadata") or {}).get(
                    "resourceVersion", resource_version
                )
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    yield PodEvent(str(kind), pod_state(obj))
        finally:
            response.release_conn()
