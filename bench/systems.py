"""The systems under comparison, each started and stopped by the harness on the local services.

Every system answers the same few calls (run one job and wait for it, run many and wait for all, time a
submit), so that a scenario is written once and runs against all of them alike.
"""

# mypy: disallow-untyped-calls=False

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import chord
from celery.result import AsyncResult

from orchestrator import JobSpec, JobView, Orchestrator, Settings, branch
from orchestrator.cli.processes import (
    WorkerProcess,
    celery_executable,
    spawn,
    start_pools,
    start_worker,
    stop_all,
)

from . import plain_app

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT = 120.0  # seconds; generous, a timeout means something is broken, not slow


class BenchError(RuntimeError):
    """A system misbehaved (a job did not succeed, a worker died); the message carries its logs."""


@dataclass(frozen=True)
class Timing:
    """One measured run: as the client saw it, and (when the system records it) as the server did."""

    client: float  # seconds from the first submit to the last final state observed by the client
    server: float | None = None  # seconds from the first job's creation to the last one's finalization
    # Where a single job's time went, from the system's own timestamps (orchestrator only).
    phases: Mapping[str, float] = field(default_factory=dict)


def worker_env(extra: Mapping[str, str]) -> dict[str, str]:
    """Our environment minus any ORCH_* of the caller's own deployment, plus the repo for `bench`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class System(abc.ABC):
    """One contender. `spawn` starts processes without waiting, so that several systems boot in parallel."""

    key: str
    label: str
    polling_join: bool = False  # joins by polling (Celery's chord_unlock): each run costs ~1 s extra

    def describe(self) -> dict[str, Any]:
        return {"label": self.label}

    def spawn(self) -> None:  # noqa: B027 (a system that starts nothing keeps the no-op)
        """Start the system's processes; return before they are ready."""

    def wait_ready(self) -> None:  # noqa: B027 (a system that starts nothing keeps the no-op)
        """Block until the system accepts work."""

    def terminate(self) -> None:  # noqa: B027 (a system that starts nothing keeps the no-op)
        """Signal a warm shutdown without waiting, so that several systems stop in parallel."""

    def stop(self) -> None:  # noqa: B027 (a system that starts nothing keeps the no-op)
        """Stop every process this system started, by pid, and wait for them."""

    def logs(self) -> str:
        return ""

    @abc.abstractmethod
    def run_job(self, width: int, seconds: float) -> Timing:
        """Submit one job of `width` sleeps and wait until the client sees it final."""

    @abc.abstractmethod
    def run_jobs(self, count: int, width: int, seconds: float) -> Timing:
        """Submit `count` such jobs back to back, then wait for all of them."""

    def submit_seconds(self, width: int, seconds: float) -> float:
        """Time only the submit of one job (then wait for it untimed, so runs do not overlap)."""
        raise BenchError(f"{self.key} has no submit step")

    def bulk_submit_seconds(self, jobs: int, width: int) -> float:
        """Time only the submit of `jobs` no-op jobs at once (then wait for them untimed)."""
        raise BenchError(f"{self.key} has no submit step")

    @contextlib.contextmanager
    def consumers_paused(self, app: Any) -> Iterator[None]:
        """Every worker stops taking messages while the block runs, and then takes them again from exactly
        the queues it had: a bulk submit is timed as a client on a host of its own sees it, not sharing
        two cores with the workers running its jobs."""
        active = app.control.inspect(timeout=5).active_queues() or {}
        consumed = {worker: [q["name"] for q in queues] for worker, queues in active.items()}
        for worker, queues in consumed.items():
            for queue in queues:
                app.control.cancel_consumer(queue, destination=[worker], reply=True, timeout=5)
        try:
            yield
        finally:
            for worker, queues in consumed.items():
                for queue in queues:
                    app.control.add_consumer(queue, destination=[worker], reply=True, timeout=5)

    def _fail(self, what: str) -> BenchError:
        return BenchError(f"{self.key}: {what}\n{self.logs()}")


