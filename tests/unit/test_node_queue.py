import logging
import threading
import time
from pathlib import Path

import pytest

from pyabouts.ipam.pool import PoolId
from pyabouts.plugin.node_queue import node_queue

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
