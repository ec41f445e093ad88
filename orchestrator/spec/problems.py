"""How a spec's problems are reported: `SpecError`, the collector that words each one as
`FILE: KEY.PATH: message (line N)` so that all of them are reported at once, and the translation
of pydantic errors into that form.

Also the base of the spec's models, `Frozen` (immutable, unknown keys refused): the errors
translated here are its errors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from trainer.config_errors import KeyPath, error_message


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecError(ValueError):
    """A spec that cannot run; `.errors` holds one self-contained line per problem."""

    def __init__(self, errors: Sequence[str]):
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Problems:
    """Collects problems as `FILE: KEY.PATH: message (line N)`, so all of them are reported at once."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[KeyPath, int] = {}  # key path -> line of the key in the YAML file
        self.overridden: dict[KeyPath, str] = {}  # key path -> the --set that replaced it
        self.messages: list[str] = []

    def add(self, where: KeyPath | str, message: str, line: int | None = None) -> None:
        """`where`: a key path, or a free-form place (`<file>`, `--set KEY`, `line 3, column 5`)."""
        if isinstance(where, str):
            self.messages.append(f"{self.source}: {where}: {message}")
            return
        location = f" (line {line})" if line else self._location(where)
        self.messages.append(f"{self.source}: {dotted(where)}: {message}{location}")

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


def dotted(path: Iterable[Any]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def unknown_key_message(key: str, allowed: Iterable[str]) -> str:
    return f"unknown key {key!r}; allowed here: {', '.join(sorted(allowed))}"


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The model of a field that is a whole section (None for a setting)."""
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def allowed_fields(model: type[BaseModel], loc: KeyPath) -> list[str]:
    """The keys of the section of `model` at `loc` (empty when `loc` is not a section)."""
    for part in loc:
        field = model.model_fields.get(part)
        sub = section_model(field.annotation) if field else None
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def pydantic_problems(err: ValidationError, model: type[BaseModel]) -> list[tuple[KeyPath, str]]:
    """(location, message) per error of `model`, with the allowed keys for typos and the rejected input
    (worded as the trainer words it)."""
    out = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            out.append((loc, unknown_key_message(loc[-1], allowed_fields(model, loc[:-1]))))
        else:
            out.append((loc, error_message(e)))
    return out
