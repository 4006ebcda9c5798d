"""The metrics collector's SQL works on SQLite too (the embedded default), not only PostgreSQL."""

from __future__ import annotations

import uuid
from datetime import timedelta

from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import update

from orchestrator import Orchestrator
from orchestrator.cli.metrics import SQLCollector
from orchestrator.models import Branch, BranchState, utcnow
from orchestrator.store import NewBranch, SentAs


def test_collect_on_sqlite(embedded_orc: Orchestrator) -> None:
    store = embedded_orc.store
    new = NewBranch("jobs.io.sleep", "io", [0.3], {}, str(uuid.uuid4()))
    job_id, _ = store.create_job(name="m", fan_in="jobs.aggregate.collect", branches=[new])
    store.start_branch(job_id, 0, SentAs(new.celery_task_id or "", new.task))
    with store.engine.begin() as conn:
        now = utcnow()
        started = now - timedelta(seconds=0.3)
        conn.execute(update(Branch).values(started_at=started, finished_at=now, state=BranchState.SUCCEEDED))
    registry = CollectorRegistry()
    registry.register(SQLCollector(embedded_orc.settings, embedded_orc.app))
    text = generate_latest(registry).decode()
    assert 'orchestrator_jobs{state="pending"} 1.0' in text
    assert 'orchestrator_branches{state="succeeded",task="jobs.io.sleep"} 1.0' in text
    assert 'orchestrator_branch_duration_seconds_bucket{le="0.25",task="jobs.io.sleep"} 0.0' in text
    assert 'orchestrator_branch_duration_seconds_bucket{le="0.5",task="jobs.io.sleep"} 1.0' in text
    assert 'orchestrator_queue_depth{queue="io"} 0.0' in text
