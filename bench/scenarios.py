"""The scenarios. Each is one function registered in SCENARIOS with the systems it runs against.

A scenario measures (warm-up runs discarded, then repeated runs), and states its headline figures as
ratios against a baseline measured in the same run, with the target the issue set where there is one.
P5 (deadline to final) and P6 (open-breaker rejection) join the list when the product has them.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jobs.cpu import count_primes
from orchestrator import CircuitBreaker, CircuitOpen
from orchestrator.cli.demo import local_http_server

from .modes import Mode
from .stats import summarize
from .systems import OrchestratorSystem, System, Timing

ORCH = "orchestrator"
REDIS = "celery-redis"
RABBIT = "celery-rabbitmq"
GEVENT = "celery-redis-gevent"
DB = "celery-db"
IDEAL = "asyncio"

T = TypeVar("T")


@dataclass
class Measurement:
    """Samples of one metric on one system; `extra` holds secondary series from the same runs."""

    system: str
    metric: str
    unit: str
    samples: list[float]
    warmup: int
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, list[float]] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def to_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "metric": self.metric,
            "unit": self.unit,
            "warmup_runs": self.warmup,
            "params": self.params,
            "summary": summarize(self.samples).to_dict(),
            "samples": self.samples,
            "extra": {
                k: {"summary": summarize(v).to_dict(), "samples": v} for k, v in self.extra.items() if v
            },
        }


@dataclass
class Figure:
    """A headline number: a median or a ratio of medians, with its target when the issue set one."""

    name: str
    system: str
    value: float
    unit: str
    target: str | None = None
    met: bool | None = None


@dataclass
class ScenarioResult:
    id: str
    title: str
    params: dict[str, Any] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def measure(self, m: Measurement) -> Measurement:
        self.measurements.append(m)
        return m

    def figure(
        self, name: str, system: str, value: float, unit: str, target: tuple[str, float] | None = None
    ) -> None:
        met = None
        if target is not None:
            op, bound = target
            met = value <= bound if op == "<=" else value >= bound
        shown = None if target is None else f"{target[0]} {target[1]:g}{'' if unit == 'x' else ' '}{unit}"
        self.figures.append(Figure(name, system, value, unit, shown, met))

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "params": self.params,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "notes": self.notes,
            "figures": [vars(f) for f in self.figures],
            "measurements": [m.to_dict() for m in self.measurements],
        }


@dataclass
class Context:
    """What a scenario gets: the mode's sizes and the running systems it named, in its order."""

    mode: Mode
    systems: Mapping[str, System]
    say: Callable[[str], None]
    log_dir: Path | None = None  # where a scenario that starts its own workers writes their logs

    def present(self) -> list[System]:
        return list(self.systems.values())


#: Every mode: a scenario runs in each unless it says otherwise.
ALL_MODES = ("smoke", "quick", "full")


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    systems: tuple[str, ...]
    run: Callable[[Context, ScenarioResult], None]
    # The modes that run it when no --only names it (--only runs it in any mode).
    modes: tuple[str, ...] = ALL_MODES


SCENARIOS: list[Scenario] = []


def scenario(
    id: str, title: str, *systems: str, modes: tuple[str, ...] = ALL_MODES
) -> Callable[[Callable[[Context, ScenarioResult], None]], Any]:
    """Register a scenario; the runner starts only the systems that the selected scenarios name. A
    scenario naming no system runs a deployment of its own (P9-P11)."""

    def register(fn: Callable[[Context, ScenarioResult], None]) -> Callable[[Context, ScenarioResult], None]:
        SCENARIOS.append(Scenario(id, title, systems, fn, modes))
        return fn

    return register


