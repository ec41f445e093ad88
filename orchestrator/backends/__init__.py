"""Backends by name: `get_backend(spec.backend)` builds the one a sweep asks for.

The registry is open: a module or package `orchestrator/backends/<kind>` whose class is decorated
with `@register_backend("<kind>")` is found on first use (imported lazily, so `slurm`/`ray` cost
nothing to sweeps that do not use them). Third-party code can call `register_backend` directly.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from orchestrator.backends.base import Backend, BackendError, JobHandle, JobState, JobStatus, Submission
from orchestrator.spec import BackendSpec

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


def get_backend(spec: BackendSpec, **test_knobs: Any) -> Backend:
    """The backend for the spec's backend settings (`spec.backend`; its `kind` picks the class).
    `test_knobs`: settings that are not spec settings (poll intervals, ...), for tests."""
    return backend_class(spec.kind)(spec, **test_knobs)


__all__ = [
    "Backend", "BackendError", "JobHandle", "JobState", "JobStatus", "Submission", "backend_class", "get_backend",
    "register_backend",
]
