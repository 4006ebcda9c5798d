"""Batch packing: which branches of a job share a message, and what each message carries."""

from __future__ import annotations

from orchestrator.plan import plan
from orchestrator.store import NewBranch


def _branches(*tasks: str) -> list[NewBranch]:
    return [NewBranch(t, "cpu" if ".cpu." in t else "io", [i], {"k": i}) for i, t in enumerate(tasks)]


def test_io_branches_of_one_task_share_a_message_up_to_the_chunk_size() -> None:
    branches = _branches("j.io.a", "j.io.a", "j.cpu.c", "j.io.b", "j.io.a", "j.io.a", "j.io.a")
    job = plan(branches, batch_queue="io", chunk_size=2)
    shapes = [(m.task, m.queue, m.indexes, m.batch) for m in job.messages]
    assert shapes == [
        ("j.io.a", "io", (0, 1), True),
        ("j.cpu.c", "cpu", (2,), False),
        ("j.io.b", "io", (3,), True),
        ("j.io.a", "io", (4, 5), True),
        ("j.io.a", "io", (6,), True),
    ]
    assert len({m.task_id for m in job.messages}) == 5
    # Each branch is recorded with its message's task id: only that message may move it.
    owner = {i: m.task_id for m in job.messages for i in m.indexes}
    assert [b.celery_task_id for b in job.branches] == [owner[i] for i in range(7)]
    assert [(b.task, b.args) for b in job.branches] == [(b.task, b.args) for b in branches]


def test_a_chunk_size_of_one_sends_every_io_branch_alone() -> None:
    job = plan(_branches("j.io.a", "j.io.a", "j.io.a"), batch_queue="io", chunk_size=1)
    assert [m.indexes for m in job.messages] == [(0,), (1,), (2,)]
    assert all(m.batch for m in job.messages)  # still the batch shape, so one io runner serves both


def test_message_arguments() -> None:
    job = plan(_branches("j.io.a", "j.cpu.c", "j.io.a"), batch_queue="io", chunk_size=50)
    batch, single = job.messages
    assert batch.args("job-1", job.branches, 12.5) == (
        "job-1",
        [[0, [0], {"k": 0}], [2, [2], {"k": 2}]],
        12.5,
    )
    assert single.args("job-1", job.branches, None) == ("job-1", 1, [1], {"k": 1}, None)
