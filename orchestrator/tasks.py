"""The orchestrator's own Celery tasks: the branch runner every catalog task is wrapped in, the fan-in
(the chord body) and the deadline watchdog.

Branches never raise into the chord: a failure is an outcome written to SQL, so the chord always
completes. The fan-in and the watchdog race for the job with one conditional UPDATE; the loser does
nothing, so a job is aggregated once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded

from .breaker import get_breaker
from .celery_app import app, settings
from .deadline import Deadline
from .errors import CircuitOpen, DeadlineExceeded
from .models import BranchState, JobState
from .registry import TaskKind, TaskSpec, lookup
from .store import FanInClaim, StoppedBranch, Store

logger = logging.getLogger(__name__)
_store: Store | None = None
_BACKOFF_CAP = 60.0


def store() -> Store:
    global _store
    if _store is None:
        _store = Store(settings.database_url)
    return _store


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_or_error(value: Any) -> str | None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"result is not JSON-serializable: {exc}"
    return None


def backoff_delay(spec: TaskSpec, attempt: int) -> float:
    """Exponential backoff with full jitter. Celery's get_exponential_backoff_interval works in whole
    seconds only, which is too coarse for sub-second io retries."""
    return random.uniform(0, min(_BACKOFF_CAP, spec.backoff * 2 ** (attempt - 1)))


def _raise_soft_limit(signum: int, frame: Any) -> None:
    raise SoftTimeLimitExceeded("the job's deadline passed")


@contextlib.contextmanager
def cpu_budget(spec: TaskSpec, budget: Deadline) -> Iterator[None]:
    """In a prefork child, a soft limit at exactly the time left: the message's soft_time_limit was
    computed at submit and does not know how long the branch waited in the queue."""
    remaining = budget.remaining()
    usable = spec.kind is TaskKind.CPU and threading.current_thread() is threading.main_thread()
    if remaining is None or not usable:
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_soft_limit)
    signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_branch(
    task: Task,
    spec: TaskSpec,
    job_id: str,
    index: int,
    args: list[Any],
    kwargs: dict[str, Any],
    deadline_at: float | None,
) -> dict[str, Any]:
    jid = uuid.UUID(job_id)
    attempt = store().start_branch(jid, index)
    if attempt is None:
        return {"index": index, "skipped": "outcome already recorded"}
    budget = Deadline(deadline_at)
    if budget.expired():
        store().finish_branch(
            jid, index, BranchState.TIMED_OUT, None, "the job's deadline passed before it started"
        )
        return {"index": index, "state": BranchState.TIMED_OUT.value}
    call_kwargs = {**kwargs, "deadline": budget} if spec.accepts_deadline else kwargs
    breaker = get_breaker(spec.breaker) if spec.breaker else None
    probe: str | None = None
    if breaker is not None:
        try:
            probe = breaker.acquire()
        except CircuitOpen as exc:  # refused before the backend is called: the slot is freed at once
            store().finish_branch(jid, index, BranchState.SHORT_CIRCUITED, None, str(exc))
            return {"index": index, "state": BranchState.SHORT_CIRCUITED.value}
    result: Any = None
    error: str | None = None
    try:
        with cpu_budget(spec, budget):
            result = spec.fn(*args, **call_kwargs)
        if breaker is not None:
            breaker.success(probe)
        error = _json_or_error(result)
        state = BranchState.FAILED if error else BranchState.SUCCEEDED
        if error:
            result = None
    except (SoftTimeLimitExceeded, DeadlineExceeded) as exc:
        if breaker is not None:
            breaker.failure(probe)  # a backend too slow for the budget is failing
        state, error = BranchState.TIMED_OUT, f"the branch ran out of time ({describe(exc)})"
    except Exception as exc:
        if breaker is not None:
            if isinstance(exc, breaker.exclude):
                breaker.success(probe)
            else:
                breaker.failure(probe)
        if attempt <= spec.retries:
            delay = backoff_delay(spec, attempt)
            left = budget.remaining()
            if left is None or delay < left:
                logger.info("branch %s[%d] attempt %d failed, retry in %.3fs: %s", job_id, index, attempt,
                            delay, describe(exc))  # fmt: skip
                raise task.retry(countdown=delay, max_retries=spec.retries, exc=exc) from exc
        state, error = BranchState.FAILED, describe(exc)
        logger.info("branch %s[%d] %s failed: %s", job_id, index, spec.name, error)
    store().finish_branch(jid, index, state, result, error)
    return {"index": index, "state": state.value}


def register_branch_task(spec: TaskSpec) -> None:
    """Register `spec` as a Celery task named like the catalog function, routed by its kind."""

    def runner(
        self: Task,
        job_id: str,
        index: int,
        args: list[Any],
        kwargs: dict[str, Any],
        deadline_at: float | None = None,
    ) -> dict[str, Any]:
        return run_branch(self, spec, job_id, index, args, kwargs, deadline_at)

    runner.__name__ = spec.fn.__name__
    runner.__doc__ = spec.fn.__doc__
    app.task(name=spec.name, bind=True, queue=settings.queue_for(spec.kind), typing=False, shared=False)(
        runner
    )


def aggregate(job_id: uuid.UUID, claim: FanInClaim) -> JobState:
    """Run the job's aggregator on the recorded outcomes and finalize the job (once: it is claimed)."""
    outcomes = store().outcomes(job_id)
    succeeded = sum(1 for o in outcomes if o.ok)
    result: Any = None
    error: str | None = None
    if claim.min_success is not None and succeeded < claim.min_success:
        state = JobState.FAILED
        error = f"only {succeeded} of {len(outcomes)} branches succeeded; min_success is {claim.min_success}"
    else:
        try:
            spec = lookup(claim.fan_in, expect=[TaskKind.AGGREGATOR])
            result = spec.fn(outcomes)
            error = _json_or_error(result)
            if error:
                state, result = JobState.FAILED, None
            else:
                state = JobState.SUCCEEDED if succeeded == len(outcomes) else JobState.PARTIAL
        except SoftTimeLimitExceeded:
            state = JobState.FAILED
            limit = f" of {claim.fan_in_timeout:g}s" if claim.fan_in_timeout else ""
            error = f"fan-in {claim.fan_in} exceeded its soft time limit{limit}"
        except Exception as exc:
            state, error = JobState.FAILED, f"fan-in {claim.fan_in} raised {describe(exc)}"
    store().finalize(job_id, state, result, error)
    return state


