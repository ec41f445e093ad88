"""Trials as Slurm jobs through submitit: job arrays, per-scale resources, preemption-safe requeue.

    backend:
      kind: slurm
      max_parallel: 9                      # trials submitted (queued or running) at once
      resources: {gpus_per_trial: 8, cpus_per_trial: 80, mem_gb: 480, time_min: 2880, nodes: 1}
      options: {profile: slurm/profiles/default.yaml, account: myacct, partition: gpu}

Resources of a trial, first found wins: the spec's `backend.resources` (values that differ from
the schema defaults, i.e. the ones a spec writes), the profile's `scales.<model.scale>`, the
profile's `defaults`. Partition/account/qos/constraint/setup/array_parallelism: the spec's options,
then the profile. `mem_gb` is per node, `cpus` and `gpus` per trial (split over its nodes), one
task per GPU (`tasks_per_node = gpus per node`) with torch.distributed's env:// variables set for
each task's trainer (see `slurm_job.py`).

Submission: the trials of one `submit_many` call that need the same resources go out as one job
array (`--array=0-N%array_parallelism`); a single trial is a plain job. Every file of a trial's job
lives in its own run dir, `DIR/slurm/`: the sbatch script, submitit's pickle, `<job>_<task>_log.out/.err`
and `<job>.json` (where/when it ran, how the trainer exited). Array tasks reach their trial's
folder through `<runs>/slurm/arrays/<uuid>/<index>` symlinks, which is what `%a` in the script's
paths resolves to. The pickled callable holds paths only; the trainer resumes from DIR.

Code snapshot: the `trainer` package (and pyproject.toml) is copied once per code version to
`<runs>/snapshots/<code_version>/` (content-addressed, shared by sweeps) at the first submission of
an orchestrator, and every job runs the trainer with PYTHONPATH pointing there: edits made after
`run` never reach queued or requeued jobs.

Status: one `sacct` for all of a sweep's jobs per query, queried again after `poll_min_s` and,
while nothing changes, after exponentially longer gaps up to `poll_max_s` (profile settings); a
change or a new submission resets the gap. Slurm states map to JobState below (`_state_for`); the
trainer's own result.json always wins once the job has ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from orchestrator.backends import register_backend
from orchestrator.backends.base import (
    CONFIG_FILE,
    ERROR,
    KILLED,
    LOG_FILE,
    LOST,
    OOM,
    PREEMPTED,
    TIMEOUT,
    Backend,
    BackendError,
    JobHandle,
    JobState,
    JobStatus,
    read_result,
    state_from_result,
)
from orchestrator.backends.slurm_job import EXIT_INTERRUPTED, SLURM_SUBDIR, SlurmTrial, attempt_file

if TYPE_CHECKING:
    from orchestrator.spec import TrialPlan

REPO = Path(__file__).resolve().parents[2]
PROFILES_DIR = REPO / "slurm" / "profiles"
DEFAULT_PROFILE = "default"
PROFILE_ENV = "CLS_SLURM_PROFILE"  # the profile when a spec names none
COMMAND_ENV = "ORCHESTRATOR_TRAINER_COMMAND"  # replaces `python -m trainer` (a wrapper, a test double)
JOB_PREFIX = "cls"

# Slurm job states (sacct/squeue), grouped by what the orchestrator does with them.
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
                           "RESIZING", "PREEMPTED"})
RUNNING_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "STOPPED"})
ACTIVE_STATES = QUEUED_STATES | RUNNING_STATES
OOM_LOG_MARKERS = ("exceeded memory limit", "exceeded job memory limit", "out of memory", "oom-kill", "oom_kill")

_RESOURCE_KEYS = ("cpus", "gpus", "mem_gb", "time_min", "nodes", "tasks_per_node")
_SPEC_TO_PROFILE = {"cpus_per_trial": "cpus", "gpus_per_trial": "gpus", "mem_gb": "mem_gb", "time_min": "time_min",
                    "nodes": "nodes"}
_SPEC_DEFAULTS = {"cpus_per_trial": 1, "gpus_per_trial": 0, "mem_gb": 4, "time_min": 60, "nodes": 1}
_BUILTIN_RESOURCES = {"cpus": 1, "gpus": 0, "mem_gb": 4, "time_min": 60, "nodes": 1}


# ----------------------------------------------------------------------------------------------
# Cluster profiles
# ----------------------------------------------------------------------------------------------
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

    def resources_for(self, scale: str | None) -> dict[str, Any]:
        out = dict(_BUILTIN_RESOURCES)
        out.update({k: v for k, v in self.defaults.items() if v is not None})
        if scale and scale in self.scales:
            out.update({k: v for k, v in self.scales[scale].items() if v is not None})
        return out


def _profile_error(where: str, problems: list[str]) -> Exception:
    from orchestrator.spec import SpecError

    return SpecError([f"{where}: {p}" for p in problems])


def resolve_profile_path(name: str | os.PathLike | None) -> Path:
    """A profile by path (absolute, or relative to the project root, this checkout or the cwd) or by
    name (`a100` -> slurm/profiles/a100.yaml)."""
    name = str(name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE)
    candidates: list[Path] = []
    path = Path(name).expanduser()
    if path.is_absolute():
        candidates.append(path)
    else:
        from orchestrator.ledger import ProjectPaths

        for base in (ProjectPaths.discover().root, REPO, Path.cwd()):
            candidates.append(base / path)
        if "/" not in name and not name.endswith((".yaml", ".yml")):
            candidates.append(PROFILES_DIR / f"{name}.yaml")
    candidates = list(dict.fromkeys(candidates))
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    raise _profile_error("backend.options.profile", [f"no cluster profile {name!r} (looked at "
                         f"{', '.join(str(c) for c in candidates)}; shipped: {', '.join(known)})"])


def load_profile(name: str | os.PathLike | None = None) -> Profile:
    path = resolve_profile_path(name)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise _profile_error(str(path), [f"cannot read: {err}"]) from None
    if not isinstance(raw, dict):
        raise _profile_error(str(path), ["expected a mapping"])
    allowed = {f for f in Profile.__dataclass_fields__ if f not in ("path",)}
    problems = [f"{key}: unknown key; allowed: {', '.join(sorted(allowed))}" for key in raw if key not in allowed]
    scales = raw.get("scales") or {}
    if not isinstance(scales, dict):
        problems.append("scales: expected a mapping of model scale -> resources")
        scales = {}
    for where, section in [("defaults", raw.get("defaults") or {})] + [(f"scales.{k}", v) for k, v in scales.items()]:
        if not isinstance(section, dict):
            problems.append(f"{where}: expected a mapping with keys {', '.join(_RESOURCE_KEYS)}")
            continue
        for key, value in section.items():
            if key not in _RESOURCE_KEYS:
                problems.append(f"{where}.{key}: unknown resource; allowed: {', '.join(_RESOURCE_KEYS)}")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                problems.append(f"{where}.{key}: expected a number >= 0, got {value!r}")
    if problems:
        raise _profile_error(str(path), problems)
    values = {k: v for k, v in raw.items() if k in allowed}
    values["setup"] = tuple(values.get("setup") or ())
    values["sbatch"] = dict(values.get("sbatch") or {})
    values["env"] = {str(k): str(v) for k, v in (values.get("env") or {}).items()}
    values["defaults"] = dict(values.get("defaults") or {})
    values["scales"] = {str(k): dict(v) for k, v in scales.items()}
    values.setdefault("name", path.stem)
    return Profile(path=str(path), **values)


# ----------------------------------------------------------------------------------------------
# Resources of one trial
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrialResources:
    nodes: int
    gpus_per_node: int
    tasks_per_node: int
    cpus_per_task: int
    mem_mb: int  # per node
    time_min: int

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def spec_resource_overrides(resources: Mapping[str, Any], explicit: Iterable[str] | None = None) -> dict[str, Any]:
    """The spec's resources that override the profile: the keys it wrote (`explicit`, when known),
    else the values that differ from the schema's defaults (a spec's unset keys arrive filled in)."""
    out: dict[str, Any] = {}
    keys = set(explicit) if explicit is not None else None
    for spec_key, profile_key in _SPEC_TO_PROFILE.items():
        if spec_key not in resources or resources[spec_key] is None:
            continue
        if keys is not None:
            if spec_key in keys:
                out[profile_key] = resources[spec_key]
        elif resources[spec_key] != _SPEC_DEFAULTS[spec_key]:
            out[profile_key] = resources[spec_key]
    return out


def trial_resources(profile: Profile, scale: str | None, overrides: Mapping[str, Any]) -> TrialResources:
    merged = profile.resources_for(scale)
    merged.update(overrides)
    nodes = max(1, int(merged["nodes"]))
    gpus = int(merged["gpus"])
    if gpus % nodes:
        raise BackendError(f"{gpus} GPUs do not split evenly over {nodes} nodes")
    gpus_per_node = gpus // nodes
    tasks_per_node = int(merged.get("tasks_per_node") or 0) or max(1, gpus_per_node)
    cpus_per_task = max(1, int(merged["cpus"]) // (nodes * tasks_per_node))
    mem_mb = max(1, int(round(float(merged["mem_gb"]) * 1024)))
    return TrialResources(nodes=nodes, gpus_per_node=gpus_per_node, tasks_per_node=tasks_per_node,
                          cpus_per_task=cpus_per_task, mem_mb=mem_mb, time_min=max(1, int(merged["time_min"])))


def default_signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which the job is told to checkpoint: a tenth of the
    limit, at least 30 s and at most 5 minutes (a 2-minute limit gets 30 s)."""
    return int(min(300, max(30, time_min * 6)))


