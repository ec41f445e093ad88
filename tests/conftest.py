"""Shared fixtures: an isolated project root, a stand-in trainer, a migrated MLflow store, spec writers.

The stand-in trainer is a test double of the `python -m trainer` SUBPROCESS, for backend and runner
mechanics only (exit codes, result.json, signals, timing). End-to-end tests run the real trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

# Behaviour comes from a JSON file ($STAND_IN_BEHAVIOR): {substring of the trial's `name`: {...}}.
#   sleep: seconds of "training" (until: a file that ends it early);  fail: nan|oom|error (result.json failed) | crash (exit 3, no result)
#   | signal (SIGKILL itself) | exit0 (exit 0, no result);  fail_times: fail only the first N attempts;
#   grandchild: spawn a sleeping grandchild in the same process group (for group-kill tests);
#   search: {points, step_s}: a learning curve in progress.jsonl (one point per step_s) whose
#   val/linear_top1_cls peaks at lr = 1e-3 (1 - |log10(lr) + 3| / 4) and whose test
#   linear_top1_cls is 1 - that, so a report that selects on the test split picks the wrong lr;
#   lr above `fail_above` fails with `nan`.
# Every start/end is appended to $STAND_IN_EVENTS as JSON lines (concurrency and launch counts).
STAND_IN_TRAINER = r'''
import json, os, signal, subprocess, sys, time
from pathlib import Path
import yaml

args = sys.argv[1:]
config_path = Path(args[args.index("--config") + 1])
out = Path(args[args.index("--out") + 1])
cfg = yaml.safe_load(config_path.read_text()) or {}
name = str(cfg.get("name", ""))
behavior = {}
table = os.environ.get("STAND_IN_BEHAVIOR")
if table and Path(table).exists():
    for key, value in json.loads(Path(table).read_text()).items():
        if key in name:
            behavior.update(value)
out.mkdir(parents=True, exist_ok=True)
attempt_file = out / "stand_in_attempts"
attempt = int(attempt_file.read_text()) + 1 if attempt_file.exists() else 1
attempt_file.write_text(str(attempt))

def event(kind, **extra):
    path = os.environ.get("STAND_IN_EVENTS")
    if path:
        line = json.dumps({"event": kind, "name": name, "out": str(out), "pid": os.getpid(), "t": time.time(),
                           "attempt": attempt, **extra}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, line.encode())
        os.close(fd)

def on_term(signum, frame):
    (out / "got_sigterm").write_text(str(attempt))
    event("sigterm")
    sys.exit(75)  # like the trainer: stopped at a checkpoint, run again to resume

signal.signal(signal.SIGTERM, on_term)
event("start", threads=os.environ.get("OMP_NUM_THREADS"))
print(f"stand-in trainer for {name} attempt {attempt}", flush=True)
if behavior.get("grandchild"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    (out / "grandchild.pid").write_text(str(child.pid))
if behavior.get("ignore_sigterm"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
deadline = time.time() + float(behavior.get("sleep", 0))
release = behavior.get("until")  # a file whose creation ends the "training" early
while time.time() < deadline and not (release and os.path.exists(release)):
    time.sleep(0.02)
def write_result(result):
    tmp = out / ".result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out / "result.json")

curve = behavior.get("search")
quality = None
if curve:
    import math
    lr = float(cfg["optimizer"]["lr"])
    quality = max(0.0, 1 - abs(math.log10(lr) + 3) / 4)
    if lr > float(curve.get("fail_above", "inf")):  # diverges, as a too-large lr does
        write_result({"status": "failed", "failure_class": "nan", "error": f"loss became nan (lr {lr})"})
        sys.exit(1)
    done_points = len((out / "progress.jsonl").read_text().splitlines()) if (out / "progress.jsonl").exists() else 0
    for point in range(done_points + 1, int(curve["points"]) + 1):
        time.sleep(float(curve["step_s"]))
        with open(out / "progress.jsonl", "a") as f:
            f.write(json.dumps({"step": 10 * point,
                                "metrics": {"val/linear_top1_cls": quality * point / curve["points"]}}) + "\n")

failing = attempt <= int(behavior.get("fail_times", 10**9))
fail = behavior.get("fail") if failing else None
event("end", fail=fail)
if fail in ("nan", "oom", "error"):
    write_result({"status": "failed", "failure_class": fail, "error": f"stand-in {fail}", "metrics": {}})
    sys.exit(1)
if fail == "crash":
    print("Traceback: stand-in crash", flush=True)
    sys.exit(3)
if fail == "signal":
    os.kill(os.getpid(), signal.SIGKILL)
if fail == "exit0":
    sys.exit(0)
for step in range(1, int(behavior.get("curve", 0)) + 1):  # training-curve points, as the trainer keeps them
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "timestamp": 1000 * step, "metrics": {"train/loss": 1.0 / step}}) + "\n")
metrics = {"linear_top1_cls": 0.5 + 0.01 * attempt, "knn_top1": 0.4, "tokens/cos@post": 0.1}
if quality is not None:
    metrics.update({"val/linear_top1_cls": quality, "linear_top1_cls": 1 - quality})
write_result({"status": "done", "failure_class": None, "error": None,
              "metrics": metrics,
              "params": {"params_total": 1000, "params_added": 10}, "flops": 123, "throughput_img_s": 9.5,
              "wall_time_s": 0.1, "peak_memory_mb": 1.0, "mlflow_run_id": None, "steps": 3,
              "threads": os.environ.get("OMP_NUM_THREADS")})
sys.exit(0)
'''

# A trial config small enough for the real trainer to finish in seconds on one CPU core.
MICRO_BASE: dict[str, Any] = {
    "framework": "supervised",
    "model": {"scale": "micro"},
    "data": {"dataset": "scenes", "scenes": {"num_classes": 4, "train_size": 128, "val_size": 64}},
    "schedule": {"steps": 20, "batch_size": 16, "warmup_steps": 2, "checkpoint_every": 4, "log_every": 4},
    "evaluation": {"probe_epochs": 3, "max_train_samples": 64, "max_val_samples": 32, "knn_k": 5},
    "runtime": {"device": "cpu", "threads": 1, "compile": "off"},
}


@pytest.fixture
def project_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project root (trial store, MLflow store, reports) for this test and its subprocesses."""
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.setenv("CLS_ABLATION_ROOT", str(root))
    return root


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StandIn:
    return StandIn(tmp_path / "stand_in", monkeypatch)


