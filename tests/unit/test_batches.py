"""The io batch engine on a SQLite file (no server): the running cap, retries inside the batch, outcomes
written as they finish, the chord count with the last write, and redeliveries that run nothing again."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, select

from orchestrator import database
from orchestrator.batches import BatchEngine
from orchestrator.models import Job
from orchestrator.plan import plan
from orchestrator.registry import TaskKind, TaskSpec
from orchestrator.store import NewBranch, SentAs, Store


class Tracker:
    """Counts how many calls run at once, and fails the first `fail_first` calls of each argument."""

    def __init__(self, fail_first: int = 0) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.fail_first = fail_first
        self.calls: dict[int, int] = {}

    def __call__(self, n: int, seconds: float = 0.05) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.calls[n] = self.calls.get(n, 0) + 1
            fails = self.calls[n] <= self.fail_first
        try:
            time.sleep(seconds)
            if fails:
                raise ConnectionError(f"attempt {self.calls[n]} of {n}")
            return n * 10
        finally:
            with self.lock:
                self.running -= 1


@pytest.fixture
def store(tmp_path: Path) -> Store:
    url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
    database.upgrade(url)
    return Store(url)


def _batch(store: Store, n: int) -> tuple[str, SentAs, list[list[Any]]]:
    job = plan(
        [NewBranch("tests.unit.track", "io", [i], {}) for i in range(n)], batch_queue="io", chunk_size=n
    )
    job_id, _ = store.create_job(name=None, fan_in="jobs.aggregate.collect", branches=job.branches)
    (message,) = job.messages
    _, branches, _ = message.args(str(job_id), job.branches, None)
    return str(job_id), SentAs(message.task_id, message.task), branches


def test_the_engine_runs_at_most_its_size_at_once_and_records_every_outcome(store: Store) -> None:
    tracker = Tracker()
    spec = TaskSpec("tests.unit.track", TaskKind.IO, tracker)
    job_id, sent, branches = _batch(store, 8)
    counted: list[int] = []

    def count(conn: Connection) -> None:  # the chord count, in the last write's transaction
        counted.append(conn.execute(select(Job.branch_done).where(Job.id == uuid.UUID(job_id))).scalar_one())

    done = BatchEngine(2).run(store, spec, job_id, sent, branches, None, also=count)
    assert (done.ran, done.skipped) == (8, 0)
    assert tracker.most == 2
    view = store.get(job_id)
    assert [(b.state, b.result, b.attempts) for b in view.branches] == [
        ("succeeded", i * 10, 1) for i in range(8)
    ]
    assert view.branch_done == 8 and counted == [8]  # counted with the last outcomes, in their transaction


def test_retries_stay_in_the_batch(store: Store) -> None:
    tracker = Tracker(fail_first=2)
    spec = TaskSpec("tests.unit.track", TaskKind.IO, tracker, retries=3, backoff=0.01)
    job_id, sent, branches = _batch(store, 3)
    BatchEngine(4).run(store, spec, job_id, sent, branches, None)
    view = store.get(job_id)
    assert [(b.state, b.attempts) for b in view.branches] == [("succeeded", 3)] * 3
    assert tracker.calls == {0: 3, 1: 3, 2: 3}


def test_a_redelivered_batch_runs_nothing_again(store: Store) -> None:
    tracker = Tracker()
    spec = TaskSpec("tests.unit.track", TaskKind.IO, tracker)
    job_id, sent, branches = _batch(store, 3)
    engine = BatchEngine(4)
    engine.run(store, spec, job_id, sent, branches, None)
    called: list[int] = []
    again = engine.run(store, spec, job_id, sent, branches, None, also=lambda conn: called.append(1))
    assert (again.ran, again.skipped, called) == (0, 3, [])
    assert sum(tracker.calls.values()) == 3


def test_another_message_moves_nothing(store: Store) -> None:
    tracker = Tracker()
    spec = TaskSpec("tests.unit.track", TaskKind.IO, tracker)
    job_id, sent, branches = _batch(store, 2)
    stray = SentAs(str(uuid.uuid4()), sent.task)
    assert BatchEngine(2).run(store, spec, job_id, stray, branches, None).ran == 0
    assert tracker.calls == {} and [b.state for b in store.get(job_id).branches] == ["pending"] * 2


def test_a_branch_waiting_for_a_slot_past_its_deadline_does_not_run(store: Store) -> None:
    tracker = Tracker()
    spec = TaskSpec("tests.unit.track", TaskKind.IO, tracker)
    job_id, sent, branches = _batch(store, 3)
    slow = [[index, [n, 0.3], kwargs] for index, (n,), kwargs in branches]
    BatchEngine(1).run(store, spec, job_id, sent, slow, time.time() + 0.2)
    states = sorted(b.state for b in store.get(job_id).branches)
    assert states == ["succeeded", "timed_out", "timed_out"]
    assert sum(tracker.calls.values()) == 1


def test_the_engine_starts_all_its_branch_threads_when_made() -> None:
    """Its memory at full size is taken at once, not one thread per burst larger than the last."""
    before = threading.active_count()
    BatchEngine(5)
    assert threading.active_count() - before == 5
