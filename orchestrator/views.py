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
from orchestrator.plan import PlanDiff, estimate_train_flops
from orchestrator.search.study import CellSummary
from orchestrator.spec import SweepSpec, TrialPlan, format_value
from orchestrator.store import ProjectPaths

STATE_STYLE = {"done": "green", "running": "cyan", "failed": "red", "cancelled": "yellow", "pruned": "magenta",
               "planned": "white", "new": "bold", "gone": "dim"}
STATUS_STATES = ("done", "running", "planned", "failed", "cancelled", "pruned")


def plan_view(spec: SweepSpec, trials: list[TrialPlan], diff: PlanDiff, ledger: Ledger, paths: ProjectPaths,
              seconds_per_tflop: float | None, basis: str) -> Group:
    """Every trial: new / kept / gone against the ledger, its state, training TFLOP and time; then the total."""
    table = Table(title=f"{spec.name}: {len(trials)} trials ({diff.summary()} vs the ledger)", title_justify="left")
    for column in ("trial", "id", "change", "state", "train TFLOP", "est. time"):
        table.add_column(column, justify="right" if column in ("train TFLOP", "est. time") else "left")
    total_tflop = 0.0
    for change, group in (("new", diff.new), ("kept", diff.kept)):
        for trial in group:
            record = ledger.get(trial.trial_id)
            if record is not None:
                state = record.state
            else:
                state = "done (store)" if paths.trial(trial.trial_id).is_done() else "new"
            tflop = estimate_train_flops(trial.config) / 1e12
            total_tflop += tflop if not state.startswith("done") else 0.0
            eta = duration(tflop * seconds_per_tflop) if seconds_per_tflop else "?"
            table.add_row(escape(trial.label), trial.trial_id, change, styled(state), f"{tflop:,.2f}", eta)
    for trial_id in diff.gone:
        record = ledger.get(trial_id)
        table.add_row(escape(record.label if record else ""), trial_id, "gone", styled(record.state if record else "?"),
                      "", "")
    remaining = f"remaining compute: {total_tflop:,.1f} TFLOP"
    if seconds_per_tflop:
        parallel = spec.backend.max_parallel
        remaining += (f", about {duration(total_tflop * seconds_per_tflop / max(1, parallel))} "
                      f"at max_parallel={parallel} ({basis})")
    else:
        remaining += " (no finished trial in the store yet to estimate time from)"
    lines: list[Table | Text] = [table, Text(remaining)]
    if spec.search is not None:
        cells = len({tuple(t.cell.values()) for t in trials})
        lines.append(Text(f"search: up to {spec.search.budget()} {spec.search.sampler} trials in each of {cells} cells "
                          f"(shown: the runs made so far and each cell's final trials), then {len(spec.seeds)} seed(s) "
                          "at the chosen settings"))
    return Group(*lines)


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
