"""From a checked spec to its trials: resolution (the base and every axis value validated against
the trial schema once, during load_spec), the cells the spec asks for, `expand` into TrialPlans with
their ids, and `spec_hash` over what decides the trials.

Trials are ordered seed-major (every cell of seed 0, then of seed 1, ...) so the first results
already cover the whole comparison; cells follow the axes' order, the last axis varying fastest.
"""

from __future__ import annotations

import gc
import itertools
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from hashlib import sha256
from typing import Any

from orchestrator import identity
from orchestrator.spec.problems import KeyPath, SpecError, dotted
from orchestrator.spec.schema import Axis, Resolution, SweepSpec, TrialPlan, cell_label
from orchestrator.spec.trial_keys import flatten, set_leaf, validate_trial, with_values
from trainer.contract import NON_IDENTITY_KEYS


def resolve(base: dict[str, Any], axes: list[Axis]) -> tuple[Resolution | None, list[tuple[KeyPath, str]]]:
    """Validate the base, then every axis value on top of it (once each), into leaf patches."""
    problems: list[tuple[KeyPath, str]] = []
    base_model, base_errors = validate_trial(base)
    problems += [(("base", *loc), message) for loc, message in base_errors]
    # With a broken base every value would repeat the base's errors; report only the value's own.
    base_error_locs = {loc for loc, _ in base_errors}
    base_dump = base_model.model_dump(mode="json") if base_model else None
    base_flat = flatten(base_dump) if base_dump else {}
    patches = []
    for axis in axes:
        per_value: dict[str, tuple[tuple[KeyPath, Any], ...]] = {}
        seen: dict[str, str] = {}  # canonical patch -> value name
        for value_name, setting in axis.values.items():
            model, errors = validate_trial(with_values(base, [setting]))
            errors = [(loc, m) for loc, m in errors if loc not in base_error_locs]
            for loc, message in errors:
                problems.append((("axes", axis.name, "values", value_name), f"{dotted(loc)}: {message}"))
            if model is None or base_dump is None:
                continue
            flat = flatten(model.model_dump(mode="json"))
            patch = tuple((path, value) for path, value in flat.items() if base_flat.get(path) != value)
            canonical = identity.canonical_json([[list(p), v] for p, v in patch])
            if canonical in seen:
                problems.append((
                    ("axes", axis.name, "values", value_name),
                    f"resolves to the same trial config as value {seen[canonical]!r} (duplicate trials)",
                ))
            seen[canonical] = value_name
            per_value[value_name] = patch
        patches.append(per_value)
    if problems or base_dump is None:
        return None, problems
    return Resolution(base_dump=base_dump, patches=tuple(patches)), []


def matches(cell: tuple[str, ...], axes: list[Axis], partial: dict[str, str]) -> bool:
    return all(cell[i] == partial[axis.name] for i, axis in enumerate(axes) if axis.name in partial)


def cells_of(spec: SweepSpec) -> list[tuple[str, ...]]:
    """The cells (one value name per axis, in axis order) that the spec asks for, in order."""
    names = [axis.value_names for axis in spec.axes]
    if spec.expand == "grid":
        cells = list(itertools.product(*names))
    elif spec.expand == "zip":
        cells = list(zip(*names))
    else:  # one_at_a_time: the baseline, then each axis moved away from it alone
        assert spec.baseline is not None
        center = tuple(spec.baseline[axis.name] for axis in spec.axes)
        cells = [center]
        for i, axis_names in enumerate(names):
            cells += [center[:i] + (name,) + center[i + 1 :] for name in axis_names if name != center[i]]
    if spec.exclude:
        cells = [c for c in cells if not any(matches(c, spec.axes, entry) for entry in spec.exclude)]
    if spec.include:  # includes win over excludes: they are the explicit exceptions
        present = set(cells)
        for entry in spec.include:
            cell = tuple(entry[axis.name] for axis in spec.axes)
            if cell not in present:
                cells.append(cell)
                present.add(cell)
    return cells


