"""The report's controls (`report.controls`) as trials: the floor under every number of a sweep.

    untrained   the baseline's architecture at its random initialization, through the same probes
    pixels      the raw normalized pixel patches as features (the trainer's `evaluation.features: pixels`)

Each is derived from the sweep's baseline cell (the reference row of its tables) at its first seed,
with `schedule.steps: 0` (evaluate the initial model), and every setting that cannot change the
control's numbers set to its default. So two sweeps on the same data setup ask for the same
control (same config, same trial id): the second finds it done in the shared store and reuses it.
"""

from __future__ import annotations

import copy
from typing import Any

from orchestrator import identity
from orchestrator.spec.expansion import expand
from orchestrator.spec.problems import SpecError
from orchestrator.spec.schema import SweepSpec, TrialPlan
from orchestrator.spec.trial_keys import set_leaf, validate_trial
from orchestrator.stats.design import resolve_baseline
from trainer.config import TrialConfig

DEFAULTS: dict[str, Any] = TrialConfig().model_dump(mode="json")
# What of the baseline's model an untrained control keeps: its architecture and initial weights.
UNTRAINED_MODEL_KEYS = ("scale", "reg_tokens", "layer_scale_init", "pretrained", "resample_pretrained",
                        "no_embed_class", "embed_dim", "depth", "num_heads", "mlp_ratio", "match_params_of")


def baseline_config(spec: SweepSpec) -> dict[str, Any]:
    """The resolved config of the sweep's baseline cell at its first seed (as `expand` builds it,
    whether or not the cell is one the sweep runs)."""
    config = copy.deepcopy(spec.resolution.base_dump)
    baseline = resolve_baseline(spec)
    for axis, patches in zip(spec.axes, spec.resolution.patches):
        for path, value in patches[baseline[axis.name]]:
            set_leaf(config, path, value)
    config["seed"] = spec.seeds[0]
    return config


def control_config(control: str, cell: TrialConfig) -> dict[str, Any]:
    """The trial config of `control` for the (validated) baseline cell `cell`: only what can change
    the control's numbers is kept, the rest is the default, so that equal setups give equal ids."""
    model = cell.model
    # Image and patch size written out: `scale: tiny` and `scale: tiny, img_size: 224` are one setup.
    sizes = {"img_size": model.resolved_img_size, "patch_size": model.resolved_patch_size}
    evaluation = {**cell.evaluation.model_dump(mode="json"), "every_steps": 0}  # the same probes; no training
    if control == "untrained":
        # The architecture and its initialization: scale, sizes, registers, LayerScale's init value
        # (at init it scales every block's output) and a pretrained checkpoint, and the seed (the
        # init stream). Specialization goes back to none: untrained, a specialized layer is only
        # another random draw (its two branches initialized apart), not another floor, and with
        # none the floor is one trial for every arm and every sweep. Drop-path is off in evaluation;
        # `registers_follow` matters only to a specialized model; the framework only decides how
        # training would go (DINOv2's evaluated teacher starts as a copy of the student).
        seed = cell.seed
        written = model.model_dump(mode="json")
        model_section = {**DEFAULTS["model"], **sizes,
                         **{key: written[key] for key in UNTRAINED_MODEL_KEYS}}
    else:
        # Pixels read only the patch size of the model (and the image size of the data): the smallest
        # scale builds it, and nothing random is drawn (the data has its own seed, the probes EVAL_SEED).
        seed = 0
        model_section = {**DEFAULTS["model"], **sizes}
        evaluation.update(features="pixels", token_interaction=False)  # no blocks to analyse
    return {
        **DEFAULTS,
        "seed": seed,
        "model": model_section,
        # Every data setting decides the probes' images; the loader's workers serve training only.
        "data": {**cell.data.model_dump(mode="json"), "num_workers": DEFAULTS["data"]["num_workers"]},
        # No step is taken. The batch size stays: the trainer still checks it against the training
        # set and the process count, which the baseline's batch size passes by construction.
        "schedule": {**DEFAULTS["schedule"], "steps": 0, "warmup_steps": 0, "batch_size": cell.schedule.batch_size},
        "evaluation": evaluation,
        # Where it runs (the device, its share of the cores); compile and precision serve training only
        # (the evaluation sets its own autocast).
        "runtime": {**DEFAULTS["runtime"], "device": cell.runtime.device, "threads": cell.runtime.threads},
    }


def control_trials(spec: SweepSpec, code_version: str | None = None) -> list[TrialPlan]:
    """One trial per `report.controls` entry, in its order; [] when the spec asks for none."""
    if not spec.report.controls:
        return []
    version = code_version or identity.code_version()
    baseline = baseline_config(spec)
    cell, errors = validate_trial(baseline)
    if cell is None:
        where = ", ".join(f"{axis}={value}" for axis, value in resolve_baseline(spec).items())
        details = "; ".join(f"{'.'.join(loc)}: {message}" for loc, message in errors)
        raise SpecError([f"{spec.source}: report.controls: the controls derive from the baseline cell ({where}), "
                         f"which is not a valid trial ({details}); set `baseline` to a cell of the sweep"])
    plans = []
    for control in spec.report.controls:
        config, problems = validate_trial(control_config(control, cell))
        assert config is not None, f"control {control}: {problems}"  # built from a valid cell: a bug otherwise
        dump = config.model_dump(mode="json") | {"name": f"{spec.name}/control={control}"}
        plans.append(TrialPlan(trial_id=identity.trial_id(dump, version), cell={}, seed=config.seed,
                               config=dump, control=control))
    return plans


def plain_sweep_trials(spec: SweepSpec, code_version: str | None = None) -> list[TrialPlan]:
    """What a sweep without a search asks for: its expanded cells, then the report's controls."""
    return [*expand(spec, code_version=code_version), *control_trials(spec, code_version)]
