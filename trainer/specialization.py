"""Which layers hold separate weights for the prefix tokens ([CLS], registers) and the patch tokens.

A `Specialization` is parsed from a short string, e.g. `norm1,norm2,final_norm,qkv@first_third`:
a comma-separated list of `component[@blocks]` rules and preset names. Blocks default to `all`.

    components  norm1 norm2 qkv proj ls1 ls2 fc1 fc2 mlp(=fc1+fc2) final_norm
    blocks      all | first_third | first_half | last_third | last_half | first:N | last:N | [0,2,5]
    presets     none, paper, norms, ...  (see PRESETS)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# Component name -> path of the submodule inside a timm `Block`.
BLOCK_COMPONENTS: dict[str, str] = {
    "norm1": "norm1",
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "ls1": "ls1",
    "norm2": "norm2",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
    "ls2": "ls2",
}
MODEL_COMPONENTS = ("final_norm",)
ALIASES = {"mlp": ("fc1", "fc2"), "norms": ("norm1", "norm2", "final_norm"), "ls": ("ls1", "ls2")}
COMPONENT_ORDER = tuple(BLOCK_COMPONENTS) + MODEL_COMPONENTS

PRESETS: dict[str, str] = {
    "none": "",
    # The paper's recommendation: every norm and LayerScale, plus QKV in the first third of the blocks.
    "paper": "norm1,norm2,final_norm,ls1,ls2,qkv@first_third",
    "norms": "norm1,norm2,final_norm",
    "qkv_first_third": "qkv@first_third",
    "all": "norm1,norm2,final_norm,ls1,ls2,qkv,proj,fc1,fc2",
}

_NAMED_RANGES = ("all", "first_third", "first_half", "last_third", "last_half")
_RANGE_RE = re.compile(r"^(first|last):(\d+)$")
_LIST_RE = re.compile(r"^\[\s*(\d+(\s*,\s*\d+)*)?\s*\]$")


class SpecializationError(ValueError):
    pass


@dataclass(frozen=True)
class BlockRange:
    """A set of blocks, resolved against a model's depth only when the model is built."""

    kind: str  # one of _NAMED_RANGES, "first", "last", "list"
    count: int = 0
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "BlockRange":
        text = text.strip()
        if text in _NAMED_RANGES:
            return cls(text)
        if m := _RANGE_RE.match(text):
            if int(m.group(2)) < 1:
                raise SpecializationError(f"block range {text!r}: N must be >= 1")
            return cls(m.group(1), count=int(m.group(2)))
        if _LIST_RE.match(text):
            indices = tuple(sorted({int(i) for i in re.findall(r"\d+", text)}))
            if not indices:
                raise SpecializationError(f"block range {text!r}: the list is empty")
            return cls("list", indices=indices)
        raise SpecializationError(
            f"unknown block range {text!r}; expected one of {', '.join(_NAMED_RANGES)}, "
            "first:N, last:N or a list such as [0,2,5]"
        )

    def resolve(self, depth: int) -> frozenset[int]:
        third, half = max(1, round(depth / 3)), max(1, round(depth / 2))
        if self.kind == "all":
            return frozenset(range(depth))
        if self.kind in ("first_third", "first_half", "first"):
            n = {"first_third": third, "first_half": half}.get(self.kind, self.count)
            if n > depth:
                raise SpecializationError(f"block range first:{n} exceeds the model's depth {depth}")
            return frozenset(range(n))
        if self.kind in ("last_third", "last_half", "last"):
            n = {"last_third": third, "last_half": half}.get(self.kind, self.count)
            if n > depth:
                raise SpecializationError(f"block range last:{n} exceeds the model's depth {depth}")
            return frozenset(range(depth - n, depth))
        bad = [i for i in self.indices if i >= depth]
        if bad:
            raise SpecializationError(f"block indices {bad} do not exist in a model of depth {depth}")
        return frozenset(self.indices)

    def __str__(self) -> str:
        if self.kind in ("first", "last"):
            return f"{self.kind}:{self.count}"
        if self.kind == "list":
            return "[" + ",".join(map(str, self.indices)) + "]"
        return self.kind


@dataclass(frozen=True)
class Specialization:
    """Component -> blocks with separate prefix/patch weights. Empty means the vanilla ViT."""

    rules: tuple[tuple[str, BlockRange], ...] = ()
    _index: dict = field(default=None, compare=False, hash=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", dict(self.rules))

    @classmethod
    def parse(cls, text: "str | Specialization") -> "Specialization":
        if isinstance(text, Specialization):
            return text
        if not isinstance(text, str):
            raise SpecializationError(f"specialization must be a string, got {type(text).__name__}")
        return _parse(text)

    def canonical(self) -> str:
        """One string per distinct specialization: `paper` and its expansion give the same text."""
        if not self.rules:
            return "none"
        parts = []
        for name, blocks in self.rules:
            parts.append(name if (name in MODEL_COMPONENTS or blocks.kind == "all") else f"{name}@{blocks}")
        return ",".join(parts)

    def blocks_for(self, component: str, depth: int) -> frozenset[int]:
        blocks = self._index.get(component)
        return frozenset() if blocks is None else blocks.resolve(depth)

    def depth_problems(self, depth: int) -> list[str]:
        """One line per rule naming blocks a model of `depth` blocks does not have (none: it fits)."""
        problems = []
        for name, blocks in self.rules:
            try:
                blocks.resolve(depth)
            except SpecializationError as err:
                problems.append(f"{name}: {err}")
        return problems

    def block_plan(self, depth: int) -> list[tuple[str, ...]]:
        """For each block index, the components specialized in it (validates ranges against depth)."""
        plan: list[list[str]] = [[] for _ in range(depth)]
        for name in BLOCK_COMPONENTS:
            for i in sorted(self.blocks_for(name, depth)):
                plan[i].append(name)
        return [tuple(p) for p in plan]

    @property
    def final_norm(self) -> bool:
        return "final_norm" in self._index

    @property
    def is_vanilla(self) -> bool:
        return not self.rules

    def __str__(self) -> str:
        return self.canonical()


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Specialization:
    """Parsed once per distinct text (a Specialization is immutable): a 10,000-trial spec validates
    the same few strings thousands of times."""
    rules: dict[str, BlockRange] = {}
    for item in _split_top_level(text.strip()):
        if not item:
            continue
        if item in PRESETS:
            for name, blocks in _parse(PRESETS[item]).rules:
                rules[name] = blocks
            continue
        name, _, range_text = item.partition("@")
        name = name.strip()
        names = ALIASES.get(name, (name,))
        for n in names:
            if n not in COMPONENT_ORDER:
                raise SpecializationError(
                    f"unknown component or preset {name!r}; components: {', '.join(COMPONENT_ORDER)}, "
                    f"aliases: {', '.join(ALIASES)}, presets: {', '.join(PRESETS)}"
                )
            if n in MODEL_COMPONENTS:
                if range_text and range_text.strip() != "all":
                    raise SpecializationError(f"{n} is not per block: it takes no block range (got @{range_text})")
                rules[n] = BlockRange("all")
            else:
                rules[n] = BlockRange.parse(range_text) if range_text else BlockRange("all")
    ordered = tuple((n, rules[n]) for n in COMPONENT_ORDER if n in rules)
    return Specialization(ordered)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside a [..] block list."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise SpecializationError(f"unbalanced brackets in specialization {text!r}")
    parts.append("".join(current).strip())
    return parts
