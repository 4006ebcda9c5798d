"""Beyond one machine: worker hosts (P9), what a job costs PostgreSQL (P10), retention at volume (P11).

Each scenario runs a deployment of its own (a fresh database and vhost, its own workers), so it names no
system and the runner starts none for it. They run by default in the full mode only; `--only P9` (or
P10, P11) runs one in any mode. docs/scaling.md turns their figures into capacity.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import DateTime, String, Uuid, text

from orchestrator import JobSpec, JobView, Orchestrator, Settings, branch, database
from orchestrator.app import sql_backend
from orchestrator.cli.processes import WorkerProcess, start_pools, start_worker, stop_all
from orchestrator.models import Base

from . import pgbouncer, services
from .hosts import worker_hosts
from .scenarios import Context, Measurement, ScenarioResult, scenario
from .systems import BenchError, worker_env

TICK = os.sysconf("SC_CLK_TCK")
JOB_TIMEOUT = 300.0


def _log_dir(ctx: Context, home: Path) -> Path:
    return ctx.log_dir if ctx.log_dir is not None else home / "logs"


def _wait_all(orc: Orchestrator, ids: Sequence[str], state: str = "succeeded") -> list[JobView]:
    views = [orc.wait(job_id, timeout=JOB_TIMEOUT) for job_id in ids]
    bad = [v for v in views if v.state != state]
    if bad:
        raise BenchError(f"job {bad[0].id} ended {bad[0].state}: {bad[0].error}")
    return views


def _deployment_env(home: Path, database_url: str, broker_url: str, **extra: str) -> dict[str, str]:
    return worker_env(
        {
            "ORCH_HOME": str(home),
            "ORCH_DATABASE_URL": database_url,
            "ORCH_BROKER_URL": broker_url,
            "ORCH_LOG_LEVEL": "INFO",
            **extra,
        }
    )


# --- P9 --------------------------------------------------------------------------------------------


def _server_rate(views: Sequence[JobView]) -> float:
    """Jobs per second on the server's clock: first created to last finished."""
    finished = [v.finished_at for v in views if v.finished_at is not None]
    span = (max(finished) - min(v.created_at for v in views)).total_seconds()
    return len(views) / span


@scenario("P9", "worker hosts: io-bound jobs on 1, 2 and 3 hosts (network namespaces)", modes=("full",))
def worker_hosts_scaling(ctx: Context, out: ScenarioResult) -> None:
    """Hosts made by scripts/hosts.sh, each running `orchestrator worker io` with a fixed pool of 8
    threads; the fan-in pool and the client stay on the machine. N x jobs-per-host jobs of 8 branches of
    0.2 s are submitted at once (submit_many), one message per branch (ORCH_IO_CHUNK_SIZE=1) so that every
    host takes a share of every job; throughput is jobs over the span from their creation to the last
    one's end (SQL timestamps). A host's capacity is 8 branches at a time: 5 jobs/s."""
    threads, seconds, width = 8, 0.2, 8
    per_host = ctx.mode.p9_jobs_per_host
    ideal_per_host = threads / seconds / width
    out.params = {
        "io_threads_per_host": threads,
        "branch_seconds": seconds,
        "branches": width,
        "jobs_per_host_and_run": per_host,
        "runs": ctx.mode.p9_runs,
        "ideal_jobs_per_s_per_host": ideal_per_host,
    }
    out.notes.append(
        "CPU-bound scaling cannot be shown here: the hosts are namespaces on one two-core machine, so "
        "a cpu pool per host adds processes, not cores (P4 shows 1 vs 2 processes). io branches wait, "
        "so each host's io pool is what a host adds."
    )
    spec = JobSpec([branch("jobs.io.sleep", seconds=seconds) for _ in range(width)], "jobs.aggregate.collect")
    rates: dict[int, float] = {}
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-p9-")))
        db = stack.enter_context(services.postgres_database("p9"))
        vhost = stack.enter_context(services.rabbitmq_vhost())
        hosts = stack.enter_context(worker_hosts(3))
        env = _deployment_env(home, db, vhost, ORCH_IO_CONCURRENCY=str(threads), ORCH_IO_CHUNK_SIZE="1")
        host_env = {**env, "ORCH_DATABASE_URL": hosts.url(db), "ORCH_BROKER_URL": hosts.url(vhost)}
        orc = Orchestrator(Settings.from_env(env), migrate=True)
        stack.callback(orc.app.close)
        workers: list[WorkerProcess] = []
        stack.callback(stop_all, workers)  # before the hosts are taken down (the stack unwinds backwards)
        log_dir = _log_dir(ctx, home)
        workers.append(start_worker("fanin", env=env, log_dir=log_dir, concurrency=2))
        workers[-1].wait_ready(60)
        for n in (1, 2, 3):
            worker = hosts.start_worker(n, "io", env=host_env, log_dir=log_dir, concurrency=threads)
            workers.append(worker)
            worker.wait_ready(60)
            jobs = per_host * n
            ctx.say(f"P9 {n} host(s): warm-up + {ctx.mode.p9_runs} runs of {jobs} jobs")
            _wait_all(orc, [v.id for v in orc.submit_many([spec] * (2 * n))])
            before = _tasks_per_node(orc)
            samples = []
            for _ in range(ctx.mode.p9_runs):
                samples.append(_server_rate(_wait_all(orc, [v.id for v in orc.submit_many([spec] * jobs)])))
            after = _tasks_per_node(orc)
            share = {
                node: after.get(node, 0) - before.get(node, 0) for node in after if node.startswith("io@")
            }
            m = out.measure(
                Measurement(
                    f"orchestrator, {n} host(s)",
                    "throughput",
                    "jobs/s",
                    samples,
                    1,
                    params={"hosts": n, "jobs": jobs, "branches_per_host": share},
                )
            )
            rates[n] = m.median
            out.figure(f"jobs/s, {n} host(s)", "orchestrator", m.median, "jobs/s")
            out.figure(f"of ideal, {n} host(s)", "orchestrator", m.median / (ideal_per_host * n), "x")
    out.figure("speed-up 2 vs 1 host", "orchestrator", rates[2] / rates[1], "x", (">=", 1.8))
    out.figure("speed-up 3 vs 1 host", "orchestrator", rates[3] / rates[1], "x", (">=", 2.6))


