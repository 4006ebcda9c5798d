"""Celery glue: the orchestrator's tasks on one app. The runner every catalog branch task is wrapped in,
the fan-in (the chord body) and the deadline watchdog turn messages into calls of `policy`, `batches`
and `store`, and outcomes back into acks and retries; nothing else happens here.

Branches never raise into the chord: a failure is an outcome written to SQL, so the chord always
completes. The fan-in and the watchdog race for the job with one conditional UPDATE; the loser does
nothing, so a job is aggregated once.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from billiard.einfo import ExceptionWithTraceback
from billiard.exceptions import WorkerLostError
from celery import Celery, Task, signals
from celery.worker.request import Request
from sqlalchemy.exc import InterfaceError, OperationalError

from .backend import PartCounter, SQLBackend
from .batches import EngineSlot, log_outcome
from .deadline import Deadline
from .models import JobState
from .policy import aggregate, execute
from .registry import TaskKind, TaskSpec, catalog
from .runners import Runner
from .settings import Settings
from .store import FanInClaim, Finished, SentAs, StoppedBranch, Store

logger = logging.getLogger(__name__)

FAN_IN = "orchestrator.fan_in"
DEADLINE = "orchestrator.deadline"
#: Chord bodies that read their inputs from SQL: their header tasks ignore results, and the result
#: backend passes them an empty list instead of joining (SQLBackend reads this from the app's conf).
BODIES_WITHOUT_HEADER_RESULTS = (FAN_IN,)

#: A branch task whose SQL fails (the database restarting, a connection dropped) is retried by Celery
#: with backoff; the branch function's own errors are outcomes and never reach this.
RETRY_ON_DATABASE_ERRORS: dict[str, Any] = {
    "autoretry_for": (OperationalError, InterfaceError),
    "retry_backoff": 0.5,
    "retry_backoff_max": 30,
    "max_retries": 8,
}
_SKIPPED = "no runnable branch for this message (outcome already recorded, or not the message it was sent as)"


@dataclass
class Runtime:
    """What one app's tasks need at run time, made from its Settings once."""

    settings: Settings
    store: Store
    engine: EngineSlot
    pool_size: int | None = None  # the worker's pool size (`-c`), learnt when the worker starts
    # This worker process (`runners.Runner`, as text), named when the worker starts: a prefork child
    # inherits its parent's, whose heartbeat covers the child's work. None outside a worker.
    runner: str | None = None
    request_class: type[Request] = Request


def _sent_as(runtime: Runtime, task: Task) -> SentAs:
    """A branch may only be moved by the message it was published as, and finished by its runner."""
    retried = bool(task.request.retries)
    return SentAs(task_id=str(task.request.id), task=str(task.name), runner=runtime.runner, retried=retried)


def _part_counter(task: Task) -> PartCounter | None:
    """When the result backend is ours, the branch's chord count commits with its outcome."""
    backend = task.backend
    return backend.part_counter(task.request) if isinstance(backend, SQLBackend) else None


def _settle(runtime: Runtime, counter: PartCounter | None, jid: uuid.UUID, indexes: Sequence[int]) -> None:
    """After a delivery: hand the part its outcome transaction counted to the chord step, or, when it
    counted nothing and some of its message's branches are still active elsewhere, keep the chord step
    from counting it (one read, on that path only)."""
    if counter is None:
        return
    if counter.part is not None:
        counter.committed()
    elif runtime.store.still_active(jid, indexes):
        counter.withhold()


