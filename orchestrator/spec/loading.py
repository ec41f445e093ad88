"""Reading a spec file: YAML with each key's line recorded and duplicate keys caught, `--set KEY=VALUE`
overrides (each checked against what the spec can hold), and `load_spec`, which runs those and then
the validation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.axes import AXIS_BODY_KEYS
from orchestrator.spec.problems import KeyPath, Problems, dotted, unknown_key_message
from orchestrator.spec.schema import (
    BACKEND_KEYS,
    BACKEND_OPTIONS,
    TOP_LEVEL_KEYS,
    ReportSpec,
    ResourcesSpec,
    SweepSpec,
    TrackingSpec,
)
from orchestrator.spec.search import SearchSpec
from orchestrator.spec.trial_keys import RESERVED_TRIAL_KEYS, trial_key_problem
from orchestrator.spec.validation import validate
from trainer.yaml_guard import YamlGuardError, expanded_size, safe_load

# Keys that take a whole value: `--set seeds.0=1` is refused rather than guessed at.
WHOLE_VALUE_KEYS = ("name", "description", "output_dir", "expand", "include", "exclude", "seeds", "seeds_by_cell")


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read, override (`--set key=value`) and validate a sweep spec; raises SpecError with every problem."""
    path = Path(path)
    problems = Problems(str(path))
    if not path.is_file():
        problems.add("<file>", "no such sweep spec file" if not path.exists() else "not a file")
        problems.raise_if_any()
    raw = _read_yaml(path, problems)
    problems.raise_if_any()
    if raw is None:
        raw = {}
        if not overrides:
            problems.add((), "the file is empty; expected a mapping with at least `axes`")
    if not isinstance(raw, dict):
        problems.add((), f"expected a mapping at the top level, got {type(raw).__name__}")
        problems.raise_if_any()
    for item in overrides:
        _apply_override(raw, item, problems)
    problems.raise_if_any()  # a broken override would make everything after it misleading
    spec = validate(raw, path, list(overrides), problems)
    problems.raise_if_any()
    assert spec is not None
    return spec


def _read_yaml(path: Path, problems: Problems) -> Any:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        problems.add("<file>", f"cannot read: {err}")
        return None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)  # before anything walks or constructs it: an alias bomb stops here
        _check_yaml_keys(node, (), problems)
        return loader.construct_document(node)
    except YamlGuardError as err:
        problems.add(f"line {err.line}" if err.line else "<file>", str(err))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "<file>"
        context = ""
        if err.context and err.context_mark and err.problem:  # where the broken construct began
            context = f" ({err.context} at line {err.context_mark.line + 1})"
        problems.add(where, f"YAML syntax error: {err.problem or err.context}{context}")
    except yaml.YAMLError as err:
        problems.add("<file>", f"YAML error: {err}")
    finally:
        loader.dispose()
    return None


