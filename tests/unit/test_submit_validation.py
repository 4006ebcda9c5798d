"""Every bad spec raises a clear InvalidJobSpec and leaves nothing behind: no rows, no messages."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import (
    ArgumentsNotSerializable,
    InvalidJobSpec,
    JobNotFound,
    JobSpec,
    Orchestrator,
    UnknownTask,
    WaitTimeout,
    WrongTaskKind,
    branch,
)
from orchestrator.api import MAX_ARGUMENT_DEPTH
from tests.conftest import row_counts


def _nested(depth: int) -> Any:
    """A list `depth` levels deep."""
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _published(orc: Orchestrator) -> list[str]:
    return [p.name for p in (orc.settings.broker_folder / "queue").iterdir()]


@pytest.mark.parametrize(
    ("branches", "fan_in", "error", "message"),
    [
        ([branch("jobs.io.nope")], "jobs.aggregate.collect", UnknownTask, "unknown task 'jobs.io.nope'"),
        (
            [branch("jobs.io.sleep", 1)],
            "jobs.aggregate.nope",
            UnknownTask,
            "unknown task 'jobs.aggregate.nope'",
        ),
        (
            [branch("jobs.aggregate.total")],
            "jobs.aggregate.collect",
            WrongTaskKind,
            "'jobs.aggregate.total' is declared as aggregator, but io or cpu is required",
        ),
        (
            [branch("jobs.io.sleep", 1)],
            "jobs.io.sleep",
            WrongTaskKind,
            "'jobs.io.sleep' is declared as io, but aggregator is required",
        ),
        (
            [branch("jobs.io.sleep", 1), branch("jobs.io.sleep", seconds={1, 2})],
            "jobs.aggregate.collect",
            ArgumentsNotSerializable,
            "branch 1 \\(jobs.io.sleep\\): arguments are not JSON-serializable",
        ),
        (
            [branch("jobs.io.sleep", float("nan"))],
            "jobs.aggregate.collect",
            ArgumentsNotSerializable,
            "not JSON-serializable",
        ),
        ([], "jobs.aggregate.collect", InvalidJobSpec, "at least one branch"),
        ([branch(42)], "jobs.aggregate.collect", UnknownTask, "task name must be a non-empty string"),  # type: ignore[arg-type]
        ([branch("jobs.io.sleep", 1)], None, UnknownTask, "task name must be a non-empty string"),
        (["jobs.io.sleep"], "jobs.aggregate.collect", InvalidJobSpec, "must be built with branch"),
        ("jobs.io.sleep", "jobs.aggregate.collect", InvalidJobSpec, "must be a list"),
        # Arguments that do not fit the function are refused at submit, not failed at run time.
        (
            [branch("jobs.io.sleep", 1), branch("jobs.io.sleep", secs=1)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "branch 1 \\(jobs.io.sleep\\): missing a required argument: 'seconds'",
        ),
        (
            [branch("jobs.io.sleep", 1, secs=1)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "branch 0 \\(jobs.io.sleep\\): got an unexpected keyword argument 'secs'",
        ),
        (
            [branch("jobs.cpu.count_primes", 10, 20)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "branch 0 \\(jobs.cpu.count_primes\\): too many positional arguments",
        ),
        (
            [branch("jobs.io.sleep", 1, deadline=5)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "'deadline' is passed by the orchestrator",
        ),
        # Nested deeper than a prefork pool can pickle for its child: refused before anything is written.
        (
            [branch("jobs.io.tcp_probe", _nested(MAX_ARGUMENT_DEPTH + 1), 1)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            f"branch 0 \\(jobs.io.tcp_probe\\): arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels",
        ),
        (
            [branch("jobs.cpu.count_primes", limit={"a": _nested(5000)})],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "arguments nest deeper than",
        ),
        # A 2 MiB argument (the default limit is 1 MiB of JSON a branch): a reference should travel.
        (
            [branch("jobs.io.sleep", 0.01), branch("jobs.io.tcp_probe", "x" * (2 << 20), 1)],
            "jobs.aggregate.collect",
            InvalidJobSpec,
            "branch 1 \\(jobs.io.tcp_probe\\): arguments are 2097165 bytes of JSON, more than "
            "ORCH_MAX_ARGS_BYTES \\(1048576\\)",
        ),
    ],
)
def test_bad_spec_raises_and_writes_nothing(
    embedded_orc: Orchestrator, branches: Any, fan_in: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        embedded_orc.submit(branches, fan_in=fan_in)
    assert row_counts(embedded_orc) == (0, 0)
    assert _published(embedded_orc) == []


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"deadline": 0}, "deadline must be a positive number of seconds, got 0"),
        ({"deadline": -1.5}, "deadline must be a positive number"),
        ({"deadline": float("inf")}, "deadline must be a positive number"),
        ({"deadline": "10"}, "deadline must be a positive number"),
        ({"deadline": True}, "deadline must be a positive number"),
        ({"min_success": 0}, "min_success must be an integer from 1 to 2, got 0"),
        ({"min_success": 3}, "min_success must be an integer from 1 to 2, got 3"),
        ({"min_success": 1.5}, "min_success must be an integer from 1 to 2"),
        ({"fan_in_timeout": -1}, "fan_in_timeout must be a positive number"),
        ({"idempotency_key": 7}, "idempotency_key must be a string"),
    ],
)
def test_bad_job_options_raise_and_write_nothing(
    embedded_orc: Orchestrator, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidJobSpec, match=message):
        embedded_orc.submit([branch("jobs.io.sleep", 1)] * 2, "jobs.aggregate.collect", **options)
    assert row_counts(embedded_orc) == (0, 0)
    assert _published(embedded_orc) == []


def test_a_deadline_publishes_its_watchdog_first(embedded_orc: Orchestrator) -> None:
    job = embedded_orc.submit(
        [branch("jobs.io.sleep", 1)], "jobs.aggregate.collect", deadline=30, min_success=1
    )
    assert job.deadline_at is not None
    assert 29 < (job.deadline_at - job.created_at).total_seconds() <= 30.01
    queues = sorted(name.rsplit(".", 2)[-2] for name in _published(embedded_orc))
    assert queues == ["fanin", "io"]  # the ETA watchdog and the branch


def test_bad_fan_in_timeout_and_name(embedded_orc: Orchestrator) -> None:
    with pytest.raises(InvalidJobSpec, match="fan_in_timeout must be a positive"):
        embedded_orc.submit([branch("jobs.io.sleep", 1)], "jobs.aggregate.collect", fan_in_timeout=0)
    with pytest.raises(InvalidJobSpec, match="name must be a string"):
        embedded_orc.submit([branch("jobs.io.sleep", 1)], "jobs.aggregate.collect", name="x" * 201)
    assert row_counts(embedded_orc) == (0, 0)


def test_a_good_spec_is_recorded_and_published_once(embedded_orc: Orchestrator) -> None:
    job = embedded_orc.submit(
        [branch("jobs.io.sleep", 0.1), branch("jobs.cpu.count_primes", limit=10)],
        "jobs.aggregate.collect",
        name="ok",
        idempotency_key="k1",
    )
    assert job.state == "running" and [b.state for b in job.branches] == ["pending", "pending"]
    assert [b.args for b in job.branches] == [
        {"args": [0.1], "kwargs": {}},
        {"args": [], "kwargs": {"limit": 10}},
    ]
    again = embedded_orc.submit(
        [branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect", idempotency_key="k1"
    )
    assert again.id == job.id
    assert row_counts(embedded_orc) == (1, 2)
    queues = sorted(name.rsplit(".", 2)[-2] for name in _published(embedded_orc))
    assert queues == ["cpu", "io"]  # one message per branch; the body waits for the chord join


def test_unknown_job_ids(embedded_orc: Orchestrator) -> None:
    with pytest.raises(JobNotFound, match="no job"):
        embedded_orc.get("00000000-0000-0000-0000-000000000000")
    with pytest.raises(JobNotFound, match="not a job id"):
        embedded_orc.wait("not-a-uuid", timeout=1)


def test_wait_times_out_on_a_job_no_worker_runs(embedded_orc: Orchestrator) -> None:
    job = embedded_orc.submit([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect")
    with pytest.raises(WaitTimeout, match=f"job {job.id} is still running after 0.2s"):
        embedded_orc.wait(job.id, timeout=0.2)


def test_arguments_nested_up_to_the_limit_are_accepted(embedded_orc: Orchestrator) -> None:
    job = embedded_orc.submit(
        [branch("jobs.io.tcp_probe", _nested(MAX_ARGUMENT_DEPTH), 1), branch("jobs.io.sleep", seconds=0.1)],
        "jobs.aggregate.collect",
    )
    assert job.branches[0].args == {"args": [_nested(MAX_ARGUMENT_DEPTH), 1], "kwargs": {}}
    assert row_counts(embedded_orc) == (1, 2)


# --- submit_many -----------------------------------------------------------------------------------


def test_submit_many_is_all_or_nothing(embedded_orc: Orchestrator) -> None:
    good = JobSpec([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect")
    bad = JobSpec([branch("jobs.io.sleep", secs=1)], "jobs.aggregate.collect")
    with pytest.raises(InvalidJobSpec, match="missing a required argument: 'seconds'"):
        embedded_orc.submit_many([good, good, bad])
    assert row_counts(embedded_orc) == (0, 0)
    assert _published(embedded_orc) == []


def test_submit_many_records_and_publishes_every_job_in_order(embedded_orc: Orchestrator) -> None:
    specs = [
        JobSpec([branch("jobs.io.sleep", 0.1)] * 3, "jobs.aggregate.collect", name=f"job-{i}")
        for i in range(5)
    ]
    views = embedded_orc.submit_many(specs)
    assert [v.name for v in views] == [f"job-{i}" for i in range(5)]
    assert all(v.state == "running" and v.branch_total == 3 for v in views)
    assert row_counts(embedded_orc) == (5, 15)
    assert len(_published(embedded_orc)) == 5  # one io batch message per job
    assert {v.id for v in embedded_orc.list(state="running")} == {v.id for v in views}
    assert embedded_orc.submit_many([]) == []


def test_submit_many_honours_each_jobs_idempotency_key(embedded_orc: Orchestrator) -> None:
    first = embedded_orc.submit([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect", idempotency_key="a")
    views = embedded_orc.submit_many(
        [
            JobSpec([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect", idempotency_key="a"),
            JobSpec([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect", idempotency_key="b"),
            JobSpec([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect", idempotency_key="b"),
            JobSpec([branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect"),
        ]
    )
    assert views[0].id == first.id
    assert views[1].id == views[2].id != first.id  # one key twice in one call: one job
    assert len({v.id for v in views}) == 3
    assert row_counts(embedded_orc) == (3, 3)
    assert len(_published(embedded_orc)) == 3
