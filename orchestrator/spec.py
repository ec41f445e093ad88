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

Everything is checked before anything runs, and every problem is reported at once as
`FILE: KEY.PATH: what was expected (line N)`. A mapping value on a key that is a whole section
(`key: data.scenes`, `values: {small: {train_size: 256}}`) is merged into the base's section.

Trials are ordered seed-major (every cell of seed 0, then of seed 1, ...) so the first results
already cover the whole comparison; cells follow the axes' order, the last axis varying fastest.
"""

from __future__ import annotations

import gc
import itertools
import json
import pickle
import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator import identity
from orchestrator.search.spec import (
    FINAL_METRICS,
    INTERMEDIATE_METRICS,
    VALIDATION_PREFIX,
    SearchSpec,
    format_value,
    params_label,
)
from trainer.config import TrialConfig

ExpandMode = Literal["grid", "zip", "one_at_a_time"]
BackendKind = Literal["local", "slurm", "ray"]
EXPAND_MODES = ("grid", "zip", "one_at_a_time")
BACKEND_KINDS = ("local", "slurm", "ray")
DEFAULT_METRICS = ["linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse"]

KeyPath = tuple[str, ...]


# ------------------------------------------------------------------------------------------------
# Errors


class SpecError(ValueError):
    """A spec that cannot run; `.errors` holds one self-contained line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class _Problems:
    """Collects problems as `FILE: KEY.PATH: message (line N)`, so all of them are reported at once."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[KeyPath, int] = {}  # key path -> line of the key in the YAML file
        self.overridden: dict[KeyPath, str] = {}  # key path -> the --set that replaced it
        self.messages: list[str] = []

    def add(self, where: KeyPath | str, message: str, line: int | None = None) -> None:
        if isinstance(where, str):
            self.messages.append(f"{self.source}: {where}: {message}")
            return
        location = f" (line {line})" if line else self._location(where)
        self.messages.append(f"{self.source}: {_dotted(where)}: {message}{location}")

    def _location(self, path: KeyPath) -> str:
        # An override at, above or below the failing key (a section error caused by a --set leaf).
        for overridden, item in self.overridden.items():
            n = min(len(path), len(overridden))
            if path and path[:n] == overridden[:n]:
                return f" (from --set {item})"
        for n in range(len(path), 0, -1):
            if path[:n] in self.lines:
                return f" (line {self.lines[path[:n]]})"
        return ""

    def raise_if_any(self) -> None:
        if self.messages:
            raise SpecError(self.messages)


def _dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _pydantic_problems(err: ValidationError, model: type[BaseModel]) -> list[tuple[KeyPath, str]]:
    """(location, message) per error of `model`, with the allowed keys for typos and the rejected input."""
    out = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = _unknown_key_message(loc[-1], _allowed_fields(model, loc[:-1]))
        elif not isinstance(e.get("input"), (dict, list)) and e["type"] != "missing":
            message = f"{message} (got {e['input']!r})"
        out.append((loc, message))
    return out


def _unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    return f"unknown key {key!r}; allowed here: {', '.join(sorted(allowed))}"


# ------------------------------------------------------------------------------------------------
# The trial schema: dotted keys, sections, validators


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def trial_key_problem(parts: Sequence[str], model: type[BaseModel] = TrialConfig) -> str | None:
    """Why `parts` is not a dotted key of the trial config (None when it is one)."""
    where = "the trial config"
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"unknown key {part!r} in {where}; allowed here: {', '.join(sorted(model.model_fields))}"
        if i == len(parts) - 1:
            return None
        sub = _section_model(field.annotation)
        if sub is None:
            return f"{'.'.join(parts[: i + 1])} is a setting, not a section: it has no key {parts[i + 1]!r}"
        model, where = sub, ".".join(parts[: i + 1])
    return "empty key"


def _validator_scopes(key: str) -> set[KeyPath]:
    """The sections whose model validators see `key`: axes sharing one must be validated together.

    Field validators see only their field, so any two axes whose keys fall under no common
    model-validated section can be checked one value at a time; that is what keeps a 10,000-cell
    grid's validation to a few dozen schema checks.
    """
    parts = key.split(".")
    scopes, model = set(), TrialConfig
    for depth in range(len(parts) + 1):
        if model is None:
            break
        if model.__pydantic_decorators__.model_validators:
            scopes.add(tuple(parts[:depth]))
        if depth < len(parts):
            model = _section_model(model.model_fields[parts[depth]].annotation)
    return scopes


def _flatten(dump: dict[str, Any], model: type[BaseModel] = TrialConfig, prefix: KeyPath = ()) -> dict[KeyPath, Any]:
    """Leaf settings of a dumped config; free-form dicts (tags) and tuples stay whole leaves."""
    out: dict[KeyPath, Any] = {}
    for name, field in model.model_fields.items():
        sub = _section_model(field.annotation)
        value = dump.get(name)
        if sub is not None and isinstance(value, dict):
            out.update(_flatten(value, sub, prefix + (name,)))
        else:
            out[prefix + (name,)] = value
    return out


def _copy_tree(value: Any) -> Any:
    # Each trial gets its own dicts: the runner fills `tracking` per trial and must not leak.
    if isinstance(value, dict):
        return {k: _copy_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_tree(v) for v in value]
    return value


def _merge_at(tree: dict[str, Any], parts: Sequence[str], value: Any) -> None:
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
            _merge_at(merged, [k], v)
        tree[last] = merged
    else:
        tree[last] = _copy_tree(value)


def _set_leaf(tree: dict[str, Any], path: KeyPath, value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = _copy_tree(value)


# ------------------------------------------------------------------------------------------------
# Schema


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Axis(_Frozen):
    """One axis: value name -> the dotted keys it sets (one key, or several set together)."""

    name: str
    keys: tuple[str, ...]
    values: dict[str, dict[str, Any]]

    @property
    def value_names(self) -> list[str]:
        return list(self.values)


class ResourcesSpec(_Frozen):
    cpus_per_trial: int = Field(1, ge=1)
    gpus_per_trial: int = Field(0, ge=0, description="all GPUs of one trial, over all its nodes")
    mem_gb: float = Field(4, gt=0)
    time_min: int = Field(60, gt=0, description="wall-clock limit of one attempt")
    nodes: int = Field(1, ge=1, description="nodes per trial (slurm only; the trainer splits the batch)")


class _CommonOptions(_Frozen):
    """Options every backend takes. Only the keys a spec sets reach `BackendSpec.options`, so a
    cluster profile's defaults can fill in the rest."""

    detach: bool = Field(False, description="run the sweep in the background and return at once")
    command: list[str] | str | None = Field(None, description="trainer command; default: python -m trainer")
    env: dict[str, str | int | float | bool] = Field(default_factory=dict, description="extra environment variables")
    grace_s: float = Field(30.0, gt=0, description="seconds between SIGTERM and SIGKILL on cancel")


