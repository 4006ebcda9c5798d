"""Retention: `orchestrator db prune` removes old final jobs and old results, nothing else."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select, update

from orchestrator import database
from orchestrator.embedded import orchestrator_executable
from orchestrator.models import Branch, Job, JobState, ResultRecord
from orchestrator.store import NewBranch, Store, utcnow
from tests.conftest import base_env

pytestmark = pytest.mark.integration


def test_prune_removes_only_old_final_jobs_and_old_results(database_url: str, tmp_path: Path) -> None:
    url = database_url
    store = Store(url)
    ids = []
    for _ in range(3):
        job_id, _ = store.create_job(name=None, fan_in="jobs.aggregate.collect",
                                     branches=[NewBranch("jobs.io.sleep", "io", [0], {})] * 2)  # fmt: skip
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
    done = subprocess.run([*orchestrator_executable(), "db", "prune", "--older-than", "2d"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 1 jobs and 1 result rows")
    with engine.connect() as conn:
        assert set(conn.execute(select(Job.id)).scalars()) == {recent, unfinished}
        assert conn.execute(select(func.count()).select_from(Branch)).scalar_one() == 4  # cascade
    assert backend.get_result("new-task") == 2 and backend.get_state("old-task") == "PENDING"
