from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator import Orchestrator, Settings
from orchestrator.cli.processes import KINDS, WorkerProcess, start_pools, start_worker, stop_all
from orchestrator.database import get_engine, upgrade
from orchestrator.models import Branch, Job
from tests.services import postgres_database, rabbitmq_vhost, redis_database

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


@contextmanager
def stack_services(name: str, home: Path) -> Iterator[dict[str, str]]:
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
    else:
        raise ValueError(name)


@contextmanager
def running_stack(name: str, home: Path) -> Iterator[Stack]:
    """A deployment with all three pools running, stopped (and its namespaces removed) afterwards."""
    with stack_services(name, home) as env:
        s = Stack(name, env, home)
        s.start()
        try:
            yield s
        finally:
            s.stop()


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One running deployment per stack, shared by a test module."""
    with running_stack(request.param, tmp_path_factory.mktemp(request.param)) as s:
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


@pytest.fixture(params=["postgres", "sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated, empty database: a fresh PostgreSQL database, or a SQLite file."""
    if request.param == "postgres":
        with postgres_database() as url:
            upgrade(url)
            yield url
    else:
        url = f"sqlite:///{tmp_path / 'orchestrator.db'}"
        upgrade(url)
        yield url


@pytest.fixture
def embedded_orc(tmp_path: Path) -> Orchestrator:
    """A client on a fresh embedded home (SQLite + file-system broker) with no workers running."""
    return Orchestrator(Settings.from_env(base_env(tmp_path)))
