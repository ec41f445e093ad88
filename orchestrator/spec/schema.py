"""The typed form of a checked spec: axes, the backend settings of each kind, tracking, the report,
and `SweepSpec` itself; and `TrialPlan`, one trial the spec expands into.

Only load_spec builds a SweepSpec: it checks the raw YAML first (validation.py) and attaches the
spec's resolution (the validated base and axis values) that expansion and hashing reuse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import Field

from orchestrator.spec.problems import Frozen, KeyPath
from orchestrator.spec.profiles import DeviceSpec, Profile
from orchestrator.spec.search import SearchSpec, params_label

ExpandMode = Literal["grid", "zip", "one_at_a_time"]
EXPAND_MODES = get_args(ExpandMode)
DEFAULT_METRICS = ["linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse"]
# The report's floors (`report.controls`, built by spec/controls.py): name -> its row's label.
ControlName = Literal["untrained", "pixels"]
CONTROLS: dict[str, str] = {"untrained": "untrained network", "pixels": "raw pixels"}


class Axis(Frozen):
    """One axis: value name -> the dotted keys it sets (one key, or several set together)."""

    name: str
    keys: tuple[str, ...]
    values: dict[str, dict[str, Any]]

    @property
    def value_names(self) -> list[str]:
        return list(self.values)


# ------------------------------------------------------------------------------------------------
# The backend: common settings, then the options of each kind. Only the keys a spec writes are set
# (`model_fields_set`), so a Slurm cluster profile can fill in the rest.


class ResourcesSpec(Frozen):
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: int = Field(0, ge=0, description="all GPUs of one trial, over all its nodes")
    mem_gb: float = Field(4, gt=0)
    time_min: int = Field(60, gt=0, description="wall-clock limit of one attempt")
    nodes: int = Field(1, ge=1, description="nodes per trial (slurm only; the trainer splits the batch)")


class _CommonOptions(Frozen):
    """Options every backend takes."""

    detach: bool = Field(False, description="run the sweep in the background and return at once")
    command: list[str] | str | None = Field(None, description="trainer command; default: python -m trainer")
    env: dict[str, str | int | float | bool] = Field(default_factory=dict, description="extra environment variables")
    grace_s: float = Field(30.0, gt=0, description="seconds between SIGTERM and SIGKILL on cancel")
    device: DeviceSpec = Field(DeviceSpec(), description="the GPU a trial runs on (plan's GPU-hours; over the "
                               "cluster profile's `device`)")


class LocalOptions(_CommonOptions):
    pass


class SlurmOptions(_CommonOptions):
    profile: str | None = Field(None, description="cluster profile YAML, e.g. slurm/profiles/default.yaml")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = Field(None, ge=1, description="max array tasks running at once")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trainer (module load ...)")


class RayOptions(_CommonOptions):
    address: str | None = Field(None, description="ray cluster address; default: start a local one")
    namespace: str | None = Field(None, description="Ray namespace of the trials' detached actors (default cls_ablation)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (no address); default: all cores")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local cluster; default: detected")


class _BackendCommon(Frozen):
    max_parallel: int = Field(1, ge=1)
    retries: int = Field(2, ge=0, le=20, description="extra attempts after a transient failure")
    resources: ResourcesSpec = ResourcesSpec()


class LocalBackendSpec(_BackendCommon):
    kind: Literal["local"] = "local"
    options: LocalOptions = LocalOptions()


class SlurmBackendSpec(_BackendCommon):
    kind: Literal["slurm"] = "slurm"
    options: SlurmOptions = SlurmOptions()
    # Loaded and checked by load_spec: options.profile, else $CLS_SLURM_PROFILE, else `default`.
    profile: Profile


class RayBackendSpec(_BackendCommon):
    kind: Literal["ray"] = "ray"
    options: RayOptions = RayOptions()


BackendSpec = Annotated[LocalBackendSpec | SlurmBackendSpec | RayBackendSpec, Field(discriminator="kind")]
BACKEND_SPECS: dict[str, type[LocalBackendSpec] | type[SlurmBackendSpec] | type[RayBackendSpec]] = {
    "local": LocalBackendSpec, "slurm": SlurmBackendSpec, "ray": RayBackendSpec,
}
BACKEND_KINDS = tuple(BACKEND_SPECS)
BACKEND_OPTIONS: dict[str, type[_CommonOptions]] = {
    kind: model.model_fields["options"].annotation for kind, model in BACKEND_SPECS.items()
}
# What a spec writes under `backend:` (besides an option directly, which counts as under `options`).
BACKEND_KEYS = ("kind", *_BackendCommon.model_fields, "options")


# ------------------------------------------------------------------------------------------------
# Tracking and the report


class TrackingSpec(Frozen):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite:///<project>/mlflow.db")
    experiment: str | None = Field(None, description="default: the sweep name (filled in by load_spec)")


class ReportSpec(Frozen):
    compare: list[str | list[str]] = Field(default_factory=list, description="default: every axis alone")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    baseline: dict[str, str] | None = Field(None, description="default: the top-level baseline")
    output: Path | None = Field(None, description="report path, relative to the project root (default: reports/<name>.md)")
    # Both in a metric's logged units (fractions for accuracies: seg_miou 0.01 is 1 point); keys
    # are metrics of `metrics`.
    target_effects: dict[str, float] = Field(
        default_factory=dict, description="metric -> the smallest paired difference worth finding: `plan` says the "
        "seeds it needs, the report calls an interval inside ±target 'no effect larger than' it")
    paired_sd: dict[str, float] = Field(
        default_factory=dict, description="metric -> a prior SD of the per-seed paired difference, for `plan`'s "
        "power before any trial of the sweep has finished")
    controls: list[ControlName] = Field(
        default_factory=list, description="reference rows every table shows, trials run once per data setup and "
        "shared across sweeps: untrained (the baseline's architecture at its initialization), pixels (the raw "
        "pixel patches as features)")


# ------------------------------------------------------------------------------------------------
# The sweep


@dataclass(frozen=True)
class Resolution:
    """The spec's trials in resolved form, computed once by validation (expansion.resolve)."""

    base_dump: dict[str, Any]  # the validated base, as TrialConfig dumps it
    # per axis: value name -> the leaf settings (path, value) where it differs from the base
    patches: tuple[dict[str, tuple[tuple[KeyPath, Any], ...]], ...]


