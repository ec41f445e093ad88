"""The process group's timeout comes from the trial config: a rank waiting in a barrier while rank 0
is busy (evaluating) fails after `runtime.dist_timeout_min`, not after torch's default."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

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
