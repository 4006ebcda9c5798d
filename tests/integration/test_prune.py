"""Retention: `orchestrator db prune` removes old final jobs and old results, nothing else."""

from __future__ import annotations

import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select, update

from orchestrator import InvalidArgument, branch, database
from orchestrator.cli.processes import orchestrator_executable
from orchestrator.models import Branch, ChordCounter, ChordPart, Job, JobState, ResultRecord, utcnow
from orchestrator.store import NewBranch, Store
from orchestrator.tasks import BODIES_WITHOUT_HEADER_RESULTS
from tests.conftest import Stack, base_env

pytestmark = pytest.mark.integration


def test_prune_removes_only_old_final_jobs_and_old_results(database_url: str, tmp_path: Path) -> None:
    url = database_url
    store = Store(url)
    ids = []
    for _ in range(3):
        job_id, _ = store.create_job(
            name=None,
            fan_in="jobs.aggregate.collect",
            branches=[NewBranch("jobs.io.sleep", "io", [0], {})] * 2,
        )
        ids.append(job_id)
    old, recent, unfinished = ids
    engine = database.get_engine(url)
    with engine.begin() as conn:
        long_ago = utcnow() - timedelta(days=3)
        conn.execute(update(Job).where(Job.id == old).values(state=JobState.SUCCEEDED, finished_at=long_ago))
        conn.execute(update(Job).where(Job.id == recent).values(state=JobState.FAILED, finished_at=utcnow()))
        conn.execute(update(Job).where(Job.id == unfinished).values(state=JobState.RUNNING))
    backend = Celery(backend=f"orchestrator.backend:SQLBackend+{url}").backend
    backend.store_result("old-task", 1, "SUCCESS")
    backend.store_result("new-task", 2, "SUCCESS")
    with engine.begin() as conn:
        conn.execute(
            update(ResultRecord).where(ResultRecord.key.like("%old-task")).values(updated_at=long_ago)
        )

    env = base_env(tmp_path, ORCH_DATABASE_URL=url)
    done = subprocess.run(
        [*orchestrator_executable(), "db", "prune", "--older-than", "2d"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 jobs and 1 result rows")
    with engine.connect() as conn:
        assert set(conn.execute(select(Job.id)).scalars()) == {recent, unfinished}
        assert conn.execute(select(func.count()).select_from(Branch)).scalar_one() == 4  # cascade
    assert backend.get_result("new-task") == 2 and backend.get_state("old-task") == "PENDING"


def _prune(env: dict[str, str], age: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*orchestrator_executable(), "db", "prune", "--older-than", age],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_prune_never_strands_a_running_job(pg_stack: Stack) -> None:
    """A running job's chord join is older than the age given, but nothing waits on it yet: pruning it
    would leave the job running forever with every branch succeeded."""
    orc = pg_stack.orc
    job = orc.submit([branch("jobs.io.sleep", 2.5), branch("jobs.io.sleep", 0.1)], "jobs.aggregate.total")
    time.sleep(1.2)
    done = _prune(pg_stack.env, "1s")
    assert done.returncode == 0, done.stderr
    view = orc.wait(job.id, timeout=30)
    assert (view.state, view.result) == ("succeeded", 2.6)

    # Once the job is final its join is prunable like any other.
    time.sleep(1.1)
    assert _prune(pg_stack.env, "1s").returncode == 0
    with database.get_engine(orc.settings.database_url).connect() as conn:
        assert conn.execute(select(func.count()).select_from(ChordCounter)).scalar_one() == 0
        assert conn.execute(select(func.count()).select_from(ChordPart)).scalar_one() == 0


def test_prune_keeps_the_joins_and_group_results_of_unfinished_chords(database_url: str) -> None:
    """Of old joins, only fired ones and those of final (or deleted) jobs go; a plain Celery chord still
    waiting keeps its join and its group result, whatever its age."""
    store = Store(database_url)
    running, _ = store.create_job(
        name=None, fan_in="jobs.aggregate.collect", branches=[NewBranch("jobs.io.sleep", "io", [0], {})]
    )
    final, _ = store.create_job(
        name=None, fan_in="jobs.aggregate.collect", branches=[NewBranch("jobs.io.sleep", "io", [0], {})]
    )
    store.cancel(final)
    app = Celery(backend=f"orchestrator.backend:SQLBackend+{database_url}")
    app.conf.chord_bodies_without_header_results = list(BODIES_WITHOUT_HEADER_RESULTS)
    backend = app.backend
    bodies = {
        "fired": app.signature("orchestrator.fan_in", args=(str(uuid.uuid4()),)),
        "running-job": app.signature("orchestrator.fan_in", args=(str(running),)),
        "final-job": app.signature("orchestrator.fan_in", args=(str(final),)),
        "deleted-job": app.signature("orchestrator.fan_in", args=(str(uuid.uuid4()),)),
        "plain-chord": app.signature("myapp.body"),
    }
    for group_id, body in bodies.items():
        backend._apply_chord_incr((group_id, [app.AsyncResult(f"{group_id}-part")]), body)
    long_ago = utcnow() - timedelta(days=3)
    with database.get_engine(database_url).begin() as conn:
        conn.execute(update(ChordCounter).values(created_at=long_ago))
        conn.execute(update(ChordCounter).where(ChordCounter.group_id == "fired").values(fired=True))
        conn.execute(update(ResultRecord).values(updated_at=long_ago))

    backend.prune(timedelta(days=1))
    with database.get_engine(database_url).connect() as conn:
        kept = set(conn.execute(select(ChordCounter.group_id)).scalars())
        results = set(conn.execute(select(ResultRecord.key)).scalars())
    assert kept == {"running-job", "plain-chord"}
    assert results == {"celery-taskset-meta-plain-chord"}  # the plain chord's join still needs it


@pytest.mark.parametrize("age", ["0s", "-3650d", "-1"])
def test_prune_refuses_an_age_that_is_not_positive(database_url: str, tmp_path: Path, age: str) -> None:
    done = _prune(base_env(tmp_path, ORCH_DATABASE_URL=database_url), age)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"error: a retention age must be positive, got {_age(age)}"]
    with pytest.raises(InvalidArgument):
        Store(database_url).prune(timedelta(0))


def _age(text: str) -> timedelta:
    units = {"s": 1, "d": 86400}
    return timedelta(seconds=float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text))
