"""Trials as Slurm jobs through submitit: job arrays, per-scale resources, preemption-safe requeue.

    backend.py           the backend (submit, poll, cancel, reattach)
    resources.py         what one trial asks for (spec resources beat the cluster profile)
    submission.py        code snapshot, sbatch script, pickled job, sbatch
    submitit_private.py  every use of submitit's private API
    job.py               what runs inside the job (the trainer, checkpointed and requeued)
    watcher.py           sacct/squeue, parsed and paced;  states.py: how an ended job ended
"""

from orchestrator.backends.slurm.backend import SlurmBackend

__all__ = ["SlurmBackend"]
