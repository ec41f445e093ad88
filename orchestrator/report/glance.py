"""The "at a glance" paragraph a researcher reads first: how many comparisons came out significant,
"no effect larger than the target" or inconclusive, and per quality metric the largest significant
gain or drop and the smallest effect the design could have detected."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from orchestrator.report.format import fmt, fmt_p, plural
from orchestrator.report.metrics import QUALITY, MetricSpec
from orchestrator.report.outcome import Collection
from orchestrator.report.stats import DeltaEstimate, is_improvement
from orchestrator.report.tables import Comparison, ComparisonTable, comparisons
from orchestrator.report.verdicts import INCONCLUSIVE, NO_LARGER_EFFECT, SIGNIFICANT
from orchestrator.stats.power import ALPHA, POWER, MetricPower, metric_power, pooled_paired_sd


def _amount(metric: MetricSpec, value: float, signed: bool = True) -> str:
    unit = metric.difference_unit
    return fmt(value * metric.scale, metric.decimals, signed=signed) + (f" {unit}" if unit else "")


def _delta_phrase(metric: MetricSpec, comparison: Comparison) -> str:
    delta: DeltaEstimate = comparison.cell.delta
    text = _amount(metric, delta.mean)
    if delta.has_ci:
        ci = f"{fmt(delta.low * metric.scale, metric.decimals, signed=True)}, " \
             f"{fmt(delta.high * metric.scale, metric.decimals, signed=True)}"
        text += f", {round(delta.confidence * 100)}% CI [{ci}], n={delta.n}"
    verdict = comparison.cell.verdict
    if verdict is not None and verdict.has_test:
        text += f", Holm p {fmt_p(verdict.p_holm)}"
    return text


def planned_seeds(found: Sequence[Comparison]) -> int:
    """The design's seeds per comparison: the count most comparisons plan (seeds_by_cell may give a
    few more or fewer); on a tie the smaller."""
    counts = Counter(c.planned for c in found)
    return max(counts, key=lambda n: (counts[n], -n), default=0)


def design_power(tables: Sequence[ComparisonTable], metric: MetricSpec, found: list[Comparison],
                 seeds: int | None = None) -> MetricPower:
    """The metric's power at the design's seeds (or `seeds`), with the paired SD pooled over its
    comparisons (else the spec's prior)."""
    seeds = planned_seeds(found) if seeds is None else seeds
    target = tables[0].target_effects.get(metric.name)
    pooled = pooled_paired_sd(list(c.cell.differences.values()) for c in found)
    said = f"observed over {plural(pooled.pairs, 'comparison')}" if pooled else ""
    return metric_power(metric.name, seeds, pooled, said, tables[0].paired_sd.get(metric.name), target)


def _power_phrase(metric: MetricSpec, power: MetricPower, elsewhere: Sequence[tuple[str, MetricPower]] = ()) -> str:
    """What the design detects at its seeds, then at the other seed counts of `elsewhere`
    (comparison labels, their power) where seeds_by_cell gave some comparisons their own seeds."""
    detectable = power.detectable
    if detectable is None:
        if power.seeds < 2:
            return "one seed per cell detects nothing (a paired test needs 2)"
        return (f"the detectable effect is unknown (about {power.detectable_effect_size:.2f} paired SDs at "
                f"{power.seeds} seeds; no comparison has 2 paired seeds and no report.paired_sd prior)")
    text = (f"the design detects ±{_amount(metric, detectable, signed=False)} ({POWER:.0%} power at "
            f"{power.seeds} seeds, paired SD {_amount(metric, power.sd, signed=False)}, {power.sd_source})")
    for labels, other in elsewhere:
        if other.detectable is not None:
            text += (f", ±{_amount(metric, other.detectable, signed=False)} at {other.seeds} seeds ({labels}: paired "
                     f"SD {_amount(metric, other.sd, signed=False)})")
    if power.target is not None:
        needed = power.seeds_for_target
        text += (f"; the target ±{_amount(metric, power.target, signed=False)} needs "
                 + (f"{needed} seeds" if needed is not None else "more seeds than is sensible"))
    return text


def _metric_sentence(tables: Sequence[ComparisonTable], metric: MetricSpec, found: list[Comparison]) -> str:
    """`**Seg. mIoU**: largest significant gain X (...); 2 no effect larger than ±1.00 pts, 3 inconclusive; power.`

    The power is stated per planned seed count (seeds_by_cell gives noisy arms more), each with the
    SD pooled over the comparisons planned at that count: a noisy arm's SD is not the quiet ones'."""
    groups: dict[int, list[Comparison]] = {}
    for c in found:
        groups.setdefault(c.planned, []).append(c)
    main = planned_seeds(found)
    power = design_power(tables, metric, groups[main], main)
    elsewhere = [(", ".join(dict.fromkeys(c.label for c in group)), design_power(tables, metric, group, seeds))
                 for seeds, group in sorted(groups.items()) if seeds != main]
    sign = 1 if metric.higher_is_better else -1
    significant = [c for c in found if c.cell.verdict and c.cell.verdict.kind == SIGNIFICANT]
    if metric.higher_is_better is None:
        gains, drops = significant, []
    else:
        gains = [c for c in significant if is_improvement(c.cell.delta.mean, metric.higher_is_better)]
        drops = [c for c in significant if c not in gains]
    parts = []
    if gains:
        top = max(gains, key=lambda c: sign * c.cell.delta.mean)
        word = "significant difference" if metric.higher_is_better is None else "significant gain"
        text = f"largest {word} {top.label} ({_delta_phrase(metric, top)})"
        if len(gains) > 1:
            text += f", {len(gains) - 1} more"
        parts.append(text)
    if drops:
        worst = min(drops, key=lambda c: sign * c.cell.delta.mean)
        parts.append(f"{plural(len(drops), 'significant drop')}, the largest {worst.label} "
                     f"({_delta_phrase(metric, worst)})")
    elif gains and metric.higher_is_better is not None:
        parts.append("no significant drop")
    if not significant:
        parts.append("nothing significant")
    others = []
    equivalent = sum(1 for c in found if c.cell.verdict and c.cell.verdict.kind == NO_LARGER_EFFECT)
    if equivalent:
        others.append(f"{equivalent} no effect larger than ±{_amount(metric, power.target, signed=False)}")
    inconclusive = sum(1 for c in found if c.cell.verdict is None or c.cell.verdict.kind == INCONCLUSIVE)
    if inconclusive:
        others.append(f"{inconclusive} inconclusive")
    text = f"**{metric.label}**: " + "; ".join(parts)
    if others:
        text += "; " + ", ".join(others)
    return f"{text}; {_power_phrase(metric, power, elsewhere)}."


def controls_sentence(tables: Sequence[ComparisonTable]) -> str | None:
    """`Controls (...): Seg. mIoU raw pixels 43.70%, untrained network 39.70% (reference 55.10%); ...`:
    the floor under each quality metric beside the reference row; None without a finished control."""
    table = tables[0] if tables else None
    controls = [row for row in table.rows if row.is_control and row.done] if table else []
    if not controls:
        return None
    reference = next((row for row in table.rows if row.is_reference and row.done), None)

    def value(metric: MetricSpec, row_mean: float) -> str:
        return fmt(metric.display(row_mean), metric.decimals) + metric.unit

    parts = []
    for metric in (m for m in table.metrics if m.kind == QUALITY):
        found = [(row.control, row.cells[metric.name].summary.mean) for row in controls]
        found = [(label, mean) for label, mean in found if mean is not None]
        if not found:
            continue
        text = f"{metric.label} " + ", ".join(f"{label} {value(metric, mean)}" for label, mean in found)
        ref_mean = reference.cells[metric.name].summary.mean if reference is not None else None
        if ref_mean is not None:
            text += f" (reference {value(metric, ref_mean)})"
        parts.append(text)
    if not parts:
        return None
    return "Controls, the floor under every number (the *(control)* rows): " + "; ".join(parts) + "."


def at_a_glance(tables: Sequence[ComparisonTable], collection: Collection) -> str:
    """One paragraph from the numbers (over every distinct variant-vs-reference comparison)."""
    metrics = [m for m in (tables[0].metrics if tables else []) if m.kind == QUALITY]
    found = comparisons(tables)
    sentences: list[str] = []
    if found:
        pairs = {c.label for c in found}
        kinds = [c.cell.verdict.kind if c.cell.verdict else INCONCLUSIVE for c in found]
        tested = sum(1 for c in found if c.cell.verdict is not None and c.cell.verdict.has_test)
        confidence = round(tables[0].confidence * 100)
        sentences.append(
            f"Over {plural(len(pairs), 'variant-vs-reference comparison')} × "
            f"{plural(len({c.metric.name for c in found}), 'quality metric')} (paired by seed): "
            f"{kinds.count(SIGNIFICANT)} significant, {kinds.count(NO_LARGER_EFFECT)} no effect larger than "
            f"the target, {kinds.count(INCONCLUSIVE)} inconclusive. Significant means a paired t test "
            f"p < {ALPHA:g} after Holm's correction over the family of all {plural(tested, 'test')} this report "
            f"shows (every comparison and metric with an interval); the tables show the uncorrected {confidence}% "
            "CIs beside it.")
        for metric in metrics:
            of_metric = [c for c in found if c.metric.name == metric.name]
            if of_metric:
                sentences.append(_metric_sentence(tables, metric, of_metric))
        if not tables[0].target_effects:
            sentences.append("No `report.target_effects` in the spec: without a target no comparison can be "
                             "called \"no effect larger than\" it.")
        if not tested:
            sentences.append("Every delta rests on a single seed pair (or identical per-seed differences): no "
                             "intervals, no tests; treat them as indicative only.")
    elif metrics:
        sentences.append("No comparison has finished seeds in both a variant and its reference row yet, "
                         "so there are no deltas to summarize.")
    if (floors := controls_sentence(tables)) is not None:
        sentences.append(floors)
    counts = collection.counts()
    total = len(collection.outcomes)
    unfinished = total - counts.get("done", 0)
    if unfinished:
        parts = [f"{counts[s]} {s}" for s in ("failed", "running", "planned", "cancelled", "stopped") if counts.get(s)]
        sentences.append(f"{unfinished} of {total} trials have no results yet ({', '.join(parts)}); "
                         "the footnotes say which cells they leave thin.")
    return " ".join(sentences)
