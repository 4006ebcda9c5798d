"""The one database seam: engines (one per URL per process, never shared across a fork), every
PostgreSQL/SQLite difference (`Dialect`), and schema upgrades.

Celery's prefork pool forks after import, and a pooled connection used by two processes corrupts both,
so engines are created lazily and forgotten in every forked child.

How a process connects to a database (pool size, when to ping, prepared statements, where to LISTEN) is
a `ConnectionOptions` per URL: `configure(settings)` sets it for the settings' database; a URL nobody
configured takes the ORCH_* environment's options when it is the environment's database, else defaults.
"""

from __future__ import annotations

import enum
import json
import os
import re
import threading
import time
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
from sqlalchemy.exc import DisconnectionError

from .errors import ConfigurationError, SchemaNotReady
from .settings import Settings

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


#: Pooled connections a process keeps, and opens beyond them for a burst, when nothing says otherwise
#: (a client, the web view, metrics). `orchestrator worker` derives its pools' own from their concurrency.
DEFAULT_POOL_SIZE = 10
DEFAULT_MAX_OVERFLOW = 20
#: A pooled connection idle this long is pinged before it is handed out (dropped by a restart or a
#: firewall, it is replaced instead of failing the transaction). A connection back from a transaction a
#: moment ago is not: on the hot path a ping is one more round trip per transaction.
DEFAULT_PING_AFTER = 10.0
#: How long PostgreSQL lets one of our sessions sit idle inside a transaction before it ends the session.
#: Every transaction here is a few statements with nothing in between; a session idle inside one belongs
#: to a process that was paused (SIGSTOP, a frozen VM) or cut off mid-transaction, and the row locks it
#: holds (a job row: every finish, claim and rescue sweep of that job waits on it) would otherwise last
#: until it resumes. The fault suite found a paused io pool holding a job's row this way for its whole
#: 60 s pause. Behind a transaction pooler PgBouncer's own idle_transaction_timeout does this.
DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT = 10.0


@dataclass(frozen=True)
class ConnectionOptions:
    """How this process connects to one database URL."""

    pool_size: int = DEFAULT_POOL_SIZE  # connections kept open once opened
    max_overflow: int = DEFAULT_MAX_OVERFLOW  # opened beyond those for a burst, closed on return
    ping_after: float = DEFAULT_PING_AFTER  # seconds idle before a checkout pings; 0: every checkout
    # False behind a transaction pooler (PgBouncer pool_mode=transaction): the next transaction may run
    # on another server connection, which has none of this one's prepared statements.
    prepared_statements: bool = True
    # Where to LISTEN for final job moves: None for this URL itself, unless `can_listen` is False.
    listen_url: str | None = None
    can_listen: bool = True  # False: a transaction pooler and no direct URL; waits poll
    # Seconds a session may sit idle inside a transaction before PostgreSQL ends it; None: not set (a
    # pooler refuses the startup option; PgBouncer's idle_transaction_timeout is its equivalent).
    idle_in_transaction_timeout: float | None = DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionOptions:
        pooled = settings.db_pooler == "transaction"
        overflow = settings.db_max_overflow
        return cls(
            pool_size=settings.db_pool_size or DEFAULT_POOL_SIZE,
            max_overflow=DEFAULT_MAX_OVERFLOW if overflow is None else overflow,
            ping_after=settings.db_ping_after,
            prepared_statements=not pooled,
            listen_url=settings.listen_database_url,
            can_listen=settings.listen_database_url is not None or not pooled,
            idle_in_transaction_timeout=None if pooled else DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
        )


_options: dict[str, ConnectionOptions] = {}


def configure(settings: Settings) -> None:
    """Connect to `settings.database_url` as `settings` say, from now on in this process (an engine
    already made for it with other options is replaced). Entry points call it with their Settings."""
    set_options(settings.database_url, ConnectionOptions.from_settings(settings))


def set_options(url: str, options: ConnectionOptions) -> None:
    with _lock:
        if _options.get(url) == options:
            return
        _options[url] = options
        stale = _engines.pop(url, None)
    if stale is not None:
        stale.dispose()


def options(url: str) -> ConnectionOptions:
    """The options of `url`: configured, else (decided once per URL and process) the ORCH_* environment's
    when `url` is the environment's database, as in every worker, else the defaults."""
    found = _options.get(url)
    if found is None:
        env = Settings.from_env()
        found = ConnectionOptions.from_settings(env) if env.database_url == url else ConnectionOptions()
        found = _options.setdefault(url, found)  # no lock: get_engine calls this holding _lock
    return found


def listen_url(url: str) -> str | None:
    """Where a waiter LISTENs for the final moves announced in `url`'s transactions; None: it cannot
    (SQLite, or a transaction pooler without ORCH_LISTEN_DATABASE_URL), so it polls."""
    if not dialect(url).notifies:
        return None
    opts = options(url)
    if not opts.can_listen:
        return None
    return opts.listen_url or url


def _ping_when_idle(engine: Engine, after: float) -> None:
    """Ping a pooled connection at checkout only when it sat idle `after` seconds or more; one that fails
    the ping is replaced (DisconnectionError makes the pool connect again)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        if dbapi_connection is not None:
            record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")  # none yet: a connection made just now
        if since is None or time.monotonic() - since < after:
            return
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as exc:
            if dialect.is_disconnect(exc, dbapi_connection, None):
                raise DisconnectionError("a pooled connection failed its ping") from exc
            raise


def _postgres_engine(url: str, opts: ConnectionOptions) -> Engine:
    # Kept connections must cover a thread pool's concurrent transactions: an overflow connection is
    # closed on return, so each transaction past pool_size would pay for a new PostgreSQL connection
    # (measured: +60 ms per io branch with 8 threads at 5). `orchestrator worker` sizes them per pool.
    connect_args: dict[str, Any] = {} if opts.prepared_statements else {"prepare_threshold": None}
    if opts.idle_in_transaction_timeout is not None:
        # A startup option, so it costs no round trip; before the URL's own options, which win.
        given = make_url(url).query.get("options", "")
        ms = max(1, round(opts.idle_in_transaction_timeout * 1000))
        own = f"-c idle_in_transaction_session_timeout={ms}"
        connect_args["options"] = f"{own} {given if isinstance(given, str) else ' '.join(given)}".strip()
    engine = create_engine(
        url,
        pool_size=opts.pool_size,
        max_overflow=opts.max_overflow,
        pool_pre_ping=opts.ping_after == 0,
        connect_args=connect_args,
    )
    if opts.ping_after > 0:
        _ping_when_idle(engine, opts.ping_after)
    return engine


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
                    engine = _postgres_engine(url, options(url))
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
