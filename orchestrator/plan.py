"""What a sweep asks for, computed in one place: its trials (plain, or a tuned sweep's searches and
final trials), how they differ from what the ledger holds, what they cost (training FLOPs, a
trial's time: fixed + per-TFLOP seconds, fitted on finished trials; on GPUs, GPU-hours), and the
power of its comparisons (the paired SD of each metric, from finished trials or the spec's prior).

Read-only: nothing here writes a file or creates an Optuna study, so `plan`, `status` and the report
can call it while a sweep runs. Torch-free: the cost estimate reads the scale table, not the models.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.identity import canonical_json, code_version
from orchestrator.ledger import Ledger, TrialRecord
from orchestrator.mlflow_store import final_metrics
from orchestrator.search.scheduler import CellTrials, cell_trials, final_trials, open_studies
from orchestrator.search.study import JOURNAL_FILE, CellSummary, journal_storage
from orchestrator.spec import SlurmBackendSpec, SweepSpec, TrialPlan
from orchestrator.spec.controls import control_trials, plain_sweep_trials
from orchestrator.spec.profiles import DEFAULT_UTILISATION, GPU_PEAK_TFLOPS, DeviceSpec
from orchestrator.stats.design import CellKey, cell_key, comparison_differences
from orchestrator.stats.power import MetricPower, metric_power, pooled_paired_sd
from orchestrator.store import ProjectPaths, TrialDir
from trainer.contract import NON_IDENTITY_KEYS, RESOLVED_CONFIG_FILE
from trainer.scales import SCALES

MAX_TRIALS_FOR_RATE = 500  # trial folders read to measure this machine's speed
MIN_SIZE_SPREAD = 1.2  # least squares only when the largest finished trial has 20 % more FLOPs than the smallest
PRIOR_STARTUP_S = 15.0  # process start, imports, data set-up of a micro trial before its first step (2-core machine)
PRIOR_FIXED_GPU_S = 120.0  # start-up and evaluation of a GPU trial before any ran: an allowance, not a measurement


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
    controls: list[TrialPlan] = field(default_factory=list)  # report.controls, searched by no one

    @property
    def trials(self) -> list[TrialPlan]:
        """Everything the sweep asked for so far: the searches' runs, the final trials, the controls."""
        return unique_by_id([*self.search, *self.final, *self.controls])


def tuned_trials(spec: SweepSpec, output_dir: Path, code_version: str,
                 per_cell: CellTrials | None = None) -> TunedTrials:
    """Read the sweep's studies (never creating one) into the trials that stand for each cell."""
    if per_cell is None:
        per_cell = cell_trials(spec, code_version)
    controls = control_trials(spec, code_version)
    if not (Path(output_dir) / JOURNAL_FILE).exists():
        return TunedTrials(final=final_trials(spec, code_version, {}, per_cell), controls=controls)
    studies = open_studies(spec, Path(output_dir), code_version, per_cell, create=False)
    summaries = {tuple(s.cell_trial.cell.values()): s.summary() for s in studies}
    searched = unique_by_id(trial for study in studies for trial in study.searched_trials())
    cells = [summaries[cell] for cell in per_cell if cell in summaries]
    return TunedTrials(final=final_trials(spec, code_version, summaries, per_cell), search=searched, cells=cells,
                       controls=controls)


class JournalError(RuntimeError):
    """A search journal Optuna cannot replay, as one line: the file, what is wrong, the safe fix."""


def check_journal(output_dir: Path) -> None:
    """Replay the sweep's Optuna journal once (when there is one); JournalError when it is garbage."""
    path = Path(output_dir) / JOURNAL_FILE
    if not path.exists():
        return
    try:
        journal_storage(Path(output_dir)).get_all_studies()
    except Exception as err:  # the replay raises whatever the garbage trips over (UnicodeDecodeError, KeyError, ...)
        what = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise JournalError(f"search journal {path}: Optuna cannot replay it ({what}); move it aside (or delete it): "
                           "the next run starts each cell's search afresh, and finished trials stay in the "
                           "trial store") from None


