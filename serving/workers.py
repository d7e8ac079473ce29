"""A fixed number of worker threads with a bounded queue in front of them: how the node agent
serves its socket and both long-running processes serve their HTTP endpoints, so that a flood
of connections costs a refusal each, never a thread each."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial

log = logging.getLogger(__name__)


class BoundedWorkers:
    """Runs tasks on at most `workers` threads at once, with at most `waiting` more queued;
    try_submit refuses at once beyond that, so the caller can answer "busy" itself."""

    def __init__(self, workers: int, waiting: int, name: str) -> None:
        if workers < 1 or waiting < 0:
            raise ValueError(f"bad pool size: {workers}, {waiting}")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._slots = threading.BoundedSemaphore(workers + waiting)

    def try_submit(self, task: Callable[[], None], if_dropped: Callable[[], None]) -> bool:
        """Queue `task`, or return False when every slot is taken. `if_dropped` runs instead of
        `task` when stop() drops it from the queue before a worker took it."""
        if not self._slots.acquire(blocking=False):
            return False
        try:
            future = self._pool.submit(task)
        except RuntimeError:  # stopped
            self._slots.release()
            return False
        future.add_done_callback(partial(self._done, if_dropped))
        return True

    def stop(self) -> None:
        """Let the running tasks finish; drop the queued ones (each gets its `if_dropped`)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _done(self, if_dropped: Callable[[], None], future: Future[None]) -> None:
        self._slots.release()
        if future.cancelled():
            if_dropped()
        elif (error := future.exception()) is not None:  # tasks handle their own: a bug
            log.error("task failed", exc_info=error)
