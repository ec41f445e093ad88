"""The Slurm backend: trials as Slurm jobs, watched with one `sacct` per poll, stopped with `scancel`.

    backend:
      kind: slurm
      max_parallel: 9                      # trials submitted (queued or running) at once
      resources: {gpus_per_trial: 8, cpus_per_trial: 80, mem_gb: 480, time_min: 2880, nodes: 1}
      options: {profile: slurm/profiles/default.yaml, account: myacct, partition: gpu}

The cluster profile comes loaded with the spec (`spec.profile`); resources.py sizes each trial,
submission.py writes and submits its job, job.py is what runs in it, watcher.py asks Slurm how the
jobs are, states.py reads how an ended one ended. The trainer's own result.json always wins once
the job has ended.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestrator.backends import register_backend
from orchestrator.backends.base import (
    Backend,
    BackendError,
    JobHandle,
    JobState,
    JobStatus,
    Submission,
    require_config,
    state_from_result,
)
from orchestrator.backends.process import trainer_command
from orchestrator.backends.slurm.resources import TrialResources, spec_resource_overrides, trial_resources
from orchestrator.backends.slurm.states import ended_state
from orchestrator.backends.slurm.submission import Submitter
from orchestrator.backends.slurm.watcher import ACTIVE_STATES, QUEUED_STATES, RUNNING_STATES, SlurmWatcher, run
from orchestrator.spec import SlurmBackendSpec, TrialPlan
from orchestrator.store import TrialDir, last_line
from trainer.contract import ERROR, LOST


@register_backend("slurm")
class SlurmBackend(Backend):
    """Trials as Slurm jobs. options: profile, partition, account, qos, constraint, setup,
    array_parallelism, command, env, grace_s (see spec.SlurmOptions); the rest comes from the profile.

    Test knobs: `poll_min_s`/`poll_max_s` (default: the profile's), `snapshot_root` (default `<runs>/snapshots`).
    """

    def __init__(self, spec: SlurmBackendSpec, *, poll_min_s: float | None = None, poll_max_s: float | None = None,
                 snapshot_root: Path | None = None) -> None:
        super().__init__(spec)
        self.profile = spec.profile
        self.overrides = spec_resource_overrides(spec.resources)
        self.grace_s = spec.options.grace_s
        env = {**self.profile.env, **{str(k): str(v) for k, v in spec.options.env.items()}}
        self.submitter = Submitter(spec, trainer_command(spec.options.command), env, snapshot_root)
        poll_min = float(poll_min_s if poll_min_s is not None else self.profile.poll_min_s)
        self.watcher = SlurmWatcher(poll_min, float(poll_max_s if poll_max_s is not None else self.profile.poll_max_s))
        self._tracked: dict[str, JobHandle] = {}  # job id -> handle, submitted or reattached, not seen ending
        self._first_seen: dict[str, float] = {}  # job id -> when a state (PREEMPTED, missing) was first seen
        self.missing_grace_s = 300.0  # a job sacct does not list yet (slurmdbd lags) is pending this long
        self.preempted_grace_s = 180.0  # PREEMPTED without a requeue for this long: preempted for good
        self.result_grace_s = 30.0  # COMPLETED without result.json: wait this long for the file

    def resources_of(self, trial: TrialPlan) -> TrialResources:
        scale = ((trial.config or {}).get("model") or {}).get("scale")
        return trial_resources(self.profile, scale, self.overrides)

    # -- submission -------------------------------------------------------------------------------
    def submit(self, trial: TrialPlan, trial_dir: TrialDir, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        """`keep_fds` is ignored: the job runs on another machine (`_live_job_in` guards the folder)."""
        (outcome,) = self.submit_many([Submission(trial, trial_dir)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def submit_many(self, items: Sequence[Submission]) -> list[JobHandle | Exception]:
        """Submit several trials; those needing the same resources go out as one job array. Raises
        (nothing submitted) when they do not fit; a trial that cannot go out gets its exception."""
        if len(items) > self.free_slots:
            raise BackendError(f"slurm backend is full ({self.active}/{self.max_parallel} trials submitted)")
        out: dict[int, JobHandle | Exception] = {}  # item index -> its handle or why it did not go out
        groups: dict[str, list[int]] = {}
        resources: dict[int, TrialResources] = {}
        for i, item in enumerate(items):
            try:
                require_config(item.trial_dir)
                live = self._live_job_in(item.trial_dir)
                if live:
                    raise BackendError(f"trial {item.trial.trial_id} already has Slurm job {live} queued or running "
                                       f"(an orchestrator that died, or another sweep): not submitting it twice")
                resources[i] = self.resources_of(item.trial)
            except Exception as err:
                out[i] = err
                continue
            groups.setdefault(json.dumps(asdict(resources[i]), sort_keys=True), []).append(i)
        for indices in groups.values():
            try:
                handles = self.submitter.submit_group([items[i].trial for i in indices],
                                                      [items[i].trial_dir for i in indices],
                                                      resources[indices[0]], self.name)
            except Exception as err:
                for i in indices:
                    out[i] = err
                continue
            for i, handle in zip(indices, handles):
                self._tracked[handle.job_id] = handle
                self._first_seen.pop(handle.job_id, None)
                out[i] = handle
        self.watcher.soon()  # something changed: look again soon
        return [out[i] for i in range(len(items))]

    def sbatch_script(self, items: Sequence[Submission]) -> str:
        """The sbatch script these trials would be submitted with (one resource group), unsubmitted."""
        return self.submitter.sbatch_script([i.trial for i in items], [i.trial_dir for i in items],
                                            self.resources_of(items[0].trial))

    def _live_job_in(self, trial_dir: TrialDir) -> str | None:
        """A job of an earlier submission of this trial that Slurm still has (the claim lock cannot
        travel into a Slurm job, so this is what keeps a trial from running twice at once)."""
        known = [p.name[: -len("_submitted.pkl")] for p in trial_dir.slurm_dir.glob("*_submitted.pkl")]
        if not known:
            return None
        live = self.watcher.squeue(known, fresh=True)
        ended = {j for j, r in self.watcher.records.items() if r.state not in ACTIVE_STATES}
        return next((j for j in known if j in live and j not in ended
                     and live[j][0] in ACTIVE_STATES - {"COMPLETING", "STAGE_OUT"}), None)

    # -- status -----------------------------------------------------------------------------------
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        handles = list(handles)
        if not handles:
            return {}
        for handle in handles:
            self._tracked.setdefault(handle.job_id, handle)
        unseen = any(h.job_id not in self.watcher.records and h.job_id not in self._first_seen for h in handles)
        if self.watcher.due() or unseen:
            self.watcher.refresh([h.job_id for h in handles])
        states: dict[str, JobState] = {}
        for handle in handles:
            state = self._state_for(handle)
            states[handle.trial_id] = state
            if state.finished:
                self._tracked.pop(handle.job_id, None)
        return states

    def _state_for(self, handle: JobHandle) -> JobState:
        record = self.watcher.records.get(handle.job_id)
        now = time.monotonic()
        if record is None:
            first = self._first_seen.setdefault(handle.job_id, now)
            age = max(now - first, time.time() - handle.submitted_at if handle.submitted_at else 0.0)
            if age < self.missing_grace_s:
                return JobState(JobStatus.PENDING)
            result = handle.trial_dir.result()
            if result is not None:
                return state_from_result(result)
            return JobState.failed(LOST, f"job {handle.job_id} is unknown to sacct and squeue")
        if record.state == "PREEMPTED":  # requeued soon (PreemptMode=REQUEUE), or preempted for good
            first = self._first_seen.setdefault(handle.job_id, now)
            if now - first < self.preempted_grace_s:
                return JobState(JobStatus.PENDING)
        else:
            self._first_seen.pop(handle.job_id, None)
        if record.state in RUNNING_STATES:
            return JobState(JobStatus.RUNNING)
        if record.state in QUEUED_STATES - {"PREEMPTED"}:
            return JobState(JobStatus.PENDING)
        state = ended_state(handle, record)
        if state is not None:
            return state
        # COMPLETED without result.json: it may show up a moment later on a shared file system.
        first = self._first_seen.setdefault(f"{handle.job_id}:completed", now)
        if now - first < self.result_grace_s:
            return JobState(JobStatus.RUNNING)
        line = last_line(handle.log_path)
        return JobState.failed(ERROR, f"job {handle.job_id} completed without a result.json" + (f": {line}" if line else ""))

    @property
    def active(self) -> int:
        return len(self._tracked)

    # -- cancel -----------------------------------------------------------------------------------
    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """scancel: Slurm sends SIGTERM (the trainer checkpoints and exits 75), then SIGKILL after the
        cluster's KillWait; grace_s=0 kills at once. Waits until the jobs have left the queue."""
        ids = sorted({h.job_id for h in handles})
        if not ids:
            return
        grace = self.grace_s if grace_s is None else grace_s
        if grace <= 0:
            run(["scancel", "--signal=KILL", "--full", *ids])
        proc = run(["scancel", *ids])
        if proc.returncode != 0 and "Invalid job id" not in proc.stderr and "already completing" not in proc.stderr:
            warnings.warn(f"scancel {' '.join(ids)}: {proc.stderr.strip()}", stacklevel=2)
        deadline = time.monotonic() + max(grace, 0) + 90  # KillWait (30 s by default) plus epilog time
        while time.monotonic() < deadline and self.watcher.is_live(ids):
            time.sleep(0.5)
        for job_id in ids:
            self._tracked.pop(job_id, None)

    # -- reattach ---------------------------------------------------------------------------------
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        """The job if Slurm still has it queued or running (one squeue for all reattaches), else None."""
        handle = JobHandle.from_dict(handle_dict)
        if handle.backend != self.name:
            return None
        live = self.watcher.squeue().get(handle.job_id)
        if live is None:
            live = self.watcher.squeue([handle.job_id], fresh=True).get(handle.job_id)
        if live is None or live[0] not in ACTIVE_STATES:
            return None
        expected = handle.info.get("job_name")
        if expected and live[1] != expected:  # a recycled job id (a reset cluster): not our job
            return None
        self._tracked[handle.job_id] = handle
        return handle

    def close(self) -> None:
        self._tracked.clear()
