"""The "at a glance" paragraph a researcher reads first: per quality metric, the largest
significant gain and whether any drop is significant, with an honest word on multiplicity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.report.format import fmt, plural
from orchestrator.report.metrics import QUALITY, MetricSpec
from orchestrator.report.outcome import Collection
from orchestrator.report.stats import DeltaEstimate, is_improvement
from orchestrator.report.tables import ComparisonTable


@dataclass(frozen=True)
class _Finding:
    label: str
    delta: DeltaEstimate


def _findings(tables: Sequence[ComparisonTable], metric: MetricSpec) -> list[_Finding]:
    """Every non-reference row's delta for `metric`, each (row cell, reference cell) pair once."""
    seen, out = set(), []
    for table in tables:
        for row in table.rows:
            cell = row.cells.get(metric.name)
            if row.is_reference or row.reference is None or cell is None or cell.delta is None or cell.delta.n == 0:
                continue
            pair = (tuple(sorted(row.cell.items())), tuple(sorted(table.rows[row.reference].cell.items())))
            if pair in seen:
                continue
            seen.add(pair)
            out.append(_Finding(f"`{row.label(table.axes)}`", cell.delta))
    return out


def _delta_phrase(metric: MetricSpec, delta: DeltaEstimate) -> str:
    unit = metric.difference_unit
    unit = f" {unit}" if unit else ""
    value = fmt(delta.mean * metric.scale, metric.decimals, signed=True) + unit
    if delta.has_ci:
        ci = (f"{fmt(delta.low * metric.scale, metric.decimals, signed=True)}, "
              f"{fmt(delta.high * metric.scale, metric.decimals, signed=True)}")
        return f"{value}, {round(delta.confidence * 100)}% CI [{ci}], n={delta.n}"
    return f"{value}, n=1, no CI"


def _metric_sentence(metric: MetricSpec, findings: list[_Finding]) -> str:
    """`Seg. mIoU: largest significant gain X (+2.45 pts, CI, n); 3 more significant gains; no significant drop.`"""
    sign = 1 if metric.higher_is_better else -1
    gains = [f for f in findings if f.delta.significant and is_improvement(f.delta.mean, metric.higher_is_better)]
    drops = [f for f in findings if f.delta.significant and not is_improvement(f.delta.mean, metric.higher_is_better)]
    if gains:
        top = max(gains, key=lambda f: sign * f.delta.mean)
        text = f"**{metric.label}**: largest significant gain {top.label} ({_delta_phrase(metric, top.delta)})"
        if len(gains) > 1:
            text += f", {len(gains) - 1} more significant gain{'s' if len(gains) > 2 else ''}"
    else:
        top = max(findings, key=lambda f: sign * f.delta.mean)
        verdict = "not significant" if top.delta.has_ci else "single seed"
        text = (f"**{metric.label}**: no significant gain (best point estimate {top.label}, "
                f"{_delta_phrase(metric, top.delta)}, {verdict})")
    if drops:
        worst = min(drops, key=lambda f: sign * f.delta.mean)
        text += (f"; {plural(len(drops), 'significant drop')}, the largest {worst.label} "
                 f"({_delta_phrase(metric, worst.delta)})")
    elif any(f.delta.has_ci for f in findings):
        text += "; no significant drop"
    return text + "."


def at_a_glance(tables: Sequence[ComparisonTable], collection: Collection) -> str:
    """One paragraph from the numbers: per quality metric, the largest significant gain and whether
    any drop is significant (over every distinct variant-vs-reference comparison in the tables)."""
    metrics = [m for m in (tables[0].metrics if tables else []) if m.kind == QUALITY and m.higher_is_better is not None]
    sentences: list[str] = []
    compared: set[str] = set()
    intervals = 0
    for metric in metrics:
        findings = _findings(tables, metric)
        if not findings:
            continue
        compared.update(f.label for f in findings)
        intervals += sum(f.delta.has_ci for f in findings)
        sentences.append(_metric_sentence(metric, findings))
    any_ci = intervals > 0
    if sentences:
        confidence = round(tables[0].confidence * 100)
        sentences.insert(0, f"Over {plural(len(compared), 'variant-vs-reference comparison')} "
                            f"(paired by seed, {confidence}% CI):")
        if not any_ci:
            sentences.append("Every delta rests on a single seed pair: no confidence intervals, treat them as "
                             "indicative only.")
        elif intervals >= 20:
            # Honest about multiplicity: the intervals are per comparison, not corrected for how many there are.
            chance = (1 - tables[0].confidence) * intervals
            sentences.append(f"These are {intervals} uncorrected intervals: about {chance:.0f} would exclude 0 by "
                             "chance alone, so trust effects that repeat across groups more than isolated ones.")
    elif metrics:
        sentences.append("No comparison has finished seeds in both a variant and its reference row yet, "
                         "so there are no deltas to summarize.")
    counts = collection.counts()
    total = len(collection.outcomes)
    unfinished = total - counts.get("done", 0)
    if unfinished:
        parts = [f"{counts[s]} {s}" for s in ("failed", "running", "planned", "cancelled", "stopped") if counts.get(s)]
        sentences.append(f"{unfinished} of {total} trials have no results yet ({', '.join(parts)}); "
                         "the footnotes say which cells they leave thin.")
    return " ".join(sentences)