def _tasks_per_node(orc: Orchestrator) -> dict[str, int]:
    """Tasks each worker node has run since it started (celery inspect stats)."""
    stats = orc.app.control.inspect(timeout=5).stats() or {}
    return {node: sum((s.get("total") or {}).values()) for node, s in stats.items()}


# --- P10 -------------------------------------------------------------------------------------------


def _cpu(pid: int) -> float | None:
    """CPU seconds (user + system) of a process so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _run_ns(pid: int) -> float | None:
    """CPU seconds of a single-threaded process (a PostgreSQL backend) with nanosecond resolution (the
    scheduler's own account), where /proc/PID/stat counts 10 ms ticks; None once it is gone."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def _descendants(roots: Sequence[int]) -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                parents.setdefault(ppid, []).append(int(entry))
    found, todo = set(roots), list(roots)
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _tree_cpu(roots: Sequence[int]) -> float:
    return sum(c for pid in _descendants(roots) if (c := _cpu(pid)) is not None)


def _named_cpu(name: str) -> float:
    """CPU seconds of every process whose command is `name` (RabbitMQ's beam.smp)."""
    total = 0.0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{entry}/comm").read_text().strip() == name:
                    total += _cpu(int(entry)) or 0.0
    return total


class BackendCpu:
    """CPU seconds the PostgreSQL backends serving one database spend, sampled every 0.1 s from /proc
    (a backend that ends between two samples loses at most 0.1 s of its account; with the pools' kept
    connections, backends do not end during a run)."""

    def __init__(self, database_name: str) -> None:
        self.name = database_name
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()

    def _sample(self, into_first: bool = False) -> None:
        with psycopg.connect(services.SERVICES.pg_admin_url, autocommit=True) as conn:
            pids = [
                r[0]
                for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,))
            ]
        for pid in pids:
            seconds = _run_ns(pid)
            if seconds is not None:
                if into_first:
                    self.first[pid] = seconds
                self.last[pid] = seconds

    @contextmanager
    def measuring(self) -> Iterator[BackendCpu]:
        self._sample(into_first=True)
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)
            self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self._sample()

    @property
    def seconds(self) -> float:
        return sum(v - self.first.get(pid, 0.0) for pid, v in self.last.items())


@dataclass(frozen=True)
class Cost:
    """What N jobs cost, per job: CPU milliseconds per process group, and statements PgBouncer counted."""

    jobs: int
    width: int
    postgres_ms: float  # the database's backends
    workers_ms: float  # the three pools' processes
    broker_ms: float  # every beam.smp on the machine: an upper bound when others use RabbitMQ too
    client_ms: float  # this process: submit and wait
    round_trips: float  # queries PgBouncer relayed (BEGIN and COMMIT are queries too)
    transactions: float
    jobs_per_s: float


