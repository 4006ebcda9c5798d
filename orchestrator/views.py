"""Read models handed to users and aggregators: plain frozen dataclasses, detached from any session."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

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
    state: str
    attempts: int
    celery_task_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    result: Any
    error: str | None
    late: bool

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
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None
    result: Any
    error: str | None
    branches: tuple[BranchView, ...] = ()

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


def branch_view(row: Any) -> BranchView:
    """A `branches` row as a view."""
    return BranchView(
        index=row.index,
        task=row.task,
        queue=row.queue,
        args=row.args,
        state=row.state,
        attempts=row.attempts,
        celery_task_id=row.celery_task_id,
        started_at=row.started_at,
        finished_at=row.finished_at,
        result=row.result,
        error=row.error,
        late=row.late,
    )


def job_view(row: Any, branches: Sequence[Any]) -> JobView:
    """A `jobs` row (and its `branches` rows) as a view."""
    return JobView(
        id=str(row.id),
        name=row.name,
        state=row.state,
        fan_in=row.fan_in,
        branch_total=row.branch_total,
        branch_done=row.branch_done,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        deadline_at=row.deadline_at,
        result=row.result,
        error=row.error,
        branches=tuple(branch_view(b) for b in branches),
    )
