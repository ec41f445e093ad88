"""Checks of the paths and URIs a trial config names, made before any work: does MLflow have a
store for the tracking URI, do the dataset folders and the checkpoint exist and read. Torch-free;
`trainer.config` runs them."""

from __future__ import annotations

import os
import re
from pathlib import Path

# The tracking stores MLflow builds (mlflow/tracking/_tracking_service/utils.py,
# _register_tracking_stores; tests/test_config_checks.py keeps the two in step). A local path has
# no scheme; a database scheme may name its driver (postgresql+psycopg2).
TRACKING_SCHEMES = ("file", "sqlite", "http", "https", "databricks", "postgresql", "mysql", "mssql")
_DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
# What trainer.models.convert.read_checkpoint reads (model.pretrained).
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow has no store for `uri` (None when it has one): refused here, not in a traceback."""
    if not uri.strip():
        return "empty tracking URI: leave the key out for the default (sqlite:///<project>/mlflow.db)"
    match = _SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else ""
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a local folder, MLflow's file store
        return None
    if scheme in TRACKING_SCHEMES or scheme.split("+", 1)[0] in _DATABASE_SCHEMES:
        return None
    return (f"MLflow has no tracking store for scheme {scheme!r}; accepted: {', '.join(TRACKING_SCHEMES)} "
            "(e.g. sqlite:///mlflow.db, http://host:5000, file:///path/mlruns; postgresql+psycopg2://...)")


def folder_problem(root: Path, parts: tuple[str, ...]) -> str | None:
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        return f"{root} {what}: set the dataset's root folder, or remove the key"
    if not os.access(root, os.R_OK | os.X_OK):
        return f"{root} is not readable by this user: fix its permissions"
    missing = [part for part in parts if not (root / part).is_dir()]
    if missing:
        folders = ", ".join(f"{m}/" for m in missing)
        return f"{root} lacks {folders}: the root holds one folder per split ({', '.join(parts)})"
    return None


def file_problem(path: Path) -> str | None:
    if not path.is_file():
        what = "is not a file" if path.exists() else "does not exist"
        return f"{path} {what}: point model.pretrained at a .pth/.safetensors checkpoint, or remove the key"
    if path.suffix not in CHECKPOINT_SUFFIXES:
        return f"{path}: unsupported checkpoint suffix {path.suffix!r}; use one of {', '.join(CHECKPOINT_SUFFIXES)}"
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as err:
        return f"{path} cannot be read ({err.strerror}): fix its permissions"
    return None
