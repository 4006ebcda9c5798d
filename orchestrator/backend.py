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
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from celery import bootsteps, maybe_signature
from celery.backends.base import KeyValueStoreBackend
from celery.exceptions import ChordError, ImproperlyConfigured
from celery.result import GroupResult, allow_join_result
from sqlalchemy import (
    Connection,
    Engine,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    literal,
    or_,
    select,
    update,
)

from .database import dialect, get_engine
from .models import FINAL_JOB_STATES, ChordCounter, ChordPart, Job, ResultRecord, UTCDateTime, cutoff, utcnow

logger = logging.getLogger(__name__)


def _key(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def _bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


@dataclass(frozen=True)
class _Part:
    done: int
    total: int | None
    counted: bool  # this delivery counted the part (False: a redelivery found it counted)
    fired: bool
    claimed: bool = False  # this delivery reached the total and owns the publish


_GID = bindparam("gid", type_=String)
_TID = bindparam("tid", type_=String)
_NOW = bindparam("now", type_=UTCDateTime())
_COUNTER = select(ChordCounter.done, ChordCounter.total, ChordCounter.fired).where(
    ChordCounter.group_id == _GID
)
# The increment that reaches the total claims the publish in the same UPDATE (old values on the right).
_REACHES_TOTAL = and_(ChordCounter.done + 1 == ChordCounter.total, ChordCounter.claimed_by.is_(None))
_BUMP = (
    update(ChordCounter)
    .where(ChordCounter.group_id == _GID)
    .values(
        done=ChordCounter.done + 1,
        claimed_by=case((_REACHES_TOTAL, _TID), else_=ChordCounter.claimed_by),
        claimed_at=case((_REACHES_TOTAL, _NOW), else_=ChordCounter.claimed_at),
    )
    .returning(ChordCounter.done, ChordCounter.total, ChordCounter.claimed_by)
)
#: Parts counted inside a task's own outcome transaction, awaiting that task's on_chord_part_return.
#: Per thread (per greenlet under gevent): a pool thread runs a task and then its chord step.
_counted = threading.local()
#: In `_counted` for a delivery that must not count its part (see PartCounter.withhold).
_WITHHELD = _Part(0, None, counted=False, fired=False)


@dataclass
class PartCounter:
    """Counts one header task's chord part inside the transaction that records the task's own outcome.

    One commit instead of two, and an outcome and its count can never disagree. Call it with the open
    connection inside the transaction, then `committed()` once the transaction has committed; the task's
    on_chord_part_return then only publishes (or not) and does not count again.
    """

    backend: SQLBackend
    group_id: str
    task_id: str
    part: _Part | None = None

    def __call__(self, conn: Connection) -> None:
        self.part = self.backend.count_part(conn, self.group_id, self.task_id)

    def committed(self) -> None:
        if self.part is not None:
            _counted.parts = {(self.group_id, self.task_id): self.part}

    def withhold(self) -> None:
        """This delivery recorded nothing while its message's branches are still pending or running
        elsewhere: a duplicate delivery, or a run that was taken over while it was paused. Counting its
        part now would complete the chord, and run the fan-in, before those branches end; the run that
        records them counts the message."""
        _counted.parts = {(self.group_id, self.task_id): _WITHHELD}


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
        self._sizes: dict[str, int] = {}  # chord sizes this process stored in apply_chord
        #: Seconds after which a publish claim whose worker never marked the body sent may be taken over.
        self.publish_lease = float(self.app.conf.get("chord_publish_lease") or 30.0)
        #: Chord bodies that read their inputs elsewhere (the orchestrator's fan-in reads SQL), from the
        #: app's `chord_bodies_without_header_results`: their header tasks may ignore results, and the
        #: join passes them an empty list instead of joining. Such a body's first argument is its job id.
        self.bodies_without_header_results = frozenset(
            self.app.conf.get("chord_bodies_without_header_results") or ()
        )
        self._insert = dialect(url).insert
        self._insert_part = (
            self._insert(ChordPart)
            .values(group_id=_GID, task_id=_TID)
            .on_conflict_do_nothing(index_elements=[ChordPart.group_id, ChordPart.task_id])
            .returning(ChordPart.task_id)
        )

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
        with self.engine.begin() as conn:
            self._upsert_result(conn, key, value)

    def _upsert_result(self, conn: Any, key: str | bytes, value: str | bytes) -> None:
        stmt = self._insert(ResultRecord).values(key=_key(key), value=_bytes(value), updated_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=[ResultRecord.key],
            set_={"value": stmt.excluded.value, "updated_at": stmt.excluded.updated_at},
        )
        conn.execute(stmt)

    def delete(self, key: str | bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(ResultRecord).where(ResultRecord.key == _key(key)))

    def expire(self, key: str | bytes, value: Any) -> None:
        """Retention is by age (`orchestrator db prune`), not per key."""

    # --- the chord join ----------------------------------------------------------------------------

    def _apply_chord_incr(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        """Before the header is sent: the group (for the join) and the counter row with the body (our
        outbox) and the total, in one transaction."""
        group_id, results = header_result_args[0], header_result_args[1]
        total = len(results)
        counter = self._insert(ChordCounter).values(
            group_id=group_id, done=0, total=total, fired=False, body=dict(body), created_at=utcnow()
        )
        counter = counter.on_conflict_do_update(
            index_elements=[ChordCounter.group_id], set_={"total": total, "body": dict(body)}
        )
        with self.engine.begin() as conn:
            if body.get("task") not in self.bodies_without_header_results:
                group = self.app.GroupResult(*header_result_args)
                self._upsert_result(
                    conn, self.get_key_for_group(group_id), self.encode({"result": group.as_tuple()})
                )
            conn.execute(counter)
        self._sizes[group_id] = total

    def add_chords(self, conn: Connection, chords: Sequence[tuple[str, int, dict[str, Any]]]) -> None:
        """Counter rows for chords (group id, size, body) in the caller's transaction: a publisher that
        sends the header messages itself records the join with the rows its body will read. Only for
        bodies in `bodies_without_header_results`: no group result is stored for their join."""
        now = utcnow()
        rows = [
            {"group_id": g, "done": 0, "total": n, "fired": False, "body": body, "created_at": now}
            for g, n, body in chords
        ]
        dialect(conn).insert_rows(conn, cast(Table, ChordCounter.__table__), rows)  # COPY for a bulk submit

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        if self._sizes.pop(group_id, None) == chord_size:
            return  # apply_chord in this process already stored it
        self._upsert_counter(group_id, {"total": chord_size})

    def _upsert_counter(self, group_id: str, values: dict[str, Any]) -> None:
        stmt = self._insert(ChordCounter).values(
            group_id=group_id, done=0, fired=False, created_at=utcnow(), **values
        )
        stmt = stmt.on_conflict_do_update(index_elements=[ChordCounter.group_id], set_=values)
        with self.engine.begin() as conn:
            conn.execute(stmt)

    def part_counter(self, request: Any) -> PartCounter | None:
        """A PartCounter for a header task that records its outcome in this database, else None."""
        if not request.group or not request.id or not request.chord:
            return None
        return PartCounter(self, request.group, request.id)

    def _count(self, group_id: str, task_id: str) -> _Part:
        with self.engine.begin() as conn:
            return self.count_part(conn, group_id, task_id)

    def count_part(self, conn: Connection, group_id: str, task_id: str) -> _Part:
        """Count one part once, and claim the publish if it is the last, in the caller's transaction."""
        # RETURNING, not rowcount: drivers disagree on rowcount for ON CONFLICT DO NOTHING.
        if conn.execute(self._insert_part, {"gid": group_id, "tid": task_id}).first() is None:
            row = conn.execute(_COUNTER, {"gid": group_id}).one()
            return _Part(row.done, row.total, counted=False, fired=row.fired)
        params = {"gid": group_id, "tid": task_id, "now": utcnow()}
        bumped = conn.execute(_BUMP, params).first()
        if bumped is not None:
            return _Part(
                bumped.done, bumped.total, counted=True, fired=False, claimed=bumped.claimed_by == task_id
            )
        # No counter row: a chord whose size arrives later (set_chord_size) or was never applied by us.
        stmt = self._insert(ChordCounter).values(group_id=group_id, done=1, fired=False, created_at=utcnow())
        stmt = stmt.on_conflict_do_update(
            index_elements=[ChordCounter.group_id], set_={"done": ChordCounter.done + 1}
        ).returning(ChordCounter.done, ChordCounter.total)
        upserted = conn.execute(stmt).one()
        claimed = False
        if upserted.total is not None and upserted.done == upserted.total:
            claimed = bool(
                conn.execute(
                    update(ChordCounter)
                    .where(ChordCounter.group_id == group_id, ChordCounter.claimed_by.is_(None))
                    .values(claimed_by=task_id, claimed_at=utcnow())
                ).rowcount
            )
        return _Part(upserted.done, upserted.total, counted=True, fired=False, claimed=claimed)

    @staticmethod
    def _take_counted(group_id: str, task_id: str) -> _Part | None:
        parts: dict[tuple[str, str], _Part] | None = getattr(_counted, "parts", None)
        return parts.pop((group_id, task_id), None) if parts else None

    def _take_over(self, group_id: str, task_id: str, redelivered: bool) -> bool:
        """Claim the publish of a chord whose claimer died: our own earlier delivery, or an expired lease."""
        stale = utcnow() - timedelta(seconds=self.publish_lease)
        orphaned = or_(ChordCounter.claimed_by.is_(None), ChordCounter.claimed_at < stale)
        if redelivered:
            orphaned = or_(orphaned, ChordCounter.claimed_by == task_id)
        with self.engine.begin() as conn:
            return bool(
                conn.execute(
                    update(ChordCounter)
                    .where(ChordCounter.group_id == group_id, ChordCounter.fired.is_(False), orphaned)
                    .values(claimed_by=task_id, claimed_at=utcnow())
                ).rowcount
            )

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        gid, tid = request.group, request.id
        if not gid or not tid or not request.chord:
            return
        part = self._take_counted(gid, tid)
        if part is _WITHHELD:
            return
        part = part or self._count(gid, tid)
        total = part.total if part.total is not None else request.chord.get("chord_size")
        if total is None or part.done < total or part.fired:
            return
        if part.counted:
            if part.done > total:
                logger.warning("chord %s counted %d parts for %d", gid, part.done, total)
            if not part.claimed:
                return
        else:
            # A redelivered part of a complete chord whose body is not out: was its publisher lost?
            redelivered = bool((request.delivery_info or {}).get("redelivered"))
            if not self._take_over(gid, tid, redelivered):
                return
            logger.warning("chord %s: publishing the body in place of a lost publisher", gid)
        self._fire(gid, request.chord)

    def recover(self) -> int:
        """Publish the bodies of complete chords whose publisher died (claim older than the lease).

        Celery acks a task whose result was stored before its pool child died, so such a part is never
        redelivered: without this sweep its chord would wait forever. Returns how many were published.
        """
        stale = utcnow() - timedelta(seconds=self.publish_lease)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ChordCounter.group_id, ChordCounter.body)
                .where(
                    ChordCounter.fired.is_(False),
                    ChordCounter.claimed_at < stale,
                    ChordCounter.body.is_not(None),
                )
                .limit(100)
            ).all()
        published = 0
        for row in rows:
            if self._take_over(row.group_id, "recover", redelivered=False):
                logger.warning("chord %s: publishing the body in place of a lost publisher", row.group_id)
                self._fire(row.group_id, row.body)
                published += 1
        return published

    def _fire(self, gid: str, body: Any) -> None:
        app = self.app
        callback = maybe_signature(body, app=app)
        if body.get("task") in self.bodies_without_header_results:
            try:
                self.app.amqp._retry_publish(callback.delay, [])
            except Exception as exc:
                # The broker is away (restarting, a partition). Such a body reads SQL, not the header's
                # results, so nothing is lost by waiting: the claim is released for the recovery sweep,
                # which publishes it once the broker is back, rather than failing the chord.
                logger.warning(
                    "chord %s: publishing the body failed, the recovery sweep retries: %s", gid, exc
                )
                self._release(gid)
                return
            self._mark_fired(gid)
            return
        deps = GroupResult.restore(gid, backend=self)
        if deps is None:
            self.chord_error_from_stack(callback, ChordError(f"GroupResult {gid} no longer exists"))
        else:
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
                self._publish_body(gid, callback, ret)
                return
        self._mark_fired(gid)

    def _publish_body(self, gid: str, callback: Any, ret: Any) -> None:
        try:
            self.app.amqp._retry_publish(callback.delay, ret)
        except Exception as exc:
            logger.exception("chord %s: publishing the body failed", gid)
            error = ChordError(f"Callback error: {exc!r}")
            error.__cause__ = exc
            self.chord_error_from_stack(callback=callback, exc=error)
        self._mark_fired(gid)

    def _release(self, gid: str) -> None:
        """Let the next recovery sweep take a claimed publish at once."""
        with self.engine.begin() as conn:
            conn.execute(
                update(ChordCounter)
                .where(ChordCounter.group_id == gid, ChordCounter.fired.is_(False))
                .values(claimed_at=datetime(1970, 1, 1, tzinfo=UTC))
            )

    def _mark_fired(self, gid: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(ChordCounter).where(ChordCounter.group_id == gid).values(fired=True))

    # --- retention ---------------------------------------------------------------------------------

    def prune(self, older_than: timedelta) -> int:
        """Delete results and chord joins older than `older_than` that nothing waits on; returns rows
        removed. A join is removed once its body was published, or when it is an orchestrator job's join
        and the job is final (a cancelled job's chord never completes) or gone; a running chord's join
        and its group's result are never removed, however old: without them the job could never end."""
        before = cutoff(older_than)
        with self.engine.begin() as conn:
            done = [
                row.group_id
                for row in conn.execute(
                    select(ChordCounter.group_id, ChordCounter.fired, ChordCounter.body).where(
                        ChordCounter.created_at < before
                    )
                ).all()
                if row.fired or self._job_is_over(conn, row.body)
            ]
            removed = 0
            for start in range(0, len(done), 500):
                some = done[start : start + 500]
                removed += conn.execute(delete(ChordPart).where(ChordPart.group_id.in_(some))).rowcount
                removed += conn.execute(delete(ChordCounter).where(ChordCounter.group_id.in_(some))).rowcount
            waiting_groups = select(literal(_key(self.group_keyprefix)) + ChordCounter.group_id).where(
                ChordCounter.fired.is_(False)
            )
            removed += conn.execute(
                delete(ResultRecord).where(
                    ResultRecord.updated_at < before, ResultRecord.key.not_in(waiting_groups)
                )
            ).rowcount
        return int(removed)

    def _job_is_over(self, conn: Connection, body: Any) -> bool:
        """True when `body` is an orchestrator fan-in whose job is final or no longer exists."""
        if not isinstance(body, dict) or body.get("task") not in self.bodies_without_header_results:
            return False
        args = body.get("args") or []
        try:
            job_id = uuid.UUID(str(args[0]))
        except (IndexError, ValueError):
            return False
        state = conn.execute(select(Job.state).where(Job.id == job_id)).scalar_one_or_none()
        return state is None or state in FINAL_JOB_STATES

    def cleanup(self) -> None:
        if self.expires:
            self.prune(timedelta(seconds=self.expires))


class ChordRecovery(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: every few seconds, publish chord bodies whose publisher died (SQLBackend.recover).

    Add it to a plain Celery app with ``app.steps["worker"].add(ChordRecovery)``; the orchestrator's app
    has it already. Every worker runs it; the conditional take-over lets exactly one publish.
    """

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.tref: Any = None

    def start(self, worker: Any) -> None:
        backend = worker.app.backend
        if isinstance(backend, SQLBackend):
            # Cheap (a partial index holds only unfired joins), and a body held back by a broker outage
            # goes out within this long of the broker's return.
            interval = min(max(backend.publish_lease / 4, 0.5), 2.0)
            self.tref = worker.timer.call_repeatedly(interval, self._sweep, (backend,), priority=10)

    def stop(self, worker: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None

    @staticmethod
    def _sweep(backend: SQLBackend) -> None:
        try:
            backend.recover()
        except Exception:  # a database hiccup must not kill the worker's timer
            logger.exception("chord recovery sweep failed")
