"""What one trial asks Slurm for: its resources and the sbatch parameters they become.

Resources of a trial, first found wins: the resources the spec wrote (`backend.resources`, exactly
the keys in its `model_fields_set`), the profile's `scales.<model.scale>`, the profile's
`defaults`. Partition/account/qos/constraint/setup/array_parallelism: the spec's options, then
the profile. `mem_gb` is per node, `cpus` and `gpus` per trial (split over its nodes), one task
per GPU (`tasks_per_node = gpus per node`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.backends.base import BackendError
from orchestrator.spec import ResourcesSpec, SlurmBackendSpec
from orchestrator.spec.profiles import PROFILE_RESOURCE_OF, Profile


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


def spec_resource_overrides(resources: ResourcesSpec) -> dict[str, Any]:
    """The spec's resources that override the profile, in profile keys: the ones the spec wrote."""
    values = resources.model_dump()
    return {PROFILE_RESOURCE_OF[key]: values[key] for key in sorted(resources.model_fields_set)
            if key in PROFILE_RESOURCE_OF}


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


def signal_delay_s(profile: Profile, time_min: int) -> int:
    """The profile's delay, but never more than half the time limit: a signal due before the job
    starts would requeue it forever."""
    delay = int(profile.signal_delay_s or default_signal_delay_s(time_min))
    return max(1, min(delay, max(30, time_min * 30)))


def stop_timeout_s(profile: Profile, signal_delay: float) -> float:
    """How long the job's wrapper waits for the trainer to checkpoint on the signal."""
    if profile.stop_timeout_s:
        return float(profile.stop_timeout_s)
    return max(10.0, float(signal_delay) - 15.0)


def executor_parameters(spec: SlurmBackendSpec, res: TrialResources, job_name: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters (sbatch flags) for one trial's resources."""
    profile, options = spec.profile, spec.options
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.time_min,
        "nodes": res.nodes,
        "ntasks_per_node": res.tasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "mem": f"{res.mem_mb}M",
        "signal_delay_s": signal_delay_s(profile, res.time_min),
        "additional_parameters": {"requeue": True, **dict(profile.sbatch)},
        "wckey": None,  # submitit's default "submitit" fails where wckeys are enforced
    }
    if res.gpus_per_node:
        params["gpus_per_node"] = res.gpus_per_node
    placement = {"partition": options.partition or profile.partition, "account": options.account or profile.account,
                 "qos": options.qos or profile.qos, "constraint": options.constraint or profile.constraint}
    params.update({key: str(value) for key, value in placement.items() if value})
    setup = [*profile.setup, *options.setup]
    if setup:
        params["setup"] = setup
    params["array_parallelism"] = int(options.array_parallelism or profile.array_parallelism or spec.max_parallel)
    return params