# ----------------------------------------------------------------------------------------------
# Slurm commands
# ----------------------------------------------------------------------------------------------
def _run(argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)


def parse_job_ids(job_id: str) -> list[str]:
    """`12`, `12_3`, `12_[4-6,9%2]` -> the ids of single jobs / array tasks it stands for."""
    match = re.fullmatch(r"(\d+)_\[([0-9,\-]+)(?:%\d+)?\]", job_id)
    if match:
        base, ranges = match.groups()
        out = []
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            out.extend(f"{base}_{i}" for i in range(int(low), int(high or low) + 1))
        return out
    return [job_id]


@dataclass(frozen=True)
class SlurmRecord:
    job_id: str
    state: str  # first word: "CANCELLED by 0" -> CANCELLED
    exit_code: int = 0
    exit_signal: int = 0
    reason: str = ""


def parse_sacct(text: str) -> dict[str, SlurmRecord]:
    """`sacct -X -n -P --format JobID,State,ExitCode` output -> {job id: record}."""
    out: dict[str, SlurmRecord] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:
            continue
        state = parts[1].split()[0] if parts[1].split() else "UNKNOWN"
        rc, sig = 0, 0
        if len(parts) > 2 and ":" in parts[2]:
            a, _, b = parts[2].partition(":")
            rc, sig = int(a or 0), int(b or 0)
        reason = parts[1][len(state):].strip()
        for job_id in parse_job_ids(parts[0]):
            out[job_id] = SlurmRecord(job_id, state.rstrip("+"), rc, sig, reason)
    return out