def _check_yaml_keys(node: yaml.Node, path: KeyPath, problems: Problems, seen_nodes: set[int] | None = None) -> None:
    """Record each key's line and catch duplicate keys, which PyYAML would silently overwrite."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias of a node already walked (or a recursive anchor)
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(key_node.value)
            line = key_node.start_mark.line + 1
            if key in seen:
                is_values = path[:1] == ("axes",) and path[-1:] == ("values",)
                what = "axis name" if path == ("axes",) else "value name" if is_values else "key"
                problems.add(path + (key,), f"duplicate {what} {key!r} (first at line {seen[key]})", line=line)
            else:
                seen[key] = line
                problems.lines.setdefault(path + (key,), line)
            _check_yaml_keys(value_node, path + (key,), problems, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems.lines.setdefault(path + (str(i),), item.start_mark.line + 1)
            _check_yaml_keys(item, path + (str(i),), problems, seen_nodes)


def _apply_override(raw: dict[str, Any], item: str, problems: Problems) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    where = f"--set {item}"
    if not sep or not key:
        problems.add(where, "expected KEY=VALUE, e.g. backend.max_parallel=4")
        return
    try:
        value = safe_load(text) if text.strip() else None
    except YamlGuardError as err:
        problems.add(where, f"the value is refused: {err}")
        return
    except yaml.YAMLError as err:
        problems.add(where, f"the value is not valid YAML: {str(err).splitlines()[0]}")
        return
    path, problem = _override_path(raw, key)
    if problem:
        problems.add(f"--set {key}", problem)
        return
    tree = raw
    for i, part in enumerate(path[:-1]):
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            problems.add(f"--set {key}", f"{dotted(path[: i + 1])} is not a mapping in the spec")
            return
        tree = child
    tree[path[-1]] = value
    problems.overridden[path] = item


def _override_path(raw: dict[str, Any], key: str) -> tuple[KeyPath, str | None]:
    """The spec path a dotted override key names, or why it names nothing the spec can hold."""
    head, _, rest_text = key.partition(".")
    rest = rest_text.split(".") if rest_text else []
    if head not in TOP_LEVEL_KEYS:
        return (), unknown_key_message(head, TOP_LEVEL_KEYS)
    if not rest:
        return (head,), None
    if head in WHOLE_VALUE_KEYS:
        return (), f"{head} takes a whole value: write --set {head}=..."
    if head == "base":
        problem = trial_key_problem(rest)
        if problem is None and rest[0] in RESERVED_TRIAL_KEYS:
            problem = RESERVED_TRIAL_KEYS[rest[0]]
        return ("base", *rest), problem
    if head == "axes":
        return _override_axis_path(raw.get("axes"), rest_text)
    if head == "baseline":
        return _override_cell_path(("baseline",), raw.get("axes"), rest_text)
    if head == "backend":
        return ("backend", *rest), _override_backend_problem(rest)
    if head == "search" and rest[0] == "params" and len(rest) > 1:  # search.params.optimizer.lr={...}
        return ("search", "params", ".".join(rest[1:])), None
    section = {"tracking": TrackingSpec, "report": ReportSpec, "search": SearchSpec}[head]
    if rest[0] not in section.model_fields:
        return (), unknown_key_message(rest[0], section.model_fields)
    if head == "report" and rest[0] == "baseline" and len(rest) > 1:
        return _override_cell_path(("report", "baseline"), raw.get("axes"), ".".join(rest[1:]))
    if len(rest) > 1:
        return (), f"{head}.{rest[0]} takes a whole value"
    return (head, rest[0]), None


def _axis_names_in(raw_axes: Any) -> list[str]:
    return [str(name) for name in raw_axes] if isinstance(raw_axes, dict) else []


def _match_axis(raw_axes: Any, text: str) -> tuple[str | None, str]:
    """Split `text` into (axis name, remainder); axis names may contain dots (the short form)."""
    for name in sorted(_axis_names_in(raw_axes), key=len, reverse=True):
        if text == name:
            return name, ""
        if text.startswith(name + "."):
            return name, text[len(name) + 1 :]
    return None, text


def _override_axis_path(raw_axes: Any, text: str) -> tuple[KeyPath, str | None]:
    name, remainder = _match_axis(raw_axes, text)
    if name is None:
        known = ", ".join(_axis_names_in(raw_axes)) or "none"
        return (), f"unknown axis {text.split('.')[0]!r} (--set cannot add axes); axes: {known}"
    if not remainder:
        return ("axes", name), None
    if not isinstance(raw_axes[name], dict):
        return (), f"axis {name!r} is written in short form (a list): set it whole with --set axes.{name}=[...]"
    field, _, value_name = remainder.partition(".")
    if field not in AXIS_BODY_KEYS:
        return (), unknown_key_message(field, AXIS_BODY_KEYS)
    if value_name and field != "values":
        return (), f"axes.{name}.{field} takes a whole value"
    return ("axes", name, field, *([value_name] if value_name else [])), None


def _override_cell_path(prefix: KeyPath, raw_axes: Any, text: str) -> tuple[KeyPath, str | None]:
    name, remainder = _match_axis(raw_axes, text)
    if name is None or remainder:
        return (), f"unknown axis {text!r}; axes: {', '.join(_axis_names_in(raw_axes)) or 'none'}"
    return prefix + (name,), None


def _override_backend_problem(rest: list[str]) -> str | None:
    option_keys = {k for model in BACKEND_OPTIONS.values() for k in model.model_fields}
    allowed = set(BACKEND_KEYS) | option_keys
    if rest[0] not in allowed:
        return unknown_key_message(rest[0], allowed)
    if rest[0] == "resources" and len(rest) > 1:
        if rest[1] not in ResourcesSpec.model_fields:
            return unknown_key_message(rest[1], ResourcesSpec.model_fields)
        return None if len(rest) == 2 else f"backend.resources.{rest[1]} takes a whole value"
    if rest[0] == "options" and len(rest) > 1:
        if rest[1] not in option_keys:
            return unknown_key_message(rest[1], option_keys)
        return None if len(rest) == 2 else f"backend.options.{rest[1]} takes a whole value"
    return None if len(rest) == 1 else f"backend.{rest[0]} takes a whole value"
