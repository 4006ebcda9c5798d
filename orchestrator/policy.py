"""How one attempt of a branch runs, and how a job's outcomes become its result: no Celery, no SQL.

A branch never raises into its task: every end (success, failure, timeout, a refusing breaker) is an
`Outcome`, and a failure may carry `retry_in`, which the caller turns into a retry the way its transport
allows (a cpu branch through the broker, an io branch inside its batch). The fan-in's aggregation is
here too, as a pure function of the recorded outcomes, so both can be tested without services.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

# billiard (Celery's process pool) raises this in a prefork child at its soft time limit; the budget
# below raises the same, so one except clause covers both.
from billiard.exceptions import SoftTimeLimitExceeded

from .breaker import get_breaker
from .deadline import Deadline
from .errors import CircuitOpen, DeadlineExceeded
from .models import BranchState, JobState
from .registry import TaskKind, TaskSpec, lookup
from .views import BranchOutcome

#: The longest a retry waits, whatever the attempt (seconds).
BACKOFF_CAP = 60.0


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def json_error(value: Any, max_bytes: int | None = None) -> str | None:
    """Why `value` cannot be stored as a JSON result (not JSON, or more than `max_bytes` of it: a result
    travels through SQL to the fan-in and to every reader of the job), or None when it can."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        return f"result is not JSON-serializable: {exc}"
    if max_bytes is not None and len(text) > max_bytes:  # ASCII: json.dumps escapes the rest
        return f"result of {len(text)} bytes exceeds ORCH_MAX_RESULT_BYTES ({max_bytes})"
    return None


def backoff_delay(spec: TaskSpec, attempt: int) -> float:
    """Exponential backoff with full jitter. Celery's get_exponential_backoff_interval works in whole
    seconds only, which is too coarse for sub-second io retries."""
    return random.uniform(0, min(BACKOFF_CAP, spec.backoff * 2 ** (attempt - 1)))


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
    """How one attempt ended."""

    state: BranchState
    result: Any = None
    error: str | None = None
    retry_in: float | None = None  # a failure that may be retried after this many seconds


def execute(
    spec: TaskSpec,
    args: list[Any],
    kwargs: dict[str, Any],
    budget: Deadline,
    attempt: int,
    max_result_bytes: int | None = None,
) -> Outcome:
    """Run one attempt of a branch function: its deadline, its breaker, its retry policy, the size its
    result may have."""
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
    error = json_error(result, max_result_bytes)
    if error:
        return Outcome(BranchState.FAILED, error=error)
    return Outcome(BranchState.SUCCEEDED, result=result)


@dataclass(frozen=True)
class Aggregate:
    """How a job ends: its final state, and the aggregator's result or the reason it has none."""

    state: JobState
    result: Any = None
    error: str | None = None


def aggregate(
    fan_in: str,
    outcomes: Sequence[BranchOutcome],
    min_success: int | None = None,
    fan_in_timeout: float | None = None,
) -> Aggregate:
    """Run the job's aggregator on its recorded outcomes: `succeeded` when every branch did, `partial`
    when some did not, `failed` below the quorum or when the aggregator raises, returns something that
    is not JSON, or runs past its soft time limit."""
    succeeded = sum(1 for o in outcomes if o.ok)
    if min_success is not None and succeeded < min_success:
        error = f"only {succeeded} of {len(outcomes)} branches succeeded; min_success is {min_success}"
        return Aggregate(JobState.FAILED, error=error)
    try:
        spec = lookup(fan_in, expect=[TaskKind.AGGREGATOR])
        result = spec.fn(list(outcomes))
    except SoftTimeLimitExceeded:
        limit = f" of {fan_in_timeout:g}s" if fan_in_timeout else ""
        return Aggregate(JobState.FAILED, error=f"fan-in {fan_in} exceeded its soft time limit{limit}")
    except Exception as exc:
        return Aggregate(JobState.FAILED, error=f"fan-in {fan_in} raised {describe(exc)}")
    not_json = json_error(result)
    if not_json:
        return Aggregate(JobState.FAILED, error=not_json)
    return Aggregate(JobState.SUCCEEDED if succeeded == len(outcomes) else JobState.PARTIAL, result)
