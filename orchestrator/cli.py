"""`python -m orchestrator COMMAND SPEC`: run, plan, watch, report, cancel and sync ablation sweeps.

Every command reads a sweep spec (YAML, see sweeps/) and accepts `--set key=value` overrides of it.
A spec with errors prints every problem and exits 2 before anything is launched or written.

Exit codes: 0 ok, 1 trials failed / command failed, 2 invalid spec or usage, 3 sweep already
running, 130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from orchestrator.ledger import Ledger, ProjectPaths, TrialRecord
    from orchestrator.spec import SweepSpec, TrialPlan

EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_BUSY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
STATE_STYLE = {"done": "green", "running": "cyan", "failed": "red", "cancelled": "yellow", "pruned": "magenta", "planned": "white",
               "new": "bold", "gone": "dim"}

COMMANDS = {
    "run": "run or resume every trial of the sweep (re-attaches to running trials, skips finished ones)",
    "plan": "show the trials the spec expands to: new / kept / gone against the ledger, with estimated cost",
    "status": "counts and a table of the sweep's trials from its ledger (--watch refreshes it live)",
    "report": "(re)build the sweep's Markdown report from the finished trials",
    "cancel": "stop a running sweep: its orchestrator stops every trial resumably (or orphaned trials are stopped)",
    "sync": "write to MLflow every finished trial it lacks (runs, params, final metrics), without duplicates",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Commands:\n" + "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
        + "\n\nExample: python -m orchestrator run sweeps/component_ablation.yaml --set seeds=[0]")
    parser.add_argument("--root", type=Path, default=None,
                        help="project root holding runs/trials/ (the shared trial store), mlflow.db and reports/ "
                             "(default: $CLS_ABLATION_ROOT, else this checkout)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=COMMANDS[name], description=COMMANDS[name])
        p.add_argument("spec", type=Path, metavar="SPEC", help="sweep spec YAML, e.g. sweeps/component_ablation.yaml")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec key, e.g. --set base.schedule.steps=50 --set seeds=[0] (repeatable)")
        return p

    run = command("run")
    run.add_argument("--detach", action="store_true",
                     help="run in the background (log: <output_dir>/orchestrator.log); follow with `status --watch`")
    run.add_argument("--max-parallel", type=int, default=None, metavar="N", help="override backend.max_parallel")
    run.add_argument("--retry-failed", action="store_true",
                     help="also retry trials that failed for good (NaN, errors, retries exhausted)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (event lines only)")
    run.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    run.add_argument("--foreground", action="store_true",
                     help="stay in the foreground even if the spec sets backend.options.detach")
    command("plan")
    status = command("status")
    status.add_argument("--watch", action="store_true", help="refresh until the sweep stops (Ctrl-C to quit)")
    status.add_argument("--interval", type=float, default=2.0, metavar="S", help="refresh period for --watch")
    report = command("report")
    report.add_argument("--output", type=Path, default=None, help="report path (default: reports/<sweep>.md)")
    command("cancel")
    command("sync")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = _console()
    errors = Console(stderr=True, highlight=False)
    from orchestrator.backends import BackendError
    from orchestrator.ledger import ProjectPaths, SweepAlreadyRunning
    from orchestrator.spec import SpecError, load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        paths = ProjectPaths.discover(args.root)
        handler = {"run": _run, "plan": _plan, "status": _status, "report": _report, "cancel": _cancel,
                   "sync": _sync}[args.command]
        return handler(args, spec, paths, console)
    except SpecError as err:
        errors.print(f"[red]error:[/] invalid sweep spec ({len(err.errors)} problem(s)); nothing was run", highlight=False)
        for line in err.errors:
            errors.print(f"  - {escape(line)}", highlight=False)
        return EXIT_SPEC
    except SweepAlreadyRunning as err:
        errors.print(f"[red]error:[/] {escape(str(err))}")
        return EXIT_BUSY
    except BackendError as err:  # e.g. an unreachable cluster: a message, not a traceback
        errors.print(f"[red]error:[/] {escape(str(err))}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _console() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.runner import run_sweep

    detach = args.detach or (bool(spec.backend.options.get("detach", False)) and not args.foreground)
    outcome = run_sweep(spec, detach=detach, progress=not args.no_progress, overrides=spec.overrides,
                        max_parallel=args.max_parallel, retry_failed=args.retry_failed, root=paths.root,
                        report=not args.no_report, console=console)
    if outcome.detached_pid:
        console.print(f"sweep {spec.name} runs in the background (pid {outcome.detached_pid}); "
                      f"log: {outcome.log_path}\n  follow it: python -m orchestrator status {args.spec} --watch")
        return EXIT_OK
    counts = " · ".join(f"{state} {n}" for state, n in outcome.counts.items() if n)
    console.print(f"sweep {spec.name}: {counts}")
    if outcome.report_path:
        console.print(f"report: {outcome.report_path}")
    if outcome.interrupted:
        console.print(f"[yellow]stopped; run the same command again to resume[/]")
        return EXIT_INTERRUPTED
    if outcome.failed:
        console.print(f"[red]{len(outcome.failed)} trial(s) failed[/]; see `python -m orchestrator status {args.spec}`")
        return EXIT_FAILED
    return EXIT_OK


def _plan(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.backends import read_result
    from orchestrator.identity import code_version
    from orchestrator.ledger import Ledger
    from orchestrator.plan import diff_plan
    from orchestrator.runner import planned_trials, sweep_output_dir

    trials = planned_trials(spec, paths, code_version())
    ledger = Ledger.for_sweep(sweep_output_dir(spec, paths))
    diff = diff_plan(trials, [r.trial_id for r in ledger])
    seconds_per_tflop, basis = _seconds_per_tflop(paths)
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
                result = read_result(paths.trial_dir(trial.trial_id))
                state = "done (store)" if result and result.get("status") == "done" else "new"
            tflop = estimate_train_flops(trial.config) / 1e12
            total_tflop += tflop if not state.startswith("done") else 0.0
            eta = _duration(tflop * seconds_per_tflop) if seconds_per_tflop else "?"
            table.add_row(escape(trial.label), trial.trial_id, change, _styled(state), f"{tflop:,.2f}", eta)
    for trial_id in diff.gone:
        record = ledger.get(trial_id)
        table.add_row(escape(record.label if record else ""), trial_id, "gone", _styled(record.state if record else "?"),
                      "", "")
    console.print(table)
    remaining = f"remaining compute: {total_tflop:,.1f} TFLOP"
    if seconds_per_tflop:
        remaining += (f", about {_duration(total_tflop * seconds_per_tflop / max(1, spec.backend.max_parallel))} "
                      f"at max_parallel={spec.backend.max_parallel} ({basis})")
    else:
        remaining += " (no finished trial in the store yet to estimate time from)"
    console.print(remaining)
    if spec.search is not None:
        cells = len({tuple(t.cell.values()) for t in trials})
        console.print(f"search: up to {spec.search.budget()} {spec.search.sampler} trials in each of {cells} cells "
                      f"(shown: the runs made so far and each cell's final trials), then {len(spec.seeds)} seed(s) "
                      "at the chosen settings")
    return EXIT_OK


def _status(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.identity import code_version
    from orchestrator.runner import planned_trials

    trials = planned_trials(spec, paths, code_version())
    if not args.watch:
        console.print(_status_view(spec, trials, paths))
        return EXIT_OK
    from rich.live import Live

    from orchestrator.ledger import SweepLock
    from orchestrator.runner import sweep_output_dir

    output_dir = sweep_output_dir(spec, paths)
    try:
        with Live(_status_view(spec, trials, paths), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                live.update(_status_view(spec, trials, paths))
                if SweepLock.holder(output_dir) is None and not _any_running(paths, output_dir):
                    break
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _report(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.runner import build_sweep_report

    try:
        path = build_sweep_report(spec, paths, console, output=paths.resolve(args.output) if args.output else None,
                                  strict=True)
    except ImportError as err:
        Console(stderr=True).print(f"[red]error:[/] no report builder available ({escape(str(err))})")
        return EXIT_FAILED
    console.print(f"report: {path}")
    return EXIT_OK


def _cancel(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.runner import cancel_sweep

    console.print(cancel_sweep(spec, root=paths.root, console=console))
    return EXIT_OK


def _sync(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    from orchestrator.tracking import sync

    summary = sync(spec, root=paths.root)
    console.print(f"MLflow sync of {spec.name}: {len(summary.created)} child run(s) created, "
                  f"{len(summary.completed)} completed, {len(summary.unchanged)} already complete, "
                  f"{len(summary.skipped)} not finished")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------
# Views
# ----------------------------------------------------------------------------------------------
def _status_view(spec: SweepSpec, trials: list[TrialPlan], paths: ProjectPaths) -> Group:
    from orchestrator.backends import read_result
    from orchestrator.ledger import Ledger, SweepLock
    from orchestrator.runner import sweep_output_dir

    output_dir = sweep_output_dir(spec, paths)
    ledger = Ledger.for_sweep(output_dir)
    holder = SweepLock.holder(output_dir)
    counts = {state: 0 for state in ("done", "running", "planned", "failed", "cancelled", "pruned")}
    rows = []
    for trial in trials:
        record = ledger.get(trial.trial_id)
        if record is None:
            result = read_result(paths.trial_dir(trial.trial_id))
            state = "done" if result and result.get("status") == "done" else "planned"
            rows.append((trial.label, trial.trial_id, state, "", "", "not started by this sweep"
                         if state == "planned" else "in the shared store"))
        else:
            state = record.state
            rows.append((trial.label, trial.trial_id, state, str(record.attempts), _duration(record.wall_time_s),
                         _detail(record)))
        counts[state] = counts.get(state, 0) + 1
    who = f"orchestrator pid {holder.get('pid')} running" if holder else "no orchestrator running"
    headline = f"[bold]{escape(spec.name)}[/]: " + " · ".join(
        _styled(f"{state} {n}") if n else f"{state} {n}" for state, n in counts.items()) + f"  ({who})"
    planned_ids = {t.trial_id for t in trials}
    gone = [r for r in ledger if r.trial_id not in planned_ids]
    table = Table(caption=f"+{len(gone)} trial(s) in the ledger that the spec no longer asks for "
                  "(changed spec or trainer code)" if gone else None)
    for column in ("trial", "id", "state", "attempts", "time", "detail"):
        table.add_column(column)
    for label, trial_id, state, attempts, wall, detail in rows:
        table.add_row(escape(label), trial_id, _styled(state), attempts, wall, escape(detail))
    if spec.search is None:
        return Group(Text.from_markup(headline), table)
    return Group(Text.from_markup(headline), _search_table(spec, paths, output_dir), table)


def _search_table(spec: SweepSpec, paths: ProjectPaths, output_dir: Path) -> Table:
    """Per cell: how far its search got and what it chose so far."""
    from orchestrator.identity import code_version
    from orchestrator.search import tuned_plan
    from orchestrator.search.spec import format_value

    search = spec.search
    table = Table(title=f"search: {search.sampler}, {search.budget()} trials per cell, best {search.metric}",
                  title_justify="left")
    for column in ("cell", "trials", "complete", "pruned", "failed", "running", "best", "chosen"):
        table.add_column(column)
    for cell in tuned_plan(spec, output_dir, code_version()).cells:
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


def _any_running(paths: ProjectPaths, output_dir: Path) -> bool:
    from orchestrator.ledger import Ledger

    return bool(Ledger.for_sweep(output_dir).in_state("running"))


def _styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state.split()[0], 'white')}]{state}[/]"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------------------------
# Cost estimates
# ----------------------------------------------------------------------------------------------
def estimate_train_flops(config: dict[str, Any]) -> float:
    """Training FLOPs of a trial: steps x images x (forward + backward = 3 x forward) of its ViT.

    Analytic, per block: 24·N·d² (QKV, proj, 4x MLP) + 4·N²·d (attention), N tokens of width d;
    specialization does not change it (each token goes through one set of weights). DINOv2 adds its
    local crops to the student and a forward-only teacher on the two global crops.
    """
    from trainer.models import SCALES

    model = config.get("model", {})
    arch = SCALES[model.get("scale", "micro")]
    img = model.get("img_size") or arch["img_size"]
    patch = model.get("patch_size") or arch["patch_size"]
    d, depth = arch["embed_dim"], arch["depth"]

    def forward(size: int) -> float:
        tokens = (size // patch) ** 2 + 1 + int(model.get("reg_tokens", 0))
        return depth * (24 * tokens * d * d + 4 * tokens * tokens * d)

    schedule = config.get("schedule", {})
    images = schedule.get("steps", 300) * schedule.get("batch_size", 64)
    if config.get("framework") == "dinov2":
        dino = config.get("dinov2", {})
        local = dino.get("local_crop_size") or max(patch, round(img * 3 / 7 / patch) * patch)
        student = 2 * forward(img) + dino.get("local_crops", 4) * forward(local)
        return images * (3 * student + 2 * forward(img))
    return images * 3 * forward(img)


def _seconds_per_tflop(paths: ProjectPaths) -> tuple[float | None, str]:
    """Median wall time per training TFLOP over the finished trials in the store (this machine)."""
    import yaml

    from orchestrator.backends import read_result

    rates = []
    if paths.trials_dir.is_dir():
        for run_dir in sorted(paths.trials_dir.iterdir())[:500]:
            result = read_result(run_dir)
            config_path = run_dir / "config.resolved.yaml"
            if not (result and result.get("status") == "done" and result.get("wall_time_s") and config_path.is_file()):
                continue
            try:
                flops = estimate_train_flops(yaml.safe_load(config_path.read_text()) or {})
            except (KeyError, TypeError, ValueError, yaml.YAMLError):
                continue
            if flops > 0:  # training plus evaluation time: what a trial occupies a slot for
                seconds = float(result["wall_time_s"]) + float(result.get("eval_time_s") or 0.0)
                rates.append(seconds / (flops / 1e12))
    if not rates:
        return None, ""
    return statistics.median(rates), f"from {len(rates)} finished trial(s)"
