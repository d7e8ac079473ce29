"""Tests marked ``machine_wide`` run alone on the machine, never beside another test.

They start hundreds of plugin processes at once. On two cores, a test that ran beside them got
a fiftieth of a core: a `kubectl pyabouts` call that takes half a second alone took over a
minute, and real servers (etcd, kube-apiserver) of the other xdist worker missed their
deadlines. The xdist group "processes" keeps those tests on one worker, not the other worker
idle; this lock does that.

Every test holds a lock on a file shared by the run's workers: shared for most, exclusive for
``machine_wide`` ones. A second lock, the gate, is taken before it and let go once the first is
held, so an exclusive waiter holding the gate keeps new shared holders out instead of waiting
for a moment when none happens to hold it.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

MARK = "machine_wide"  # registered in pyproject.toml


@contextmanager
def _locked(path: Path, operation: int) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, operation)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _share_the_machine(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    # The run's directory (under xdist each worker's base is popen-gwN inside it).
    base = tmp_path_factory.getbasetemp()
    directory = base.parent if base.name.startswith("popen-gw") else base
    alone = request.node.get_closest_marker(MARK) is not None
    with ExitStack() as held:
        with _locked(directory / "machine.gate", fcntl.LOCK_EX):
            operation = fcntl.LOCK_EX if alone else fcntl.LOCK_SH
            held.enter_context(_locked(directory / "machine.lock", operation))
        yield
