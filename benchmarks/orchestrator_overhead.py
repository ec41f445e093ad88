"""Orchestration overhead: N trivial trials through the local backend vs through Ray Tune, in one run.

A trivial trial is a subprocess that only writes result.json, so the wall time is pure scheduling:
process launch, polling, ledger writes (ours) vs actor scheduling and result plumbing (Ray's).
Both run at most `--parallel` trials at once. Ray's start-up (`ray.init`) is timed separately and
left out of `ray_s`; ours has no start-up beyond the process itself. The last line printed is JSON.

    python benchmarks/orchestrator_overhead.py --trials 16 --parallel 2
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRIVIAL_TRAINER = r'''
import json, os, sys
args = sys.argv[1:]
out = args[args.index("--out") + 1]
os.makedirs(out, exist_ok=True)
tmp = os.path.join(out, ".result.json.tmp")
with open(tmp, "w") as f:
    json.dump({"status": "done", "failure_class": None, "error": None, "metrics": {"score": 1.0}}, f)
os.replace(tmp, os.path.join(out, "result.json"))
'''


def time_local(script: Path, n: int, parallel: int, workdir: Path) -> float:
    """The orchestrator's own loop (ledger, claims, backend) with the stand-in trainer, no MLflow."""
    from rich.console import Console

    from orchestrator.backends.local import LocalBackend
    from orchestrator.ledger import Ledger
    from orchestrator.progress import SweepProgress
    from orchestrator.store import ProjectPaths
    from orchestrator.runner import SweepRunner
    from orchestrator.spec import LocalBackendSpec, LocalOptions, TrialPlan

    paths = ProjectPaths(workdir / "local")
    trials = [TrialPlan(trial_id=f"bench{i:04d}", cell={"i": str(i)}, seed=0, config={"name": f"bench/{i}"})
              for i in range(n)]
    backend = LocalBackend(LocalBackendSpec(max_parallel=parallel, options=LocalOptions(command=[sys.executable, str(script)])))
    runner = SweepRunner(sweep="overhead", trials=trials, ledger=Ledger.for_sweep(paths.root / "sweep"),
                         backend=backend, paths=paths, progress=SweepProgress("overhead", Console(file=io.StringIO())))
    start = time.perf_counter()
    outcome = runner.run()
    elapsed = time.perf_counter() - start
    assert outcome.counts["done"] == n, outcome.counts
    return elapsed


def time_ray(script: Path, n: int, parallel: int, workdir: Path) -> tuple[float, float]:
    """The same subprocesses as Ray Tune function trainables; returns (init seconds, fit seconds)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    import ray
    from ray import tune

    runs = workdir / "ray_trials"

    def trainable(config: dict) -> None:
        out = runs / f"bench{config['i']:04d}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(f"name: bench/{config['i']}\n")
        subprocess.run([sys.executable, str(script), "--config", str(out / "config.yaml"), "--out", str(out)],
                       check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        tune.report(json.loads((out / "result.json").read_text())["metrics"])

    start = time.perf_counter()
    ray.init(num_cpus=parallel, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    init_s = time.perf_counter() - start
    try:
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 1}),
            param_space={"i": tune.grid_search(list(range(n)))},
            tune_config=tune.TuneConfig(max_concurrent_trials=parallel),
            run_config=tune.RunConfig(storage_path=str(workdir / "ray_results"), name="overhead", verbose=0),
        )
        start = time.perf_counter()
        results = tuner.fit()
        fit_s = time.perf_counter() - start
        assert len(results) == n and not results.errors, results.errors
    finally:
        ray.shutdown()
    return init_s, fit_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="orchestrator_overhead_") as tmp:
        workdir = Path(tmp)
        script = workdir / "trivial_trainer.py"
        script.write_text(TRIVIAL_TRAINER)
        local_s = time_local(script, args.trials, args.parallel, workdir)
        ray_init_s, ray_s = time_ray(script, args.trials, args.parallel, workdir)

    rows = [("orchestrator local backend", local_s), ("ray tune (fit)", ray_s), ("ray init (not in ray_s)", ray_init_s)]
    print(f"\n{args.trials} trivial trials, {args.parallel} at a time")
    print(f"{'':<28} {'total s':>9} {'s / trial':>10}")
    for name, seconds in rows:
        print(f"{name:<28} {seconds:>9.2f} {seconds / args.trials:>10.3f}")
    print(json.dumps({"n_trials": args.trials, "parallel": args.parallel, "local_s": round(local_s, 3),
                      "ray_s": round(ray_s, 3), "ray_init_s": round(ray_init_s, 3),
                      "ratio": round(local_s / ray_s, 3)}))


if __name__ == "__main__":
    main()
