"""The one database seam: engines (one per URL per process, never shared across a fork), every
PostgreSQL/SQLite difference (`Dialect`), and schema upgrades.

Celery's prefork pool forks after import, and a pooled connection used by two processes corrupts both,
so engines are created lazily and forgotten in every forked child.
"""

from __future__ import annotations

import enum
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from sqlalchemy import (
    JSON,
    ColumnElement,
    Connection,
    Engine,
    Float,
    Table,
    Text,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url

from .errors import ConfigurationError, SchemaNotReady

_engines: dict[str, Engine] = {}
_lock = threading.Lock()
#: The Alembic scripts of a checkout (an editable install, or its root on sys.path): its alembic/.
_MIGRATIONS = Path(__file__).resolve().parent.parent / "alembic"


#: From how many rows `Dialect.insert_rows` uses COPY on PostgreSQL (below, an executemany is as quick).
COPY_FROM = 100


def _copy_value(value: Any, is_json: bool) -> Any:
    if value is None:
        return None
    if is_json:
        return json.dumps(value)
    return str(value) if isinstance(value, enum.Enum) else value


_NOTIFY = select(func.pg_notify(bindparam("channel", type_=Text), bindparam("payload", type_=Text)))


@dataclass(frozen=True)
class Dialect:
    """What differs between the databases the orchestrator runs on, in one place."""

    name: str

    @property
    def notifies(self) -> bool:
        """True when a transaction can announce a change to listeners (PostgreSQL NOTIFY)."""
        return self.name == "postgresql"

    def insert(self, table: Any) -> Any:
        """An INSERT with the database's own upsert clauses (on_conflict_do_nothing / _update)."""
        return (postgresql if self.name == "postgresql" else sqlite).insert(table)

    def notify(self, conn: Connection, channel: str, payload: str) -> None:
        """Announce `payload` on `channel` when the transaction commits; nothing where it cannot."""
        if self.notifies:
            conn.execute(_NOTIFY, {"channel": channel, "payload": payload})

    def insert_rows(self, conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
        """Insert many rows of `table` (every row with the same keys) in the caller's transaction. On
        PostgreSQL, past COPY_FROM rows, with COPY: one stream instead of a statement per row, which
        is what makes a 50,000-branch job quick to record. Elsewhere an executemany."""
        if not rows:
            return
        if self.name != "postgresql" or len(rows) < COPY_FROM:
            conn.execute(insert(table), list(rows))
            return
        columns = list(rows[0])
        as_json = {c.name for c in table.columns if isinstance(c.type, JSON)}
        names = ", ".join(f'"{c}"' for c in columns)
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
            for row in rows:
                copy.write_row([_copy_value(row[c], c in as_json) for c in columns])

    def seconds_between(self, start: Any, end: Any) -> ColumnElement[Any]:
        """`end - start` in seconds, in the database's own date arithmetic."""
        if self.name == "sqlite":
            return cast((func.julianday(end) - func.julianday(start)) * 86400.0, Float)
        return func.extract("epoch", end - start)


def dialect(url_or_bind: str | Engine | Connection) -> Dialect:
    """The Dialect of a database URL, engine or connection."""
    if isinstance(url_or_bind, str):
        return Dialect("sqlite" if url_or_bind.startswith("sqlite") else "postgresql")
    return Dialect(url_or_bind.dialect.name)


def _forget_engines_after_fork() -> None:
    # close=False: the parent's pooled connections belong to the parent; only drop our references.
    for engine in _engines.values():
        engine.dispose(close=False)
    _engines.clear()


os.register_at_fork(after_in_child=_forget_engines_after_fork)


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when transactions begin (see _on_begin).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # IMMEDIATE takes the write lock up front: a deferred transaction that reads and then writes
        # fails at once with SQLITE_BUSY under WAL instead of waiting for busy_timeout.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


# user:password@ in a URL, with or without its scheme: the fallback when SQLAlchemy cannot parse it.
_URL_PASSWORD = re.compile(r"(?P<head>(?:[\w+.-]*://)?[^:/@\s]*:)(?P<password>[^@\s]*)@")


def redact(text: str, url: str) -> str:
    """`text` with the password of `url` masked wherever it appears: error messages about a database URL
    (ours or the driver's) must never print its secret. Works even when the URL cannot be parsed."""
    secret: str | None
    try:
        parsed = make_url(url)
        shown, secret = parsed.render_as_string(hide_password=True), parsed.password
    except Exception:
        match = _URL_PASSWORD.search(url)
        shown = _URL_PASSWORD.sub(r"\g<head>***@", url)
        secret = match["password"] if match else None
    if url:
        text = text.replace(url, shown)
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    for form in {secret or "", unquote(secret or "")}:
        if form:
            text = text.replace(form, "***")
    return text


def get_engine(url: str) -> Engine:
    engine = _engines.get(url)
    if engine is not None:
        return engine
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            try:
                if url.startswith("sqlite"):
                    engine = _sqlite_engine(url)
                else:
                    # Kept connections must cover a thread pool's concurrent transactions: an overflow
                    # connection is closed on return, so each transaction past pool_size would pay for a
                    # new PostgreSQL connection (measured: +60 ms per io branch with 8 threads at 5).
                    engine = create_engine(url, pool_size=32, max_overflow=32, pool_pre_ping=True)
            except Exception as exc:  # bad URL, missing driver
                # from None: the original exception's text may hold the password too.
                raise ConfigurationError(
                    f"cannot use database URL {redact(url, url)!r}: {redact(str(exc), url)}"
                ) from None
            _engines[url] = engine
    return engine


def migrations_location() -> Path:
    """The directory of the Alembic scripts (env.py, script.py.mako, versions/).

    Installed, they are the package `orchestrator.migrations`: pyproject.toml maps it onto the repository's
    alembic/, so the wheel carries them as orchestrator/migrations/. Run from a checkout they are that
    checkout's alembic/: an editable install's import hook cannot find a package without __init__.py
    nested in another, the checkout's root on sys.path has no such package, and a stale
    orchestrator/migrations/__pycache__ left by an older checkout holds no env.py.
    """
    from importlib.resources import files

    try:
        env = files("orchestrator.migrations").joinpath("env.py")
    except ModuleNotFoundError:
        return _MIGRATIONS
    return env.parent if isinstance(env, Path) and env.is_file() else _MIGRATIONS


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_location()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["engine"] = get_engine(url)
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations; safe to run from several processes at once on PostgreSQL (one wins the lock)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def require_schema(url: str) -> None:
    if not inspect(get_engine(url)).has_table("jobs"):
        raise SchemaNotReady(
            f"the database at {make_url(url).render_as_string(hide_password=True)} has no orchestrator "
            "tables: run `orchestrator db upgrade`"
        )
