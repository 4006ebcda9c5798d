"""A job's fan-out as messages, decided before anything is written: which branches share a message.

A fan-out is bound by messages and transactions, not by waiting, so a job's io branches of one catalog
task travel together, up to `chunk_size` to a message (a *batch*), named after that task; a cpu branch
is one message, since each needs its own prefork process. The plan fixes every message's Celery task id
before the job's rows are written, so the store records which message each branch belongs to (a
branch may only be moved by that message) and a branch can be revoked before it starts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .store import NewBranch

#: A job's branches by index: all of them in order, or some of them by their index (a redrive).
Branches = Sequence[NewBranch] | Mapping[int, NewBranch]


@dataclass(frozen=True)
class Message:
    """One Celery message of a fan-out: a batch of io branches of one task, or a single cpu branch."""

    task: str
    queue: str
    task_id: str
    indexes: tuple[int, ...]
    batch: bool

    def args(self, job_id: str, branches: Branches, deadline_at: float | None) -> tuple[Any, ...]:
        """The message's arguments: a batch is (job_id, [[index, args, kwargs], ...], deadline_at), a
        single branch (job_id, index, args, kwargs, deadline_at); Flower shows them under `task`."""
        if self.batch:
            return job_id, [[i, branches[i].args, branches[i].kwargs] for i in self.indexes], deadline_at
        (index,) = self.indexes
        return job_id, index, branches[index].args, branches[index].kwargs, deadline_at


@dataclass(frozen=True)
class JobPlan:
    """The branches as the store records them (each with its message's task id) and the messages."""

    branches: tuple[NewBranch, ...]
    messages: tuple[Message, ...]
    #: The branches' indexes in their job, when they are not 0..n-1 (some branches of a redrive).
    numbers: tuple[int, ...] | None = None

    @property
    def by_index(self) -> Branches:
        """The branches as the messages name them."""
        return self.branches if self.numbers is None else dict(zip(self.numbers, self.branches, strict=True))


def plan(branches: Sequence[NewBranch], *, batch_queue: str, chunk_size: int) -> JobPlan:
    """Pack `branches` into messages: those on `batch_queue` (io) by task, `chunk_size` to a message
    (1: one message each); every other branch alone."""
    messages: list[Message] = []
    by_task: dict[str, list[int]] = {}
    for i, b in enumerate(branches):
        if b.queue == batch_queue:
            by_task.setdefault(b.task, []).append(i)
        else:
            messages.append(Message(b.task, b.queue, str(uuid.uuid4()), (i,), batch=False))
    for task, indexes in by_task.items():
        for start in range(0, len(indexes), chunk_size):
            chunk = tuple(indexes[start : start + chunk_size])
            messages.append(Message(task, batch_queue, str(uuid.uuid4()), chunk, batch=True))
    messages.sort(key=lambda m: m.indexes[0])  # in submission order, as the branches were given
    owner = {i: m.task_id for m in messages for i in m.indexes}
    recorded = tuple(NewBranch(b.task, b.queue, b.args, b.kwargs, owner[i]) for i, b in enumerate(branches))
    return JobPlan(recorded, tuple(messages))


def replan(branches: Mapping[int, NewBranch], *, batch_queue: str, chunk_size: int) -> JobPlan:
    """`plan` for some of a job's branches, given by their index in the job (a redrive): new messages
    with new task ids, which the branches record."""
    numbers = sorted(branches)
    fresh = plan([branches[i] for i in numbers], batch_queue=batch_queue, chunk_size=chunk_size)
    messages = tuple(
        Message(m.task, m.queue, m.task_id, tuple(numbers[i] for i in m.indexes), m.batch)
        for m in fresh.messages
    )
    return JobPlan(fresh.branches, messages, tuple(numbers))
