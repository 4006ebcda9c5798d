"""The database's clock as SQL: heartbeats and stall checks compare times the database wrote, so no
worker's or client's clock (skewed, or paused with its process) ever decides that work is lost.

PostgreSQL has `statement_timestamp()`; SQLite (the embedded default, one machine) has
`strftime(..., 'now')`, the same UTC clock its file lives by. Both are rendered per dialect at compile
time, so the store's statements can still be built once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Float
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ColumnElement, FunctionElement

from .models import UTCDateTime


class db_now(FunctionElement[Any]):
    """The database's current time, optionally minus `seconds` (a number or a bind parameter)."""

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, seconds: ColumnElement[Any] | float = 0.0) -> None:
        from sqlalchemy import literal

        value = seconds if isinstance(seconds, ColumnElement) else literal(float(seconds), Float)
        super().__init__(value)


@compiles(db_now, "postgresql")
def _now_postgresql(element: db_now, compiler: Any, **kw: Any) -> str:
    (seconds,) = element.clauses
    return f"(statement_timestamp() - make_interval(secs => {compiler.process(seconds, **kw)}))"


@compiles(db_now, "sqlite")
def _now_sqlite(element: db_now, compiler: Any, **kw: Any) -> str:
    # The format SQLAlchemy stores SQLite datetimes in, so comparisons with stored values hold as text.
    (seconds,) = element.clauses
    offset = compiler.process(seconds, **kw)
    return f"strftime('%Y-%m-%d %H:%M:%f000', 'now', '-' || ({offset}) || ' seconds')"
