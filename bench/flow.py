"""Flow control under load, each on a deployment of its own (PostgreSQL + RabbitMQ, small pools so that
queues form): P12, a 10x overload burst with and without backpressure; P13, an urgent job behind a queue
of bulk jobs, with and without its priority."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from orchestrator import JobSpec, Orchestrator, Settings, branch
from orchestrator.cli.processes import WorkerProcess, start_pools, stop_all

from .scenarios import Context, Measurement, ScenarioResult, scenario
from .services import postgres_database, rabbitmq_vhost
from .systems import worker_env

#: Sizes per mode: the admission bound and the burst's job count (P12), the bulk jobs (P13).
SIZES = {
    "smoke": {"bound": 48, "bulk": 60},
    "quick": {"bound": 160, "bulk": 1000},
    "full": {"bound": 400, "bulk": 1000},
}


@dataclass
class Deployment:
    settings: Settings
    workers: dict[str, WorkerProcess] = field(default_factory=dict)

    def client(self, bound: int = 0) -> Orchestrator:
        """A producer of this deployment's, with an admission bound of `bound` branches (0: none)."""
        return Orchestrator(replace(self.settings, max_active_branches=bound, block_timeout=600.0))


@contextmanager
def deployment(ctx: Context, concurrency: dict[str, int]) -> Iterator[Deployment]:
    home = (ctx.log_dir or Path(".")) / "flow"
    with postgres_database() as db, rabbitmq_vhost() as broker:
        env = worker_env(
            {
                "ORCH_HOME": str(home),
                "ORCH_DATABASE_URL": db,
                "ORCH_BROKER_URL": broker,
                "ORCH_LOG_LEVEL": "INFO",
                "ORCH_IMPORTS": "bench.catalog",
                "ORCH_MAX_ACTIVE_BRANCHES": "0",
            }
        )
        settings = Settings.from_env(env)
        Orchestrator(settings, migrate=True)
        workers = start_pools(env=env, log_dir=home / "logs", concurrency=concurrency)
        try:
            yield Deployment(settings, {w.kind: w for w in workers})
        finally:
            stop_all(workers, timeout=20)


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a prefork pool's), from /proc."""
    total = 0
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        pids += [int(c) for c in children]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _depth(orc: Orchestrator, queues: tuple[str, ...]) -> int:
    with orc.app.connection_for_read() as conn:
        channel = conn.default_channel
        return sum(
            int(orc.app.amqp.queues[q].bind(channel).queue_declare(passive=True).message_count)
            for q in queues
        )


@dataclass
class Sampled:
    depth: list[float] = field(default_factory=list)
    rss: list[float] = field(default_factory=list)