def planned_trials(spec: SweepSpec, paths: ProjectPaths, code_version: str) -> list[TrialPlan]:
    """What the sweep asks for: `expand(spec)`; for a tuned sweep, the runs its searches made so
    far plus each cell's final trials (at its chosen settings once its search is over); then the
    report's controls (spec/controls.py)."""
    if spec.search is None:
        return unique_by_id(plain_sweep_trials(spec, code_version))
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


@dataclass(frozen=True)
class TimeModel:
    """What a trial occupies a slot for: a fixed cost (process start, imports, data, evaluation)
    plus a cost per training TFLOP; `basis` says where the numbers come from."""

    fixed_s: float
    per_tflop_s: float
    basis: str

    def seconds(self, flops: float) -> float:
        return self.fixed_s + self.per_tflop_s * flops / 1e12

    def describe(self) -> str:
        return f"{self.fixed_s:.0f} s + {self.per_tflop_s:.3g} s/TFLOP per trial, {self.basis}"


@dataclass(frozen=True)
class Measured:
    """A finished trial's cost as measured: its slot time, what result.json says of it, its FLOPs."""

    seconds: float
    train_s: float  # result.json: training wall time, summed over resumes
    eval_s: float  # result.json: the final evaluation
    flops: float
    from_ledger: bool  # `seconds` from the ledger's attempts (start-up included); else train + eval
    on_gpu: bool


def measured(trial: TrialDir, record: TrialRecord | None) -> Measured | None:
    """How long a finished trial the trainer resolved took; None when it is not finished (or was
    a stand-in without a resolved config). The ledger's attempts give the whole slot (start-up
    included) when this sweep trained it; result.json alone gives training plus evaluation."""
    result = trial.result()
    if not (result and result.done and result.wall_time_s and trial.file(RESOLVED_CONFIG_FILE).is_file()):
        return None
    try:
        flops = estimate_train_flops(trial.read_config() or {})
    except (KeyError, TypeError, ValueError):
        return None
    train_s, eval_s = float(result.wall_time_s), float(result.eval_time_s or 0.0)
    spans = [h["ended_at"] - h["started_at"] for h in (record.history if record else [])
             if isinstance(h.get("started_at"), (int, float)) and isinstance(h.get("ended_at"), (int, float))]
    from_ledger = record is not None and record.state == "done" and not record.reused and bool(spans)
    return Measured(sum(spans) if from_ledger else train_s + eval_s, train_s, eval_s, flops, from_ledger,
                    on_gpu=(result.device or "cpu") != "cpu")


def fit_time_model(paths: ProjectPaths, ledger: Ledger | None = None, *, on_gpu: bool = False) -> TimeModel | None:
    """Fixed + per-TFLOP seconds of a trial, from the store's finished trials that ran on a GPU
    (on_gpu) or not. Least squares on (TFLOP, seconds) when their sizes differ; else (one size, or
    a fit that noise made negative) each trial's training time per TFLOP, the rest fixed. A trial
    without the ledger's slot time gets the start-up gap the others show (else a prior).
    None when no finished trial says."""
    folders = sorted(paths.trials_dir.iterdir())[:MAX_TRIALS_FOR_RATE] if paths.trials_dir.is_dir() else []
    points = []
    for folder in folders:
        trial = TrialDir(folder)
        cost = measured(trial, ledger.get(trial.trial_id) if ledger else None)
        if cost is not None and cost.flops > 0 and cost.on_gpu == on_gpu:
            points.append(cost)
    if not points:
        return None
    gaps = [m.seconds - m.train_s - m.eval_s for m in points if m.from_ledger]
    startup = max(0.0, statistics.median(gaps)) if gaps else PRIOR_STARTUP_S
    xs = [m.flops / 1e12 for m in points]
    ys = [m.seconds + (0.0 if m.from_ledger else startup) for m in points]
    basis = f"fitted on {len(points)} finished trial(s)"
    if len(points) >= 2 and max(xs) > MIN_SIZE_SPREAD * min(xs):
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        if slope >= 0 and mean_y - slope * mean_x >= 0:
            return TimeModel(mean_y - slope * mean_x, slope, basis)
    per_tflop = statistics.median(m.train_s / x for m, x in zip(points, xs))
    fixed = statistics.median(y - per_tflop * x for x, y in zip(xs, ys))
    return TimeModel(max(0.0, fixed), per_tflop, basis)


