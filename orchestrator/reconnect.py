"""What an ordinary broker reconnect needs beyond Celery's and kombu's defaults: one quiet log line per
late ack, and a worker that survives a Redis restart. Installed by `orchestrator.celery_app`, the
worker's entry point.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
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