class LocalOptions(_CommonOptions):
    pass


class SlurmOptions(_CommonOptions):
    profile: str | None = Field(None, description="cluster profile YAML, e.g. slurm/profiles/default.yaml")
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int | None = Field(None, ge=1, description="max array tasks running at once")
    setup: list[str] = Field(default_factory=list, description="shell lines run before the trainer (module load ...)")


class RayOptions(_CommonOptions):
    address: str | None = Field(None, description="ray cluster address; default: start a local one")
    namespace: str | None = Field(None, description="Ray namespace of the trials' detached actors (default cls_ablation)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local cluster (no address); default: all cores")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of a local cluster; default: detected")


BACKEND_OPTIONS: dict[str, type[BaseModel]] = {"local": LocalOptions, "slurm": SlurmOptions, "ray": RayOptions}


class BackendSpec(_Frozen):
    kind: BackendKind = "local"
    max_parallel: int = Field(1, ge=1)
    retries: int = Field(2, ge=0, le=20, description="extra attempts after a transient failure")
    resources: dict[str, Any] = Field(default_factory=lambda: ResourcesSpec().model_dump())
    resources_set: tuple[str, ...] = Field((), description="resource keys the spec wrote (they beat a cluster profile)")
    options: dict[str, Any] = Field(default_factory=dict, description="kind-specific, only the keys given")


