"""What a Slurm job runs: the trainer as a subprocess, checkpointed and requeued on preemption/timeout.

`SlurmTrial` is the callable submitit pickles and runs inside the job (one process per task). It
holds nothing but paths and settings, so a requeued job never resumes from stale pickled state:
the trainer resumes from its own output folder (`DIR/checkpoint.pt`, `DIR/mlflow_run_id`).

Signals, in a job:
- submitit asks Slurm for `--signal=USR2@<delay>` before the time limit; Slurm delivers it to every
  process of the job step, the trainer included. The trainer is started with SIGUSR2 *ignored*, so
  only this wrapper reacts: it forwards SIGUSR1 to its trainer (every task), and on task 0
  submitit calls `checkpoint()`, which waits for the trainer to save and exit (75), then requeues
  the job (`scontrol requeue`, same job id) with this same callable.
- preemption, `scontrol requeue` and `scancel` send SIGTERM to every process: the trainer saves a
  checkpoint at its next step and exits 75, submitit's wrapper ignores SIGTERM, and Slurm requeues
  or ends the job; the next start resumes from the checkpoint.

Per job (rank 0) the wrapper writes `DIR/slurm/<job id>.json`: where and when it ran and how the
trainer exited, which the backend reads to classify a failed job (exit 75 = interrupted). The
trainer's output is appended to `DIR/trainer.log` (other ranks: `DIR/slurm/<job id>_<rank>.trainer.log`).

The callable is pickled by value together with this module, `process.py` (the trainer's argv and
environment, shared with the other backends), `submitit_private.py` and `trainer.contract`: the job
runs the code of its submission, never this checkout's later edits, and never imports torch itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import submitit

from orchestrator.backends.process import log_header, trainer_argv, trainer_env
from orchestrator.backends.slurm.submitit_private import requeue_signal
from orchestrator.store import SLURM_SUBDIR
from trainer.contract import EXIT_INTERRUPTED, LOG_FILE, write_json_atomic

STOP_SIGNAL = signal.SIGUSR1  # what the trainer hears from us: checkpoint at the next step, exit 75


class TrialInterrupted(RuntimeError):
    """The trainer stopped at a checkpoint because something signalled it (exit 75): resumable."""


class TrialFailed(RuntimeError):
    """The trainer ended without finishing (its result.json, when there is one, says why)."""


def master_port(job_id: str) -> int:
    """A port every task of one job agrees on without talking: derived from the job id."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def attempt_file(run_dir: Path, job_id: str) -> Path:
    return Path(run_dir) / SLURM_SUBDIR / f"{job_id}.json"


