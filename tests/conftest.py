from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from bench import pgbouncer as pgbouncer_server
from orchestrator import Orchestrator, Settings, database
from orchestrator.cli.processes import KINDS, WorkerProcess, start_pools, start_worker, stop_all
from orchestrator.database import get_engine, upgrade
from orchestrator.models import Branch, Job
from tests.services import SERVICES, postgres_database, rabbitmq_vhost, redis_database

ROOT = Path(__file__).resolve().parents[1]
#: Pool sizes of a test stack. io is the default ORCH_IO_CONCURRENCY: how many io branches a worker runs
#: at once, which tests with stragglers holding their threads until a deadline need.
POOL_SIZES = {"io": 64, "cpu": 2, "fanin": 2}


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment a worker or client of one test stack sees: ORCH_* only, nothing inherited."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    (home / "marks").mkdir(parents=True, exist_ok=True)
    env.update(
        TEST_MARK_DIR=str(home / "marks"),
        ORCH_HOME=str(home),
        ORCH_IMPORTS="tests.catalog",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        ORCH_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def row_counts(orc: Orchestrator) -> tuple[int, int]:
    with get_engine(orc.settings.database_url).connect() as conn:
        jobs = conn.execute(select(func.count()).select_from(Job)).scalar_one()
        branches = conn.execute(select(func.count()).select_from(Branch)).scalar_one()
    return jobs, branches


@dataclass
class Stack:
    """One deployment under test: its environment, its client and its running worker pools."""

    name: str
    env: dict[str, str]
    home: Path
    workers: dict[str, WorkerProcess] = field(default_factory=dict)
    _orc: Orchestrator | None = None

    @property
    def settings(self) -> Settings:
        return Settings.from_env(self.env)

    @property
    def orc(self) -> Orchestrator:
        if self._orc is None:
            database.configure(self.settings)  # this process connects as the stack's workers do
            self._orc = Orchestrator(self.settings, migrate=True)
        return self._orc

    def start(self, kinds: tuple[str, ...] = KINDS) -> None:
        assert self.orc.settings.database_url  # migrate before any worker touches the database
        started = start_pools(kinds, env=self.env, log_dir=self.home / "logs", concurrency=POOL_SIZES)
        self.workers.update({w.kind: w for w in started})

    def restart(self, kind: str) -> WorkerProcess:
        old = self.workers.get(kind)
        if old is not None:
            old.stop(timeout=10)
        worker = start_worker(kind, env=self.env, log_dir=self.home / "logs", concurrency=POOL_SIZES[kind])
        worker.wait_ready(60)
        self.workers[kind] = worker
        return worker

    def stop(self) -> None:
        stop_all(self.workers.values(), timeout=20)

    def logs(self) -> str:
        return "\n".join(f"--- {k}\n{w.log()[-4000:]}" for k, w in self.workers.items())


STACKS = ("sqlite-embedded", "postgres-redis", "postgres-rabbitmq")
#: Test modules whose `stack` and `database_url` also run through PgBouncer in transaction pooling mode:
#: the core job tests and the SQL backend's exactly-once tests (test_pgbouncer.py has PgBouncer's own).
THROUGH_PGBOUNCER = {"test_jobs": "stack", "test_sql_backend": "database_url"}
PGBOUNCER_PARAMS = {
    "stack": [*STACKS, "pgbouncer-rabbitmq"],
    "database_url": ["postgres", "sqlite", "pgbouncer"],
}


@pytest.hookimpl(tryfirst=True)  # before the fixtures' own params are applied
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Add the PgBouncer variant to those modules' fixture, as a parametrize mark (which takes precedence
    over the fixture's own params), so their tests run through it unchanged."""
    fixture = THROUGH_PGBOUNCER.get(metafunc.module.__name__.rsplit(".", 1)[-1])
    if fixture is not None and fixture in metafunc.fixturenames:
        metafunc.definition.add_marker(
            pytest.mark.parametrize(
                fixture,
                PGBOUNCER_PARAMS[fixture],
                indirect=True,
                scope="module" if fixture == "stack" else None,
            )
        )


def pgbouncer_env(bouncer: pgbouncer_server.PgBouncer, direct_url: str) -> dict[str, str]:
    """A deployment behind PgBouncer in transaction pooling mode: prepared statements off, wait() LISTENs
    on the direct URL. (Migrations run on the direct URL, as docs/scaling.md says.)"""
    return {
        "ORCH_DATABASE_URL": bouncer.url(direct_url),
        "ORCH_DB_POOLER": "transaction",
        "ORCH_LISTEN_DATABASE_URL": direct_url,
    }


@contextmanager
def stack_services(
    name: str, home: Path, bouncer: pgbouncer_server.PgBouncer | None = None
) -> Iterator[dict[str, str]]:
    """Environment for one stack, with fresh service namespaces that are removed afterwards."""
    if name == "sqlite-embedded":
        yield base_env(home)
    elif name == "postgres-redis":
        with postgres_database() as db, redis_database(7) as broker:
            # Redis as broker and as result backend: the chord joins with Redis' atomic counter.
            yield base_env(
                home,
                ORCH_DATABASE_URL=db,
                ORCH_BROKER_URL=broker,
                ORCH_RESULT_BACKEND=broker,
                ORCH_VISIBILITY_TIMEOUT="30",
            )
    elif name == "postgres-rabbitmq":
        with postgres_database() as db, rabbitmq_vhost() as broker:
            # The default result backend: results and the chord join in PostgreSQL.
            yield base_env(home, ORCH_DATABASE_URL=db, ORCH_BROKER_URL=broker)
    elif name == "pgbouncer-rabbitmq" and bouncer is not None:
        with postgres_database() as db, rabbitmq_vhost() as broker:
            upgrade(db)
            yield base_env(home, ORCH_BROKER_URL=broker, **pgbouncer_env(bouncer, db))
    else:
        raise ValueError(name)


@contextmanager
def running_stack(
    name: str, home: Path, bouncer: pgbouncer_server.PgBouncer | None = None
) -> Iterator[Stack]:
    """A deployment with all three pools running, stopped (and its namespaces removed) afterwards."""
    with stack_services(name, home, bouncer) as env:
        s = Stack(name, env, home)
        s.start()
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running deployment per stack, shared by a test module."""
    bouncer = request.getfixturevalue("pgbouncer") if request.param.startswith("pgbouncer") else None
    with running_stack(request.param, tmp_path_factory.mktemp(request.param), bouncer) as s:
        yield s


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The production stack (PostgreSQL + RabbitMQ, SQL result backend), shared by a test module."""
    with running_stack("postgres-rabbitmq", tmp_path_factory.mktemp("pg")) as s:
        yield s


@pytest.fixture
def rabbit_stack(tmp_path: Path) -> Iterator[Stack]:
    """A PostgreSQL + RabbitMQ deployment of the test's own, for tests that kill its workers."""
    with running_stack("postgres-rabbitmq", tmp_path) as s:
        yield s


@pytest.fixture(scope="session")
def pgbouncer() -> Iterator[pgbouncer_server.PgBouncer]:
    """Debian's PgBouncer in transaction pooling mode before the test PostgreSQL, on a port of its own."""
    with pgbouncer_server.running(SERVICES.pg_admin_url, pool_mode="transaction") as bouncer:
        yield bouncer


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a fresh PostgreSQL database, or a SQLite file (or, where a module asks
    for it, a fresh PostgreSQL database through PgBouncer, migrated on the direct URL)."""
    if request.param == "postgres":
        with postgres_database() as url:
            upgrade(url)
            yield url
    elif request.param == "pgbouncer":
        bouncer: pgbouncer_server.PgBouncer = request.getfixturevalue("pgbouncer")
        with postgres_database() as direct:
            upgrade(direct)
            env = {"ORCH_HOME": str(tmp_path), **pgbouncer_env(bouncer, direct)}
            database.configure(Settings.from_env(env))
            # Processes the test starts (multiprocessing) connect as their environment says, like workers.
            monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            yield env["ORCH_DATABASE_URL"]
    else:
        url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
        upgrade(url)
        yield url


@pytest.fixture
def embedded_orc(tmp_path: Path) -> Orchestrator:
    """A client on a fresh embedded home (SQLite + file-system broker) with no workers running."""
    return Orchestrator(Settings.from_env(base_env(tmp_path)))
