"""How a trial config's problems are told: one line per bad key, with what is allowed and the fix.

`fail_at` is what the schema's own checks raise; `format_validation_error` turns pydantic's errors
into `KEY.PATH: message` lines (unknown keys list the allowed ones). Shared with the orchestrator,
which reports spec problems in the same words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

KeyPath = tuple[str, ...]
TRIAL_CHECK = "trial_check"  # the error type of the schema's checks: their messages quote the values

_EXPONENT_RE = re.compile(r"^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$")


def fail_at(problems: Sequence[tuple[KeyPath, str, Any]]) -> ValidationError:
    """The error a model validator raises for (key path in its section, message, input) problems:
    pydantic files each under its key (model.specialization), not under the section (model)."""
    return ValidationError.from_exception_data("TrialConfig", [
        InitErrorDetails(type=PydanticCustomError(TRIAL_CHECK, "{reason}", {"reason": message}),
                         loc=loc, input=value)
        for loc, message, value in problems])


class ConfigError(ValueError):
    """A config that fails validation; the message names each bad key and what is allowed."""


def error_message(e: ErrorDetails) -> str:
    """One pydantic error as `what was expected (got VALUE)`, with the fix for YAML's `1e-3`."""
    message = e["msg"].removeprefix("Value error, ")
    value = e.get("input")
    if isinstance(value, (dict, list)) or e["type"] in ("missing", TRIAL_CHECK):
        return message
    if e["type"] == "float_type" and isinstance(value, str) and _EXPONENT_RE.match(value):
        mantissa, exponent = value.lower().split("e")
        fixed = f"{mantissa if '.' in mantissa else mantissa + '.0'}e{'' if exponent[0] in '+-' else '+'}{exponent}"
        return (f"{message} (got the text {value!r}: YAML reads a number with an exponent but no dot as text; "
                f"write {fixed})")
    return f"{message} (got {value!r})"


def format_problems(source: str, problems: Sequence[tuple[KeyPath, str]]) -> str:
    lines = [f"{source}: {len(problems)} invalid setting(s)"]
    lines += [f"  - {'.'.join(loc) or '<root>'}: {message}" for loc, message in problems]
    return "\n".join(lines)


def format_validation_error(err: ValidationError, source: str, root: type[BaseModel]) -> str:
    problems = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append((loc, f"unknown key; allowed here: {', '.join(_allowed_keys(root, loc[:-1]))}"))
        else:
            problems.append((loc, error_message(e)))
    return format_problems(source, problems)


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)
