"""What the orchestrator's per-cell search costs per trial: ask -> trial config + id -> tell, through
the sweep's journal file (CellStudy), against the same TPE ask/tell in the same process on Optuna's
in-memory storage (the least any Optuna user pays) and on the same journal file storage (what a
multi-process Optuna user pays). Interleaved repeats; the last line is JSON, ratio vs in-memory.

    python benchmarks/search_overhead.py --trials 100 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from orchestrator.identity import code_version
from orchestrator.search.scheduler import cell_trials, search_seed
from orchestrator.search.study import CellStudy, journal_storage
from orchestrator.spec import TrialPlan, load_spec

SPEC = Path(__file__).resolve().parents[1] / "sweeps" / "component_ablation_tuned.yaml"


def objective(lr: float) -> float:
    return -abs(lr - 2e-3)


def journal_run(cell_trial: TrialPlan, spec, version: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as folder:
        study = CellStudy(journal_storage(Path(folder)), spec.search.model_copy(update={"trials_per_cell": n}),
                          cell_trial, version, every_steps=40, total_steps=160)
        start = time.perf_counter()
        for _ in range(n):
            number, plan = study.ask()
            study.tell(number, "complete", objective(plan.params["optimizer.lr"]))
        return time.perf_counter() - start


def plain_run(spec, n: int, storage=None) -> float:
    """Optuna's own ask/tell, on `storage` (default: in memory)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    param = spec.search.params["optimizer.lr"]
    study = optuna.create_study(direction="maximize", storage=storage, sampler=optuna.samplers.TPESampler(
        seed=0, n_startup_trials=max(1, n // 3), multivariate=True, constant_liar=True))
    distributions = {"optimizer.lr": optuna.distributions.FloatDistribution(param.low, param.high, log=param.log)}
    start = time.perf_counter()
    for _ in range(n):
        trial = study.ask(distributions)
        study.tell(trial, objective(trial.params["optimizer.lr"]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=100, help="asks and tells per study")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    spec = load_spec(SPEC)
    version = code_version()
    cell_trial = next(iter(cell_trials(spec, version).values()))[search_seed(spec)]
    journal, memory, plain_journal = [], [], []
    for _ in range(args.repeats):
        memory.append(plain_run(spec, args.trials))
        with tempfile.TemporaryDirectory() as folder:
            plain_journal.append(plain_run(spec, args.trials, journal_storage(Path(folder))))
        journal.append(journal_run(cell_trial, spec, version, args.trials))
    ratios = [j / m for j, m in zip(journal, memory)]
    ms = lambda seconds: 1000 * statistics.median(seconds) / args.trials  # noqa: E731
    print(f"{'':28}{'ms per trial':>14}")
    print(f"{'optuna in-memory ask/tell':28}{ms(memory):>14.2f}")
    print(f"{'optuna journal ask/tell':28}{ms(plain_journal):>14.2f}")
    print(f"{'orchestrator CellStudy':28}{ms(journal):>14.2f}   (journal file, config + trial id, user attrs)")
    print(json.dumps({"trials": args.trials, "repeats": args.repeats, "ms_per_trial_memory": round(ms(memory), 3),
                      "ms_per_trial_optuna_journal": round(ms(plain_journal), 3),
                      "ms_per_trial_orchestrator": round(ms(journal), 3),
                      "overhead_ratio": round(statistics.median(ratios), 3),
                      "ratio_vs_optuna_journal": round(statistics.median(
                          j / p for j, p in zip(journal, plain_journal)), 3)}))


if __name__ == "__main__":
    main()