def revoke(celery: Celery, cpu_queue: str, stopped: Sequence[StoppedBranch], *, terminate_cpu: bool) -> None:
    """Revoke stopped branches' messages, so queued ones never start; with `terminate_cpu`, running cpu
    branches are terminated too (a thread running an io branch cannot be stopped from outside)."""
    terminate = {
        b.celery_task_id
        for b in stopped
        if terminate_cpu and b.was_running and b.queue == cpu_queue and b.celery_task_id
    }
    queued = [b.celery_task_id for b in stopped if b.celery_task_id and b.celery_task_id not in terminate]
    if queued:
        celery.control.revoke(queued)
    if terminate:
        celery.control.revoke(sorted(terminate), terminate=True, signal="SIGTERM")


@app.task(name="orchestrator.fan_in", bind=True, typing=False)
def fan_in(self: Task, _header: Any, job_id: str) -> dict[str, Any]:
    """The chord body: aggregate the outcomes recorded in SQL (the header's return values are ignored)."""
    jid = uuid.UUID(job_id)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    claim = store().claim_fan_in(jid, redelivered=redelivered)
    if claim is None:
        return {"job": job_id, "skipped": "job is not running"}
    return {"job": job_id, "state": aggregate(jid, claim).value}


@app.task(name="orchestrator.deadline", bind=True, typing=False)
def deadline(self: Task, job_id: str) -> dict[str, Any]:
    """Published with an ETA at the job's deadline: time out what is unfinished and run the fan-in now."""
    jid = uuid.UUID(job_id)
    expired = store().expire(jid)
    if expired is None:
        return {"job": job_id, "skipped": "job already final"}
    claim, stopped = expired
    try:
        # Only queued branches: a running io thread cannot be stopped from outside, a running cpu branch
        # already has its own soft limit at the deadline, and each revoke is a broadcast to every worker.
        revoke(app, settings.cpu_queue, [b for b in stopped if not b.was_running], terminate_cpu=False)
    except Exception:  # an optimisation only: a timed-out branch refuses to start anyway
        logger.exception("job %s: revoking timed-out branches failed", job_id)
    logger.info("job %s: deadline passed, %d branches timed out", job_id, len(stopped))
    return {"job": job_id, "state": aggregate(jid, claim).value, "timed_out": len(stopped)}
