"""The process group's timeout comes from the trial config: a rank waiting in a barrier while rank 0
is busy fails after `runtime.dist_timeout_min`, not after torch's default; and a trial whose
evaluation is longer than that timeout still finishes, because every rank evaluates its share."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from trainer.contract import RESULT_FILE

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 4.0

RANK_SCRIPT = """
import os, sys, time
from trainer.config import RuntimeConfig
from trainer.runtime import setup_runtime, teardown_runtime
runtime = setup_runtime(RuntimeConfig(device="cpu", threads=1, dist_timeout_min=float(sys.argv[1])))
if runtime.rank == 0:
    time.sleep(float(sys.argv[2]))  # "evaluating" while rank 1 waits, then joins the barrier
    try:
        runtime.barrier()
    finally:
        os._exit(0)
started = time.monotonic()
try:
    runtime.barrier()
except Exception as err:
    print(f"TIMEOUT after {time.monotonic() - started:.1f}s: {type(err).__name__}", flush=True)
    sys.exit(3)
print(f"BARRIER PASSED after {time.monotonic() - started:.1f}s", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(timeout_min: float, rank0_busy_s: float) -> subprocess.CompletedProcess:
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(timeout_min), str(rank0_busy_s)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out1, _ = procs[1].communicate(timeout=120)
    procs[0].communicate(timeout=120)
    return subprocess.CompletedProcess([], procs[1].returncode, out1, "")


def test_a_waiting_rank_fails_after_the_configured_timeout():
    started = time.monotonic()
    result = _run_ranks(timeout_min=0.05, rank0_busy_s=20)  # 3 s allowed, rank 0 busy for 20
    assert result.returncode == 3, result.stdout
    waited = float(result.stdout.split("TIMEOUT after ")[1].split("s")[0])
    assert waited < 15  # the configured 3 s (plus gloo's slack), far from torch's 30-minute default
    assert time.monotonic() - started < 60


def test_a_long_enough_timeout_lets_the_rank_wait():
    result = _run_ranks(timeout_min=1.0, rank0_busy_s=5)
    assert result.returncode == 0, result.stdout
    assert "BARRIER PASSED" in result.stdout
    assert float(result.stdout.split("BARRIER PASSED after ")[1].split("s")[0]) >= 4  # it did wait for rank 0


@pytest.mark.slow
def test_an_evaluation_longer_than_the_timeout_passes_when_every_rank_shares_it(tmp_path):
    """The final evaluation takes longer than the 4-second timeout, but each process does its share
    (and the cheap probes alike), so none waits in a collective for long: the trial finishes."""
    config = {
        "data": {"scenes": {"train_size": 512, "val_size": 128}},
        "schedule": {"steps": 2, "batch_size": 16, "warmup_steps": 1, "checkpoint_every": 2, "log_every": 1},
        "evaluation": {"probe_epochs": 160, "max_train_samples": 512, "max_val_samples": 128,
                       "token_interaction": False},
        "tracking": {"enabled": False},
        "runtime": {"threads": 1, "device": "cpu", "dist_timeout_min": TIMEOUT_S / 60},
    }
    (tmp_path / "trial.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "trainer", "--config", str(tmp_path / "trial.yaml"), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / RESULT_FILE).read_text())
    assert result["status"] == "done" and result["world_size"] == 2
    assert result["eval_time_s"] > TIMEOUT_S  # longer than any single wait may be
    assert {"seg_miou", "depth_rmse", "linear_top1_cls"} <= set(result["metrics"])
