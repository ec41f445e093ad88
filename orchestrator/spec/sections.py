"""The spec's sections besides the axes: `backend` (with the Slurm cluster profile it names),
`tracking`, `report` (and its metrics against what the trials measure) and `search`, each checked
into its model with every problem recorded.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.spec.axes import check_cell
from orchestrator.spec.problems import KeyPath, Problems, dotted, pydantic_problems, unknown_key_message
from orchestrator.spec.profiles import PROFILE_WHERE, Profile, find_profile, read_profile
from orchestrator.spec.schema import (
    BACKEND_KEYS,
    BACKEND_KINDS,
    BACKEND_OPTIONS,
    BACKEND_SPECS,
    CONTROLS,
    DEFAULT_METRICS,
    Axis,
    BackendSpec,
    LocalBackendSpec,
    ReportSpec,
    ResourcesSpec,
    _BackendCommon,
)
from orchestrator.spec.search import FINAL_METRICS, INTERMEDIATE_METRICS, SearchSpec, format_value
from orchestrator.spec.trial_keys import RESERVED_TRIAL_KEYS, trial_key_problem, validate_trial, with_values
from trainer.config import TrialConfig
from trainer.contract import VALIDATION_PREFIX
from trainer.metric_names import metric_table


def parse_section(model: type[BaseModel], raw: Any, path: KeyPath, problems: Problems) -> Any:
    """`raw` (the section at `path`) as `model`; the model's defaults when it does not fit. Strict:
    YAML gives every scalar its type, so `true` is no integer and `"4"` no number (ints pass as floats)."""
    if raw is None:
        return model()
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return model()
    try:
        return model.model_validate(raw, strict=True)
    except ValidationError as err:
        for loc, message in pydantic_problems(err, model):
            problems.add(path + loc, message)
        return model()


def parse_backend(raw: Any, problems: Problems) -> BackendSpec | None:
    """The `backend:` section as the model of its kind (None when it has problems). A Slurm
    backend's cluster profile is loaded here, so a missing or broken one is a spec problem."""
    path = ("backend",)
    if raw is None:
        return LocalBackendSpec()
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return None
    start = len(problems.messages)
    raw = dict(raw)
    kind = raw.get("kind", "local")
    if kind not in BACKEND_KINDS:
        problems.add(path + ("kind",), f"expected one of {', '.join(BACKEND_KINDS)}, got {kind!r}")
        kind = None
    options = raw.pop("options", None) or {}
    if not isinstance(options, dict):
        problems.add(path + ("options",), f"expected a mapping, got {type(options).__name__}")
        options = {}
    options = dict(options)
    written_at = {key: path + ("options", str(key)) for key in options}  # for error paths
    all_option_keys = {k for model in BACKEND_OPTIONS.values() for k in model.model_fields}
    for key in [k for k in raw if k not in BACKEND_KEYS and k in all_option_keys]:
        # Kind-specific keys may sit directly under `backend:` too; they are options either way.
        if key in options:
            problems.add(path + (key,), "set both here and under backend.options")
        options[key] = raw.pop(key)
        written_at[key] = path + (key,)
    for key in raw:
        if key not in BACKEND_KEYS:
            allowed = list(BACKEND_KEYS) + (list(BACKEND_OPTIONS[kind].model_fields) if kind else [])
            problems.add(path + (str(key),), unknown_key_message(str(key), allowed))
    core = parse_section(_BackendCommon, {k: v for k, v in raw.items() if k in ("max_parallel", "retries")},
                         path, problems)
    # Only the written keys are set (model_fields_set): a cluster profile fills in the rest.
    resources = parse_section(ResourcesSpec, raw.get("resources"), path + ("resources",), problems)
    if kind and kind != "slurm" and resources.nodes > 1:
        problems.add(path + ("resources", "nodes"), f"multi-node trials need the slurm backend (kind is {kind})")
    if resources.gpus_per_trial % resources.nodes:
        problems.add(path + ("resources", "gpus_per_trial"), f"the trial's GPUs ({resources.gpus_per_trial}) "
                     f"must split evenly over its {resources.nodes} nodes")
    if kind is None:
        return None
    model = BACKEND_OPTIONS[kind]
    for key in list(options):
        if key not in model.model_fields:
            owners = [k for k, m in BACKEND_OPTIONS.items() if key in m.model_fields]
            hint = f"an option of the {'/'.join(owners)} backend, not {kind}" if owners else "unknown option"
            problems.add(written_at[key], f"{hint}; {kind} options: {', '.join(model.model_fields)}")
            options.pop(key)
    parsed = parse_section(model, options, path + ("options",), problems)
    settings = {**core.model_dump(exclude_unset=True), "resources": resources, "options": parsed}
    if kind == "slurm":
        settings["profile"] = _slurm_profile(parsed.profile, problems)
    if len(problems.messages) > start:
        return None
    return BACKEND_SPECS[kind].model_validate(settings)


