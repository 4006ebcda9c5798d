"""An ordinary broker reconnect is one warning line (a late ack's failure loses its CRITICAL traceback),
and the worker keeps consuming through it."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
import redis.exceptions
from celery.worker.consumer.consumer import Consumer
from kombu.transport import redis as kombu_redis

from orchestrator import Settings
from orchestrator.app import build_app
from orchestrator.reconnect import QuietReconnect, survive_redis_restarts


def test_a_failed_ack_after_a_connection_loss_is_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.quiet-reconnect")
    quiet = QuietReconnect()
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            try:
                raise ConnectionResetError("connection reset by peer")
            except ConnectionResetError as exc:
                logger.critical("Couldn't ack %r, reason:%r", 42, exc, exc_info=True)
            logger.error("something else broke: %s", "keep me", exc_info=False)
    finally:
        logger.removeFilter(quiet)
    acked, other = caplog.records
    assert (acked.levelname, acked.exc_info) == ("WARNING", None)
    assert acked.getMessage() == (
        "could not ack message 42 after the broker connection was lost (ConnectionResetError('connection "
        "reset by peer')): the broker delivers it again, and SQL makes that delivery start nothing "
        "already done"
    )
    assert "Traceback" not in caplog.text
    assert (other.levelname, other.getMessage()) == ("ERROR", "something else broke: keep me")


def test_a_closed_redis_transport_is_a_connection_error_not_an_attribute_error() -> None:
    """kombu's Redis channel, closed after the worker dropped its transport, must fail the way Celery
    ignores on a reconnect (a connection error), not with AttributeError, which stops the worker."""
    survive_redis_restarts()
    survive_redis_restarts()  # installed once, however often called
    dropped = SimpleNamespace(connection=SimpleNamespace(client=None))
    with pytest.raises(redis.exceptions.ConnectionError, match="the broker connection is closed"):
        kombu_redis.Channel._connparams(dropped)
    assert kombu_redis.Channel._connparams.survives_closed_transport is True


def test_no_pool_thread_sends_basic_qos_after_a_reconnect() -> None:
    """Celery restores a lowered prefetch count from the thread that finished a task; on the threads pool
    that races the event loop's own basic_qos on one py-amqp channel and wedges the consumer. The app
    turns the reduction off, so the restore sends nothing."""
    app = build_app(Settings.from_env({"ORCH_HOME": "/nonexistent-home", "ORCH_BROKER_URL": "amqp://x//"}))
    sent: list[int] = []
    consumer = SimpleNamespace(
        app=app,
        qos=SimpleNamespace(_mutex=threading.Lock(), set=sent.append, value=1),
        _maximum_prefetch_restored=False,
        max_prefetch_count=64,
        _new_prefetch_count=64,
    )
    Consumer._restore_prefetch_count_after_connection_restart(consumer, None)
    assert sent == []
