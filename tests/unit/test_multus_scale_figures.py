"""The Multus scale figures: duplicates and restarts counted from what a round saw, and the
benchmark's verdict against the node-binary issue's targets."""

from __future__ import annotations

from bench.multus_scale import summarise
from deploy.local.multus_scale import ScaleFigures

CALM = ((0, "-"),)
OOM = ((1, "OOMKilled"),)


def round_of(
    ipam: str,
    up: float | None,
    *,
    after: tuple[tuple[int, str], ...] = CALM,
    net2: dict[str, str] | None = None,
) -> ScaleFigures:
    net1 = {"p0": "198.19.2.1/25", "p1": "198.19.2.2/25"}
    net2 = net2 if net2 is not None else {"p0": "198.19.2.129/25", "p1": "198.19.2.130/25"}
    ready = 2 if up is not None else 1
    return ScaleFigures(ipam, 2, up, ready, 1.0, CALM, after, {"a": net1, "b": net2})


def test_an_address_given_twice_on_a_network_is_a_duplicate_and_a_restart_is_seen() -> None:
    twice = round_of(
        "pyabouts", 1.0, after=OOM, net2={"p0": "198.19.2.129/25", "p1": "198.19.2.129/25"}
    )
    assert twice.duplicates == 1
    assert twice.multus_restarted
    assert round_of("pyabouts", 1.0).duplicates == 0
    assert not round_of("pyabouts", 1.0).multus_restarted


def test_the_verdict_takes_medians_and_counts_restarts_at_upstream_limits_only() -> None:
    figures = [
        round_of("pyabouts", 14.0),
        round_of("host-local", 10.0),
        round_of("pyabouts", 30.0),  # one slow round does not decide the median
        round_of("host-local", 11.0),
        round_of("pyabouts", 15.0),
        round_of("host-local", 9.0),
    ]
    upstream = summarise("upstream", "50Mi", 2, figures)
    assert upstream["by_ipam"]["pyabouts"]["up_seconds_median"] == 15.0
    assert upstream["ratio_to_host_local"] == 1.5
    assert upstream["met"]
    restarted = [*figures[:-1], round_of("pyabouts", 15.0, after=OOM)]
    assert not summarise("upstream", "50Mi", 2, restarted)["met"]
    assert (
        summarise("upstream", "50Mi", 2, restarted)["by_ipam"]["pyabouts"][
            "rounds_with_multus_restart"
        ]
        == 1
    )
    # Raised limits: 1.2x is the target, and a restart there is reported, not a miss.
    assert not summarise("raised", "256Mi", 2, restarted)["met"]  # 1.5 > 1.2
    quick = [round_of("pyabouts", 11.0, after=OOM), round_of("host-local", 10.0)]
    assert summarise("raised", "256Mi", 2, quick)["met"]
    # A round not all Ready in time is left out of the median and misses the target.
    stuck = [*figures, round_of("pyabouts", None)]
    summary = summarise("upstream", "50Mi", 2, stuck)
    assert summary["by_ipam"]["pyabouts"]["rounds_not_all_ready"] == 1
    assert summary["by_ipam"]["pyabouts"]["ready"][-1] == 1
    assert summary["ratio_to_host_local"] == 1.5 and not summary["met"]
