"""The building blocks every trial-config section shares: strict scalars and a frozen section that
forbids unknown keys (trainer/config.py and trainer/config_evaluation.py build on them)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Strict

# Strict scalars: YAML's `true` is not 1, 10.5 is not 10 and "10" is not a number; a float setting
# still takes an integer (`lr: 1`).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Bool = Annotated[bool, Strict()]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
