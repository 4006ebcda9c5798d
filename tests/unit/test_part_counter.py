"""The chord join's counter on a SQLite file (no server): each part counts once, the part that reaches
the total claims the publish, and a count rolled back with its transaction never happened."""

from __future__ import annotations

from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select

from orchestrator import database
from orchestrator.backend import SQLBackend
from orchestrator.models import ChordCounter


@pytest.fixture
def backend(tmp_path: Path) -> SQLBackend:
    url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
    database.upgrade(url)
    app = Celery("unit", broker="memory://", backend=f"orchestrator.backend:SQLBackend+{url}")
    backend = app.backend
    assert isinstance(backend, SQLBackend)
    backend.set_chord_size("g", 3)
    return backend


def _count(backend: SQLBackend, task_id: str) -> tuple[int, int | None, bool, bool]:
    with backend.engine.begin() as conn:
        part = backend.count_part(conn, "g", task_id)
    return part.done, part.total, part.counted, part.claimed


def test_each_part_counts_once_and_the_last_claims_the_publish(backend: SQLBackend) -> None:
    assert _count(backend, "a") == (1, 3, True, False)
    assert _count(backend, "a") == (1, 3, False, False)  # a redelivery finds its part counted
    assert _count(backend, "b") == (2, 3, True, False)
    assert _count(backend, "c") == (3, 3, True, True)
    assert _count(backend, "c") == (3, 3, False, False)
    with backend.engine.connect() as conn:
        claimed_by = conn.execute(select(ChordCounter.claimed_by)).scalar_one()
    assert claimed_by == "c"


def test_a_count_rolled_back_with_its_transaction_never_happened(backend: SQLBackend) -> None:
    with pytest.raises(RuntimeError), backend.engine.begin() as conn:
        backend.count_part(conn, "g", "a")
        raise RuntimeError("the outcome's write failed")
    assert _count(backend, "a") == (1, 3, True, False)


def test_a_part_before_the_size_is_known_still_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'late-size.db'}"
    database.upgrade(url)
    backend = Celery("unit", broker="memory://", backend=f"orchestrator.backend:SQLBackend+{url}").backend
    assert isinstance(backend, SQLBackend)
    with backend.engine.begin() as conn:
        part = backend.count_part(conn, "g2", "a")
    assert (part.done, part.total, part.counted) == (1, None, True)
