"""Keeps a store's BlockFeed (ipam.store) reporting to the agent's pool cache, on a thread of its
own: started again after it breaks, with growing pauses, while the cache falls back to reading
pools older than its max_age; until stopped."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from pyabouts.ipam.store import BlockFeed, ChangeSink
from pyabouts.plugin.agent.datastore_health import DatastoreHealth
from pyabouts.plugin.agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

FIRST_PAUSE_SECONDS = 0.5  # before following again after a break; doubled each time
MAX_PAUSE_SECONDS = 30.0
STEADY_SECONDS = 60.0  # a feed that ran this long before it broke starts from the first pause


class FeedFollower:
    def __init__(
        self, feed: BlockFeed, sink: ChangeSink, metrics: AgentMetrics, health: DatastoreHealth
    ) -> None:
        self._feed = feed
        self._stop = threading.Event()
        self._sink = _MeteredSink(sink, metrics, self._stop, health)
        self._metrics = metrics
        self._health = health
        self._thread = threading.Thread(target=self._follow, name="block-feed", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop following, and leave the agent's gauge to the follower that replaces this one.
        The thread ends at the feed's next event (a bookmark comes about every minute) or idle
        timeout; it is a daemon, and what its cache hears meanwhile harms nobody."""
        self._stop.set()

    def _follow(self) -> None:
        pause = FIRST_PAUSE_SECONDS
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._feed.follow_changes(self._sink, self._stop)
            except Exception as exc:  # a broken feed is never fatal: pools are read instead
                if not self._stop.is_set():  # else stopped while it waited: nothing to tell
                    # Until a probe says otherwise: the next list, or a request's write, would
                    # say the datastore answers while the watch is still refused.
                    self._health.failed(exc, until_probed=True)
                    if time.monotonic() - began > STEADY_SECONDS:
                        pause = FIRST_PAUSE_SECONDS
                    log.warning(
                        "the IPPool watch broke (%s); following it again in %g s", exc, pause
                    )
                    self._metrics.feed_breaks.inc()
            self._sink.feed_lost()
            self._stop.wait(pause)
            pause = min(2 * pause, MAX_PAUSE_SECONDS)


class _MeteredSink:
    """The cache, with the feed's state on the agent's gauge while its follower is current."""

    def __init__(
        self,
        sink: ChangeSink,
        metrics: AgentMetrics,
        stopped: threading.Event,
        health: DatastoreHealth,
    ) -> None:
        self._sink = sink
        self._live = metrics.feed_live
        self._stopped = stopped
        self._health = health

    def feed_listed(self, revisions: Mapping[tuple[str, str], str]) -> None:
        self._sink.feed_listed(revisions)
        if not self._stopped.is_set():
            self._live.set(1)
            self._health.answered()

    def feed_changed(self, pool_tag: str, block_tag: str, revision: str, *, deleted: bool) -> None:
        self._sink.feed_changed(pool_tag, block_tag, revision, deleted=deleted)

    def feed_lost(self) -> None:
        if not self._stopped.is_set():
            self._live.set(0)
        self._sink.feed_lost()
