"""The IPPool watch as a BlockFeed (KubernetesStore.follow_changes) on a scripted API, and the
agent's FeedFollower around it. The real apiserver's watch is exercised by
tests/integration/test_agent.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from pyabouts.ipam.errors import StoreRefusedError, StoreUnavailableError
from pyabouts.ipam.pool import BlockKey, PoolId
from pyabouts.ipam.stores.kube_api import ApiStatusError
from pyabouts.ipam.stores.kubernetes import POOL_LABEL, KubernetesStore, object_name, pool_label
from pyabouts.plugin.agent import feed_follower
from pyabouts.plugin.agent.datastore_health import DatastoreHealth
from pyabouts.plugin.agent.feed_follower import FeedFollower, _MeteredSink
from pyabouts.plugin.agent.metrics import AgentMetrics

POOL = PoolId("blue", 4)
KEY = BlockKey(POOL, 0x0A000000)


def item(name: str, revision: str, pool: str = pool_label(POOL)) -> dict[str, Any]:
    return {"metadata": {"name": name, "resourceVersion": revision, "labels": {POOL_LABEL: pool}}}


class ScriptedApi:
    """Answers list pages in turn, and plays one list of events per watch."""

    server = "https://scripted"

    def __init__(self, pages: list[dict[str, Any]], watches: list[list[dict[str, Any]]]) -> None:
        self.pages = pages
        self.watches = watches
        self.watched_from: list[object] = []

    def request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        return self.pages.pop(0)

    def watch(self, path: str, query: dict[str, Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
        self.watched_from.append(query["resourceVersion"])
        if not self.watches:
            raise StoreUnavailableError("connection refused")
        yield from self.watches.pop(0)


class Sink:
    def __init__(self) -> None:
        self.listed: dict[tuple[str, str], str] | None = None
        self.changes: list[tuple[str, str, str, bool]] = []
        self.lost = 0

    def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
        self.listed = dict(revisions)

    def feed_changed(self, pool_tag: str, block_tag: str, revision: str, *, deleted: bool) -> None:
        self.changes.append((pool_tag, block_tag, revision, deleted))

    def feed_lost(self) -> None:
        self.lost += 1


def test_the_feed_lists_every_page_then_watches_from_the_list_and_on_from_each_event() -> None:
    name = object_name(KEY)
    pages = [
        {"metadata": {"resourceVersion": "10", "continue": "more"}, "items": [item(name, "7")]},
        {"metadata": {"resourceVersion": "10"}, "items": [item("not-a-block", "8", pool="")]},
    ]
    first_watch = [
        {"type": "MODIFIED", "object": item(name, "11")},
        {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
    ]  # then the server ends it (timeoutSeconds)
    second_watch = [
        {"type": "DELETED", "object": item(name, "16")},
        {"type": "ERROR", "object": {"code": 410, "message": "too old resource version"}},
    ]
    api = ScriptedApi(pages, [first_watch, second_watch])
    store = KubernetesStore(api, "kube-system")  # type: ignore[arg-type]
    sink = Sink()
    with pytest.raises(StoreUnavailableError, match="too old resource version"):
        store.follow_changes(sink, threading.Event())
    assert sink.listed == {(store.pool_tag(POOL), store.block_tag(KEY)): "7"}
    assert api.watched_from == ["10", "15"]  # the bookmark moved it on
    assert sink.changes == [
        (pool_label(POOL), name, "11", False),
        (pool_label(POOL), name, "16", True),
    ]


def test_the_follower_follows_again_after_a_break_and_reports_it_lost_meanwhile(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(feed_follower, "FIRST_PAUSE_SECONDS", 0.01)
    listing = {"metadata": {"resourceVersion": "1"}, "items": []}
    api = ScriptedApi([listing, listing, listing], [[], []])  # then the watch is refused
    sink, metrics = Sink(), AgentMetrics()
    health = DatastoreHealth(None)
    follower = FeedFollower(KubernetesStore(api, "ns"), sink, metrics, health)  # type: ignore[arg-type]
    follower.start()
    deadline = time.monotonic() + 10
    while sink.lost < 2:  # each break is counted, then reported lost
        assert time.monotonic() < deadline
        time.sleep(0.01)
    follower.stop()
    assert metrics.feed_breaks._value.get() >= 2 and sink.listed == {}  # the counter's value


def test_a_stopped_followers_reports_leave_the_gauge_to_the_current_one() -> None:
    """A retired client's follower ends at its watch's next event and reports its feed lost:
    the agent's gauge keeps saying what the current follower's feed is."""
    metrics = AgentMetrics()
    retired_stop, current_stop = threading.Event(), threading.Event()
    retired = _MeteredSink(Sink(), metrics, retired_stop, DatastoreHealth(None))
    current = _MeteredSink(Sink(), metrics, current_stop, DatastoreHealth(None))
    retired.feed_listed({})
    current.feed_listed({})
    retired_stop.set()
    retired.feed_lost()
    assert metrics.feed_live._value.get() == 1
    current.feed_lost()
    assert metrics.feed_live._value.get() == 0


class RefusedWatchApi(ScriptedApi):
    """Lists, then answers the watch with an error status."""

    def __init__(self, status: int) -> None:
        super().__init__([{"metadata": {"resourceVersion": "1"}, "items": []}], [])
        self.status = status

    def watch(self, path: str, query: dict[str, Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
        raise ApiStatusError(self.status, "watch refused")
        yield {}  # a generator, as the API client's


@pytest.mark.parametrize("status", [401, 403, 404])
def test_a_watch_the_api_refuses_leaves_the_agent_not_ready(status: int) -> None:
    """The ServiceAccount may list IPPools but not watch them (RBAC of an older release, say):
    refused as a request would be, the agent is not ready, rather than ready and reading each
    pool whole every 2 s, the feed never live."""
    store = KubernetesStore(RefusedWatchApi(status), "ns")  # type: ignore[arg-type]
    with pytest.raises(StoreRefusedError) as refused:
        store.follow_changes(Sink(), threading.Event())
    health = DatastoreHealth(None)
    health.failed(refused.value)
    assert not health.ready()