def _cost(
    orc: Orchestrator,
    bouncer: pgbouncer.PgBouncer,
    name: str,
    workers: Sequence[WorkerProcess],
    jobs: int,
    width: int,
) -> Cost:
    branches = [branch("jobs.io.sleep", seconds=0.0) for _ in range(width)]
    roots = [w.pid for w in workers]
    stats, worker_cpu, broker_cpu = bouncer.stats(name), _tree_cpu(roots), _named_cpu("beam.smp")
    client_cpu, started = time.process_time(), time.perf_counter()
    with BackendCpu(name).measuring() as backends:
        _wait_all(orc, [orc.submit(branches, "jobs.aggregate.collect").id for _ in range(jobs)])
        wall = time.perf_counter() - started
        client_cpu = time.process_time() - client_cpu
    after = bouncer.stats(name)
    return Cost(
        jobs=jobs,
        width=width,
        postgres_ms=backends.seconds / jobs * 1000,
        workers_ms=(_tree_cpu(roots) - worker_cpu) / jobs * 1000,
        broker_ms=(_named_cpu("beam.smp") - broker_cpu) / jobs * 1000,
        client_ms=client_cpu / jobs * 1000,
        round_trips=(after["total_query_count"] - stats["total_query_count"]) / jobs,
        transactions=(after["total_xact_count"] - stats["total_xact_count"]) / jobs,
        jobs_per_s=jobs / wall,
    )


#: (label, extra environment, job widths). The first is the deployment's default.
P10_VARIANTS: list[tuple[str, dict[str, str], tuple[int, ...]]] = [
    ("default", {}, (8, 40)),
    # Each branch its own message, as every cpu branch is: the per-branch cost without io batching.
    ("one message per branch", {"ORCH_IO_CHUNK_SIZE": "1"}, (8, 40)),
    ("ping every checkout", {"ORCH_DB_PING_AFTER": "0"}, (8,)),
    ("prepared statements off", {"ORCH_DB_POOLER": "transaction"}, (8,)),
]


@scenario("P10", "what a job costs PostgreSQL: server CPU and round trips", modes=("full",))
def database_cost(ctx: Context, out: ScenarioResult) -> None:
    """Jobs of 8 (and 40) no-op io branches, submitted one by one and waited for, as P2's. The database is
    reached through a PgBouncer in session mode (transparent: prepared statements and LISTEN work), whose
    counters give the round trips; the backends' CPU is read from /proc. Variants restart the pools:
    a ping on every checkout (the old pool_pre_ping), and prepared statements off (what ORCH_DB_POOLER=
    transaction sets). The per-branch figure is the slope between 8 and 40 branches (one io batch)."""
    jobs = ctx.mode.p10_jobs
    concurrency = {"io": 8, "cpu": 2, "fanin": 2}
    out.params = {"jobs": jobs, "concurrency": concurrency, "variants": [v[0] for v in P10_VARIANTS]}
    out.notes.append(
        "client, submit and wait included; broker CPU is every beam.smp on the machine, an upper bound "
        "when other runs share RabbitMQ"
    )
    costs: dict[tuple[str, int], Cost] = {}
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-p10-")))
        db = stack.enter_context(services.postgres_database("p10"))
        vhost = stack.enter_context(services.rabbitmq_vhost())
        bouncer = stack.enter_context(
            pgbouncer.running(services.SERVICES.pg_admin_url, pool_mode="session", pool_size=60)
        )
        database.upgrade(db)
        name, counted = db.rsplit("/", 1)[1], bouncer.url(db)
        for label, extra, widths in P10_VARIANTS:
            if "ORCH_DB_POOLER" in extra:  # waits LISTEN through the session-mode PgBouncer all the same
                extra = {**extra, "ORCH_LISTEN_DATABASE_URL": counted}
            env = _deployment_env(home, counted, vhost, **extra)
            settings = Settings.from_env(env)
            database.configure(settings)
            orc = Orchestrator(settings)
            workers = start_pools(env=env, log_dir=_log_dir(ctx, home), concurrency=concurrency)
            try:
                for width in widths:
                    ctx.say(f"P10 {label}, {width} branches: warm-up + {jobs} jobs")
                    _wait_all(
                        orc,
                        [
                            orc.submit([branch("jobs.io.sleep", 0.0)] * width, "jobs.aggregate.collect").id
                            for _ in range(20)
                        ],
                    )
                    cost = costs[label, width] = _cost(orc, bouncer, name, workers, jobs, width)
                    out.measure(
                        Measurement(
                            f"orchestrator, {label}",
                            f"per job of {width}",
                            "ms",
                            [cost.postgres_ms],
                            1,
                            params=vars(cost),
                        )
                    )
            finally:
                stop_all(workers)
                orc.app.close()
                orc.store.engine.dispose()
    base = costs["default", 8]
    out.figure("PostgreSQL CPU per job of 8", "orchestrator", base.postgres_ms, "ms")
    out.figure("round trips per job of 8", "orchestrator", base.round_trips, "")
    out.figure("transactions per job of 8", "orchestrator", base.transactions, "")
    for label, how in (("default", "batched io branch"), ("one message per branch", "branch, own message")):
        narrow, wide = costs[label, 8], costs[label, 40]
        out.figure(
            f"PostgreSQL CPU per extra {how}",
            "orchestrator",
            (wide.postgres_ms - narrow.postgres_ms) / 32 * 1000,
            "us",
        )
        out.figure(
            f"round trips per extra {how}", "orchestrator", (wide.round_trips - narrow.round_trips) / 32, ""
        )
    out.figure("jobs of 8 per PostgreSQL core", "orchestrator", 1000 / base.postgres_ms, "jobs/s")
    out.figure(
        "branches per PostgreSQL core, jobs of 8", "orchestrator", 8000 / base.postgres_ms, "branches/s"
    )
    out.figure("workers CPU per job of 8", "orchestrator", base.workers_ms, "ms")
    out.figure("broker CPU per job of 8 (upper bound)", "orchestrator", base.broker_ms, "ms")
    out.figure("client CPU per job of 8", "orchestrator", base.client_ms, "ms")
    for label, _, _ in P10_VARIANTS[2:]:
        other = costs[label, 8]
        out.figure(
            f"{label}: PostgreSQL CPU ratio", "orchestrator", other.postgres_ms / base.postgres_ms, "x"
        )
        out.figure(f"{label}: round trips ratio", "orchestrator", other.round_trips / base.round_trips, "x")