class OrchestratorSystem(System):
    """The product on PostgreSQL + RabbitMQ with its default SQL result backend (the counter join)."""

    key = "orchestrator"
    label = "orchestrator (PostgreSQL + RabbitMQ, SQL backend)"

    def __init__(self, database_url: str, broker_url: str, home: Path, log_dir: Path) -> None:
        self.concurrency = {"io": 64, "cpu": os.cpu_count() or 1, "fanin": 2}
        self.env = worker_env(
            {
                "ORCH_HOME": str(home),
                "ORCH_DATABASE_URL": database_url,
                "ORCH_BROKER_URL": broker_url,
                "ORCH_LOG_LEVEL": "INFO",
                "ORCH_IMPORTS": "bench.catalog",
            }
        )
        self.log_dir = log_dir
        self.workers: dict[str, WorkerProcess] = {}
        self._orc: Orchestrator | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "broker": "rabbitmq",
            "result_backend": "orchestrator SQLBackend (PostgreSQL, counter chord join)",
            "pools": {"io": "threads", "cpu": "prefork", "fanin": "prefork"},
            "concurrency": dict(self.concurrency),
        }

    @property
    def orc(self) -> Orchestrator:
        if self._orc is None:
            raise BenchError("orchestrator is not started")
        return self._orc

    def spawn(self) -> None:
        # Migrate first: workers on PostgreSQL expect the schema and do not create it.
        self._orc = Orchestrator(Settings.from_env(self.env), migrate=True)

    def wait_ready(self) -> None:
        started = start_pools(env=self.env, log_dir=self.log_dir, concurrency=self.concurrency)
        self.workers = {w.kind: w for w in started}

    def terminate(self) -> None:
        for worker in self.workers.values():
            worker.terminate()

    def stop(self) -> None:
        stop_all(self.workers.values(), timeout=20)
        self.workers.clear()
        if self._orc is not None:
            self._orc.app.close()
            self._orc.store.engine.dispose()

    def logs(self) -> str:
        return "\n".join(f"--- {k} worker\n{w.log()[-3000:]}" for k, w in self.workers.items())

    def set_cpu_concurrency(self, processes: int) -> None:
        """Restart the cpu pool with `processes` prefork children (warm shutdown of the old one first).

        The old worker is gone before the new one starts, so the two never share the cores being
        measured."""
        old = self.workers.pop("cpu", None)
        if old is not None:
            old.stop(timeout=20)
        worker = start_worker("cpu", env=self.env, log_dir=self.log_dir, concurrency=processes)
        self.workers["cpu"] = worker
        worker.wait_ready(60)
        self.concurrency["cpu"] = processes

    def _run(self, branches: list[Any], count: int = 1) -> Timing:
        started = time.perf_counter()
        ids = [self.orc.submit(branches, fan_in="jobs.aggregate.collect").id for _ in range(count)]
        submitted = time.perf_counter() - started
        views = [self.orc.wait(job_id, timeout=JOB_TIMEOUT) for job_id in ids]
        client = time.perf_counter() - started
        bad = [v for v in views if v.state != "succeeded"]
        if bad:
            raise self._fail(f"job {bad[0].id} ended {bad[0].state}: {bad[0].error}")
        finished = [v.finished_at for v in views if v.finished_at is not None]
        server = (max(finished) - min(v.created_at for v in views)).total_seconds() if finished else None
        phases = _phases(views[0], submitted) if count == 1 else {}
        if phases:
            # What the client's wait() adds after the job is final (its polling interval, mostly).
            phases["wait_lag_s"] = client - phases["server_total_s"]
        return Timing(client=client, server=server, phases=phases)

    def run_job(self, width: int, seconds: float) -> Timing:
        return self._run([branch("jobs.io.sleep", seconds=seconds) for _ in range(width)])

    def run_jobs(self, count: int, width: int, seconds: float) -> Timing:
        return self._run([branch("jobs.io.sleep", seconds=seconds) for _ in range(width)], count)

    def run_cpu_job(self, width: int, limit: int) -> Timing:
        """One job of `width` count_primes branches on the cpu pool (prefork)."""
        return self._run([branch("jobs.cpu.count_primes", limit=limit) for _ in range(width)])

    def deadline_lags(self, count: int, deadline: float, stuck_for: float) -> list[float]:
        """Seconds from each job's deadline to its final state (SQL timestamps), for jobs whose second
        branch is stuck past the deadline, so only the deadline watchdog can finalize them."""
        branches = [branch("jobs.io.sleep", 0.01), branch("bench.catalog.stuck", stuck_for)]
        ids = [
            self.orc.submit(branches, "jobs.aggregate.summary", deadline=deadline).id for _ in range(count)
        ]
        views = [self.orc.wait(job_id, timeout=JOB_TIMEOUT) for job_id in ids]
        bad = [v for v in views if v.state != "partial" or v.finished_at is None or v.deadline_at is None]
        if bad:
            raise self._fail(f"job {bad[0].id} ended {bad[0].state}: {bad[0].error}")
        time.sleep(stuck_for)  # let the stragglers free their io threads before the next scenario
        return [(v.finished_at - v.deadline_at).total_seconds() for v in views]  # type: ignore[operator]

    def branch_seconds(self, task: str, args: list[Any], count: int) -> list[float]:
        """Run `count` branches of `task` in one job; their run times (started -> outcome) from SQL."""
        job = self.orc.submit([branch(task, *args)] * count, "jobs.aggregate.summary")
        view = self.orc.wait(job.id, timeout=JOB_TIMEOUT)
        if view.state != "succeeded":
            raise self._fail(f"job {view.id} ended {view.state}: {view.error}")
        return [b.duration for b in view.branches if b.duration is not None]

    def submit_seconds(self, width: int, seconds: float) -> float:
        branches = [branch("jobs.io.sleep", seconds=seconds) for _ in range(width)]
        started = time.perf_counter()
        job = self.orc.submit(branches, fan_in="jobs.aggregate.collect")
        elapsed = time.perf_counter() - started
        view = self.orc.wait(job.id, timeout=JOB_TIMEOUT)
        if view.state != "succeeded":
            raise self._fail(f"job {view.id} ended {view.state}: {view.error}")
        return elapsed

    def bulk_submit_seconds(self, jobs: int, width: int) -> float:
        spec = JobSpec([branch("jobs.io.sleep", seconds=0.0) for _ in range(width)], "jobs.aggregate.collect")
        with self.consumers_paused(self.orc.app):
            started = time.perf_counter()
            views = self.orc.submit_many([spec] * jobs)
            elapsed = time.perf_counter() - started
        for view in views:
            final = self.orc.wait(view.id, timeout=JOB_TIMEOUT)
            if final.state != "succeeded":
                raise self._fail(f"job {final.id} ended {final.state}: {final.error}")
        return elapsed