class StandIn:
    """The stand-in trainer: its command, its behaviour table, and what it recorded."""

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.script = folder / "stand_in_trainer.py"
        self.script.write_text(STAND_IN_TRAINER)
        self.behavior_file = folder / "behavior.json"
        self.events_file = folder / "events.jsonl"
        self.behavior_file.write_text("{}")
        monkeypatch.setenv("STAND_IN_BEHAVIOR", str(self.behavior_file))
        monkeypatch.setenv("STAND_IN_EVENTS", str(self.events_file))
        # Subprocess orchestrators (CLI tests) pick the stand-in up through the backend's hook.
        monkeypatch.setenv("ORCHESTRATOR_TRAINER_COMMAND", f"{PYTHON} {self.script}")

    @property
    def command(self) -> list[str]:
        return [PYTHON, str(self.script)]

    def behave(self, **by_name: dict[str, Any]) -> None:
        """behave(**{"seed=1": {"fail": "nan"}}): keys are substrings of the trial's name."""
        self.behavior_file.write_text(json.dumps(by_name))

    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        if not self.events_file.exists():
            return []
        rows = [json.loads(line) for line in self.events_file.read_text().splitlines() if line.strip()]
        return [r for r in rows if kind is None or r["event"] == kind]

    def max_concurrency(self) -> int:
        """Most stand-in trainers alive at once, from their start/end events (by pid)."""
        timeline = sorted((e["t"], 1 if e["event"] == "start" else -1) for e in self.events()
                          if e["event"] in ("start", "end", "sigterm"))
        running = peak = 0
        for _, delta in timeline:
            running += delta
            peak = max(peak, running)
        return peak


