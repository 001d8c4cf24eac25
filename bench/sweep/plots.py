"""Plots of a sweep's results (matplotlib figures rendered by Agg; no pyplot, no global state).

- attainment_<workload>.png: SLO attainment vs per-device rate, a colour per placement; solid:
  every SLO, dashed: TTFT only, dotted: TPOT only; the horizontal line is the target.
- goodput_per_device.png: each placement's goodput per device against its device count, a
  panel per workload; a hollow marker is a lower bound (the top of the range met the target).
- latency_breakdown.png: mean latency split into queue, prefill, the rest of TTFT, KV transfer
  and decode, per placement at its goodput rate (its lowest rate if none met the target).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pdserve.bench.sweep.results import PlacementResult, SweepResults

LineStyle = Literal["-", "--", ":"]
# (ProbeResult field, line style, legend label)
SERIES: tuple[tuple[str, LineStyle, str], ...] = (
    ("attainment", "-", "both SLOs"),
    ("ttft_attainment", "--", "TTFT only"),
    ("tpot_attainment", ":", "TPOT only"),
)
# (breakdown key, label); transfer overlaps prefill compute, so stacks can exceed mean E2E
STACK = (
    ("queue", "queue"),
    ("prefill", "prefill"),
    ("ttft_other", "rest of TTFT"),
    ("transfer", "KV transfer"),
    ("decode", "decode"),
)


def plot_all(results: SweepResults, out_dir: Path) -> list[Path]:
    """Write every plot into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _save(attainment_figure(results, w.name), out_dir / f"attainment_{_slug(w.name)}.png")
        for w in results.workloads
    ]
    paths.append(_save(goodput_figure(results), out_dir / "goodput_per_device.png"))
    paths.append(_save(breakdown_figure(results), out_dir / "latency_breakdown.png"))
    return paths


def attainment_figure(results: SweepResults, workload: str) -> Figure:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    colors = _colors(results.placements)
    for p in results.placements:
        w = p.workloads.get(workload)
        if w is None or not w.probes:
            continue
        probes = sorted(w.probes, key=lambda x: x.rate_per_device)
        for key, style, _ in SERIES:
            points = [(x.rate_per_device, getattr(x, key)) for x in probes]
            points = [(r, a * 100) for r, a in points if a is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o" if key == "attainment" else None,
                        color=colors[p.name], markersize=4)  # fmt: skip
    ax.axhline(results.target * 100, color="grey", linewidth=1)
    ax.set_xlabel("request rate per device (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(-2, 102)
    info = next((w for w in results.workloads if w.name == workload), None)
    slos = ", ".join(f"{k.upper()} ≤ {v:g} ms" for k, v in info.slos_ms.items()) if info else ""
    ax.set_title(f"{results.experiment}: {workload} ({slos})", fontsize=10)
    handles = [Line2D([], [], color=colors[p.name], label=p.name) for p in results.placements]
    handles += [Line2D([], [], color="black", linestyle=s, label=lab) for _, s, lab in SERIES]
    handles.append(Line2D([], [], color="grey", label=f"target {results.target:.0%}"))
    ax.legend(handles=handles, fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return fig


def goodput_figure(results: SweepResults) -> Figure:
    n = max(1, len(results.workloads))
    fig = Figure(figsize=(4.5 * n, 4), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    colors = _colors(results.placements)
    for ax, info in zip(axes, results.workloads):
        for p in results.placements:
            w = p.workloads.get(info.name)
            if w is None:
                continue
            y = w.goodput / p.devices
            face = "none" if w.saturated else colors[p.name]
            ax.scatter([p.devices], [y], s=50, color=colors[p.name], facecolors=face, zorder=3)
            label = f"{p.name}{' (≥)' if w.saturated else ''}"
            ax.annotate(label, (p.devices, y), textcoords="offset points", xytext=(6, 4),
                        fontsize=8)  # fmt: skip
        ax.set_title(info.name, fontsize=10)
        ax.set_xlabel("devices")
        ax.set_ylabel("goodput per device (req/s)")
        ax.set_xticks(sorted({p.devices for p in results.placements}))
        ax.margins(x=0.25, y=0.15)  # room for the labels
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{results.experiment}: goodput per device at {results.target:.0%} attainment")
    return fig


def breakdown_figure(results: SweepResults) -> Figure:
    n = max(1, len(results.workloads))
    fig = Figure(figsize=(max(5.0, 1.2 * len(results.placements)) * n, 4.5), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, info in zip(axes, results.workloads):
        _breakdown_bars(ax, results.placements, info.name)
        ax.set_title(info.name, fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{results.experiment}: mean latency at each placement's goodput rate")
    return fig


def _breakdown_bars(ax: Axes, placements: list[PlacementResult], workload: str) -> None:
    names, rows = [], []
    for p in placements:
        w = p.workloads.get(workload)
        probe = w.best_probe() if w is not None else None
        if probe is None:
            continue
        passed = w is not None and w.goodput > 0
        rate = f"{probe.rate_per_device:.3g}/dev" + ("" if passed else ", none met")
        names.append(f"{p.name}\n{rate}")
        rows.append([probe.breakdown_ms.get(k, 0.0) for k, _ in STACK])
    bottom = [0.0] * len(rows)
    for i, (_, label) in enumerate(STACK):
        heights = [row[i] for row in rows]
        ax.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("mean latency per request (ms)")
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="y", alpha=0.3)


def _colors(placements: list[PlacementResult]) -> dict[str, str]:
    return {p.name: f"C{i % 10}" for i, p in enumerate(placements)}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    return path
