"""Time to load + validate + expand + diff a 10,000-trial sweep spec (target: < 2 s).

The spec crosses 10 specializations x 10 learning rates x 5 step counts x 5 warmups x 2 register
counts x 2 seeds. Axes that one model validator sees are validated together, once per combination
that occurs: TrialConfig's own validator (evaluation.every_steps needs data.val_fraction) sees
every key, so load validates each of the 5,000 distinct cells once. The spec is resolved once, at
load; expand reuses it. The plan diff runs against a ledger holding half the trials and 1,000 ids
the spec no longer produces. Imports (pydantic and the trial schema; no torch) are timed apart:
they are paid once per process, not per spec. The last line printed is one JSON object.

    .venv/bin/python benchmarks/spec_expansion.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

TARGET_SECONDS = 2.0

SPEC = """
name: expansion_benchmark
base:
  framework: supervised
  model: {scale: micro}
axes:
  specialization:
    key: model.specialization
    values:
      none: none
      norms: norms
      qkv: qkv@first_third
      paper: paper
      norms_qkv: norms,qkv
      paper_proj: paper,proj@first_third
      ls: ls
      paper_mlp: paper,mlp
      all: all
      late_qkv: norms,qkv@last_third
  optimizer.lr: [1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3, 5.0e-3, 7.0e-3, 1.0e-2]
  schedule.steps: [100, 200, 300, 400, 500]
  schedule.warmup_steps: [0, 10, 20, 40, 80]
  model.reg_tokens: [0, 4]
seeds: [0, 1]
backend: {kind: local, max_parallel: 2}
"""


def run_once(path: Path, existing: list[str]) -> dict[str, float | int]:
    from orchestrator.plan import diff_plan
    from orchestrator.spec import expand, load_spec

    t0 = time.perf_counter()
    spec = load_spec(path)
    t1 = time.perf_counter()
    trials = expand(spec, code_version="benchmark")
    t2 = time.perf_counter()
    diff = diff_plan(trials, existing)
    t3 = time.perf_counter()
    return {
        "trials": len(trials), "load": t1 - t0, "expand": t2 - t1, "diff": t3 - t2, "total": t3 - t0,
        "new": len(diff.new), "kept": len(diff.kept), "gone": len(diff.gone),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    start = time.perf_counter()
    from orchestrator.spec import expand, load_spec  # noqa: F401  (pulls in pydantic and trainer.config)

    import_seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expansion_benchmark.yaml"
        path.write_text(SPEC)
        trials = expand(load_spec(path), code_version="benchmark")
        existing = [t.trial_id for t in trials[::2]] + [f"gone{i:012d}" for i in range(1000)]
        runs = [run_once(path, existing) for _ in range(args.repeats)]

    print(f"imports (once per process, not counted): {import_seconds:.2f} s")
    print(f"{'phase':<10}{'median s':>10}{'min s':>10}")
    for phase in ("load", "expand", "diff", "total"):
        values = [r[phase] for r in runs]
        print(f"{phase:<10}{statistics.median(values):>10.3f}{min(values):>10.3f}")
    last = runs[-1]
    print(f"trials {last['trials']}: {last['new']} new, {last['kept']} kept, {last['gone']} gone")
    seconds = statistics.median(r["total"] for r in runs)
    print(json.dumps({
        "trials": last["trials"], "seconds": round(seconds, 3), "target_seconds": TARGET_SECONDS,
        "load_seconds": round(statistics.median(r["load"] for r in runs), 3),
        "expand_seconds": round(statistics.median(r["expand"] for r in runs), 3),
        "diff_seconds": round(statistics.median(r["diff"] for r in runs), 3),
        "import_seconds": round(import_seconds, 2), "repeats": args.repeats,
    }))


if __name__ == "__main__":
    main()