# --- P11 -------------------------------------------------------------------------------------------


#: Tables whose rows belong to one job (besides those that reference jobs.id): the chord join, its
#: parts, Celery's results.
PER_JOB_TABLES = ("chord_counters", "chord_parts", "celery_results")


def _per_job_tables() -> list[Any]:
    """The tables a job writes rows to, parents first (jobs, then whatever references it)."""
    return [
        t
        for t in Base.metadata.sorted_tables
        if t.name == "jobs"
        or t.name in PER_JOB_TABLES
        or any(fk.column.table.name == "jobs" for fk in t.foreign_keys)
    ]


def _clone_statement(table: Any, copies: tuple[int, int], step_seconds: int) -> str:
    """INSERT ... SELECT copying the template rows of `table` (snapshot `template_<name>`) once per copy
    number: ids unique per copy (uuids hashed with it, string keys suffixed, the same way in every table so
    references hold), unique columns NULL, times shifted back by copy x step_seconds."""
    columns, values = [], []
    for column in table.columns:
        name = f'"{column.name}"'
        columns.append(name)
        if isinstance(column.type, Uuid):
            values.append(f"md5(t.{name}::text || g.k::text)::uuid")
        elif column.primary_key and isinstance(column.type, String):
            values.append(f"t.{name} || '-' || g.k::text")
        elif column.unique:
            values.append("NULL")
        elif isinstance(getattr(column.type, "impl", column.type), DateTime):
            values.append(f"t.{name} - make_interval(secs => g.k * {step_seconds})")
        else:
            values.append(f"t.{name}")
    first, last = copies
    return (
        f'INSERT INTO "{table.name}" ({", ".join(columns)}) SELECT {", ".join(values)} '
        f'FROM "template_{table.name}" t CROSS JOIN generate_series({first}, {last}) AS g(k)'
    )


def _sizes(url: str) -> dict[str, dict[str, int]]:
    """Rows and bytes per table (heap, indexes, total) and bytes per index."""
    query = """
        SELECT c.relname, c.reltuples::bigint, pg_table_size(c.oid), pg_indexes_size(c.oid),
               pg_total_relation_size(c.oid)
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r'"""
    indexes = "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes"
    with database.get_engine(url).connect() as conn:
        conn.execute(text("ANALYZE"))
        out = {
            row[0]: {
                "rows": max(int(row[1]), 0),
                "table": int(row[2]),
                "indexes": int(row[3]),
                "total": int(row[4]),
            }
            for row in conn.execute(text(query))
        }
        out["indexes"] = {str(row[0]): int(row[1]) for row in conn.execute(text(indexes))}
    return out


