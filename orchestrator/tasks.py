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
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from celery import Celery, Task, signals
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import InterfaceError, OperationalError

from .backend import PartCounter, SQLBackend
from .breaker import get_breaker
from .celery_app import app, settings
from .deadline import Deadline
from .errors import CircuitOpen, DeadlineExceeded
from .models import BranchState, JobState
from .registry import TaskKind, TaskSpec, lookup
from .store import FanInClaim, Finished, SentAs, StoppedBranch, Store

logger = logging.getLogger(__name__)
_store: Store | None = None
_BACKOFF_CAP = 60.0
#: A branch task whose SQL fails (the database restarting, a connection dropped) is retried by Celery
#: with backoff; the branch function's own errors are outcomes and never reach this.
RETRY_ON_DATABASE_ERRORS: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 0.5,
    "retry_backoff_max": 30,
    "max_retries": 8,
}
#: How long an io batch may hold a finished outcome to write it with its siblings': the branches of a
#: batch tend to finish together, and one statement for all of them beats one for each.
CHUNK_FLUSH_SECONDS = 0.02


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


@dataclass(frozen=True)
class Outcome:
    state: BranchState
    result: Any = None
    error: str | None = None
    retry_in: float | None = None  # a failure that may be retried after this many seconds

    def finished(self, index: int, attempt: int) -> Finished:
        return Finished(index, attempt, self.state, self.result, self.error)


def execute(
    spec: TaskSpec, args: list[Any], kwargs: dict[str, Any], budget: Deadline, attempt: int
) -> Outcome:
    """Run one attempt of a branch function: its deadline, its breaker, its retry policy. No SQL here,
    so a single branch task and an io chunk share it."""
    if budget.expired():
        return Outcome(BranchState.TIMED_OUT, error="the job's deadline passed before it started")
    call_kwargs = {**kwargs, "deadline": budget} if spec.accepts_deadline else kwargs
    breaker = get_breaker(spec.breaker) if spec.breaker else None
    probe: str | None = None
    if breaker is not None:
        try:
            probe = breaker.acquire()
        except CircuitOpen as exc:  # refused before the backend is called: the slot is freed at once
            return Outcome(BranchState.SHORT_CIRCUITED, error=str(exc))
    try:
        with cpu_budget(spec, budget):
            result = spec.fn(*args, **call_kwargs)
    except (SoftTimeLimitExceeded, DeadlineExceeded) as exc:
        if breaker is not None:
            breaker.failure(probe)  # a backend too slow for the budget is failing
        return Outcome(BranchState.TIMED_OUT, error=f"the branch ran out of time ({describe(exc)})")
    except Exception as exc:
        if breaker is not None:
            (breaker.success if isinstance(exc, breaker.exclude) else breaker.failure)(probe)
        retry_in = None
        if attempt <= spec.retries:
            delay = backoff_delay(spec, attempt)
            left = budget.remaining()
            if left is None or delay < left:
                retry_in = delay
        return Outcome(BranchState.FAILED, error=describe(exc), retry_in=retry_in)
    if breaker is not None:
        breaker.success(probe)
    error = _json_or_error(result)
    if error:
        return Outcome(BranchState.FAILED, error=error)
    return Outcome(BranchState.SUCCEEDED, result=result)


_SKIPPED = "no runnable branch for this message (outcome already recorded, or not the message it was sent as)"


def _sent_as(task: Task) -> SentAs:
    """A branch may only be moved by the message it was published as (see Store's _SENT_FOR)."""
    return SentAs(task_id=str(task.request.id), task=str(task.name))


def _part_counter(task: Task) -> PartCounter | None:
    """When the result backend is ours, the branch's chord count commits with its outcome."""
    backend = task.backend
    return backend.part_counter(task.request) if isinstance(backend, SQLBackend) else None


def run_branch(
    task: Task,
    spec: TaskSpec,
    job_id: str,
    index: int,
    args: list[Any],
    kwargs: dict[str, Any],
    deadline_at: float | None,
) -> dict[str, Any]:
    """One cpu branch, one message: its retries go back through the broker (the prefork child is freed)."""
    jid = uuid.UUID(job_id)
    sent = _sent_as(task)
    attempt = store().start_branch(jid, index, sent)
    if attempt is None:
        return {"index": index, "skipped": _SKIPPED}
    outcome = execute(spec, args, kwargs, Deadline(deadline_at), attempt)
    if outcome.retry_in is not None:
        logger.info("branch %s[%d] attempt %d failed, retry in %.3fs: %s", job_id, index, attempt,
                    outcome.retry_in, outcome.error)  # fmt: skip
        raise task.retry(countdown=outcome.retry_in, max_retries=spec.retries)
    _log_outcome(job_id, index, spec, outcome)
    counter = _part_counter(task)
    store().finish_branch(jid, sent, outcome.finished(index, attempt), also=counter)
    if counter is not None:
        counter.committed()
    return {"index": index, "state": outcome.state.value}


def _log_outcome(job_id: str, index: int, spec: TaskSpec, outcome: Outcome) -> None:
    if outcome.state is not BranchState.SUCCEEDED:
        logger.info("branch %s[%d] %s %s: %s", job_id, index, spec.name, outcome.state, outcome.error)


_executor: ThreadPoolExecutor | None = None
_running: threading.BoundedSemaphore | None = None  # one slot per io branch running in this worker
_executor_lock = threading.Lock()
#: The io worker's pool size (`-c`, default ORCH_IO_CONCURRENCY), learnt when the worker starts.
_pool_size: int | None = None


@signals.worker_init.connect
def _learn_pool_size(sender: Any = None, **_: Any) -> None:
    global _pool_size
    size = getattr(sender, "concurrency", None)
    _pool_size = size if isinstance(size, int) and size > 0 else None


