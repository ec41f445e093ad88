"""The trial schema (`trainer.config.TrialConfig`) as a spec sees it: which dotted keys exist,
which keys a spec may not set, a dumped config's leaves, and how values are merged into a partial
config before it is validated.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.spec.problems import KeyPath, pydantic_problems, section_model
from trainer.config import TrialConfig

# Set by the orchestrator, not by a spec: `seed` by `seeds`, `name` from the cell, `tracking` by the runner.
RESERVED_TRIAL_KEYS = {
    "seed": "set seeds with the top-level `seeds` list",
    "name": "trial names are set by the orchestrator (sweep name + cell)",
    "tracking": "tracking is set by the runner; use the top-level `tracking` section",
}


def trial_key_problem(parts: Sequence[str], model: type[BaseModel] = TrialConfig) -> str | None:
    """Why `parts` is not a dotted key of the trial config (None when it is one)."""
    where = "the trial config"
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"unknown key {part!r} in {where}; allowed here: {', '.join(sorted(model.model_fields))}"
        if i == len(parts) - 1:
            return None
        sub = section_model(field.annotation)
        if sub is None:
            return f"{'.'.join(parts[: i + 1])} is a setting, not a section: it has no key {parts[i + 1]!r}"
        model, where = sub, ".".join(parts[: i + 1])
    return "empty key"


def flatten(dump: dict[str, Any], model: type[BaseModel] = TrialConfig, prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """Leaf settings of a dumped config; free-form dicts (tags) and tuples stay whole leaves."""
    out: dict[KeyPath, Any] = {}
    for name, field in model.model_fields.items():
        sub = section_model(field.annotation)
        value = dump.get(name)
        if sub is not None and isinstance(value, dict):
            out.update(flatten(value, sub, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def copy_tree(value: Any) -> Any:
    # Each trial gets its own dicts: the runner fills `tracking` per trial and must not leak.
    if isinstance(value, dict):
        return {k: copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_tree(v) for v in value]
    return value


def merge_at(tree: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Set a dotted key; a mapping set on a mapping (a whole section) is merged into it."""
    for part in parts[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    last = parts[-1]
    if isinstance(value, dict) and isinstance(tree.get(last), dict):
        merged = dict(tree[last])
        for k, v in value.items():
            merge_at(merged, [k], v)
        tree[last] = merged
    else:
        tree[last] = copy_tree(value)


def set_leaf(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = copy_tree(value)


def with_values(base: dict[str, Any], settings: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """A copy of the partial config `base` with each setting (dotted key -> value) merged in."""
    data = copy_tree(base)
    for setting in settings:
        for key, value in setting.items():
            merge_at(data, key.split("."), value)
    return data


def validate_trial(data: dict[str, Any]) -> tuple[TrialConfig | None, list[tuple[KeyPath, str]]]:
    """The trial config `data` describes, or None and its problems (location in the trial config, message)."""
    try:
        return TrialConfig.model_validate(data), []
    except ValidationError as err:
        return None, pydantic_problems(err, TrialConfig)
