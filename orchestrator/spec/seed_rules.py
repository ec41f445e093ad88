"""`seeds` and `seeds_by_cell`: which seeds each cell runs.

A paired comparison's interval narrows with the seeds of that comparison alone, and its arms are
not equally noisy (`plan` prints each one's paired SD): a rule gives the noisy arms, and their
reference, the seeds their intervals need, without paying for them in every other arm.

    seeds: [0, 1, 2, 3, 4, 5]
    seeds_by_cell:
      - {cell: {specialization: all}, seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
      - {cell: {specialization: none}, seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
"""

from __future__ import annotations

from typing import Any

from orchestrator.spec.axes import check_cell
from orchestrator.spec.expansion import matches
from orchestrator.spec.problems import KeyPath, Problems, unknown_key_message
from orchestrator.spec.schema import Axis, SeedRule, SweepSpec, cell_text
from orchestrator.stats.design import cell_key, compared_pairs

RULE_KEYS = ("cell", "seeds")


def check_seeds(seeds: Any, path: KeyPath, problems: Problems) -> list[int]:
    """A non-empty list of distinct integers."""
    if not isinstance(seeds, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        problems.add(path, f"expected a list of integers, got {seeds!r}")
        return [0]
    if not seeds:
        problems.add(path, "must not be empty")
    duplicated = sorted({s for s in seeds if seeds.count(s) > 1})
    if duplicated:
        problems.add(path, f"duplicate seeds {duplicated}")
    return seeds or [0]


def parse_seed_rules(raw: Any, declared: list[str], by_name: dict[str, Axis], problems: Problems) -> list[SeedRule]:
    """`seeds_by_cell` as written: a list of {cell: partial cell, seeds: [...]}."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.add(("seeds_by_cell",), f"expected a list of {{cell: ..., seeds: [...]}}, got {type(raw).__name__}")
        return []
    rules = []
    for i, entry in enumerate(raw):
        path = ("seeds_by_cell", str(i))
        if not isinstance(entry, dict) or set(entry) != set(RULE_KEYS):
            unknown = [k for k in entry if k not in RULE_KEYS] if isinstance(entry, dict) else []
            problems.add(path, unknown_key_message(str(unknown[0]), RULE_KEYS) if unknown
                         else f"expected {{cell: {{axis: value}}, seeds: [...]}}, got {entry!r}")
            continue
        cell = check_cell(entry["cell"], path + ("cell",), declared, by_name, problems)
        seeds = check_seeds(entry["seeds"], path + ("seeds",), problems)
        if cell is not None:
            rules.append(SeedRule(cell=cell, seeds=seeds))
    return rules


def check_seed_rules(spec: SweepSpec, cells: list[tuple[str, ...]], problems: Problems) -> None:
    """Every rule names some cell, no cell falls under two rules, and every compared cell's seeds
    are seeds its reference runs too (a seed without its pair would be a trial the report drops)."""
    if not spec.seeds_by_cell:
        return
    if spec.search is not None:
        problems.add(("seeds_by_cell",), "not with search: a tuned sweep runs `seeds` in every cell at its chosen "
                     "settings (remove seeds_by_cell, or run the search without it)")
        return
    claimed: dict[tuple[str, ...], int] = {}
    for i, rule in enumerate(spec.seeds_by_cell):
        hits = [cell for cell in cells if matches(cell, spec.axes, rule.cell)]
        if not hits:
            problems.add(("seeds_by_cell", str(i), "cell"), f"{rule.cell} is not a cell of the sweep (excluded?)")
        for cell in hits:
            if cell in claimed:
                problems.add(("seeds_by_cell", str(i), "cell"),
                             f"{cell_text(zip(spec.axis_names, cell))} already has its seeds from "
                             f"seeds_by_cell.{claimed[cell]}: "
                             "give each cell one rule")
            claimed.setdefault(cell, i)
    named = {cell_key(dict(zip(spec.axis_names, cell))): dict(zip(spec.axis_names, cell)) for cell in cells}
    for variant, reference in compared_pairs(spec, set(named)):
        unpaired = sorted(set(spec.seeds_for(named[variant])) - set(spec.seeds_for(named[reference])))
        if unpaired:
            problems.add(("seeds_by_cell",),
                         f"{cell_text(variant)} runs seeds {unpaired} that its reference {cell_text(reference)} "
                         "does not: the report pairs by seed and would drop them; give the reference those "
                         "seeds too")

