"""Backends by name: `get_backend(spec.backend)` builds the one a sweep asks for.

The registry is open: a module `orchestrator/backends/<kind>.py` that decorates its class with
`@register_backend("<kind>")` is found on first use (imported lazily, so `slurm`/`ray` cost nothing
to sweeps that do not use them). Third-party code can call `register_backend` directly.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from orchestrator.backends.base import (
    TRANSIENT_FAILURES,
    Backend,
    BackendError,
    JobHandle,
    JobState,
    JobStatus,
    is_transient,
    read_result,
    result_is_done,
)

_REGISTRY: dict[str, type[Backend]] = {}
B = TypeVar("B", bound=type[Backend])


def register_backend(name: str) -> Callable[[B], B]:
    def decorate(cls: B) -> B:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def backend_class(kind: str) -> type[Backend]:
    if kind not in _REGISTRY:
        try:
            importlib.import_module(f"{__name__}.{kind}")
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{kind}":
                raise  # the backend exists but one of its dependencies is missing: say which
        if kind not in _REGISTRY:
            known = sorted(set(_REGISTRY) | {"local", "slurm", "ray"})
            raise BackendError(f"no backend named {kind!r} (known: {', '.join(known)})")
    return _REGISTRY[kind]


def get_backend(spec: Any, **overrides: Any) -> Backend:
    """The backend for a `BackendSpec` (its `kind` picks the class); keyword overrides win."""
    return backend_class(spec.kind).from_spec(spec, **overrides)


__all__ = [
    "TRANSIENT_FAILURES", "Backend", "BackendError", "JobHandle", "JobState", "JobStatus", "backend_class",
    "get_backend", "is_transient", "read_result", "register_backend", "result_is_done",
]
