"""A picture of a benchmark result: latency (p50 and p99) and throughput per contender and phase.

Drawn with matplotlib's Agg backend straight onto a Figure (no pyplot, no display), saved as a
PNG beside the JSON result.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from bench.results import ROUND, BenchmarkResult, PhaseFigures

LATEST_PNG = "latest.png"
GROUP_WIDTH = 0.8  # of one phase's slot on the x axis, shared by the contenders' bars
FIGSIZE = (14, 6.5)
DPI = 110
HEADROOM = 3.0  # the log axes reach this far above the highest bar, for its label
LEGEND_COLUMNS = 4  # nine contenders' names side by side are wider than the figure


def write_plot(result: BenchmarkResult, out_dir: Path, stem: str) -> Path:
    """Save the plot as <out_dir>/<stem>.png and as <out_dir>/latest.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = draw(result)
    path = out_dir / f"{stem}.png"
    figure.savefig(path, dpi=DPI)
    shutil.copyfile(path, out_dir / LATEST_PNG)
    return path


def draw(result: BenchmarkResult) -> Figure:
    figure = Figure(figsize=FIGSIZE, layout="constrained")
    FigureCanvasAgg(figure)
    rows = _rows(result.phases)
    latency = figure.add_subplot(1, 2, 1)
    _grouped_bars(latency, result, rows, _latency_bars)
    latency.set_ylabel("ms per call (log)")
    latency.set_title(
        "latency per plugin call: solid bar and upper label p50, pale bar and lower p99"
    )
    throughput = figure.add_subplot(1, 2, 2)
    _grouped_bars(throughput, result, rows, _throughput_bars)
    throughput.set_ylabel("successful calls per second (log)")
    throughput.set_title("throughput over the whole phase")
    handles = [Patch(color=_color(i), label=name) for i, name in enumerate(result.contenders)]
    columns = min(max(len(handles), 1), LEGEND_COLUMNS)
    figure.legend(handles=handles, loc="outside lower center", ncols=columns)
    figure.suptitle(_title(result))
    return figure


BarDrawer = Callable[[Axes, float, float, PhaseFigures, str], None]


def _grouped_bars(
    axes: Axes, result: BenchmarkResult, rows: Sequence[tuple[str, str]], draw_bar: BarDrawer
) -> None:
    """One group of bars per (phase, command), one bar per contender, in the run's order."""
    by_key = {(p.contender, p.phase, p.command): p for p in result.phases}
    width = GROUP_WIDTH / max(len(result.contenders), 1)
    for index, contender in enumerate(result.contenders):
        offset = (index - (len(result.contenders) - 1) / 2) * width
        for x, (phase, command) in enumerate(rows):
            figures = by_key.get((contender, phase, command))
            if figures is not None:
                draw_bar(axes, x + offset, width, figures, _color(index))
    axes.set_yscale("log")
    low, high = axes.get_ylim()
    axes.set_ylim(low, high * HEADROOM)
    axes.set_xticks(range(len(rows)), [f"{phase}\n{command}" for phase, command in rows])
    axes.grid(axis="y", which="both", alpha=0.3)


def _color(index: int) -> str:
    return f"C{index}"


def _latency_bars(axes: Axes, x: float, width: float, p: PhaseFigures, color: str) -> None:
    axes.bar(x, p.p99_ms, width, color=color, alpha=0.35)
    axes.bar(x, p.p50_ms, width * 0.6, color=color)
    _label(axes, x, p.p99_ms, f"{p.p50_ms:.0f}\n{p.p99_ms:.0f}")


def _throughput_bars(axes: Axes, x: float, width: float, p: PhaseFigures, color: str) -> None:
    axes.bar(x, p.per_second, width, color=color)
    _label(axes, x, p.per_second, f"{p.per_second:.1f}")


def _label(axes: Axes, x: float, y: float, text: str) -> None:
    axes.annotate(
        text,
        (x, y),
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize="x-small",
    )


def _rows(phases: Sequence[PhaseFigures]) -> list[tuple[str, str]]:
    """(phase, command) pairs in the order they ran; a phase's later rounds are in the JSON."""
    return list(dict.fromkeys((p.phase, p.command) for p in phases if ROUND not in p.phase))


def _title(result: BenchmarkResult) -> str:
    s, m = result.settings, result.machine
    return (
        f"pyabouts benchmark {result.started_at[:16]}Z: sequential, {s.sequential_calls} ADDs "
        f"then DELs on one node; spaced, {s.spaced_calls} ADDs {s.spaced_gap_s:.1f} s apart;\n"
        f"concurrent, {s.calls} ADDs into {s.pool_size} addresses then the DELs, "
        f"{s.concurrency} at a time over {s.nodes} nodes; pods, {s.pods} pods x "
        f"{s.pod_networks} networks at once\n"
        f"{m.nproc} CPUs ({m.cpu_model}), load average {m.load_average} at the start, "
        f"{result.load_average_end} at the end"
    )