def _slurm_profile(name: str | None, problems: Problems) -> Profile | None:
    where = tuple(PROFILE_WHERE.split("."))
    path, why = find_profile(name)
    if path is None:
        problems.add(where, why)
        return None
    profile, found = read_profile(path)
    for problem in found:
        problems.add(where, f"cluster profile {path}: {problem}")
    return profile


def parse_report(
    raw: Any, declared: list[str], by_name: dict[str, Axis], baseline: dict[str, str] | None, problems: Problems
) -> ReportSpec:
    path = ("report",)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        raw = {}
    for key in raw:
        if key not in ReportSpec.model_fields:
            problems.add(path + (str(key),), unknown_key_message(str(key), ReportSpec.model_fields))
    compare = raw.get("compare", list(declared))
    if not isinstance(compare, list) or not compare:
        problems.add(path + ("compare",), "expected a non-empty list of axis names or [axis, axis] crossings")
        compare = []
    checked: list[str | list[str]] = []
    for i, entry in enumerate(compare):
        crossing = [entry] if isinstance(entry, str) else entry
        if not isinstance(crossing, list) or not crossing or not all(isinstance(a, str) for a in crossing):
            problems.add(path + ("compare", str(i)), f"expected an axis name or a list of axis names, got {entry!r}")
            continue
        for axis_name in crossing:
            if axis_name not in declared:
                problems.add(path + ("compare", str(i)), f"unknown axis {axis_name!r}; axes: {', '.join(declared)}")
        if len(set(crossing)) != len(crossing):
            problems.add(path + ("compare", str(i)), f"an axis appears twice in {crossing}")
        checked.append(entry if isinstance(entry, str) else list(entry))
    metrics = raw.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) and m for m in metrics):
        problems.add(path + ("metrics",), f"expected a non-empty list of metric names, got {metrics!r}")
        metrics = list(DEFAULT_METRICS)
    elif len(set(metrics)) != len(metrics):
        problems.add(path + ("metrics",), "duplicate metric names")
    report_baseline = check_cell(raw.get("baseline"), path + ("baseline",), declared, by_name, problems)
    output = raw.get("output")
    if output is not None and not (isinstance(output, str) and output.endswith(".md")):
        problems.add(path + ("output",), f"expected the path of a Markdown file, e.g. reports/ablation.md, got {output!r}")
        output = None
    per_metric = {key: _per_metric_numbers(raw.get(key), path + (key,), metrics, problems)
                  for key in ("target_effects", "paired_sd")}
    return ReportSpec(compare=checked, metrics=metrics, baseline=report_baseline or baseline,
                      output=Path(output) if output else None, controls=_controls(raw.get("controls"), problems),
                      **per_metric)


