"""What a running sweep prints: one event line per thing that happened to a trial, and an optional
live progress bar. The runner and the search scheduler are handed one `SweepProgress`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

EVENT_STYLE = {"done": "green", "failed": "red", "retry": "yellow", "warning": "yellow", "stopping": "yellow"}


class SweepProgress:
    def __init__(self, sweep: str, console: Console | None = None, bar: bool = False) -> None:
        self.sweep = sweep
        self.console = console or Console()
        self.bar = bar
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def event(self, kind: str, what: str, detail: str = "") -> None:
        """`12:00:01    started case=ok seed=0  3f2a... attempt 1 job 4242`."""
        stamp = time.strftime("%H:%M:%S")
        self.console.print(f"{stamp} [{EVENT_STYLE.get(kind, 'cyan')}]{kind:>10}[/] {escape(what)}  "
                           f"[dim]{escape(detail)}[/]", highlight=False)

    @contextlib.contextmanager
    def showing(self, total: int) -> Iterator[None]:
        """The progress bar, for the duration of the block (nothing when the bar is off)."""
        if not self.bar:
            yield
            return
        self._progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                  MofNCompleteColumn(), TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                  console=self.console, transient=False)
        self._task = self._progress.add_task(self.sweep, total=total, detail="")
        try:
            with self._progress:
                yield
        finally:
            self._progress = None

    def update(self, states: list[str], *, running: int, queued: int, waiting: int) -> None:
        """`states`: the ledger state of every trial of the sweep."""
        if self._progress is None or self._task is None:
            return
        finished = sum(state in ("done", "failed") for state in states)
        failed = states.count("failed")
        detail = f"running {running} · queued {queued}"
        if waiting:
            detail += f" · waiting {waiting}"
        if failed:
            detail += f" · [red]failed {failed}[/red]"
        self._progress.update(self._task, total=len(states), completed=finished, detail=detail)
