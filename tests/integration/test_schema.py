"""The Alembic migrations produce exactly the models' schema, on PostgreSQL and SQLite; the scripts authors
write with `alembic revision` (alembic.ini, alembic/) are the ones `orchestrator db upgrade` runs."""

from __future__ import annotations

from pathlib import Path

import alembic
import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext

from orchestrator import database
from orchestrator.models import Base
from tests.conftest import ROOT
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


def test_authors_write_the_scripts_that_db_upgrade_runs() -> None:
    authors = Config(str(ROOT / "alembic.ini")).get_main_option("script_location")
    assert authors is not None
    assert Path(authors).resolve() == database.migrations_location().resolve() == ROOT / "alembic"
    assert (ROOT / "alembic" / "env.py").is_file()


def test_the_alembic_folder_never_shadows_the_library() -> None:
    """pytest puts the repository root on sys.path; alembic/ there has no __init__.py, so it is at most a
    namespace portion, which the installed library (a regular package) wins over."""
    assert not (ROOT / "alembic" / "__init__.py").exists()
    library = Path(alembic.__file__).resolve()
    # The library, never the migrations folder (the virtualenv may itself live in the checkout).
    assert not library.is_relative_to(ROOT / "alembic")
    assert library.name == "__init__.py" and (library.parent / "command.py").is_file()
