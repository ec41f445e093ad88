"""The report's controls: an untrained network and raw pixels, the floor under every number.

Trainer side (real trainer, tiny configs): `schedule.steps: 0` evaluates the initial model,
`evaluation.features: pixels` probes the raw patches, and the configs that make no sense are
refused. Orchestrator side: control trials derived from the baseline cell, one id per data setup
(shared across sweeps through the store), run by the backend like any trial, shown as *(control)*
rows and never compared.
"""

from __future__ import annotations

import copy
import csv
import io
import re
from pathlib import Path

import pytest
import torch
from rich.console import Console

from orchestrator.commands import run_sweep
from orchestrator.identity import code_version
from orchestrator.ledger import Ledger
from orchestrator.plan import compared_trials, diff_plan, planned_trials
from orchestrator.report import build_report
from orchestrator.report.document import controls_markdown
from orchestrator.report.csv_export import outcomes_csv, table_csv
from orchestrator.report.glance import at_a_glance
from orchestrator.report.markdown_table import table_markdown
from orchestrator.report.metrics import table_metrics
from orchestrator.report.outcome import Collection, TrialOutcome
from orchestrator.report.tables import build_tables, judge
from orchestrator.spec import SpecError, expand, load_spec, spec_hash
from orchestrator.spec.controls import control_trials
from orchestrator.store import ProjectPaths
from orchestrator.views import plan_view, status_view
from trainer.config import ConfigError, TrialConfig, parse_config
from trainer.contract import CHECKPOINT_FILE, TOKEN_PLOT_FILE, read_result
from trainer.data import build_eval_datasets
from trainer.evaluation import evaluate
from trainer.evaluation.pixels import pixel_tokens
from trainer.loop import Trial, backbone_factory

from conftest import MICRO_BASE, read_ledger, write_spec

VERSION = "test-code"
TINY = {  # evaluation only: small probe sets, few epochs
    "data": {"scenes": {"train_size": 64, "val_size": 32}},
    "schedule": {"steps": 0, "batch_size": 16, "warmup_steps": 0},
    "evaluation": {"probe_epochs": 2, "max_train_samples": 48, "max_val_samples": 32, "knn_k": 5},
    "runtime": {"device": "cpu", "threads": 1, "compile": "off"},
    "tracking": {"enabled": False},
}


def tiny(**sections) -> dict:
    data = copy.deepcopy(TINY)
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


# ----------------------------------------------------------------------------------------------
# Trainer: steps 0, pixel features, config errors
# ----------------------------------------------------------------------------------------------
def test_steps_zero_evaluates_the_initial_model_and_writes_its_result(tmp_path):
    result = Trial(parse_config(tiny()), tmp_path / "untrained", log=lambda *_: None).run()
    assert result.done and result.steps == 0 and result.train == {} and result.throughput_img_s is None
    on_disk = read_result(tmp_path / "untrained")
    assert on_disk.done and on_disk.metrics == result.metrics
    for name in ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "tokens/early_cls_patch_cos_pre"):
        assert name in result.metrics, name
    assert 0.0 <= result.metrics["seg_miou"] <= 1.0
    assert not (tmp_path / "untrained" / CHECKPOINT_FILE).exists()  # nothing trained, nothing to resume
    assert (tmp_path / "untrained" / TOKEN_PLOT_FILE).is_file()


def test_pixel_features_run_the_same_probes_without_the_token_analysis(tmp_path):
    config = parse_config(tiny(evaluation={"features": "pixels"}))
    result = Trial(config, tmp_path / "pixels", log=lambda *_: None).run()
    assert result.done and result.steps == 0
    assert {"linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse"} <= set(result.metrics)
    assert not any(name.startswith("tokens/") for name in result.metrics)  # pixels have no blocks
    assert not (tmp_path / "pixels" / TOKEN_PLOT_FILE).exists()