class SlurmTrial(submitit.helpers.Checkpointable):
    """`python -m trainer --config DIR/config.yaml --out DIR` inside a Slurm job, resumable.

    command: the trainer command without --config/--out (default: this job's python -m trainer);
    snapshot: a folder holding the `trainer` package as it was at submission, put first on
    PYTHONPATH; threads: cpus per task (OMP/MKL threads); env: extra environment variables;
    stop_timeout_s: how long checkpoint() waits for the trainer to save and exit before killing it.
    """

    def __init__(self, trial_id: str, run_dir: str | Path, *, command: Sequence[str] | None = None,
                 snapshot: str | Path | None = None, threads: int = 1, env: Mapping[str, str] | None = None,
                 stop_timeout_s: float = 60.0) -> None:
        self.trial_id = str(trial_id)
        self.run_dir = str(run_dir)
        self.command = list(command) if command else None
        self.snapshot = str(snapshot) if snapshot else None
        self.threads = int(threads)
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.stop_timeout_s = float(stop_timeout_s)
        self._proc: subprocess.Popen | None = None
        self._stopping = False

    # Only the settings travel in the pickle; the live process and flags never do.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._proc = None
        self._stopping = False

    # -- in the job -------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        job = submitit.JobEnvironment()
        run_dir = Path(self.run_dir)
        slurm_dir = run_dir / SLURM_SUBDIR
        slurm_dir.mkdir(parents=True, exist_ok=True)
        rank = job.global_rank
        self._link_submitit_logs(job, slurm_dir)
        argv = trainer_argv(self.command, run_dir)
        log_path = run_dir / LOG_FILE if rank == 0 else slurm_dir / f"{job.job_id}_{rank}.trainer.log"
        record: dict[str, Any] = {
            "job_id": job.job_id, "raw_job_id": job.raw_job_id, "trial_id": self.trial_id, "rank": rank,
            "world_size": job.num_tasks, "host": socket.gethostname(), "started_at": time.time(),
            "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), "argv": argv,
            "snapshot": self.snapshot, "trainer_exit": None, "ended_at": None,
        }
        # Our stop signal for the trainer; submitit's own handler (requeue on task 0) runs after it.
        previous = signal.getsignal(requeue_signal())
        signal.signal(requeue_signal(), lambda s, f: self._on_usr_signal(s, f, previous))
        with open(log_path, "ab") as log:
            restart = f" restart {record['restart_count']}" if record["restart_count"] else ""
            log_header(log, f"slurm job {job.job_id}{restart} task {rank}/{job.num_tasks} on {record['host']}", argv)
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                          env=self._trainer_env(job), preexec_fn=_ignore_submitit_signal)
            record["trainer_pid"] = self._proc.pid
            if rank == 0:
                write_json_atomic(attempt_file(run_dir, job.job_id), record)
            returncode = None
            try:
                # Poll rather than block in wait(): the signal handler must be able to reap the trainer.
                while (returncode := self._proc.poll()) is None:
                    time.sleep(0.2)
            finally:  # also when submitit's handler ends the job from inside the loop (requeue, no requeue)
                record.update(trainer_exit=self._proc.returncode, ended_at=time.time(),
                              requeue_requested=self._stopping)
                if rank == 0:
                    write_json_atomic(attempt_file(run_dir, job.job_id), record)
        if returncode == 0:
            return {"trial_id": self.trial_id, "trainer_exit": 0}
        if returncode == EXIT_INTERRUPTED or self._stopping:
            raise TrialInterrupted(f"trial {self.trial_id}: the trainer stopped at a checkpoint (exit 75)")
        raise TrialFailed(f"trial {self.trial_id}: the trainer exited with code {returncode} (see {log_path})")

    def _trainer_env(self, job: Any) -> dict[str, str]:
        more: dict[str, str] = {}
        if self.snapshot:  # the code as it was at submission, ahead of the live checkout
            more["PYTHONPATH"] = os.pathsep.join([self.snapshot, *filter(None, [os.environ.get("PYTHONPATH")])])
        # torch.distributed over env://, one task per GPU (a single task is world size 1).
        hosts = list(job.hostnames) or [job.hostname]
        more.update({
            "RANK": str(job.global_rank), "WORLD_SIZE": str(job.num_tasks), "LOCAL_RANK": str(job.local_rank),
            "LOCAL_WORLD_SIZE": str(max(1, job.num_tasks // max(1, job.num_nodes))),
            "MASTER_ADDR": hosts[0], "MASTER_PORT": str(master_port(job.raw_job_id)),
        })
        return trainer_env(self.threads, self.env, os.environ, more)

    def _link_submitit_logs(self, job: Any, slurm_dir: Path) -> None:
        """DIR/slurm/<job id>_<task>.out/.err -> submitit's logs, when they live elsewhere."""
        try:
            paths = job.paths
            for source, suffix in ((paths.stdout, "out"), (paths.stderr, "err")):
                link = slurm_dir / f"{job.job_id}_{job.global_rank}.{suffix}"
                if Path(source).resolve().parent == slurm_dir.resolve() or link.exists():
                    continue
                link.symlink_to(source)
        except (OSError, KeyError):
            pass  # logs are a convenience; never fail the job for them

    # -- signals ----------------------------------------------------------------------------------
    def _on_usr_signal(self, signum: int, frame: Any, previous: Any) -> None:
        self._signal_trainer()
        if callable(previous):  # submitit: on task 0 calls checkpoint() and requeues, elsewhere returns
            previous(signum, frame)

    def _signal_trainer(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(STOP_SIGNAL)
            except ProcessLookupError:
                pass

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit (task 0) on the time-limit/preemption signal: stop the trainer at a
        checkpoint, then requeue this same callable; the next start resumes from DIR."""
        self._stopping = True
        self._signal_trainer()
        proc = self._proc
        deadline = time.monotonic() + self.stop_timeout_s
        while proc is not None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc is not None and proc.poll() is None:  # hung: the last periodic checkpoint will do
            proc.kill()
            proc.wait()
        fresh = SlurmTrial(self.trial_id, self.run_dir, command=self.command, snapshot=self.snapshot,
                           threads=self.threads, env=self.env, stop_timeout_s=self.stop_timeout_s)
        return submitit.helpers.DelayedSubmission(fresh)

    def __repr__(self) -> str:
        return f"SlurmTrial({self.trial_id}, {self.run_dir})"


def _ignore_submitit_signal() -> None:
    """In the trainer (before exec): ignore submitit's signal (USR2), which Slurm sends to every
    process of the step and whose default action would kill the trainer without a checkpoint."""
    signal.signal(requeue_signal(), signal.SIG_IGN)
