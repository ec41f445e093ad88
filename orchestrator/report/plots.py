"""PNG figures for a comparison table: paired deltas with CIs, and per-block [CLS]-patch cosines.

Figures are built with `matplotlib.figure.Figure` (no pyplot): no global state, no GUI backend, so
reports can be built from any thread or headless machine.
"""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.report.metrics import QUALITY, MetricSpec
from orchestrator.report.tables import ComparisonTable, Row
from orchestrator.report.verdicts import SIGNIFICANT

BLOCK_METRIC = re.compile(r"^tokens/block(\d+)/cls_patch_cos_(pre|post)$")
SIGNIFICANT_GAIN, SIGNIFICANT_DROP, UNSURE = "#2a9d4b", "#c0392b", "#8c8c8c"


def _row_name(table: ComparisonTable, row: Row) -> str:
    return " / ".join(row.key)


def delta_metrics(table: ComparisonTable) -> list[MetricSpec]:
    return [m for m in table.metrics if m.kind == QUALITY and m.higher_is_better is not None]


def plot_deltas(table: ComparisonTable, path: Path) -> Path | None:
    """One panel per quality metric: each variant's paired Δ against its reference, 95% CI bars.

    Green / red: significant after the Holm correction (gain / drop, direction-aware), as the
    table's verdict; grey: not; a hollow marker without a bar: no CI (a single seed pair); a shaded
    band: ± the metric's target effect. Returns None when no row has a delta.
    """
    metrics = delta_metrics(table)
    rows = [r for r in table.rows if r.compared]
    panels = [(m, [(r, r.cells[m.name].delta) for r in rows
                   if r.cells[m.name].delta is not None and r.cells[m.name].delta.n > 0]) for m in metrics]
    panels = [(m, entries) for m, entries in panels if entries]
    if not panels:
        return None
    from matplotlib.figure import Figure  # heavy (about 0.5 s): only when there is something to draw
    from matplotlib.ticker import MaxNLocator  # matplotlib too: only when drawing

    labels = [_row_name(table, r) for r in rows]
    height = 1.2 + 0.35 * len(rows)
    fig = Figure(figsize=(3.6 * len(panels), height), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    positions = {r.index: i for i, r in enumerate(rows)}
    group_starts = [i for i, r in enumerate(rows) if i == 0 or r.group != rows[i - 1].group]
    for ax, (metric, entries) in zip(axes, panels):
        plotted = {row.index for row, _ in entries}
        for row in rows:
            if row.index not in plotted:  # say it, rather than leave a row that looks like Δ = nothing
                ax.text(0.02, positions[row.index], "no paired seeds", transform=ax.get_yaxis_transform(),
                        va="center", fontsize=7, color=UNSURE, style="italic")
        # One errorbar call per colour, not per row: matplotlib's cost is per artist.
        by_color: dict[str, tuple[list, list, list, list]] = {}
        hollow_x, hollow_y = [], []
        for row, delta in entries:
            y, x = positions[row.index], delta.mean * metric.scale
            if not delta.has_ci:
                hollow_x.append(x)
                hollow_y.append(y)
                continue
            gain = (delta.mean > 0) == metric.higher_is_better
            verdict = row.cells[metric.name].verdict
            significant = verdict.kind == SIGNIFICANT if verdict is not None else bool(delta.significant)
            color = (SIGNIFICANT_GAIN if gain else SIGNIFICANT_DROP) if significant else UNSURE
            xs, ys, lows, highs = by_color.setdefault(color, ([], [], [], []))
            xs.append(x)
            ys.append(y)
            lows.append(x - delta.low * metric.scale)
            highs.append(delta.high * metric.scale - x)
        for color, (xs, ys, lows, highs) in by_color.items():
            ax.errorbar(xs, ys, xerr=[lows, highs], fmt="o", color=color, capsize=3, markersize=4)
        if hollow_x:
            ax.plot(hollow_x, hollow_y, marker="o", markerfacecolor="white", color=UNSURE, linestyle="none")
        for boundary in group_starts[1:]:  # separate the groups of a crossing (framework, scale, ...)
            ax.axhline(boundary - 0.5, color="#cccccc", linewidth=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        target = table.target_effects.get(metric.name)
        if target is not None:  # the "no effect larger than" band: an interval inside it is a null result
            ax.axvspan(-target * metric.scale, target * metric.scale, color=UNSURE, alpha=0.12, linewidth=0)
        ax.axvline(0.0, color="black", linewidth=0.8)
        unit = metric.difference_unit
        better = "→ better" if metric.higher_is_better else "← better"
        ax.set_title(f"Δ {metric.label}" + (f" ({unit})" if unit else ""), fontsize=9)
        ax.set_xlabel(better, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(rows)), labels)
    axes[0].set_ylim(len(rows) - 0.5, -0.5)
    confidence = round(table.confidence * 100)
    fig.suptitle(f"{table.title}: paired Δ vs reference ({confidence}% CI; colour: Holm-significant)", fontsize=10)
    fig.savefig(path, dpi=120)
    return path


def block_curves(row: Row) -> dict[str, list[float | None]]:
    """{"pre": [...], "post": [...]}: per-block cosine, mean over the row's finished seeds."""
    sums: dict[tuple[str, int], list[float]] = {}
    for outcome in row.done:
        for name, value in outcome.metrics.items():
            match = BLOCK_METRIC.match(name)
            if match:
                sums.setdefault((match.group(2), int(match.group(1))), []).append(float(value))
    if not sums:
        return {}
    depth = 1 + max(block for _, block in sums)
    return {stage: [(sum(v) / len(v)) if (v := sums.get((stage, i))) else None for i in range(depth)]
            for stage in ("pre", "post")}


def plot_token_curves(table: ComparisonTable, path: Path) -> Path | None:
    """Per-block cos([CLS], patch) before (dashed) and after (solid) norm1, one colour per value of
    the compared axis, one panel per group of a crossing. None when no row logged per-block metrics."""
    groups = table.groups()
    curves = {row.index: block_curves(row) for row in table.rows}
    if not any(curves.values()):
        return None
    from matplotlib.figure import Figure  # heavy (about 0.5 s): only when there is something to draw
    from matplotlib.lines import Line2D  # matplotlib too: only when drawing

    fig = Figure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    # One colour per value of the compared axis, the same in every panel.
    values = list(dict.fromkeys(row.key[0] for row in table.rows))
    color_of = {value: f"C{i % 10}" for i, value in enumerate(values)}
    for ax, group in zip(axes, groups):
        handles = []
        for row in (r for r in table.rows if r.group == group):
            curve = curves[row.index]
            if not curve:
                continue
            color = color_of[row.key[0]]
            for stage, style in (("post", "-"), ("pre", "--")):
                ys = curve.get(stage, [])
                xs = [b for b, y in enumerate(ys) if y is not None]
                if xs:
                    ax.plot(xs, [ys[b] for b in xs], style, color=color, marker=".")
            mark = " (control)" if row.is_control else (" (ref.)" if row.is_reference else "")
            handles.append(Line2D([], [], color=color, label=row.key[0] + mark))
        handles += [Line2D([], [], color="black", linestyle="-", label="after norm1"),
                    Line2D([], [], color="black", linestyle="--", label="before norm1")]
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("block", fontsize=8)
        ax.set_title(", ".join(f"{a}={v}" for a, v in zip(table.axes[1:], group)) or table.axes[0], fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        ax.legend(handles=handles, fontsize=6, loc="best")
    axes[0].set_ylabel("cos([CLS], patch), mean over seeds", fontsize=8)
    fig.savefig(path, dpi=120)
    return path
