"""Orchestrator: submit, get, wait, list -- the API a user's program calls."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from celery import chord, group

from . import breaker, database, registry
from .app import app_for
from .errors import ArgumentsNotSerializable, InvalidJobSpec, JobAlreadyFinal, PublishError, WaitTimeout
from .models import FINAL_JOB_STATES, JobState, utcnow
from .plan import JobPlan, plan
from .registry import TaskKind, TaskSpec
from .settings import Settings
from .store import NewBranch, Store, parse_job_id
from .tasks import DEADLINE, FAN_IN, revoke
from .views import BranchView, BreakerView, JobView

_NAME_MAX = 200


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


def _json_args(index: int, spec: BranchSpec) -> tuple[list[Any], dict[str, Any]]:
    """Arguments must survive a JSON round trip unchanged; tuples become lists, anything else is refused."""
    where = f"branch {index} ({spec.task})"
    if _too_deep([*spec.args, *spec.kwargs.values()]):
        raise InvalidJobSpec(f"{where}: arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels")
    try:
        text = json.dumps([list(spec.args), spec.kwargs], allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ArgumentsNotSerializable(f"{where}: arguments are not JSON-serializable: {exc}") from None
    args, kwargs = json.loads(text)
    return args, kwargs


def _check_call(index: int, task: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> None:
    """The arguments must fit the function's signature: a typo (`secs=` for `seconds=`) is refused at
    submit, not discovered as a failed branch at run time. `deadline` is the orchestrator's to pass."""
    where = f"branch {index} ({task.name})"
    if task.accepts_deadline and "deadline" in kwargs:
        raise InvalidJobSpec(f"{where}: 'deadline' is passed by the orchestrator, not by the job")
    try:
        task.signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidJobSpec(f"{where}: {exc}") from None


class Orchestrator:
    """Submits jobs and reads them back from SQL. Settings come from ORCH_* variables by default."""

    def __init__(self, settings: Settings | None = None, *, migrate: bool | None = None) -> None:
        self.settings = settings or Settings.from_env()
        self.app = app_for(self.settings)
        breaker.configure(self.settings)  # breakers used in this process share this deployment's database
        self.store = Store(self.settings.database_url)
        if migrate is None:
            migrate = self.settings.is_sqlite  # the embedded default sets itself up
        if migrate:
            database.upgrade(self.settings.database_url)
        else:
            database.require_schema(self.settings.database_url)

    # --- submit ------------------------------------------------------------------------------------

    def _validate(self, branches: Sequence[BranchSpec], fan_in: object, name: str | None) -> list[NewBranch]:
        registry.load(self.settings.imports)  # only submit needs the catalog: reads and cancel work on rows
        if isinstance(branches, (str, bytes)) or not isinstance(branches, Sequence):
            raise InvalidJobSpec("branches must be a list of branch(...) specs")
        if not branches:
            raise InvalidJobSpec("a job needs at least one branch")
        if name is not None and (not isinstance(name, str) or len(name) > _NAME_MAX):
            raise InvalidJobSpec(f"name must be a string of at most {_NAME_MAX} characters")
        registry.lookup(fan_in, expect=[TaskKind.AGGREGATOR])
        new: list[NewBranch] = []
        for i, spec in enumerate(branches):
            if not isinstance(spec, BranchSpec):
                raise InvalidJobSpec(f"branch {i} must be built with branch(task, ...), got {spec!r}")
            task = registry.lookup(spec.task, expect=[TaskKind.IO, TaskKind.CPU])
            args, kwargs = _json_args(i, spec)
            _check_call(i, task, args, kwargs)
            queue = self.settings.queue_for(task.kind)
            new.append(NewBranch(task.name, queue, args, kwargs))
        return new

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
    ) -> JobView:
        """Validate the whole spec, record the job and its branches, then publish one Celery chord.

        deadline: seconds from now; at the deadline the fan-in runs with what finished and the rest is
        timed_out. min_success: fewer succeeded branches fail the job without calling the aggregator.
        fan_in_timeout: the aggregator's soft time limit (default ORCH_FAN_IN_TIMEOUT).
        """
        job = plan(
            self._validate(branches, fan_in, name),
            batch_queue=self.settings.io_queue,
            chunk_size=self.settings.io_chunk_size,
        )
        new = job.branches
        if deadline is not None:
            deadline = _positive("deadline", deadline)
        if min_success is not None and (
            isinstance(min_success, bool)
            or not isinstance(min_success, int)
            or not 1 <= min_success <= len(new)
        ):
            raise InvalidJobSpec(f"min_success must be an integer from 1 to {len(new)}, got {min_success!r}")
        timeout = _positive(
            "fan_in_timeout", self.settings.fan_in_timeout if fan_in_timeout is None else fan_in_timeout
        )
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or len(idempotency_key) > _NAME_MAX
        ):
            raise InvalidJobSpec(f"idempotency_key must be a string of at most {_NAME_MAX} characters")
        deadline_at = None if deadline is None else utcnow() + timedelta(seconds=deadline)
        job_id, created_at = self.store.create_job(
            name=name,
            fan_in=str(fan_in),
            branches=new,
            idempotency_key=idempotency_key,
            deadline_at=deadline_at,
            min_success=min_success,
            fan_in_timeout=timeout,
        )
        if created_at is None:  # the idempotency key named an existing job
            return self.store.get(job_id)
        started_at = self._publish(str(job_id), job, timeout, deadline_at)
        # The view as submitted, without reading back what was just written.
        return JobView(
            id=str(job_id),
            name=name,
            state=JobState.RUNNING,
            fan_in=str(fan_in),
            branch_total=len(new),
            branch_done=0,
            created_at=created_at,
            started_at=started_at,
            deadline_at=deadline_at,
            branches=tuple(
                BranchView(
                    i, b.task, b.queue, {"args": b.args, "kwargs": b.kwargs}, celery_task_id=b.celery_task_id
                )
                for i, b in enumerate(new)
            ),
        )

    def _publish(
        self, job_id: str, job: JobPlan, fan_in_timeout: float, deadline_at: datetime | None
    ) -> datetime:
        """Send the deadline watchdog (if any) and the chord; returns when the job was marked running."""
        at = None if deadline_at is None else deadline_at.timestamp()
        cpu_limit = None if at is None else max(at - time.time(), 0.001)
        header = group(
            self.app.signature(
                m.task,
                args=m.args(job_id, job.branches, at),
                queue=m.queue,
                task_id=m.task_id,
                # prefork honours soft limits; a cpu branch also arms one at exactly the time left.
                **({} if m.batch else {"soft_time_limit": cpu_limit}),
            )
            for m in job.messages
        )
        limits = {"soft_time_limit": fan_in_timeout, "time_limit": fan_in_timeout + 10}
        body = self.app.signature(FAN_IN, args=(job_id,), queue=self.settings.fanin_queue, **limits)
        uid = parse_job_id(job_id)
        try:
            if deadline_at is not None:
                # Before the chord: if this cannot be sent, nothing is. It survives worker restarts
                # because an ETA message is only acked when it has run.
                self.app.signature(
                    DEADLINE, args=(job_id,), queue=self.settings.fanin_queue, **limits
                ).apply_async(eta=deadline_at)
            chord(header, body).apply_async()
        except Exception as exc:
            self.store.mark_failed_to_publish(uid, f"could not publish the job: {exc}")
            raise PublishError(f"job {job_id} was recorded but could not be published: {exc}") from exc
        return self.store.mark_published(uid)

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
