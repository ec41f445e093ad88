"""The tables `plan` and `status` print: the trials a spec asks for against the ledger and the store,
their cost, and how far each cell's search got. Rendering only: what to show comes from plan.py.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.locks import SweepLock
from orchestrator.plan import PlanDiff, device_of, estimate_train_flops, fit_time_model, gpus_per_trial, measured
from orchestrator.search.study import CellSummary
from orchestrator.spec import SweepSpec, TrialPlan, format_value
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
    if spec.search is not None:
        cells = len({tuple(t.cell.values()) for t in trials})
        lines.append(Text(f"search: up to {spec.search.budget()} {spec.search.sampler} trials in each of {cells} cells "
                          f"(shown: the runs made so far and each cell's final trials), then {len(spec.seeds)} seed(s) "
                          "at the chosen settings"))
    return Group(*lines)


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
