"""Sweep specs: expansion modes, named and multi-key values, overrides, identity across specs."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from orchestrator.identity import code_version, trial_id
from orchestrator.plan import diff_plan
from orchestrator.spec import SpecError, SweepSpec, TrialPlan, expand, load_spec, spec_hash
from trainer.config import TrackingConfig, TrialConfig, parse_config
from trainer.scales import SCALES
from trainer.specialization import Specialization

REPO = Path(__file__).resolve().parents[1]
VERSION = "test-code"  # a fixed code version: these tests are about the spec, not the trainer's source

SPEC_HEAD = """
name: demo
base:
  framework: supervised
  model: {scale: micro}
  schedule: {steps: 100, warmup_steps: 10}
"""


def write_spec(tmp_path: Path, *parts: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text("".join(textwrap.dedent(part) for part in (SPEC_HEAD, *parts)))
    return path


def load(tmp_path: Path, *parts: str, overrides: tuple[str, ...] = ()) -> SweepSpec:
    return load_spec(write_spec(tmp_path, *parts), overrides)


def cells(trials: list[TrialPlan]) -> list[tuple[str, ...]]:
    return [tuple(t.cell.values()) for t in trials if t.seed == trials[0].seed]


TWO_AXES = """
axes:
  specialization:
    key: model.specialization
    values: {none: none, norms: norms, paper: paper}
  framework: [supervised, dinov2]
