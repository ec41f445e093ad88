"""The tables `plan` and `status` print: the trials a spec asks for against the ledger and the store,
their cost, and how far each cell's search got. Rendering only: what to show comes from plan.py.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.locks import SweepLock
from orchestrator.plan import (
    PlanDiff,
    Runs,
    compared_trials,
    device_of,
    estimate_train_flops,
    finished_runs,
    fit_time_model,
    gpus_per_trial,
    measured,
    power_plan,
)
from orchestrator.report.metrics import QUALITY, MetricSpec, metric_spec
from orchestrator.report.stats import DEFAULT_CONFIDENCE, ci_half_width, sample_std
from orchestrator.search.study import CellSummary
from orchestrator.spec import SweepSpec, TrialPlan, cell_text, format_value
from orchestrator.stats.design import cell_key, comparison_differences, resolve_baseline
from orchestrator.stats.power import ALPHA, MAX_SEEDS, POWER, SD_UNKNOWN, MetricPower
from orchestrator.store import ProjectPaths

STATE_STYLE = {"done": "green", "running": "cyan", "failed": "red", "cancelled": "yellow", "pruned": "magenta",
               "planned": "white", "new": "bold", "gone": "dim"}
STATUS_STATES = ("done", "running", "planned", "failed", "cancelled", "pruned")


def plan_view(spec: SweepSpec, trials: list[TrialPlan], diff: PlanDiff, ledger: Ledger, paths: ProjectPaths) -> Group:
    """Every trial: new / kept / gone against the ledger, its state, training TFLOP, its time (measured
    when finished, else estimated) and on GPUs its GPU-hours; then what remains."""
    device = device_of(spec)
    on_gpu = any(gpus_per_trial(spec, t.config) for t in trials)
    fitted = fit_time_model(paths, ledger, on_gpu=on_gpu)
    table = Table(title=f"{spec.name}: {len(trials)} trials ({diff.summary()} vs the ledger)", title_justify="left")
    columns = ["trial", "id", "change", "state", "train TFLOP", "est. time", "measured"] + (["GPU-h"] if on_gpu else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("trial", "id", "change", "state") else "right")
    remaining = {"tflop": 0.0, "seconds": 0.0, "gpu_h": 0.0, "unknown": 0}
    bases = set()
    for change, group in (("new", diff.new), ("kept", diff.kept)):
        for trial in group:
            record = ledger.get(trial.trial_id)
            if record is not None:
                state = record.state
            else:
                state = "done (store)" if paths.trial(trial.trial_id).is_done() else "new"
            flops = estimate_train_flops(trial.config)
            gpus = gpus_per_trial(spec, trial.config)
            model = fitted or (device.model(gpus) if device and gpus else None)
            finished = state.startswith("done")  # shows its measured time (none for a stand-in), never an estimate
            took = measured(paths.trial(trial.trial_id), record) if finished else None
            seconds = took.seconds if took else (model.seconds(flops) if model else None)
            if not finished:
                remaining["tflop"] += flops / 1e12
                if seconds is None:
                    remaining["unknown"] += 1
                else:
                    remaining["seconds"] += seconds
                    remaining["gpu_h"] += gpus * seconds / 3600
                    bases.add(model.describe())
            estimate = "" if finished else (duration(seconds) if seconds is not None else "?")
            row = [escape(trial.label), trial.trial_id, change, styled(state), f"{flops / 1e12:,.2f}", estimate,
                   duration(took.seconds) if took else ""]
            if on_gpu:
                row.append(f"{gpus * seconds / 3600:,.1f}" if seconds is not None else "?")
            table.add_row(*row)
    for trial_id in diff.gone:
        record = ledger.get(trial_id)
        table.add_row(escape(record.label if record else ""), trial_id, "gone", styled(record.state if record else "?"),
                      *[""] * (len(columns) - 4))
    lines: list[Table | Text] = [table, Text(remaining_line(spec, remaining, bases, on_gpu))]
    if recipes := recipe_line(trials):
        lines.append(Text(recipes))
    if spec.search is not None:
        cells = len({tuple(t.cell.values()) for t in trials if t.control is None})
        lines.append(Text(f"search: up to {spec.search.budget()} {spec.search.sampler} trials in each of {cells} cells "
                          f"(shown: the runs made so far and each cell's final trials), then {len(spec.seeds)} seed(s) "
                          "at the chosen settings"))
    lines += power_view(spec, compared_trials(spec, trials, paths), ledger, paths)
    return Group(*lines)


def _amount(metric: MetricSpec, value: float | None) -> str:
    """A difference in the metric's display units (`1.23 pts`); '?' when unknown."""
    if value is None:
        return "?"
    unit = metric.difference_unit
    return f"{value * metric.scale:.{metric.decimals}f}" + (f" {unit}" if unit else "")