def _burst(d: Deployment, bound: int, jobs: int) -> tuple[float, Sampled, int]:
    """`jobs` jobs of 8 x 50 ms io branches from four producer threads at once, the io queue's depth and
    the io worker's memory sampled every 50 ms; returns the seconds until all are final, the samples
    and how many did not succeed."""
    clients = [d.client(bound) for _ in range(4)]
    watcher = clients[0]
    queues = (d.settings.io_queue, d.settings.fanin_queue)
    io_pid = d.workers["io"].pid
    sampled, done = Sampled(), threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled.depth.append(_depth(watcher, queues))
            sampled.rss.append(_rss_mb(io_pid))
            time.sleep(0.05)

    def produce(orc: Orchestrator) -> list[str]:
        spec = JobSpec([branch("jobs.io.sleep", 0.05)] * 8, "jobs.aggregate.collect")
        return [orc.submit_many([spec])[0].id for _ in range(jobs // 4)]

    sampler = threading.Thread(target=sample)
    started = time.perf_counter()
    sampler.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            ids = [i for batch in pool.map(produce, clients) for i in batch]
        states = [watcher.wait(i, timeout=600).state for i in ids]
    finally:
        done.set()
        sampler.join()
    return time.perf_counter() - started, sampled, sum(s != "succeeded" for s in states)


@scenario("P12", "backpressure: a 10x overload burst, bounded and not", modes=("quick", "full"))
def overload_burst(ctx: Context, out: ScenarioResult) -> None:
    bound = SIZES[ctx.mode.name]["bound"]
    jobs = bound * 10 // 8  # 10x the bound, in branches
    out.params = {"bound_branches": bound, "jobs": jobs, "branches": 8, "branch_seconds": 0.05, "io_pool": 8}
    with deployment(ctx, {"io": 8, "cpu": 1, "fanin": 2}) as d:
        baseline_rss = _rss_mb(d.workers["io"].pid)
        results = {}
        for label, limit in (("unbounded", 0), ("bounded", bound)):
            ctx.say(f"P12 {label}: {jobs} jobs of 8 branches from 4 producers, bound {limit or 'none'}")
            seconds, sampled, failed = _burst(d, limit, jobs)
            results[label] = (seconds, sampled, failed)
            out.measure(
                Measurement(
                    label,
                    "queued messages (io + fanin) during the burst",
                    "messages",
                    sampled.depth,
                    0,
                    extra={"io worker RSS (MB)": sampled.rss},
                )
            )
            out.figure("peak queued messages", label, max(sampled.depth), "messages")
            out.figure("peak io worker RSS over idle", label, max(sampled.rss) - baseline_rss, "MB")
            out.figure("burst to all final", label, seconds, "s")
            out.figure("jobs not succeeded", label, failed, "jobs", ("<=", 0))
        (_, free, _), (_, held, _) = results["unbounded"], results["bounded"]
        ratio = max(held.depth) / max(max(free.depth), 1)
        out.figure("peak queue depth, bounded over unbounded", "bounded", ratio, "x", ("<=", 0.25))
        out.notes.append(
            f"With ORCH_MAX_ACTIVE_BRANCHES={bound} at most {bound // 8} jobs ({bound} branches) are "
            "admitted at once, so the broker holds at most that many io messages and their fan-ins; "
            "unbounded, the whole burst sits in RabbitMQ. The io worker's memory is bounded either way "
            "by its prefetch (one message per thread); the broker's is what the bound protects."
        )


@scenario("P13", "priorities: an urgent job behind a queue of bulk jobs", modes=("quick", "full"))
def urgent_behind_bulk(ctx: Context, out: ScenarioResult) -> None:
    bulk = SIZES[ctx.mode.name]["bulk"]
    out.params = {"bulk_jobs": bulk, "branch_seconds": 0.02, "io_pool": 2, "fanin_pool": 1}
    with deployment(ctx, {"io": 2, "cpu": 1, "fanin": 1}) as d:
        orc = d.client()
        for priority in (0, 9):
            ctx.say(f"P13 urgent job at priority {priority} behind {bulk} bulk jobs")
            spec = JobSpec([branch("jobs.io.sleep", 0.02)], "jobs.aggregate.collect")
            started = time.perf_counter()
            ids = [v.id for v in orc.submit_many([spec] * bulk)]
            urgent = orc.submit([branch("jobs.io.sleep", 0.02)], "jobs.aggregate.collect", priority=priority)
            orc.wait(urgent.id, timeout=600)
            urgent_s = time.perf_counter() - started
            for i in ids:
                orc.wait(i, timeout=600)
            drain_s = time.perf_counter() - started
            out.measure(Measurement(f"priority {priority}", "urgent job to final", "s", [urgent_s], 0))
            out.figure("urgent job to final", f"priority {priority}", urgent_s, "s")
            out.figure("bulk drained", f"priority {priority}", drain_s, "s")
            target = ("<=", 0.1) if priority else None
            out.figure("urgent over bulk drain", f"priority {priority}", urgent_s / drain_s, "x", target)
        out.notes.append(
            "Every message of the urgent job (its io batch, then its fan-in) overtakes the queued bulk; "
            "what it cannot overtake is a message a worker already prefetched (one per pool slot)."
        )
