"""How long the write-behind flusher waits: jittered, and backing off while the datastore fails."""

from pyabouts.plugin.agent.backend import FLUSH_BACKOFF_MAX_SECONDS, flush_wait


def test_flushes_are_spread_around_the_interval_so_agents_started_together_drift_apart() -> None:
    waits = [flush_wait(0.25, 0) for _ in range(2000)]
    assert 0.2 <= min(waits) < 0.21 and 0.29 < max(waits) <= 0.3
    assert len({round(w, 4) for w in waits}) > 100


def test_failed_flushes_back_off_doubling_to_a_cap() -> None:
    def largest(failures: int) -> float:
        return max(flush_wait(0.25, failures) for _ in range(500))

    assert 0.55 < largest(1) <= 0.6 and 1.1 < largest(2) <= 1.2
    # A cluster's nodes retry an apiserver that is down at most this often, not at 4 Hz each.
    cap = FLUSH_BACKOFF_MAX_SECONDS * 1.2
    assert cap * 0.95 < largest(3) <= cap and cap * 0.95 < largest(30) <= cap
    assert min(flush_wait(0.25, 30) for _ in range(500)) >= FLUSH_BACKOFF_MAX_SECONDS * 0.8
    # An interval longer than the cap is kept: backing off never flushes more often.
    assert min(flush_wait(5.0, 3) for _ in range(500)) >= 4.0
