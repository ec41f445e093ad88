"""Where a project's files live (`ProjectPaths`) and the one door to a trial's folder (`TrialDir`).

The shared trial store is `<root>/runs/trials/<trial_id>/`: a trial's id hashes its resolved
config and the trainer's code (`orchestrator.identity`), so every sweep that asks for the same
trial gets the same folder and reuses its result. What the folder holds is the trainer's contract
(`trainer.contract`); this module is the only orchestrator code that touches those files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from trainer import contract
from trainer.contract import TrialResult

ROOT_ENV = "CLS_ABLATION_ROOT"
SLURM_SUBDIR = "slurm"  # submitit's logs and the per-job attempt records of Slurm runs


@dataclass(frozen=True)
class ProjectPaths:
    """Where shared things live: the trial store, the default MLflow store, reports.

    The root is `$CLS_ABLATION_ROOT` when set (tests, several checkouts sharing one store),
    otherwise the checkout that holds this package.
    """

    root: Path

    @classmethod
    def discover(cls, root: Path | str | None = None) -> ProjectPaths:
        if root is None:
            root = os.environ.get(ROOT_ENV) or Path(__file__).resolve().parents[1]
        return cls(Path(root).resolve())

    @property
    def trials_dir(self) -> Path:
        return self.root / "runs" / "trials"

    def trial(self, trial_id: str) -> TrialDir:
        return TrialDir(self.trials_dir / trial_id)

    def trial_dir(self, trial_id: str) -> Path:
        return self.trials_dir / trial_id

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def default_tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"

    def resolve(self, path: Path | str) -> Path:
        """A spec's relative path (output_dir, report output) is relative to the project root."""
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.root / path


@dataclass(frozen=True)
class TrialDir:
    """One trial's folder: the files the trainer reads and writes, and the backends' pid file."""

    path: Path

    @property
    def trial_id(self) -> str:
        return self.path.name

    # -- paths ------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / contract.CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.path / contract.LOG_FILE

    @property
    def pid_path(self) -> Path:
        return self.path / contract.PID_FILE

    @property
    def result_path(self) -> Path:
        return self.path / contract.RESULT_FILE

    @property
    def slurm_dir(self) -> Path:
        return self.path / SLURM_SUBDIR

    def file(self, name: str) -> Path:
        """Another file of the folder (artifacts such as the token-interaction plot)."""
        return self.path / name

    # -- the trainer's verdict ----------------------------------------------------------------------
    def result(self) -> TrialResult | None:
        return contract.read_result(self.path)

    def is_done(self) -> bool:
        result = self.result()
        return result is not None and result.done

    def archive_result(self, attempt: int) -> None:
        """A failed attempt's result.json would be read as the next attempt's verdict: move it aside."""
        if self.result_path.exists():
            os.replace(self.result_path, self.path / f"result.attempt{attempt}.json")

    def progress(self) -> list[tuple[int, dict[str, float]]]:
        """The trainer's intermediate evaluations as (step, metrics), in file order."""
        points = []
        for record in contract.read_jsonl(self.path / contract.PROGRESS_FILE):
            if isinstance(record, dict) and isinstance(record.get("step"), int) and isinstance(record.get("metrics"), dict):
                points.append((record["step"], record["metrics"]))
        return points

    # -- the config -----------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        contract.write_text_atomic(self.config_path, yaml.safe_dump(_plain(config), sort_keys=False))

    def read_config(self) -> dict[str, Any] | None:
        """The resolved config the trainer wrote, else the one the orchestrator wrote; None if neither reads."""
        for name in (contract.RESOLVED_CONFIG_FILE, contract.CONFIG_FILE):
            try:
                data = yaml.safe_load((self.path / name).read_text())
            except (OSError, ValueError, yaml.YAMLError):
                continue
            if isinstance(data, dict):
                return data
        return None

    # -- who runs it ------------------------------------------------------------------------------------
    def write_pid(self, info: dict[str, Any]) -> None:
        contract.write_json_atomic(self.pid_path, info)

    def read_pid(self) -> dict[str, Any]:
        data = contract.read_json(self.pid_path)
        return data if isinstance(data, dict) else {}

    def last_log_line(self, max_bytes: int = 4096) -> str:
        return last_line(self.log_path, max_bytes)


def tail(path: Path, max_bytes: int = 8192) -> str:
    """The last `max_bytes` of a log file as text ('' when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def last_line(path: Path, max_bytes: int = 4096) -> str:
    """The last non-empty line of a log file ('' when there is none): the usual one-line reason."""
    lines = [line.strip() for line in tail(path, max_bytes).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _plain(value: Any) -> Any:
    """YAML-safe copy: paths and tuples become strings and lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
