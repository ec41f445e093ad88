"""Whether `--out DIR` may hold this trial: checked before any work, so a folder never lies.

A folder holds one trial. Asked for another one (finished or not), the trainer refuses rather than
hand back, or resume from, the other trial's results; a folder it cannot create or write is refused
too. Each refusal is one line naming the folder and the way out (`python -m trainer` exits 2).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from trainer.contract import RESOLVED_CONFIG_FILE, RESULT_FILE, RESUME_FREE_KEYS


class UnusableOutDir(Exception):
    """`--out` cannot hold this trial; the message says why and what to do."""


def claim_out_dir(out_dir: Path, config: dict[str, Any]) -> None:
    """Create `out_dir` if needed and check that it is writable and holds no other trial."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UnusableOutDir(f"--out {out_dir}: exists and is not a folder; choose a folder path")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):  # the trainer's first write, tried before any work
            pass
    except OSError as err:
        raise UnusableOutDir(f"--out {out_dir}: cannot write there ({err.strerror or err}); "
                             "choose another folder or fix its permissions") from None
    _check_same_trial(out_dir, config)


def _check_same_trial(out_dir: Path, config: dict[str, Any]) -> None:
    previous = out_dir / RESOLVED_CONFIG_FILE
    if not previous.exists():
        if (out_dir / RESULT_FILE).exists():
            raise UnusableOutDir(f"--out {out_dir}: holds a {RESULT_FILE} but no {RESOLVED_CONFIG_FILE}, so "
                                 "which trial it belongs to is unknown; use another folder or delete this one")
        return
    try:
        old = yaml.safe_load(previous.read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise UnusableOutDir(f"--out {out_dir}: its {RESOLVED_CONFIG_FILE} cannot be read ({err}); "
                             "use another folder or delete this one") from None
    if not isinstance(old, dict) or _identity(old) != _identity(config):
        changed = sorted(k for k in set(old) | set(config) if k not in RESUME_FREE_KEYS and old.get(k) != config.get(k)) \
            if isinstance(old, dict) else []
        where = f" (differs in: {', '.join(changed)})" if changed else ""
        raise UnusableOutDir(f"--out {out_dir}: holds a different trial{where}; "
                             "use another --out folder or delete this one")


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUME_FREE_KEYS}