def _controls(raw: Any, problems: Problems) -> list[str]:
    """`report.controls`: a list of distinct names of CONTROLS; bad entries are dropped."""
    path = ("report", "controls")
    menu = ", ".join(f"{name} ({label})" for name, label in CONTROLS.items())
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(path, f"expected a list of control names, e.g. [{', '.join(CONTROLS)}]; controls: {menu}")
        return []
    out: list[str] = []
    for i, name in enumerate(raw):
        if not isinstance(name, str) or name not in CONTROLS:
            close = difflib.get_close_matches(str(name), CONTROLS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.add(path + (str(i),), f"unknown control {name!r}; {hint}controls: {menu}")
        elif name in out:
            problems.add(path + (str(i),), f"{name!r} is listed twice; list each control once")
        else:
            out.append(name)
    return out


def _per_metric_numbers(raw: Any, path: KeyPath, metrics: list[str], problems: Problems) -> dict[str, float]:
    """`report.target_effects` / `report.paired_sd`: metric of report.metrics -> a positive number
    in the metric's logged units. Problems name the key and the fix; bad entries are dropped."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping of metric -> number (logged units, e.g. {{seg_miou: 0.01}}), "
                     f"got {type(raw).__name__}")
        return {}
    out: dict[str, float] = {}
    for name, value in raw.items():
        where = path + (str(name),)
        if name not in metrics:
            close = difflib.get_close_matches(str(name), metrics, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            problems.add(where, f"{name!r} is not one of report.metrics ({', '.join(metrics)}); {hint}"
                         "add it to report.metrics or fix the name")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
            problems.add(where, f"expected a positive number in the metric's logged units (seg_miou 0.01 = 1 point), "
                         f"got {value!r}")
        else:
            out[name] = float(value)
    return out


def check_report_metrics(metrics: list[str], trials: list[TrialConfig], problems: Problems) -> None:
    """Each of `report.metrics` must be a metric some trial of the sweep reports."""
    tables: list[dict[str, str | None]] = []  # per trial, built only as far as a metric needs
    for i, name in enumerate(metrics):
        why = None
        for j, trial in enumerate(trials):
            if j == len(tables):
                tables.append(metric_table(trial))
            if name in tables[j] and tables[j][name] is None:
                break
            why = why or tables[j].get(name)
        else:
            where = ("report", "metrics", str(i))
            if why is not None:
                problems.add(where, f"no trial of the sweep measures {name!r}: {why} (in base or an axis value)")
            else:
                close = difflib.get_close_matches(name, tables[0], n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                problems.add(where, f"unknown metric {name!r}; {hint}the trials report: {_metric_menu(tables[0])}")


def _metric_menu(table: dict[str, str | None]) -> str:
    """The metric names of one trial's table, the per-block and per-component ones folded."""
    names = [n for n in table if not n.startswith(("tokens/block", "params_added/"))]
    blocks = sorted({int(n.split("/")[1].removeprefix("block")) for n in table if n.startswith("tokens/block")})
    measures = sorted({n.rsplit("/", 1)[1] for n in table if n.startswith("tokens/block")})
    return ", ".join(names + ["params_added/<specialized component>"]
                     + ([f"tokens/block<0..{blocks[-1]}>/{{{','.join(measures)}}}"] if blocks else []))


def parse_search(raw: Any, base: dict[str, Any], axes: list[Axis], problems: Problems) -> SearchSpec | None:
    """The `search:` section; each tuned key must be a trial setting no axis sets, and each of its
    values (the range's ends, every choice) a valid value of that setting on the base."""
    if raw is None:
        return None
    path = ("search",)
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return None
    try:
        search = SearchSpec.model_validate(raw, strict=True)  # strict as parse_section
    except ValidationError as err:
        for loc, message in pydantic_problems(err, SearchSpec):
            problems.add(path + loc, message)
        return None
    known = [VALIDATION_PREFIX + m for m in FINAL_METRICS]
    if not search.metric.startswith(VALIDATION_PREFIX):
        problems.add(path + ("metric",), f"{search.metric!r} is a test-split metric: a search selects on the "
                     f"validation split; use {VALIDATION_PREFIX}{search.metric} (one of {', '.join(known)})")
    elif search.metric not in known:
        problems.add(path + ("metric",), f"unknown metric {search.metric!r}; one of {', '.join(known)}")
    fraction = (base.get("data") or {}).get("val_fraction") if isinstance(base.get("data"), dict) else None
    if not fraction:
        problems.add(("base", "data", "val_fraction"), "a search needs a validation split held out of the "
                     "training data: set base.data.val_fraction (e.g. 0.125)")
    if search.pruner != "none":
        every = (base.get("evaluation") or {}).get("every_steps") if isinstance(base.get("evaluation"), dict) else None
        if not every:
            problems.add(("base", "evaluation", "every_steps"), f"pruner {search.pruner} compares learning curves: "
                         "set base.evaluation.every_steps (e.g. a quarter of schedule.steps), or search.pruner: none")
        if search.metric.startswith(VALIDATION_PREFIX) and search.metric not in INTERMEDIATE_METRICS:
            problems.add(path + ("pruner",), f"{search.metric} is only measured at the end of training, so it cannot "
                         f"prune; use search.pruner: none, or a metric measured during training "
                         f"({', '.join(INTERMEDIATE_METRICS)})")
    axis_keys = {key: axis.name for axis in axes for key in axis.keys}
    for key, param in search.params.items():
        where = path + ("params", key)
        parts = key.split(".")
        if parts[0] in RESERVED_TRIAL_KEYS:
            problems.add(where, f"{key} cannot be searched: {RESERVED_TRIAL_KEYS[parts[0]]}")
            continue
        if (problem := trial_key_problem(parts)) is not None:
            problems.add(where, problem)
            continue
        if key in axis_keys:
            problems.add(where, f"axis {axis_keys[key]!r} sets {key}: a setting is either an axis or searched, not both")
            continue
        if search.sampler == "grid" and param.grid is None:
            problems.add(where, "the grid sampler needs a finite set: give choices, or a step for the range")
        for value in param.edge_values():
            _, errors = validate_trial(with_values(base, [{key: value}]))
            for loc, message in errors:
                if dotted(loc) == key:
                    problems.add(where, f"value {format_value(value)}: {message}")
    return search