class TrackingSpec(_Frozen):
    enabled: bool = True
    tracking_uri: str | None = Field(None, description="default: sqlite:///<project>/mlflow.db")
    experiment: str | None = Field(None, description="default: the sweep name (filled in by load_spec)")


class ReportSpec(_Frozen):
    compare: list[str | list[str]] = Field(default_factory=list, description="default: every axis alone")
    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))
    baseline: dict[str, str] | None = Field(None, description="default: the top-level baseline")
    output: Path | None = Field(None, description="report path, relative to the project root (default: reports/<name>.md)")


class SweepSpec(_Frozen):
    name: str
    description: str = ""
    output_dir: Path
    base: dict[str, Any] = Field(default_factory=dict)  # the partial trial config as written (+ --set)
    axes: list[Axis]
    expand: ExpandMode = "grid"
    baseline: dict[str, str] | None = None
    include: list[dict[str, str]] = Field(default_factory=list)  # complete cells (defaults filled in)
    exclude: list[dict[str, str]] = Field(default_factory=list)  # partial cells
    seeds: list[int] = Field(default_factory=lambda: [0])
    backend: BackendSpec = BackendSpec()
    tracking: TrackingSpec = TrackingSpec()
    report: ReportSpec = ReportSpec()
    search: SearchSpec | None = None  # per-cell hyperparameter search (orchestrator/search)
    source: Path
    overrides: list[str] = Field(default_factory=list)

    @property
    def axis_names(self) -> list[str]:
        return [axis.name for axis in self.axes]

    def axis(self, name: str) -> Axis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(name)


def cell_label(cell: dict[str, str], seed: int) -> str:
    """`specialization=paper scale=micro seed=0`: axis order, then the seed."""
    return " ".join([*(f"{axis}={value}" for axis, value in cell.items()), f"seed={seed}"])


@dataclass(frozen=True)
class TrialPlan:
    trial_id: str
    cell: dict[str, str]  # axis name -> value name
    seed: int
    config: dict[str, Any]  # resolved TrialConfig dump with the seed set; `tracking` left default
    # Tuned sweeps: the searched settings (dotted key -> value) this trial runs with; None otherwise.
    params: dict[str, Any] | None = None

    @property
    def label(self) -> str:
        label = cell_label(self.cell, self.seed)
        return f"{label} {params_label(self.params)}" if self.params else label

    def __hash__(self) -> int:  # the dict fields are unhashable; the id stands for them
        return hash(self.trial_id)


