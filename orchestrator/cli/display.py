"""Terminal rendering shared by the CLI and the demo: job tables, state colours, the live progress bar.

Names, errors, results, task and breaker names come from users: they go through `safe()` before they
reach Rich, so `[/bold]` is shown, not parsed as markup, and an ANSI escape cannot repaint the terminal.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..errors import WaitTimeout
from ..views import HistoryView, JobView

# Piped output is read by programs (grep, awk): a table cut to Rich's default 80 columns loses ids and
# states, so anything that is not a terminal gets lines as long as their content.
PIPE_WIDTH = 100_000


def make_console(*, stderr: bool = False) -> Console:
    """A console that wraps to the terminal, or never wraps when its output is a pipe or a file."""
    out = Console(stderr=stderr)
    if not out.is_terminal:
        out.width = PIPE_WIDTH
    return out


console = make_console()

STATE_STYLE = {
    "succeeded": "green",
    "partial": "yellow",
    "failed": "red",
    "cancelled": "magenta",
    "timed_out": "red",
    "short_circuited": "magenta",
    "running": "cyan",
    "pending": "dim",
    "aggregating": "cyan",
    "closed": "green",
    "open": "red",
    "half_open": "yellow",
}

# Escape sequences (CSI such as colours and cursor moves, OSC such as titles and hyperlinks, and the
# two-byte ones), then any control character left: C0 but tab and newline, DEL, C1, and the bidi
# overrides that make text read differently from what it is.
_ESCAPE_SEQUENCE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def clean(value: object, *, one_line: bool = True) -> str:
    """`value` as text without escape sequences or control characters; `one_line` also turns newlines
    and tabs into spaces, for table cells and single-line messages."""
    text = _ESCAPE_SEQUENCE.sub("", str(value)).replace("\r\n", "\n")
    text = text.replace("\t", " ")
    if one_line:
        text = text.replace("\n", " ")
    return _CONTROL.sub("", text)


def safe(value: object, *, one_line: bool = True) -> str:
    """User-controlled text ready to embed in Rich markup: cleaned (see `clean`) and markup-escaped."""
    return escape(clean(value, one_line=one_line))


def styled(state: str) -> str:
    return f"[{STATE_STYLE.get(state, 'white')}]{safe(state)}[/]"


def print_table(table: Table) -> None:
    """Print without cropping: columns that must stay whole (ids, states, names to copy) have a minimum
    width, and a row wider than the terminal wraps rather than losing its end."""
    console.print(table, crop=False)


def print_job(view: JobView) -> None:
    duration = f"{view.duration:.3f}s" if view.duration is not None else "-"
    console.print(
        f"job [bold]{view.id}[/bold] {safe(view.name or '')}  {styled(view.state)}  "
        f"{view.branch_done}/{view.branch_total} branches  {duration}"
        + (f"  run {view.run} (earlier runs: orchestrator status --history)" if view.run > 1 else ""),
        highlight=False,
        soft_wrap=True,
    )
    if view.branches:
        table = Table()
        tasks = [clean(b.task) for b in view.branches]
        queues = [clean(b.queue) for b in view.branches]
        widths = {
            "#": len(str(len(view.branches))),
            "task": max(len(t) for t in tasks),
            "queue": max(len(q) for q in queues),
            "state": max(len(b.state) for b in view.branches),
            "tries": 5,
            "secs": 6,
        }
        for header, width in widths.items():
            table.add_column(header, no_wrap=True, min_width=max(width, len(header)))
        rest = console.width - sum(max(w, len(h)) + 3 for h, w in widths.items()) - 4
        table.add_column("result / error", no_wrap=True, overflow="ellipsis", max_width=max(rest, 12))
        for b, task, queue in zip(view.branches, tasks, queues, strict=True):
            shown = b.error if b.error else json.dumps(b.result)
            seconds = f"{b.duration:.3f}" if b.duration is not None else "-"
            table.add_row(
                str(b.index),
                escape(task),
                escape(queue),
                styled(b.state),
                str(b.attempts),
                seconds,
                safe(shown),
            )
        print_table(table)
    if view.error:
        console.print(f"[red]error:[/red] {safe(view.error, one_line=False)}", highlight=False)
    if view.final and view.result is not None:
        console.print("result:", safe(json.dumps(view.result, indent=2), one_line=False), highlight=False)


def watch_job(orc: Any, job_id: str, timeout: float | None = None) -> JobView:
    started = time.monotonic()
    view: JobView = orc.get(job_id)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[states]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        # The description is rendered as markup: a job's name must be escaped like everywhere else.
        bar = progress.add_task(safe(view.name or view.id[:8]), total=view.branch_total, states="")
        while True:
            view = orc.get(job_id)
            states = "  ".join(f"{k}={n}" for k, n in sorted(view.counts().items()))
            progress.update(bar, completed=view.branch_done, states=safe(f"{states}  job={view.state}"))
            if view.final:
                return view
            if timeout is not None and time.monotonic() - started > timeout:
                raise WaitTimeout(job_id, timeout, view.state)
            time.sleep(0.1)


def print_history(history: HistoryView) -> None:
    """A job's earlier runs, and the outcomes its branches had in them before they ran again."""
    if not history.runs:
        console.print("no earlier runs", highlight=False)
        return
    table = Table(title="earlier runs")
    for header in ("run", "state", "finished", "branch", "branch state", "tries", "error"):
        table.add_column(header, no_wrap=True)
    for run in history.runs:
        finished = run.finished_at.strftime("%m-%d %H:%M:%S") if run.finished_at else "-"
        table.add_row(str(run.run), styled(run.state), finished, "", "", "", safe(run.error or ""))
        for b in (b for b in history.branches if b.run == run.run):
            table.add_row("", "", "", str(b.index), styled(b.state), str(b.attempts), safe(b.error or ""))
    print_table(table)
