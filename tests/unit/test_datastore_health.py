"""The agent's readiness as its datastore's answers make it (plugin/agent/datastore_health.py)."""

import threading
import time

import pytest

from pyabouts.ipam.errors import (
    CORRUPT_BLOCK,
    CniError,
    StoreBusyError,
    StoreRefusedError,
    StoreUnavailableError,
)
from pyabouts.plugin.agent import datastore_health
from pyabouts.plugin.agent.datastore_health import DatastoreHealth
from tests.waiting import wait_for


def test_a_trusting_agent_is_ready_until_a_call_finds_its_store_unreached() -> None:
    health = DatastoreHealth(None)
    assert health.ready()  # nothing known against it
    for answered_all_the_same in (
        StoreBusyError("slow"),
        CniError(CORRUPT_BLOCK, "edited by hand"),
        StoreRefusedError("422: the block is too large", content=True),
        ValueError("a bug"),
    ):
        health.failed(answered_all_the_same)
        assert health.ready()
    health.failed(StoreUnavailableError("connection refused"))
    assert not health.ready()
    health.answered()
    assert health.ready()
    health.failed(StoreRefusedError("Forbidden"))
    assert not health.ready()
    health.failed(OSError("reset"))
    assert not health.ready()


def test_an_agent_of_its_own_store_is_ready_once_a_probe_or_call_finds_it_answering(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(datastore_health, "PROBE_SECONDS", 0.2)
    outcomes: list[Exception | None] = [StoreUnavailableError("refused"), None]
    probes: list[float] = []
    release = threading.Event()

    def probe() -> None:
        probes.append(time.monotonic())
        release.wait(5)
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    health = DatastoreHealth(probe)
    assert not health.ready()  # unknown: a probe starts, and it is not ready meanwhile
    assert not health.ready()
    release.set()
    wait_for(lambda: not health._probing, 5, "the first probe's end", every=0.005)
    assert len(probes) == 1 and not health.ready()  # the first probe found it out of reach
    wait_for(
        health.ready, 5, "ready", every=0.005
    )  # a check PROBE_SECONDS after the first probe asks again
    # (Spaced from when the first was started, a little before it ran.)
    assert len(probes) == 2 and probes[1] - probes[0] >= 0.15
    health.failed(StoreUnavailableError("gone"))  # a request's call
    assert not health.ready()
    health.answered()  # the next one's
    assert health.ready() and len(probes) == 2


def test_a_refused_watch_holds_until_a_probe_succeeds_whatever_other_calls_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The IPPool watch refused (RBAC without `watch`): the feed's next list, or a request's
    write, answers, and would make the agent ready for the seconds until the watch is refused
    again, long enough for a rolling update to pass it. Only a probe, which asks for the watch
    too, clears it."""
    monkeypatch.setattr(datastore_health, "PROBE_SECONDS", 0.05)
    refused = StoreRefusedError("Forbidden: cannot watch ippools")
    outcomes: list[Exception | None] = [refused, None]

    def probe() -> None:
        if (outcome := outcomes.pop(0)) is not None:
            raise outcome

    health = DatastoreHealth(probe)
    health.answered()
    assert health.ready()
    health.failed(refused, until_probed=True)
    health.answered()  # the list, or a write
    assert not health.ready()  # and a probe starts, refused still
    wait_for(lambda: len(outcomes) == 1 and not health._probing, 5, "the refused probe")
    health.answered()
    assert not health.ready()
    wait_for(health.ready, 5, "ready once a probe found the watch allowed", every=0.01)
    assert outcomes == []
