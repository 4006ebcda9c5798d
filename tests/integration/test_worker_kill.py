"""A worker SIGKILLed mid-branch loses nothing: the branch is redelivered and recorded once."""

from __future__ import annotations

import time

import pytest

from orchestrator import branch
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_sigkill_of_the_cpu_worker_redelivers_the_branch_once(rabbit_stack: Stack) -> None:
    orc = rabbit_stack.orc
    job = orc.submit(
        [branch("tests.catalog.spin", 1.5), branch("jobs.io.sleep", 0.05)], fan_in="tests.catalog.outcomes"
    )
    _wait_for(lambda: orc.get(job.id).branches[0].state == "running", 30, "the cpu branch to start")
    killed = rabbit_stack.workers["cpu"]
    killed.kill()  # the main process and its prefork children, at once
    assert killed.process.returncode is not None
    assert orc.get(job.id).state == "running"

    replacement = rabbit_stack.restart("cpu")
    view = orc.wait(job.id, timeout=60)
    assert view.state == "succeeded", rabbit_stack.logs()
    cpu = view.branches[0]
    assert cpu.state == "succeeded" and cpu.attempts == 2
    assert cpu.result["pid"] != killed.pid and cpu.result["pid"] != replacement.pid  # a child of the new one
    # Recorded exactly once: the job counted each branch once and the fan-in saw one outcome per branch.
    assert view.branch_done == view.branch_total == 2
    assert [o["state"] for o in view.result] == ["succeeded", "succeeded"]


def test_sigkill_of_the_io_worker_mid_batch_reruns_only_the_unrecorded_branches(rabbit_stack: Stack) -> None:
    """One batch message of four branches: two finish and are recorded, then the worker dies. The
    redelivered batch runs only the two without an outcome, and the chord counts the batch once."""
    orc = rabbit_stack.orc
    job = orc.submit(
        [branch("jobs.io.sleep", s) for s in (0.01, 0.01, 3.0, 3.0)], fan_in="tests.catalog.outcomes"
    )
    assert len({b.celery_task_id for b in job.branches}) == 1  # one message
    _wait_for(
        lambda: [b.state for b in orc.get(job.id).branches] == ["succeeded"] * 2 + ["running"] * 2,
        30,
        "the fast half of the batch to be recorded",
    )
    killed = rabbit_stack.workers["io"]
    killed.kill()
    assert orc.get(job.id).state == "running"

    rabbit_stack.restart("io")
    view = orc.wait(job.id, timeout=60)
    assert view.state == "succeeded", rabbit_stack.logs()
    assert [b.attempts for b in view.branches] == [1, 1, 2, 2]
    assert view.branch_done == view.branch_total == 4
    assert [o["state"] for o in view.result] == ["succeeded"] * 4
