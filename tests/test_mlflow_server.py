"""A sweep against a real `mlflow server` (HTTP tracking), checked through the server's REST API."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import MICRO_BASE, PYTHON, REPO, free_port, read_ledger, wait_for, write_spec

pytestmark = pytest.mark.slow


def rest(base: str, endpoint: str, payload: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "mlflow_server.log", "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server_artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def healthy() -> bool:
        if server.poll() is not None:
            raise AssertionError("mlflow server exited:\n" + (tmp_path / "mlflow_server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        wait_for(healthy, timeout=180, interval=0.5, what="mlflow server /health")
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def test_sweep_logs_parent_and_children_to_an_mlflow_server(tmp_path, project_root, cli_env, mlflow_server):
    spec = write_spec(tmp_path, "served", base=MICRO_BASE,
                      axes={"specialization": {"key": "model.specialization", "values": {"none": "none", "paper": "paper"}}},
                      backend={"max_parallel": 2, "retries": 1},
                      tracking={"tracking_uri": mlflow_server, "experiment": "served_sweep"})
    proc = subprocess.run([PYTHON, "-m", "orchestrator", "run", str(spec), "--no-report"], cwd=REPO, env=cli_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (project_root / "mlflow.db").exists()  # everything went to the server

    experiment = rest(mlflow_server, "experiments/get-by-name", query={"experiment_name": "served_sweep"})["experiment"]
    parents = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                  "filter": "tags.sweep_role = 'parent'"}).get("runs", [])
    assert len(parents) == 1
    parent = parents[0]
    tags = {t["key"]: t["value"] for t in parent["data"].get("tags", [])}
    assert tags["sweep_name"] == "served" and parent["info"]["status"] == "FINISHED"

    children = rest(mlflow_server, "runs/search", {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'"}).get("runs", [])
    ledger = read_ledger(project_root, "served")
    assert len(children) == 2
    seen = set()
    for child in children:
        child_tags = {t["key"]: t["value"] for t in child["data"].get("tags", [])}
        params = {p["key"]: p["value"] for p in child["data"].get("params", [])}
        metrics = {m["key"]: m["value"] for m in child["data"].get("metrics", [])}
        seen.add(child_tags["trial_id"])
        assert child["info"]["status"] == "FINISHED"
        assert params["model.scale"] == "micro" and params["model.specialization"] in ("none", params["model.specialization"])
        for metric in ("linear_top1_cls", "knn_top1", "seg_miou", "depth_rmse", "flops"):
            assert metric in metrics, (metric, sorted(metrics))
    assert seen == set(ledger["trials"])
