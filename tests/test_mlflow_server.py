"""A server killed mid-sweep neither stalls the trials nor loses a point: a real `mlflow server`
(HTTP tracking), checked through its REST API. (The runs a served sweep logs: test_mlflow_browser.py.)"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.mlflow_server import MlflowServer, rest

from conftest import MICRO_BASE, PYTHON, REPO, wait_for, write_spec
from trainer.contract import RESULT_FILE, RUN_ARTIFACT_FILES, read_metric_points, read_result

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path):
    served = MlflowServer(tmp_path)
    served.start()
    try:
        yield served
    finally:
        served.stop()


# Longer trials with a dense curve: a point every 2 steps, so an outage hits many of them.
# The dense probes and the token plot are left out: the test is about the curves, and each trial
# then takes seconds, not a minute.
OUTAGE_BASE = {**MICRO_BASE, "schedule": {**MICRO_BASE["schedule"], "steps": 24, "log_every": 2, "checkpoint_every": 8},
               "evaluation": {**MICRO_BASE["evaluation"], "segmentation": False, "depth": False,
                              "token_interaction": False}}
WARNING_LINE = re.compile(r"^\d\d:\d\d:\d\d\s+warning MLflow", re.MULTILINE)


def children_by_trial(base: str, experiment_name: str) -> tuple[list[dict], dict[str, list[dict]]]:
    experiment = rest(base, "experiments/get-by-name", query={"experiment_name": experiment_name})["experiment"]
    runs = rest(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}).get("runs", [])
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("sweep_role") == "parent"]
    children: dict[str, list[dict]] = {}
    for run, t in zip(runs, tags):
        if "trial_id" in t:
            children.setdefault(t["trial_id"], []).append(run)
    return parents, children


def history(base: str, run_id: str, key: str) -> list[tuple[int, float, int]]:
    points = rest(base, "metrics/get-history", query={"run_id": run_id, "metric_key": key}).get("metrics", [])
    return sorted((int(m.get("step", 0)), float(m["value"]), int(m["timestamp"])) for m in points)


def test_a_server_killed_mid_sweep_neither_stalls_trials_nor_loses_points(tmp_path, project_root, cli_env, server):
    spec = write_spec(tmp_path, "outage", base=OUTAGE_BASE, seeds=[0, 1], backend={"max_parallel": 1, "retries": 0},
                      tracking={"tracking_uri": server.base, "experiment": "outage_sweep"})
    trials_dir = project_root / "runs" / "trials"
    out_path = tmp_path / "orchestrator.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report", "--no-progress"],
                                cwd=REPO, env=cli_env, stdout=out, stderr=subprocess.STDOUT)

    def finished() -> set[Path]:
        return {p.parent for p in trials_dir.glob(f"*/{RESULT_FILE}")}

    wait_for(lambda: len(finished()) >= 2 or proc.poll() is not None, timeout=600, interval=0.05, what="two trials done")
    online = finished()
    server.stop(signal.SIGKILL)  # killed, and away until the sweep has finished
    killed_at = time.time()
    returncode = proc.wait(timeout=600)
    outage_s = time.time() - killed_at
    output = out_path.read_text()
    assert returncode == 0, output
    assert len(WARNING_LINE.findall(output)) == 1, output  # said once
    offline = finished() - online
    assert len(online) == 2 and len(offline) == 2, output

    results = {d: read_result(d) for d in online | offline}
    assert all(r is not None and r.done for r in results.values())
    for trial_dir in offline:  # trained start to end while the server was away, and it took longer than a trial
        points = read_metric_points(trial_dir)
        assert points and min(p[2] for p in points) / 1000 > killed_at
        assert outage_s > (trial_dir / RESULT_FILE).stat().st_mtime - (trial_dir / "config.yaml").stat().st_mtime
    # The trainer's own training time (checkpoints included): the best of each group, so one slow
    # trial on a loaded machine does not decide it.
    before = min(results[d].wall_time_s for d in online)
    during = min(results[d].wall_time_s for d in offline)
    growth = during / before - 1
    print(f"outage {outage_s:.1f} s; training wall time {before:.2f} s before, {during:.2f} s during ({growth:+.1%})")
    assert growth < 0.10, (before, during)

    server.start()  # back on the same port and store
    sync = subprocess.run([PYTHON, "-m", "orchestrator", "sync", str(spec)], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert sync.returncode == 0, sync.stdout + sync.stderr
    parents, children = children_by_trial(server.base, "outage_sweep")
    assert len(parents) == 1, sync.stdout
    assert set(children) == {d.name for d in results}, sync.stdout
    for trial_dir in results:
        runs = children[trial_dir.name]
        assert len(runs) == 1, f"{trial_dir.name}: {len(runs)} runs"
        run_id = runs[0]["info"]["run_id"]
        assert runs[0]["info"]["status"] == "FINISHED"
        local: dict[str, list[tuple[int, float, int]]] = {}
        for key, value, timestamp, step in read_metric_points(trial_dir):
            local.setdefault(key, []).append((step, value, timestamp))
        assert any(len(v) > 10 for v in local.values()), "no training curve kept locally"
        for key, points in local.items():  # every point, each exactly once
            assert history(server.base, run_id, key) == sorted(points), (trial_dir.name, key)
        # The artifacts too: those the offline trials' trainers could not upload came with `sync`.
        listed = rest(server.base, "artifacts/list", query={"run_id": run_id}).get("files", [])
        kept = {name for name in RUN_ARTIFACT_FILES if (trial_dir / name).is_file()}
        assert kept and kept <= {f["path"] for f in listed}, (trial_dir.name, listed)