def branch_executor() -> tuple[ThreadPoolExecutor, threading.BoundedSemaphore]:
    """The io worker's threads for the branches of its batches, shared by every batch so threads are
    reused, and the slots that bound them. The pool size (ORCH_IO_CONCURRENCY, or `-c`) is how many io
    branches one worker runs at once, whatever the batches, so a user can set it to protect a backend:
    a batch message holds a pool slot while its branches wait for a running slot."""
    global _executor, _running
    with _executor_lock:
        if _executor is None or _running is None:
            size = _pool_size or settings.io_concurrency
            _executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="branch")
            _running = threading.BoundedSemaphore(size)
        return _executor, _running


def _forget_executor_after_fork() -> None:
    global _executor, _running
    _executor = _running = None


os.register_at_fork(after_in_child=_forget_executor_after_fork)


def run_io_batch(
    task: Task, spec: TaskSpec, job_id: str, branches: list[list[Any]], deadline_at: float | None
) -> dict[str, Any]:
    """io branches of one job and one catalog task, in one message, run concurrently in this worker.

    A fan-out is bound by messages and transactions, not by waiting: this is one message, one start
    statement and a few outcome statements for the batch. Retries stay in the batch (its siblings are
    still running here). Outcomes are written as branches finish, batched over a short window, so a
    straggler never holds its siblings' outcomes back; the last write also counts the chord part."""
    jid = uuid.UUID(job_id)
    sent = _sent_as(task)
    attempts = store().start_branches(jid, [b[0] for b in branches], sent)
    todo = [b for b in branches if b[0] in attempts]
    if not todo:
        return {"job": job_id, "branches": 0, "skipped": len(branches)}
    budget = Deadline(deadline_at)

    executor, running = branch_executor()

    def run(branch: list[Any]) -> Finished:
        index, args, kwargs = branch
        attempt = attempts[index]
        while True:
            with running:  # not held across a retry's backoff
                outcome = execute(spec, args, kwargs, budget, attempt)
            if outcome.retry_in is None:
                _log_outcome(job_id, index, spec, outcome)
                return outcome.finished(index, attempt)
            time.sleep(outcome.retry_in)
            attempt += 1

    counter = _part_counter(task)
    if len(todo) == 1:  # no hand-over to another thread for a batch of one
        store().finish_branches(jid, sent, [run(todo[0])], also=counter)
    else:
        buffer: list[Finished] = []
        flush_by: float | None = None  # when the oldest buffered outcome has waited long enough
        pending = {executor.submit(run, b) for b in todo}
        while pending:
            timeout = None if flush_by is None else max(flush_by - time.monotonic(), 0.0)
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            buffer.extend(future.result() for future in done)
            if buffer and flush_by is None:
                flush_by = time.monotonic() + CHUNK_FLUSH_SECONDS
            if buffer and (not pending or time.monotonic() >= (flush_by or 0.0)):
                store().finish_branches(jid, sent, buffer, also=None if pending else counter)
                buffer, flush_by = [], None
    if counter is not None:
        counter.committed()
    return {"job": job_id, "branches": len(todo), "skipped": len(branches) - len(todo)}


def register_branch_task(spec: TaskSpec) -> None:
    """Register `spec` as a Celery task named like the catalog function, routed by its kind.

    A cpu task's message is one branch: (job_id, index, args, kwargs, deadline_at). An io task's message
    is a batch of the job's branches of that task: (job_id, [[index, args, kwargs], ...], deadline_at).
    Either way Flower shows the catalog name, the job id and the branch indexes."""
    if spec.kind is TaskKind.IO:

        def io_runner(
            self: Task, job_id: str, branches: list[list[Any]], deadline_at: float | None = None
        ) -> dict[str, Any]:
            return run_io_batch(self, spec, job_id, branches, deadline_at)

        runner: Callable[..., dict[str, Any]] = io_runner
    else:

        def cpu_runner(
            self: Task,
            job_id: str,
            index: int,
            args: list[Any],
            kwargs: dict[str, Any],
            deadline_at: float | None = None,
        ) -> dict[str, Any]:
            return run_branch(self, spec, job_id, index, args, kwargs, deadline_at)

        runner = cpu_runner
    runner.__name__ = spec.fn.__name__
    runner.__doc__ = spec.fn.__doc__
    # ignore_result: outcomes live in the branches table and the fan-in reads them there; the chord still
    # counts the task (SQLBackend.bodies_without_header_results skips the header join).
    options = {
        "queue": settings.queue_for(spec.kind),
        "typing": False,
        "shared": False,
        "ignore_result": True,
    }
    app.task(name=spec.name, bind=True, **options, **RETRY_ON_DATABASE_ERRORS)(runner)


def aggregate(job_id: uuid.UUID, claim: FanInClaim) -> JobState:
    """Run the job's aggregator on the recorded outcomes and finalize the job (once: it is claimed)."""
    outcomes = list(claim.outcomes)
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


# ignore_result: the job row holds the aggregate; storing the task's own return would be one more write.
@app.task(name="orchestrator.fan_in", bind=True, typing=False, ignore_result=True)
def fan_in(self: Task, _header: Any, job_id: str) -> dict[str, Any]:
    """The chord body: aggregate the outcomes recorded in SQL (the header's return values are ignored)."""
    jid = uuid.UUID(job_id)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    claim = store().claim_fan_in(jid, redelivered=redelivered)
    if claim is None:
        return {"job": job_id, "skipped": "job is not running"}
    return {"job": job_id, "state": aggregate(jid, claim).value}


@app.task(name="orchestrator.deadline", bind=True, typing=False, ignore_result=True)
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
