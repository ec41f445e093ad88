"""Trials as local subprocesses: `python -m trainer --config DIR/config.yaml --out DIR`.

Each trial runs in its own session (so its own process group: Ctrl-C in the terminal reaches the
orchestrator only, which then stops trials deliberately, and a cancel reaches the trainer's
data-loader workers too), logs to `DIR/trainer.log` (appended, one header per attempt), and gets
`resources.cpus_per_trial` threads through OMP/MKL variables so parallel trials do not
oversubscribe cores.

A trial outlives a SIGKILLed orchestrator. `DIR/trainer.pid` records pid, process group and the
kernel's start time of the process; `reattach` accepts a pid only if all of them still match, so a
recycled pid is never mistaken for the trial (nor killed by a cancel).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from orchestrator.backends import register_backend
from orchestrator.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, require_config
from orchestrator.backends.process import (
    ProcessIdentity,
    log_header,
    state_from_exit,
    stop_groups,
    trainer_argv,
    trainer_command,
    trainer_env,
)
from orchestrator.spec import LocalBackendSpec, TrialPlan
from orchestrator.store import TrialDir


@register_backend("local")
class LocalBackend(Backend):
    """Up to `max_parallel` trainer subprocesses on this machine.

    options: `command` (argv list or string; default `$ORCHESTRATOR_TRAINER_COMMAND`, else
    `python -m trainer`; the backend appends `--config DIR/config.yaml --out DIR`), `grace_s` (seconds
    between SIGTERM and SIGKILL on cancel; the trainer checkpoints at the next step on SIGTERM),
    `env` (extra environment variables). resources: `cpus_per_trial` (threads per trial).
    """

    def __init__(self, spec: LocalBackendSpec) -> None:
        super().__init__(spec)
        self.command = trainer_command(spec.options.command)
        self.cpus_per_trial = spec.resources.cpus_per_trial
        self.grace_s = spec.options.grace_s
        self.extra_env = dict(spec.options.env)
        self._children: dict[str, subprocess.Popen] = {}  # job_id -> our own child processes
        self._adopted: dict[str, ProcessIdentity] = {}  # job_id -> processes reattached after a restart

    # -- submit -----------------------------------------------------------------------------------
    def submit(self, trial: TrialPlan, trial_dir: TrialDir, *, keep_fds: Sequence[int] = ()) -> JobHandle:
        if self.free_slots <= 0:
            raise BackendError(f"local backend is full ({self.active}/{self.max_parallel} trials running)")
        require_config(trial_dir)
        argv = trainer_argv(self.command, trial_dir.path)
        with open(trial_dir.log_path, "ab") as log:
            log_header(log, "orchestrator", argv)
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=trainer_env(self.cpus_per_trial, self.extra_env, os.environ),
                start_new_session=True, pass_fds=tuple(keep_fds),
            )
        info = {**ProcessIdentity.of(proc.pid).info(), "hostname": os.uname().nodename, "argv": argv}
        trial_dir.write_pid(info)
        job_id = str(proc.pid)
        self._children[job_id] = proc
        return JobHandle(trial_id=trial.trial_id, backend=self.name, job_id=job_id, run_dir=trial_dir.path,
                         log_path=trial_dir.log_path, info=info)

    # -- poll -------------------------------------------------------------------------------------
    def poll(self, handles: Iterable[JobHandle]) -> dict[str, JobState]:
        return {handle.trial_id: self._poll_one(handle) for handle in handles}

    def _poll_one(self, handle: JobHandle) -> JobState:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            returncode = proc.poll()
            if returncode is None:
                return JobState(JobStatus.RUNNING)
            del self._children[handle.job_id]
            return state_from_exit(handle, returncode)
        identity = self._adopted.get(handle.job_id)
        if identity is not None:
            if identity.is_alive():
                return JobState(JobStatus.RUNNING)
            del self._adopted[handle.job_id]
        return state_from_exit(handle, None)  # not our child: its exit code is gone

    @property
    def active(self) -> int:
        return len(self._children) + len(self._adopted)

    # -- cancel -----------------------------------------------------------------------------------
    def cancel_many(self, handles: Sequence[JobHandle], grace_s: float | None = None) -> None:
        """SIGTERM every job's process group at once, wait up to `grace_s`, then SIGKILL the rest."""
        grace = self.grace_s if grace_s is None else grace_s
        targets = [h for h in handles if self._is_running(h)]  # never a recycled pid's group
        stop_groups([(int(h.info.get("pgid", h.job_id)), lambda h=h: self._is_running(h)) for h in targets], grace)
        for handle in targets:
            self._wait_gone(handle)
        for handle in handles:
            self._children.pop(handle.job_id, None)
            self._adopted.pop(handle.job_id, None)

    def _is_running(self, handle: JobHandle) -> bool:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            return proc.poll() is None
        identity = self._adopted.get(handle.job_id) or ProcessIdentity.from_info(handle.info)
        return identity is not None and identity.is_alive()

    def _wait_gone(self, handle: JobHandle, timeout: float = 10.0) -> None:
        proc = self._children.get(handle.job_id)
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._is_running(handle):
            time.sleep(0.05)

    # -- reattach ---------------------------------------------------------------------------------
    def reattach(self, handle_dict: Mapping[str, Any]) -> JobHandle | None:
        handle = JobHandle.from_dict(handle_dict)
        if handle.info.get("hostname") not in (None, os.uname().nodename):
            return None  # another machine's process: not ours to watch
        identity = ProcessIdentity.from_info(handle.info)
        if identity is None or not identity.is_alive():
            return None
        on_disk = handle.trial_dir.read_pid()  # it must name this very process too (same pid and start time)
        if on_disk.get("pid") != identity.pid or on_disk.get("start_ticks") != identity.start_ticks:
            return None
        self._adopted[handle.job_id] = identity
        return handle

    def close(self) -> None:
        self._children.clear()
        self._adopted.clear()
