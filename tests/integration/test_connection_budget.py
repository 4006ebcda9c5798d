"""The connection budget: each pool's database connections follow from its concurrency (docs/scaling.md),
counted in pg_stat_activity while real worker processes run real branches; ORCH_DB_POOL_SIZE caps them."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from orchestrator import ConfigurationError, Orchestrator, Settings, branch, database
from orchestrator.cli.processes import (
    KINDS,
    connection_budget,
    pool_connections,
    start_pools,
    start_worker,
    stop_all,
    worker_environment,
)
from tests.conftest import base_env
from tests.services import SERVICES, postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration

CONCURRENCY = {"io": 8, "cpu": 2, "fanin": 2}
HOLD = "tests.integration.scaling_catalog.hold_connection"


class Connections:
    """Samples pg_stat_activity every 20 ms: the most connections each application held at once."""

    def __init__(self, database_name: str) -> None:
        self.name = database_name
        self.peak: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> Counter[str]:
        with psycopg.connect(SERVICES.pg_admin_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity WHERE datname = %s GROUP BY 1",
                (self.name,),
            ).fetchall()
        return Counter({str(app): int(n) for app, n in rows})

    def _run(self) -> None:
        while not self._stop.is_set():
            for app, n in self.now().items():
                self.peak[app] = max(self.peak[app], n)
            time.sleep(0.02)

    @contextmanager
    def sampling(self) -> Iterator[Counter[str]]:
        self._thread.start()
        try:
            yield self.peak
        finally:
            self._stop.set()
            self._thread.join(10)


def test_the_derived_pools_and_their_formula() -> None:
    s = Settings.from_env({"ORCH_DATABASE_URL": "postgresql://u@db/orch", "ORCH_CPU_CONCURRENCY": "4"})
    assert pool_connections("io", s) == (66, 2)  # 64 threads, the main thread's timers, a spare
    assert pool_connections("io", s, 8) == (10, 2)
    assert pool_connections("io", s, 1000) == (66, 2)  # a gevent pool's greenlets share 64
    assert pool_connections("cpu", s) == pool_connections("fanin", s) == (1, 1)
    assert [connection_budget(k, s) for k in KINDS] == [68, 10, 6]  # prefork: (children + parent) x 2
    env, added = worker_environment("io", s, 8, {"PATH": "/bin"})
    assert added == {"ORCH_DB_POOL_SIZE": "10", "ORCH_DB_MAX_OVERFLOW": "2", "PGAPPNAME": "orchestrator-io"}
    assert env == {"PATH": "/bin", **added}
    chosen = Settings.from_env({"ORCH_DB_POOL_SIZE": "5", "ORCH_DB_MAX_OVERFLOW": "0"})
    assert worker_environment("io", chosen, 8, {"PGAPPNAME": "mine"})[1] == {}  # what is set is kept
    options = database.ConnectionOptions.from_settings(chosen)
    assert (options.pool_size, options.max_overflow, options.ping_after) == (5, 0, 10.0)
    for bad, message in [
        ({"ORCH_DB_POOL_SIZE": "0"}, "ORCH_DB_POOL_SIZE must be >= 1"),
        ({"ORCH_DB_MAX_OVERFLOW": "-1"}, "ORCH_DB_MAX_OVERFLOW must be >= 0"),
        ({"ORCH_DB_PING_AFTER": "soon"}, "ORCH_DB_PING_AFTER must be a number"),
        ({"ORCH_DB_POOLER": "session"}, "ORCH_DB_POOLER must be none or transaction"),
        ({"ORCH_LISTEN_DATABASE_URL": "postgresql://u@db/orch"}, "need a PostgreSQL database"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            Settings.from_env(bad)


def test_three_pools_stay_within_the_budget_and_the_pool_size_caps_a_pool(tmp_path: Path) -> None:
    with postgres_database("budget") as url, rabbitmq_vhost() as broker:
        env = base_env(
            tmp_path,
            ORCH_DATABASE_URL=url,
            ORCH_BROKER_URL=broker,
            ORCH_IMPORTS="tests.catalog,tests.integration.scaling_catalog",
        )
        settings = Settings.from_env(env)
        orc = Orchestrator(settings, migrate=True)
        # Beside the three pools, an io worker on a queue of its own with ORCH_DB_POOL_SIZE=3 and no
        # overflow, under a name of its own in pg_stat_activity; a second client routes io branches there.
        capped_env = {
            **env,
            "ORCH_IO_QUEUE": "capped",
            "ORCH_DB_POOL_SIZE": "3",
            "ORCH_DB_MAX_OVERFLOW": "0",
            "PGAPPNAME": "capped-io",
        }
        capped = start_worker("io", env=capped_env, log_dir=tmp_path / "logs", concurrency=8)
        workers = [capped]
        connections = Connections(url.rsplit("/", 1)[1])
        try:
            workers += start_pools(env=env, log_dir=tmp_path / "logs", concurrency=CONCURRENCY)
            capped.wait_ready(60)
            # Eight branches hold a connection each at once beside the io worker's own transactions;
            # two cpu branches and a fan-in use the prefork pools.
            branches = [branch(HOLD, 0.5) for _ in range(8)] + [branch("jobs.cpu.count_primes", 1000)] * 2
            with connections.sampling() as peak:
                view = orc.wait(orc.submit(branches, "jobs.aggregate.collect").id, 60)
            assert view.state == "succeeded", "\n".join(w.log()[-2000:] for w in workers)
            budget = {k: connection_budget(k, settings, CONCURRENCY[k]) for k in KINDS}
            for kind in KINDS:
                assert 1 <= peak[f"orchestrator-{kind}"] <= budget[kind], (kind, dict(peak))
            assert peak["orchestrator-io"] >= 8, dict(peak)  # the eight holds really overlapped
            pools = sum(n for app, n in peak.items() if app.startswith("orchestrator-"))
            assert pools <= sum(budget.values()) == 12 + 6 + 6

            # ORCH_DB_POOL_SIZE=3 without overflow: the eight holds take turns on three connections.
            to_capped = Orchestrator(Settings.from_env(capped_env))
            connections = Connections(connections.name)
            with connections.sampling() as peak:
                job = to_capped.submit([branch(HOLD, 0.3) for _ in range(8)], "jobs.aggregate.collect")
                view = to_capped.wait(job.id, 60)
            to_capped.app.close()
            assert view.state == "succeeded", capped.log()[-3000:]
            assert {b.queue for b in view.branches} == {"capped"}
            assert 1 <= peak["capped-io"] <= 3, dict(peak)
            assert "ORCH_DB_POOL_SIZE" not in capped.log().splitlines()[0]  # the worker's own, not derived
        finally:
            stop_all(workers)
            orc.app.close()


def _backend_pid(url: str) -> int:
    with database.get_engine(url).connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _terminate(pid: int) -> None:
    with psycopg.connect(SERVICES.pg_admin_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_connection_idle_past_ping_after_is_pinged_and_replaced_a_fresh_one_is_not() -> None:
    with postgres_database("ping") as url:
        pinged, trusted = f"{url}?application_name=pinged", f"{url}?application_name=trusted"
        database.set_options(pinged, database.ConnectionOptions(pool_size=1, max_overflow=0, ping_after=0.2))
        database.set_options(
            trusted, database.ConnectionOptions(pool_size=1, max_overflow=0, ping_after=3600)
        )
        # A server restart or a firewall drops the pooled connections while they sit idle.
        first = _backend_pid(pinged)
        _terminate(first)
        time.sleep(0.3)
        assert _backend_pid(pinged) != first  # pinged at checkout, found dead, replaced: no error
        # Used a moment ago, a connection is handed out without a ping: the dead one fails its statement.
        _terminate(_backend_pid(trusted))
        time.sleep(0.3)
        with pytest.raises(DBAPIError):
            _backend_pid(trusted)
        _backend_pid(trusted)  # the pool then connects anew
