"""Slurm cluster profiles (slurm/profiles/*.yaml): their schema, where a profile name points, and
loading them with every problem reported as a spec problem (`FILE: KEY: message`).

A Slurm spec names its profile in `backend.options.profile` (a path, or a shipped name such as
`example_a100`), else `$CLS_SLURM_PROFILE`, else `default`; load_spec loads it, so a missing or
broken profile stops the sweep before anything is submitted.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from orchestrator.spec.problems import Frozen, SpecError
from orchestrator.store import ProjectPaths
from trainer.yaml_guard import safe_load

REPO = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO / "slurm" / "profiles"
DEFAULT_PROFILE = "default"
PROFILE_ENV = "CLS_SLURM_PROFILE"  # the profile when a spec names none
PROFILE_WHERE = "backend.options.profile"  # the spec key that names the profile

# Per trial: cpus and gpus in total (split over its nodes), mem_gb per node; tasks_per_node
# defaults to one task per GPU.
RESOURCE_KEYS = ("cpus", "gpus", "mem_gb", "time_min", "nodes", "tasks_per_node")
# The spec's backend.resources key -> the profile resource it overrides.
PROFILE_RESOURCE_OF = {"cpus_per_trial": "cpus", "gpus_per_trial": "gpus", "mem_gb": "mem_gb",
                       "time_min": "time_min", "nodes": "nodes"}
# What a trial gets where neither the profile nor the spec sizes it: the defaults of the spec's
# ResourcesSpec, in profile keys (tests/test_spec_schema.py holds the two together).
BUILTIN_RESOURCES = {"cpus": 1, "gpus": 0, "mem_gb": 4, "time_min": 60, "nodes": 1}

# Peak dense tensor-core TFLOP/s of one GPU in bf16 (V100: fp16, it has no bf16), from the vendors'
# spec sheets (sparse figures are twice these): NVIDIA A100 datasheet 312; H100 datasheet 989 (SXM)
# / 756 (PCIe); H200 datasheet 989; V100 datasheet 125 (SXM2); L40S datasheet 362; L4 datasheet 121;
# A10 datasheet 125; A40 datasheet 150; AMD Instinct MI250X 383 and MI300X 1307 product pages.
GPU_PEAK_TFLOPS = {"a100": 312.0, "h100": 989.0, "h100_pcie": 756.0, "h200": 989.0, "v100": 125.0, "l40s": 362.0,
                   "l4": 121.0, "a10": 125.0, "a40": 150.0, "mi250x": 383.0, "mi300x": 1307.0}
# The fraction of peak a ViT training step reaches (model FLOPs utilisation): 30-50 % is typical
# for bf16 ViT training with fused attention; the low end, so a plan errs long.
DEFAULT_UTILISATION = 0.35


class DeviceSpec(Frozen):
    """The GPU a trial runs on, for `plan`'s GPU-hours: a spec's `backend.options.device` overrides
    its cluster profile's `device`, field by field."""

    gpu: str | None = Field(None, description=f"one of {', '.join(GPU_PEAK_TFLOPS)} (or give peak_tflops)")
    peak_tflops: float | None = Field(None, gt=0, description="peak dense bf16 TFLOP/s of one GPU (default: the gpu's)")
    utilisation: float | None = Field(None, gt=0, le=1,
                                      description=f"fraction of peak reached (default {DEFAULT_UTILISATION})")

    @model_validator(mode="after")
    def _known_gpu(self) -> DeviceSpec:
        if self.gpu is not None and self.peak_tflops is None and self.gpu.lower() not in GPU_PEAK_TFLOPS:
            raise ValueError(f"unknown gpu {self.gpu!r}; known: {', '.join(GPU_PEAK_TFLOPS)} (or set peak_tflops)")
        return self


@dataclass(frozen=True)
class Profile:
    """A cluster's settings (slurm/profiles/*.yaml): where jobs go and how big each model scale is."""

    name: str = "builtin"
    path: str | None = None
    description: str = ""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    setup: tuple[str, ...] = ()
    array_parallelism: int | None = None
    signal_delay_s: int | None = None  # default: a tenth of the time limit, 30 s to 300 s
    max_num_timeout: int = 20  # requeues after hitting the time limit (preemptions do not count)
    stop_timeout_s: float | None = None  # how long the trainer gets to checkpoint on the signal
    poll_min_s: float = 5.0
    poll_max_s: float = 60.0
    python: str | None = None  # the python that runs submitit in the job (default: this one)
    sbatch: Mapping[str, Any] = field(default_factory=dict)  # extra #SBATCH flags, e.g. {exclusive: true}
    env: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    scales: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    device: DeviceSpec = DeviceSpec()  # the cluster's GPUs, for plan's GPU-hours

    def resources_for(self, scale: str | None) -> dict[str, Any]:
        """Resources (RESOURCE_KEYS) of a trial of model scale `scale`: the scale's, else the defaults."""
        out = dict(BUILTIN_RESOURCES)
        out.update({k: v for k, v in self.defaults.items() if v is not None})
        if scale and scale in self.scales:
            out.update({k: v for k, v in self.scales[scale].items() if v is not None})
        return out


