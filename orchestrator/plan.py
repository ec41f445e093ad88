"""What a sweep asks for, computed in one place: its trials (plain, or a tuned sweep's searches and
final trials), how they differ from what the ledger holds, and what they cost to train.

Read-only: nothing here writes a file or creates an Optuna study, so `plan`, `status` and the report
can call it while a sweep runs. Torch-free: the cost estimate reads the scale table, not the models.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.search.scheduler import CellTrials, cell_trials, final_trials, open_studies
from orchestrator.search.study import JOURNAL_FILE, CellSummary
from orchestrator.spec import SweepSpec, TrialPlan, expand
from orchestrator.store import ProjectPaths, TrialDir
from trainer.contract import RESOLVED_CONFIG_FILE
from trainer.scales import SCALES

MAX_TRIALS_FOR_RATE = 500  # trial folders read to measure this machine's speed


def sweep_output_dir(spec: SweepSpec, paths: ProjectPaths) -> Path:
    """The sweep's own folder (ledger, lock, Optuna journal): `output_dir`, relative to the root."""
    return paths.resolve(spec.output_dir)


def unique_by_id(trials: Iterable[TrialPlan]) -> list[TrialPlan]:
    """One trial per id, the first of each, in their order."""
    first: dict[str, TrialPlan] = {}
    for trial in trials:
        first.setdefault(trial.trial_id, trial)
    return list(first.values())


# ----------------------------------------------------------------------------------------------
# The trials
# ----------------------------------------------------------------------------------------------
@dataclass
class TunedTrials:
    """A tuned sweep's trials as its studies stand now."""

    final: list[TrialPlan]  # each cell at its chosen settings, every seed (untuned while undecided)
    search: list[TrialPlan] = field(default_factory=list)  # every run the searches made
    cells: list[CellSummary] = field(default_factory=list)  # in the sweep's cell order

    @property
    def trials(self) -> list[TrialPlan]:
        """Everything the sweep asked for so far: the searches' runs, then the final trials."""
        return unique_by_id([*self.search, *self.final])


def tuned_trials(spec: SweepSpec, output_dir: Path, code_version: str,
                 per_cell: CellTrials | None = None) -> TunedTrials:
    """Read the sweep's studies (never creating one) into the trials that stand for each cell."""
    if per_cell is None:
        per_cell = cell_trials(spec, code_version)
    if not (Path(output_dir) / JOURNAL_FILE).exists():
        return TunedTrials(final=final_trials(spec, code_version, {}, per_cell))
    studies = open_studies(spec, Path(output_dir), code_version, per_cell, create=False)
    summaries = {tuple(s.cell_trial.cell.values()): s.summary() for s in studies}
    searched = unique_by_id(trial for study in studies for trial in study.searched_trials())
    cells = [summaries[cell] for cell in per_cell if cell in summaries]
    return TunedTrials(final=final_trials(spec, code_version, summaries, per_cell), search=searched, cells=cells)


def planned_trials(spec: SweepSpec, paths: ProjectPaths, code_version: str) -> list[TrialPlan]:
    """What the sweep asks for: `expand(spec)`; for a tuned sweep, the runs its searches made so
    far plus each cell's final trials (at its chosen settings once its search is over)."""
    if spec.search is None:
        return expand(spec, code_version=code_version)
    return tuned_trials(spec, sweep_output_dir(spec, paths), code_version).trials


# ----------------------------------------------------------------------------------------------
# Against the ledger
# ----------------------------------------------------------------------------------------------
@dataclass
class PlanDiff:
    """Pure set arithmetic on trial ids: the same for a ledger, a folder listing or job records."""

    new: list[TrialPlan] = field(default_factory=list)  # produced by the spec, not on disk yet
    kept: list[TrialPlan] = field(default_factory=list)  # produced by the spec and already on disk
    gone: list[str] = field(default_factory=list)  # ids on disk that the spec no longer produces

    def summary(self) -> str:
        return f"{len(self.new)} new, {len(self.kept)} kept, {len(self.gone)} gone"


def diff_plan(trials: list[TrialPlan], existing_ids: Iterable[str]) -> PlanDiff:
    """Split `trials` (in their order) into new / kept; `gone` keeps the order of `existing_ids`."""
    existing = list(dict.fromkeys(existing_ids))  # dedupe, keep first-seen order
    existing_set = set(existing)
    diff = PlanDiff()
    for trial in trials:
        (diff.kept if trial.trial_id in existing_set else diff.new).append(trial)
    wanted = {trial.trial_id for trial in trials}
    diff.gone = [trial_id for trial_id in existing if trial_id not in wanted]
    return diff


# ----------------------------------------------------------------------------------------------
# Cost
# ----------------------------------------------------------------------------------------------
def estimate_train_flops(config: dict[str, Any]) -> float:
    """Training FLOPs of a trial: steps x images x (forward + backward = 3 x forward) of its ViT.

    Analytic, per block: 24·N·d² (QKV, proj, 4x MLP) + 4·N²·d (attention), N tokens of width d;
    specialization does not change it (each token goes through one set of weights). DINOv2 adds its
    local crops to the student and a forward-only teacher on the two global crops.
    """
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


def seconds_per_tflop(paths: ProjectPaths) -> tuple[float | None, str]:
    """Median wall time per training TFLOP over the finished trials in the store (this machine),
    and where that figure comes from; (None, "") when no finished trial says."""
    rates = []
    folders = sorted(paths.trials_dir.iterdir())[:MAX_TRIALS_FOR_RATE] if paths.trials_dir.is_dir() else []
    for folder in folders:
        trial = TrialDir(folder)
        result = trial.result()
        # The trainer's resolved config: what it really trained (a stand-in or a crash leaves none).
        if not (result and result.done and result.wall_time_s and trial.file(RESOLVED_CONFIG_FILE).is_file()):
            continue
        try:
            flops = estimate_train_flops(trial.read_config() or {})
        except (KeyError, TypeError, ValueError):
            continue
        if flops > 0:  # training plus evaluation time: what a trial occupies a slot for
            seconds = float(result.wall_time_s) + float(result.eval_time_s or 0.0)
            rates.append(seconds / (flops / 1e12))
    if not rates:
        return None, ""
    return statistics.median(rates), f"from {len(rates)} finished trial(s)"
