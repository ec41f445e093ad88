"""Axes and cells: parsing the `axes:` section (long form, short form, several keys set together)
and the cells a spec names in `baseline`, `include` and `exclude`.

Each axis is checked on its own here: its keys exist in the trial schema, its values are named
and set every key. Whether the values make valid trials is for resolution (expansion.py).
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.spec.problems import KeyPath, Problems, unknown_key_message
from orchestrator.spec.schema import Axis
from orchestrator.spec.trial_keys import RESERVED_TRIAL_KEYS, trial_key_problem

AXIS_BODY_KEYS = ("key", "keys", "values")


def parse_axes(raw_axes: Any, problems: Problems) -> tuple[list[Axis], list[str]]:
    """(axes that parsed, every declared axis name); problems for the rest."""
    if raw_axes is None:
        problems.add(("axes",), "required: a mapping of axis name -> {key, values}")
        return [], []
    if not isinstance(raw_axes, dict):
        problems.add(("axes",), f"expected a mapping of axis name -> {{key, values}}, got {type(raw_axes).__name__}")
        return [], []
    if not raw_axes:
        problems.add(("axes",), "must not be empty: define at least one axis")
    axes, declared = [], []
    for raw_name, body in raw_axes.items():
        name = str(raw_name)
        declared.append(name)
        axis = _parse_axis(name, body, problems)
        if axis is not None:
            axes.append(axis)
    _check_key_overlaps(axes, problems)
    return axes, declared


def _parse_axis(name: str, body: Any, problems: Problems) -> Axis | None:
    path = ("axes", name)
    if not name or name == "seed" or any(c.isspace() or c == "=" for c in name):
        problems.add(path, "axis names must be non-empty, without spaces or '=', and not 'seed'")
        return None
    if isinstance(body, list):  # short form: `model.scale: [micro, tiny]`
        keys, values_raw, values_path = (name,), body, path
    elif isinstance(body, dict):
        for key in body:
            if key not in AXIS_BODY_KEYS:
                problems.add(path + (str(key),), unknown_key_message(str(key), AXIS_BODY_KEYS))
        keys = _axis_keys(body, path, problems)
        values_raw, values_path = body.get("values"), path + ("values",)
        if values_raw is None:
            problems.add(values_path, "required: a mapping of value name -> value (or a list of values)")
            return None
    else:
        problems.add(path, "expected {key: DOTTED.KEY, values: {...}} or a list of values (`dotted.key: [...]`)")
        return None
    if keys is None:
        return None
    problem_count = len(problems.messages)
    for key in keys:
        parts = key.split(".")
        key_path = path + (("keys" if "keys" in body else "key",) if isinstance(body, dict) else ())
        if problem := trial_key_problem(parts):
            problems.add(key_path, problem)
        elif parts[0] in RESERVED_TRIAL_KEYS:
            problems.add(key_path, f"{key}: {RESERVED_TRIAL_KEYS[parts[0]]}")
    values = _axis_values(keys, body.get("keys") if isinstance(body, dict) else None, values_raw, values_path, problems)
    if values is None or len(problems.messages) > problem_count:
        return None
    return Axis(name=name, keys=keys, values=values)


def _axis_keys(body: dict[str, Any], path: KeyPath, problems: Problems) -> tuple[str, ...] | None:
    if ("key" in body) == ("keys" in body):
        problems.add(path, "needs exactly one of `key` (a dotted key) or `keys` (several set together)")
        return None
    if "key" in body:
        if not isinstance(body["key"], str) or not body["key"]:
            problems.add(path + ("key",), f"expected a dotted key such as model.scale, got {body['key']!r}")
            return None
        return (body["key"],)
    keys = body["keys"]
    # `keys` is a list of dotted keys, or a mapping column alias -> dotted key.
    listed = list(keys.values()) if isinstance(keys, dict) else keys
    if not isinstance(listed, list) or not listed or not all(isinstance(k, str) and k for k in listed):
        problems.add(path + ("keys",), "expected a non-empty list of dotted keys (or a mapping alias -> dotted key)")
        return None
    if len(set(listed)) != len(listed):
        problems.add(path + ("keys",), f"duplicate keys in {listed}")
        return None
    return tuple(listed)


def _axis_values(
    keys: tuple[str, ...], raw_keys: Any, values_raw: Any, path: KeyPath, problems: Problems
) -> dict[str, dict[str, Any]] | None:
    if isinstance(values_raw, list):
        if len(keys) > 1:
            problems.add(path, "an axis with several keys needs named values: {name: {dotted.key: value, ...}}")
            return None
        named: dict[str, Any] = {}
        for value in values_raw:
            value_name = _value_name(value)
            if value_name in named:
                problems.add(path, f"duplicate value name {value_name!r}")
                return None
            named[value_name] = value
    elif isinstance(values_raw, dict):
        named = {_value_name(k) if not isinstance(k, str) else k: v for k, v in values_raw.items()}
    else:
        problems.add(path, f"expected a mapping value name -> value, or a list, got {type(values_raw).__name__}")
        return None
    if not named:
        problems.add(path, "must not be empty")
        return None
    if bad := [n for n in named if not n or any(c.isspace() or c == "=" for c in n)]:
        problems.add(path, f"value names must be non-empty without spaces or '=': {bad}")
        return None
    if len(keys) == 1:
        return {value_name: {keys[0]: value} for value_name, value in named.items()}
    aliases = {alias: key for alias, key in raw_keys.items()} if isinstance(raw_keys, dict) else {}
    aliases.update({key: key for key in keys})
    out = {}
    for value_name, setting in named.items():
        if not isinstance(setting, dict):
            problems.add(path + (value_name,), f"expected a mapping of {', '.join(keys)} -> value, got {setting!r}")
            continue
        resolved = {}
        for k, v in setting.items():
            if k not in aliases:
                problems.add(path + (value_name, str(k)), f"not one of this axis's keys: {', '.join(aliases)}")
            elif aliases[k] in resolved:
                problems.add(path + (value_name, str(k)), f"{aliases[k]} is set twice")
            else:
                resolved[aliases[k]] = v
        if missing := [k for k in keys if k not in resolved]:
            problems.add(path + (value_name,),
                         f"missing keys: {', '.join(missing)} (each value sets every key of the axis)")
        out[value_name] = resolved
    return out


def _check_key_overlaps(axes: list[Axis], problems: Problems) -> None:
    """Two axes setting the same key (or a section and a key inside it) would fight over it."""
    owners: list[tuple[tuple[str, ...], str]] = []
    for axis in axes:
        for key in axis.keys:
            parts = tuple(key.split("."))
            for other_parts, other in owners:
                n = min(len(parts), len(other_parts))
                if parts[:n] == other_parts[:n] and other != axis.name:
                    problems.add(("axes", axis.name),
                                 f"sets {key}, which axis {other!r} sets too ({'.'.join(other_parts)})")
            owners.append((parts, axis.name))


def check_cell(
    raw: Any, path: KeyPath, declared: list[str], by_name: dict[str, Axis], problems: Problems
) -> dict[str, str] | None:
    """A (partial) cell naming axes and value names, as in baseline / include / exclude."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        problems.add(path, f"expected a mapping of axis name -> value name, got {raw!r}")
        return None
    cell, ok = {}, True
    for raw_axis, raw_value in raw.items():
        axis_name, value_name = str(raw_axis), _value_name(raw_value)
        if axis_name not in declared:
            problems.add(path + (axis_name,), f"unknown axis {axis_name!r}; axes: {', '.join(declared) or 'none'}")
            ok = False
        elif axis_name in by_name and value_name not in by_name[axis_name].values:
            known = ", ".join(by_name[axis_name].values)
            problems.add(path + (axis_name,), f"unknown value {value_name!r} of axis {axis_name!r}; values: {known}")
            ok = False
        cell[axis_name] = value_name
    return cell if ok else None