def power_view(spec: SweepSpec, trials: list[TrialPlan], ledger: Ledger, paths: ProjectPaths) -> list[Table | Text]:
    """Per quality metric of the report: the paired SD and where it came from, the smallest paired
    difference the planned seeds detect, and the seeds the spec's target effect needs."""
    metrics = [metric_spec(name) for name in spec.report.metrics]
    metrics = [m for m in metrics if m.kind == QUALITY]  # costs and token cosines are not tested
    if not metrics:
        return []
    runs = finished_runs(trials, paths)  # read once: the pooled power and the per-comparison table
    powers = power_plan(spec, trials, ledger, paths, [m.name for m in metrics], runs)
    seeds = len(spec.seeds)
    ruled = " (other counts: seeds_by_cell, below)" if spec.seeds_by_cell else ""
    table = Table(title=f"power: paired t test, two-sided {ALPHA:.0%}, {POWER:.0%} power, {seeds} seed(s) per cell{ruled}",
                  title_justify="left")
    for column in ("metric", "paired SD", "SD from", f"detectable Δ at {seeds} seeds", "target Δ",
                   "seeds for target"):
        table.add_column(column, justify="left" if column in ("metric", "SD from") else "right")
    unknown = []
    for metric, power in zip(metrics, powers):
        table.add_row(escape(metric.name), _amount(metric, power.sd), escape(power.sd_source),
                      _detectable_text(metric, power), _amount(metric, power.target) if power.target else "",
                      _seeds_text(power))
        if power.sd_source == SD_UNKNOWN:
            unknown.append(metric.name)
    lines: list[Table | Text] = [table]
    if (noise := comparison_view(spec, trials, runs, metrics)) is not None:
        lines.append(noise)
    baseline = resolve_baseline(spec)
    for rule in spec.seeds_by_cell:
        n = len(rule.seeds)
        cell = cell_text(rule.cell.items())
        if all(baseline.get(axis) == value for axis, value in rule.cell.items()):
            lines.append(Text(f"seeds_by_cell: {cell} (the reference) runs {n} seed(s), the pairs of every "
                              "variant that runs as many"))
            continue
        detects = [f"{escape(m.name)} {_amount(m, replace(p, seeds=n).detectable)}" for m, p in zip(metrics, powers)
                   if p.sd is not None and n >= 2]
        lines.append(Text(f"seeds_by_cell: {cell} runs {n} seed(s)" + (f"; detectable Δ there: {', '.join(detects)}"
                                                                          if detects else "")))
    if unknown:
        lines.append(Text(f"no paired SD yet for {', '.join(unknown)}: finish two seeds of a variant and its "
                          "reference, or give a prior: report.paired_sd: {" + ", ".join(f"{n}: ..." for n in unknown)
                          + "} (logged units, e.g. 0.006 for 0.6 mIoU points)"))
    lines.append(Text(f"detectable Δ: the smallest true paired difference a single test finds {POWER:.0%} of the "
                      "time; the report's Holm correction over all its comparisons needs somewhat more"))
    return lines


def comparison_view(spec: SweepSpec, trials: list[TrialPlan], runs: Runs, metrics: list[MetricSpec]) -> Table | None:
    """Each comparison's own noise from its finished seed pairs: the arms are not equally noisy, and
    this is what `seeds_by_cell` is chosen from. None before any comparison has two pairs."""
    planned = Counter(cell_key(trial.cell) for trial in trials)
    found = [(variant, differences)
             for variant, differences in comparison_differences(spec, runs, [m.name for m in metrics])
             if any(len(d) >= 2 for d in differences.values())]
    if not found:
        return None
    table = Table(title=f"per comparison, from its finished pairs: paired SD, the {DEFAULT_CONFIDENCE:.0%} CI "
                        "half-width at its planned seeds, the seeds its target needs", title_justify="left")
    for column in ("variant", "metric", "pairs", "paired SD", "CI half-width", "seeds for target"):
        table.add_column(column, justify="left" if column in ("variant", "metric") else "right")
    for variant, differences in found:
        label = escape(cell_text(variant))
        n = planned[variant]  # the variant's seeds: validation makes its reference run them too
        for metric in metrics:
            values = differences[metric.name]
            if len(values) < 2:
                continue
            sd = sample_std(values)
            power = MetricPower(metric.name, n, sd, "", spec.report.target_effects.get(metric.name))
            width = ci_half_width(sd, n) if n >= 2 else None
            table.add_row(label, escape(metric.name), f"{len(values)}/{n}", _amount(metric, sd),
                          f"±{_amount(metric, width)}" if width is not None else "", _seeds_text(power))
            label = ""
    return table


def _detectable_text(metric: MetricSpec, power: MetricPower) -> str:
    d = power.detectable_effect_size
    if d is None:
        return "none (1 seed)"
    if power.sd is None:
        return f"{d:.2f} × SD"  # Cohen's d: known from the seed count alone
    return _amount(metric, power.detectable)


def _seeds_text(power: MetricPower) -> str:
    if power.target is None:
        return "set report.target_effects"
    needed = power.seeds_for_target
    if needed is None:
        return "?" if power.sd is None else f"> {MAX_SEEDS}"
    return str(needed)


