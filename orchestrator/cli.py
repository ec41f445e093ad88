"""`python -m orchestrator COMMAND SPEC`: run, plan, watch, report, cancel and sync ablation sweeps.

Every command reads a sweep spec (YAML, see sweeps/) and accepts `--set key=value` overrides of it.
A spec with errors prints every problem and exits 2 before anything is launched or written.

Exit codes: 0 ok, 1 trials failed / command failed, 2 invalid spec or usage, 3 sweep already
running, 4 a corrupt state file (ledger, MLflow store, search journal: one line names the file and
the safe fix), 130 interrupted (run again to resume).
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape

from orchestrator.backends import BackendError
from orchestrator.commands import build_sweep_report, cancel_sweep, run_sweep, sync_sweep
from orchestrator.identity import code_version
from orchestrator.ledger import Ledger, LedgerError
from orchestrator.locks import SweepAlreadyRunning, SweepLock
from orchestrator.mlflow_store import sqlite_path, tracking_target
from orchestrator.plan import JournalError, check_journal, diff_plan, planned_trials, sweep_output_dir, tuned_trials
from orchestrator.spec import SpecError, SweepSpec, check_trial_files, load_spec
from orchestrator.store import ProjectPaths
from orchestrator.views import plan_view, status_view

EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_BUSY, EXIT_STATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

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
    spec: SweepSpec | None = None
    try:
        spec = load_spec(args.spec, args.overrides)
        if args.command == "run":  # the files trials will read must exist (plan/status/report work without them)
            check_trial_files(spec)
        paths = ProjectPaths.discover(args.root)
        if spec.search is not None:
            check_journal(sweep_output_dir(spec, paths))
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
    except (LedgerError, JournalError) as err:  # corrupt state: one line with the file and the fix
        errors.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        return EXIT_STATE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as err:
        broken = corrupt_store_message(err, spec, ProjectPaths.discover(args.root))
        if broken is None:
            raise
        errors.print(f"[red]error:[/] {escape(broken)}", soft_wrap=True)
        return EXIT_STATE


def corrupt_store_message(err: BaseException, spec: SweepSpec | None, paths: ProjectPaths) -> str | None:
    """One line for a SQLite MLflow store that is not a database (truncated, garbage), however deep
    MLflow and SQLAlchemy wrapped the error; None for any other error."""
    chain: BaseException | None = err
    while chain is not None and type(chain) is not sqlite3.DatabaseError:  # its subclasses: locked, schema, ...
        chain = chain.__cause__ or chain.__context__
    if chain is None or spec is None:
        return None
    store = sqlite_path(tracking_target(spec, paths)[0])
    return (f"MLflow store {store or 'of this sweep'}: {chain} (truncated or overwritten?); move it aside (or delete "
            "it): the next run, or `sync`, logs every finished trial to a new one from the trial store")


def _console() -> Console:
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=160)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------
def _run(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    detach = args.detach or (spec.backend.options.detach and not args.foreground)
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
        console.print("[yellow]stopped; run the same command again to resume[/]")
        return EXIT_INTERRUPTED
    if outcome.failed:
        console.print(f"[red]{len(outcome.failed)} trial(s) failed[/]; see `python -m orchestrator status {args.spec}`")
        return EXIT_FAILED
    return EXIT_OK


def _plan(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    trials = planned_trials(spec, paths, code_version())
    ledger = Ledger.for_sweep(sweep_output_dir(spec, paths))
    diff = diff_plan(trials, [r.trial_id for r in ledger])
    console.print(plan_view(spec, trials, diff, ledger, paths))
    return EXIT_OK


def _status(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    output_dir = sweep_output_dir(spec, paths)
    view = _status_source(spec, paths, output_dir)
    if not args.watch:
        console.print(view())
        return EXIT_OK
    try:
        with Live(view(), console=console, refresh_per_second=4) as live:
            while True:
                time.sleep(args.interval)
                live.update(view())
                if SweepLock.holder(output_dir) is None and not Ledger.for_sweep(output_dir).in_state("running"):
                    break
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _status_source(spec: SweepSpec, paths: ProjectPaths, output_dir: Path) -> Callable[[], Group]:
    """What `status` shows, read afresh on each call. A plain sweep's trials are expanded once; a
    tuned sweep's come from its studies, which a running search extends as it goes."""
    version = code_version()
    if spec.search is None:
        trials = planned_trials(spec, paths, version)
        return lambda: status_view(spec, trials, paths, output_dir)

    def tuned_view() -> Group:
        tuned = tuned_trials(spec, output_dir, version)
        return status_view(spec, tuned.trials, paths, output_dir, tuned.cells)

    return tuned_view


def _report(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    output = paths.resolve(args.output) if args.output else None
    console.print(f"report: {build_sweep_report(spec, paths, console, output=output, strict=True)}")
    return EXIT_OK


def _cancel(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    console.print(cancel_sweep(spec, root=paths.root))
    return EXIT_OK


def _sync(args: argparse.Namespace, spec: SweepSpec, paths: ProjectPaths, console: Console) -> int:
    summary = sync_sweep(spec, root=paths.root)
    console.print(f"MLflow sync of {spec.name}: {len(summary.created)} child run(s) created, "
                  f"{len(summary.completed)} completed, {len(summary.unchanged)} already complete, "
                  f"{len(summary.skipped)} not finished")
    return EXIT_OK
