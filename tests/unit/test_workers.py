"""serving.workers.BoundedWorkers: parallel, bounded, and what stop() does to the queue."""

import threading
from functools import partial

import pytest

from pyabouts.serving.workers import BoundedWorkers

WAIT = 10.0  # seconds any test waits for a thread at most


def test_tasks_run_in_parallel_up_to_the_number_of_workers() -> None:
    workers = BoundedWorkers(3, 0, "test")
    together = threading.Barrier(3, timeout=WAIT)  # broken unless all three run at once
    passed: list[bool] = []

    def meet() -> None:
        together.wait()
        passed.append(True)

    assert all(workers.try_submit(meet, lambda: None) for _ in range(3))
    workers.stop()
    assert passed == [True] * 3


def test_beyond_the_workers_and_the_queue_a_task_is_refused_at_once() -> None:
    workers = BoundedWorkers(1, 2, "test")
    release, done = threading.Event(), threading.Semaphore(0)
    ran: list[int] = []

    def hold(n: int) -> None:
        release.wait(WAIT)
        ran.append(n)
        done.release()

    accepted = [workers.try_submit(partial(hold, n), lambda: None) for n in range(5)]
    assert accepted == [True, True, True, False, False]
    release.set()
    assert all(done.acquire(timeout=WAIT) for _ in range(3))
    workers.stop()
    assert ran == [0, 1, 2]
    assert workers.try_submit(lambda: None, lambda: None) is False  # stopped


def test_a_finished_task_frees_its_slot() -> None:
    workers = BoundedWorkers(1, 0, "test")
    done = threading.Event()
    assert workers.try_submit(done.set, lambda: None)
    assert done.wait(WAIT)
    for _ in range(100):  # the slot comes back just after the task returns
        if workers.try_submit(lambda: None, lambda: None):
            break
        threading.Event().wait(0.01)
    else:
        pytest.fail("the slot of a finished task was never freed")
    workers.stop()


def test_stop_lets_running_tasks_finish_and_drops_queued_ones() -> None:
    workers = BoundedWorkers(1, 2, "test")
    started, release = threading.Event(), threading.Event()
    finished: list[str] = []
    dropped: list[str] = []

    def running() -> None:
        started.set()
        release.wait(WAIT)
        finished.append("running")

    assert workers.try_submit(running, lambda: dropped.append("running"))
    assert started.wait(WAIT)
    for name in ("queued-1", "queued-2"):
        assert workers.try_submit(partial(finished.append, name), partial(dropped.append, name))
    stopper = threading.Thread(target=workers.stop)
    stopper.start()
    release.set()
    stopper.join(WAIT)
    assert not stopper.is_alive()
    assert finished == ["running"]
    assert dropped == ["queued-1", "queued-2"]


def test_sizes_below_one_worker_are_refused() -> None:
    with pytest.raises(ValueError):
        BoundedWorkers(0, 5, "test")
