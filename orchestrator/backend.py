"""A Celery result backend in the orchestrator's SQL database whose chord join is an atomic counter.

Celery's own database backend joins a chord by polling (`celery.chord_unlock` retries every second).
Here every header task's completion counts itself once, in one transaction: it inserts its
(group, task) row -- a redelivered task finds the row and does not count again -- and increments the
chord's counter with `UPDATE ... RETURNING`. The increment that reaches the total publishes the body at
once; no lock is held across the publish. Results are a key/value table so Celery's own group save,
restore and native join work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import maybe_signature
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import GroupResult, allow_join_result
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from .database import get_engine
from .models import ChordCounter, ChordPart, ResultRecord
from .store import utcnow

logger = logging.getLogger(__name__)


def _key(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


class SQLBackend(KeyValueStoreBackend):  # type: ignore[misc]
    """`ORCH_RESULT_BACKEND=sql` (the default): results and chord joins in the orchestrator's database."""

    supports_native_join = True
    implements_incr = True
    supports_autoexpire = False

    def __init__(self, url: str | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not url:
            raise ImproperlyConfigured("SQLBackend needs a database URL, e.g. orchestrator+sqlite:///x.db")
        self.url = url
        self._insert = (postgresql if url.startswith("postgres") else sqlite).insert

    @property
    def engine(self) -> Engine:
        return get_engine(self.url)

    def as_uri(self, include_password: bool = False) -> str:
        return f"orchestrator+{self.url if include_password else self.url.split('@')[-1]}"

    # --- key/value primitives Celery builds results, groups and joins on ---------------------------

    def get(self, key: str | bytes) -> bytes | None:
        with self.engine.connect() as conn:
            value: bytes | None = conn.execute(
                select(ResultRecord.value).where(ResultRecord.key == _key(key))
            ).scalar_one_or_none()
        return value

    def mget(self, keys: Sequence[str | bytes]) -> list[bytes | None]:
        wanted = [_key(k) for k in keys]
        with self.engine.connect() as conn:
            found = dict(
                conn.execute(
                    select(ResultRecord.key, ResultRecord.value).where(ResultRecord.key.in_(wanted))
                ).all()
            )
        return [found.get(k) for k in wanted]

    def set(self, key: str | bytes, value: str | bytes) -> None:
        stmt = self._insert(ResultRecord).values(key=_key(key), value=_bytes(value), updated_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=[ResultRecord.key],
            set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at},
        )
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def delete(self, key: str | bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(ResultRecord).where(ResultRecord.key == _key(key)))

    def incr(self, key: str | bytes) -> int:
        """Celery's generic counter; the chord join below uses its own deduplicated counter instead."""
        return self._count(_key(key), None)[0]

    def expire(self, key: str | bytes, value: Any) -> None:
        """Retention is by age (`orchestrator db prune`), not per key."""

    # --- the chord join ----------------------------------------------------------------------------

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        stmt = self._insert(ChordCounter).values(
            group_id=group_id, done=0, total=chord_size, fired=False, created_at=utcnow()
        )
        stmt = stmt.on_conflict_do_update(index_elements=[ChordCounter.group_id], set_={"total": chord_size})
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def _count(self, group_id: str, task_id: str | None) -> tuple[int, int | None, bool, bool]:
        """Count one part once: returns (done, total, fired, counted_now) in one transaction."""
        with self.engine.begin() as conn:
            if task_id is not None:
                claimed = conn.execute(
                    self._insert(ChordPart)
                    .values(group_id=group_id, task_id=task_id)
                    .on_conflict_do_nothing(index_elements=[ChordPart.group_id, ChordPart.task_id])
                ).rowcount
                if not claimed:
                    row = conn.execute(
                        select(ChordCounter.done, ChordCounter.total, ChordCounter.fired).where(
                            ChordCounter.group_id == group_id
                        )
                    ).one()
                    return row.done, row.total, row.fired, False
            stmt = self._insert(ChordCounter).values(
                group_id=group_id, done=1, total=None, fired=False, created_at=utcnow()
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=[ChordCounter.group_id], set_={"done": ChordCounter.done + 1}
            ).returning(ChordCounter.done, ChordCounter.total, ChordCounter.fired)
            row = conn.execute(stmt).one()
            return row.done, row.total, row.fired, True

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        gid, tid = request.group, request.id
        if not gid or not tid or not request.chord:
            return
        done, total, fired, counted_now = self._count(gid, tid)
        if total is None:
            total = request.chord.get("chord_size")
        if total is None or done < total:
            return
        if not counted_now and fired:
            return  # a redelivered part of a chord whose body is already out
        if not counted_now:
            # The part that reached the total died before publishing: its redelivery publishes instead.
            logger.warning("chord %s: re-publishing a body that was never marked sent", gid)
        elif done > total:
            logger.warning("chord %s counted %d parts for %d", gid, done, total)
            return
        self._fire(gid, request.chord)

    def _fire(self, gid: str, body: Any) -> None:
        app = self.app
        callback = maybe_signature(body, app=app)
        deps = GroupResult.restore(gid, backend=self)
        if deps is None:
            self.chord_error_from_stack(callback, ChordError(f"GroupResult {gid} no longer exists"))
            return
        try:
            with allow_join_result():
                ret = deps.join_native(timeout=app.conf.result_chord_join_timeout, propagate=True)
        except Exception as exc:
            try:
                culprit = next(deps._failed_join_report())
                reason = f"Dependency {culprit.id} raised {exc!r}"
            except StopIteration:
                reason = repr(exc)
            logger.error("chord %s raised: %s", gid, reason)
            error = ChordError(reason)
            error.__cause__ = exc
            self.chord_error_from_stack(callback=callback, exc=error)
        else:
            try:
                app.amqp._retry_publish(callback.delay, ret)
            except Exception as exc:
                logger.exception("chord %s: publishing the body failed", gid)
                error = ChordError(f"Callback error: {exc!r}")
                error.__cause__ = exc
                self.chord_error_from_stack(callback=callback, exc=error)
        with self.engine.begin() as conn:
            conn.execute(update(ChordCounter).where(ChordCounter.group_id == gid).values(fired=True))

    # --- retention ---------------------------------------------------------------------------------

    def prune(self, older_than: timedelta) -> int:
        """Delete results and finished chord joins older than `older_than`; returns rows removed."""
        cutoff: datetime = utcnow() - older_than
        with self.engine.begin() as conn:
            old_groups = select(ChordCounter.group_id).where(ChordCounter.created_at < cutoff)
            removed = conn.execute(delete(ChordPart).where(ChordPart.group_id.in_(old_groups))).rowcount
            removed += conn.execute(delete(ChordCounter).where(ChordCounter.created_at < cutoff)).rowcount
            removed += conn.execute(delete(ResultRecord).where(ResultRecord.updated_at < cutoff)).rowcount
        return int(removed)

    def cleanup(self) -> None:
        if self.expires:
            self.prune(timedelta(seconds=self.expires))
