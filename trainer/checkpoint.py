"""Resumable training state: what a checkpoint holds, and how it survives a crash mid-write.

The last two checkpoints are kept (`checkpoint.pt`, `checkpoint.prev.pt`), each written atomically.
A checkpoint that cannot be read (a disk that filled up, a file truncated by hand or by a broken
copy) falls back to the previous one, and with none readable the trial starts over, saying so: a
corrupt checkpoint never fails a trial for good. Resume is exact either way (the data order and
augmentations are functions of the step), so the final metrics do not depend on which one it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from trainer.contract import CHECKPOINT_FILE, PREVIOUS_CHECKPOINT_FILE
from trainer.io import save_torch_atomic


@dataclass
class TrainState:
    step: int = 0
    wall_time_s: float = 0.0  # summed over resumes
    images_seen: int = 0
    train_time_s: float = 0.0  # time spent in steps after warm-up, for img/s
    last_metrics: dict[str, float] = field(default_factory=dict)


def save_checkpoint(out_dir: Path, meta_arch: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Write the new checkpoint beside the current one, then rotate: current -> previous, new -> current.
    A crash between the two renames leaves only the previous one, which `resume` falls back to."""
    current, previous = out_dir / CHECKPOINT_FILE, out_dir / PREVIOUS_CHECKPOINT_FILE
    incoming = out_dir / f".{CHECKPOINT_FILE}.incoming"
    save_torch_atomic(incoming, {
        "model": meta_arch.state_dict(),
        "optimizer": optimizer.state_dict(),
        "state": state.__dict__,
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    })
    if current.exists():
        os.replace(current, previous)
    os.replace(incoming, current)


CHECKPOINT_KEYS = ("model", "optimizer", "state", "rng_cpu")


def read_checkpoint(out_dir: Path, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest readable checkpoint in `out_dir`, or None to start from scratch. Unreadable ones
    are moved aside as `*.corrupt` and named in the log."""
    candidates = [out_dir / CHECKPOINT_FILE, out_dir / PREVIOUS_CHECKPOINT_FILE]
    for path in candidates:
        if not path.exists():
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(ckpt, dict) or any(key not in ckpt for key in CHECKPOINT_KEYS):
                raise ValueError(f"not a training checkpoint (expected keys {', '.join(CHECKPOINT_KEYS)})")
        except Exception as err:  # truncated, garbage, half-written by a full disk: any reason to distrust it
            first_line = (str(err).strip().splitlines() or [""])[0]
            os.replace(path, path.with_name(path.name + ".corrupt"))
            log(f"checkpoint {path} is unreadable ({type(err).__name__}: {first_line[:200]}); "
                f"moved aside to {path.name}.corrupt")
            continue
        log(f"resumed from {path} at step {ckpt['state'].get('step')}")
        return ckpt
    if any(path.with_name(path.name + ".corrupt").exists() for path in candidates):
        log("no readable checkpoint left: training starts over from step 0")
    return None


def apply_checkpoint(ckpt: dict[str, Any], meta_arch: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore the model, optimizer and RNG streams; returns the training state it was saved at."""
    meta_arch.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"])
    if ckpt.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
    return TrainState(**ckpt["state"])