def check_include(
    raw: Any, expand_mode: str | None, declared: list[str], by_name: dict[str, Axis],
    baseline: dict[str, str] | None, problems: Problems,
) -> list[dict[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(("include",), f"expected a list of cells, got {type(raw).__name__}")
        return []
    if raw and expand_mode in ("zip", "one_at_a_time"):
        problems.add(("include",), f"only allowed with expand: grid (got {expand_mode})")
        return []
    cells = []
    for i, entry in enumerate(raw):
        cell = check_cell(entry, ("include", str(i)), declared, by_name, problems)
        if cell is None:
            continue
        missing = [name for name in declared if name not in cell]
        if missing and not (baseline and all(name in baseline for name in missing)):
            problems.add(("include", str(i)),
                         f"missing axes {', '.join(missing)} (name them, or set a baseline to default from)")
            continue
        cells.append({name: cell[name] if name in cell else baseline[name] for name in declared})  # type: ignore[index]
    return cells


def check_exclude(
    raw: Any, declared: list[str], by_name: dict[str, Axis], problems: Problems
) -> list[dict[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(("exclude",), f"expected a list of (partial) cells, got {type(raw).__name__}")
        return []
    cells = []
    for i, entry in enumerate(raw):
        cell = check_cell(entry, ("exclude", str(i)), declared, by_name, problems)
        if cell is not None:
            cells.append(cell)
    return cells


def _value_name(value: Any) -> str:
    """The name of an unnamed value (short form) and of a value named in baseline/include/exclude."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)
