"""A real `mlflow server` on loopback and its REST API, for the server and browser tests and for
docs/screenshot_mlflow.py (which serves a finished sweep's store to photograph its UI)."""

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

from conftest import free_port, wait_for


def rest(base: str, endpoint: str, payload: dict | None = None, query: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if data is not None else "GET")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


class MlflowServer:
    """A real `mlflow server` on loopback that a test can kill and start again (same port, same store).
    `store`: the SQLite store it serves (default: a new one, `folder/server.db`)."""

    def __init__(self, folder: Path, store: Path | None = None) -> None:
        self.folder = folder
        self.store = store or folder / "server.db"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "mlflow_server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
                 f"sqlite:///{self.store}", "--artifacts-destination", str(self.folder / "server_artifacts"),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.healthy, timeout=180, interval=0.5, what="mlflow server /health")

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError("mlflow server exited:\n" + self.log_path.read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{self.base}/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
