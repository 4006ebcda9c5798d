"""What a user sees when the database has no schema yet, or the broker is down at submit."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator import JobSpec, Orchestrator, PublishError, SchemaNotReady, Settings, branch
from orchestrator.database import get_engine
from orchestrator.models import Branch, Job
from tests.conftest import base_env
from tests.services import postgres_database

pytestmark = pytest.mark.integration


def test_a_database_without_the_schema_is_a_clear_error(tmp_path: Path) -> None:
    with postgres_database() as url:
        settings = Settings.from_env(base_env(tmp_path, ORCH_DATABASE_URL=url))
        with pytest.raises(SchemaNotReady, match="has no orchestrator tables: run `orchestrator db upgrade`"):
            Orchestrator(settings)


def test_a_broker_that_is_down_fails_the_job_and_says_so(tmp_path: Path) -> None:
    # Nothing listens on port 1: every publish attempt is refused at once.
    env = base_env(tmp_path, ORCH_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    orc = Orchestrator(Settings.from_env(env))
    orc.app.conf.broker_connection_max_retries = 1
    orc.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    with pytest.raises(PublishError, match="was recorded but could not be published"):
        orc.submit([branch("jobs.io.sleep", 0.1), branch("jobs.io.sleep", 0.1)], "jobs.aggregate.collect")
    with get_engine(orc.settings.database_url).connect() as conn:
        job = conn.execute(select(Job.state, Job.error, Job.finished_at)).one()
        states = conn.execute(select(Branch.state)).scalars().all()
    assert job.state == "failed" and job.error.startswith("could not publish the job")
    assert job.finished_at is not None
    assert states == ["cancelled", "cancelled"]  # nothing left pending that could run later


def test_a_broker_that_is_down_fails_every_job_of_a_bulk_submit(tmp_path: Path) -> None:
    env = base_env(tmp_path, ORCH_BROKER_URL="amqp://guest:guest@127.0.0.1:1//")
    orc = Orchestrator(Settings.from_env(env))
    orc.app.conf.broker_connection_max_retries = 1
    orc.app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    specs = [JobSpec([branch("jobs.io.sleep", 0.1)] * 2, "jobs.aggregate.collect") for _ in range(3)]
    with pytest.raises(PublishError, match=r"3 jobs .* were recorded but could not be published") as raised:
        orc.submit_many(specs)
    assert raised.value.published == 0
    with get_engine(orc.settings.database_url).connect() as conn:
        jobs = conn.execute(select(Job.state, Job.error)).all()
        states = conn.execute(select(Branch.state)).scalars().all()
    assert [j.state for j in jobs] == ["failed"] * 3
    assert all(j.error.startswith("could not publish the job") for j in jobs)
    assert states == ["cancelled"] * 6