def _phases(view: JobView, submitted: float) -> dict[str, float]:
    """Split one job's time by its SQL timestamps: where would a latency target be lost?"""
    starts = [b.started_at for b in view.branches if b.started_at is not None]
    ends = [b.finished_at for b in view.branches if b.finished_at is not None]
    durations = sorted(d for b in view.branches if (d := b.duration) is not None)
    if not starts or not ends or view.finished_at is None or not durations:
        return {}
    return {
        "submit_s": submitted,  # validate + insert + publish, as the client timed it
        "first_branch_start_s": (min(starts) - view.created_at).total_seconds(),
        "last_branch_start_s": (max(starts) - view.created_at).total_seconds(),
        "slowest_branch_s": durations[-1],
        "median_branch_s": durations[len(durations) // 2],
        "last_branch_end_s": (max(ends) - view.created_at).total_seconds(),
        "join_and_fan_in_s": (view.finished_at - max(ends)).total_seconds(),
        "server_total_s": (view.finished_at - view.created_at).total_seconds(),
    }


@dataclass
class PlainCelerySystem(System):
    """A plain Celery chord of `bench.sleep` tasks into `bench.collect`, worker run as a subprocess."""

    key: str
    label: str
    broker_url: str
    backend_url: str
    queue: str
    pool: str
    concurrency: int
    log_dir: Path
    broker: str
    backend: str
    polling_join: bool = False
    poll_interval: float = 0.02  # for backends without push (the database): how often get() looks
    worker: WorkerProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.app = plain_app.make_app(
            self.broker_url, self.backend_url, self.queue, concurrency=self.concurrency, set_as_current=False
        )

    def describe(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "broker": self.broker,
            "result_backend": self.backend,
            "pools": {self.queue: self.pool},
            "concurrency": {self.queue: self.concurrency},
        }

    def spawn(self) -> None:
        if self.backend_url.startswith("db+"):
            # Create Celery's result tables here, once, not racing between the worker and the client.
            self.app.backend.ResultSession().close()
        argv = [
            *(celery_executable(), "-A", "bench.plain_app", "worker"),
            *("-Q", self.queue, "-P", self.pool, "-c", str(self.concurrency)),
            *("-n", f"{self.key}@%h", "-l", "INFO", "--without-mingle", "--without-gossip"),
        ]
        env = worker_env(
            {
                "BENCH_BROKER_URL": self.broker_url,
                "BENCH_RESULT_BACKEND": self.backend_url,
                "BENCH_QUEUE": self.queue,
                "BENCH_CONCURRENCY": str(self.concurrency),
            }
        )
        self.worker = spawn(argv, name=self.key, log_dir=self.log_dir, env=env, cwd=ROOT)

    def wait_ready(self) -> None:
        if self.worker is None:
            raise BenchError(f"{self.key} was never spawned")
        self.worker.wait_ready(60)

    def terminate(self) -> None:
        if self.worker is not None:
            self.worker.terminate()

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(timeout=20)
        self.app.close()

    def logs(self) -> str:
        return f"--- {self.key} worker\n{self.worker.log()[-3000:]}" if self.worker else ""

    def _submit(self, width: int, seconds: float) -> AsyncResult:
        header = [self.app.signature(plain_app.SLEEP, args=(seconds,)) for _ in range(width)]
        return chord(header, self.app.signature(plain_app.COLLECT), app=self.app).apply_async()

    def _get(self, result: AsyncResult, width: int) -> None:
        value = result.get(timeout=JOB_TIMEOUT, interval=self.poll_interval)
        if value != width:
            raise self._fail(f"chord body saw {value} results, expected {width}")

    def run_job(self, width: int, seconds: float) -> Timing:
        started = time.perf_counter()
        self._get(self._submit(width, seconds), width)
        return Timing(client=time.perf_counter() - started)

    def run_jobs(self, count: int, width: int, seconds: float) -> Timing:
        started = time.perf_counter()
        results = [self._submit(width, seconds) for _ in range(count)]
        for result in results:
            self._get(result, width)
        return Timing(client=time.perf_counter() - started)

    def submit_seconds(self, width: int, seconds: float) -> float:
        started = time.perf_counter()
        result = self._submit(width, seconds)
        elapsed = time.perf_counter() - started
        self._get(result, width)
        return elapsed

    def bulk_submit_seconds(self, jobs: int, width: int) -> float:
        with self.consumers_paused(self.app):
            started = time.perf_counter()
            results = [self._submit(width, 0.0) for _ in range(jobs)]
            elapsed = time.perf_counter() - started
        for result in results:
            self._get(result, width)
        return elapsed


class AsyncioIdeal(System):
    """The floor: the same sleeps as coroutines under one asyncio.gather, no broker, no database."""

    key = "asyncio"
    label = "ideal (asyncio.gather in one process)"

    def describe(self) -> dict[str, Any]:
        return {"label": self.label, "broker": None, "result_backend": None, "pools": {"main": "asyncio"}}

    @staticmethod
    async def _gather(count: int, width: int, seconds: float) -> float:
        started = time.perf_counter()
        await asyncio.gather(*(asyncio.sleep(seconds) for _ in range(count * width)))
        return time.perf_counter() - started

    def run_job(self, width: int, seconds: float) -> Timing:
        return Timing(client=asyncio.run(self._gather(1, width, seconds)))

    def run_jobs(self, count: int, width: int, seconds: float) -> Timing:
        return Timing(client=asyncio.run(self._gather(count, width, seconds)))
