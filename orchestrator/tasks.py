"""The orchestrator's own Celery tasks: the branch runner every catalog task is wrapped in, and fan_in.

Branches never raise into the chord: a failure is an outcome written to SQL, so the chord always
completes and the fan-in always runs.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from .celery_app import app, settings
from .models import BranchState, JobState
from .registry import TaskKind, TaskSpec, lookup
from .store import Store

logger = logging.getLogger(__name__)
_store: Store | None = None


def store() -> Store:
    global _store
    if _store is None:
        _store = Store(settings.database_url)
    return _store


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _json_or_error(value: Any) -> str | None:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return f"result is not JSON-serializable: {exc}"
    return None


def run_branch(
    task: Task, spec: TaskSpec, job_id: str, index: int, args: list[Any], kwargs: dict[str, Any]
) -> dict[str, Any]:
    jid = uuid.UUID(job_id)
    attempt = store().start_branch(jid, index, task.request.id)
    if attempt is None:
        return {"index": index, "skipped": "outcome already recorded"}
    result: Any = None
    error: str | None = None
    try:
        result = spec.fn(*args, **kwargs)
        error = _json_or_error(result)
        state = BranchState.FAILED if error else BranchState.SUCCEEDED
        if error:
            result = None
    except SoftTimeLimitExceeded:
        state, error = BranchState.TIMED_OUT, "branch exceeded its soft time limit"
    except Exception as exc:
        state, error = BranchState.FAILED, describe(exc)
        logger.info("branch %s[%d] %s failed: %s", job_id, index, spec.name, error)
    store().finish_branch(jid, index, state, result, error)
    return {"index": index, "state": state.value}


def register_branch_task(spec: TaskSpec) -> None:
    """Register `spec` as a Celery task named like the catalog function, routed by its kind."""

    def runner(
        self: Task, job_id: str, index: int, args: list[Any], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        return run_branch(self, spec, job_id, index, args, kwargs)

    runner.__name__ = spec.fn.__name__
    runner.__doc__ = spec.fn.__doc__
    app.task(name=spec.name, bind=True, queue=settings.queue_for(spec.kind), typing=False, shared=False)(
        runner
    )


@app.task(name="orchestrator.fan_in", bind=True, typing=False)
def fan_in(self: Task, _header: Any, job_id: str) -> dict[str, Any]:
    """The chord body: aggregate the outcomes recorded in SQL (the header's return values are ignored)."""
    jid = uuid.UUID(job_id)
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    claim = store().claim_fan_in(jid, redelivered=redelivered)
    if claim is None:
        return {"job": job_id, "skipped": "job is not running"}
    outcomes = store().outcomes(jid)
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
            state = (
                JobState.FAILED
                if error
                else (JobState.SUCCEEDED if succeeded == len(outcomes) else JobState.PARTIAL)
            )
            if error:
                result = None
        except SoftTimeLimitExceeded:
            state = JobState.FAILED
            error = f"fan-in {claim.fan_in} exceeded its soft time limit"
        except Exception as exc:
            state, error = JobState.FAILED, f"fan-in {claim.fan_in} raised {describe(exc)}"
    store().finalize(jid, state, result, error)
    return {"job": job_id, "state": state.value}
