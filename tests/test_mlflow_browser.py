"""A finished sweep's runs on a real `mlflow server` (loopback), over the store a real two-trial
sweep (real orchestrator, real trainer) tracked to: first through the server's REST API (one parent,
one child per trial with its params and metrics, nothing in a local store), then in Debian's chromium
driven by Playwright through the MLflow UI. The parent run expands to its children, the children
show their parameters and key metrics in the runs table, and a child's page shows its artifacts and
the token plot -- the same bytes the trainer wrote. One sweep serves every test (trials cost
process starts on 2 cores).
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from support.mlflow_server import MlflowServer, rest
from support.mlflow_ui import (
    CHROMIUM,
    KEY_METRICS,
    KEY_PARAMS,
    UI_TIMEOUT_MS,
    browser_page,
    cell_text,
    expand_run,
    open_runs_table,
    run_link,
    show_columns,
)

from conftest import MICRO_BASE, PYTHON, REPO, orchestrator_env, read_ledger, write_spec
from orchestrator.mlflow_store import PARENT_ROLE_TAG, PARENT_RUN_TAG, TRIAL_ID_TAG
from orchestrator.store import ProjectPaths
from trainer.contract import RUN_ARTIFACT_FILES, TOKEN_PLOT_FILE

try:
    from playwright.sync_api import expect
except ImportError:  # the REST test below still runs; the browser tests say why they skip
    expect = None
else:
    expect.set_options(timeout=UI_TIMEOUT_MS)
pytestmark = pytest.mark.slow
needs_browser = pytest.mark.skipif(
    expect is None or not CHROMIUM.exists(),
    reason=f"needs playwright (the test extra) and chromium at {CHROMIUM}: install Debian's "
           "(apt-get install -y chromium; .ci/run does)")

SWEEP, EXPERIMENT = "browsed", "browsed_sweep"
# The micro trial, shortened: the UI needs finished runs with every key metric and the token plot,
# not a trained model (trials take ~30 s of process start, training and evaluation on 2 cores).
BASE = {**MICRO_BASE, "schedule": {**MICRO_BASE["schedule"], "steps": 8, "checkpoint_every": 8}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    """A finished none/paper sweep (seed 0) tracked to a live `mlflow server`, and its runs by REST."""
    folder = tmp_path_factory.mktemp("browsed")
    root = folder / "project"
    root.mkdir()
    server = MlflowServer(folder)
    server.start()
    try:
        spec = write_spec(folder, SWEEP, base=BASE, backend={"max_parallel": 2, "retries": 1},
                          tracking={"tracking_uri": server.base, "experiment": EXPERIMENT})
        started = time.monotonic()
        proc = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                              cwd=REPO, env=orchestrator_env(CLS_ABLATION_ROOT=str(root)),
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        print(f"sweep finished in {time.monotonic() - started:.1f} s")
        experiment_id = rest(server.base, "experiments/get-by-name",
                             query={"experiment_name": EXPERIMENT})["experiment"]["experiment_id"]
        runs = rest(server.base, "runs/search", {"experiment_ids": [experiment_id]})["runs"]
        (parent,) = [r for r in runs if tag(r, PARENT_ROLE_TAG) == "parent"]
        children = [r for r in runs if tag(r, PARENT_RUN_TAG) == parent["info"]["run_id"]]
        assert len(children) == 2, [r["info"]["run_name"] for r in runs]
        yield dict(base=server.base, experiment_id=experiment_id, parent=parent, children=children,
                   paths=ProjectPaths.discover(root), root=root)
    finally:
        server.stop(signal.SIGKILL)  # nothing to flush in a throwaway store; SIGTERM takes ~10 s


def tag(run: dict, key: str) -> str | None:
    return next((t["value"] for t in run["data"].get("tags", []) if t["key"] == key), None)


def by_key(run: dict, kind: str) -> dict:
    return {item["key"]: item["value"] for item in run["data"].get(kind, [])}


def test_the_sweep_logs_one_parent_and_a_child_per_trial_to_the_server(sweep):
    assert not (sweep["root"] / "mlflow.db").exists()  # everything went to the server
    parent = sweep["parent"]
    assert tag(parent, "sweep_name") == SWEEP and parent["info"]["status"] == "FINISHED"
    ledger = read_ledger(sweep["root"], SWEEP)
    seen, specializations = set(), set()
    for child in sweep["children"]:
        params, metrics = by_key(child, "params"), by_key(child, "metrics")
        seen.add(tag(child, TRIAL_ID_TAG))
        specializations.add(params["model.specialization"])  # as resolved: `paper` spelled out
        assert child["info"]["status"] == "FINISHED" and params["model.scale"] == "micro"
        for metric in ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "flops"):
            assert metric in metrics, (metric, sorted(metrics))
    assert seen == set(ledger["trials"])
    assert len(specializations) == 2 and "none" in specializations


@needs_browser
def test_the_parent_run_expands_to_its_children_with_their_params_and_key_metrics(sweep):
    parent_name = sweep["parent"]["info"]["run_name"]
    child_names = [c["info"]["run_name"] for c in sweep["children"]]
    with browser_page() as page:
        open_runs_table(page, sweep["base"], sweep["experiment_id"], parent_name)
        for name in child_names:  # collapsed under the parent
            expect(run_link(page, name)).to_have_count(0)

        expand_run(page, parent_name)
        for name in child_names:
            expect(run_link(page, name)).to_be_visible()
        show_columns(page, [*KEY_PARAMS, *KEY_METRICS])

        for child in sweep["children"]:
            name, params, metrics = child["info"]["run_name"], by_key(child, "params"), by_key(child, "metrics")
            for key in KEY_PARAMS:
                assert cell_text(page, name, key) == params[key], (name, key)
            for key in KEY_METRICS:
                shown = cell_text(page, name, key)
                assert float(shown) == pytest.approx(metrics[key], rel=1e-9), (name, key, shown)  # as logged
        # The two arms differ where they should: their specializations, in the table as logged.
        assert len({cell_text(page, name, "model.specialization") for name in child_names}) == 2
        for key in KEY_METRICS:  # the parent holds no trial's numbers
            assert cell_text(page, parent_name, key) in ("-", ""), key


@needs_browser
def test_a_child_run_page_shows_its_params_metrics_artifacts_and_the_token_plot(sweep):
    parent_name = sweep["parent"]["info"]["run_name"]
    child = sweep["children"][0]
    name = child["info"]["run_name"]
    plot = sweep["paths"].trial(tag(child, TRIAL_ID_TAG)).path / TOKEN_PLOT_FILE
    with browser_page() as page:
        open_runs_table(page, sweep["base"], sweep["experiment_id"], parent_name)
        expand_run(page, parent_name)
        run_link(page, name).click()
        expect(page.get_by_role("heading", name=name)).to_be_visible()
        expect(run_link(page, parent_name)).to_be_visible()  # "Parent run" on the child's overview
        # Every parameter and metric key the run holds is listed there (training curves included).
        expect(page.get_by_text(f"Parameters ({len(child['data']['params'])})", exact=True)).to_be_visible()
        expect(page.get_by_text(f"Metrics ({len(child['data']['metrics'])})", exact=True)).to_be_visible()

        page.get_by_role("tab", name="Artifacts").click()
        for artifact in RUN_ARTIFACT_FILES:
            expect(page.get_by_text(artifact, exact=True)).to_be_visible()
        page.get_by_text(TOKEN_PLOT_FILE, exact=True).click()
        image = page.get_by_role("img", name=TOKEN_PLOT_FILE)
        expect(image).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
        shown = bytes(page.evaluate(
            "async img => Array.from(new Uint8Array(await (await fetch(img.src)).arrayBuffer()))",
            image.element_handle()))
        assert shown == plot.read_bytes()  # the plot the trainer wrote, served and shown