def _base_id(job_id: str) -> str:
    return job_id.split("_", 1)[0]


# ----------------------------------------------------------------------------------------------
# The backend
# ----------------------------------------------------------------------------------------------
@register_backend("slurm")
class SlurmBackend(Backend):
    """Trials as Slurm jobs. options: profile, partition, account, qos, constraint, setup,
    array_parallelism, command, env, grace_s (see spec.SlurmOptions); the rest comes from the profile."""

    def __init__(self, max_parallel: int = 1, resources: Mapping[str, Any] | None = None,
                 options: Mapping[str, Any] | None = None, *, profile: Profile | str | None = None,
                 command: Sequence[str] | str | None = None, resources_explicit: Iterable[str] | None = None,
                 poll_min_s: float | None = None, poll_max_s: float | None = None,
                 snapshot_root: Path | None = None) -> None:
        super().__init__(max_parallel, resources, options)
        self.profile = profile if isinstance(profile, Profile) else load_profile(profile or self.options.get("profile"))
        command = command if command is not None else (self.options.get("command") or os.environ.get(COMMAND_ENV))
        if isinstance(command, str):
            command = shlex.split(command)
        self.command: list[str] | None = list(command) if command else None
        self.overrides = spec_resource_overrides(self.resources, resources_explicit)
        self.grace_s = float(self.options.get("grace_s", 30.0))
        self.extra_env = {**self.profile.env, **{str(k): str(v) for k, v in (self.options.get("env") or {}).items()}}
        self.poll_min_s = float(poll_min_s if poll_min_s is not None else self.profile.poll_min_s)
        self.poll_max_s = max(self.poll_min_s, float(poll_max_s if poll_max_s is not None else self.profile.poll_max_s))
        self.snapshot_root = snapshot_root
        self._snapshot: tuple[Path, str] | None = None  # (folder, code version), taken at the first submit
        self._tracked: dict[str, JobHandle] = {}  # job id -> handle, submitted or reattached, not seen ending
        self._records: dict[str, SlurmRecord] = {}
        self._first_seen: dict[str, float] = {}  # job id -> when a state (PREEMPTED, missing) was first seen
        self._interval = self.poll_min_s
        self._next_query = 0.0
        self._queries = 0  # sacct calls, for tests and diagnostics
        self._squeue_cache: tuple[float, dict[str, tuple[str, str]]] | None = None
        self.missing_grace_s = 300.0  # a job sacct does not list yet (slurmdbd lags) is pending this long
        self.preempted_grace_s = 180.0  # PREEMPTED without a requeue for this long: preempted for good
        self.result_grace_s = 30.0  # COMPLETED without result.json: wait this long for the file

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> SlurmBackend:
        """Like Backend.from_spec; a BackendSpec that records which resources the spec wrote
        (`resources_set`) makes exactly those override the profile."""
        explicit = getattr(spec, "resources_set", None)
        if explicit is not None:
            overrides.setdefault("resources_explicit", list(explicit))
        return super().from_spec(spec, **overrides)  # type: ignore[return-value]

    # -- settings ---------------------------------------------------------------------------------
    def _option(self, key: str) -> Any:
        value = self.options.get(key)
        return value if value not in (None, "", []) else getattr(self.profile, key)

    def resources_of(self, trial: TrialPlan) -> TrialResources:
        scale = ((trial.config or {}).get("model") or {}).get("scale")
        return trial_resources(self.profile, scale, self.overrides)

    def executor_parameters(self, res: TrialResources, job_name: str) -> dict[str, Any]:
        """submitit SlurmExecutor parameters (sbatch flags) for one trial's resources."""
        params: dict[str, Any] = {
            "job_name": job_name,
            "time": res.time_min,
            "nodes": res.nodes,
            "ntasks_per_node": res.tasks_per_node,
            "cpus_per_task": res.cpus_per_task,
            "mem": f"{res.mem_mb}M",
            "signal_delay_s": self.signal_delay_s(res.time_min),
            "additional_parameters": {"requeue": True, **dict(self.profile.sbatch)},
            "wckey": None,  # submitit's default "submitit" fails where wckeys are enforced
        }
        if res.gpus_per_node:
            params["gpus_per_node"] = res.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            value = self._option(key)
            if value:
                params[key] = str(value)
        setup = [*self.profile.setup, *(self.options.get("setup") or [])]
        if setup:
            params["setup"] = list(setup)
        parallelism = self.options.get("array_parallelism") or self.profile.array_parallelism or self.max_parallel
        params["array_parallelism"] = int(parallelism)
        return params

    def signal_delay_s(self, time_min: int) -> int:
        """The profile's delay, but never more than half the time limit: a signal due before the job
        starts would requeue it forever."""
        delay = int(self.profile.signal_delay_s or default_signal_delay_s(time_min))
        return max(1, min(delay, max(30, time_min * 30)))

    def _stop_timeout_s(self, params: Mapping[str, Any]) -> float:
        if self.profile.stop_timeout_s:
            return float(self.profile.stop_timeout_s)
        return max(10.0, float(params["signal_delay_s"]) - 15.0)

    # -- code snapshot ----------------------------------------------------------------------------
    def snapshot(self, runs_dir: Path) -> tuple[Path, str]:
        """`<runs>/snapshots/<code_version>/`: trainer/ and pyproject.toml as they are now (once)."""
        if self._snapshot is not None:
            return self._snapshot
        from orchestrator.identity import code_version, trainer_source_dir

        root = Path(self.snapshot_root) if self.snapshot_root else Path(runs_dir) / "snapshots"
        root.mkdir(parents=True, exist_ok=True)
        source = trainer_source_dir()
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        staging.chmod(0o755)
        try:
            shutil.copytree(source, staging / "trainer", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            pyproject = source.parent / "pyproject.toml"
            if pyproject.is_file():
                shutil.copy2(pyproject, staging / "pyproject.toml")
            version = code_version(staging / "trainer")  # of what was copied, not of what is there now
            target = root / version
            if target.is_dir():
                shutil.rmtree(staging)
            else:
                try:
                    os.rename(staging, target)
                except OSError:  # another orchestrator made the same snapshot meanwhile
                    shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._snapshot = (target, version)
        return self._snapshot

    # -- submission -------------------------------------------------------------------------------
    def submit(self, trial: TrialPlan, run_dir: Path, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        return self.submit_many([(trial, Path(run_dir))])[0]

    def submit_many(self, items: Sequence[tuple[TrialPlan, Path]]) -> list[JobHandle]:
        """Submit several trials; those needing the same resources go out as one job array."""
        if len(items) > self.free_slots:
            raise BackendError(f"slurm backend is full ({self.active}/{self.max_parallel} trials submitted)")
        groups: dict[str, list[int]] = {}
        prepared = []
        for i, (trial, run_dir) in enumerate(items):
            run_dir = Path(run_dir)
            if not (run_dir / CONFIG_FILE).is_file():
                raise BackendError(f"{run_dir / CONFIG_FILE} does not exist: write the trial config before submitting")
            live = self._live_job_in(run_dir)
            if live:
                raise BackendError(f"trial {trial.trial_id} already has Slurm job {live} queued or running "
                                   f"(an orchestrator that died, or another sweep): not submitting it twice")
            res = self.resources_of(trial)
            prepared.append((trial, run_dir, res))
            groups.setdefault(json.dumps(asdict(res), sort_keys=True), []).append(i)
        handles: list[JobHandle | None] = [None] * len(items)
        for indices in groups.values():
            batch = [prepared[i] for i in indices]
            for i, handle in zip(indices, self._submit_group(batch)):
                handles[i] = handle
        self._interval = self.poll_min_s  # something changed: look again soon
        self._next_query = 0.0
        return [h for h in handles if h is not None]

    def _submit_group(self, batch: list[tuple[TrialPlan, Path, TrialResources]]) -> list[JobHandle]:
        trials = [t for t, _, _ in batch]
        run_dirs = [d for _, d, _ in batch]
        res = batch[0][2]
        runs_dir = run_dirs[0].parent.parent
        snapshot, version = self.snapshot(runs_dir)
        script, folders, farm = self._prepare(trials, run_dirs, res, snapshot)
        try:
            job_id = self._sbatch(script)
        except BaseException:
            for folder in folders:
                for pickle in folder.glob(".pending-*.pkl"):
                    pickle.unlink(missing_ok=True)
            raise
        script = script.with_name(f"{job_id}_submission.sh")  # where _sbatch moved it
        handles = []
        array = len(trials) > 1
        for index, (trial, run_dir, folder) in enumerate(zip(trials, run_dirs, folders)):
            jid = f"{job_id}_{index}" if array else job_id
            pending = folder / f".pending-{index}.pkl"
            os.replace(pending, folder / f"{jid}_submitted.pkl")
            script_link = folder / f"{job_id}_submission.sh"
            if not script_link.exists():
                if array:
                    script_link.symlink_to(script)
            info = {
                "job_name": self._job_name(trials),
                "array_job_id": job_id if array else None,
                "array_index": index if array else None,
                "slurm_dir": str(folder),
                "submission_script": str(script if not array else script_link),
                "snapshot": str(snapshot),
                "code_version": version,
                "resources": asdict(res),
                "profile": self.profile.name,
            }
            handle = JobHandle(trial_id=trial.trial_id, backend=self.name, job_id=jid, run_dir=run_dir,
                               log_path=run_dir / LOG_FILE, info=info)
            self._tracked[jid] = handle
            self._first_seen.pop(jid, None)
            handles.append(handle)
        if array:  # the farm's scripts name the array by its uuid: record which job that became
            (farm / "job_id").write_text(job_id + "\n")
        return handles

    def _live_job_in(self, run_dir: Path) -> str | None:
        """A job of an earlier submission of this trial that Slurm still has (the claim lock cannot
        travel into a Slurm job, so this is what keeps a trial from running twice at once)."""
        known = [p.name[: -len("_submitted.pkl")] for p in (Path(run_dir) / SLURM_SUBDIR).glob("*_submitted.pkl")]
        if not known:
            return None
        live = self._squeue(known, fresh=True)
        ended = {j for j, r in self._records.items() if r.state not in ACTIVE_STATES}
        return next((j for j in known if j in live and j not in ended
                     and live[j][0] in ACTIVE_STATES - {"COMPLETING", "STAGE_OUT"}), None)

    def _job_name(self, trials: Sequence[TrialPlan]) -> str:
        if len(trials) == 1:
            return f"{JOB_PREFIX}-{trials[0].trial_id}"
        sweep = str((trials[0].config or {}).get("name") or "sweep").split("/")[0]
        return f"{JOB_PREFIX}-{re.sub(r'[^A-Za-z0-9_.-]', '_', sweep)}-x{len(trials)}"

    def _prepare(self, trials: Sequence[TrialPlan], run_dirs: Sequence[Path], res: TrialResources,
                 snapshot: Path | None) -> tuple[Path, list[Path], Path | None]:
        """Write the sbatch script and each trial's pickled callable (as .pending-<i>.pkl, renamed to
        <job id>_submitted.pkl once the job id is known). Returns (script, trial slurm dirs, farm)."""
        from submitit.core.utils import DelayedSubmission

        params = self.executor_parameters(res, self._job_name(trials))
        folders = [Path(d) / SLURM_SUBDIR for d in run_dirs]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        farm = None
        if len(trials) == 1:
            job_folder = folders[0]
            staging = folders[0]
        else:  # <runs>/slurm/arrays/<uuid>/<index> -> the trial's DIR/slurm; %a picks the index
            farm = Path(run_dirs[0]).parent.parent / "slurm" / "arrays" / uuid.uuid4().hex[:12]
            farm.mkdir(parents=True)
            for index, folder in enumerate(folders):
                (farm / str(index)).symlink_to(folder.resolve())
                (farm / f"{index}.trial").write_text(f"{trials[index].trial_id} {run_dirs[index]}\n")
            job_folder = farm / "%a"
            staging = farm
        executor = _make_executor(job_folder, max_num_timeout=self.profile.max_num_timeout, python=self.profile.python)
        array_parallelism = params.pop("array_parallelism")
        executor.update_parameters(**params)
        if len(trials) > 1:
            executor.parameters["map_count"] = len(trials)
            executor.parameters["array_parallelism"] = array_parallelism
        text = executor._make_submission_file_text(executor._submitit_command_str, uuid.uuid4().hex)
        script = staging / f".submission-{uuid.uuid4().hex[:12]}.sh"
        script.write_text(text)
        stop_timeout = self._stop_timeout_s(params)
        _pickle_by_value()
        for index, (trial, run_dir, folder) in enumerate(zip(trials, run_dirs, folders)):
            job = SlurmTrial(trial.trial_id, run_dir, command=self.command, snapshot=snapshot,
                             threads=res.cpus_per_task, env=self.extra_env, stop_timeout_s=stop_timeout)
            delayed = DelayedSubmission(job)
            delayed.set_timeout(res.time_min, self.profile.max_num_timeout)
            delayed.dump(folder / f".pending-{index}.pkl")
        return script, folders, farm

    def sbatch_script(self, items: Sequence[tuple[TrialPlan, Path]]) -> str:
        """The sbatch script these trials would be submitted with (one resource group), unsubmitted."""
        trials = [t for t, _ in items]
        run_dirs = [Path(d) for _, d in items]
        res = self.resources_of(trials[0])
        script, folders, farm = self._prepare(trials, run_dirs, res, None)
        text = script.read_text()
        script.unlink()
        for index, folder in enumerate(folders):
            (folder / f".pending-{index}.pkl").unlink(missing_ok=True)
        if farm is not None:
            shutil.rmtree(farm, ignore_errors=True)
        return text

    def _sbatch(self, script: Path) -> str:
        proc = _run(["sbatch", "--parsable", str(script)], timeout=120)
        if proc.returncode != 0:
            raise BackendError(f"sbatch refused the job: {(proc.stderr or proc.stdout).strip()}")
        match = re.match(r"\s*(\d+)", proc.stdout)
        if match is None:
            raise BackendError(f"cannot read a job id from sbatch's output {proc.stdout!r}")
        job_id = match.group(1)
        final = script.with_name(f"{job_id}_submission.sh")
        os.replace(script, final)
        return job_id

    # -- status -----------------------------------------------------------------------------------
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        handles = list(handles)
        if not handles:
            return {}
        for handle in handles:
            self._tracked.setdefault(handle.job_id, handle)
        now = time.monotonic()
        unseen = any(h.job_id not in self._records and h.job_id not in self._first_seen for h in handles)
        if now >= self._next_query or unseen:
            self._refresh([h.job_id for h in handles])
        states: dict[str, JobState] = {}
        for handle in handles:
            state = self._state_for(handle)
            states[handle.trial_id] = state
            if state.finished:
                self._tracked.pop(handle.job_id, None)
        return states

    def _refresh(self, job_ids: Sequence[str]) -> None:
        """One sacct call for every job (arrays by their base id), then schedule the next one."""
        before = {j: self._records.get(j) for j in job_ids}
        bases = sorted({_base_id(j) for j in job_ids}, key=lambda b: int(b) if b.isdigit() else 0)
        self._queries += 1
        try:
            proc = _run(["sacct", "-X", "-n", "-P", "--format", "JobID,State,ExitCode", "-j", ",".join(bases)])
        except (OSError, subprocess.TimeoutExpired) as err:
            proc = subprocess.CompletedProcess([], 1, "", str(err))
        if proc.returncode == 0:
            self._records.update({k: v for k, v in parse_sacct(proc.stdout).items() if k in before or
                                  _base_id(k) in bases})
        else:
            warnings.warn(f"sacct failed ({proc.stderr.strip()}); keeping the last known job states", stacklevel=2)
        missing = [j for j in job_ids if j not in self._records]
        if missing:  # not in the accounting database yet: ask the controller
            for job_id, (state, _) in self._squeue(missing, fresh=True).items():
                self._records[job_id] = SlurmRecord(job_id, state)
        changed = any(self._records.get(j) != before[j] for j in job_ids)
        self._interval = self.poll_min_s if changed else min(self.poll_max_s, self._interval * 2)
        self._next_query = time.monotonic() + self._interval

    def _squeue(self, job_ids: Sequence[str] | None = None, fresh: bool = False) -> dict[str, tuple[str, str]]:
        """{job id: (state, job name)} of live jobs: the given ones, or all of this user's (cached 5 s)."""
        if job_ids is None and not fresh and self._squeue_cache and time.monotonic() - self._squeue_cache[0] < 5:
            return self._squeue_cache[1]
        argv = ["squeue", "-h", "-r", "-o", "%i|%T|%j"]
        argv += ["-j", ",".join(sorted({_base_id(j) for j in job_ids}))] if job_ids else ["--me"]
        try:
            proc = _run(argv)
        except (OSError, subprocess.TimeoutExpired):
            return {}
        out: dict[str, tuple[str, str]] = {}
        for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
            parts = line.strip().split("|")
            if len(parts) >= 3:
                for job_id in parse_job_ids(parts[0]):
                    out[job_id] = (parts[1].split()[0], parts[2])
        if job_ids is None:
            self._squeue_cache = (time.monotonic(), out)
        return out

    def _state_for(self, handle: JobHandle) -> JobState:
        record = self._records.get(handle.job_id)
        now = time.monotonic()
        if record is None:
            first = self._first_seen.setdefault(handle.job_id, now)
            age = max(now - first, time.time() - handle.submitted_at if handle.submitted_at else 0.0)
            if age < self.missing_grace_s:
                return JobState(JobStatus.PENDING)
            result = read_result(handle.run_dir)
            if result is not None:
                return state_from_result(result)
            return JobState.failed(LOST, f"job {handle.job_id} is unknown to sacct and squeue")
        state = record.state
        if state == "PREEMPTED":  # requeued soon (PreemptMode=REQUEUE), or preempted for good
            first = self._first_seen.setdefault(handle.job_id, now)
            if now - first < self.preempted_grace_s:
                return JobState(JobStatus.PENDING)
        else:
            self._first_seen.pop(handle.job_id, None)
        if state in RUNNING_STATES:
            return JobState(JobStatus.RUNNING)
        if state in QUEUED_STATES - {"PREEMPTED"}:
            return JobState(JobStatus.PENDING)
        return self._finished_state(handle, record)

    def _finished_state(self, handle: JobHandle, record: SlurmRecord) -> JobState:
        result = read_result(handle.run_dir)
        if result is not None and result.get("status") in ("done", "failed"):
            return state_from_result(result)  # the trainer's own verdict wins
        state, jid = record.state, handle.job_id
        attempt = _read_json(attempt_file(handle.run_dir, jid)) or {}
        trainer_exit = attempt.get("trainer_exit")
        if state == "COMPLETED":
            # result.json may show up a moment later on a shared file system: give it 30 s.
            first = self._first_seen.setdefault(f"{jid}:completed", time.monotonic())
            if time.monotonic() - first < self.result_grace_s:
                return JobState(JobStatus.RUNNING)
            return JobState.failed(ERROR, f"job {jid} completed without a result.json" + self._last_line(handle))
        if state == "TIMEOUT" or state == "DEADLINE":
            return JobState.failed(TIMEOUT, f"job {jid} hit its time limit ({state})")
        if state in ("NODE_FAIL", "BOOT_FAIL", "LOST"):
            return JobState.failed(LOST, f"job {jid} ended with {state}")
        if state == "PREEMPTED":
            return JobState.failed(PREEMPTED, f"job {jid} was preempted and not requeued")
        if state == "OUT_OF_MEMORY" or self._log_mentions_oom(handle):
            return JobState.failed(OOM, f"job {jid} exceeded its memory ({state})")
        if state == "CANCELLED":
            who = f" ({record.reason})" if record.reason else ""
            return JobState.failed(KILLED, f"job {jid} was cancelled outside the orchestrator{who}")
        if trainer_exit == EXIT_INTERRUPTED:
            return JobState.failed(PREEMPTED, f"job {jid}: the trainer stopped at a checkpoint (exit 75)")
        if record.exit_signal or (isinstance(trainer_exit, int) and trainer_exit < 0):
            signum = record.exit_signal or -int(trainer_exit)
            return JobState.failed(KILLED, f"job {jid} was killed by signal {signum}")
        if trainer_exit == 2:
            return JobState.failed(ERROR, f"job {jid}: invalid trial config (exit 2)" + self._last_line(handle))
        code = trainer_exit if trainer_exit is not None else record.exit_code
        return JobState.failed(ERROR, f"job {jid} {state.lower()} with exit code {code}" + self._last_line(handle))

    @staticmethod
    def _last_line(handle: JobHandle) -> str:
        line = _last_log_line(Path(handle.log_path))
        return f": {line}" if line else ""

    @staticmethod
    def _log_mentions_oom(handle: JobHandle) -> bool:
        folder = Path(handle.run_dir) / SLURM_SUBDIR
        for suffix in ("err", "out"):
            text = _tail(folder / f"{handle.job_id}_0_log.{suffix}").lower()
            if any(marker in text for marker in OOM_LOG_MARKERS):
                return True
        return False

    def describe(self, handles: Iterable[JobHandle]) -> dict[str, str]:
        """Slurm's own state per trial ("PENDING", "RUNNING", "REQUEUED", ...), from one sacct call:
        for `status` to show what the queue says about the ledger's running trials."""
        handles = list(handles)
        if handles:
            self._refresh([h.job_id for h in handles])
        return {h.trial_id: (self._records[h.job_id].state if h.job_id in self._records else "UNKNOWN")
                for h in handles}

    @property
    def active(self) -> int:
        return len(self._tracked)

    @property
    def queries(self) -> int:
        return self._queries

    # -- cancel -----------------------------------------------------------------------------------
    def cancel(self, handle: JobHandle) -> None:
        self.cancel_many([handle])

    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """scancel: Slurm sends SIGTERM (the trainer checkpoints and exits 75), then SIGKILL after the
        cluster's KillWait; grace_s=0 kills at once. Waits until the jobs have left the queue."""
        ids = sorted({h.job_id for h in handles})
        if not ids:
            return
        grace = self.grace_s if grace_s is None else grace_s
        if grace <= 0:
            _run(["scancel", "--signal=KILL", "--full", *ids])
        proc = _run(["scancel", *ids])
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr and "already completing" not in proc.stderr:
            warnings.warn(f"scancel {' '.join(ids)}: {proc.stderr.strip()}", stacklevel=2)
        deadline = time.monotonic() + max(grace, 0) + 90  # KillWait (30 s by default) plus epilog time
        while time.monotonic() < deadline:
            live = self._squeue(ids, fresh=True)
            if not any(state in ACTIVE_STATES for state, _ in live.values()):
                break
            time.sleep(0.5)
        for job_id in ids:
            self._tracked.pop(job_id, None)

    # -- reattach ---------------------------------------------------------------------------------
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        """The job if Slurm still has it queued or running (one squeue for all reattaches), else None."""
        handle = JobHandle.from_dict(handle_dict)
        if handle.backend != self.name:
            return None
        live = self._squeue().get(handle.job_id)
        if live is None:
            live = self._squeue([handle.job_id], fresh=True).get(handle.job_id)
        if live is None or live[0] not in ACTIVE_STATES:
            return None
        expected = handle.info.get("job_name")
        if expected and live[1] != expected:  # a recycled job id (a reset cluster): not our job
            return None
        self._tracked[handle.job_id] = handle
        return handle

    def close(self) -> None:
        self._tracked.clear()


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
def _make_executor(folder: Path, max_num_timeout: int, python: str | None) -> Any:
    """submitit's SlurmExecutor, used to validate parameters and write the sbatch script only (we
    run sbatch ourselves); it does not insist on `srun` being installed here."""
    from submitit.slurm.slurm import SlurmExecutor

    class _ScriptOnlyExecutor(SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 2

    return _ScriptOnlyExecutor(folder, max_num_timeout=max_num_timeout, python=python)


_BY_VALUE_DONE = False


def _pickle_by_value() -> None:
    """Pickle the job callable by value: the job never imports this checkout's orchestrator code,
    so it is as frozen as the trainer snapshot."""
    global _BY_VALUE_DONE
    if _BY_VALUE_DONE:
        return
    import cloudpickle

    from orchestrator.backends import slurm_job

    with contextlib.suppress(Exception):
        cloudpickle.register_pickle_by_value(slurm_job)
    _BY_VALUE_DONE = True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _tail(path: Path, max_bytes: int = 8192) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _last_log_line(path: Path) -> str:
    lines = [line.strip() for line in _tail(path, 4096).splitlines() if line.strip()]
    return lines[-1] if lines else ""


__all__ = ["Profile", "SlurmBackend", "TrialResources", "load_profile", "parse_sacct", "trial_resources"]