def expand(spec: SweepSpec, code_version: str | None = None) -> list[TrialPlan]:
    """Every trial of the spec, seed-major, with resolved configs and ids (deterministic)."""
    version = code_version or identity.code_version()
    resolved = spec.resolution
    # The base pickled once and unpickled per trial: the fastest deep copy that shares nothing
    # (about half of json.loads; the bytes are our own, never read from outside).
    base_bytes = pickle.dumps(resolved.base_dump, protocol=pickle.HIGHEST_PROTOCOL)
    # Ids from a template of the base's canonical text with holes at the leaves that vary, so each
    # id costs a join and a sha256 rather than a full canonical encoding of the config.
    varying = [("seed",)] + [path for patches in resolved.patches for patch in patches.values() for path, _ in patch]
    template = identity.TrialIdTemplate(resolved.base_dump, varying, version)
    leaf_texts = [
        {name: [(slot, identity.canonical_json(value)) for path, value in patch
                if (slot := template.slot(path)) is not None]
         for name, patch in patches.items()}
        for patches in resolved.patches
    ]
    seed_slot = template.slot(("seed",))
    cells = cells_of(spec)
    with _gc_paused():
        plans = _build_trials(spec, resolved, template, leaf_texts, seed_slot, base_bytes, cells)
    for plan in (plans[0], plans[-1]):  # the template must agree with the one definition of an id
        assert plan.trial_id == identity.trial_id(plan.config, version), "trial id template out of sync"
    return plans


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Building 10,000 acyclic config trees triggers collections that rescan every tree built so
    far; pausing the collector for the build is a third to half of the expansion time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _build_trials(
    spec: SweepSpec, resolved: Resolution, template: identity.TrialIdTemplate,
    leaf_texts: list[dict[str, list[tuple[int, str]]]], seed_slot: int, base_bytes: bytes, cells: list[tuple[str, ...]],
) -> list[TrialPlan]:
    axis_names = spec.axis_names
    plans: list[TrialPlan] = []
    seen: dict[str, str] = {}
    seeds_of = [spec.seeds_for(dict(zip(axis_names, cell))) for cell in cells]
    for seed in spec.all_seeds:
        for cell, seeds in zip(cells, seeds_of):
            if seed not in seeds:
                continue
            config = pickle.loads(base_bytes)
            texts = list(template.defaults)
            texts[seed_slot] = str(seed)
            for patches, encoded, value_name in zip(resolved.patches, leaf_texts, cell):
                for path, value in patches[value_name]:
                    set_leaf(config, path, value)
                for slot, text in encoded[value_name]:
                    texts[slot] = text
            config["seed"] = seed
            plan_cell = dict(zip(axis_names, cell))
            label = cell_label(plan_cell, seed)
            config["name"] = f"{spec.name}/{label}"
            trial = template.trial_id(texts)
            if trial in seen:
                raise SpecError([f"{spec.source}: axes: cells {seen[trial]!r} and {label!r} are the same trial"])
            seen[trial] = label
            plans.append(TrialPlan(trial_id=trial, cell=plan_cell, seed=seed, config=config))
    return plans


def spec_hash(spec: SweepSpec) -> str:
    """16 hex chars over what decides the trials: the resolved base and axis values, cells and seeds.

    Backend, tracking, report (but its controls), name and description are left out (they change
    where and how trials run or are shown, not what they compute); spelling differences that
    resolve equal hash equal.
    """
    resolved = spec.resolution
    base = {k: v for k, v in resolved.base_dump.items() if k not in NON_IDENTITY_KEYS}
    content = {
        "base": base,
        "axes": [
            [axis.name, [[name, [[list(p), v] for p, v in patches[name]]] for name in axis.values]]
            for axis, patches in zip(spec.axes, resolved.patches)
        ],
        "expand": spec.expand,
        "cells": [list(cell) for cell in cells_of(spec)],
        "seeds": spec.seeds,
    }
    if spec.seeds_by_cell:  # absent from the hash when unused: older specs keep their hash
        content["seeds_by_cell"] = [rule.model_dump(mode="json") for rule in spec.seeds_by_cell]
    if spec.search is not None:  # what is searched, and how, decides which trials run
        content["search"] = spec.search.model_dump(mode="json")
    if spec.report.controls:  # the one report setting that adds trials (spec/controls.py)
        content["controls"] = list(spec.report.controls)
    return sha256(identity.canonical_json(content).encode()).hexdigest()[:16]