@scenario("P11", "retention at volume: sizes after N branches, and pruning half of them", modes=("full",))
def retention_at_volume(ctx: Context, out: ScenarioResult) -> None:
    """25 real jobs of 8 io branches run end to end; their rows (jobs, branches, chord joins, results:
    every table with a per-job key) are then copied in SQL until the database holds N branches, spread
    back in time, one copy every 10 s. Measured: rows and bytes per table and index, then `orchestrator
    db prune` (Store.prune and the result backend's prune) of the older half, then VACUUM, then VACUUM
    FULL (what compaction gives back)."""
    template_jobs, width, step = 25, 8, 10
    target = ctx.mode.p11_branches
    copies = max(target // (template_jobs * width) - 1, 1)
    out.params = {
        "branches": (copies + 1) * template_jobs * width,
        "template_jobs": template_jobs,
        "width": width,
    }
    with ExitStack() as stack:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-p11-")))
        db = stack.enter_context(services.postgres_database("p11"))
        vhost = stack.enter_context(services.rabbitmq_vhost())
        env = _deployment_env(home, db, vhost)
        settings = Settings.from_env(env)
        orc = Orchestrator(settings, migrate=True)
        stack.callback(orc.app.close)
        workers = start_pools(
            ("io", "fanin"), env=env, log_dir=_log_dir(ctx, home), concurrency={"io": 16, "fanin": 2}
        )
        try:
            ctx.say(f"P11: {template_jobs} real jobs, then {copies} copies in SQL")
            spec = [branch("jobs.io.sleep", seconds=0.0) for _ in range(width)]
            _wait_all(orc, [orc.submit(spec, "jobs.aggregate.collect").id for _ in range(template_jobs)])
        finally:
            stop_all(workers)
        engine = database.get_engine(db)
        started = time.perf_counter()
        tables = _per_job_tables()
        with engine.connect() as conn:
            for table in tables:  # the templates, before any copy joins them
                conn.execute(
                    text(f'CREATE TEMPORARY TABLE "template_{table.name}" AS SELECT * FROM "{table.name}"')
                )
            conn.commit()
            for first in range(1, copies + 1, 500):
                for table in tables:
                    conn.execute(text(_clone_statement(table, (first, min(first + 499, copies)), step)))
                conn.commit()
        out.notes.append(f"copied in {time.perf_counter() - started:.0f} s")
        full = _sizes(db)
        branches = full["branches"]["rows"]
        ctx.say(f"P11: {branches} branches recorded; pruning the older half")
        names = [t for t in full if t != "indexes"]
        total = sum(full[t]["total"] for t in names)
        out.figure("branches recorded", "orchestrator", branches, "")
        out.figure("bytes per branch, all tables and indexes", "orchestrator", total / branches, "B")
        for table in ("jobs", "branches", "chord_counters", "chord_parts", "celery_results"):
            if table in full:
                out.figure(
                    f"{table}: table + indexes", "orchestrator", max(full[table]["total"], 1) / 2**20, "MiB"
                )
        age = timedelta(seconds=step * copies / 2)
        started = time.perf_counter()
        jobs_pruned = orc.store.prune(age)
        results_pruned = sql_backend(settings).prune(age)
        prune_s = time.perf_counter() - started
        out.figure("prune of the older half", "orchestrator", prune_s, "s")
        out.figure("jobs pruned per second", "orchestrator", jobs_pruned / prune_s, "jobs/s")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            started = time.perf_counter()
            conn.execute(text("VACUUM"))
            vacuum_s = time.perf_counter() - started
            vacuumed = _sizes(db)
            started = time.perf_counter()
            conn.execute(text("VACUUM FULL"))
            full_s = time.perf_counter() - started
        compacted = _sizes(db)
        out.figure("VACUUM after the prune", "orchestrator", vacuum_s, "s")
        out.figure("VACUUM FULL after the prune", "orchestrator", full_s, "s")
        for label, sizes in (("after prune + VACUUM", vacuumed), ("after VACUUM FULL", compacted)):
            size = sum(sizes[t]["total"] for t in names if t in sizes)
            out.figure(f"all tables, {label}", "orchestrator", size / 2**20, "MiB")
        out.figure("all tables before pruning", "orchestrator", total / 2**20, "MiB")
        out.measure(
            Measurement(
                "orchestrator",
                "sizes",
                "MiB",
                [total / 2**20],
                1,
                params={
                    "before": full,
                    "after_prune_vacuum": vacuumed,
                    "after_vacuum_full": compacted,
                    "jobs_pruned": jobs_pruned,
                    "result_rows_pruned": results_pruned,
                },
            )
        )
        engine.dispose()