# ----------------------------------------------------------------------------------------------
# GPU time
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """One GPU model as `plan` prices it: peak dense bf16 throughput and the fraction a trial reaches."""

    gpu: str
    peak_tflops: float
    utilisation: float

    def model(self, gpus: int) -> TimeModel:
        """The time model of a trial on `gpus` of these (before any trial ran here)."""
        rate = gpus * self.peak_tflops * self.utilisation
        return TimeModel(PRIOR_FIXED_GPU_S, 1.0 / rate,
                         f"{gpus} x {self.gpu} at {self.utilisation:.0%} of {self.peak_tflops:g} TFLOP/s bf16")


def device_of(spec: SweepSpec) -> Device | None:
    """The GPU of the sweep's trials: `backend.options.device` over the cluster profile's `device`
    over the defaults (spec/profiles.py); None when neither names a GPU or its peak."""
    profile = spec.backend.profile.device if isinstance(spec.backend, SlurmBackendSpec) else DeviceSpec()
    settings = {**profile.model_dump(exclude_none=True), **spec.backend.options.device.model_dump(exclude_none=True)}
    gpu = settings.get("gpu")
    peak = settings.get("peak_tflops") or (GPU_PEAK_TFLOPS[gpu.lower()] if gpu else None)
    if peak is None:
        return None
    return Device(gpu or "GPU", peak, settings.get("utilisation") or DEFAULT_UTILISATION)


def gpus_per_trial(spec: SweepSpec, config: dict[str, Any]) -> int:
    """GPUs one trial holds: the spec's resources, else (Slurm) its profile's for the model scale,
    the rule backends/slurm/resources.py applies (not imported: it brings submitit)."""
    resources = spec.backend.resources
    if isinstance(spec.backend, SlurmBackendSpec) and "gpus_per_trial" not in resources.model_fields_set:
        return int(spec.backend.profile.resources_for(config.get("model", {}).get("scale"))["gpus"])
    return resources.gpus_per_trial


# ----------------------------------------------------------------------------------------------
# Power
# ----------------------------------------------------------------------------------------------
SD_FROM_SWEEP = "finished trials of this sweep"
SD_FROM_EARLIER = "earlier trials of this sweep (other trainer code or settings)"
Runs = dict[tuple[CellKey, int], dict[str, float]]  # (cell, seed) -> a finished trial's final metrics


def compared_trials(spec: SweepSpec, trials: list[TrialPlan], paths: ProjectPaths) -> list[TrialPlan]:
    """The trials the report compares: a plain sweep's cells (its controls are floors, never
    compared); a tuned sweep's final ones (its search runs differ in their settings, so pairing them
    by seed would measure the search)."""
    if spec.search is None:
        return [trial for trial in trials if trial.control is None]
    return tuned_trials(spec, sweep_output_dir(spec, paths), code_version()).final


def finished_metrics(trial: TrialDir) -> dict[str, float] | None:
    """A finished trial's final metrics as the report reads them from result.json; None if not finished."""
    result = trial.result()
    return final_metrics(result) if result is not None and result.done else None


