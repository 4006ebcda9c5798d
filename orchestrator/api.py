"""Orchestrator: submit, get, wait, list -- the API a user's program calls."""

from __future__ import annotations

import functools
import json
import math
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from . import admission, breaker, database, registry
from .app import app_for
from .errors import (
    ArgumentsNotSerializable,
    InvalidArgument,
    InvalidJobSpec,
    JobAlreadyFinal,
    Overloaded,
    PublishError,
    WaitTimeout,
)
from .models import FINAL_JOB_STATES, RETRY_STATES, BranchState, JobState, utcnow
from .plan import plan, replan
from .publisher import Outgoing, Publisher
from .redrive import Redrive, history, redrive
from .registry import TaskKind, TaskSpec
from .rescue import chord_group
from .settings import Settings
from .store import NewBranch, NewJob, Store, parse_job_id
from .tasks import revoke
from .views import BranchView, BreakerView, HistoryView, JobView, history_view

_NAME_MAX = 200
_RETRYABLE = frozenset(RETRY_STATES) | {BranchState.SUCCEEDED.value, BranchState.CANCELLED.value}


@dataclass(frozen=True)
class BranchSpec:
    """One branch of a job: a catalog task name and its JSON arguments. Build it with `branch()`."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def branch(task: str, *args: Any, **kwargs: Any) -> BranchSpec:
    return BranchSpec(task=task, args=args, kwargs=kwargs)


def _positive(what: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidJobSpec(f"{what} must be a positive number of seconds, got {value!r}")
    return float(value)


#: How deep branch arguments may nest. Deeper JSON crashes consumers that recurse over it: the prefork
#: pool pickles a cpu branch's arguments for its child and fails from about 500 levels, taking the
#: worker down, and the message then kills the next worker. Real arguments are a few levels deep.
MAX_ARGUMENT_DEPTH = 64


def _too_deep(values: Iterable[object]) -> bool:
    """True when a list or dict in `values` nests deeper than MAX_ARGUMENT_DEPTH, found without
    recursion (a hostile value may be deeper than Python's stack)."""
    stack: list[tuple[object, int]] = [(v, 0) for v in values]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if level == MAX_ARGUMENT_DEPTH:
            return True
        stack.extend((child, level + 1) for child in children)
    return False


def _json_args(branches: Sequence[BranchSpec], max_bytes: int) -> list[tuple[list[Any], dict[str, Any]]]:
    """Arguments must survive a JSON round trip unchanged; tuples become lists, anything else is refused,
    and so is a branch whose arguments are more than `max_bytes` of JSON (they travel through the broker
    and SQL, and every reader of the job carries them). One round trip for the whole job (a wide job's
    submit is mostly this); a failure is then pinned on its branch by trying them one by one."""
    try:
        text = json.dumps([[list(b.args), b.kwargs] for b in branches], allow_nan=False)
    except (TypeError, ValueError):
        for i, b in enumerate(branches):
            try:
                json.dumps([list(b.args), b.kwargs], allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise ArgumentsNotSerializable(
                    f"branch {i} ({b.task}): arguments are not JSON-serializable: {exc}"
                ) from None
        raise  # unreachable: the whole failed, so one branch did
    if len(text) > max_bytes:  # else no branch can be over (ASCII: json.dumps escapes the rest)
        for i, b in enumerate(branches):
            size = len(json.dumps([list(b.args), b.kwargs], allow_nan=False))
            if size > max_bytes:
                raise InvalidJobSpec(
                    f"branch {i} ({b.task}): arguments are {size} bytes of JSON, more than "
                    f"ORCH_MAX_ARGS_BYTES ({max_bytes}); pass a reference (a URL, a key) instead"
                )
    return [(args, kwargs) for args, kwargs in json.loads(text)]


@functools.lru_cache(maxsize=4096)
def _arity_error(task: TaskSpec, positional: int, keywords: tuple[str, ...]) -> str | None:
    """Why `positional` arguments and these keywords do not fit the function, or None. Binding checks
    names and counts only, so it is cached by shape: a wide job of one task binds once."""
    if task.accepts_deadline and "deadline" in keywords:
        return "'deadline' is passed by the orchestrator, not by the job"
    try:
        task.signature.bind(*([None] * positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        return str(exc)
    return None


def _check_call(index: int, task: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> None:
    """The arguments must fit the function's signature: a typo (`secs=` for `seconds=`) is refused at
    submit, not discovered as a failed branch at run time."""
    error = _arity_error(task, len(args), tuple(sorted(kwargs)))
    if error is not None:
        raise InvalidJobSpec(f"branch {index} ({task.name}): {error}")


@dataclass(frozen=True)
class JobSpec:
    """A job to submit with `Orchestrator.submit_many`; the fields are `submit`'s arguments."""

    branches: Sequence[BranchSpec]
    fan_in: str
    name: str | None = None
    deadline: float | None = None
    min_success: int | None = None
    fan_in_timeout: float | None = None
    idempotency_key: str | None = None
    priority: int = 0


class _Drain:
    """How fast admitted work drained while a submit waited: the retry-after hint of Overloaded."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int]] = []

    def seen(self, active: int) -> None:
        self.samples.append((time.monotonic(), active))

    def retry_after(self, active: int, requested: int, limit: int) -> float:
        missing = max(active + requested - limit, 1)
        if len(self.samples) >= 2:
            (t0, a0), (t1, a1) = self.samples[0], self.samples[-1]
            if a1 < a0 and t1 > t0:
                return min(max(missing / ((a0 - a1) / (t1 - t0)), 0.1), 60.0)
        return 1.0


def _submitted(job: NewJob, created_at: datetime) -> JobView:
    """The view of a job as submitted, without reading back what was just written."""
    return JobView(
        id=str(job.id),
        name=job.name,
        state=JobState.RUNNING,
        fan_in=job.fan_in,
        branch_total=len(job.branches),
        branch_done=0,
        created_at=created_at,
        started_at=created_at,
        deadline_at=job.deadline_at,
        priority=job.priority,
        branches=tuple(
            BranchView(
                i, b.task, b.queue, {"args": b.args, "kwargs": b.kwargs}, celery_task_id=b.celery_task_id
            )
            for i, b in enumerate(job.branches)
        ),
    )


class Orchestrator:
    """Submits jobs and reads them back from SQL. Settings come from ORCH_* variables by default."""

    def __init__(self, settings: Settings | None = None, *, migrate: bool | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app_for(self.settings)
        breaker.configure(self.settings)  # breakers used in this process share this deployment's database
        database.configure(self.settings)  # connect as these settings say (pool sizes, a pooler)
        self.store = Store(self.settings.database_url)
        self.publisher = Publisher(self.app, self.settings)
        if migrate is None:
            migrate = self.settings.is_sqlite  # the embedded default sets itself up
        if migrate:
            database.upgrade(self.settings.database_url)
        else:
            database.require_schema(self.settings.database_url)

    # --- submit ------------------------------------------------------------------------------------

    def _branches(self, branches: Sequence[BranchSpec]) -> list[NewBranch]:
        if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence):
            raise InvalidJobSpec("branches must be a list of branch(...) specs")
        if not branches:
            raise InvalidJobSpec("a job needs at least one branch")
        tasks: list[TaskSpec] = []
        for i, spec in enumerate(branches):
            if not isinstance(spec, BranchSpec):
                raise InvalidJobSpec(f"branch {i} must be built with branch(task, ...), got {spec!r}")
            tasks.append(registry.lookup(spec.task, expect=[TaskKind.IO, TaskKind.CPU]))
            if _too_deep([*spec.args, *spec.kwargs.values()]):
                raise InvalidJobSpec(
                    f"branch {i} ({spec.task}): arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels"
                )
        new = []
        for i, (task, (args, kwargs)) in enumerate(
            zip(tasks, _json_args(branches, self.settings.max_args_bytes), strict=True)
        ):
            _check_call(i, task, args, kwargs)
            new.append(NewBranch(task.name, self.settings.queue_for(task.kind), args, kwargs))
        return new

    def _prepare(self, spec: JobSpec) -> tuple[NewJob, Outgoing]:
        """Check one job whole (nothing is written for a bad one) and plan its messages."""
        if spec.name is not None and (not isinstance(spec.name, str) or len(spec.name) > _NAME_MAX):
            raise InvalidJobSpec(f"name must be a string of at most {_NAME_MAX} characters")
        registry.lookup(spec.fan_in, expect=[TaskKind.AGGREGATOR])
        job = plan(
            self._branches(spec.branches),
            batch_queue=self.settings.io_queue,
            chunk_size=self.settings.io_chunk_size,
        )
        total = len(job.branches)
        deadline = None if spec.deadline is None else _positive("deadline", spec.deadline)
        min_success = spec.min_success
        if min_success is not None and (
            isinstance(min_success, bool) or not isinstance(min_success, int) or not 1 <= min_success <= total
        ):
            raise InvalidJobSpec(f"min_success must be an integer from 1 to {total}, got {min_success!r}")
        timeout = _positive(
            "fan_in_timeout",
            self.settings.fan_in_timeout if spec.fan_in_timeout is None else spec.fan_in_timeout,
        )
        key = spec.idempotency_key
        if key is not None and (not isinstance(key, str) or len(key) > _NAME_MAX):
            raise InvalidJobSpec(f"idempotency_key must be a string of at most {_NAME_MAX} characters")
        priority = spec.priority
        top = self.settings.max_priority
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= top:
            raise InvalidJobSpec(
                f"priority must be an integer from 0 to {top} (ORCH_MAX_PRIORITY), got {priority!r}"
                if top
                else "priorities are off (ORCH_MAX_PRIORITY=0): submit without priority"
            )
        deadline_at = None if deadline is None else utcnow() + timedelta(seconds=deadline)
        new = NewJob(
            uuid.uuid4(),
            spec.name,
            str(spec.fan_in),
            job.branches,
            key,
            deadline_at,
            min_success,
            timeout,
            priority,
        )
        return new, self.publisher.outgoing(str(new.id), job, timeout, deadline_at, priority)

    def submit(
        self,
        branches: Sequence[BranchSpec],
        fan_in: str,
        name: str | None = None,
        *,
        deadline: float | None = None,
        min_success: int | None = None,
        fan_in_timeout: float | None = None,
        idempotency_key: str | None = None,
        priority: int = 0,
        block: bool = True,
        block_timeout: float | None = None,
    ) -> JobView:
        """Validate the whole spec, record the job and its branches, then publish its messages.

        deadline: seconds from now; at the deadline the fan-in runs with what finished and the rest is
        timed_out. min_success: fewer succeeded branches fail the job without calling the aggregator.
        fan_in_timeout: the aggregator's soft time limit (default ORCH_FAN_IN_TIMEOUT).
        idempotency_key: a job already submitted with this key is returned instead of a new one.
        priority: 0 (the default, bulk) to ORCH_MAX_PRIORITY (9, most urgent): its messages, the fan-in's
        included, overtake queued ones of lower priority.
        block, block_timeout: when ORCH_MAX_ACTIVE_BRANCHES are admitted and unfinished, wait for room up
        to block_timeout seconds (default ORCH_BLOCK_TIMEOUT), then raise Overloaded; block=False raises
        at once.
        """
        spec = JobSpec(
            branches, fan_in, name, deadline, min_success, fan_in_timeout, idempotency_key, priority
        )
        (view,) = self.submit_many([spec], block=block, block_timeout=block_timeout)
        return view

    def submit_many(
        self, specs: Sequence[JobSpec], *, block: bool = True, block_timeout: float | None = None
    ) -> list[JobView]:
        """Submit many jobs at once: all are validated before anything is written (one bad spec raises
        and writes nothing), all are recorded in one transaction, then published through one broker
        connection. A job whose idempotency key names an existing job is not submitted again: that job
        is returned in its place. Returns the views in the order of `specs`. They are admitted together
        (see `submit` for block and block_timeout)."""
        registry.load(self.settings.imports)  # only submit needs the catalog: reads and cancel work on rows
        prepared = [self._prepare(spec) for spec in specs]
        if not prepared:
            return []
        outgoing = {new.id: out for new, out in prepared}
        # Recorded running: the messages follow the commit at once (a fan-in may even finish the job before
        # a later UPDATE could say it was published), and a publish that fails marks the job failed.
        created = self._admit(
            [new for new, _ in prepared], outgoing, block=block, block_timeout=block_timeout
        )
        fresh = [
            (new, at) for (new, _), (job_id, at) in zip(prepared, created, strict=True) if at is not None
        ]
        if fresh:
            self._publish([outgoing[new.id] for new, _ in fresh])
        views = {new.id: _submitted(new, at) for new, at in fresh}
        return [views.get(job_id) or self.store.get(job_id) for job_id, _ in created]

    def _admit(
        self,
        jobs: Sequence[NewJob],
        outgoing: dict[uuid.UUID, Outgoing],
        *,
        block: bool,
        block_timeout: float | None,
    ) -> list[tuple[uuid.UUID, datetime | None]]:
        """Record the jobs once the admission bound has room for their branches (see `admission`)."""
        limit = self.settings.max_active_branches
        requested = sum(len(j.branches) for j in jobs)
        if limit and requested > limit:
            raise InvalidJobSpec(
                f"{requested} branches can never be admitted at once: ORCH_MAX_ACTIVE_BRANCHES is {limit}; "
                "submit them in smaller jobs or batches"
            )
        timeout = self.settings.block_timeout if block_timeout is None else block_timeout
        started, pause, drain = time.monotonic(), 0.02, _Drain()
        while True:
            try:
                return self.store.create_jobs(
                    jobs, also=self.publisher.record(outgoing), running=True, limit=limit
                )
            except admission.Full as full:
                active = full.active
            drain.seen(active)
            while True:  # wait for room with a cheap read, not by inserting again
                waited = time.monotonic() - started
                if not block or waited >= timeout:
                    raise Overloaded(
                        active=active,
                        limit=limit,
                        requested=requested,
                        waited=waited,
                        retry_after=drain.retry_after(active, requested, limit),
                    )
                time.sleep(min(pause, max(timeout - waited, 0.0)))
                pause = min(pause * 2, 0.25)
                active = self.store.admitted()
                drain.seen(active)
                if active + requested <= limit:
                    break

    def _publish(self, jobs: Sequence[Outgoing]) -> None:
        """Send the recorded jobs. Those that could not be sent are marked failed with their branches
        cancelled, and PublishError names them."""
        try:
            self.publisher.send(jobs)
        except PublishError as exc:
            unsent = [uuid.UUID(o.job_id) for o in jobs[exc.published :]]
            self.store.mark_failed_to_publish(unsent, f"could not publish the job: {exc}")
            which = (
                f"job {unsent[0]} was" if len(unsent) == 1 else f"{len(unsent)} jobs (from {unsent[0]}) were"
            )
            raise PublishError(
                f"{which} recorded but could not be published: {exc}", published=exc.published
            ) from exc

    # --- redrive -----------------------------------------------------------------------------------

    def retry(
        self,
        job_id: str,
        states: Sequence[str] = RETRY_STATES,
        *,
        deadline: float | None = None,
    ) -> JobView:
        """Run again the branches of a final job that ended in `states` (by default failed, timed_out and
        short_circuited); the others keep their outcomes, and the fan-in runs again over all of them.
        The job's earlier run and the branches' earlier outcomes are kept (`history`); the job's state,
        result and `run` are the latest run's. deadline: seconds from now for the new run (none by
        default: the old deadline has passed). Raises JobNotFinal for a job still running or retried by
        another caller first (of concurrent retries one wins), NothingToRetry when no branch is in
        `states`, Overloaded when ORCH_MAX_ACTIVE_BRANCHES has no room for the job."""
        uid = parse_job_id(job_id)
        chosen_states = tuple(dict.fromkeys(states)) if not isinstance(states, str) else (states,)
        bad = [s for s in chosen_states if s not in _RETRYABLE]
        if bad or not chosen_states:
            raise InvalidArgument(
                f"retry states must be among {', '.join(sorted(_RETRYABLE))}, got {list(chosen_states)!r}"
            )
        span = None if deadline is None else _positive("deadline", deadline)

        def prepare(job: Any, chosen: dict[int, NewBranch]) -> Redrive:
            again = replan(chosen, batch_queue=self.settings.io_queue, chunk_size=self.settings.io_chunk_size)
            deadline_at = None if span is None else utcnow() + timedelta(seconds=span)
            outgoing = self.publisher.outgoing(
                str(uid),
                again,
                job.fan_in_timeout or self.settings.fan_in_timeout,
                deadline_at,
                job.priority,
                group_id=chord_group(uid, job.run + 1),
            )
            task_ids = {i: m.task_id for m in again.messages for i in m.indexes}
            return Redrive(task_ids, deadline_at, self.publisher.record_run(outgoing), outgoing)

        limit = self.settings.max_active_branches
        try:
            redriven = redrive(self.store, uid, chosen_states, prepare, limit=limit)
        except admission.Full as full:
            raise Overloaded(
                active=full.active, limit=limit, requested=full.requested, waited=0.0, retry_after=1.0
            ) from None
        self._publish([redriven.outgoing])
        return self.store.get(uid)

    def history(self, job_id: str) -> HistoryView:
        """A job's earlier runs and its branches' earlier outcomes, oldest first (see `retry`)."""
        self.store.state(job_id)  # JobNotFound for an unknown job
        runs, branches = history(self.store, job_id)
        return history_view(str(parse_job_id(job_id)), runs, branches)

    def cancel(self, job_id: str) -> JobView:
        """Cancel a pending or running job: unfinished branches become cancelled and are revoked (running
        cpu branches terminated); the fan-in does not run. A final job raises JobAlreadyFinal."""
        uid = parse_job_id(job_id)
        stopped = self.store.cancel(uid)
        if stopped is None:
            state = self.store.state(uid)
            raise JobAlreadyFinal(f"job {job_id} is already {state}; nothing was cancelled")
        revoke(self.app, self.settings.cpu_queue, stopped, terminate_cpu=True)
        return self.store.get(uid)

    # --- circuit breakers ---------------------------------------------------------------------------

    def breakers(self) -> list[BreakerView]:
        """Every circuit breaker in the database, as all processes see it."""
        return breaker.list_views(self.settings.database_url)

    def reset_breaker(self, name: str) -> BreakerView:
        """Close a breaker now (raises BreakerNotFound for an unknown name)."""
        return breaker.reset(self.settings.database_url, name)

    # --- reads -------------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobView:
        return self.store.get(job_id)

    def list(self, state: str | None = None, limit: int = 50) -> list[JobView]:
        return self.store.list(state=state, limit=limit)

    def wait(self, job_id: str, timeout: float = 60.0, poll: float = 0.01) -> JobView:
        """Block until the job is final. The SQL row is the truth. On PostgreSQL every final move is
        NOTIFYed, so this sleeps until it is announced (re-reading the row every second all the same);
        elsewhere, or past Store.LISTENERS concurrent waits, it polls the row by primary key every `poll`
        seconds for 10 s, then every 0.2 s."""
        uid = parse_job_id(job_id)
        started = time.monotonic()
        with self.store.final_notifications(uid) as notified:
            announced = False
            while True:
                if announced:  # a final move was announced: read the job at once
                    view = self.store.get(uid)
                    if view.state in FINAL_JOB_STATES:
                        return view
                state = self.store.state(uid)
                if state in FINAL_JOB_STATES:
                    return self.store.get(uid)
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise WaitTimeout(str(job_id), timeout, state)
                if notified is not None:
                    announced = notified(min(1.0, timeout - waited))
                else:
                    time.sleep(min(poll if waited < 10 else 0.2, timeout - waited))
