"""Putting trials into Slurm: the code snapshot, the sbatch script, the pickled job, `sbatch`.

The trials of one submission that need the same resources go out as one job array
(`--array=0-N%array_parallelism`); a single trial is a plain job. Every file of a trial's job
lives in its own folder, `DIR/slurm/`: the sbatch script, submitit's pickle,
`<job>_<task>_log.out/.err` and `<job>.json` (where/when it ran, how the trainer exited). Array
tasks reach their trial's folder through `<runs>/slurm/arrays/<uuid>/<index>` symlinks, which is
what `%a` in the script's paths resolves to. The pickled callable holds paths only; the trainer
resumes from DIR.

Code snapshot: the `trainer` package (and pyproject.toml) is copied once per code version to
`<runs>/snapshots/<code_version>/` (content-addressed, shared by sweeps) at the first submission of
an orchestrator, and every job runs the trainer with PYTHONPATH pointing there: edits made after
`run` never reach queued or requeued jobs.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import cloudpickle
from submitit.helpers import DelayedSubmission

from orchestrator.backends import process
from orchestrator.backends.base import BackendError, JobHandle
from orchestrator.backends.slurm import job, submitit_private
from orchestrator.backends.slurm.job import SlurmTrial
from orchestrator.backends.slurm.resources import TrialResources, executor_parameters, stop_timeout_s
from orchestrator.backends.slurm.watcher import run
from orchestrator.identity import code_version, trainer_source_dir
from orchestrator.spec import SlurmBackendSpec, TrialPlan
from orchestrator.store import TrialDir
from trainer import contract

JOB_PREFIX = "cls"
# What the job's pickle carries by value: it runs the code of its submission, not this checkout's.
PICKLED_BY_VALUE = (job, process, submitit_private, contract)


class Submitter:
    """Writes and submits the jobs of one backend (its spec, trainer command and environment)."""

    def __init__(self, spec: SlurmBackendSpec, command: list[str] | None, env: Mapping[str, str],
                 snapshot_root: Path | None = None) -> None:
        self.spec = spec
        self.profile = spec.profile
        self.command = command
        self.env = dict(env)
        self.snapshot_root = snapshot_root
        self._snapshot: tuple[Path, str] | None = None  # (folder, code version), taken at the first submit

    # -- code snapshot ----------------------------------------------------------------------------
    def snapshot(self, runs_dir: Path) -> tuple[Path, str]:
        """`<runs>/snapshots/<code_version>/`: trainer/ and pyproject.toml as they are now (once)."""
        if self._snapshot is not None:
            return self._snapshot
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

    # -- one group of trials with the same resources ------------------------------------------------
    def submit_group(self, trials: Sequence[TrialPlan], dirs: Sequence[TrialDir], res: TrialResources,
                     backend: str) -> list[JobHandle]:
        """One job (one trial) or one job array (several); their handles, in order."""
        runs_dir = dirs[0].path.parent.parent
        snapshot, version = self.snapshot(runs_dir)
        script, folders, farm = self._prepare(trials, dirs, res, snapshot)
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
        for index, (trial, trial_dir, folder) in enumerate(zip(trials, dirs, folders)):
            jid = f"{job_id}_{index}" if array else job_id
            os.replace(folder / f".pending-{index}.pkl", folder / f"{jid}_submitted.pkl")
            script_link = folder / f"{job_id}_submission.sh"
            if array and not script_link.exists():
                script_link.symlink_to(script)
            info = {
                "job_name": self.job_name(trials),
                "array_job_id": job_id if array else None,
                "array_index": index if array else None,
                "slurm_dir": str(folder),
                "submission_script": str(script if not array else script_link),
                "snapshot": str(snapshot),
                "code_version": version,
                "resources": asdict(res),
                "profile": self.profile.name,
            }
            handles.append(JobHandle(trial_id=trial.trial_id, backend=backend, job_id=jid, run_dir=trial_dir.path,
                                     log_path=trial_dir.log_path, info=info))
        if array:  # the farm's scripts name the array by its uuid: record which job that became
            (farm / "job_id").write_text(job_id + "\n")
        return handles

    def sbatch_script(self, trials: Sequence[TrialPlan], dirs: Sequence[TrialDir], res: TrialResources) -> str:
        """The sbatch script these trials would be submitted with (one resource group), unsubmitted."""
        script, folders, farm = self._prepare(trials, dirs, res, None)
        text = script.read_text()
        script.unlink()
        for index, folder in enumerate(folders):
            (folder / f".pending-{index}.pkl").unlink(missing_ok=True)
        if farm is not None:
            shutil.rmtree(farm, ignore_errors=True)
        return text

    def job_name(self, trials: Sequence[TrialPlan]) -> str:
        if len(trials) == 1:
            return f"{JOB_PREFIX}-{trials[0].trial_id}"
        sweep = str((trials[0].config or {}).get("name") or "sweep").split("/")[0]
        return f"{JOB_PREFIX}-{re.sub(r'[^A-Za-z0-9_.-]', '_', sweep)}-x{len(trials)}"

    def _prepare(self, trials: Sequence[TrialPlan], dirs: Sequence[TrialDir], res: TrialResources,
                 snapshot: Path | None) -> tuple[Path, list[Path], Path | None]:
        """Write the sbatch script and each trial's pickled callable (as .pending-<i>.pkl, renamed to
        <job id>_submitted.pkl once the job id is known). Returns (script, trial slurm dirs, farm)."""
        params = executor_parameters(self.spec, res, self.job_name(trials))
        folders = [d.slurm_dir for d in dirs]
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
        farm = None
        if len(trials) == 1:
            job_folder = staging = folders[0]
        else:  # <runs>/slurm/arrays/<uuid>/<index> -> the trial's DIR/slurm; %a picks the index
            farm = dirs[0].path.parent.parent / "slurm" / "arrays" / uuid.uuid4().hex[:12]
            farm.mkdir(parents=True)
            for index, folder in enumerate(folders):
                (farm / str(index)).symlink_to(folder.resolve())
                (farm / f"{index}.trial").write_text(f"{trials[index].trial_id} {dirs[index].path}\n")
            job_folder = farm / "%a"
            staging = farm
        stop_timeout = stop_timeout_s(self.profile, params["signal_delay_s"])
        text = submitit_private.sbatch_script_text(job_folder, params, array_size=len(trials),
                                                   max_num_timeout=self.profile.max_num_timeout,
                                                   python=self.profile.python)
        script = staging / f".submission-{uuid.uuid4().hex[:12]}.sh"
        script.write_text(text)
        for module in PICKLED_BY_VALUE:
            cloudpickle.register_pickle_by_value(module)
        for index, (trial, trial_dir, folder) in enumerate(zip(trials, dirs, folders)):
            callable_ = SlurmTrial(trial.trial_id, trial_dir.path, command=self.command, snapshot=snapshot,
                                   threads=res.cpus_per_task, env=self.env, stop_timeout_s=stop_timeout)
            delayed = DelayedSubmission(callable_)
            delayed.set_timeout(res.time_min, self.profile.max_num_timeout)
            delayed.dump(folder / f".pending-{index}.pkl")
        return script, folders, farm

    @staticmethod
    def _sbatch(script: Path) -> str:
        proc = run(["sbatch", "--parsable", str(script)], timeout=120)
        if proc.returncode != 0:
            raise BackendError(f"sbatch refused the job: {(proc.stderr or proc.stdout).strip()}")
        match = re.match(r"\s*(\d+)", proc.stdout)
        if match is None:
            raise BackendError(f"cannot read a job id from sbatch's output {proc.stdout!r}")
        job_id = match.group(1)
        os.replace(script, script.with_name(f"{job_id}_submission.sh"))
        return job_id