def recipe_line(trials: list[TrialPlan]) -> str:
    """`recipes: dinov2 (2 trials), none (2 trials)`: which official recipe each trial's defaults
    come from (trainer/recipes.py); empty when no trial names one."""
    counts = Counter(str(t.config.get("recipe", "none")) for t in trials if t.control is None)
    if set(counts) <= {"none"}:
        return ""
    return "recipes: " + ", ".join(f"{name} ({n} trial{'s' * (n != 1)})" for name, n in sorted(counts.items())) + \
        " (defaults from trainer/recipes.py; README: recipe card)"


def remaining_line(spec: SweepSpec, remaining: dict[str, float], bases: set[str], on_gpu: bool) -> str:
    """`remaining compute: 12.3 TFLOP, about 5m00s at max_parallel=2 (model ...), 3.2 GPU-hours`."""
    line = f"remaining compute: {remaining['tflop']:,.1f} TFLOP"
    if remaining["seconds"]:
        parallel = spec.backend.max_parallel
        line += (f", about {duration(remaining['seconds'] / max(1, parallel))} at max_parallel={parallel} "
                 f"({'; '.join(sorted(bases))})")
        if on_gpu:
            line += f", {remaining['gpu_h']:,.1f} GPU-hours"
    if remaining["unknown"]:
        line += (f"; {remaining['unknown']:.0f} trial(s) without a time estimate (no finished trial in the store "
                 "yet, and no GPU named: backend.options.device or the cluster profile's device)"
                 if on_gpu else " (no finished trial in the store yet to estimate time from)")
    return line


def status_view(spec: SweepSpec, trials: list[TrialPlan], paths: ProjectPaths, output_dir: Path,
                cells: list[CellSummary] | None = None) -> Group:
    """Counts, who runs the sweep, a tuned sweep's search per cell, and one row per trial."""
    ledger = Ledger.for_sweep(output_dir)
    holder = SweepLock.holder(output_dir)
    counts = dict.fromkeys(STATUS_STATES, 0)
    rows = []
    for trial in trials:
        record = ledger.get(trial.trial_id)
        if record is None:
            state = "done" if paths.trial(trial.trial_id).is_done() else "planned"
            rows.append((trial.label, trial.trial_id, state, "", "", "not started by this sweep"
                         if state == "planned" else "in the shared store"))
        else:
            state = record.state
            rows.append((trial.label, trial.trial_id, state, str(record.attempts), duration(record.wall_time_s),
                         _detail(record)))
        counts[state] = counts.get(state, 0) + 1
    who = f"orchestrator pid {holder.get('pid')} running" if holder else "no orchestrator running"
    headline = f"[bold]{escape(spec.name)}[/]: " + " · ".join(
        styled(f"{state} {n}") if n else f"{state} {n}" for state, n in counts.items()) + f"  ({who})"
    planned_ids = {t.trial_id for t in trials}
    gone = [r for r in ledger if r.trial_id not in planned_ids]
    table = Table(caption=f"+{len(gone)} trial(s) in the ledger that the spec no longer asks for "
                  "(changed spec or trainer code)" if gone else None)
    for column in ("trial", "id", "state", "attempts", "time", "detail"):
        table.add_column(column)
    for label, trial_id, state, attempts, wall, detail in rows:
        table.add_row(escape(label), trial_id, styled(state), attempts, wall, escape(detail))
    if cells is None:
        return Group(Text.from_markup(headline), table)
    return Group(Text.from_markup(headline), search_table(spec, cells), table)


def search_table(spec: SweepSpec, cells: list[CellSummary]) -> Table:
    """Per cell: how far its search got and what it chose so far."""
    search = spec.search
    assert search is not None
    table = Table(title=f"search: {search.sampler}, {search.budget()} trials per cell, best {search.metric}",
                  title_justify="left")
    for column in ("cell", "trials", "complete", "pruned", "failed", "running", "best", "chosen"):
        table.add_column(column)
    for cell in cells:
        chosen = " ".join(f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in (cell.best_params or {}).items())
        state = "done" if cell.finished else "searching"
        table.add_row(escape(" ".join(f"{a}={v}" for a, v in cell.cell.items())), f"{cell.trials}/{cell.budget}",
                      str(cell.complete), str(cell.pruned), str(cell.failed), str(cell.running),
                      "" if cell.best_value is None else f"{cell.best_value:.4f}", escape(f"{chosen} ({state})"))
    return table


def _detail(record: TrialRecord) -> str:
    if record.state == "failed":
        return f"{record.failure_class}: {record.error or ''}".strip()
    if record.state == "running" and record.job:
        return f"job {record.job.get('job_id')} · {record.log_path}"
    if record.reused:
        return "reused from the shared store"
    return record.note or (f"last: {record.failure_class}" if record.failure_class else "")


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state.split()[0], 'white')}]{state}[/]"


def duration(seconds: float | None) -> str:
    """`42s`, `3m07s`, `2h05m`; '' for None."""
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
