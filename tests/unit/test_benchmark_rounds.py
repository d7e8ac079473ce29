"""The benchmark's rounds: the concurrent phase run again for the quick contenders, and each
ratio between them given as the median over the rounds as well as round by round."""

from bench.results import PhaseFigures, compute_ratios, round_phase


def phase(contender: str, name: str, wall_s: float) -> PhaseFigures:
    return PhaseFigures(
        contender=contender,
        phase=name,
        command="ADD",
        calls=1000,
        concurrency=50,
        nodes=10,
        ok=1000,
        failures={},
        failure_samples={},
        duplicates=0,
        conflicts=0,
        p50_ms=1.0,
        p99_ms=1.0,
        max_ms=1.0,
        wall_s=wall_s,
        per_second=1000 / wall_s,
        rss_max_mib=1.0,
        rss_p50_mib=1.0,
    )


def test_the_median_of_the_rounds_ratios_is_a_row_of_its_own() -> None:
    # Ratios of 1, 1.5 and 9: their median is neither their mean nor the first round's.
    walls = {"pyabouts-shim": [3.0, 4.5, 27.0], "host-local": [3.0, 3.0, 3.0]}
    phases = [
        phase(contender, round_phase("concurrent", n), rounds[n - 1])
        for n in (1, 2, 3)
        for contender, rounds in walls.items()
    ]
    phases.append(phase("whereabouts", "concurrent", 100.0))  # ran once
    ratios = compute_ratios([], phases, baselines=("whereabouts", "host-local"))
    wall = {(r.contender, r.baseline, r.row): r.value for r in ratios if r.figure == "wall_s"}
    shim = "pyabouts-shim"
    assert wall[shim, "host-local", "concurrent ADD"] == 1.0
    assert wall[shim, "host-local", "concurrent-round-2 ADD"] == 1.5
    assert wall[shim, "host-local", "concurrent-round-3 ADD"] == 9.0
    assert wall[shim, "host-local", "concurrent ADD, median of 3"] == 1.5
    # Against a baseline that ran once there is one ratio, and no median.
    assert wall[shim, "whereabouts", "concurrent ADD"] == 0.03
    assert not [row for (_, base, row) in wall if base == "whereabouts" and "median" in row]
