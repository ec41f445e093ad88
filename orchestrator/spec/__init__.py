"""Sweep specs: the YAML schema, loading with `--set` overrides, validation, and expansion into trials.

A spec is a partial trial config (`base`) plus named axes of dotted keys into it:

    name: component_ablation
    base: {framework: supervised, model: {scale: micro}}
    axes:
      specialization:                     # axis name: used in cell labels and the report
        key: model.specialization         # one dotted key into trainer.config.TrialConfig ...
        values: {none: none, paper: paper}
      setup:                              # ... or several keys set together by one named value
        keys: [model.specialization, model.reg_tokens]
        values:
          paper_regs: {model.specialization: paper, model.reg_tokens: 4}
          plain: {model.specialization: none, model.reg_tokens: 0}
      model.scale: [micro, tiny]          # short form: named by the key; values named by their text
    expand: grid                          # grid | zip | one_at_a_time
    seeds: [0, 1]
    seeds_by_cell:                        # optional: cells that run other seeds (seed_rules.py)
      - {cell: {specialization: norms}, seeds: [0]}

Everything is checked before anything runs, and every problem is reported at once as
`FILE: KEY.PATH: what was expected (line N)`. A mapping value on a key that is a whole section
(`key: data.scenes`, `values: {small: {train_size: 256}}`) is merged into the base's section.

The package, in the order a spec goes through it:

    loading.py      YAML with line numbers, `--set` overrides, load_spec
    validation.py   the whole spec checked (axes.py: axes and cells; sections.py: backend with the
                    Slurm profile (profiles.py), tracking, report, search (search.py))
    seed_rules.py   `seeds` and `seeds_by_cell`: which seeds each cell runs, and the pairing check
    expansion.py    resolution (once, during validation), cells, expand, spec_hash
    controls.py     the report's controls as trials, derived from the baseline cell (imported
                    from orchestrator.spec.controls: it reads the baseline rule of orchestrator.stats)
    schema.py       the models a checked spec is made of; problems.py: SpecError and the wording
                    of problems; trial_keys.py: the trial schema as a spec sees it
"""

from orchestrator.spec.expansion import expand, spec_hash
from orchestrator.spec.loading import load_spec
from orchestrator.spec.problems import SpecError
from orchestrator.spec.profiles import Profile, load_profile
from orchestrator.spec.schema import (
    DEFAULT_METRICS,
    Axis,
    BackendSpec,
    LocalBackendSpec,
    LocalOptions,
    RayBackendSpec,
    RayOptions,
    ReportSpec,
    ResourcesSpec,
    SlurmBackendSpec,
    SlurmOptions,
    SweepSpec,
    TrackingSpec,
    TrialPlan,
    cell_label,
    cell_text,
)
from orchestrator.spec.search import (
    FINAL_METRICS,
    INTERMEDIATE_METRICS,
    SearchParam,
    SearchSpec,
    format_value,
    params_label,
)
from orchestrator.spec.trial_keys import RESERVED_TRIAL_KEYS, trial_key_problem
from orchestrator.spec.validation import check_trial_files

__all__ = [
    "check_trial_files",
    "DEFAULT_METRICS", "FINAL_METRICS", "INTERMEDIATE_METRICS", "RESERVED_TRIAL_KEYS", "Axis", "BackendSpec",
    "LocalBackendSpec", "LocalOptions", "Profile", "RayBackendSpec", "RayOptions", "ReportSpec", "ResourcesSpec",
    "SearchParam", "SearchSpec", "SlurmBackendSpec", "SlurmOptions", "SpecError", "SweepSpec", "TrackingSpec",
    "TrialPlan", "cell_label", "cell_text", "expand", "format_value", "load_profile", "load_spec", "params_label", "spec_hash",
    "trial_key_problem",
]