"""


# ------------------------------------------------------------------------------------------------
# Expansion modes


def test_grid_is_the_product_seed_major_last_axis_fastest(tmp_path):
    trials = expand(load(tmp_path, TWO_AXES + "seeds: [0, 1]\n"), VERSION)
    assert len(trials) == 3 * 2 * 2
    assert [t.seed for t in trials] == [0] * 6 + [1] * 6
    assert cells(trials) == [
        ("none", "supervised"), ("none", "dinov2"), ("norms", "supervised"),
        ("norms", "dinov2"), ("paper", "supervised"), ("paper", "dinov2"),
    ]
    assert trials[3].label == "specialization=norms framework=dinov2 seed=0"
    assert trials[3].config["framework"] == "dinov2"
    assert trials[3].config["model"]["specialization"] == "norm1,norm2,final_norm"
    assert len({t.trial_id for t in trials}) == 12


def test_zip_pairs_values_by_position(tmp_path):
    spec = load(tmp_path, """
        expand: zip
        axes:
          specialization: {key: model.specialization, values: {none: none, paper: paper}}
          model.scale: [micro, tiny]
        """)
    assert cells(expand(spec, VERSION)) == [("none", "micro"), ("paper", "tiny")]


def test_one_at_a_time_moves_each_axis_alone_from_the_baseline(tmp_path):
    spec = load(tmp_path, TWO_AXES, """
        expand: one_at_a_time
        baseline: {specialization: none, framework: supervised}
        """)
    assert cells(expand(spec, VERSION)) == [
        ("none", "supervised"), ("norms", "supervised"), ("paper", "supervised"), ("none", "dinov2"),
    ]


def test_exclude_drops_partial_matches_and_include_adds_them_back(tmp_path):
    spec = load(tmp_path, TWO_AXES, """
        baseline: {specialization: none, framework: supervised}
        exclude: [{framework: dinov2}]
        include: [{specialization: paper, framework: dinov2}, {framework: dinov2}]
        """)
    assert spec.include == [
        {"specialization": "paper", "framework": "dinov2"},
        {"specialization": "none", "framework": "dinov2"},  # missing axes come from the baseline
    ]
    assert cells(expand(spec, VERSION)) == [
        ("none", "supervised"), ("norms", "supervised"), ("paper", "supervised"),
        ("paper", "dinov2"), ("none", "dinov2"),
    ]


def test_seeds_set_the_trial_seed_and_default_to_zero(tmp_path):
    with_seeds = expand(load(tmp_path, TWO_AXES + "seeds: [3, 7]\n"), VERSION)
    assert {t.seed for t in with_seeds} == {3, 7}
    assert all(t.config["seed"] == t.seed for t in with_seeds)
    assert {t.seed for t in expand(load(tmp_path, TWO_AXES), VERSION)} == {0}


# ------------------------------------------------------------------------------------------------
# Values: named, short form, several keys, whole sections


def test_short_form_axis_is_named_by_its_key_and_values_by_their_text(tmp_path):
    spec = load(tmp_path, """
        axes:
          model.reg_tokens: [0, 4]
          evaluation.linear: [true, false]
        baseline: {model.reg_tokens: 0, evaluation.linear: true}
        """)
    assert spec.axis_names == ["model.reg_tokens", "evaluation.linear"]
    assert spec.axis("model.reg_tokens").value_names == ["0", "4"]
    trial = expand(spec, VERSION)[3]
    assert trial.cell == {"model.reg_tokens": "4", "evaluation.linear": "false"}
    assert trial.config["model"]["reg_tokens"] == 4 and trial.config["evaluation"]["linear"] is False


def test_multi_key_axis_sets_its_keys_together_by_list_or_alias(tmp_path):
    spec = load(tmp_path, """
        axes:
          setup:
            keys: {spec: model.specialization, regs: model.reg_tokens}
            values:
              plain: {spec: none, regs: 0}
              paper_regs: {spec: paper, model.reg_tokens: 4}
          sched:
            keys: [schedule.steps, schedule.warmup_steps]
            values:
              short: {schedule.steps: 50, schedule.warmup_steps: 5}
              long: {schedule.steps: 400, schedule.warmup_steps: 40}
        """)
    trial = next(t for t in expand(spec, VERSION) if t.cell == {"setup": "paper_regs", "sched": "short"})
    assert trial.config["model"]["reg_tokens"] == 4
    assert trial.config["model"]["specialization"].startswith("norm1")
    assert (trial.config["schedule"]["steps"], trial.config["schedule"]["warmup_steps"]) == (50, 5)


def test_a_mapping_value_on_a_section_merges_into_the_base_section(tmp_path):
    spec = load(tmp_path, """
        axes:
          data_size:
            key: data.scenes
            values: {small: {train_size: 100, num_classes: 6}, large: {train_size: 4000}}
        """)
    small, large = expand(spec, VERSION)
    assert small.config["data"]["scenes"] == {"num_classes": 6, "train_size": 100, "val_size": 512, "seed": 0}
    assert large.config["data"]["scenes"]["num_classes"] == 4  # the default, untouched by `large`


def test_every_trial_config_is_a_valid_trial_with_default_tracking(tmp_path):
    for trial in expand(load(tmp_path, TWO_AXES + "seeds: [0, 1]\n"), VERSION):
        assert parse_config(trial.config).model_dump(mode="json") == trial.config
        assert trial.config["tracking"] == TrackingConfig().model_dump(mode="json")
        assert trial.config["name"] == f"demo/{trial.label}"


def test_every_id_is_the_hash_of_its_own_config(tmp_path):
    spec = load(tmp_path, """
        seeds: [0, 5]
        axes:
          specialization: {key: model.specialization, values: {none: none, paper: paper}}
          setup:
            keys: [schedule.steps, schedule.warmup_steps, optimizer.betas]
            values:
              short: {schedule.steps: 50, schedule.warmup_steps: 5, optimizer.betas: [0.9, 0.95]}
              default: {schedule.steps: 100, schedule.warmup_steps: 10, optimizer.betas: [0.9, 0.999]}
          data.scenes: [{train_size: 64}, {num_classes: 3}]
        """)
    for trial in expand(spec, VERSION):
        assert trial.trial_id == trial_id(trial.config, VERSION)


def test_trial_configs_share_no_mutable_state(tmp_path):
    first, second = expand(load(tmp_path, TWO_AXES), VERSION)[:2]
    first.config["tracking"]["tags"]["sweep"] = "demo"
    first.config["optimizer"]["betas"][0] = 0.5
    assert second.config["tracking"]["tags"] == {} and second.config["optimizer"]["betas"][0] == 0.9


# ------------------------------------------------------------------------------------------------
# Baselines and the report


def test_partial_baseline_and_report_defaults(tmp_path):
    spec = load(tmp_path, TWO_AXES + "baseline: {specialization: none}\n")
    assert spec.report.baseline == {"specialization": "none"}
    assert spec.report.compare == ["specialization", "framework"]
    assert spec.report.metrics == ["linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse"]
    assert spec.tracking.experiment == "demo" and spec.output_dir == Path("runs/demo")


def test_report_crossings_and_own_baseline(tmp_path):
    spec = load(tmp_path, TWO_AXES, """
        baseline: {specialization: none, framework: supervised}
        report:
          compare: [specialization, [specialization, framework]]
          metrics: [seg_miou]
          baseline: {specialization: none}
        """)
    assert spec.report.compare == ["specialization", ["specialization", "framework"]]
    assert spec.report.baseline == {"specialization": "none"}
    assert spec.baseline == {"specialization": "none", "framework": "supervised"}


def test_baseline_must_be_a_zip_row(tmp_path):
    with pytest.raises(SpecError, match=r"baseline: specialization=none, model.scale=tiny is not a cell"):
        load(tmp_path, """
            expand: zip
            axes:
              specialization: {key: model.specialization, values: {none: none, paper: paper}}
              model.scale: [micro, tiny]
            baseline: {specialization: none, model.scale: tiny}
            """)


# ------------------------------------------------------------------------------------------------
# Identity across spellings and specs


def test_equal_resolved_configs_get_equal_ids_across_specs(tmp_path):
    preset = load_spec(write_spec(tmp_path, """
        axes:
          specialization: {key: model.specialization, values: {none: none, paper: paper}}
        """, name="a.yaml"))
    spelled_out = load_spec(write_spec(tmp_path, """
        axes:
          components:
            key: model.specialization
            values: {vanilla: "", recommended: "qkv@first_third, ls1, ls2, norm1, norm2, final_norm"}
        """, name="b.yaml"))
    in_base = load_spec(write_spec(tmp_path, """
        axes:
          optimizer.lr: [0.002]
        """, name="c.yaml"), ["base.model.specialization=paper", "name=other_sweep"])
    ids_a = {t.cell["specialization"]: t.trial_id for t in expand(preset, VERSION)}
    ids_b = {t.cell["components"]: t.trial_id for t in expand(spelled_out, VERSION)}
    (only_c,) = expand(in_base, VERSION)
    assert ids_a == {"none": ids_b["vanilla"], "paper": ids_b["recommended"]}
    # `paper` set in the base with the default lr written out as an axis: still the same trial.
    assert only_c.trial_id == ids_a["paper"]
    assert diff_plan(expand(in_base, VERSION), ids_a.values()).kept == [only_c]


def test_ids_are_deterministic_and_follow_the_code_version(tmp_path):
    path = write_spec(tmp_path, TWO_AXES + "seeds: [0, 1]\n")
    first = expand(load_spec(path), VERSION)
    again = expand(load_spec(path), VERSION)
    assert [(t.trial_id, t.label) for t in first] == [(t.trial_id, t.label) for t in again]
    assert {t.trial_id for t in expand(load_spec(path), "other-code")}.isdisjoint(t.trial_id for t in first)


def test_expand_defaults_to_the_trainer_code_version(tmp_path):
    spec = load(tmp_path, TWO_AXES)
    assert [t.trial_id for t in expand(spec)] == [t.trial_id for t in expand(spec, code_version())]


def test_spec_hash_follows_what_changes_trials_only(tmp_path):
    spec = load(tmp_path, TWO_AXES)
    same = load(tmp_path, TWO_AXES,
                overrides=("base.schedule.batch_size=64", "backend.max_parallel=3", "report.metrics=[seg_miou]"))
    assert spec_hash(spec) == spec_hash(same)  # a default written out, backend and report changes
    assert spec_hash(load(tmp_path, TWO_AXES, overrides=("seeds=[0,1]",))) != spec_hash(spec)
    assert spec_hash(load(tmp_path, TWO_AXES, overrides=("base.schedule.steps=50",))) != spec_hash(spec)
    assert len(spec_hash(spec)) == 16


def test_the_spec_is_resolved_once_by_load_spec(tmp_path, monkeypatch):
    """expand and spec_hash reuse the resolution load_spec made: no trial config is validated again."""
    validated: list[dict] = []
    original = TrialConfig.model_validate
    monkeypatch.setattr(TrialConfig, "model_validate", lambda data, **kw: validated.append(data) or original(data, **kw))
    spec = load(tmp_path, """
        seeds: [0, 1]
        axes:
          specialization: {key: model.specialization, values: {none: none, paper: paper}}
          model.reg_tokens: [2, 4]
        """)
    assert [data for data in validated if data == spec.base] == [spec.base]  # the base: once
    after_load = len(validated)
    assert len(expand(spec, VERSION)) == 8 and len(spec_hash(spec)) == 16
    assert expand(spec.model_copy(update={"seeds": [3]}), VERSION)[0].seed == 3
    assert len(validated) == after_load


# ------------------------------------------------------------------------------------------------
# Overrides and loading errors


def test_overrides_reach_any_key_and_apply_before_validation(tmp_path):
    spec = load(tmp_path, TWO_AXES, overrides=(
        "backend.max_parallel=4",
        "base.schedule.steps=50",
        "seeds=[0,1,2]",
        "axes.specialization.values={none: none}",
        "backend.kind=slurm",
        "backend.options.partition=gpu",
        "tracking.tracking_uri=sqlite:///tmp/x.db",
        "baseline.specialization=none",
    ))
    assert spec.backend.max_parallel == 4 and spec.backend.kind == "slurm"
    assert spec.backend.options.partition == "gpu" and spec.backend.options.model_fields_set == {"partition"}
    assert spec.seeds == [0, 1, 2] and spec.axis("specialization").value_names == ["none"]
    assert spec.tracking.tracking_uri == "sqlite:///tmp/x.db"
    assert spec.overrides[0] == "backend.max_parallel=4"
    trials = expand(spec, VERSION)
    assert len(trials) == 1 * 2 * 3 and trials[0].config["schedule"]["steps"] == 50


def test_an_override_that_breaks_the_spec_is_blamed(tmp_path):
    with pytest.raises(SpecError) as caught:
        load(tmp_path, TWO_AXES, overrides=("base.schedule.steps=5",))
    (error,) = caught.value.errors
    assert "base.schedule: warmup_steps (10) must be smaller than steps (5)" in error
    assert "(from --set base.schedule.steps=5)" in error


@pytest.mark.parametrize("override, message", [
    ("backend.max_paralel=2", "--set backend.max_paralel: unknown key 'max_paralel'"),
    ("nonsense=1", "--set nonsense: unknown key 'nonsense'"),
    ("base.model.sclae=tiny", "--set base.model.sclae: unknown key 'sclae' in model"),
    ("backend.resources.gpus=1", "--set backend.resources.gpus: unknown key 'gpus'"),
    ("baseline.scale=micro", "--set baseline.scale: unknown axis 'scale'"),
    ("no_equals_sign", "--set no_equals_sign: expected KEY=VALUE"),
])
def test_override_of_unknown_key_names_it(tmp_path, override, message):
    with pytest.raises(SpecError, match="spec.yaml: " + message.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path, TWO_AXES, overrides=(override,))


def test_missing_file_names_it(tmp_path):
    with pytest.raises(SpecError, match=r"nowhere\.yaml: <file>: no such sweep spec file"):
        load_spec(tmp_path / "nowhere.yaml")


def test_spec_error_is_a_value_error_listing_every_problem(tmp_path):
    with pytest.raises(ValueError) as caught:
        load(tmp_path, TWO_AXES + "seeds: []\nexpand: diagonal\n")
    assert isinstance(caught.value, SpecError) and len(caught.value.errors) == 2


# ------------------------------------------------------------------------------------------------
# The shipped sweeps


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").rglob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_load_and_expand(path):
    spec = load_spec(path)
    trials = expand(spec, VERSION)
    assert trials and len({t.trial_id for t in trials}) == len(trials)
    if "paper" in path.parts:
        assert spec.backend.kind == "slurm" and spec.backend.options.profile == "slurm/profiles/default.yaml"
        assert all(t.config["data"]["dataset"] == "folders" for t in trials)
        assert trials[0].config["data"]["classification_root"] == "/datasets/imagenet"
    else:
        assert spec.backend.kind == "local" and spec.backend.max_parallel == 2


PAPER_TRAINING = sorted(p for p in (REPO / "sweeps" / "paper").glob("*.yaml") if p.stem != "calibration")


@pytest.mark.parametrize("path", PAPER_TRAINING, ids=lambda p: p.stem)
def test_paper_sweeps_train_with_the_official_recipes(path):
    from orchestrator.views import recipe_line

    trials = expand(load_spec(path), VERSION)
    dinov2 = [t.config for t in trials if t.config["framework"] == "dinov2"]
    assert dinov2
    for config in dinov2:
        opt = config["optimizer"]
        assert config["recipe"] == "dinov2" and config["schedule"]["batch_size"] == 1024
        assert (opt["lr"], opt["lr_scaling"], opt["layer_decay"], opt["patch_embed_lr_mult"]) == (
            4e-3, "sqrt_wrt_1024", 0.9, 0.2)
        assert (opt["weight_decay"], opt["weight_decay_end"], opt["no_weight_decay"], opt["freeze_last_layer_steps"]) == (
            0.04, 0.4, "dinov2", 1250)
        assert config["model"]["drop_path_uniform"] and not config["dinov2"]["separate_ibot_head"]
        assert (config["schedule"]["steps"], config["schedule"]["warmup_steps"]) == (125000, 12500)
    assert "dinov2 (" in recipe_line(trials)
    for config in (t.config for t in trials if t.config["framework"] == "supervised"):
        assert config["recipe"] == "deit3" and config["optimizer"]["name"] == "lamb"
        assert config["schedule"]["batch_size"] == 2048 and config["data"]["repeated_augmentation"] == 3
        assert config["model"]["layer_scale_init"] == 1e-4 and config["supervised"]["mixup_alpha"] == 0.8


def test_calibration_evaluates_the_released_dinov2_weights_as_they_are():
    trials = expand(load_spec(REPO / "sweeps" / "paper" / "calibration.yaml"), VERSION)
    widths = {}
    for trial in trials:
        cfg = TrialConfig.model_validate(trial.config)
        assert cfg.schedule.steps == 0 and cfg.evaluation.protocol == "dinov2" and cfg.framework == "dinov2"
        assert cfg.model.specialization == "none" and cfg.model.layer_scale_init == 1e-5
        # dinov2_vit{s,b}14_pretrain.pth: patch 14, pos_embed of 1 + 37 x 37 positions (518 px)
        assert (cfg.model.resolved_patch_size, cfg.model.resolved_img_size) == (14, 518)
        widths[cfg.model.pretrained.name] = SCALES[cfg.model.scale]["embed_dim"]
    assert widths == {"dinov2_vits14_pretrain.pth": 384, "dinov2_vitb14_pretrain.pth": 768}


def test_paper_register_and_block_range_ablations():
    registers = expand(load_spec(REPO / "sweeps" / "paper" / "registers.yaml"), VERSION)
    settings = {(t.config["model"]["specialization"], t.config["model"]["reg_tokens"],
                 t.config["model"]["registers_follow"]) for t in registers}
    paper = Specialization.parse("paper").canonical()
    assert {(paper, 4, "cls"), (paper, 4, "patch"), (paper, 0, "cls"), ("none", 4, "patch")} <= settings
    ranges = expand(load_spec(REPO / "sweeps" / "paper" / "qkv_ranges.yaml"), VERSION)
    qkv = {t.cell["specialization"]: Specialization.parse(t.config["model"]["specialization"]) for t in ranges}
    depth = 12
    blocks = {name: [i for i, plan in enumerate(spec.block_plan(depth)) if "qkv" in plan] for name, spec in qkv.items()}
    assert blocks == {"none": [], "norms_ls": [], "qkv_first_third": [0, 1, 2, 3], "qkv_last_third": [8, 9, 10, 11],
                      "qkv_all": list(range(12))}
    # the first-third arm is the paper's set, so both sweeps share that trial through the store
    assert {t.trial_id for t in ranges if t.cell["specialization"] == "qkv_first_third"} <= {t.trial_id for t in registers}


def test_default_sweep_trades_arms_for_seeds_and_the_broad_comparison_has_its_own_spec():
    spec = load_spec(REPO / "sweeps" / "component_ablation.yaml")
    assert spec.axis("specialization").value_names == ["none", "norms", "qkv", "paper", "all", "matched"]
    assert spec.baseline == {"specialization": "none"} and spec.report.compare == ["specialization"]
    trials = expand(spec, VERSION)
    # seeds where the noise is: all - none varies most, norms and matched least
    seeds = {arm: sorted(t.seed for t in trials if t.cell["specialization"] == arm)
             for arm in spec.axis("specialization").value_names}
    assert spec.seeds == [0, 1, 2, 3, 4, 5] and len(trials) == 68
    assert seeds["none"] == seeds["all"] == list(range(24)) and seeds["paper"] == seeds["qkv"] == list(range(6))
    assert seeds["norms"] == seeds["matched"] == [0, 1, 2, 3]
    matched = [t.config["model"] for t in trials if t.cell["specialization"] == "matched"]
    paper = Specialization.parse("paper").canonical()
    assert len(matched) == 4 and all(m["specialization"] == "none" and m["match_params_of"] == paper for m in matched)
    assert spec.report.controls == ["untrained", "pixels"]
    assert spec.base["evaluation"]["max_val_samples"] == spec.base["data"]["scenes"]["val_size"] == 1024
    assert set(spec.report.target_effects) == set(spec.report.paired_sd) == set(spec.report.metrics)

    broad = load_spec(REPO / "sweeps" / "component_sets.yaml")
    assert broad.axis("specialization").value_names == [
        "none", "norms", "qkv", "norms_qkv", "paper", "norms_qkv_all", "paper_proj", "paper_mlp", "all",
    ]
    assert broad.seeds == [0, 1] and len(expand(broad, VERSION)) == 18
    assert broad.report.output == Path("reports/component_sets.md") and broad.output_dir != spec.output_dir


# ------------------------------------------------------------------------------------------------
# Plan diff


def test_diff_plan_splits_new_kept_and_gone(tmp_path):
    trials = expand(load(tmp_path, TWO_AXES), VERSION)
    on_disk = [trials[4].trial_id, "0123456789abcdef", trials[1].trial_id, trials[1].trial_id]
    diff = diff_plan(trials, on_disk)
    assert diff.kept == [trials[1], trials[4]]  # in the spec's order
    assert diff.new == [t for i, t in enumerate(trials) if i not in (1, 4)]
    assert diff.gone == ["0123456789abcdef"]
    assert diff.summary() == "4 new, 2 kept, 1 gone"
    assert diff_plan(trials, []).new == trials


def test_report_output_is_read_from_the_spec():
    spec = load_spec(REPO / "sweeps" / "component_ablation.yaml")
    assert spec.report.output == Path("reports/ablation.md")


def test_backend_records_which_resources_the_spec_wrote(tmp_path):
    """Only those beat a cluster profile: `time_min: 60` is a choice even though it is the default."""
    spec = load(tmp_path, TWO_AXES, "backend: {kind: slurm, resources: {time_min: 60, gpus_per_trial: 0}}")
    assert spec.backend.resources.model_fields_set == {"gpus_per_trial", "time_min"}
    assert spec.backend.resources.time_min == 60 and spec.backend.resources.mem_gb == 4
    overridden = load(tmp_path, TWO_AXES, overrides=("backend.resources.mem_gb=16",))
    assert overridden.backend.resources.model_fields_set == {"mem_gb"}
