"""What an ordinary broker reconnect needs beyond Celery's and kombu's defaults: one quiet log line per
late ack, a worker that survives a Redis restart (both installed by `orchestrator.celery_app`, the
worker's entry point), and a worker back soon after its broker (the app's `worker_consumer`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import redis.exceptions
from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis


class QuietReconnect(logging.Filter):
    """An ordinary broker reconnect, said in one line. A task that finishes after its worker lost the
    broker connection cannot ack its message (the broker already handed it out again, and the
    orchestrator's SQL makes that second delivery start nothing); kombu logs each such ack as CRITICAL
    with a traceback. Here it is one WARNING line that says why it is harmless."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(("Couldn't ack", "Couldn't reject")):
            verb = "ack" if record.msg.startswith("Couldn't ack") else "reject"
            record.msg = (
                f"could not {verb} message %r after the broker connection was lost (%r): the broker "
                "delivers it again, and SQL makes that delivery start nothing already done"
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


def _connparams_of_an_open_transport(original: Any) -> Any:
    def connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return original(self, asynchronous)

    connparams.survives_closed_transport = True  # type: ignore[attr-defined]
    return connparams


def survive_redis_restarts() -> None:
    """Keep a worker alive through a Redis broker restart (celery 5.7, kombu 5.7).

    After a connection loss the worker's consumer drops the broken transport and then closes the
    connection; closing a channel that holds unacknowledged messages hands them back to Redis, and the
    redis channel reads its connection parameters from the transport already dropped: AttributeError,
    which is not a connection error, so the worker exits ("Unrecoverable error"). Hand-written because
    no release fixes it: a closed transport raises redis's ConnectionError here instead, the close is
    ignored like any connection error and the worker reconnects. The messages it could not hand back
    wait in Redis for the visibility timeout; the rescue sweep (`lifeline`) publishes their branches
    again long before that.
    """
    current = kombu_redis.Channel._connparams
    if not getattr(current, "survives_closed_transport", False):
        kombu_redis.Channel._connparams = _connparams_of_an_open_transport(current)


#: How a worker retries a broker it lost. Celery's consumer takes kombu's defaults (2 s, then 4, 6, ...
#: up to 30 s between attempts), so after a 5 s RabbitMQ outage a worker came back up to 6 s after the
#: broker did (the fault suite's rabbitmq-outage: 8-10 s to final, against a target of 5). Every half
#: second at first, never more than 2 s apart: an attempt is one TCP connect.
RECONNECT_INTERVALS: dict[str, float] = {"interval_start": 0.5, "interval_step": 0.5, "interval_max": 2.0}


#: Seconds after a reconnect at which the worker looks for jobs the lost connection stranded: once the
#: consumer has had a moment to resume, and again once a queue refilled by the broker may have drained.
STRANDED_SWEEPS = (1.0, 4.0)


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's worker consumer, reconnecting within 2 s of the broker's return (`worker_consumer`), and
    telling `on_reconnect` (the lifeline's, set by its bootstep) when the connection lost at a moment
    (monotonic) is back. Hand-written because Celery passes kombu no intervals and has no setting for
    them, and has no hook for a reconnect."""

    on_reconnect: Callable[[float], None] | None = None
    _lost_at: float | None = None

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        if self._lost_at is None:
            self._lost_at = time.monotonic()
        super().on_connection_error_after_connected(exc)

    def ensure_connected(self, conn: Any) -> Any:
        conn.ensure_connection = partial(conn.ensure_connection, **RECONNECT_INTERVALS)
        connected = super().ensure_connected(conn)
        lost_at, self._lost_at = self._lost_at, None
        if lost_at is not None and self.on_reconnect is not None:
            for delay in STRANDED_SWEEPS:  # on the worker's timer: the consumer resumes first
                self.timer.call_after(delay, self.on_reconnect, (lost_at,))
        return connected
