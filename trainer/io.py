"""Checkpoint files, written with the trial folder's durable atomic write (`trainer.contract`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from trainer.contract import write_atomic


def save_torch_atomic(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: torch.save(obj, f), binary=True)
