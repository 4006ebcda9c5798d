"""A message may only move the branch it was published as: a stray or forged one changes nothing."""

from __future__ import annotations

import time

import pytest

from orchestrator import branch
from tests.conftest import Stack

pytestmark = pytest.mark.integration


def test_a_forged_message_for_another_jobs_branch_changes_nothing(pg_stack: Stack) -> None:
    orc = pg_stack.orc
    victim = orc.submit([branch("tests.catalog.spin", 1.0)], fan_in="tests.catalog.outcomes")
    deadline = time.monotonic() + 30
    while orc.get(victim.id).branches[0].state != "running":
        assert time.monotonic() < deadline, pg_stack.logs()
        time.sleep(0.02)
    # While the real branch runs, messages naming it: another task with a fresh id, the same task with a
    # fresh id, and another task with the branch's own task id.
    real_id = victim.branches[0].celery_task_id
    forged = [
        ("jobs.cpu.count_primes", None, (victim.id, 0, [], {"limit": 10}, None)),
        ("tests.catalog.spin", None, (victim.id, 0, [0.01], {}, None)),
        ("jobs.cpu.count_primes", real_id, (victim.id, 0, [], {"limit": 10}, None)),
    ]
    sent = [
        orc.app.send_task(name, args=args, task_id=task_id, queue=orc.settings.cpu_queue)
        for name, task_id, args in forged
    ]
    view = orc.wait(victim.id, timeout=30)
    assert view.state == "succeeded", pg_stack.logs()
    only = view.branches[0]
    assert (only.attempts, only.late, only.task) == (1, False, "tests.catalog.spin")
    assert set(only.result) == {"pid", "loops"}  # spin's own result, not count_primes' number
    assert [o["result"] for o in view.result] == [only.result]  # what the fan-in aggregated
    assert all(s.id for s in sent)
