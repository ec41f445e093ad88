"""The MLflow UI (3.x, a React app on ag-grid) driven in Debian's chromium with Playwright: the steps
the browser test checks and docs/screenshot_mlflow.py photographs, written once.

No browser download: Playwright launches the system chromium (`apt-get install chromium`). Where the
network is closed, chromium without CHROMIUM_FLAGS waits on connections it can never make.
Locators go by role and text; where the UI gives neither (the tree of the column selector, the
parent run's expand button), by the one test id or grid cell that holds it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.spec.schema import DEFAULT_METRICS

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
UI_TIMEOUT_MS = 120_000  # the first load of the UI's bundle on a busy 2-core machine takes seconds
# The runs table's key columns: the axis of the default sweep, the report's metrics and the token
# measure the paper is about (late blocks' [CLS]-patch cosine before and after norm1).
KEY_PARAMS = ("model.specialization",)
KEY_METRICS = (*DEFAULT_METRICS, "tokens/late_cls_patch_cos_pre", "tokens/late_cls_patch_cos_post")
# Attribute columns shown by default that a sweep never fills (no datasets, sources or logged models).
EMPTY_COLUMNS = ("Dataset", "Source", "Models")


@contextmanager
def browser_page(width: int = 1600, height: int = 1000) -> Iterator[Page]:
    """A page of a fresh headless chromium (the system one), closed on exit."""
    from playwright.sync_api import sync_playwright  # optional: only the browser test and the screenshot use it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_FLAGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(UI_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def run_link(page: Page, run_name: str) -> Locator:
    # A link to a run's page: the experiment's breadcrumb link may carry the same name (a sweep's
    # parent run is named after the sweep, and so is its experiment by default).
    return page.get_by_role("link", name=run_name, exact=True).and_(page.locator('a[href*="/runs/"]'))


def open_runs_table(page: Page, base: str, experiment_id: str, parent_run_name: str) -> None:
    """The experiment's runs table, loaded (the parent run listed) and without the assistant panel."""
    page.goto(f"{base}/#/experiments/{experiment_id}/runs")
    run_link(page, parent_run_name).wait_for()
    close = page.get_by_role("button", name="Close", exact=True)  # the "MLflow Assistant" side panel
    if close.count():
        close.first.click()


def expand_run(page: Page, parent_run_name: str) -> None:
    """Click the expand button in the parent run's name cell (it has neither label nor text)."""
    link = run_link(page, parent_run_name)
    page.get_by_role("gridcell").filter(has=link).get_by_role("button").click()


def show_columns(page: Page, names: Iterable[str], hide: Iterable[str] = EMPTY_COLUMNS) -> None:
    """Tick params/metrics `names` (and untick `hide`) in the Columns selector, by its search box."""
    page.get_by_role("button", name="Columns", exact=True).click()
    tree = page.get_by_test_id("column-selector-tree")
    for name in hide:
        tree.get_by_title(name, exact=True).click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)  # the tree is virtualized: only matches are rendered, with the match in bold
        tree.locator(".du-bois-light-tree-treenode").filter(has_text=whole_text(name)).click()
    search.fill("")
    page.keyboard.press("Escape")
    for name in names:
        column_header(page, name).wait_for()


def whole_text(text: str) -> re.Pattern[str]:
    """Matches an element whose text is `text` alone (not a longer name that contains it); ag-grid's
    templates pad it with whitespace."""
    return re.compile(rf"^\s*{re.escape(text)}\s*$")


def column_header(page: Page, name: str) -> Locator:
    return page.locator("[role=columnheader][aria-colindex]").filter(has_text=whole_text(name))


def cell_text(page: Page, run_name: str, column: str) -> str:
    """The text of the runs table's cell for run `run_name` in column `column`, found by the grid's
    ARIA row and column indices (ag-grid renders the pinned and scrolled parts of a row apart)."""
    row = page.get_by_role("row").filter(has=run_link(page, run_name))
    row_index = row.get_attribute("aria-rowindex")
    col_index = column_header(page, column).get_attribute("aria-colindex")
    cell = page.locator(f'[role=row][aria-rowindex="{row_index}"] [role=gridcell][aria-colindex="{col_index}"]')
    return cell.inner_text().strip()
