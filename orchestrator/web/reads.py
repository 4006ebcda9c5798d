"""The web view's SQL reads, shaped for pages that stay fast on a million jobs and 10,000-branch jobs.

Every read is bounded: the jobs page is a keyset page on (created_at, id) over the existing
`ix_jobs_state_created_at` index; a job's branches are a keyset page on the primary key (job_id, index);
its timeline and state counts are aggregated in SQL; JSON results and errors are cut in SQL, so a branch
that returned megabytes cannot make a page heavy. Nothing here writes.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Integer,
    RowMapping,
    Text,
    and_,
    cast,
    func,
    literal_column,
    or_,
    select,
    union_all,
)

from ..database import get_engine
from ..errors import InvalidArgument, JobNotFound
from ..models import FINAL_JOB_STATES, Branch, BranchState, Job, JobState, utcnow
from ..store import parse_job_id

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Most rows a page may ask for.
PAGE_MAX = 200
#: Most rows of a job's timeline: more branches than this share rows (buckets of consecutive indexes).
TIMELINE_ROWS = 100
#: How much of a branch's result and error, and of a job's result, a page carries.
BRANCH_RESULT_CHARS = 600
BRANCH_ERROR_CHARS = 4000
JOB_RESULT_CHARS = 20_000


@dataclass(frozen=True)
class Cursor:
    """A position in the jobs list, newest first: the (created_at, id) of a row, as text in a URL."""

    created_at: datetime
    id: uuid.UUID

    def encode(self) -> str:
        micros = (self.created_at - _EPOCH) // timedelta(microseconds=1)
        return f"{micros}.{self.id.hex}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            micros, hex_id = text.split(".")
            return cls(_EPOCH + timedelta(microseconds=int(micros)), uuid.UUID(hex=hex_id))
        except (ValueError, OverflowError):
            raise InvalidArgument(f"not a page cursor: {text[:80]!r}") from None


@dataclass(frozen=True)
class JobRow:
    """One line of the jobs page."""

    id: uuid.UUID
    name: str | None
    state: str
    branch_total: int
    branch_done: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    @property
    def cursor(self) -> Cursor:
        return Cursor(self.created_at, self.id)


@dataclass(frozen=True)
class JobPage:
    """Jobs newest first; `older`/`newer` are the cursors of the neighbouring pages (None: no such page)."""

    rows: tuple[JobRow, ...]
    older: Cursor | None
    newer: Cursor | None


@dataclass(frozen=True)
class Clipped:
    """A text cut to at most a page's share of it, and how long it really is."""

    text: str
    length: int

    @property
    def cut(self) -> bool:
        return self.length > len(self.text)


@dataclass(frozen=True)
class JobDetail:
    id: uuid.UUID
    name: str | None
    state: str
    fan_in: str
    branch_total: int
    branch_done: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline_at: datetime | None
    min_success: int | None
    error: str | None
    result: Clipped | None  # the fan-in's result as JSON text; None when there is none (yet)
    run: int = 1  # one more for each redrive
    priority: int = 0

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES


@dataclass(frozen=True)
class BranchRow:
    index: int
    task: str
    queue: str
    state: str
    attempts: int
    celery_task_id: str | None
    started_at: datetime | None
    finished_at: datetime | None
    late: bool
    result: Clipped | None
    error: Clipped | None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


@dataclass(frozen=True)
class BranchPage:
    """Branches by index; `after`/`before` are the indexes to page on from (None: no such page)."""

    rows: tuple[BranchRow, ...]
    after: int | None
    before: int | None


@dataclass(frozen=True)
class Span:
    """The branches of one state in a timeline row: first start to last finish (None: not yet)."""

    state: str
    count: int
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class Bucket:
    """One timeline row: consecutive branches `first`..`last` (one branch when the job is small)."""

    first: int
    last: int
    spans: tuple[Span, ...] = field(default=())


@dataclass(frozen=True)
class JobPageData:
    """Everything a job's page shows, read in one transaction."""

    job: JobDetail
    counts: dict[str, int]
    branches: BranchPage
    timeline: tuple[Bucket, ...]
    per_row: int  # branches a timeline row stands for
    read_at: datetime


@dataclass(frozen=True)
class Progress:
    state: str
    done: int
    total: int

    @property
    def final(self) -> bool:
        return self.state in FINAL_JOB_STATES

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "done": self.done, "total": self.total, "final": self.final}


_LIST_COLUMNS = (
    Job.id,
    Job.name,
    Job.state,
    Job.branch_total,
    Job.branch_done,
    Job.created_at,
    Job.started_at,
    Job.finished_at,
)


def _clip(column: Any, chars: int) -> tuple[ColumnElement[Any], ColumnElement[Any]]:
    text = cast(column, Text)
    return func.substr(text, 1, chars), func.length(text)