def paired_differences(spec: SweepSpec, runs: Runs, metrics: Sequence[str]) -> dict[str, list[list[float]]]:
    """Per metric, one list per compared (variant, reference) pair: variant - reference at each seed
    both finished with the metric (the report's pairs: orchestrator/stats/design.py)."""
    out: dict[str, list[list[float]]] = {metric: [] for metric in metrics}
    for _, differences in comparison_differences(spec, runs, list(metrics)):
        for metric in metrics:
            out[metric].append(differences[metric])
    return out


def _setting(config: Mapping[str, Any], axis_keys: set[str]) -> str:
    """A trial's config without what the axes set, its seed and its non-identity keys: trials with
    the same setting differ only in their cell and seed, so pairing them by seed is fair."""
    plain = copy.deepcopy({k: v for k, v in config.items() if k not in NON_IDENTITY_KEYS and k != "seed"})
    for key in axis_keys:
        *parents, leaf = key.split(".")
        node: Any = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return canonical_json(plain)


def earlier_runs(spec: SweepSpec, ledger: Ledger, planned_ids: set[str], paths: ProjectPaths) -> list[Runs]:
    """The sweep's finished trials its spec no longer asks for (its ledger's: the same cells under an
    earlier trainer code or other settings), one Runs per setting, the newest trial of each slot."""
    axis_keys = {key for axis in spec.axes for key in axis.keys}
    axis_keys |= {key for axis in spec.axes for patch in axis.values.values() for key in patch}
    by_setting: dict[str, Runs] = {}
    newest: dict[tuple[str, CellKey, int], float] = {}
    for record in ledger:
        if record.trial_id in planned_ids or record.state != "done":
            continue
        trial = paths.trial(record.trial_id)
        metrics, config = finished_metrics(trial), trial.read_config()
        if metrics is None or config is None:
            continue
        setting, slot = _setting(config, axis_keys), (cell_key(record.cell), int(record.seed))
        ended = record.ended_at if record.ended_at is not None else -math.inf
        if newest.get((setting, *slot), -math.inf) <= ended:
            newest[(setting, *slot)] = ended
            by_setting.setdefault(setting, {})[slot] = metrics
    return list(by_setting.values())


def finished_runs(trials: list[TrialPlan], paths: ProjectPaths) -> Runs:
    """(cell, seed) -> final metrics of the finished trials among `trials`."""
    runs: Runs = {}
    for trial in trials:
        values = finished_metrics(paths.trial(trial.trial_id))
        if values is not None:
            runs[(cell_key(trial.cell), trial.seed)] = values
    return runs


def power_plan(spec: SweepSpec, trials: list[TrialPlan], ledger: Ledger, paths: ProjectPaths,
               metrics: Sequence[str], own: Runs | None = None) -> list[MetricPower]:
    """Each metric's power at the spec's seed count, with the paired SD (pooled over the report's
    comparisons) from the first source that has one: the finished trials among `trials` (the ones
    the report compares; `own` when the caller has read them), else this sweep's earlier trials in
    the ledger, else report.paired_sd."""
    seeds = len(spec.seeds)
    own_differences = paired_differences(spec, finished_runs(trials, paths) if own is None else own, metrics)
    earlier: list[dict[str, list[list[float]]]] | None = None  # read only when some metric needs it
    out = []
    for metric in metrics:
        target = spec.report.target_effects.get(metric)
        pooled = pooled_paired_sd(own_differences[metric])
        source = SD_FROM_SWEEP
        if pooled is None:
            if earlier is None:
                planned = {trial.trial_id for trial in trials}
                earlier = [paired_differences(spec, runs, metrics) for runs in earlier_runs(spec, ledger, planned, paths)]
            pooled = pooled_paired_sd(diffs for setting in earlier for diffs in setting[metric])
            source = SD_FROM_EARLIER
        said = f"{source}: {pooled.pairs} comparison(s), {pooled.dof} degree(s) of freedom" if pooled else ""
        out.append(metric_power(metric, seeds, pooled, said, spec.report.paired_sd.get(metric), target))
    return out
