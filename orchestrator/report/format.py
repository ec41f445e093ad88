"""Text building blocks shared by the report's Markdown and CSV: number formatting, escaping,
footnotes, MLflow UI links, and the one-line reason a trial has no numbers.

Conventions a reader can rely on (also written into the report's legend):
- a value is `mean ± std` over the finished seeds; the `n` column says finished/planned seeds;
- Δ is paired per seed against the row's reference; `[low, high]` is its uncorrected t CI; the
  verdict rests on the Holm-adjusted p-value; `°` marks a delta without a CI (one seed pair, or
  identical per-seed differences);
- a cell never goes blank: `—ⁿ` / `n/aⁿ` carry a numbered footnote that says why.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orchestrator.report.outcome import TrialOutcome
from orchestrator.report.tables import Row

NO_CI = "°"
MISSING = "—"
NOT_LOGGED = "n/a"
DEFAULT_UI_BASE = "http://127.0.0.1:5000"
RUN_ID_CHARS = 8
_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def fmt(value: float | None, decimals: int, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return MISSING
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    if text.lstrip("+-").strip("0.") == "":  # "-0.00" reads as a sign where there is none
        text = f"{0:+.{decimals}f}" if signed else f"{0:.{decimals}f}"
    return text


def fmt_p(p: float | None) -> str:
    """A p-value as a reader compares it with 0.05: three decimals, `<0.001` below that."""
    if p is None or not math.isfinite(p):
        return MISSING
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def superscript(n: int) -> str:
    return str(n).translate(_SUPERSCRIPTS)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def seeds_text(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(str(s) for s in seeds)}"


def run_url(ui_base: str, experiment_id: str | None, run_id: str) -> str | None:
    if not experiment_id:
        return None
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(ui_base: str, experiment_id: str) -> str:
    return f"{ui_base.rstrip('/')}/#/experiments/{experiment_id}"


@dataclass
class Footnotes:
    """Numbered notes of one table; the same text always gets the same number."""

    texts: list[str] = field(default_factory=list)

    def mark(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return superscript(self.texts.index(text) + 1)

    def render(self) -> list[str]:
        return [f"{superscript(i)} {text}  " for i, text in enumerate(self.texts, 1)]



def outcome_reason(outcome: TrialOutcome) -> str:
    if outcome.state == "failed":
        reason = f"failed: {outcome.failure_class or 'error'}"
        if outcome.failure_class in ("error", None) and outcome.error:
            error = outcome.error if len(outcome.error) <= 80 else outcome.error[:77] + "..."
            reason += f" ({escape_cell(error)})"
        return reason
    if outcome.state in ("running", "planned") and outcome.failure_class:
        return f"{outcome.state} (retry after {outcome.failure_class})"
    if outcome.state == "done":
        return "done but no metrics recorded"
    return outcome.state


def describe_outcomes(outcomes: Iterable[TrialOutcome]) -> str:
    """`failed: nan (seed 1); running (seeds 2, 3)`: one clause per reason, seeds grouped."""
    by_reason: dict[str, list[int]] = {}
    for outcome in outcomes:
        by_reason.setdefault(outcome_reason(outcome), []).append(outcome.seed)
    return "; ".join(f"{reason} ({seeds_text(seeds)})" for reason, seeds in by_reason.items())



def row_note(row: Row) -> str | None:
    """Why some (or all) seeds of a row have no numbers; None when every planned seed finished."""
    missing = row.not_done
    if not missing:
        return None
    return describe_outcomes(missing)