def repeat(fn: Callable[[], T], warmup: int, runs: int) -> list[T]:
    """Run `warmup` discarded times, then `runs` kept times."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(runs)]


def _server(timings: Sequence[Timing]) -> list[float]:
    return [t.server for t in timings if t.server is not None]


# --- P1 ------------------------------------------------------------------------------------------


@scenario("P1", "fan-out latency: 8 io branches x 200 ms", ORCH, REDIS, DB, IDEAL)
def fan_out_latency(ctx: Context, out: ScenarioResult) -> None:
    """Submit to final state observed by the client; the slowest branch (200 ms) is the floor."""
    width, seconds = 8, 0.2
    out.params = {"branches": width, "branch_seconds": seconds}
    for system in ctx.present():
        runs = ctx.mode.p1_runs_polling if system.polling_join else ctx.mode.p1_runs
        ctx.say(f"P1 {system.key}: {ctx.mode.warmup} warm-up + {runs} runs")
        timings = repeat(functools.partial(system.run_job, width, seconds), ctx.mode.warmup, runs)
        extra = {"server_latency_s": _server(timings)}
        for phase in timings[0].phases:
            extra[f"phase_{phase}"] = [t.phases[phase] for t in timings if phase in t.phases]
        m = out.measure(
            Measurement(system.key, "latency", "s", [t.client for t in timings], ctx.mode.warmup, extra=extra)
        )
        p50, p95 = summarize(m.samples).median, summarize(m.samples).p95
        target = ("<=", 1.10) if system.key == ORCH else None
        out.figure("p50 latency", system.key, p50, "s")
        out.figure("p50 / slowest branch", system.key, p50 / seconds, "x", target)
        out.figure("p95 / slowest branch", system.key, p95 / seconds, "x")


# --- P2 ------------------------------------------------------------------------------------------


@scenario("P2", "throughput: many small jobs of 8 no-op branches", ORCH, REDIS, DB)
def throughput(ctx: Context, out: ScenarioResult) -> None:
    """Submit them all, then wait for all; a job is its 8 branches plus its fan-in (9 tasks)."""
    width = 8
    out.params = {"branches": width, "branch_seconds": 0.0, "tasks_per_job": width + 1}
    rates: dict[str, float] = {}
    for system in ctx.present():
        jobs = ctx.mode.p2_jobs_polling if system.polling_join else ctx.mode.p2_jobs
        ctx.say(f"P2 {system.key}: {ctx.mode.warmup} warm-up + {ctx.mode.p2_runs} runs of {jobs} jobs")
        for _ in range(ctx.mode.warmup):
            system.run_jobs(min(jobs, 3), width, 0.0)
        timings = [system.run_jobs(jobs, width, 0.0) for _ in range(ctx.mode.p2_runs)]
        m = out.measure(
            Measurement(
                system.key,
                "throughput",
                "jobs/s",
                [jobs / t.client for t in timings],
                ctx.mode.warmup,
                params={"jobs": jobs},
                extra={
                    "tasks_per_s": [jobs * (width + 1) / t.client for t in timings],
                    "server_jobs_per_s": [jobs / s for s in _server(timings) if s > 0],
                },
            )
        )
        rates[system.key] = m.median
        out.figure("jobs/s", system.key, m.median, "jobs/s")
        out.figure("tasks/s", system.key, statistics.median(m.extra["tasks_per_s"]), "tasks/s")
    if REDIS in rates:
        for key, rate in rates.items():
            if key != REDIS:
                target = (">=", 1.0) if key == ORCH else None
                out.figure(f"jobs/s ratio to {REDIS}", key, rate / rates[REDIS], "x", target)
    if ORCH in rates and DB in rates:
        out.figure(f"jobs/s ratio to {DB}", ORCH, rates[ORCH] / rates[DB], "x", (">=", 20.0))


# --- P3 ------------------------------------------------------------------------------------------


@scenario("P3", "wide fan-out: 1000 io branches x 100 ms in one job", ORCH, REDIS, GEVENT, IDEAL)
def wide_fan_out(ctx: Context, out: ScenarioResult) -> None:
    """Wall time of one wide job: bound by per-message overhead, not by the sleeping. Every threads pool
    runs 64 branches at once (the orchestrator's ORCH_IO_CONCURRENCY caps its branches, whatever the
    batches), so 1000 x 100 ms cannot take less than 16 rounds: 1.6 s."""
    width, seconds = ctx.mode.p3_width, 0.1
    warm = min(width, 64)  # enough to start every thread of a 64-thread pool
    out.params = {"branches": width, "branch_seconds": seconds, "warmup_branches": warm, "threads": 64}
    walls: dict[str, float] = {}
    for system in ctx.present():
        ctx.say(f"P3 {system.key}: {ctx.mode.warmup} warm-up ({warm} wide) + {ctx.mode.p3_runs} runs")
        for _ in range(ctx.mode.warmup):
            system.run_job(warm, seconds)
        timings = [system.run_job(width, seconds) for _ in range(ctx.mode.p3_runs)]
        m = out.measure(
            Measurement(
                system.key,
                "wall",
                "s",
                [t.client for t in timings],
                ctx.mode.warmup,
                extra={"server_wall_s": _server(timings)},
            )
        )
        walls[system.key] = m.median
        target = ("<=", 1.5) if system.key == ORCH and width >= 1000 else None
        out.figure("wall", system.key, m.median, "s", target)
    if IDEAL in walls:
        for key, wall in walls.items():
            if key != IDEAL:
                out.figure(f"wall ratio to {IDEAL}", key, wall / walls[IDEAL], "x")
    plain = {k: v for k, v in walls.items() if k in (REDIS, GEVENT)}
    if ORCH in walls and plain:
        best = min(plain, key=plain.__getitem__)
        out.figure(f"wall ratio to best plain Celery ({best})", ORCH, walls[ORCH] / plain[best], "x")


# --- P4 ------------------------------------------------------------------------------------------


def calibrate_primes(seconds: float) -> tuple[int, float]:
    """The count_primes limit that takes about `seconds` here (the workers run the same code)."""
    limit, took = 1_000_000, 0.0
    for _ in range(3):
        took = min(_timed(count_primes, limit) for _ in range(2))
        limit = max(10_000, int(limit * seconds / max(took, 1e-6)))
    return limit, min(_timed(count_primes, limit) for _ in range(2))


def _timed(fn: Callable[[int], object], arg: int) -> float:
    started = time.perf_counter()
    fn(arg)
    return time.perf_counter() - started


@scenario("P4", "cpu scaling: cpu branches on 1 vs 2 prefork processes", ORCH)
def cpu_scaling(ctx: Context, out: ScenarioResult) -> None:
    """The same cpu job on a cpu pool of 2, then 1 process (a restart); speed-up = time(1) / time(2).

    The pool runs 2 first when it already has 2 (no restart), and nothing after P4 uses the cpu pool, so
    it is left at 1: two restarts fewer, a few seconds each.
    """
    system = ctx.systems.get(ORCH)
    if not isinstance(system, OrchestratorSystem):
        return
    width = ctx.mode.p4_branches
    limit, took = calibrate_primes(ctx.mode.p4_branch_seconds)
    out.params = {"branches": width, "count_primes_limit": limit, "branch_seconds_in_harness": round(took, 4)}
    out.notes.append(
        "job time is the server's (job created to finalized, from its SQL timestamps), so the client's "
        "wait() polling interval does not blur the ratio; the client-observed time is in extra"
    )
    medians: dict[int, float] = {}
    for processes in (2, 1):
        if system.concurrency["cpu"] != processes:
            system.set_cpu_concurrency(processes)
        ctx.say(f"P4 cpu pool with {processes} process(es): {ctx.mode.warmup} + {ctx.mode.p4_runs} runs")
        for _ in range(ctx.mode.warmup):
            system.run_cpu_job(processes, limit)  # every pool process forks, imports and runs once
        timings = [system.run_cpu_job(width, limit) for _ in range(ctx.mode.p4_runs)]
        m = out.measure(
            Measurement(
                f"{ORCH} cpu x{processes}",
                "job time",
                "s",
                [t.server if t.server is not None else t.client for t in timings],
                ctx.mode.warmup,
                params={"processes": processes},
                extra={
                    "client_latency_s": [t.client for t in timings],
                    "median_branch_s": [t.phases["median_branch_s"] for t in timings if t.phases],
                },
            )
        )
        medians[processes] = m.median
        out.figure(f"job time, {processes} process(es)", ORCH, m.median, "s")
        if m.extra["median_branch_s"]:
            # If this grows with 2 processes, they did not get two free cores (see the machine's load).
            branch_s = statistics.median(m.extra["median_branch_s"])
            out.figure(f"branch time, {processes} process(es)", ORCH, branch_s, "s")
    out.figure("speed-up 2 vs 1 process", ORCH, medians[1] / medians[2], "x", (">=", 1.8))


# --- P5 ------------------------------------------------------------------------------------------


@scenario("P5", "deadline: stuck branches, deadline to final state", ORCH)
def deadline_to_final(ctx: Context, out: ScenarioResult) -> None:
    """Jobs whose second branch sleeps past the deadline and ignores it: only the ETA watchdog can end
    them. Measured on the server's clock: finished_at - deadline_at, per job."""
    system = ctx.systems[ORCH]
    assert isinstance(system, OrchestratorSystem)
    deadline, stuck_for = 0.5, 2.0
    out.params = {"jobs": ctx.mode.p5_jobs, "deadline_s": deadline, "stuck_branch_s": stuck_for}
    ctx.say(f"P5 {ORCH}: {ctx.mode.p5_jobs} jobs, deadline {deadline}s")
    system.deadline_lags(2, deadline, stuck_for)  # warm-up
    lags = system.deadline_lags(ctx.mode.p5_jobs, deadline, stuck_for)
    out.measure(Measurement(ORCH, "deadline to final", "s", lags, 1))
    s = summarize(lags)
    out.figure("p50 deadline to final", ORCH, s.median * 1000, "ms")
    out.figure("p95 deadline to final", ORCH, s.p95 * 1000, "ms", ("<=", 50.0))


