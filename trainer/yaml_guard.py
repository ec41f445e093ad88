"""YAML that cannot blow up: duplicate keys refused, alias expansion bounded.

PyYAML silently keeps the last of two equal keys, and expands aliases without limit, so a few
lines of anchors ("billion laughs") build a structure of billions of nodes. Every config this
project reads (trial configs, sweep specs, cluster profiles) goes through `check_document` on the
composed node graph before anything is constructed: the expanded size is counted once per distinct
node (memoized over the graph, so the check itself is linear in the file).
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_EXPANDED_NODES = 100_000  # far above any real config (the paper sweeps are a few hundred)
MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlGuardError(ValueError):
    """A document refused before construction; `line` is 1-based where known."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def expanded_size(node: yaml.Node, limit: int = MAX_EXPANDED_NODES) -> int:
    """How many nodes the document holds once every alias is expanded; raises past `limit` or on
    a recursive anchor."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise YamlGuardError("a recursive YAML anchor (an alias inside its own anchor) is not allowed",
                                 n.start_mark.line + 1)
        active.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(item) for item in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        active.discard(key)
        if total > limit:
            raise YamlGuardError(f"the YAML expands to more than {limit:,} nodes (aliases of aliases?); "
                                 "write the values out instead", n.start_mark.line + 1)
        sizes[key] = total
        return total

    return size(node)


def duplicate_keys(node: yaml.Node) -> list[tuple[str, int, int]]:
    """(key, line, first line) for each key written twice in one mapping, anywhere in the document."""
    found: list[tuple[str, int, int]] = []
    seen_nodes: set[int] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if id(n) in seen_nodes:
            continue
        seen_nodes.add(id(n))
        if isinstance(n, yaml.MappingNode):
            first: dict[str, int] = {}
            for key_node, value_node in n.value:
                stack.append(value_node)
                if key_node.tag == MERGE_TAG:
                    continue
                key, line = str(key_node.value), key_node.start_mark.line + 1
                if key in first:
                    found.append((key, line, first[key]))
                else:
                    first[key] = line
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    return sorted(found, key=lambda item: item[1])


def safe_load(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys and documents that expand past the bound."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        expanded_size(node)
        if duplicates := duplicate_keys(node):
            key, line, first = duplicates[0]
            raise YamlGuardError(f"duplicate key {key!r} (first at line {first})", line)
        return loader.construct_document(node)
    finally:
        loader.dispose()
