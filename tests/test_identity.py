"""Trial identity: equal resolved configs under equal trainer code are the same trial."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from orchestrator.identity import code_version, trainer_source_dir, trial_id

CONFIG = {
    "name": "a", "seed": 0, "model": {"scale": "micro", "specialization": "none"}, "tracking": {"experiment": "x"},
}


def test_trial_id_is_short_hex_and_stable_across_processes():
    # A golden value: the id must not depend on the process (no hash(), no dict order, no run time).
    assert trial_id(CONFIG, "v1") == "cc3ea2bdbea35429"
    assert re.fullmatch(r"[0-9a-f]{16}", trial_id(CONFIG, "v1"))


def test_trial_id_ignores_name_tracking_and_key_order():
    renamed = {**CONFIG, "name": "b", "tracking": {"experiment": "elsewhere", "run_name": "r"}}
    reordered = {"model": {"specialization": "none", "scale": "micro"}, "seed": 0}
    assert trial_id(renamed, "v1") == trial_id(CONFIG, "v1") == trial_id(reordered, "v1")


def test_trial_id_changes_with_results_relevant_settings_and_code():
    base = trial_id(CONFIG, "v1")
    assert trial_id({**CONFIG, "seed": 1}, "v1") != base
    assert trial_id({**CONFIG, "model": {"scale": "tiny", "specialization": "none"}}, "v1") != base
    assert trial_id(CONFIG, "v2") != base


def test_code_version_hashes_the_trainer_sources_only(tmp_path: Path):
    copy = tmp_path / "trainer"
    shutil.copytree(trainer_source_dir(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    version = code_version(copy)
    assert re.fullmatch(r"[0-9a-f]{12}", version)
    assert version == code_version(trainer_source_dir())  # the same bytes, wherever they live

    (copy / "notes.txt").write_text("not source")
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "stale.py").write_text("x = 1")
    assert code_version(copy) == version

    config_py = copy / "config.py"
    config_py.write_text(config_py.read_text() + "\n# a change\n")
    assert code_version(copy) != version


def test_template_ids_equal_full_encoding_ids():
    from orchestrator.identity import TrialIdTemplate, canonical_json

    base = {"seed": 0, "name": "x", "model": {"scale": "micro", "reg_tokens": 0}, "betas": [0.9, 0.99],
            "tracking": {"experiment": "e"}}
    paths = [("seed",), ("model", "reg_tokens"), ("betas",), ("name",), ("tracking", "experiment")]
    template = TrialIdTemplate(base, paths, "v1")
    assert template.slot(("name",)) is None and template.slot(("tracking", "experiment")) is None
    texts = list(template.defaults)
    assert template.trial_id(texts) == trial_id(base, "v1")
    texts[template.slot(("model", "reg_tokens"))] = canonical_json(4)
    texts[template.slot(("betas",))] = canonical_json([0.5, 0.5])
    changed = {**base, "model": {"scale": "micro", "reg_tokens": 4}, "betas": [0.5, 0.5]}
    assert template.trial_id(texts) == trial_id(changed, "v1")