def run_branch(
    runtime: Runtime,
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
    sent = _sent_as(runtime, task)
    started = runtime.store.start_branch(jid, index, sent)
    counter = _part_counter(task)
    if started.poisoned:
        (finished,) = started.poisoned
        logger.error("branch %s[%d] %s: %s", job_id, index, spec.name, finished.error)
        runtime.store.finish_branch(jid, sent, finished, also=counter)
        _settle(runtime, counter, jid, [index])
        return {"index": index, "state": finished.state.value}
    attempt = started.attempts.get(index)
    if attempt is None:
        _settle(runtime, counter, jid, [index])
        return {"index": index, "skipped": _SKIPPED}
    outcome = execute(spec, args, kwargs, Deadline(deadline_at), attempt, runtime.settings.max_result_bytes)
    if outcome.retry_in is not None:
        logger.info(
            "branch %s[%d] attempt %d failed, retry in %.3fs: %s",
            job_id,
            index,
            attempt,
            outcome.retry_in,
            outcome.error,
        )
        runtime.store.requeue_branch(jid, index, sent)  # the retry's delivery starts it again
        raise task.retry(countdown=outcome.retry_in, max_retries=spec.retries)
    log_outcome(job_id, index, spec, outcome)
    finished = Finished(index, attempt, outcome.state, outcome.result, outcome.error)
    runtime.store.finish_branch(jid, sent, finished, also=counter)
    _settle(runtime, counter, jid, [index])
    return {"index": index, "state": outcome.state.value}


def run_io_batch(
    runtime: Runtime,
    task: Task,
    spec: TaskSpec,
    job_id: str,
    branches: list[list[Any]],
    deadline_at: float | None,
) -> dict[str, Any]:
    """io branches of one job and one catalog task, in one message, run by the worker's batch engine."""
    counter = _part_counter(task)
    done = runtime.engine.get().run(
        runtime.store,
        spec,
        job_id,
        _sent_as(runtime, task),
        branches,
        deadline_at,
        also=counter,
        max_result_bytes=runtime.settings.max_result_bytes,
    )
    _settle(runtime, counter, uuid.UUID(job_id), [int(b[0]) for b in branches])
    return {"job": job_id, "branches": done.ran, "skipped": done.skipped}


def register_branch_task(app: Celery, runtime: Runtime, spec: TaskSpec) -> None:
    """Register `spec` as a Celery task named like the catalog function, routed by its kind.

    A cpu task's message is one branch: (job_id, index, args, kwargs, deadline_at). An io task's message
    is a batch of the job's branches of that task: (job_id, [[index, args, kwargs], ...], deadline_at).
    Either way Flower shows the catalog name, the job id and the branch indexes."""
    runner: Callable[..., dict[str, Any]]
    if spec.kind is TaskKind.IO:

        def io_runner(
            self: Task, job_id: str, branches: list[list[Any]], deadline_at: float | None = None
        ) -> dict[str, Any]:
            return run_io_batch(runtime, self, spec, job_id, branches, deadline_at)

        runner = io_runner
    else:

        def cpu_runner(
            self: Task,
            job_id: str,
            index: int,
            args: list[Any],
            kwargs: dict[str, Any],
            deadline_at: float | None = None,
        ) -> dict[str, Any]:
            return run_branch(runtime, self, spec, job_id, index, args, kwargs, deadline_at)

        runner = cpu_runner
    runner.__name__ = spec.fn.__name__
    runner.__doc__ = spec.fn.__doc__
    # ignore_result: outcomes live in the branches table and the fan-in reads them there; the chord still
    # counts the task (the backend skips the header join for BODIES_WITHOUT_HEADER_RESULTS).
    options = {
        "queue": runtime.settings.queue_for(spec.kind),
        "typing": False,
        "shared": False,
        "ignore_result": True,
        "Request": runtime.request_class,
    }
    app.task(name=spec.name, bind=True, **options, **RETRY_ON_DATABASE_ERRORS)(runner)


def jobs_of(name: str, args: Sequence[Any]) -> tuple[str | None, str | None]:
    """(job whose branches, job whose fan-in) a message of task `name` with `args` runs, by the
    orchestrator's message shapes: a fan-in (header, job_id), the deadline (job_id), a branch or batch
    (job_id, ...)."""
    if not args:
        return None, None
    if name == FAN_IN:
        return None, str(args[-1])
    if name == DEADLINE:
        return None, str(args[0])
    return str(args[0]), None


def _lost_aware_request(runtime: Runtime) -> type[Request]:
    """The pool's request for the orchestrator's tasks: when the process running one dies (a prefork
    child killed, or exiting on its own), the branch or fan-in is marked lost, saying how, before
    Celery requeues the message (task_reject_on_worker_lost): its redelivery starts it at once and
    counts the loss against ORCH_MAX_DELIVERIES."""

    class LostAwareRequest(Request):  # type: ignore[misc]
        def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
            exc = exc_info.exception
            if isinstance(exc, ExceptionWithTraceback):
                exc = exc.exc
            if isinstance(exc, WorkerLostError):
                self._mark_lost(str(exc))
            super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

        def _mark_lost(self, reason: str) -> None:
            try:
                branches_of, fan_in_of = jobs_of(self.task_name, self.args)
                if fan_in_of is not None:
                    runtime.store.mark_fan_in_lost(uuid.UUID(fan_in_of), reason)
                elif branches_of is not None:
                    args = self.args
                    indexes = [int(b[0]) for b in args[1]] if isinstance(args[1], list) else [int(args[1])]
                    runtime.store.mark_lost(uuid.UUID(branches_of), indexes, str(self.id), reason)
            except Exception as exc:  # the heartbeat's age frees the work instead, later
                logger.warning("could not mark %s[%s] lost (%s): %s", self.task_name, self.id, reason, exc)

    return LostAwareRequest


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


def _finalize(runtime: Runtime, job_id: uuid.UUID, claim: FanInClaim) -> JobState:
    """Aggregate a claimed job and record how it ended (once: it is claimed by this runner)."""
    if claim.lost is not None:
        logger.error("job %s: %s", job_id, claim.lost)
        runtime.store.finalize(job_id, JobState.FAILED, None, claim.lost, runtime.runner)
        return JobState.FAILED
    ended = aggregate(claim.fan_in, claim.outcomes, claim.min_success, claim.fan_in_timeout)
    runtime.store.finalize(job_id, ended.state, ended.result, ended.error, runtime.runner)
    return ended.state


def register(app: Celery, settings: Settings) -> Runtime:
    """Register the fan-in, the deadline watchdog and a runner for every loaded catalog branch task."""
    store = Store(
        settings.database_url, stall_timeout=settings.stall_timeout, max_deliveries=settings.max_deliveries
    )
    runtime = Runtime(settings, store, EngineSlot(lambda: runtime.pool_size or settings.io_concurrency))
    runtime.request_class = _lost_aware_request(runtime)
    os.register_at_fork(after_in_child=runtime.engine.forget)

    @signals.worker_init.connect(weak=False)
    def _learn_worker(sender: Any = None, **_: Any) -> None:
        """In the worker's main process, before its pool forks: its size, and its name as a runner."""
        if getattr(sender, "app", None) is not app:
            return
        size = getattr(sender, "concurrency", None)
        if isinstance(size, int) and size > 0:
            runtime.pool_size = size
        runtime.runner = str(Runner.here())

    # ignore_result: the job row holds the aggregate; storing the task's own return would be one more write.
    lost_aware = {"Request": runtime.request_class}

    # A database error (PostgreSQL restarting, a connection cut) retries the fan-in and the deadline
    # like a branch task, instead of leaving the job to the rescuer's sweep a stall timeout later.
    retried_on_errors = {**lost_aware, **RETRY_ON_DATABASE_ERRORS}

    @app.task(name=FAN_IN, bind=True, typing=False, ignore_result=True, shared=False, **retried_on_errors)
    def fan_in(self: Task, _header: Any, job_id: str) -> dict[str, Any]:
        """The chord body: aggregate the outcomes recorded in SQL (the header's return values are ignored)."""
        jid = uuid.UUID(job_id)
        claim = store.claim_fan_in(jid, runtime.runner, retried=bool(self.request.retries))
        if claim is None:
            return {"job": job_id, "skipped": "job is not running, or another fan-in holds it"}
        return {"job": job_id, "state": _finalize(runtime, jid, claim).value}

    @app.task(name=DEADLINE, bind=True, typing=False, ignore_result=True, shared=False, **retried_on_errors)
    def deadline(self: Task, job_id: str) -> dict[str, Any]:
        """Published with an ETA at the job's deadline: time out what is unfinished and run the fan-in now."""
        jid = uuid.UUID(job_id)
        expired = store.expire(jid, runtime.runner)
        if expired is None:
            # A retry whose earlier run expired the job and then failed: finish its aggregation.
            own = store.claim_fan_in(jid, runtime.runner, retried=True) if self.request.retries else None
            if own is not None:
                return {"job": job_id, "state": _finalize(runtime, jid, own).value}
            return {"job": job_id, "skipped": "job already final"}
        claim, stopped = expired
        try:
            # Only queued branches: a running io thread cannot be stopped from outside, a running cpu
            # branch already has its own soft limit at the deadline, and each revoke is a broadcast.
            revoke(app, settings.cpu_queue, [b for b in stopped if not b.was_running], terminate_cpu=False)
        except Exception:  # an optimisation only: a timed-out branch refuses to start anyway
            logger.exception("job %s: revoking timed-out branches failed", job_id)
        logger.info("job %s: deadline passed, %d branches timed out", job_id, len(stopped))
        return {"job": job_id, "state": _finalize(runtime, jid, claim).value, "timed_out": len(stopped)}

    for spec in catalog().values():
        if spec.kind is not TaskKind.AGGREGATOR:
            register_branch_task(app, runtime, spec)
    return runtime
