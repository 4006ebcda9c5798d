"""Apps are built from Settings, not from the environment: one process talks to two deployments."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator import Orchestrator, branch
from orchestrator.models import Job
from tests.conftest import running_stack

pytestmark = pytest.mark.integration


def test_two_orchestrators_on_different_settings_side_by_side(tmp_path: Path) -> None:
    with (
        running_stack("sqlite-embedded", tmp_path / "embedded") as embedded,
        running_stack("postgres-rabbitmq", tmp_path / "production") as production,
    ):
        first, second = Orchestrator(embedded.settings, migrate=True), Orchestrator(production.settings)
        assert first.app is not second.app
        assert first.app.conf.broker_url != second.app.conf.broker_url
        jobs = [
            (
                orc,
                orc.submit(
                    [branch("tests.catalog.io_pid"), branch("jobs.cpu.count_primes", limit=100)],
                    "jobs.aggregate.collect",
                    name=name,
                ),
            )
            for orc, name in ((first, "embedded"), (second, "production"), (first, "embedded-2"))
        ]
        views = [orc.wait(job.id, timeout=60) for orc, job in jobs]
        assert [v.state for v in views] == ["succeeded"] * 3, embedded.logs() + production.logs()
        # Each job was recorded, and run, by its own deployment only.
        for orc, names in ((first, {"embedded", "embedded-2"}), (second, {"production"})):
            with orc.store.engine.connect() as conn:
                assert set(conn.scalars(Job.__table__.select().with_only_columns(Job.name))) == names
        io_pids = {v.name: v.branches[0].result["pid"] for v in views}
        assert io_pids["embedded"] == embedded.workers["io"].pid
        assert io_pids["production"] == production.workers["io"].pid
