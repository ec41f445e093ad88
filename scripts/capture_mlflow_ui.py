"""Capture the MLflow UI page of a sweep's experiment as a PNG, with headless Chromium.

Starts `mlflow ui` on loopback for the given store, finds the experiment through the REST API,
renders its page in Debian's chromium (`apt-get install chromium`), and stops the server.

    .venv/bin/python scripts/capture_mlflow_ui.py --experiment component_ablation --out docs/mlflow_ui.png
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--experiment", default="component_ablation")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "mlflow_ui.png")
    parser.add_argument("--window-size", default="1600,1000")
    parser.add_argument("--view", default="runs", help="page of the experiment: runs (the runs table), chart-view, ...")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("error: chromium not found; install it with `apt-get install chromium`", file=sys.stderr)
        return 2

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", args.backend_store_uri,
                               "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(f"{base}/health")
        query = urllib.request.quote(args.experiment)
        with urllib.request.urlopen(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={query}") as r:
            experiment_id = json.load(r)["experiment"]["experiment_id"]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            f"--user-data-dir={profile}", "--hide-scrollbars", f"--window-size={args.window_size}",
                            "--virtual-time-budget=20000", f"--screenshot={args.out.resolve()}",
                            f"{base}/#/experiments/{experiment_id}/{args.view}"],
                           check=True, capture_output=True, timeout=180)
        print(f"wrote {args.out} ({base}/#/experiments/{experiment_id}/{args.view})")
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
