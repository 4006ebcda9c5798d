"""The orchestrator behind PgBouncer in transaction pooling mode (Debian's pgbouncer, started by the
`pgbouncer` fixture): what breaks there (prepared statements, LISTEN) and how the orchestrator avoids it.
The core job tests and the SQL backend's exactly-once tests also run through it (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from bench.pgbouncer import PgBouncer
from orchestrator import AsyncOrchestrator, Settings, branch, database, notifications
from orchestrator.models import JobState
from orchestrator.store import NewBranch, Store
from tests.conftest import base_env, pgbouncer_env, running_stack
from tests.services import postgres_database

pytestmark = pytest.mark.integration


@pytest.fixture
def direct_url() -> Iterator[str]:
    with postgres_database("pgb") as url:
        database.upgrade(url)  # migrations on the direct URL
        yield url


def _statements_on_two_server_connections(url: str) -> None:
    """Run one statement again and again in a connection of `url`'s engine, while another client takes
    the server connection it last used (PgBouncer hands out the most recently used one), so each
    transaction of ours lands on another server connection than the one before."""
    engine = database.get_engine(url)
    other = psycopg.connect(make_psycopg(url), autocommit=False, prepare_threshold=None)
    try:
        with engine.connect() as conn:
            for i in range(8):
                conn.execute(text("SELECT count(*) FROM jobs WHERE branch_total > :n"), {"n": i})
                conn.commit()  # our server connection goes back to PgBouncer...
                if i % 2 == 0:
                    other.execute("SELECT 1")  # ...and the other client takes it and keeps it
                else:
                    other.commit()
    finally:
        other.close()


def make_psycopg(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def test_prepared_statements_break_through_transaction_pooling_unless_turned_off(
    pgbouncer: PgBouncer, direct_url: str
) -> None:
    pooled = pgbouncer.url(direct_url)
    prepared, unprepared = f"{pooled}?application_name=prepared", f"{pooled}?application_name=unprepared"
    # No startup options through the pooler (it refuses them), as ORCH_DB_POOLER=transaction sets.
    through = database.ConnectionOptions(idle_in_transaction_timeout=None)
    database.set_options(prepared, dataclasses.replace(through, prepared_statements=True))
    database.set_options(unprepared, dataclasses.replace(through, prepared_statements=False))
    # psycopg prepares a statement after its fifth execution on a connection; PgBouncer then runs the
    # next transaction on a server connection that never saw it.
    with pytest.raises(DBAPIError, match=r"prepared statement .* does not exist"):
        _statements_on_two_server_connections(prepared)
    _statements_on_two_server_connections(unprepared)
    # What ORCH_DB_POOLER=transaction sets for the deployment's URL.
    settings = Settings.from_env({"ORCH_DATABASE_URL": pooled, "ORCH_DB_POOLER": "transaction"})
    pooled_options = database.ConnectionOptions.from_settings(settings)
    assert not pooled_options.prepared_statements and pooled_options.idle_in_transaction_timeout is None


def _finalize_soon(store: Store, job_id: uuid.UUID, ready: threading.Event) -> threading.Thread:
    """A final move (a cancel: the shortest one the store has) committed once `ready` is set."""

    def finalize() -> None:
        ready.wait(10)
        assert store.cancel(job_id) is not None

    thread = threading.Thread(target=finalize)
    thread.start()
    return thread


def _running_job(store: Store) -> uuid.UUID:
    job_id, _ = store.create_job(
        name="listen", fan_in="jobs.aggregate.collect", branches=[NewBranch("jobs.io.sleep", "io", [0], {})]
    )
    return job_id


def test_wait_listens_on_the_direct_url_and_a_listen_through_pgbouncer_hears_nothing(
    pgbouncer: PgBouncer, direct_url: str, tmp_path: Path
) -> None:
    pooled = pgbouncer.url(direct_url)
    database.configure(
        Settings.from_env({"ORCH_HOME": str(tmp_path), **pgbouncer_env(pgbouncer, direct_url)})
    )
    store = Store(pooled)
    assert store.notifies
    listener = notifications.listener_engine(pooled)
    assert listener is not None and listener.url.port == 5432  # the direct URL, not PgBouncer's port

    # The final move commits through PgBouncer; its NOTIFY reaches the direct LISTEN.
    job_id = _running_job(store)
    ready = threading.Event()
    with store.final_notifications(job_id) as announced:
        assert announced is not None
        finalizer = _finalize_soon(store, job_id, ready)
        ready.set()
        assert announced(30.0), "the NOTIFY sent through PgBouncer must reach the direct LISTEN"
    finalizer.join()
    assert store.get(job_id).state == JobState.CANCELLED

    # Why: a LISTEN through PgBouncer lands on a server connection that goes back to the pool at once.
    job_id = _running_job(store)
    ready = threading.Event()
    with notifications.listen(database.get_engine(pooled), job_id) as through_pgbouncer:
        finalizer = _finalize_soon(store, job_id, ready)
        ready.set()
        finalizer.join()
        assert not through_pgbouncer(1.0)


def test_without_a_listen_url_waits_poll_behind_a_pooler(
    pgbouncer: PgBouncer, direct_url: str, tmp_path: Path
) -> None:
    pooled = pgbouncer.url(direct_url)
    env = {"ORCH_HOME": str(tmp_path), "ORCH_DATABASE_URL": pooled, "ORCH_DB_POOLER": "transaction"}
    database.configure(Settings.from_env(env))
    store = Store(pooled)
    assert not store.notifies and notifications.listener_engine(pooled) is None
    job_id = _running_job(store)
    with store.final_notifications(job_id) as announced:
        assert announced is None  # Orchestrator.wait then polls the row


def test_the_async_client_listens_on_the_direct_url(
    pgbouncer: PgBouncer, direct_url: str, tmp_path: Path
) -> None:
    settings = Settings.from_env(
        {**base_env(tmp_path), "ORCH_BROKER_URL": "memory://", **pgbouncer_env(pgbouncer, direct_url)}
    )
    database.configure(settings)  # a program with its own Settings says how to connect (docs/scaling.md)
    store = Store(settings.database_url)

    async def wait_for_a_job_finished_elsewhere() -> str:
        orc = AsyncOrchestrator(settings, migrate=False)
        try:
            job_id = await asyncio.to_thread(_running_job, store)
            ready = threading.Event()
            finalizer = _finalize_soon(store, job_id, ready)
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, ready.set)
            view = await orc.wait(str(job_id), timeout=30)
            await asyncio.to_thread(finalizer.join)
            assert orc._listener is not None and ":5432/" in orc._listener.conninfo
            return view.state
        finally:
            await orc.close()

    assert asyncio.run(wait_for_a_job_finished_elsewhere()) == JobState.CANCELLED


def test_the_workers_connect_through_pgbouncer(pgbouncer: PgBouncer, tmp_path: Path) -> None:
    with running_stack("pgbouncer-rabbitmq", tmp_path, pgbouncer) as stack:
        orc = stack.orc
        branches = [branch("jobs.io.sleep", 0.01), branch("jobs.cpu.count_primes", limit=100)]
        view = orc.wait(orc.submit(branches, "jobs.aggregate.collect").id, 30)
        assert view.state == "succeeded", stack.logs()
        name = stack.settings.database_url.rsplit("/", 1)[1]
        clients = {c["application_name"] for c in pgbouncer.show("CLIENTS") if c["database"] == name}
        assert {"orchestrator-io", "orchestrator-cpu", "orchestrator-fanin"} <= clients
        assert pgbouncer.stats(name)["total_xact_count"] > 0
