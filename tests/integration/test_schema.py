"""The Alembic migrations produce exactly the models' schema, on PostgreSQL and SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from orchestrator import database
from orchestrator.models import Base
from tests.services import postgres_database


def _diff(url: str) -> list[object]:
    database.upgrade(url)
    with database.get_engine(url).connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return list(compare_metadata(ctx, Base.metadata))


@pytest.mark.integration
def test_migrated_postgres_schema_equals_the_models() -> None:
    with postgres_database() as url:
        assert _diff(url) == []
        database.upgrade(url)  # idempotent: a second run (another worker starting) changes nothing
        assert _diff(url) == []


def test_migrated_sqlite_schema_equals_the_models(tmp_path: Path) -> None:
    assert _diff(f"sqlite:///{tmp_path / 'o.db'}") == []
