"""The checks a trial config gets before anything runs: strict scalars, values against the model
(block ranges vs depth, image vs patch size), tracking URI schemes, and the files it names. The
malformed corpora (tests/malformed_specs/, tests/malformed_trials/) test the wording end to end.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.spec import SpecError, load_spec
from orchestrator.spec.validation import check_trial_files
from trainer.config import ConfigError, TrialConfig, check_files, parse_config
from trainer.path_checks import TRACKING_SCHEMES, tracking_uri_problem
from trainer.scales import SCALES
from trainer.specialization import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_tracking_schemes_are_the_stores_mlflow_builds():
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry  # the installed MLflow's own list

    registered = set(_tracking_store_registry._registry) - {"", "databricks-uc", "uc"}  # "": a path; uc: refused
    assert registered == set(TRACKING_SCHEMES)


@pytest.mark.parametrize("uri", [
    "sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "file:///tmp/mlruns", "mlruns", "/abs/mlruns",
    "http://127.0.0.1:5000", "https://mlflow.example.com", "databricks", "databricks://profile",
    "postgresql://user@host/db", "postgresql+psycopg2://user@host/db", "mysql+pymysql://u@h/db", "mssql+pyodbc://h",
])
def test_tracking_uris_mlflow_supports_are_accepted(uri):
    assert tracking_uri_problem(uri) is None
    assert TrialConfig.model_validate({"tracking": {"tracking_uri": uri}}).tracking.tracking_uri == uri


@pytest.mark.parametrize("uri", ["ftp://host/mlruns", "s3://bucket/mlruns", "sqlit:///mlflow.db", "htps://host", " "])
def test_other_tracking_uris_are_refused_with_the_accepted_schemes(uri):
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri: (MLflow has no tracking store|empty)"):
        parse_config({"tracking": {"tracking_uri": uri}})


@pytest.mark.parametrize("section, key, value, expected", [
    ("schedule", "batch_size", True, "valid integer (got True)"),
    ("schedule", "steps", 10.5, "valid integer (got 10.5)"),
    ("schedule", "steps", 10.0, "valid integer (got 10.0)"),
    ("schedule", "steps", "10", "valid integer (got '10')"),
    ("optimizer", "lr", True, "valid number (got True)"),
    ("optimizer", "lr", "0.1", "valid number (got '0.1')"),
    ("evaluation", "knn", 1, "valid boolean (got 1)"),
    ("evaluation", "knn", "yes", "valid boolean (got 'yes')"),
    ("model", "reg_tokens", False, "valid integer (got False)"),
])
def test_scalars_are_not_coerced(section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}}, "t.yaml")
    assert f"  - {section}.{key}: Input should be a {expected}" in str(err.value)


def test_integers_still_fill_float_settings():
    cfg = parse_config({"optimizer": {"lr": 1, "betas": [0, 1]}, "model": {"drop_path_rate": 0}})
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float) and cfg.optimizer.betas == (0.0, 1.0)


@pytest.mark.parametrize("scale", list(SCALES))
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_fits_every_scale(scale, preset):
    TrialConfig.model_validate({"model": {"scale": scale, "specialization": preset}})


@pytest.mark.parametrize("specialization, ok", [
    ("qkv@first:6", True), ("qkv@last:6", True), ("qkv@[0,5]", True), ("qkv@first:7", False),
    ("qkv@last:7", False), ("qkv@[6]", False), ("fc1@first_half,fc2@last_third", True),
])
def test_block_ranges_are_checked_against_the_depth(specialization, ok):
    data = {"model": {"scale": "micro", "specialization": specialization}}
    if ok:
        TrialConfig.model_validate(data)
    else:
        with pytest.raises(ConfigError, match=r"model\.specialization: .*depth 6"):
            parse_config(data)


def test_an_image_size_must_be_a_whole_number_of_patches():
    TrialConfig.model_validate({"model": {"scale": "tiny", "img_size": 160, "patch_size": 16}})
    with pytest.raises(ConfigError, match=r"model\.img_size: image size 100 \(model\.img_size\) .* patch size 16"):
        parse_config({"model": {"scale": "tiny", "img_size": 100}})


def test_files_a_trial_reads_are_checked_here(tmp_path):
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    checkpoint = tmp_path / "vit.pth"
    checkpoint.write_bytes(b"weights")
    good = {"data": {"dataset": "folders", "classification_root": str(root)}, "model": {"pretrained": str(checkpoint)}}
    problems = check_files(TrialConfig.model_validate(good))
    assert problems == [(("data", "classification_root"), f"{root} lacks val/: the root holds one folder per split "
                                                          "(train, val)")]
    (root / "val").mkdir()
    assert parse_config(good).model.pretrained == checkpoint
    # The scenes dataset reads no folder: roots left in a config are not its problem.
    assert check_files(TrialConfig.model_validate({"data": {"classification_root": "/nowhere"}})) == []


def test_a_spec_checks_its_files_only_before_a_run(tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(f"""
base: {{data: {{dataset: folders, classification_root: {tmp_path / 'missing'}}}}}
axes:
  init: {{key: model.pretrained, values: {{scratch: null, ours: {tmp_path / 'ours.pth'}}}}}
""")
    spec = load_spec(spec_path)  # plan, status and report work where the data is not
    with pytest.raises(SpecError) as err:
        check_trial_files(spec)
    assert err.value.errors == [
        f"{spec_path}: base.data.classification_root: {tmp_path / 'missing'} does not exist: set the dataset's root "
        "folder, or remove the key",
        f"{spec_path}: axes.init.values.ours: model.pretrained: {tmp_path / 'ours.pth'} does not exist: point "
        "model.pretrained at a .pth/.safetensors checkpoint, or remove the key",
    ]


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_the_shipped_local_sweeps_have_their_files(path, monkeypatch):
    monkeypatch.chdir(REPO)
    check_trial_files(load_spec(path))
