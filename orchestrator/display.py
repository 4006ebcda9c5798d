"""Terminal rendering shared by the CLI and the demo: job tables, state colours, the live progress bar."""

from __future__ import annotations

import json
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import WaitTimeout
from .views import JobView

console = Console()

STATE_STYLE = {
    "succeeded": "green", "partial": "yellow", "failed": "red", "cancelled": "magenta",
    "timed_out": "red", "short_circuited": "magenta", "running": "cyan", "pending": "dim",
    "aggregating": "cyan", "closed": "green", "open": "red", "half_open": "yellow",
}  # fmt: skip


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{state}[/]"


def print_job(view: JobView) -> None:
    duration = f"{view.duration:.3f}s" if view.duration is not None else "-"
    console.print(
        f"job [bold]{view.id}[/bold] {view.name or ''}  {styled(view.state)}  "
        f"{view.branch_done}/{view.branch_total} branches  {duration}",
        highlight=False,
    )
    if view.branches:
        table = Table()
        widths = {
            "#": len(str(len(view.branches))),
            "task": max(len(b.task) for b in view.branches),
            "queue": max(len(b.queue) for b in view.branches),
            "state": max(len(b.state) for b in view.branches),
            "tries": 5,
            "secs": 6,
        }
        for header, width in widths.items():
            table.add_column(header, no_wrap=True, min_width=max(width, len(header)))
        rest = console.width - sum(max(w, len(h)) + 3 for h, w in widths.items()) - 4
        table.add_column("result / error", no_wrap=True, overflow="ellipsis", max_width=max(rest, 12))
        for b in view.branches:
            shown = b.error if b.error else json.dumps(b.result)
            seconds = f"{b.duration:.3f}" if b.duration is not None else "-"
            table.add_row(str(b.index), b.task, b.queue, styled(b.state), str(b.attempts), seconds, shown)
        console.print(table)
    if view.error:
        console.print(f"[red]error:[/red] {view.error}", highlight=False)
    if view.final and view.result is not None:
        console.print("result:", json.dumps(view.result, indent=2), highlight=False)


def watch_job(orc: Any, job_id: str, timeout: float | None = None) -> JobView:
    started = time.monotonic()
    view: JobView = orc.get(job_id)
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[states]}"), TimeElapsedColumn(), console=console, transient=False,
    ) as progress:  # fmt: skip
        bar = progress.add_task(view.name or view.id[:8], total=view.branch_total, states="")
        while True:
            view = orc.get(job_id)
            states = "  ".join(f"{k}={n}" for k, n in sorted(view.counts().items()))
            progress.update(bar, completed=view.branch_done, states=f"{states}  job={view.state}")
            if view.final:
                return view
            if timeout is not None and time.monotonic() - started > timeout:
                raise WaitTimeout(job_id, timeout, view.state)
            time.sleep(0.1)
