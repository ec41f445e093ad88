"""Regenerate docs/mlflow_ui.png: a finished sweep's runs table in the MLflow UI, the parent run
expanded to its child runs, with the key columns (the specialization, the report's metrics, the
late blocks' [CLS]-patch cosine before and after norm1), photographed in Debian's chromium.

After `make sweep` has finished (the default sweep's runs are in the project's mlflow.db):

    .venv/bin/python docs/screenshot_mlflow.py

Another sweep: `--spec sweeps/OTHER.yaml` (its tracking store and experiment, as the sweep logged
them). A SQLite store is served with `mlflow server` on a free loopback port for as long as it
takes; a spec that tracks to a server is browsed there. Needs /usr/bin/chromium (`apt-get install -y
chromium`) and the test extra's playwright; nothing is downloaded. The browser steps are the ones
tests/test_mlflow_browser.py checks (tests/support/mlflow_ui.py).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import urllib.error
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the server and the browser steps are test helpers (tests/support)

from support.mlflow_server import MlflowServer, rest  # noqa: E402  (after the path setup above)
from support.mlflow_ui import (  # noqa: E402
    CHROMIUM,
    KEY_METRICS,
    KEY_PARAMS,
    browser_page,
    column_header,
    expand_run,
    open_runs_table,
    run_link,
    show_columns,
)

from orchestrator.mlflow_store import PARENT_ROLE_TAG, PARENT_RUN_TAG, sqlite_path, tracking_target  # noqa: E402
from orchestrator.spec import SpecError, load_spec  # noqa: E402
from orchestrator.store import ProjectPaths  # noqa: E402

DEFAULT_SPEC = REPO / "sweeps" / "component_ablation.yaml"  # the sweep `make sweep` runs


@contextlib.contextmanager
def served(tracking_uri: str) -> Iterator[str]:
    """The base URL of an MLflow server over `tracking_uri`: a SQLite store gets its own for the while."""
    store = sqlite_path(tracking_uri)
    if store is None:
        yield tracking_uri.rstrip("/")
        return
    if not store.is_file():
        raise SystemExit(f"error: no MLflow store at {store}: run the sweep first (make sweep)")
    with tempfile.TemporaryDirectory() as folder:
        server = MlflowServer(Path(folder), store=store)
        server.start()
        try:
            yield server.base
        finally:
            server.stop()


def autosize(page, column: str) -> None:
    """Fit a column to its widest cell (ag-grid: double-click the header's resize handle)."""
    column_header(page, column).locator(".ag-header-cell-resize").dblclick()


def fit_to_header(page, column: str, padding: int = 20, least: int = 90) -> None:
    """Make a column as wide as its name (values longer than that end in an ellipsis), by dragging
    the header's resize handle: full-precision metrics would push the other key columns off screen."""
    wanted = max(least, page.get_by_test_id(f"sort-header-{column}").evaluate("e => e.scrollWidth") + padding)
    box = column_header(page, column).bounding_box()
    x, y = box["x"] + box["width"] - 2, box["y"] + box["height"] / 2  # the handle's half inside the cell
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + wanted - box["width"], y, steps=5)
    page.mouse.up()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="the finished sweep's spec")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "mlflow_ui.png")
    parser.add_argument("--size", default="1700x1000", help="browser window, WIDTHxHEIGHT")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        parser.error(f"no chromium at {CHROMIUM}: install it with `apt-get install -y chromium`")
    width, height = (int(n) for n in args.size.lower().split("x"))
    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        parser.error(f"--spec: {err}")
    tracking_uri, experiment = tracking_target(spec, ProjectPaths.discover())

    with served(tracking_uri) as base:
        try:
            found = rest(base, "experiments/get-by-name", query={"experiment_name": experiment})
        except urllib.error.HTTPError as err:
            raise SystemExit(f"error: no experiment {experiment!r} in {tracking_uri} ({err}): has the sweep run?")
        experiment_id = found["experiment"]["experiment_id"]
        parents = rest(base, "runs/search", {"experiment_ids": [experiment_id],
                                             "filter": f"tags.{PARENT_ROLE_TAG} = 'parent'",
                                             "order_by": ["attributes.start_time DESC"]}).get("runs", [])
        if not parents:
            raise SystemExit(f"error: experiment {experiment!r} in {tracking_uri} has no sweep parent run")
        parent = parents[0]["info"]
        child_filter = f"tags.`{PARENT_RUN_TAG}` = '{parent['run_id']}'"
        children = rest(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 1,
                                              "filter": child_filter}).get("runs", [])
        with browser_page(width, height) as page:
            open_runs_table(page, base, experiment_id, parent["run_name"])
            expand_run(page, parent["run_name"])
            if children:
                run_link(page, children[0]["info"]["run_name"]).wait_for()
            show_columns(page, [*KEY_PARAMS, *KEY_METRICS])
            page.get_by_role("button", name="Toggle sidebar").click()  # room for the key columns
            autosize(page, "Run Name")
            for column in (*KEY_PARAMS, *KEY_METRICS):
                fit_to_header(page, column)
            page.mouse.move(0, 0)  # no hover highlight on a row
            table_bottom = page.evaluate("() => Math.max(...[...document.querySelectorAll('[role=row]')]"
                                         ".map(r => r.getBoundingClientRect().bottom))")
            args.out.parent.mkdir(parents=True, exist_ok=True)  # down to the last run's row, when they end early
            page.screenshot(path=str(args.out), clip={"x": 0, "y": 0, "width": width,
                                                      "height": min(height, table_bottom + 24)})
    print(f"wrote {args.out} (experiment {experiment!r}, parent run {parent['run_name']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
