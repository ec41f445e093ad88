"""Atomic writes: a file is either the old version or the new one, never half of either."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


def _atomic(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    _atomic(Path(path), lambda f: f.write(json.dumps(data, indent=2, sort_keys=True, default=str)), "w")


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text), "w")


def save_torch_atomic(path: Path, obj: Any) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f), "wb")


def read_json(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def append_jsonl(path: Path, record: Any) -> None:
    """One JSON line, appended and flushed in one write: a reader sees whole lines (a torn last
    line only if the machine dies mid-write, which readers skip)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