def test_pixel_tokens_are_exactly_the_patches_and_their_mean():
    cfg = TrialConfig.model_validate({"model": {"scale": "micro", "img_size": 8, "patch_size": 4}})
    backbone = backbone_factory(cfg)()
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    cls, grid = pixel_tokens(backbone, images)
    assert grid.shape == (2, 3 * 4 * 4, 2, 2) and cls.shape == (2, 48)
    for b in range(2):
        for i in range(2):
            for j in range(2):  # row i, column j of the grid: that patch's pixels, channel by channel
                patch = images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
                assert torch.equal(grid[b, :, i, j], patch.reshape(-1))
    # One hand-written value: image 1, channel 2, pixel (5, 6) sits in patch (1, 1) at offset 2*16 + 1*4 + 2.
    assert grid[1, 2 * 16 + 1 * 4 + 2, 1, 1] == images[1, 2, 5, 6]
    assert torch.allclose(cls, grid.mean(dim=(2, 3)))


def test_pixel_features_do_not_depend_on_the_network(tmp_path):
    """Two differently initialized backbones: the same numbers on pixels, different ones on their tokens."""
    cfg = parse_config(tiny(evaluation={"features": "pixels", "segmentation": False, "depth": False}))
    data = build_eval_datasets(cfg)
    backbones = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        backbones.append(backbone_factory(cfg)())
    pixels = [evaluate(b, data, cfg.evaluation, "cpu", tmp_path) for b in backbones]
    assert pixels[0] == pixels[1] and "linear_top1_cls" in pixels[0]
    tokens = cfg.evaluation.model_copy(update={"features": "backbone", "token_interaction": False})
    first, second = (evaluate(b, data, tokens, "cpu", tmp_path) for b in backbones)
    assert first != second


@pytest.mark.parametrize("sections, key, says", [
    ({"schedule": {"steps": 0, "warmup_steps": 5}}, "schedule.warmup_steps", "must be 0 with steps 0"),
    ({"schedule": {"steps": 10, "warmup_steps": 2}, "evaluation": {"features": "pixels"}}, "evaluation.features",
     "evaluation.features pixels trains nothing: set schedule.steps: 0"),
    ({"evaluation": {"every_steps": 5}, "data": {"val_fraction": 0.25}}, "evaluation.every_steps",
     "schedule.steps 0 trains nothing: set evaluation.every_steps: 0"),
    ({"evaluation": {"features": "patches"}}, "evaluation.features", "'backbone' or 'pixels'"),
    ({"schedule": {"steps": -1}}, "schedule.steps", "greater than or equal to 0"),
])
def test_configs_that_make_no_sense_for_a_control_are_refused_with_the_key_and_the_fix(sections, key, says):
    with pytest.raises(ConfigError) as caught:
        parse_config(tiny(**sections))
    assert re.search(rf"- {re.escape(key)}: .*{re.escape(says)}", str(caught.value)), str(caught.value)


# ----------------------------------------------------------------------------------------------
# Orchestrator: control trials and their identity
# ----------------------------------------------------------------------------------------------
def spec_with(folder: Path, name: str, *, base: dict | None = None, axes: dict | None = None,
              seeds: list[int] | None = None, controls: list[str] | None = ("untrained", "pixels"), **extra):
    report = {**extra.pop("report", {}), **({"controls": list(controls)} if controls else {})}
    return load_spec(write_spec(folder, name, base=base or MICRO_BASE, axes=axes, seeds=seeds,
                                tracking={"enabled": False}, report=report, **extra))


def ids(spec) -> dict[str, str]:
    return {t.control: t.trial_id for t in control_trials(spec, VERSION)}


