import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pyabouts.ipam.pool import PoolId
from pyabouts.plugin.node_queue import PATIENCE, node_queue

POOL = PoolId("blue", 4)


def test_one_writer_per_pool_at_a_time(tmp_path: Path) -> None:
    order: list[str] = []
    inside = threading.Event()

    def first() -> None:
        with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 5):
            inside.set()
            time.sleep(0.2)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    inside.wait()
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 5):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


def test_other_pools_do_not_wait(tmp_path: Path) -> None:
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 5):
        started = time.monotonic()
        with node_queue(str(tmp_path), [PoolId("green", 4)], deadline=time.monotonic() + 5):
            assert time.monotonic() - started < 0.1


def test_a_turn_that_does_not_come_is_not_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pyabouts.plugin.node_queue.PATIENCE", 0.2)
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 5):
        done = threading.Event()
        waited: list[float] = []

        def impatient() -> None:
            started = time.monotonic()
            with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 5):
                waited.append(time.monotonic() - started)
            done.set()

        threading.Thread(target=impatient).start()
        assert done.wait(5)  # it went ahead while the first still held the turn
    assert 0.2 <= waited[0] < 1


def test_an_unusable_run_dir_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyabouts.plugin.node_queue")
    blocker = tmp_path / "file"
    blocker.write_text("")
    with node_queue(str(blocker), [POOL], deadline=time.monotonic() + 1):
        pass
    assert "no node queue" in caplog.text


def tickets(run_dir: Path) -> int:
    """How many processes (here: threads) are in the queues of `run_dir`."""
    return len(list(run_dir.glob("queues/*/*.ticket")))


def wait_for_tickets(run_dir: Path, count: int) -> None:
    """Until `count` are in line (so that the next one to join is behind them)."""
    give_up = time.monotonic() + 5
    while tickets(run_dir) != count:
        assert time.monotonic() < give_up, f"{tickets(run_dir)} in line, not {count}"
        time.sleep(0.001)


def test_turns_are_taken_in_arrival_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pyabouts.plugin.node_queue.POLL_BEHIND", 0.005)
    entered: list[str] = []

    def writer(name: str) -> None:
        with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
            entered.append(name)
            time.sleep(0.005)

    names = [f"waiter-{i}" for i in range(5)]
    threads = [threading.Thread(target=writer, args=(name,)) for name in names]
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
        for count, thread in enumerate(threads, start=2):
            thread.start()
            wait_for_tickets(tmp_path, count)
    for thread in threads:
        thread.join()
    assert entered == names
    assert tickets(tmp_path) == 0  # everyone left


def test_a_queue_that_moves_is_waited_for_past_patience(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each writer holds the turn for less than PATIENCE, the three of them for more: the last
    # one waits for its turn all the same, and writes after the others, not beside them.
    monkeypatch.setattr("pyabouts.plugin.node_queue.PATIENCE", 0.2)
    events: list[str] = []

    def writer(name: str) -> None:
        with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
            events.append(f"{name} in")
            time.sleep(0.12)
            events.append(f"{name} out")

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(3)]
    for count, thread in enumerate(threads, start=1):
        thread.start()
        wait_for_tickets(tmp_path, count)
    for thread in threads:
        thread.join()
    assert events == ["w0 in", "w0 out", "w1 in", "w1 out", "w2 in", "w2 out"]


def test_the_ticket_of_a_killed_process_is_skipped(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child: takes the turn, says so, waits to be killed
        with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
            os.write(write_end, b"in")
            time.sleep(60)
        os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 2) == b"in"
    os.kill(child, signal.SIGKILL)
    os.waitpid(child, 0)
    assert tickets(tmp_path) == 1  # its ticket is still there, but nobody holds it
    started = time.monotonic()
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
        assert time.monotonic() - started < PATIENCE / 2  # not stuck behind the dead one
        assert tickets(tmp_path) == 1  # ours: the dead one was removed
    os.close(read_end)


def test_near_the_deadline_it_writes_without_its_turn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyabouts.plugin.node_queue")
    with node_queue(str(tmp_path), [POOL], deadline=time.monotonic() + 60):
        started = time.monotonic()
        with node_queue(str(tmp_path), [POOL], deadline=started + 0.6):
            waited = time.monotonic() - started
    assert 0.4 <= waited < 3  # two thirds of the 0.6 s left: a third is kept for writing
    assert "near the deadline" in caplog.text


def test_other_pools_queue_apart(tmp_path: Path) -> None:
    with node_queue(str(tmp_path), [POOL, PoolId("green", 4)], deadline=time.monotonic() + 5):
        assert len(list(tmp_path.glob("queues/*"))) == 2
        assert tickets(tmp_path) == 2
