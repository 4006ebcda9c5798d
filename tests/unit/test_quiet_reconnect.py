"""An ordinary broker reconnect is one warning line: a late ack's failure loses its CRITICAL traceback."""

from __future__ import annotations

import logging

import pytest

from orchestrator.reconnect import QuietReconnect


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
