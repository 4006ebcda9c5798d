"""Execution policy and aggregation without services: outcomes, retries, deadlines, budgets, quorum."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from orchestrator import BranchOutcome, Deadline, DeadlineExceeded, aggregator
from orchestrator.models import BranchState, JobState
from orchestrator.policy import BACKOFF_CAP, aggregate, backoff_delay, execute
from orchestrator.registry import TaskKind, TaskSpec


def _spec(fn: Callable[..., Any], kind: TaskKind = TaskKind.IO, **options: Any) -> TaskSpec:
    return TaskSpec(name=f"tests.unit.{fn.__name__}", kind=kind, fn=fn, **options)


def _add(x: int, y: int = 0) -> int:
    return x + y


def _boom() -> None:
    raise ConnectionError("the backend is down")


def _not_json() -> object:
    return object()


def _budgeted(*, deadline: Deadline) -> float | None:
    return deadline.remaining()


def _spin(seconds: float) -> int:
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def _honours(*, deadline: Deadline) -> None:
    raise DeadlineExceeded("stopped at the deadline")


NO_BUDGET = Deadline(None)


def test_a_success_is_an_outcome_with_its_result() -> None:
    outcome = execute(_spec(_add), [1], {"y": 2}, NO_BUDGET, attempt=1)
    assert (outcome.state, outcome.result, outcome.error, outcome.retry_in) == (
        BranchState.SUCCEEDED,
        3,
        None,
        None,
    )


def test_an_exception_is_a_failed_outcome_never_a_raise() -> None:
    outcome = execute(_spec(_boom), [], {}, NO_BUDGET, attempt=1)
    assert (outcome.state, outcome.error, outcome.retry_in) == (
        BranchState.FAILED,
        "ConnectionError: the backend is down",
        None,
    )


def test_a_result_that_is_not_json_fails_the_branch() -> None:
    outcome = execute(_spec(_not_json), [], {}, NO_BUDGET, attempt=1)
    assert outcome.state is BranchState.FAILED
    assert outcome.error is not None and outcome.error.startswith("result is not JSON-serializable")


def _blob(size: int) -> str:
    return "x" * size


def test_a_result_over_the_size_limit_fails_the_branch() -> None:
    at_limit = execute(_spec(_blob), [98], {}, NO_BUDGET, attempt=1, max_result_bytes=100)
    assert at_limit.state is BranchState.SUCCEEDED  # 98 characters and two quotes: 100 bytes of JSON
    over = execute(_spec(_blob), [99], {}, NO_BUDGET, attempt=1, max_result_bytes=100)
    assert (over.state, over.result, over.retry_in) == (BranchState.FAILED, None, None)
    assert over.error == "result of 101 bytes exceeds ORCH_MAX_RESULT_BYTES (100)"


def test_retries_are_offered_until_the_attempts_run_out() -> None:
    spec = _spec(_boom, retries=2, backoff=0.5)
    delays = [execute(spec, [], {}, NO_BUDGET, attempt=a).retry_in for a in (1, 2, 3)]
    assert delays[0] is not None and 0 <= delays[0] <= 0.5
    assert delays[1] is not None and 0 <= delays[1] <= 1.0
    assert delays[2] is None  # the third attempt was the last


def test_backoff_has_full_jitter_and_a_cap() -> None:
    spec = _spec(_boom, retries=50, backoff=1.0)
    samples = [backoff_delay(spec, 3) for _ in range(200)]
    assert all(0 <= d <= 4.0 for d in samples) and max(samples) > 2.0 and min(samples) < 2.0
    assert all(backoff_delay(spec, 40) <= BACKOFF_CAP for _ in range(50))


def test_no_retry_is_scheduled_past_the_deadline() -> None:
    spec = _spec(_boom, retries=3, backoff=30.0)
    outcomes = [execute(spec, [], {}, Deadline(time.time() + 0.5), attempt=1) for _ in range(20)]
    assert all(o.retry_in is None or o.retry_in < 0.5 for o in outcomes)
    assert any(o.retry_in is None for o in outcomes)


def test_an_expired_budget_times_out_without_calling() -> None:
    called: list[int] = []
    spec = _spec(lambda: called.append(1))
    outcome = execute(spec, [], {}, Deadline(time.time() - 1), attempt=1)
    assert outcome.state is BranchState.TIMED_OUT and called == []
    assert outcome.error == "the job's deadline passed before it started"


def test_the_budget_reaches_a_function_that_declares_it() -> None:
    outcome = execute(_spec(_budgeted), [], {}, Deadline(time.time() + 10), attempt=1)
    assert outcome.state is BranchState.SUCCEEDED and 9 < outcome.result <= 10
    assert execute(_spec(_budgeted), [], {}, NO_BUDGET, attempt=1).result is None


def test_a_branch_giving_up_at_its_deadline_is_timed_out() -> None:
    outcome = execute(_spec(_honours), [], {}, Deadline(time.time() + 5), attempt=1)
    assert outcome.state is BranchState.TIMED_OUT
    assert outcome.error == "the branch ran out of time (DeadlineExceeded: stopped at the deadline)"


def test_a_cpu_branch_gets_a_soft_limit_at_exactly_the_time_left() -> None:
    started = time.monotonic()
    outcome = execute(_spec(_spin, TaskKind.CPU), [5.0], {}, Deadline(time.time() + 0.2), attempt=1)
    assert outcome.state is BranchState.TIMED_OUT
    assert "SoftTimeLimitExceeded" in (outcome.error or "")
    assert time.monotonic() - started < 2.0


# --- aggregation -----------------------------------------------------------------------------------


@aggregator(name="tests.unit.count_ok")
def _count_ok(outcomes: list[BranchOutcome]) -> int:
    return sum(o.ok for o in outcomes)


@aggregator(name="tests.unit.raises")
def _raises(outcomes: list[BranchOutcome]) -> None:
    raise ValueError("cannot aggregate")


@aggregator(name="tests.unit.not_json")
def _aggregate_not_json(outcomes: list[BranchOutcome]) -> object:
    return {1, 2}


def _outcomes(*states: BranchState) -> list[BranchOutcome]:
    return [
        BranchOutcome(i, "t", s, i if s is BranchState.SUCCEEDED else None, None, 0.1)
        for i, s in enumerate(states)
    ]


OK, BAD = BranchState.SUCCEEDED, BranchState.TIMED_OUT
UNKNOWN = (
    "fan-in tests.unit.nope raised UnknownTask: unknown task 'tests.unit.nope': "
    "no loaded catalog module declares it (see ORCH_IMPORTS)"
)


@pytest.mark.parametrize(
    ("fan_in", "states", "min_success", "expected"),
    [
        ("tests.unit.count_ok", (OK, OK), None, (JobState.SUCCEEDED, 2, None)),
        ("tests.unit.count_ok", (OK, BAD), None, (JobState.PARTIAL, 1, None)),
        (
            "tests.unit.count_ok",
            (OK, BAD, BAD),
            2,
            (JobState.FAILED, None, "only 1 of 3 branches succeeded; min_success is 2"),
        ),
        ("tests.unit.count_ok", (OK, OK, BAD), 2, (JobState.PARTIAL, 2, None)),
        (
            "tests.unit.raises",
            (OK,),
            None,
            (JobState.FAILED, None, "fan-in tests.unit.raises raised ValueError: cannot aggregate"),
        ),
        (
            "tests.unit.nope",
            (OK,),
            None,
            (JobState.FAILED, None, UNKNOWN),
        ),
    ],
)
def test_aggregation(
    fan_in: str, states: tuple[BranchState, ...], min_success: int | None, expected: tuple[Any, ...]
) -> None:
    ended = aggregate(fan_in, _outcomes(*states), min_success)
    assert (ended.state, ended.result, ended.error) == expected


def test_an_aggregate_that_is_not_json_fails_the_job() -> None:
    ended = aggregate("tests.unit.not_json", _outcomes(OK))
    assert ended.state is JobState.FAILED and ended.result is None
    assert (ended.error or "").startswith("result is not JSON-serializable")