class SeedRule(Frozen):
    """`seeds_by_cell` entry: the cells matching `cell` (a partial cell) run `seeds`, not the spec's
    `seeds`: the arms whose differences are noisier get the seeds their intervals need."""

    cell: dict[str, str]
    seeds: list[int]


class SweepSpec(Frozen):
    name: str
    description: str = ""
    output_dir: Path
    base: dict[str, Any] = Field(default_factory=dict)  # the partial trial config as written (+ --set)
    axes: list[Axis]
    expand: ExpandMode = "grid"
    baseline: dict[str, str] | None = None
    include: list[dict[str, str]] = Field(default_factory=list)  # complete cells (defaults filled in)
    exclude: list[dict[str, str]] = Field(default_factory=list)  # partial cells
    seeds: list[int] = Field(default_factory=lambda: [0])
    seeds_by_cell: list[SeedRule] = Field(default_factory=list)
    backend: BackendSpec = LocalBackendSpec()
    tracking: TrackingSpec = TrackingSpec()
    report: ReportSpec = ReportSpec()
    search: SearchSpec | None = None  # per-cell hyperparameter search (orchestrator/search)
    source: Path
    overrides: list[str] = Field(default_factory=list)
    # `base` and `axes` resolved by load_spec; a copy with other base or axes needs loading again.
    resolution: Resolution = Field(exclude=True, repr=False)

    @property
    def axis_names(self) -> list[str]:
        return [axis.name for axis in self.axes]

    def axis(self, name: str) -> Axis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(name)

    def seeds_for(self, cell: dict[str, str]) -> list[int]:
        """The seeds `cell` (axis name -> value name) runs: its `seeds_by_cell` rule's, else `seeds`."""
        for rule in self.seeds_by_cell:
            if all(cell.get(axis) == value for axis, value in rule.cell.items()):
                return rule.seeds
        return self.seeds

    @property
    def all_seeds(self) -> list[int]:
        """Every seed some cell runs: `seeds`, then the rules' other seeds, in order."""
        return list(dict.fromkeys([*self.seeds, *(s for rule in self.seeds_by_cell for s in rule.seeds)]))


# The keys a spec file holds at the top level (the rest of SweepSpec is filled in by load_spec).
TOP_LEVEL_KEYS = tuple(k for k in SweepSpec.model_fields if k not in ("source", "overrides", "resolution"))


def cell_text(items: Iterable[tuple[str, str]]) -> str:
    """`specialization=paper scale=micro`: a (partial) cell as (axis, value) pairs, in their order."""
    return " ".join(f"{axis}={value}" for axis, value in items)


def cell_label(cell: dict[str, str], seed: int) -> str:
    """`specialization=paper scale=micro seed=0`: axis order, then the seed."""
    return f"{cell_text(cell.items())} seed={seed}"


@dataclass(frozen=True)
class TrialPlan:
    trial_id: str
    cell: dict[str, str]  # axis name -> value name
    seed: int
    config: dict[str, Any]  # resolved TrialConfig dump with the seed set; `tracking` left default
    # Tuned sweeps: the searched settings (dotted key -> value) this trial runs with; None otherwise.
    params: dict[str, Any] | None = None
    # A control trial (a name of CONTROLS; `cell` is then empty): a floor of the report, never compared.
    control: str | None = None

    @property
    def label(self) -> str:
        if self.control is not None:
            return f"control={self.control} seed={self.seed}"
        label = cell_label(self.cell, self.seed)
        return f"{label} {params_label(self.params)}" if self.params else label

    def __hash__(self) -> int:  # the dict fields are unhashable; the id stands for them
        return hash(self.trial_id)