def make_trial(name: str, seed: int = 0, **config: Any):
    """A hand-built TrialPlan for runner/backend tests (the stand-in reads `name`)."""
    from orchestrator.spec import TrialPlan

    trial_id = hashlib.sha256(f"{name}/{seed}".encode()).hexdigest()[:16]
    return TrialPlan(trial_id=trial_id, cell={"case": name}, seed=seed,
                     config={"name": name, "seed": seed, **config})


@pytest.fixture(scope="session")
def _mlflow_template(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite store, copied per test. Migrating takes ~10 s, so the store
    is kept in pytest's cache between sessions, keyed by the MLflow and SQLAlchemy versions."""
    import mlflow
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    key = f"mlflow_template_{mlflow.__version__}_{sqlalchemy.__version__}".replace(".", "_")
    try:
        folder = request.config.cache.mkdir(key)
    except Exception:  # no cache (-p no:cacheprovider)
        folder = tmp_path_factory.mktemp(key)
    path = folder / "mlflow.db"
    if not path.exists():
        building = folder / f"building.{os.getpid()}.db"
        MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
        os.replace(building, path)
    return path


@pytest.fixture
def mlflow_db(_mlflow_template: Path, project_root: Path) -> Path:
    """The project's default MLflow store (<root>/mlflow.db), already migrated."""
    target = project_root / "mlflow.db"
    shutil.copy(_mlflow_template, target)
    return target


def write_spec(folder: Path, name: str, *, base: dict[str, Any] | None = None, axes: dict[str, Any] | None = None,
               seeds: list[int] | None = None, backend: dict[str, Any] | None = None,
               tracking: dict[str, Any] | None = None, **extra: Any) -> Path:
    """A sweep spec YAML in `folder` (default axes: one `case` axis on model.specialization)."""
    spec = {
        "name": name,
        "base": base if base is not None else MICRO_BASE,
        "axes": axes or {"specialization": {"key": "model.specialization", "values": {"none": "none", "paper": "paper"}}},
        "seeds": seeds or [0],
        "backend": {"kind": "local", "max_parallel": 2, "retries": 1, **(backend or {})},
        **({"tracking": tracking} if tracking else {}),
        **extra,
    }
    path = folder / f"{name}.yaml"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def read_ledger(root: Path, sweep: str) -> dict[str, Any]:
    path = root / "runs" / sweep / "ledger.json"
    return json.loads(path.read_text()) if path.exists() else {"trials": {}, "meta": {}}


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orchestrator_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("PYTEST_CURRENT_TEST", None)  # MLflow turns on test-only checks when it sees this
    return env


@pytest.fixture
def cli_env(project_root: Path) -> Iterator[dict[str, str]]:
    yield orchestrator_env(CLS_ABLATION_ROOT=str(project_root))


def submit(backend, trial, root: Path):
    """Submit `trial` with its config written to root/<trial_id>/config.yaml, as the runner does."""
    from orchestrator.store import TrialDir

    trial_dir = TrialDir(root / trial.trial_id)
    trial_dir.write_config(trial.config)
    return backend.submit(trial, trial_dir)


def wait_finished(backend, handles, timeout: float = 30.0, interval: float = 0.05) -> dict:
    """Poll (batched, as the runner does) until every handle's job has finished; their states."""
    states, pending = {}, {h.trial_id: h for h in handles}

    def poll():
        for tid, state in backend.poll(list(pending.values())).items():
            if state.finished:
                states[tid] = state
                pending.pop(tid)
        return not pending

    wait_for(poll, timeout=timeout, interval=interval, what="jobs to finish")
    return states
