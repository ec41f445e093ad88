"""Trials on a Ray cluster: one detached, named Ray actor per attempt runs `python -m trainer` as a subprocess.

Why actors, and not Ray Tune or plain tasks:
- Ray Tune wants to own the loop: its own trial scheduler, retries, checkpoint bookkeeping and
  results. Here the runner owns all of that (ledger, retry budget, failure classes, MLflow), and
  the trainer owns its checkpoints; Tune would be a second, conflicting source of truth.
- Plain tasks fit submit/poll/`ray.cancel`, but they fate-share with the driver: when the
  orchestrator dies, Ray kills its tasks, and a new orchestrator has no way to find one again
  (reattach could only ever say "gone"). `ray.cancel(force=True)` also kills the worker without
  letting the trainer checkpoint.
- A *detached, named, threaded* actor is a task with an address: its constructor starts the
  trainer (GCS owns the creation of a detached actor, so it survives the orchestrator), `result()`
  returns when the attempt ends, `stop()` (SIGTERM to the trainer, so it checkpoints and exits 75;
  SIGKILL after `grace_s`) answers concurrently, and a restarted orchestrator finds it again with
  `ray.get_actor(name)`.

One attempt, step by step:
    submit   -> actor `trial-<trial id>-<attempt nonce>` (num_cpus=cpus_per_trial, num_gpus=gpus_per_trial,
                memory=mem_gb) is created; the handle keeps its name, the ref of `result()` is polled
    actor    -> waits until no earlier trainer holds `DIR/.trainer.lock` (a previous attempt may still
                be writing its checkpoint), starts the trainer in its own session with that lock
                inherited and PR_SET_PDEATHSIG=SIGTERM (if the Ray worker dies, the trainer checkpoints
                and exits instead of living on unsupervised), writes `DIR/trainer.pid` (pid, host,
                worker pid, attempt), enforces `time_min`, and records the exit code in `trainer.pid`
    poll     -> one `ray.wait(refs, num_returns=len(refs), timeout=0)` for all jobs; a finished job's
                verdict is `DIR/result.json` when the trainer wrote one, else the exit code (75:
                preempted, signal: killed, time limit: timeout), else what Ray reports (the actor
                died: killed). The actor is then killed to free its resources.

Retries: Ray-side retries are off (`max_restarts=0`). A worker or node that dies mid-trial fails the
attempt as `killed`, a transient class, so the runner spends one retry from its budget, records the
attempt in the ledger, and submits again; the new attempt resumes from `DIR/checkpoint.pt` and the
trainer continues its MLflow run (`DIR/mlflow_run_id`). One retry policy, one count of attempts.

Clusters: `options.address` (`ray://head:10001`, `auto`, `head:6379`) connects to a running cluster;
the run dirs (and this checkout, the trainer's working directory) must be on a filesystem every
worker sees. Without an address a local cluster is started with `ray.init(address="local")`; it
dies with the orchestrator (Ray then SIGKILLs the trainers, which resume from their last periodic
checkpoint), so its trials cannot be re-attached: `reattach` returns None and the runner restarts
them without spending a retry. On a real cluster, trials outlive the orchestrator and `reattach`
finds their actors by name; an actor nobody collects frees its resources `linger_s` after its
trainer ended (the verdict stays on disk: result.json, and the exit code in trainer.pid).

Ray is imported lazily (first connect/submit/poll/reattach), so sweeps on other backends never pay for it.

    actor.py    the actor: one attempt of one trial on a worker
    backend.py  the backend, in the orchestrator (the Ray driver)
    outcome.py  how an attempt ended, as a job state
"""

from orchestrator.backends.ray.backend import RayBackend

__all__ = ["RayBackend"]
