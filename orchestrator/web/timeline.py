"""A job's timeline as SVG geometry: one row per branch (or per bucket of branches), a bar per state.

Rendered on the server into inline SVG, so the page needs no chart library and no script. Coordinates are
in the SVG's viewBox units: the picture scales with the page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from ..models import BranchState
from .reads import Bucket, Span

WIDTH = 1000.0
LABEL_WIDTH = 110.0
PLOT_LEFT = LABEL_WIDTH + 10.0
PLOT_WIDTH = WIDTH - PLOT_LEFT - 10.0
AXIS_HEIGHT = 22.0
TOP = 6.0  # room above the first row's label
MIN_BAR = 2.0  # a branch that took no time still shows

#: Drawing order within a row: the states that need attention are drawn last, on top.
_DRAW_ORDER = {
    BranchState.SUCCEEDED: 0,
    BranchState.CANCELLED: 1,
    BranchState.SHORT_CIRCUITED: 2,
    BranchState.TIMED_OUT: 3,
    BranchState.RUNNING: 4,
    BranchState.FAILED: 5,
    BranchState.PENDING: 6,
}


@dataclass(frozen=True)
class Bar:
    state: str
    x: float
    width: float


@dataclass(frozen=True)
class Row:
    y: float
    label: str | None  # None: unlabelled, where rows are too thin for every label
    title: str
    bars: tuple[Bar, ...]


@dataclass(frozen=True)
class Tick:
    x: float
    text: str


@dataclass(frozen=True)
class Timeline:
    rows: tuple[Row, ...]
    ticks: tuple[Tick, ...]
    row_height: float
    height: float
    per_row: int  # branches a row stands for (1: one bar per branch)

    @property
    def bar_height(self) -> float:
        return max(self.row_height - 3.0, 2.0)


def seconds_text(seconds: float) -> str:
    """A duration for people: 0.25 s, 12.3 s, 4 min 05 s, 2 h 03 min."""
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(round(seconds) // 60, 60)
    return f"{hours} h {rest:02d} min"


def _row_title(bucket: Bucket, start: datetime) -> str:
    what = (
        f"branch {bucket.first}" if bucket.first == bucket.last else f"branches {bucket.first}-{bucket.last}"
    )
    parts = []
    for span in sorted(bucket.spans, key=lambda s: _DRAW_ORDER.get(BranchState(s.state), 9)):
        when = ""
        if span.started_at is not None:
            began = (span.started_at - start).total_seconds()
            ended = (
                "" if span.finished_at is None else seconds_text((span.finished_at - start).total_seconds())
            )
            when = f" ({seconds_text(began)} to {ended or 'now'})"
        parts.append(f"{span.count} {span.state}{when}")
    return f"{what}: " + ", ".join(parts)


def layout(buckets: Sequence[Bucket], *, start: datetime, end: datetime, per_row: int) -> Timeline:
    """Place every bucket's spans between `start` (the job's submit) and `end` (its finish, or now).
    A span still running reaches `end`; one that never started (cancelled or timed out in the queue) is a
    thin mark where it ended; pending branches have no bar."""
    latest = max([end, *(s.finished_at for b in buckets for s in b.spans if s.finished_at is not None)])
    total = max((latest - start).total_seconds(), 0.001)

    def x_of(moment: datetime) -> float:
        return PLOT_LEFT + PLOT_WIDTH * min(max((moment - start).total_seconds() / total, 0.0), 1.0)

    # Small jobs get a readable row per branch; big ones stay about a screen tall at 100 rows.
    row_height = 16.0 if len(buckets) <= 30 else (9.0 if len(buckets) <= 60 else 6.0)
    label_every = 1 if row_height >= 12 else (5 if row_height >= 9 else 10)
    rows = []
    for number, bucket in enumerate(buckets):
        bars = []
        for span in sorted(bucket.spans, key=lambda s: _DRAW_ORDER.get(BranchState(s.state), 9)):
            bar = _bar(span, end, x_of)
            if bar is not None:
                bars.append(bar)
        label = None
        if number % label_every == 0:
            label = f"#{bucket.first}" if per_row == 1 else f"{bucket.first}-{bucket.last}"
        rows.append(Row(TOP + number * row_height, label, _row_title(bucket, start), tuple(bars)))
    ticks = tuple(
        Tick(PLOT_LEFT + PLOT_WIDTH * f, seconds_text(total * f) if f else "0 s")
        for f in (0, 0.25, 0.5, 0.75, 1)
    )
    height = TOP + len(rows) * row_height + AXIS_HEIGHT
    return Timeline(tuple(rows), ticks, row_height, height, per_row)


def _bar(span: Span, end: datetime, place: Callable[[datetime], float]) -> Bar | None:
    if span.started_at is None:
        if span.finished_at is None:
            return None  # pending: nothing to draw yet
        x = place(span.finished_at)
        return Bar(span.state, x - MIN_BAR / 2, MIN_BAR)
    x = place(span.started_at)
    finish = span.finished_at if span.finished_at is not None else end
    return Bar(span.state, x, max(place(finish) - x, MIN_BAR))
