"""Alias bombs and duplicate keys are refused before construction, under every kind of key."""

from __future__ import annotations

import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml

from orchestrator.spec import SpecError, load_spec
from trainer.config import ConfigError, read_config_data
from trainer.yaml_guard import MAX_EXPANDED_NODES, YamlGuardError, duplicate_keys, expanded_size, safe_load

ROOT = Path(__file__).resolve().parents[1]
LAUGHS = "\n".join(["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
                   + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)])  # 10^10 leaves
TIME_BOUND_S = 5.0
MEMORY_BOUND_MB = 50


def bounded(fn):
    """Run `fn`; fail unless it returns within the time and memory bounds (what a bomb would blow)."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        return fn()
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < TIME_BOUND_S, f"took {elapsed:.1f} s"
        assert peak / 2**20 < MEMORY_BOUND_MB, f"peak {peak / 2**20:.0f} MB"


def test_expanded_size_counts_aliases_as_their_expansion():
    node = yaml.compose("a: &x [1, 2, 3]\nb: [*x, *x]\n")
    # mapping 1 + key a 1 + list(1+3) + key b 1 + outer list 1 + 2 x list(1+3) = 16
    assert expanded_size(node) == 16
    with pytest.raises(YamlGuardError, match="expands to more than 15 nodes"):
        expanded_size(node, limit=15)


def test_recursive_anchors_and_duplicate_keys_are_refused():
    with pytest.raises(YamlGuardError, match="recursive YAML anchor"):
        safe_load("a: &x [1, *x]\n")
    assert duplicate_keys(yaml.compose("a: 1\nb: {c: 1, c: 2}\na: 3\n")) == [("c", 2, 2), ("a", 3, 1)]
    with pytest.raises(YamlGuardError, match="duplicate key 'a' \\(first at line 1\\)") as caught:
        safe_load("a: 1\nb: 2\na: 3\n")
    assert caught.value.line == 3
    assert safe_load("base: &b {x: 1}\nother: {<<: *b, y: 2}\n") == {"base": {"x": 1}, "other": {"x": 1, "y": 2}}


def test_a_bomb_is_refused_in_bounded_time_and_memory():
    with pytest.raises(YamlGuardError, match=f"more than {MAX_EXPANDED_NODES:,} nodes"):
        bounded(lambda: safe_load(LAUGHS))


def _spec_with_bomb(where: str) -> str:
    # The bomb's anchors sit under `description`; its last alias lands under `where`.
    anchors = ["&a0 [" + ", ".join(["lol"] * 10) + "]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    head = f"name: bomb\ndescription: [{', '.join(anchors)}]\n"
    spots = {
        "base": "base: {model: {specialization: *a9}}\naxes: {s: {key: model.scale, values: {micro: micro}}}\n",
        "axis_values": "axes: {s: {key: model.specialization, values: *a9}}\n",
        "report_metrics": "axes: {s: {key: model.scale, values: {micro: micro}}}\nreport: {metrics: *a9}\n",
        "backend_env": "axes: {s: {key: model.scale, values: {micro: micro}}}\nbackend: {options: {env: {X: *a9}}}\n",
        "search_params": "axes: {s: {key: model.scale, values: {micro: micro}}}\nsearch: {params: {optimizer.lr: {choices: *a9}}}\n",
        "seeds": "axes: {s: {key: model.scale, values: {micro: micro}}}\nseeds: *a9\n",
    }
    return head + spots[where]


@pytest.mark.parametrize("where", ["base", "axis_values", "report_metrics", "backend_env", "search_params", "seeds"])
def test_a_spec_with_a_bomb_under_any_key_is_refused_in_bounded_time(tmp_path, where):
    path = tmp_path / "bomb.yaml"
    path.write_text(_spec_with_bomb(where))
    with pytest.raises(SpecError) as caught:
        bounded(lambda: load_spec(path))
    assert f"{path}: line " in str(caught.value) and "expands to more than" in str(caught.value)


def test_a_bomb_in_a_set_override_is_refused(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("name: ok\naxes: {s: {key: model.scale, values: {micro: micro}}}\n")
    bomb = "{" + LAUGHS.replace("\n", ", ").replace("a0:", "a0:", 1) + "}"
    with pytest.raises(SpecError, match="--set description=.*refused: the YAML expands"):
        bounded(lambda: load_spec(path, [f"description={bomb}"]))


def test_a_trial_config_with_a_bomb_or_a_duplicate_key_is_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(LAUGHS + "\nmodel: {specialization: *a9}\n")
    with pytest.raises(ConfigError, match="expands to more than"):
        bounded(lambda: read_config_data(bomb))
    twice = tmp_path / "twice.yaml"
    twice.write_text("seed: 1\nmodel: {scale: micro}\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: duplicate key 'seed' \(first at line 1\) \(line 3\)"):
        read_config_data(twice)
    proc = subprocess.run([sys.executable, "-m", "trainer", "--config", str(twice), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "duplicate key 'seed'" in proc.stderr
    assert not (tmp_path / "out").exists()
