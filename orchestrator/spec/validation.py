"""The check of a whole spec: from the raw mapping (after `--set`) to a SweepSpec, recording every
problem; then the checks that need the cells' trials (a baseline that is a cell, combinations of
axes that only together make an invalid trial, the report's metrics). `check_trial_files` adds,
before a run, the folders and files each trial reads: `plan`, `status` and `report` do not need them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from orchestrator.spec.axes import check_cell, check_exclude, check_include, parse_axes
from orchestrator.spec.expansion import cells_of, matches, resolve
from orchestrator.spec.problems import Problems, dotted, unknown_key_message
from orchestrator.spec.schema import EXPAND_MODES, TOP_LEVEL_KEYS, SweepSpec, TrackingSpec
from orchestrator.spec.seed_rules import check_seed_rules, check_seeds, parse_seed_rules
from orchestrator.spec.sections import check_report_metrics, parse_backend, parse_report, parse_search, parse_section
from orchestrator.spec.trial_keys import RESERVED_TRIAL_KEYS, validate_trial, with_values
from trainer.config import KeyPath, TrialConfig, check_files, training_problems
from trainer.path_checks import tracking_uri_problem

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def validate(raw: dict[str, Any], path: Path, overrides: list[str], problems: Problems) -> SweepSpec | None:
    """The spec in `raw` (read from `path`, after `overrides`), or None with its problems recorded."""
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.add((str(key),), unknown_key_message(str(key), TOP_LEVEL_KEYS))

    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        problems.add(("name",), f"expected letters, digits, '_', '.', '-' (it names a directory), got {name!r}")
        name = path.stem
    description = raw.get("description") or ""
    if not isinstance(description, str):
        problems.add(("description",), f"expected a string, got {type(description).__name__}")
        description = ""
    output_dir = raw.get("output_dir") or f"runs/{name}"
    if not isinstance(output_dir, str):
        problems.add(("output_dir",), f"expected a path, got {type(output_dir).__name__}")
        output_dir = f"runs/{name}"

    base = _check_base(raw.get("base"), problems)
    axes, declared = parse_axes(raw.get("axes"), problems)
    expand_mode = raw.get("expand", "grid")
    if expand_mode not in EXPAND_MODES:
        problems.add(("expand",), f"expected one of {', '.join(EXPAND_MODES)}, got {expand_mode!r}")
        expand_mode = None
    seeds = check_seeds(raw.get("seeds", [0]), ("seeds",), problems)

    axes_ok = len(axes) == len(declared) and bool(axes)
    by_name = {axis.name: axis for axis in axes}
    baseline = check_cell(raw.get("baseline"), ("baseline",), declared, by_name, problems)
    if expand_mode == "one_at_a_time" and axes_ok:
        if raw.get("baseline") is None:
            problems.add(("baseline",), "required with expand: one_at_a_time (the cell every other cell varies from)")
        elif baseline is not None and (missing := [a.name for a in axes if a.name not in baseline]):
            problems.add(("baseline",),
                         f"must name a value for every axis with one_at_a_time; missing: {', '.join(missing)}")
    seeds_by_cell = parse_seed_rules(raw.get("seeds_by_cell"), declared, by_name, problems)
    include = check_include(raw.get("include"), expand_mode, declared, by_name, baseline, problems)
    exclude = check_exclude(raw.get("exclude"), declared, by_name, problems)
    if expand_mode == "zip" and axes_ok and len({len(axis.values) for axis in axes}) > 1:
        lengths = ", ".join(f"{axis.name}={len(axis.values)}" for axis in axes)
        problems.add(("axes",), f"zip needs axes of the same length; got {lengths}")

    backend = parse_backend(raw.get("backend"), problems)
    tracking = parse_section(TrackingSpec, raw.get("tracking"), ("tracking",), problems)
    if tracking.tracking_uri is not None and (problem := tracking_uri_problem(tracking.tracking_uri)):
        problems.add(("tracking", "tracking_uri"), f"{problem} (got {tracking.tracking_uri!r})")
    report = parse_report(raw.get("report"), declared, by_name, baseline, problems)
    search = parse_search(raw.get("search"), base, axes, problems) if base is not None else None

    # Every axis value is validated on the base here, once: the spec keeps the result for expand.
    resolution = None
    if base is not None:
        resolution, found = resolve(base, axes)
        for where, message in found:
            problems.add(where, message)
    if problems.messages or resolution is None or expand_mode is None or backend is None:
        # Skip the cell-level checks: with broken parts they would only repeat the errors found.
        return None

    spec = SweepSpec(
        name=name, description=description, output_dir=Path(output_dir), base=base, axes=axes,
        expand=expand_mode, baseline=baseline, include=include, exclude=exclude, seeds=seeds,
        seeds_by_cell=seeds_by_cell,
        backend=backend, tracking=tracking.model_copy(update={"experiment": tracking.experiment or name}),
        report=report, search=search, source=path, overrides=overrides, resolution=resolution,
    )
    cells = cells_of(spec)
    if not cells:
        problems.add(("exclude",), "excludes every cell: nothing would run")
        return None
    checks = [(("baseline",), spec.baseline)]
    if spec.report.baseline != spec.baseline:  # a defaulted report baseline would repeat the error
        checks.append((("report", "baseline"), spec.report.baseline))
    for where, cell in checks:
        if cell and not any(matches(c, spec.axes, cell) for c in cells):
            problems.add(where, f"{_cell_text(cell)} is not a cell of the sweep (excluded, or not a zip row)")
    check_seed_rules(spec, cells, problems)
    trials = _check_cells(spec, cells, problems)
    report_raw = raw.get("report")
    if trials and isinstance(report_raw, dict) and "metrics" in report_raw:  # the defaults may go unmeasured
        check_report_metrics(spec.report.metrics, trials, problems)
    return None if problems.messages else spec


def _check_base(base: Any, problems: Problems) -> dict[str, Any] | None:
    if base is None:
        return {}
    if not isinstance(base, dict):
        problems.add(("base",), f"expected a mapping (a partial trial config), got {type(base).__name__}")
        return None
    for key, why in RESERVED_TRIAL_KEYS.items():
        if key in base:
            problems.add(("base", key), why)
    return {key: value for key, value in base.items() if key not in RESERVED_TRIAL_KEYS}


def _check_cells(spec: SweepSpec, cells: list[tuple[str, ...]], problems: Problems) -> list[TrialConfig]:
    """Each cell's trial (seeds aside: they change no setting) validated as a whole; returns them
    for the checks that need every trial.

    Resolution checked each axis value alone on the base; what is left are combinations that only
    together make an invalid trial (schedule.steps and warmup_steps set by two axes), reported with
    the cell to exclude, and settings a trial cannot train with (a folders dataset without its root).
    """
    trials, reported = [], set()
    for cell in cells:
        model, errors = validate_trial(_cell_config(spec, cell))
        if errors:
            label = ", ".join(f"{axis.name}={name}" for axis, name in zip(spec.axes, cell))
            details = "; ".join(f"{dotted(loc)}: {message}" for loc, message in errors)
            problems.add(("axes",), f"the combination {label} is not a valid trial ({details}); exclude it")
        elif model is not None:
            trials.append(model)
            _report_where_written(spec, cell, training_problems(model), reported, problems)
    return trials


def check_trial_files(spec: SweepSpec) -> None:
    """Before a run: every folder and file the spec's trials read (dataset roots, model.pretrained)
    exists here and is readable, or SpecError names each missing one where the spec writes it."""
    problems: Problems = Problems(str(spec.source))
    reported: set[tuple[KeyPath, str]] = set()
    for cell in cells_of(spec):
        model, _ = validate_trial(_cell_config(spec, cell))  # load_spec validated every cell
        assert model is not None
        _report_where_written(spec, cell, check_files(model), reported, problems)
        _check_searched_files(spec, cell, reported, problems)
    problems.raise_if_any()


def _check_searched_files(spec: SweepSpec, cell: tuple[str, ...], reported: set[tuple[KeyPath, str]],
                          problems: Problems) -> None:
    """A searched setting that names a file (a choice of `model.pretrained`, say): each of its values
    is checked like the cell's own files, reported at the search parameter that tries it."""
    if spec.search is None:
        return
    for key, param in spec.search.params.items():
        for value in param.edge_values():  # a file can only be a choice; ranges are numbers
            model, _ = validate_trial(with_values(_cell_config(spec, cell), [{key: value}]))
            if model is None:  # parse_search validated each value on the base; a cell may still clash
                continue
            for loc, message in check_files(model):
                where = ("search", "params", key)
                if dotted(loc) == key and (where, message) not in reported:
                    reported.add((where, message))
                    problems.add(where, f"value {value!r}: {message}")


def _report_where_written(spec: SweepSpec, cell: tuple[str, ...], found: list[tuple[KeyPath, str]],
                          reported: set[tuple[KeyPath, str]], problems: Problems) -> None:
    """Each problem of a cell's trial once, at the base key or the axis value that sets the setting."""
    for loc, message in found:
        where = _written_at(spec, cell, loc)
        if (where, message) not in reported:
            reported.add((where, message))
            problems.add(where, message if where[0] == "base" else f"{dotted(loc)}: {message}")


def _cell_config(spec: SweepSpec, cell: tuple[str, ...]) -> dict[str, Any]:
    return with_values(spec.base, [axis.values[name] for axis, name in zip(spec.axes, cell)])


def _written_at(spec: SweepSpec, cell: tuple[str, ...], loc: tuple[str, ...]) -> tuple[str, ...]:
    """Where the spec sets the trial setting `loc` for `cell`: the axis value that patches it, else the base."""
    for axis, name, patches in zip(spec.axes, cell, spec.resolution.patches):
        if any(path == loc for path, _ in patches[name]):
            return ("axes", axis.name, "values", name)
    return ("base", *loc)


def _cell_text(cell: dict[str, str]) -> str:
    return ", ".join(f"{axis}={value}" for axis, value in cell.items())