def test_control_trials_are_the_baseline_cell_evaluated_untrained_and_as_pixels(tmp_path):
    spec = spec_with(tmp_path, "a", seeds=[3, 4], base={**MICRO_BASE, "model": {"scale": "micro", "reg_tokens": 2}})
    untrained, pixels = control_trials(spec, VERSION)
    assert [untrained.control, pixels.control] == ["untrained", "pixels"]
    assert untrained.cell == {} and untrained.label == "control=untrained seed=3"
    for trial in (untrained, pixels):
        config = TrialConfig.model_validate(trial.config)  # a valid trial config the trainer accepts
        assert config.schedule.steps == 0 and config.schedule.warmup_steps == 0
        assert config.data == TrialConfig.model_validate(MICRO_BASE).data
        assert config.model.resolved_img_size == 32 and config.model.resolved_patch_size == 4
    assert untrained.seed == 3 and untrained.config["model"]["reg_tokens"] == 2  # the init's seed and registers
    assert untrained.config["evaluation"]["features"] == "backbone"
    assert pixels.config["evaluation"]["features"] == "pixels" and pixels.seed == 0
    assert pixels.config["model"]["reg_tokens"] == 0  # pixels read the patch size, nothing else of the model


def test_two_sweeps_on_the_same_data_setup_ask_for_the_same_controls(tmp_path):
    """What cannot change a control's numbers (arms, training, optimizer, framework, seeds after
    the first, workers, compile) leaves its id alone; data, architecture and the first seed do not."""
    first = spec_with(tmp_path, "first")
    other_base = copy.deepcopy(MICRO_BASE)
    other_base.update(framework="dinov2", optimizer={"lr": 1e-3, "weight_decay": 0.1},
                      schedule={"steps": 40, "batch_size": 16, "warmup_steps": 4, "checkpoint_every": 10})
    other_base["model"] = {"scale": "micro", "specialization": "norms", "drop_path_rate": 0.1, "img_size": 32}
    other_base["data"] = {**other_base["data"], "num_workers": 2}
    other_base["runtime"] = {**other_base["runtime"], "compile": "auto"}
    second = spec_with(tmp_path, "second", base=other_base, seeds=[0, 7],
                       axes={"lr": {"key": "optimizer.lr", "values": {"low": 1e-4, "high": 1e-2}}})
    assert ids(first) == ids(second)
    assert not {t.trial_id for t in expand(first, VERSION)} & set(ids(first).values())

    more_data = copy.deepcopy(MICRO_BASE)
    more_data["data"]["scenes"]["val_size"] = 96
    assert set(ids(spec_with(tmp_path, "data", base=more_data)).values()).isdisjoint(ids(first).values())
    later_seed = ids(spec_with(tmp_path, "seeds", seeds=[1, 2]))
    assert later_seed["pixels"] == ids(first)["pixels"] and later_seed["untrained"] != ids(first)["untrained"]
    deeper = ids(spec_with(tmp_path, "scale", base={**MICRO_BASE, "model": {"scale": "tiny", "img_size": 32,
                                                                            "patch_size": 4}}))
    assert deeper["pixels"] == ids(first)["pixels"] and deeper["untrained"] != ids(first)["untrained"]


def test_a_spec_without_controls_plans_what_it_planned_before(tmp_path, project_root):
    plain = spec_with(tmp_path, "plain", controls=None)
    paths = ProjectPaths.discover(project_root)
    assert plain.report.controls == [] and control_trials(plain, VERSION) == []
    assert planned_trials(plain, paths, VERSION) == expand(plain, VERSION)
    with_controls = spec_with(tmp_path, "plain", controls=["pixels"])
    assert spec_hash(with_controls) != spec_hash(plain)  # the controls are trials the spec asks for
    planned = planned_trials(with_controls, paths, VERSION)
    assert planned == expand(with_controls, VERSION) + control_trials(with_controls, VERSION)
    assert compared_trials(with_controls, planned, paths) == expand(with_controls, VERSION)


def test_controls_of_an_invalid_baseline_cell_are_refused_with_the_fix(tmp_path):
    # The default baseline (first values) is excluded because it clashes: the controls cannot derive from it.
    axes = {"steps": {"key": "schedule.steps", "values": {"short": 4, "long": 20}},
            "warmup": {"key": "schedule.warmup_steps", "values": {"long": 4, "none": 0}}}
    spec = spec_with(tmp_path, "clash", axes=axes, exclude=[{"steps": "short", "warmup": "long"}])
    with pytest.raises(SpecError, match=r"report.controls: .*baseline cell \(steps=short, warmup=long\).*set "
                                        r"`baseline` to a cell of the sweep"):
        control_trials(spec, VERSION)