TOP_LEVEL_KEYS = (
    "name", "description", "output_dir", "base", "axes", "expand", "baseline", "include", "exclude",
    "seeds", "backend", "tracking", "report", "search",
)
# Keys that take a whole value: `--set seeds.0=1` is refused rather than guessed at.
WHOLE_VALUE_KEYS = ("name", "description", "output_dir", "expand", "include", "exclude", "seeds")
AXIS_BODY_KEYS = ("key", "keys", "values")
# Set by the orchestrator, not by a spec: `seed` by `seeds`, `name` from the cell, `tracking` by the runner.
RESERVED_TRIAL_KEYS = {
    "seed": "set seeds with the top-level `seeds` list",
    "name": "trial names are set by the orchestrator (sweep name + cell)",
    "tracking": "tracking is set by the runner; use the top-level `tracking` section",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _value_name(value: Any) -> str:
    """The name of an unnamed value (short form) and of a value named in baseline/include/exclude."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


# ------------------------------------------------------------------------------------------------
# Loading and overrides


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> SweepSpec:
    """Read, override (`--set key=value`) and validate a sweep spec; raises SpecError with every problem."""
    path = Path(path)
    problems = _Problems(str(path))
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
    spec = _validate(raw, path, list(overrides), problems)
    problems.raise_if_any()
    assert spec is not None
    return spec


def _read_yaml(path: Path, problems: _Problems) -> Any:
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
        _check_yaml_keys(node, (), problems)
        return loader.construct_document(node)
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


def _check_yaml_keys(node: yaml.Node, path: KeyPath, problems: _Problems, seen_nodes: set[int] | None = None) -> None:
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


def _apply_override(raw: dict[str, Any], item: str, problems: _Problems) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    where = f"--set {item}"
    if not sep or not key:
        problems.add(where, "expected KEY=VALUE, e.g. backend.max_parallel=4")
        return
    try:
        value = yaml.safe_load(text) if text.strip() else None
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
            problems.add(f"--set {key}", f"{_dotted(path[: i + 1])} is not a mapping in the spec")
            return
        tree = child
    tree[path[-1]] = value
    problems.overridden[path] = item


def _override_path(raw: dict[str, Any], key: str) -> tuple[KeyPath, str | None]:
    """The spec path a dotted override key names, or why it names nothing the spec can hold."""
    head, _, rest_text = key.partition(".")
    rest = rest_text.split(".") if rest_text else []
    if head not in TOP_LEVEL_KEYS:
        return (), _unknown_key_message(head, TOP_LEVEL_KEYS)
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
        return (), _unknown_key_message(rest[0], section.model_fields)
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
        return (), _unknown_key_message(field, AXIS_BODY_KEYS)
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
    allowed = set(BackendSpec.model_fields) | option_keys
    if rest[0] not in allowed:
        return _unknown_key_message(rest[0], allowed)
    if rest[0] == "resources" and len(rest) > 1:
        if rest[1] not in ResourcesSpec.model_fields:
            return _unknown_key_message(rest[1], ResourcesSpec.model_fields)
        return None if len(rest) == 2 else f"backend.resources.{rest[1]} takes a whole value"
    if rest[0] == "options" and len(rest) > 1:
        if rest[1] not in option_keys:
            return _unknown_key_message(rest[1], option_keys)
        return None if len(rest) == 2 else f"backend.options.{rest[1]} takes a whole value"
    return None if len(rest) == 1 else f"backend.{rest[0]} takes a whole value"


# ------------------------------------------------------------------------------------------------
# Validation


def _validate(raw: dict[str, Any], path: Path, overrides: list[str], problems: _Problems) -> SweepSpec | None:
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.add((str(key),), _unknown_key_message(str(key), TOP_LEVEL_KEYS))

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
    axes, declared = _parse_axes(raw.get("axes"), problems)
    expand_mode = raw.get("expand", "grid")
    if expand_mode not in EXPAND_MODES:
        problems.add(("expand",), f"expected one of {', '.join(EXPAND_MODES)}, got {expand_mode!r}")
        expand_mode = None
    seeds = _check_seeds(raw.get("seeds", [0]), problems)

    axes_ok = len(axes) == len(declared) and bool(axes)
    by_name = {axis.name: axis for axis in axes}
    baseline = _check_cell(raw.get("baseline"), ("baseline",), declared, by_name, problems)
    if expand_mode == "one_at_a_time" and axes_ok:
        if raw.get("baseline") is None:
            problems.add(("baseline",), "required with expand: one_at_a_time (the cell every other cell varies from)")
        elif baseline is not None and (missing := [a.name for a in axes if a.name not in baseline]):
            problems.add(("baseline",),
                         f"must name a value for every axis with one_at_a_time; missing: {', '.join(missing)}")
    include = _check_include(raw.get("include"), expand_mode, declared, by_name, baseline, problems)
    exclude = _check_exclude(raw.get("exclude"), declared, by_name, problems)
    if expand_mode == "zip" and axes_ok and len({len(axis.values) for axis in axes}) > 1:
        lengths = ", ".join(f"{axis.name}={len(axis.values)}" for axis in axes)
        problems.add(("axes",), f"zip needs axes of the same length; got {lengths}")

    backend = _parse_backend(raw.get("backend"), problems)
    tracking = _parse_section(TrackingSpec, raw.get("tracking"), ("tracking",), problems)
    report = _parse_report(raw.get("report"), declared, by_name, baseline, problems)
    search = _parse_search(raw.get("search"), base, axes, problems) if base is not None else None

    if problems.messages or base is None or expand_mode is None:
        # Still report bad axis values, but skip the cell-level checks: with broken parts they
        # would only repeat the errors already found.
        if base is not None:
            _check_axis_values(base, axes, problems)
        return None

    spec = SweepSpec(
        name=name, description=description, output_dir=Path(output_dir), base=base, axes=axes,
        expand=expand_mode, baseline=baseline, include=include, exclude=exclude, seeds=seeds,
        backend=backend, tracking=tracking.model_copy(update={"experiment": tracking.experiment or name}),
        report=report, search=search, source=path, overrides=overrides,
    )
    if _check_axis_values(base, axes, problems) is None:
        return None
    cells = _cells(spec)
    if not cells:
        problems.add(("exclude",), "excludes every cell: nothing would run")
        return None
    checks = [(("baseline",), spec.baseline)]
    if spec.report.baseline != spec.baseline:  # a defaulted report baseline would repeat the error
        checks.append((("report", "baseline"), spec.report.baseline))
    for where, cell in checks:
        if cell and not any(_matches(c, spec.axes, cell) for c in cells):
            problems.add(where, f"{_cell_text(cell)} is not a cell of the sweep (excluded, or not a zip row)")
    _check_combinations(spec, cells, problems)
    return None if problems.messages else spec


def _check_base(base: Any, problems: _Problems) -> dict[str, Any] | None:
    if base is None:
        return {}
    if not isinstance(base, dict):
        problems.add(("base",), f"expected a mapping (a partial trial config), got {type(base).__name__}")
        return None
    for key, why in RESERVED_TRIAL_KEYS.items():
        if key in base:
            problems.add(("base", key), why)
    return {key: value for key, value in base.items() if key not in RESERVED_TRIAL_KEYS}


def _check_seeds(seeds: Any, problems: _Problems) -> list[int]:
    if not isinstance(seeds, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        problems.add(("seeds",), f"expected a list of integers, got {seeds!r}")
        return [0]
    if not seeds:
        problems.add(("seeds",), "must not be empty")
    duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicated:
        problems.add(("seeds",), f"duplicate seeds {duplicated}")
    return seeds or [0]


def _parse_axes(raw_axes: Any, problems: _Problems) -> tuple[list[Axis], list[str]]:
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


def _parse_axis(name: str, body: Any, problems: _Problems) -> Axis | None:
    path = ("axes", name)
    if not name or name == "seed" or any(c.isspace() or c == "=" for c in name):
        problems.add(path, "axis names must be non-empty, without spaces or '=', and not 'seed'")
        return None
    if isinstance(body, list):  # short form: `model.scale: [micro, tiny]`
        keys, values_raw, values_path = (name,), body, path
    elif isinstance(body, dict):
        for key in body:
            if key not in AXIS_BODY_KEYS:
                problems.add(path + (str(key),), _unknown_key_message(str(key), AXIS_BODY_KEYS))
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


def _axis_keys(body: dict[str, Any], path: KeyPath, problems: _Problems) -> tuple[str, ...] | None:
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
    keys: tuple[str, ...], raw_keys: Any, values_raw: Any, path: KeyPath, problems: _Problems
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


def _check_key_overlaps(axes: list[Axis], problems: _Problems) -> None:
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


def _check_cell(
    raw: Any, path: KeyPath, declared: list[str], by_name: dict[str, Axis], problems: _Problems
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


def _check_include(
    raw: Any, expand_mode: str | None, declared: list[str], by_name: dict[str, Axis],
    baseline: dict[str, str] | None, problems: _Problems,
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
        cell = _check_cell(entry, ("include", str(i)), declared, by_name, problems)
        if cell is None:
            continue
        missing = [name for name in declared if name not in cell]
        if missing and not (baseline and all(name in baseline for name in missing)):
            problems.add(("include", str(i)),
                         f"missing axes {', '.join(missing)} (name them, or set a baseline to default from)")
            continue
        cells.append({name: cell[name] if name in cell else baseline[name] for name in declared})  # type: ignore[index]
    return cells


def _check_exclude(
    raw: Any, declared: list[str], by_name: dict[str, Axis], problems: _Problems
) -> list[dict[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(("exclude",), f"expected a list of (partial) cells, got {type(raw).__name__}")
        return []
    cells = []
    for i, entry in enumerate(raw):
        cell = _check_cell(entry, ("exclude", str(i)), declared, by_name, problems)
        if cell is not None:
            cells.append(cell)
    return cells


def _parse_section(model: type[BaseModel], raw: Any, path: KeyPath, problems: _Problems) -> Any:
    if raw is None:
        return model()
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return model()
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        for loc, message in _pydantic_problems(err, model):
            problems.add(path + loc, message)
        return model()


def _allowed_fields(model: type[BaseModel], loc: KeyPath) -> list[str]:
    for part in loc:
        field = model.model_fields.get(part)
        sub = _section_model(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _parse_backend(raw: Any, problems: _Problems) -> BackendSpec:
    path = ("backend",)
    if raw is None:
        return BackendSpec()
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return BackendSpec()
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
    for key in [k for k in raw if k not in BackendSpec.model_fields and k in all_option_keys]:
        # Kind-specific keys may sit directly under `backend:` too; they are options either way.
        if key in options:
            problems.add(path + (key,), "set both here and under backend.options")
        options[key] = raw.pop(key)
        written_at[key] = path + (key,)
    for key in raw:
        if key not in BackendSpec.model_fields:
            allowed = list(BackendSpec.model_fields) + (list(BACKEND_OPTIONS[kind].model_fields) if kind else [])
            problems.add(path + (str(key),), _unknown_key_message(str(key), allowed))
    core = {k: v for k, v in raw.items() if k in ("max_parallel", "retries")}
    backend = _parse_section(BackendSpec, core, path, problems)
    resources = _parse_section(ResourcesSpec, raw.get("resources"), path + ("resources",), problems)
    if kind and kind != "slurm" and resources.nodes > 1:
        problems.add(path + ("resources", "nodes"), f"multi-node trials need the slurm backend (kind is {kind})")
    if resources.gpus_per_trial % resources.nodes:
        problems.add(path + ("resources", "gpus_per_trial"), f"the trial's GPUs ({resources.gpus_per_trial}) "
                     f"must split evenly over its {resources.nodes} nodes")
    if kind is None:
        return backend
    model = BACKEND_OPTIONS[kind]
    for key in list(options):
        if key not in model.model_fields:
            owners = [k for k, m in BACKEND_OPTIONS.items() if key in m.model_fields]
            hint = f"an option of the {'/'.join(owners)} backend, not {kind}" if owners else "unknown option"
            problems.add(written_at[key], f"{hint}; {kind} options: {', '.join(model.model_fields)}")
            options.pop(key)
    parsed = _parse_section(model, options, path + ("options",), problems)
    return BackendSpec(
        kind=kind, max_parallel=backend.max_parallel, retries=backend.retries,
        resources=resources.model_dump(), resources_set=tuple(sorted(resources.model_fields_set)),
        options=parsed.model_dump(exclude_unset=True),
    )


def _parse_report(
    raw: Any, declared: list[str], by_name: dict[str, Axis], baseline: dict[str, str] | None, problems: _Problems
) -> ReportSpec:
    path = ("report",)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        raw = {}
    for key in raw:
        if key not in ReportSpec.model_fields:
            problems.add(path + (str(key),), _unknown_key_message(str(key), ReportSpec.model_fields))
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
    report_baseline = _check_cell(raw.get("baseline"), path + ("baseline",), declared, by_name, problems)
    output = raw.get("output")
    if output is not None and not (isinstance(output, str) and output.endswith(".md")):
        problems.add(path + ("output",), f"expected the path of a Markdown file, e.g. reports/ablation.md, got {output!r}")
        output = None
    return ReportSpec(compare=checked, metrics=metrics, baseline=report_baseline or baseline,
                      output=Path(output) if output else None)


def _parse_search(raw: Any, base: dict[str, Any], axes: list[Axis], problems: _Problems) -> SearchSpec | None:
    """The `search:` section; each tuned key must be a trial setting no axis sets, and each of its
    values (the range's ends, every choice) a valid value of that setting on the base."""
    if raw is None:
        return None
    path = ("search",)
    if not isinstance(raw, dict):
        problems.add(path, f"expected a mapping, got {type(raw).__name__}")
        return None
    try:
        search = SearchSpec.model_validate(raw)
    except ValidationError as err:
        for loc, message in _pydantic_problems(err, SearchSpec):
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
            _, errors = _validate_trial(_with_values(base, [{key: value}]))
            for loc, message in errors:
                if _dotted(loc) == key:
                    problems.add(where, f"value {format_value(value)}: {message}")
    return search


# ------------------------------------------------------------------------------------------------
# Resolution: each axis value validated once against the base


@dataclass
class _Resolved:
    base_dump: dict[str, Any]  # the validated base, as TrialConfig dumps it
    # per axis: value name -> the leaf settings (path, value) where it differs from the base
    patches: list[dict[str, tuple[tuple[KeyPath, Any], ...]]]


def _validate_trial(data: dict[str, Any]) -> tuple[TrialConfig | None, list[tuple[KeyPath, str]]]:
    try:
        return TrialConfig.model_validate(data), []
    except ValidationError as err:
        return None, _pydantic_problems(err, TrialConfig)


def _with_values(base: dict[str, Any], settings: Iterable[dict[str, Any]]) -> dict[str, Any]:
    data = _copy_tree(base)
    for setting in settings:
        for key, value in setting.items():
            _merge_at(data, key.split("."), value)
    return data


def _resolve(base: dict[str, Any], axes: list[Axis]) -> tuple[_Resolved | None, list[tuple[KeyPath, str]]]:
    """Validate the base, then every axis value on top of it (once each), into leaf patches."""
    problems: list[tuple[KeyPath, str]] = []
    base_model, base_errors = _validate_trial(base)
    problems += [(("base", *loc), message) for loc, message in base_errors]
    # With a broken base every value would repeat the base's errors; report only the value's own.
    base_error_locs = {loc for loc, _ in base_errors}
    base_dump = base_model.model_dump(mode="json") if base_model else None
    base_flat = _flatten(base_dump) if base_dump else {}
    patches = []
    for axis in axes:
        per_value: dict[str, tuple[tuple[KeyPath, Any], ...]] = {}
        seen: dict[str, str] = {}  # canonical patch -> value name
        for value_name, setting in axis.values.items():
            model, errors = _validate_trial(_with_values(base, [setting]))
            errors = [(loc, m) for loc, m in errors if loc not in base_error_locs]
            for loc, message in errors:
                problems.append((("axes", axis.name, "values", value_name), f"{_dotted(loc)}: {message}"))
            if model is None or base_dump is None:
                continue
            flat = _flatten(model.model_dump(mode="json"))
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
    return _Resolved(base_dump=base_dump, patches=patches), []


def _check_axis_values(base: dict[str, Any], axes: list[Axis], problems: _Problems) -> _Resolved | None:
    resolved, found = _resolve(base, axes)
    for path, message in found:
        problems.add(path, message)
    return resolved


def _check_combinations(spec: SweepSpec, cells: list[tuple[str, ...]], problems: _Problems) -> None:
    """Validate together the axes that one model validator sees (e.g. schedule.steps and warmup_steps).

    Only the combinations that occur in the cells are checked, each once: a 10,000-cell grid with
    two interacting 5-value axes costs 25 validations, not 10,000.
    """
    for group in _interaction_groups(spec.axes):
        for combo in sorted({tuple(cell[i] for i in group) for cell in cells}):
            settings = [spec.axes[i].values[name] for i, name in zip(group, combo)]
            _, errors = _validate_trial(_with_values(spec.base, settings))
            if errors:
                label = ", ".join(f"{spec.axes[i].name}={name}" for i, name in zip(group, combo))
                details = "; ".join(f"{_dotted(loc)}: {message}" for loc, message in errors)
                problems.add(("axes",), f"the combination {label} is not a valid trial ({details}); exclude it")


def _interaction_groups(axes: list[Axis]) -> list[list[int]]:
    """Groups (of >= 2 axis indices) whose keys share a model-validated section."""
    group_of = list(range(len(axes)))

    def find(i: int) -> int:
        while group_of[i] != i:
            i = group_of[i]
        return i

    scope_owner: dict[KeyPath, int] = {}
    for i, axis in enumerate(axes):
        for key in axis.keys:
            for scope in _validator_scopes(key):
                if scope in scope_owner:
                    group_of[find(i)] = find(scope_owner[scope])
                else:
                    scope_owner[scope] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(axes)):
        groups.setdefault(find(i), []).append(i)
    return [sorted(g) for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------------------
# Expansion


def _matches(cell: tuple[str, ...], axes: list[Axis], partial: dict[str, str]) -> bool:
    return all(cell[i] == partial[axis.name] for i, axis in enumerate(axes) if axis.name in partial)


def _cell_text(cell: dict[str, str]) -> str:
    return ", ".join(f"{axis}={value}" for axis, value in cell.items())


def _cells(spec: SweepSpec) -> list[tuple[str, ...]]:
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
        cells = [c for c in cells if not any(_matches(c, spec.axes, entry) for entry in spec.exclude)]
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
    resolved, found = _resolve(spec.base, spec.axes)
    if resolved is None:
        raise SpecError([f"{spec.source}: {_dotted(path)}: {message}" for path, message in found])
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
    cells = _cells(spec)
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
    spec: SweepSpec, resolved: _Resolved, template: identity.TrialIdTemplate,
    leaf_texts: list[dict[str, list[tuple[int, str]]]], seed_slot: int, base_bytes: bytes, cells: list[tuple[str, ...]],
) -> list[TrialPlan]:
    axis_names = spec.axis_names
    plans: list[TrialPlan] = []
    seen: dict[str, str] = {}
    for seed in spec.seeds:
        for cell in cells:
            config = pickle.loads(base_bytes)
            texts = list(template.defaults)
            texts[seed_slot] = str(seed)
            for patches, encoded, value_name in zip(resolved.patches, leaf_texts, cell):
                for path, value in patches[value_name]:
                    _set_leaf(config, path, value)
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

    Backend, tracking, report, name and description are left out (they change where and how trials
    run or are shown, not what they compute); spelling differences that resolve equal hash equal.
    """
    resolved, found = _resolve(spec.base, spec.axes)
    if resolved is None:
        raise SpecError([f"{spec.source}: {_dotted(path)}: {message}" for path, message in found])
    base = {k: v for k, v in resolved.base_dump.items() if k not in identity.IDENTITY_EXCLUDED_KEYS}
    content = {
        "base": base,
        "axes": [
            [axis.name, [[name, [[list(p), v] for p, v in patches[name]]] for name in axis.values]]
            for axis, patches in zip(spec.axes, resolved.patches)
        ],
        "expand": spec.expand,
        "cells": [list(cell) for cell in _cells(spec)],
        "seeds": spec.seeds,
    }
    if spec.search is not None:  # what is searched, and how, decides which trials run
        content["search"] = spec.search.model_dump(mode="json")
    return sha256(identity.canonical_json(content).encode()).hexdigest()[:16]