def _clipped(text: str | None, length: int | None) -> Clipped | None:
    if text is None or text == "null":  # SQL NULL, or a JSON null result
        return None
    return Clipped(text, length or len(text))


def check_limit(limit: int) -> int:
    if not 1 <= limit <= PAGE_MAX:
        raise InvalidArgument(f"a page holds 1 to {PAGE_MAX} rows, not {limit}")
    return limit


def _older_than(c: Cursor) -> ColumnElement[bool]:
    # created_at <= c keeps the index range tight; the OR breaks ties between equal times by id.
    return and_(Job.created_at <= c.created_at, or_(Job.created_at < c.created_at, Job.id < c.id))


def _newer_than(c: Cursor) -> ColumnElement[bool]:
    return and_(Job.created_at >= c.created_at, or_(Job.created_at > c.created_at, Job.id > c.id))


def _name_filter(name: str) -> ColumnElement[bool]:
    escaped = name.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return Job.name.ilike(f"%{escaped}%", escape="\\")


def _branch_row(row: RowMapping) -> BranchRow:
    return BranchRow(
        index=row["index"],
        task=row["task"],
        queue=row["queue"],
        state=row["state"],
        attempts=row["attempts"],
        celery_task_id=row["celery_task_id"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        late=row["late"],
        result=_clipped(row["result_text"], row["result_length"]),
        error=_clipped(row["error_text"], row["error_length"]),
    )


class WebReads:
    """The reads behind the web pages, on one database."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url

    @property
    def engine(self) -> Engine:
        return get_engine(self.database_url)

    # --- the jobs page -----------------------------------------------------------------------------

    def jobs(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        before: Cursor | None = None,
        after: Cursor | None = None,
        limit: int = 50,
    ) -> JobPage:
        """A page of jobs newest first, older than `before` or newer than `after` (or the newest).

        The index is (state, created_at). With a state, the page is one range scan of it. Without one,
        PostgreSQL 15 cannot skip-scan the leading column, and there is no index on created_at alone, so
        the page is the merge of one bounded scan per state (7 scans of at most limit+1 rows each),
        which stays a few milliseconds on a million jobs instead of a sort of the whole table. A name
        filter (a case-insensitive substring: no index serves it) is applied during those scans.
        """
        check_limit(limit)
        if state is not None and state not in set(JobState):
            raise InvalidArgument(f"no job state {state!r}; expected one of {', '.join(JobState)}")
        if before is not None and after is not None:
            raise InvalidArgument("page either before or after a cursor, not both")
        ascending = after is not None
        conditions: list[ColumnElement[bool]] = []
        if before is not None:
            conditions.append(_older_than(before))
        if after is not None:
            conditions.append(_newer_than(after))
        if name:
            conditions.append(_name_filter(name))
        states = [state] if state is not None else list(JobState)
        with self.engine.connect() as conn:
            rows = self._merged(conn, states, conditions, limit + 1, ascending)
        more = len(rows) > limit
        page = [JobRow(*r) for r in rows[:limit]]
        if ascending:
            page.reverse()
        if not page:
            return JobPage((), None, None)
        # From `before`, a newer page exists (we came from it); from `after`, an older one does.
        older = page[-1].cursor if (more if not ascending else True) else None
        newer = page[0].cursor if (more if ascending else before is not None) else None
        return JobPage(tuple(page), older, newer)

    @staticmethod
    def _merged(
        conn: Connection,
        states: Sequence[str],
        conditions: Sequence[ColumnElement[bool]],
        limit: int,
        ascending: bool,
    ) -> list[Any]:
        def ordered(query: Any, created: Any, ident: Any) -> Any:
            if ascending:
                return query.order_by(created.asc(), ident.asc())
            return query.order_by(created.desc(), ident.desc())

        scans = [
            ordered(select(*_LIST_COLUMNS).where(Job.state == s, *conditions), Job.created_at, Job.id)
            .limit(limit)
            .subquery()
            for s in states
        ]
        merged = scans[0] if len(scans) == 1 else union_all(*(select(*c.c) for c in scans)).subquery()
        query = ordered(select(*merged.c), merged.c.created_at, merged.c.id).limit(limit)
        return list(conn.execute(query).all())

    # --- a job's page ------------------------------------------------------------------------------

    def job_page(
        self,
        job_id: str | uuid.UUID,
        *,
        branch_state: str | None = None,
        after: int | None = None,
        before: int | None = None,
        limit: int = 100,
        timeline_rows: int = TIMELINE_ROWS,
    ) -> JobPageData:
        """The job, its branch counts per state, one page of its branches and its timeline."""
        check_limit(limit)
        if branch_state is not None and branch_state not in set(BranchState):
            raise InvalidArgument(
                f"no branch state {branch_state!r}; expected one of {', '.join(BranchState)}"
            )
        if after is not None and before is not None:
            raise InvalidArgument("page either after or before a branch, not both")
        jid = parse_job_id(job_id)
        with self.engine.connect() as conn:
            job = self._job(conn, jid)
            counts = self._counts(conn, jid)
            branches = self._branches(conn, jid, branch_state, after, before, limit)
            per_row = max(1, math.ceil(job.branch_total / timeline_rows))
            timeline = self._timeline(conn, jid, per_row)
        return JobPageData(job, counts, branches, timeline, per_row, utcnow())

    def progress(self, job_id: uuid.UUID) -> Progress:
        """The job's state and branch counter: one primary-key read, for the live stream."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(Job.state, Job.branch_done, Job.branch_total).where(Job.id == job_id)
            ).one_or_none()
        if row is None:
            raise JobNotFound(f"no job {job_id}")
        return Progress(row.state, row.branch_done, row.branch_total)

    @staticmethod
    def _job(conn: Connection, jid: uuid.UUID) -> JobDetail:
        result, result_length = _clip(Job.result, JOB_RESULT_CHARS)
        row = conn.execute(
            select(
                *_LIST_COLUMNS,
                Job.fan_in,
                Job.deadline_at,
                Job.min_success,
                Job.error,
                Job.run,
                Job.priority,
                result.label("result_text"),
                result_length.label("result_length"),
            ).where(Job.id == jid)
        ).one_or_none()
        if row is None:
            raise JobNotFound(f"no job {jid}")
        return JobDetail(
            id=row.id,
            name=row.name,
            state=row.state,
            fan_in=row.fan_in,
            branch_total=row.branch_total,
            branch_done=row.branch_done,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            deadline_at=row.deadline_at,
            min_success=row.min_success,
            error=row.error,
            result=_clipped(row.result_text, row.result_length),
            run=row.run,
            priority=row.priority,
        )

    @staticmethod
    def _counts(conn: Connection, jid: uuid.UUID) -> dict[str, int]:
        rows = conn.execute(
            select(Branch.state, func.count()).where(Branch.job_id == jid).group_by(Branch.state)
        ).all()
        return {state: n for state, n in rows}

    @staticmethod
    def _branches(
        conn: Connection,
        jid: uuid.UUID,
        state: str | None,
        after: int | None,
        before: int | None,
        limit: int,
    ) -> BranchPage:
        result, result_length = _clip(Branch.result, BRANCH_RESULT_CHARS)
        error, error_length = _clip(Branch.error, BRANCH_ERROR_CHARS)
        query = select(
            Branch.index,
            Branch.task,
            Branch.queue,
            Branch.state,
            Branch.attempts,
            Branch.celery_task_id,
            Branch.started_at,
            Branch.finished_at,
            Branch.late,
            result.label("result_text"),
            result_length.label("result_length"),
            error.label("error_text"),
            error_length.label("error_length"),
        ).where(Branch.job_id == jid)
        if state is not None:
            query = query.where(Branch.state == state)
        backwards = before is not None
        if after is not None:
            query = query.where(Branch.index > after)
        if before is not None:
            query = query.where(Branch.index < before)
        query = query.order_by(Branch.index.desc() if backwards else Branch.index).limit(limit + 1)
        rows = conn.execute(query).all()
        more = len(rows) > limit
        page = [_branch_row(r._mapping) for r in rows[:limit]]
        if backwards:
            page.reverse()
        if not page:
            return BranchPage((), None, None)
        next_after = page[-1].index if (more if not backwards else True) else None
        prev_before = page[0].index if (more if backwards else after is not None) else None
        return BranchPage(tuple(page), next_after, prev_before)

    @staticmethod
    def _timeline(conn: Connection, jid: uuid.UUID, size: int) -> tuple[Bucket, ...]:
        """Branches grouped into buckets of `size` consecutive indexes, each with the time span of every
        state in it: one GROUP BY over the job's branches, whatever their number."""
        # A literal, not a parameter: PostgreSQL must see the GROUP BY expression as the selected one.
        bucket = (Branch.index // literal_column(str(size), Integer)).label("bucket")
        found = conn.execute(
            select(
                bucket,
                Branch.state,
                func.count(),
                func.min(Branch.index),
                func.max(Branch.index),
                func.min(Branch.started_at),
                func.max(Branch.finished_at),
            )
            .where(Branch.job_id == jid)
            .group_by(bucket, Branch.state)
            .order_by(bucket)
        ).all()
        grouped: dict[int, tuple[int, int, list[Span]]] = {}
        for number, state, count, first, last, started, finished in found:
            low, high, spans = grouped.setdefault(int(number), (first, last, []))
            spans.append(Span(state, count, started, finished))
            grouped[int(number)] = (min(low, first), max(high, last), spans)
        return tuple(Bucket(low, high, tuple(spans)) for low, high, spans in grouped.values())
