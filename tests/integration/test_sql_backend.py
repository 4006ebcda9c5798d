"""The SQL result backend is a real Celery chord backend whose join is a deduplicated atomic counter."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, chord, group
from celery.app.task import Context
from celery.contrib.testing.worker import start_worker
from celery.exceptions import ChordError
from sqlalchemy import select

from orchestrator import database
from orchestrator.backend import SQLBackend
from orchestrator.cli.processes import spawn
from orchestrator.models import BranchState, ChordCounter
from orchestrator.store import Finished, NewBranch, SentAs, Store
from orchestrator.tasks import BODIES_WITHOUT_HEADER_RESULTS
from tests.conftest import ROOT
from tests.services import REDIS_URL, postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration


# --- Celery's own pytest fixtures: an in-process worker on the SQL backend --------------------------


@pytest.fixture
def celery_config(database_url: str) -> dict[str, Any]:
    return {
        "broker_url": "memory://",
        "result_backend": f"orchestrator.backend:SQLBackend+{database_url}",
        "task_serializer": "json",
        "accept_content": ["json"],
    }


@pytest.fixture
def in_process_worker(celery_app: Celery) -> Iterator[Any]:
    """Celery's own test worker (celery.contrib.testing), in this process; pytest-celery's `celery_worker`
    fixture would need a Docker engine."""
    with start_worker(celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=10) as worker:
        yield worker


def _counter(database_url: str, group_id: str) -> tuple[int, int | None, bool]:
    with database.get_engine(database_url).connect() as conn:
        row = conn.execute(
            select(ChordCounter.done, ChordCounter.total, ChordCounter.fired).where(
                ChordCounter.group_id == group_id
            )
        ).one()
    return row.done, row.total, row.fired


def test_a_plain_celery_chord_joins_on_the_counter(
    celery_app: Celery, in_process_worker: Any, database_url: str
) -> None:
    @celery_app.task(name="t.add")
    def add(x: int, y: int) -> int:
        return x + y

    @celery_app.task(name="t.tsum")
    def tsum(values: list[int]) -> int:
        return sum(values)

    in_process_worker.reload()
    result = chord(add.s(i, i) for i in range(10))(tsum.s())
    assert result.get(timeout=20) == 90
    group_id = result.parent.id
    assert _counter(database_url, group_id) == (10, 10, True)
    assert result.parent.get(timeout=5) == [2 * i for i in range(10)]  # header results, in order


def test_a_failing_header_task_follows_celery_chord_semantics(
    celery_app: Celery, in_process_worker: Any, database_url: str
) -> None:
    body_calls: list[Any] = []

    @celery_app.task(name="t.maybe_fail")
    def maybe_fail(i: int) -> int:
        if i == 2:
            raise KeyError("shard 2")
        return i

    @celery_app.task(name="t.body")
    def body(values: list[int]) -> int:
        body_calls.append(values)
        return len(values)

    in_process_worker.reload()
    result = chord(maybe_fail.s(i) for i in range(4))(body.s())
    result.get(timeout=20, propagate=False)
    # As with Celery's own backends: the body is not called and fails with a ChordError naming the cause.
    assert result.state == "FAILURE"
    assert isinstance(result.result, ChordError) and "KeyError" in str(result.result)
    assert body_calls == []


# --- real races: many processes count the same parts, each part delivered several times ------------


def _app(database_url: str, broker_url: str = f"{REDIS_URL}/9") -> Celery:
    """A plain Celery app on the SQL backend, publishing chord bodies to Redis where a test counts them."""
    app = Celery("race", broker=broker_url, backend=f"orchestrator.backend:SQLBackend+{database_url}")
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        # As the orchestrator's app configures it: its fan-in reads SQL, so its chord skips the join.
        chord_bodies_without_header_results=list(BODIES_WITHOUT_HEADER_RESULTS),
    )
    return app


def _race(args: tuple[str, str, str, list[str], dict[str, Any]]) -> None:
    database_url, broker_url, group_id, task_ids, body = args
    app = _app(database_url, broker_url)
    for i, tid in enumerate(task_ids):
        request = Context(id=tid, group=group_id, chord=body, group_index=i, delivery_info={})
        app.backend.on_chord_part_return(request, "SUCCESS", 1)


def test_racing_redelivered_parts_fire_the_body_exactly_once(database_url: str) -> None:
    broker_url = f"{REDIS_URL}/9"
    queue = f"race-body-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(broker_url)
    app = _app(database_url, broker_url)
    backend: SQLBackend = app.backend
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for round_ in range(4):
            n = 24
            group_id = str(uuid.uuid4())
            task_ids = [str(uuid.uuid4()) for _ in range(n)]
            for tid in task_ids:
                backend.store_result(tid, 1, "SUCCESS")
            app.GroupResult(group_id, [app.AsyncResult(t) for t in task_ids]).save(backend=backend)
            backend.set_chord_size(group_id, n)
            body = dict(app.signature("race.body", queue=queue))
            # 6 processes, each delivering every part once, in a different order: 144 deliveries of 24 parts.
            work = [
                (database_url, broker_url, group_id, task_ids[k:] + task_ids[:k], body)
                for k in range(0, n, n // 6)
            ]
            pool.map(_race, work)
            assert _counter(database_url, group_id) == (n, n, True), f"round {round_}"
            assert client.llen(queue) == round_ + 1, "the body must be published once per chord"
    client.delete(queue)


# --- a branch counts its part in the transaction that records its outcome ------------------------


def test_a_part_counted_with_its_outcome_commits_with_it_or_not_at_all(database_url: str) -> None:
    queue = f"fused-body-{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(f"{REDIS_URL}/9")
    app = _app(database_url)
    backend: SQLBackend = app.backend
    store = Store(database_url)
    batch = str(uuid.uuid4())  # both branches travel in one io batch message
    job_id, _ = store.create_job(
        name="fused",
        fan_in="jobs.aggregate.collect",
        branches=[NewBranch("jobs.io.sleep", "io", [0], {}, batch) for _ in range(2)],
    )
    group_id, task_ids = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(2)]
    sent = SentAs(batch, "jobs.io.sleep")
    body = dict(app.signature("orchestrator.fan_in", args=(str(job_id),), queue=queue))
    backend._apply_chord_incr((group_id, [app.AsyncResult(t) for t in task_ids]), body)
    requests = [Context(id=t, group=group_id, chord=body, delivery_info={}) for t in task_ids]
    assert store.start_branches(job_id, [0, 1], sent).attempts == {0: 1, 1: 1}

    # The outcome's transaction fails after counting: neither the outcome nor the count is kept.
    first = backend.part_counter(requests[0])
    assert first is not None

    def count_then_fail(conn: Any) -> None:
        first(conn)
        raise RuntimeError("the database went away before the commit")

    with pytest.raises(RuntimeError):
        store.finish_branch(job_id, sent, Finished(0, 1, BranchState.SUCCEEDED, 1), also=count_then_fail)
    assert _counter(database_url, group_id) == (0, 2, False)
    assert store.get(job_id).branches[0].state == "running"

    # Committed: counted once with the outcome; the task's own chord step then does not count again,
    # nor does a redelivery of it (another thread, nothing remembered there).
    for index, request in enumerate(requests):
        counter = backend.part_counter(request)
        assert counter is not None
        won, _ = store.finish_branch(
            job_id, sent, Finished(index, 1, BranchState.SUCCEEDED, index), also=counter
        )
        assert won
        counter.committed()
        backend.on_chord_part_return(request, "SUCCESS", None)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(backend.on_chord_part_return, request, "SUCCESS", None).result()
        assert _counter(database_url, group_id) == (index + 1, 2, index == 1)
    assert client.llen(queue) == 1, "the body is published once, by the part that reached the total"
    assert store.get(job_id).branch_done == 2
    client.delete(queue)


# --- a worker killed between counting its part and acking it --------------------------------------


@pytest.mark.parametrize("mode", ["child", "worker"])
def test_a_part_killed_after_counting_is_counted_once_and_fires_once(tmp_path: Path, mode: str) -> None:
    """child: Celery acks a task whose result was stored, so the recovery sweep publishes the body.
    worker: RabbitMQ redelivers the part to a new worker, which takes over the publish at once."""
    with postgres_database() as database_url, rabbitmq_vhost() as broker_url:
        database.upgrade(database_url)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("ORCH_", "PLAIN_"))},
            "PLAIN_DATABASE_URL": database_url,
            "PLAIN_BROKER_URL": broker_url,
            "PLAIN_KILL_DIR": str(tmp_path),
            "PLAIN_LEASE": "1",
            "PYTHONPATH": str(ROOT),
        }
        argv = [
            *(sys.executable, "-m", "celery", "-A", "tests.plain_app", "worker"),
            *("-P", "prefork", "-c", "2", "-Q", "plain"),
            *("--without-mingle", "--without-gossip", "-l", "INFO"),
        ]
        workers = [spawn(argv, name="plain", env=env, log_dir=tmp_path)]
        try:
            workers[0].wait_ready(60)
            app = Celery(
                "client", broker=broker_url, backend=f"orchestrator.backend:SQLBackend+{database_url}"
            )
            app.conf.update(task_serializer="json", accept_content=["json"], task_default_queue="plain")
            last = str(uuid.uuid4())
            # The slowest part, so it is the one that reaches the total and claims the publish.
            (tmp_path / f"kill-{last}").write_text(mode)
            header = group(
                [app.signature("plain.add", (i, i)) for i in range(3)]
                + [app.signature("plain.add", (10, 10), {"seconds": 0.5}, task_id=last)]
            )
            result = chord(header)(app.signature("plain.tsum"))
            if mode == "worker":
                workers[0].process.wait(30)  # the whole worker died with its unacked message
                workers.append(spawn(argv, name="plain", env=env, log_dir=tmp_path))
            assert result.get(timeout=60) == 26, "\n".join(w.log()[-3000:] for w in workers)
            assert not (tmp_path / f"kill-{last}").exists(), "the fault was never injected"
            if mode == "child":  # the pool child really died (the main process reports it when it notices)
                deadline = time.monotonic() + 15
                while "SIGKILL" not in workers[0].log() and time.monotonic() < deadline:
                    time.sleep(0.1)
                assert "SIGKILL" in workers[0].log()
            assert _counter(database_url, result.parent.id) == (4, 4, True)
            assert (tmp_path / "body-runs").read_text().splitlines() == ["[0, 2, 4, 20]"]
        finally:
            for w in workers:
                w.stop(10)
