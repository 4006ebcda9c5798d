"""Alembic environment: runs on the engine the orchestrator gives it, so SQLite pragmas apply too."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from orchestrator.database import get_engine
from orchestrator.models import Base
from orchestrator.settings import Settings

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url") or Settings.from_env().database_url
    engine = config.attributes.get("engine") or get_engine(url)
    with engine.connect() as connection:
        if connection.dialect.name == "postgresql":
            # Two workers starting at once must not both create the tables.
            connection.execute(text("SELECT pg_advisory_xact_lock(74151)"))
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `orchestrator db upgrade`")
run_migrations_online()
