"""Read models handed to users and aggregators: plain frozen dataclasses, detached from any session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from typing import Any, TypeVar

from .models import FINAL_JOB_STATES


@dataclass(frozen=True)
class BranchOutcome:
    """What an aggregator sees of one branch, in submission order."""

    index: int
    task: str
    state: str
    result: Any = None
    error: str | None = None
    duration: float | None = None  # seconds from the last attempt's start to the outcome

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class BranchView:
    index: int
    task: str
    queue: str
    args: Any
    state: str = "pending"
    attempts: int = 0
    celery_task_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None
    late: bool = False
    lost_runs: int = 0  # runs lost with their worker (killed, or silent past ORCH_STALL_TIMEOUT)
    run: int = 1  # the job run the branch last ran in (a redrive starts the next)

    @property
    def duration(self) -> float | None:
        """Seconds from the last start to the outcome; None until both are known."""
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    @property
    def ok(self) -> bool:
        return self.state == "succeeded"


@dataclass(frozen=True)
class JobView:
    id: str
    name: str | None
    state: str
    fan_in: str
    branch_total: int
    branch_done: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    deadline_at: datetime | None = None
    result: Any = None
    error: str | None = None
    branches: tuple[BranchView, ...] = ()
    run: int = 1  # 1, and one more for each redrive (`Orchestrator.retry`)
    priority: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    @property
    def duration(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()

    def counts(self) -> dict[str, int]:
        """Branches per state, for progress displays."""
        out: dict[str, int] = {}
        for b in self.branches:
            out[b.state] = out.get(b.state, 0) + 1
        return out


@dataclass(frozen=True)
class BreakerView:
    name: str
    state: str
    failure_count: int
    failure_threshold: int
    reset_timeout: float
    probe_lease: float
    opened_at: datetime | None
    retry_at: datetime | None
    probe_started_at: datetime | None
    updated_at: datetime


V = TypeVar("V")


_FIELDS: dict[type[Any], tuple[str, ...]] = {}


def _field_names(view: type[Any]) -> tuple[str, ...]:
    names = _FIELDS.get(view)
    if names is None:
        names = _FIELDS[view] = tuple(f.name for f in fields(view))
    return names


def from_row(view: type[V], row: Any, **given: Any) -> V:
    """A view whose fields are read from `row`'s attributes of the same names (a SQL row, or any object
    shaped like one), but for those `given`."""
    return view(**{name: getattr(row, name) for name in _field_names(view) if name not in given}, **given)


@dataclass(frozen=True)
class RunView:
    """How an earlier run of a job ended: a redrive keeps it before the job runs again."""

    run: int
    state: str
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class BranchRunView:
    """A branch's outcome in an earlier run of its job, before a redrive ran it again."""

    index: int
    run: int
    state: str
    attempts: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class HistoryView:
    """A job's earlier runs and its branches' earlier outcomes, oldest first (the job's view is the
    latest run)."""

    job_id: str
    runs: tuple[RunView, ...] = ()
    branches: tuple[BranchRunView, ...] = ()


def history_view(job_id: str, runs: Sequence[Any], branches: Sequence[Any]) -> HistoryView:
    return HistoryView(
        job_id,
        tuple(from_row(RunView, r) for r in runs),
        tuple(from_row(BranchRunView, b) for b in branches),
    )


def branch_view(row: Any) -> BranchView:
    """A `branches` row as a view."""
    return from_row(BranchView, row)


def job_view(row: Any, branches: Sequence[Any]) -> JobView:
    """A `jobs` row (and its `branches` rows) as a view."""
    return from_row(JobView, row, id=str(row.id), branches=tuple(branch_view(b) for b in branches))


def breaker_view(row: Any) -> BreakerView:
    """A `breakers` row (or a breaker storage's record of one) as a view."""
    return from_row(BreakerView, row, state=str(row.state))
