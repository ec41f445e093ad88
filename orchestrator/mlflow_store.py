"""The MLflow store a sweep logs to, as both the tracker (writes) and the report (reads) see it.

Owns where the store is (tracking URI, SQLite file, artifact root; created and opened by
`trainer.tracking`'s rules), how calls are retried, the tag names that identify a sweep's runs,
and how a trial's config and result become MLflow params and metrics. MLflow itself is not imported here: plan/status start without it.
"""

from __future__ import annotations

import logging
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from trainer.contract import TrialResult
# One rule for trainer and orchestrator: where artifacts go, what params are, how a store is created.
from trainer.tracking import artifact_root_for, config_params, flatten, open_client, prepare_sqlite_store, sqlite_path

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec
    from orchestrator.store import ProjectPaths

# -- tags ----------------------------------------------------------------------------------------
PARENT_ROLE_TAG = "sweep_role"  # "parent" (one per sweep), "cell" (one per cell of a tuned sweep), "control"
SWEEP_NAME_TAG = "sweep_name"  # on the parent and cell runs
SWEEP_HASH_TAG = "sweep_spec_hash"  # on the parent
CELL_KEY_TAG = "cell_key"  # on a cell run: "axis=value axis=value"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag
# On each trial's child run:
TRIAL_ID_TAG = "trial_id"
SWEEP_TAG = "sweep"
SPEC_HASH_TAG = "spec_hash"
CODE_VERSION_TAG = "code_version"
SEED_TAG = "seed"
CELL_TAG_PREFIX = "cell."  # one tag per axis: cell.<axis> = value name
SEARCH_TAG_PREFIX = "search."  # a tuned sweep's trial: search.<param> = value
FAILURE_CLASS_TAG = "failure_class"
CONTROL_TAG = "control"  # a control trial's child (sweep_role=control): its control's name (untrained, pixels)

_INVALID_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
T = TypeVar("T")
log = logging.getLogger(__name__)


# -- where the store is --------------------------------------------------------------------------
def resolve_tracking_uri(uri: str | None, paths: ProjectPaths) -> str:
    """An absolute URI: relative SQLite/file paths would otherwise depend on each process's cwd."""
    if not uri:
        return paths.default_tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{paths.resolve(uri[len('sqlite:///'):])}"
    return uri


def tracking_target(spec: SweepSpec, paths: ProjectPaths) -> tuple[str, str]:
    """(tracking URI, experiment name) of a sweep: the spec's `tracking`, else the defaults."""
    return resolve_tracking_uri(spec.tracking.tracking_uri, paths), spec.tracking.experiment or spec.name


def quiet_mlflow_logs() -> None:
    """No schema-migration chatter from MLflow and alembic on the console."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


# -- retries -------------------------------------------------------------------------------------
def with_retries(what: str, fn: Callable[[], T], attempts: int = 8, budget_s: float = 10.0) -> T:
    """Retry transient store errors (a locked SQLite file, a restarting server) with back-off, for at
    most `budget_s`: a server that stays away is the caller's to handle (degraded, not blocked)."""
    delay = 0.2
    deadline = time.monotonic() + budget_s
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts - 1 or not _is_transient_store_error(err) or time.monotonic() > deadline:
                raise
            log.debug("MLflow %s failed (%s), retrying", what, err)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _is_transient_store_error(err: Exception) -> bool:
    text = str(err).lower()
    code = getattr(err, "error_code", "")  # MlflowException's; other errors (sqlalchemy, requests) have none
    return (code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR") or "locked" in text or "timed out" in text
            or "connection" in text or "max retries" in text)


# -- params and metrics --------------------------------------------------------------------------
def metric_name(key: str) -> str:
    return _INVALID_METRIC_CHARS.sub("_", key.replace("@", "_"))


def final_metrics(result: TrialResult) -> dict[str, float]:
    """What a finished trial's child run shows: its metrics, parameter counts and cost."""
    values: dict[str, Any] = dict(flatten(result.metrics))
    values.update(result.params)  # parameter counts (params_total, params_added, ...)
    values.update(flops=result.flops, throughput_img_s=result.throughput_img_s, wall_time_s=result.wall_time_s,
                  peak_memory_mb=result.peak_memory_mb)
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            continue
        out[metric_name(str(key))] = float(value)
    return out