# The keys a profile file may hold (`path` is where it was read from).
PROFILE_KEYS = tuple(f.name for f in fields(Profile) if f.name != "path")


def find_profile(name: str | os.PathLike | None) -> tuple[Path | None, str]:
    """(the file, "") for a profile by path (absolute, or relative to the project root, this
    checkout or the cwd) or by name (`a100` -> slurm/profiles/a100.yaml); (None, why) when none is found."""
    from_env = not name and bool(os.environ.get(PROFILE_ENV))
    name = str(name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    candidates: list[Path] = []
    path = Path(name).expanduser()
    if path.is_absolute():
        candidates.append(path)
    else:
        for base in (ProjectPaths.discover().root, REPO, Path.cwd()):
            candidates.append(base / path)
        if "/" not in name and not name.endswith((".yaml", ".yml")):
            candidates.append(PROFILES_DIR / f"{name}.yaml")
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve(), ""
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    named_by = f"named by ${PROFILE_ENV}; " if from_env else ""
    return None, (f"no cluster profile {name!r} ({named_by}looked at {', '.join(str(c) for c in candidates)}; "
                  f"shipped: {', '.join(known)})")


def read_profile(path: Path) -> tuple[Profile | None, list[str]]:
    """The profile in the file `path`, or None and its problems, each `KEY: message`."""
    try:
        raw = safe_load(path.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:  # YamlGuardError is a ValueError: an alias bomb, a duplicate key
        return None, [f"<file>: cannot read: {err}"]
    if not isinstance(raw, dict):
        return None, ["<top level>: expected a mapping"]
    problems = [f"{key}: unknown key; allowed: {', '.join(sorted(PROFILE_KEYS))}"
                for key in raw if key not in PROFILE_KEYS]
    scales = raw.get("scales") or {}
    if not isinstance(scales, dict):
        problems.append("scales: expected a mapping of model scale -> resources")
        scales = {}
    for where, section in [("defaults", raw.get("defaults") or {})] + [(f"scales.{k}", v) for k, v in scales.items()]:
        if not isinstance(section, dict):
            problems.append(f"{where}: expected a mapping with keys {', '.join(RESOURCE_KEYS)}")
            continue
        for key, value in section.items():
            if key not in RESOURCE_KEYS:
                problems.append(f"{where}.{key}: unknown resource; allowed: {', '.join(RESOURCE_KEYS)}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                problems.append(f"{where}.{key}: expected a number >= 0, got {value!r}")
    try:
        device = DeviceSpec.model_validate(raw.get("device") or {})
    except ValidationError as err:
        problems += [f"device{''.join(f'.{part}' for part in e['loc'])}: {e['msg']}" for e in err.errors()]
    if problems:
        return None, problems
    values = {k: v for k, v in raw.items() if k in PROFILE_KEYS}
    values["device"] = device
    values["setup"] = tuple(values.get("setup") or ())
    values["sbatch"] = dict(values.get("sbatch") or {})
    values["env"] = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    values["defaults"] = dict(values.get("defaults") or {})
    values["scales"] = {str(k): dict(v) for k, v in scales.items()}
    values.setdefault("name", path.stem)
    return Profile(path=str(path), **values), []


def resolve_profile_path(name: str | os.PathLike | None) -> Path:
    """The file of the profile `name` (see find_profile); SpecError when there is none."""
    path, why = find_profile(name)
    if path is None:
        raise SpecError([f"{PROFILE_WHERE}: {why}"])
    return path


def load_profile(name: str | os.PathLike | None = None) -> Profile:
    """The profile `name` (None: $CLS_SLURM_PROFILE, else `default`); SpecError with every problem."""
    path = resolve_profile_path(name)
    profile, problems = read_profile(path)
    if profile is None:
        raise SpecError([f"{path}: {p}" for p in problems])
    return profile
