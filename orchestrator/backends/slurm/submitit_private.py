"""Every use of submitit's private API, in one place. Written against submitit 1.5.4.

We use submitit for what it does well (the sbatch script, the pickled callable, the job's
checkpoint-and-requeue on the time-limit signal) but run `sbatch` and watch jobs ourselves (one
`sacct` for a whole sweep, job arrays of any trials). That needs four of its internals; when
submitit changes, this module is the one to fix (tests/golden/sbatch_*.txt show the scripts).

The Slurm job imports this module too (pickled by value with the job's callable), so it imports
nothing of this project.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmExecutor


class _ScriptOnlyExecutor(SlurmExecutor):
    """Validates parameters and writes the sbatch script; never submits, so it need not insist on
    `srun` being installed where the orchestrator runs."""

    @classmethod
    def affinity(cls) -> int:  # private contract: > 0 means "this executor can work here"
        return 2


def sbatch_script_text(folder: Path | str, parameters: dict[str, Any], *, array_size: int, max_num_timeout: int,
                       python: str | None) -> str:
    """The sbatch script submitit would write for these executor parameters (one job, or an
    array of `array_size` tasks when > 1); `array_parallelism` is taken out of `parameters`."""
    executor = _ScriptOnlyExecutor(folder, max_num_timeout=max_num_timeout, python=python)
    array_parallelism = parameters.pop("array_parallelism")
    executor.update_parameters(**parameters)
    if array_size > 1:  # what submitit's own map_array sets (update_parameters refuses map_count)
        executor.parameters["map_count"] = array_size
        executor.parameters["array_parallelism"] = array_parallelism
    return executor._make_submission_file_text(executor._submitit_command_str, uuid.uuid4().hex)


def requeue_signal() -> signal.Signals:
    """The signal submitit's job wrapper checkpoints and requeues on (USR2 unless configured)."""
    return submitit.JobEnvironment._usr_sig()