# ----------------------------------------------------------------------------------------------
# Orchestrator: through the backend, MLflow and the store
# ----------------------------------------------------------------------------------------------
def run(spec_path: Path, **kwargs):
    return run_sweep(load_spec(spec_path), progress=False, poll_interval=0.05, retry_delay_s=0.05, report=False,
                     console=Console(file=io.StringIO()), **kwargs)


def test_controls_run_once_through_the_backend_and_a_second_sweep_reuses_them(tmp_path, project_root, stand_in,
                                                                              mlflow_db):
    from mlflow.tracking import MlflowClient

    report = {"controls": ["untrained", "pixels"]}
    first = write_spec(tmp_path, "first", report=report, seeds=[0, 1])
    second = write_spec(tmp_path, "second", report=report,
                        axes={"specialization": {"key": "model.specialization", "values": {"none": "none",
                                                                                             "all": "all"}}})
    outcome = run(first)
    assert outcome.ok and outcome.counts["done"] == 6  # 2 arms x 2 seeds + 2 controls
    assert run(second).ok
    starts = [e["name"] for e in stand_in.events("start")]
    assert sorted(n for n in starts if "control=" in n) == ["first/control=pixels", "first/control=untrained"]

    ledgers = {name: read_ledger(project_root, name)["trials"] for name in ("first", "second")}
    controls = {name: {r["label"]: r for r in trials.values() if r["label"].startswith("control=")}
                for name, trials in ledgers.items()}
    assert set(controls["first"]) == set(controls["second"]) == {"control=untrained seed=0", "control=pixels seed=0"}
    for label, record in controls["second"].items():
        assert record["reused"] and record["attempts"] == 0  # trained by the first sweep, reused from the store
        assert record["trial_id"] == controls["first"][label]["trial_id"]

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_db}")
    for name in ("first", "second"):  # a child of each sweep's parent, tagged as a control
        experiment = client.get_experiment_by_name(name)
        runs = client.search_runs([experiment.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "parent"]
        children = [r for r in runs if r.data.tags.get("sweep_role") == "control"]
        assert sorted(r.data.tags["control"] for r in children) == ["pixels", "untrained"]
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
        assert all(r.info.status == "FINISHED" and "knn_top1" in r.data.metrics for r in children)

    # The report reads them from MLflow like any trial; under newer trainer code (new ids, not run
    # yet) it shows the same configs' earlier results, found again by their control tag.
    for version, borrowed in ((code_version(), False), ("newer-trainer-code", True)):
        text = build_report(load_spec(first), root=project_root, current_code_version=version).read_text()
        for label in ("untrained network", "raw pixels"):
            assert f"| k-NN top-1 (%) ↑ | {label} (control) | 1/1 | 40.00 | control |" in text
            runs = next(line for line in text.splitlines() if line.startswith(f"- {label} (control): "))
            assert runs.startswith(f"- {label} (control): [") and ("⚠" in runs) == borrowed, runs

    # `plan` and `status` list them as lines of their own, counted with the rest.
    spec, paths = load_spec(second), ProjectPaths.discover(project_root)
    trials = planned_trials(spec, paths, code_version())
    assert sum(t.control is not None for t in trials) == 2
    ledger = Ledger.for_sweep(paths.resolve(spec.output_dir))
    console = Console(file=io.StringIO(), width=200)
    console.print(plan_view(spec, trials, diff_plan(trials, [r.trial_id for r in ledger]), ledger, paths))
    console.print(status_view(spec, trials, paths, paths.resolve(spec.output_dir)))
    shown = console.file.getvalue()
    assert "second: 4 trials (0 new, 4 kept" in shown and "done 4" in shown
    assert shown.count("control=untrained seed=0") == 2 and shown.count("control=pixels seed=0") == 2


def test_a_tuned_sweep_runs_its_controls_once_and_a_failed_control_fails_the_sweep(tmp_path, project_root,
                                                                                   stand_in):
    """A control is no search's trial: its failure is not an exploration's, which a search forgives."""
    stand_in.behave(**{"": {"search": {"points": 1, "step_s": 0.01}}, "control=pixels": {"fail": "error"}})
    base = {**MICRO_BASE, "data": {**MICRO_BASE["data"], "val_fraction": 0.25}}
    path = write_spec(tmp_path, "tuned", base=base, tracking={"enabled": False}, backend={"retries": 0},
                      axes={"specialization": {"key": "model.specialization", "values": {"paper": "paper"}}},
                      search={"metric": "val/linear_top1_cls", "sampler": "grid", "pruner": "none",
                              "params": {"optimizer.lr": {"choices": [1e-3, 1e-2]}}},
                      report={"controls": ["untrained", "pixels"], "metrics": ["linear_top1_cls"]})
    outcome = run_sweep(load_spec(path), progress=False, poll_interval=0.05, retry_delay_s=0.05,
                        console=Console(file=io.StringIO()))
    trials = {r["label"]: r for r in read_ledger(project_root, "tuned")["trials"].values()}
    untrained, pixels = trials["control=untrained seed=0"], trials["control=pixels seed=0"]
    assert untrained["state"] == "done" and untrained["attempts"] == 1
    assert pixels["state"] == "failed" and outcome.failed == [pixels["trial_id"]]
    report = (project_root / "reports" / "tuned.md").read_text()
    assert re.search(r"\| untrained network \(control\) \| 1/1 \| \d+\.\d\d \| control \|", report), report
    assert re.search(r"\| raw pixels \(control\) \| 0/1 \| —\S+ \| control \|", report), report  # with why


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------
CROSSING_AXES = {"specialization": {"key": "model.specialization", "values": {"none": "none", "paper": "paper"}},
                 "lr": {"key": "optimizer.lr", "values": {"low": 1e-3, "high": 3e-3}}}


def cell_outcome(spec_value: str, lr: str, seed: int, miou: float) -> TrialOutcome:
    metrics = {"seg_miou": miou, "linear_top1_cls": 0.6 + 0.01 * seed, "params_total": 3e5, "flops": 2e7,
               "tokens/early_cls_patch_cos_pre": 0.2, "tokens/early_cls_patch_cos_post": 0.01}
    return TrialOutcome(trial_id=f"{spec_value}-{lr}-{seed}", cell={"specialization": spec_value, "lr": lr},
                        seed=seed, state="done", source="disk", metrics=metrics)


def control_outcome(name: str, miou: float, tokens: bool) -> TrialOutcome:
    metrics = {"seg_miou": miou, "linear_top1_cls": 0.35, "params_total": 3e5, "flops": 2e7}
    if tokens:
        metrics |= {"tokens/early_cls_patch_cos_pre": 0.015, "tokens/early_cls_patch_cos_post": 0.011}
    return TrialOutcome(trial_id=f"control-{name}", cell={}, seed=0, state="done", source="disk", metrics=metrics,
                        control=name)


def test_the_report_shows_each_control_as_a_row_of_every_table_and_never_compares_it(tmp_path):
    spec = spec_with(tmp_path, "report", axes=CROSSING_AXES, seeds=[0, 1, 2],
                     report={"compare": ["specialization", ["specialization", "lr"]],
                             "metrics": ["seg_miou", "linear_top1_cls"]})
    cells = [cell_outcome(s, lr, seed, 0.50 + 0.003 * seed + (0.02 + 0.005 * seed ** 2 if s == "paper" else 0.0))
             for s in ("none", "paper") for lr in ("low", "high") for seed in (0, 1, 2)]
    controls = [control_outcome("untrained", 0.397, tokens=True), control_outcome("pixels", 0.437, tokens=False)]
    metrics = table_metrics(list(spec.report.metrics))
    without = build_tables(spec, cells, metrics)
    tables = build_tables(spec, cells + controls, metrics)

    assert judge(tables) == judge(without) > 0  # the family of comparisons is the same without them
    single, crossing = tables
    labels = [row.control for row in single.rows if row.is_control]
    assert labels == ["untrained network", "raw pixels"]
    # In a crossing the controls sit in the baseline's group: the setup they were run on.
    assert [row.key for row in crossing.rows if row.is_control] == [("untrained network", "low"), ("raw pixels", "low")]
    for row in (r for t in tables for r in t.rows if r.is_control):
        assert not row.compared and row.cells["seg_miou"].delta is None and not row.cells["seg_miou"].best

    text = table_markdown(single, "http://ui", None, VERSION)
    main = [line for line in text.main if "(control)" in line]
    assert len(main) == 4  # 2 controls x 2 quality metrics
    pixels_miou = next(line for line in main if "raw pixels" in line and "Seg. mIoU" in line)
    assert [c.strip() for c in pixels_miou.split("|")[3:6]] == ["1/1", "43.70", "control"]
    assert not any("(control)" in line for line in text.costs)  # a control trains nothing: no cost row
    assert [line.split("|")[1].strip() for line in text.tokens[2:] if "(control)" in line] == [
        "untrained network (control)"]  # pixels have no token measures
    assert any("untrained network (control)" in line for line in text.runs)

    glance = at_a_glance(tables, Collection(outcomes=cells + controls, tracking_uri="", experiment="report"))
    assert ("Seg. mIoU untrained network 39.70%, raw pixels 43.70% (reference 50." in glance
            and "Controls, the floor under every number" in glance)
    note = controls_markdown(tables)
    assert "specialization=`none`" in note and "*raw pixels*" in note and "*untrained network*" in note
    assert any(row["control"] == "raw pixels" for row in _csv_rows(table_csv(single)))
    trials = _csv_rows(outcomes_csv(Collection(outcomes=cells + controls, tracking_uri="", experiment="report")))
    assert sorted(row["control"] for row in trials if row["control"]) == ["pixels", "untrained"]


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_a_metric_a_control_cannot_report_is_footnoted_with_the_schemas_reason(tmp_path):
    from orchestrator.report.collect import with_unavailable_reasons
    from orchestrator.spec.controls import plain_sweep_trials

    spec = spec_with(tmp_path, "why", axes=CROSSING_AXES, seeds=[0, 1],
                     report={"compare": ["specialization"], "metrics": ["head_top1", "seg_miou"],
                             "controls": ["untrained", "pixels"]})
    plans = plain_sweep_trials(spec, VERSION)
    by_control = {p.control: p for p in plans}
    outcomes = [TrialOutcome(trial_id=p.trial_id, cell=dict(p.cell), seed=p.seed, state="done", source="disk",
                             control=p.control, metrics={"seg_miou": 0.5, **({} if p.control == "pixels" else
                                                                             {"head_top1": 0.6})})
                for p in plans]
    reasoned = {o.control: o for o in with_unavailable_reasons(outcomes, plans, ["head_top1", "seg_miou"])}
    assert "pixels" in by_control and set(reasoned["pixels"].unavailable) == {"head_top1"}
    assert "only framework supervised (with evaluation.features backbone)" in reasoned["pixels"].unavailable["head_top1"]
    assert reasoned["untrained"].unavailable == {} and reasoned[None].unavailable == {}

    table = build_tables(spec, list(reasoned.values()), table_metrics(["head_top1", "seg_miou"]))[0]
    notes = "\n".join(table_markdown(table, "http://ui", None, VERSION).notes.render())
    assert "`head_top1`: the trained classifier's own top-1: only framework supervised" in notes
    assert "evaluation disabled or skipped?" not in notes