# --- P6 ------------------------------------------------------------------------------------------


def _refusal_seconds(breaker: CircuitBreaker) -> float:
    started = time.perf_counter()
    try:
        breaker.acquire()
    except CircuitOpen:
        return time.perf_counter() - started
    raise RuntimeError(f"breaker {breaker.name} let a call through")


@scenario("P6", "circuit breaker: open-breaker refusal, closed-breaker cost", ORCH)
def breaker_costs(ctx: Context, out: ScenarioResult) -> None:
    """Refusals are timed in this process against the orchestrator's PostgreSQL, with the per-process
    snapshot (the default 0.2 s TTL, so nearly every refusal is a cache hit) and without it (every
    refusal reads the row). The closed-breaker cost is the run time of real branches on the io pool:
    jobs.io.guarded_fetch (through the shared 'shard-api' breaker) against jobs.io.fetch_url, same URL."""
    system = ctx.systems[ORCH]
    assert isinstance(system, OrchestratorSystem)
    url = system.orc.settings.database_url
    n = ctx.mode.p6_rejections
    out.params = {"refusals_cached": n, "refusals_uncached": max(n // 10, 10), "branches": ctx.mode.p6_calls}
    for label, ttl, count in (("cached", 0.2, n), ("uncached", 0.0, max(n // 10, 10))):
        b = CircuitBreaker(
            f"bench-{label}", failure_threshold=1, reset_timeout=3600, cache_ttl=ttl, database_url=url
        )
        b.failure(b.acquire())
        samples = repeat(functools.partial(_refusal_seconds, b), ctx.mode.warmup * 10, count)
        out.measure(Measurement(ORCH, f"open-breaker refusal ({label})", "s", samples, ctx.mode.warmup * 10))
        s = summarize(samples)
        out.figure(f"refusal p50 ({label})", ORCH, s.median * 1e6, "us")
        target = ("<=", 1000.0) if label == "cached" else None
        out.figure(f"refusal p99 ({label})", ORCH, s.p99 * 1e6, "us", target)
    CircuitBreaker("shard-api", database_url=url).reset()
    with local_http_server() as server:
        page = f"{server.url}/bytes/100"
        plain: list[float] = []
        guarded: list[float] = []
        for round_ in range(3):  # alternating, the first round a warm-up for both
            p = system.branch_seconds("jobs.io.fetch_url", [page], ctx.mode.p6_calls)
            g = system.branch_seconds("jobs.io.guarded_fetch", [page], ctx.mode.p6_calls)
            if round_:
                plain, guarded = plain + p, guarded + g
    out.measure(Measurement(ORCH, "branch without breaker", "s", plain, 1))  # one round discarded
    out.measure(Measurement(ORCH, "branch with closed breaker", "s", guarded, 1))
    out.figure(
        "closed breaker: branch time ratio", ORCH, statistics.median(guarded) / statistics.median(plain), "x"
    )


# --- P7 ------------------------------------------------------------------------------------------


@scenario("P7", "submit latency of an 8-branch job", ORCH, RABBIT, REDIS)
def submit_latency(ctx: Context, out: ScenarioResult) -> None:
    """Only the submit call (SQL insert + publish for the orchestrator, the chord's apply_async for plain
    Celery); each job is waited for, untimed, before the next so that submits never compete with work.
    The chord_unlock system is left out: waiting ~1 s per submit buys no information about the submit."""
    width = 8
    out.params = {"branches": width, "branch_seconds": 0.0}
    medians: dict[str, float] = {}
    for system in ctx.present():
        ctx.say(f"P7 {system.key}: {ctx.mode.warmup} warm-up + {ctx.mode.p7_runs} submits")
        samples = repeat(
            functools.partial(system.submit_seconds, width, 0.0), ctx.mode.warmup, ctx.mode.p7_runs
        )
        s = summarize(samples)
        out.measure(Measurement(system.key, "submit latency", "s", samples, ctx.mode.warmup))
        medians[system.key] = s.median
        target = ("<=", 5.0) if system.key == ORCH else None
        out.figure("p50 submit", system.key, s.median * 1000, "ms", target)
        out.figure("p95 submit", system.key, s.p95 * 1000, "ms")
    if ORCH in medians:
        for key in (RABBIT, REDIS):
            if key in medians:
                # Submits per second from one thread, as a ratio: the plain chord's p50 over ours.
                target = (">=", 2.0) if key == RABBIT else None
                out.figure(f"submit rate ratio to {key}", ORCH, medians[key] / medians[ORCH], "x", target)


@scenario("P8", "bulk submit: many 8-branch jobs from one process", ORCH, RABBIT, REDIS)
def bulk_submit(ctx: Context, out: ScenarioResult) -> None:
    """Jobs submitted per second from one thread: the orchestrator's submit_many (one transaction, one
    broker connection), plain Celery's chords one apply_async after another (it has no bulk call).
    Only the submitting is timed, with every worker's consumers paused (as a client on a host of its own
    sees it, not sharing two cores with the workers); the jobs then run, untimed, before the next run."""
    width, jobs = 8, ctx.mode.p8_jobs
    out.params = {"jobs": jobs, "branches": width}
    rates: dict[str, float] = {}
    for system in ctx.present():
        ctx.say(f"P8 {system.key}: {ctx.mode.p8_runs} x {jobs} jobs")
        system.bulk_submit_seconds(max(jobs // 10, 1), width)  # warm-up
        samples = [system.bulk_submit_seconds(jobs, width) for _ in range(ctx.mode.p8_runs)]
        m = out.measure(Measurement(system.key, "bulk submit", "s", samples, 1))
        rates[system.key] = jobs / m.median
        target = (">=", 1000.0) if system.key == ORCH else None
        out.figure("jobs/s submitted", system.key, rates[system.key], "jobs/s", target)
    if ORCH in rates:
        for key in (RABBIT, REDIS):
            if key in rates:
                out.figure(f"bulk rate ratio to {key}", ORCH, rates[ORCH] / rates[key], "x")
