"""The fault matrix: each scenario submits a wave of jobs, waits until the work it targets is running,
injects one real fault and says when it hit, when it was over and from when time to final is measured.

The injections are plain functions of a deployment, so the soak reuses them on its steady stream of jobs.
"""

from __future__ import annotations

import contextlib
import copy
import random
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery, signals
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from bench.hosts import WorkerHosts, worker_hosts
from orchestrator import BranchSpec, JobSpec, branch
from orchestrator.models import FINAL_JOB_STATES, Job

from .checker import Marks, Tracked
from .modes import Sizes
from .services import Services
from .stack import RABBITMQ, REDIS, Deployment, deployment, wait_until

NAP = "faults.catalog.nap"
CRUNCH = "faults.catalog.crunch"
POISON = "faults.catalog.poison"
GATHER = "faults.catalog.gather"
GATHER_SLOWLY = "faults.catalog.gather_slowly"


@dataclass
class Context:
    """What a scenario needs: the sizes, the private services, the marks, one running deployment."""

    sizes: Sizes
    services: Services
    run_dir: Path
    marks: Marks
    say: Callable[[str], None]
    rng: random.Random = field(default_factory=lambda: random.Random(13))
    _running: tuple[str, Deployment, ExitStack] | None = None
    _hosts: tuple[WorkerHosts, ExitStack] | None = None

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def deployment(self, name: str) -> Deployment:
        """The deployment `name`, started on first use; another one running is stopped first (two
        cores: two sets of pools would only slow each other down)."""
        if self._running is not None and self._running[0] == name:
            return self._running[1]
        self.close()
        self.say(f"starting the {name} deployment")
        stack = ExitStack()
        try:
            dep = stack.enter_context(
                deployment(name, self.services, self.log_dir, self.run_dir / "marks", self.sizes.settings())
            )
        except BaseException:
            stack.close()
            raise
        self._running = (name, dep, stack)
        return dep

    def hosts(self, dep: Deployment) -> WorkerHosts:
        """One worker host (a network namespace, scripts/hosts.sh) reaching `dep`'s services, made on
        first use and removed by close()."""
        if self._hosts is None:
            stack = ExitStack()
            try:
                hosts = stack.enter_context(worker_hosts(1, ports=dep.service_ports()))
            except BaseException:
                stack.close()
                raise
            self._hosts = (hosts, stack)
        return self._hosts[0]

    def close(self) -> None:
        if self._running is not None:
            _, _, stack = self._running
            self._running = None
            stack.close()
        if self._hosts is not None:  # after the pools: `down` stops whatever still runs on the hosts
            _, stack = self._hosts
            self._hosts = None
            stack.close()


@contextlib.contextmanager
def private_context(sizes: Sizes, run_dir: Path, say: Callable[[str], None]) -> Iterator[Context]:
    """Private PostgreSQL, Redis and RabbitMQ started for the block, and a Context on them; on the way
    out (an error, Ctrl-C, SIGTERM too) every deployment and service stopped and removed."""
    (run_dir / "marks").mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        services = Services(Path(tempfile.mkdtemp(prefix="faults-services-")))
        stack.callback(services.stop)
        say("starting a private PostgreSQL, Redis and RabbitMQ")
        services.start()
        ctx = Context(sizes, services, run_dir, Marks(run_dir / "marks"), say)
        stack.callback(ctx.close)
        yield ctx


@dataclass
class Injected:
    """One fault as it happened (wall-clock seconds, comparable with SQL timestamps on this machine)."""

    started: float  # the fault hit
    ended: float  # it was over: the process restarted, the service back, the process continued
    measured_from: float  # time to final is measured from here (see the scenario's `measured_from`)
    hit_pids: set[int] = field(default_factory=set)  # processes the fault killed or stopped
    in_flight: bool = True  # the work it targets was running when it hit
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "duration_s": round(self.ended - self.started, 3),
            "in_flight": self.in_flight,
            "hit_processes": len(self.hit_pids),
            **self.detail,
        }


# --- jobs --------------------------------------------------------------------------------------------


def token() -> str:
    return uuid.uuid4().hex[:16]


def job_spec(
    ctx: Context,
    tok: str,
    *,
    poison: bool = False,
    fan_in: str = GATHER,
    io_seconds: tuple[float, float] | None = None,
    cpu_seconds: float | None = None,
) -> JobSpec:
    """A job of the suite's shape: 8 io branches that sleep, then one cpu branch (or a poison one)."""
    lo, hi = io_seconds or ctx.sizes.io_seconds
    n = ctx.sizes.io_branches
    branches: list[BranchSpec] = [branch(NAP, tok, i, round(ctx.rng.uniform(lo, hi), 3)) for i in range(n)]
    if poison:
        branches.append(branch(POISON, tok, n))
    else:
        branches.append(branch(CRUNCH, tok, n, ctx.sizes.cpu_seconds if cpu_seconds is None else cpu_seconds))
    return JobSpec(branches, fan_in, name=f"faults {tok}", idempotency_key=tok)


def submit_wave(
    ctx: Context,
    dep: Deployment,
    wave: list[Tracked],
    count: int,
    *,
    poison_every: int = 0,
    fan_in: str = GATHER,
) -> None:
    """Submit `count` jobs in one submit_many; every `poison_every`-th one carries the poison branch."""
    specs = []
    for k in range(count):
        tok = token()
        poison = bool(poison_every) and k % poison_every == 0
        specs.append(job_spec(ctx, tok, poison=poison, fan_in=fan_in))
        tracked = Tracked(tok, None, time.time())
        if poison:
            tracked.expect, tracked.poison_index = "partial", ctx.sizes.io_branches
        wave.append(tracked)
    views = dep.orc.submit_many(specs)
    for tracked, view in zip(wave[-count:], views, strict=True):
        tracked.job_id = view.id


def submit_one(dep: Deployment, spec: JobSpec, tracked: Tracked, *, retry_for: float = 0.0) -> bool:
    """One submit, retried with the same idempotency key while the database or broker is failing; a
    submit that kept failing is looked up by its key (it may have been recorded) or counted refused."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            view = dep.orc.submit(spec.branches, spec.fan_in, spec.name, idempotency_key=spec.idempotency_key)
            tracked.job_id, tracked.refused = view.id, None
            return True
        except Exception as exc:
            if time.monotonic() >= deadline:
                tracked.refused = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[
                    :200
                ]
                break
            time.sleep(0.2)
    found = _recorded(dep, tracked.token)
    # Recorded and then failed because it could not be published: the client was told (PublishError).
    if found is not None and not (found[1] or "").startswith("could not publish"):
        tracked.job_id, tracked.refused = found[0], None
    return tracked.job_id is not None


def _recorded(dep: Deployment, key: str, retry_for: float = 5.0) -> tuple[str, str | None] | None:
    """(id, error) of the job recorded with this idempotency key, if any; the database may be failing
    right now (a termination, a restart), so the look-up is retried for a few seconds."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            with dep.orc.store.engine.connect() as conn:
                row = conn.execute(select(Job.id, Job.error).where(Job.idempotency_key == key)).first()
            return None if row is None else (str(row.id), row.error)
        except Exception:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.2)


def wait_final(dep: Deployment, wave: Sequence[Tracked], until: float) -> None:
    """Poll SQL until every job of the wave is final or `until` (wall clock) passes; the database may be
    failing meanwhile."""
    waiting = {uuid.UUID(t.job_id) for t in wave if t.job_id}
    interval = 0.05 if len(waiting) < 100 else 0.25
    while waiting and time.time() < until:
        try:
            with dep.orc.store.engine.connect() as conn:
                ids = list(waiting)
                for start in range(0, len(ids), 500):
                    query = select(Job.id).where(
                        Job.id.in_(ids[start : start + 500]), Job.state.in_(FINAL_JOB_STATES)
                    )
                    waiting -= set(conn.execute(query).scalars())
        except SQLAlchemyError:
            pass
        if waiting:
            time.sleep(interval)


# --- injections (shared with the soak) -----------------------------------------------------------------


def in_flight(ctx: Context, dep: Deployment, role: str | None, tokens: set[str] | None) -> bool:
    """Wait until a function of these jobs is running in the pool `role` (any pool: None)."""

    def running() -> bool:
        pids = dep.pids(role) if role is not None else None
        return bool(ctx.marks.running(pids, tokens))

    return wait_until(running, ctx.sizes.in_flight_timeout)


def kill_and_restart(ctx: Context, dep: Deployment, role: str, tokens: set[str] | None) -> Injected:
    """SIGKILL a pool's whole process group while it runs our work, then start it again at once."""
    flight = in_flight(ctx, dep, role, tokens)
    started = time.time()
    hit = dep.kill(role)
    dep.start_role(role)
    ended = time.time()
    return Injected(started, ended, started, hit, flight, {"restart_s": round(ended - started, 3)})


def pause(
    ctx: Context, dep: Deployment, role: str, tokens: set[str] | None, seconds: float, *, keep_standby: bool
) -> Injected:
    """SIGSTOP a pool for `seconds`, then SIGCONT. A second pool of its kind stands by (started here if
    missing) so that rescued work has somewhere to run."""
    standby = f"{dep.kind(role)}-2"
    if standby not in dep.workers:
        dep.start_role(standby)
    flight = in_flight(ctx, dep, role, tokens)
    started = time.time()
    hit = dep.pause(role)
    try:
        time.sleep(seconds)
    finally:
        dep.resume(role)
    ended = time.time()
    if not keep_standby:
        dep.retire(standby)
    return Injected(started, ended, started, hit, flight, {"paused": role, "paused_s": seconds})


def restart_postgres(ctx: Context, dep: Deployment, tokens: set[str] | None, mode: str) -> Injected:
    flight = in_flight(ctx, dep, None, tokens)
    started = time.time()
    ctx.services.postgres.restart(mode)
    ended = time.time()
    return Injected(started, ended, started, set(), flight, {"restart_s": round(ended - started, 3)})


def terminate_backends(
    ctx: Context, dep: Deployment, seconds: float, every: float, during: Callable[[], None] | None = None
) -> Injected:
    """pg_terminate_backend of every connection to the deployment's database every `every` seconds for
    `seconds`; `during` runs between terminations (the matrix submits its wave there)."""
    database = dep.database
    started = time.time()
    last = started
    terminated = sweeps = 0
    next_at = started
    while time.time() < started + seconds:
        if time.time() >= next_at:
            with contextlib.suppress(Exception):
                terminated += ctx.services.postgres.terminate_backends(database)
            sweeps += 1
            last = time.time()
            next_at += every
        if during is not None:
            during()
        time.sleep(0.05)
    detail = {"terminated_connections": terminated, "sweeps": sweeps}
    return Injected(started, last, last, set(), True, detail)


def rabbitmq_outage(ctx: Context, dep: Deployment, tokens: set[str] | None, seconds: float) -> Injected:
    """`rabbitmqctl stop_app`, `seconds`, `start_app`: time to final is measured from the broker back."""
    flight = in_flight(ctx, dep, None, tokens)
    started = time.time()
    try:
        ctx.services.rabbit.stop_app()
        time.sleep(seconds)
    finally:
        ctx.services.rabbit.start_app()
    ended = time.time()
    return Injected(started, ended, ended, set(), flight, {"down_s": round(ended - started, 3)})


def redis_restart(ctx: Context, dep: Deployment, tokens: set[str] | None, *, save: bool) -> Injected:
    """Restart the Redis broker: with its dataset saved and loaded again, or empty (no persistence)."""
    flight = in_flight(ctx, dep, None, tokens)
    started = time.time()
    ctx.services.redis.restart(save=save)
    ended = time.time()
    return Injected(
        started, ended, ended, set(), flight, {"down_s": round(ended - started, 3), "saved": save}
    )


@contextlib.contextmanager
def captured_messages(app: Celery) -> Iterator[list[dict[str, Any]]]:
    """Every task message this process publishes while the block runs, as published (body, headers,
    routing): a publish hook makes the client send through send_task, which builds the same messages."""
    seen: list[dict[str, Any]] = []

    def keep(sender: Any = None, **kwargs: Any) -> None:
        seen.append(
            copy.deepcopy(
                {k: kwargs.get(k) for k in ("body", "exchange", "routing_key", "headers", "properties")}
            )
        )

    signals.before_task_publish.connect(keep, weak=False)
    try:
        yield seen
    finally:
        signals.before_task_publish.disconnect(keep)


def publish_again(app: Celery, messages: Sequence[dict[str, Any]]) -> None:
    """Publish these captured messages a second time, unchanged: the same task id, chord and arguments."""
    with app.producer_or_acquire() as producer:
        for m in messages:
            producer.publish(
                m["body"],
                exchange=m["exchange"],
                routing_key=m["routing_key"],
                headers=m["headers"],
                serializer="json",
                delivery_mode=2,
                retry=True,
                **(m["properties"] or {}),
            )


def duplicate(ctx: Context, dep: Deployment, messages: Sequence[dict[str, Any]]) -> Injected:
    started = time.time()
    publish_again(dep.orc.app, messages)
    return Injected(started, started, started, set(), True, {"duplicated_messages": len(messages)})


def _message_for(messages: Sequence[dict[str, Any]], job_id: str, task: str) -> dict[str, Any] | None:
    for m in messages:
        body, headers = m["body"], m["headers"] or {}
        args = body[0] if isinstance(body, (list, tuple)) and body else None
        if headers.get("task") == task and args and str(args[0]) == job_id:
            return m
    return None


# --- the matrix ----------------------------------------------------------------------------------------

Play = Callable[[Context, Deployment, int, list[Tracked]], Injected]


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    deployment: str
    rounds: int  # rounds in the full run (10; SIGKILLs 20)
    measured_from: str
    play: Play
    by_design: str = ""  # why runs completed twice are expected here (counted all the same)
    teardown: Callable[[Context, Deployment], None] | None = None
    extra_timeout: Callable[[Sizes], float] = lambda sizes: 0.0


def _tokens(wave: Sequence[Tracked]) -> set[str]:
    return {t.token for t in wave}


def _sigkill(role: str, fan_in: str = GATHER) -> Play:
    def play(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
        submit_wave(ctx, dep, wave, ctx.sizes.wave, fan_in=fan_in)
        return kill_and_restart(ctx, dep, role, _tokens(wave))

    return play


PAUSED_KINDS = ("io", "cpu", "fanin")


def _sigstop(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    role = PAUSED_KINDS[number % len(PAUSED_KINDS)]
    if f"{role}-2" not in dep.workers:  # ready before the wave, so the pause hits running work
        dep.start_role(f"{role}-2")
    submit_wave(ctx, dep, wave, ctx.sizes.wave, fan_in=GATHER_SLOWLY if role == "fanin" else GATHER)
    return pause(ctx, dep, role, _tokens(wave), ctx.sizes.sigstop_seconds, keep_standby=True)


def _retire_standbys(ctx: Context, dep: Deployment) -> None:
    for role in [r for r in dep.workers if r.endswith("-2")]:
        dep.retire(role)


HOST_ROLE = "io-host"
#: How long a healed host's pool gets to consume again by itself (RabbitMQ may first have to notice the
#: old connection is dead: two missed heartbeats).
REJOIN_TIMEOUT = 120.0


def _partition(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    """A worker host's io pool takes the whole wave (the local io pool is stopped while it is
    published), its link is cut while the branches run, and the local pool started again takes them
    over once their heartbeat is older than the stall timeout. The link is healed after
    partition_seconds; once the wave has ended, a probe job with the local pool stopped shows that the
    host's pool consumes again by itself (a probe that does not end counts as a stuck job)."""
    hosts = ctx.hosts(dep)
    if HOST_ROLE not in dep.workers:
        dep.start_on_host(HOST_ROLE, hosts, 1)
    dep.retire("io")
    submit_wave(ctx, dep, wave, ctx.sizes.wave)
    flight = in_flight(ctx, dep, HOST_ROLE, _tokens(wave))
    hit = dep.pids(HOST_ROLE)
    started = time.time()
    hosts.cut(1)
    try:
        dep.start_role("io")
        time.sleep(max(0.0, started + ctx.sizes.partition_seconds - time.time()))
    finally:
        hosts.heal(1)
    ended = time.time()
    detail: dict[str, Any] = {"cut_s": round(ended - started, 3)}
    wait_final(dep, wave, ended + ctx.sizes.job_timeout + ctx.sizes.stall)

    dep.retire("io")  # only the healed host can run the probe's io branches
    try:
        tok = token()
        probe = Tracked(tok, None, time.time(), timed=False)
        if submit_one(dep, job_spec(ctx, tok, io_seconds=(0.01, 0.01)), probe, retry_for=10):
            wave.append(probe)
            wait_final(dep, [probe], time.time() + REJOIN_TIMEOUT)
            ctx.marks.refresh()
            ran_in = {m.pid for m in ctx.marks.by_token.get(tok, []) if 0 <= m.index < ctx.sizes.io_branches}
            final = dep.orc.store.state(probe.job_id or "") in FINAL_JOB_STATES
            # Judged by the runner: a host that does not consume again fails the round.
            detail["rejoined"] = final and bool(ran_in) and ran_in <= dep.pids(HOST_ROLE)
            if detail["rejoined"]:
                detail["rejoined_s"] = round(time.time() - ended, 1)
    finally:
        dep.start_role("io")
    return Injected(started, ended, started, hit, flight, detail)


def _retire_host(ctx: Context, dep: Deployment) -> None:
    dep.retire(HOST_ROLE)


def _poison(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    started = time.time()
    submit_wave(ctx, dep, wave, ctx.sizes.wave, poison_every=2)
    return Injected(started, started, started, set(), True, {"poisoned_jobs": (len(wave) + 1) // 2})


def _pg_restart(mode: str) -> Play:
    def play(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
        submit_wave(ctx, dep, wave, ctx.sizes.wave)
        return restart_postgres(ctx, dep, _tokens(wave), mode)

    return play


def _pg_terminate(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    """The wave is submitted one job at a time across the window, so work is in flight throughout; a
    submit cut by a termination is retried with its idempotency key."""
    seconds = ctx.sizes.terminate_seconds
    todo = [(job_spec(ctx, tok), Tracked(tok, None, 0.0)) for tok in (token() for _ in range(ctx.sizes.wave))]
    begin = time.time()
    spacing = seconds * 0.8 / max(1, len(todo))

    def submit_due() -> None:
        while todo and time.time() >= begin + spacing * (ctx.sizes.wave - len(todo)):
            spec, tracked = todo[0]
            tracked.submitted_at = time.time()
            if not submit_one(dep, spec, tracked):
                return  # cut by a termination: try again on the next tick
            todo.pop(0)
            wave.append(tracked)

    injected = terminate_backends(ctx, dep, seconds, ctx.sizes.terminate_every, submit_due)
    for spec, tracked in todo:  # what the window left unsubmitted, now that the database is left alone
        submit_one(dep, spec, tracked, retry_for=10)
        wave.append(tracked)
    return injected


#: The rabbitmq-outage round keeps submitting this many jobs a second for this long after the broker is
#: back, while the workers reconnect.
STREAM_RATE = 10.0
STREAM_AFTER = 8.0


def _rabbit_outage(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    """A wave in flight through the outage, then a stream of jobs while the workers reconnect and the
    wave's branches finish: a worker that stops consuming then (one did in a soak) leaves the stream
    stuck."""
    submit_wave(ctx, dep, wave, ctx.sizes.wave)
    injected = rabbitmq_outage(ctx, dep, _tokens(wave), ctx.sizes.outage_seconds)
    streamed = 0
    while time.time() < injected.ended + STREAM_AFTER:
        tok = token()
        tracked = Tracked(tok, None, time.time(), timed=False)  # time to final is the wave's
        spec = job_spec(ctx, tok, io_seconds=(0.05, 0.2), cpu_seconds=0.01)
        submit_one(dep, spec, tracked, retry_for=10)
        wave.append(tracked)
        streamed += 1
        time.sleep(1 / STREAM_RATE)
    injected.detail["streamed_jobs"] = streamed
    return injected


def _redis_restart(save: bool) -> Play:
    def play(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
        submit_wave(ctx, dep, wave, ctx.sizes.wave)
        return redis_restart(ctx, dep, _tokens(wave), save=save)

    return play


def _duplicate(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    """Every job's io batch (even jobs) or cpu branch message (odd jobs) is published a second time right
    after the first, so both copies are delivered while the branch runs."""
    with captured_messages(dep.orc.app) as messages:
        submit_wave(ctx, dep, wave, ctx.sizes.wave)
    picked = [
        m
        for k, t in enumerate(wave)
        if t.job_id and (m := _message_for(messages, t.job_id, NAP if k % 2 == 0 else CRUNCH)) is not None
    ]
    return duplicate(ctx, dep, picked)


def _burst(ctx: Context, dep: Deployment, number: int, wave: list[Tracked]) -> Injected:
    """burst_jobs short jobs submitted one by one from burst_threads client threads at once."""
    jobs = [
        (job_spec(ctx, tok, io_seconds=(0.05, 0.05), cpu_seconds=0.005), Tracked(tok, None, 0.0))
        for tok in (token() for _ in range(ctx.sizes.burst_jobs))
    ]
    wave.extend(t for _, t in jobs)
    threads = ctx.sizes.burst_threads

    def client(share: Sequence[tuple[JobSpec, Tracked]]) -> None:
        for spec, tracked in share:
            tracked.submitted_at = time.time()
            submit_one(dep, spec, tracked)

    started = time.time()
    workers = [threading.Thread(target=client, args=(jobs[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    ended = time.time()
    detail = {"jobs": len(jobs), "threads": threads, "submit_s": round(ended - started, 3)}
    return Injected(started, ended, started, set(), True, detail)


BROKER_RECONNECT = (
    "a broker connection lost while branches run: their messages are delivered again after the reconnect "
    "and run a second time; only one outcome is recorded (duplicate runs are harmless in SQL by design, "
    "and counted here)"
)

DATABASE_RETRY = (
    "a run whose outcome could not be written (the database restarting or its connection cut) is run "
    "again when its task is retried: at-least-once, one outcome recorded"
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "sigkill-io", "SIGKILL of the whole io worker, restarted", RABBITMQ, 20, "the kill", _sigkill("io")
    ),
    Scenario(
        "sigkill-cpu", "SIGKILL of the whole cpu worker, restarted", RABBITMQ, 20, "the kill", _sigkill("cpu")
    ),
    Scenario(
        "sigkill-fanin",
        "SIGKILL of the whole fanin worker while fan-ins run (1 s aggregator), restarted",
        RABBITMQ,
        20,
        "the kill",
        _sigkill("fanin", GATHER_SLOWLY),
    ),
    Scenario(
        "sigstop",
        "SIGSTOP of a worker (io, cpu, fanin in turn), SIGCONT after the pause; a second pool of its kind "
        "stands by",
        RABBITMQ,
        10,
        "the SIGSTOP",
        _sigstop,
        teardown=_retire_standbys,
    ),
    Scenario(
        "partition",
        "a worker host's link cut while its io branches run, healed after the cut; the local io pool "
        "takes the branches over",
        RABBITMQ,
        10,
        "the cut",
        _partition,
        teardown=_retire_host,
    ),
    Scenario(
        "poison",
        "a cpu branch that kills its own process (os._exit(1)) in every other job",
        RABBITMQ,
        10,
        "the submit",
        _poison,
    ),
    Scenario(
        "pg-restart-fast",
        "PostgreSQL restart -m fast",
        RABBITMQ,
        10,
        "the restart",
        _pg_restart("fast"),
        by_design=DATABASE_RETRY,
    ),
    Scenario(
        "pg-restart-immediate",
        "PostgreSQL restart -m immediate (crash recovery)",
        RABBITMQ,
        10,
        "the restart",
        _pg_restart("immediate"),
        by_design=DATABASE_RETRY,
    ),
    Scenario(
        "pg-terminate",
        "pg_terminate_backend of every connection to the orchestrator's database every few seconds, "
        "jobs submitted throughout",
        RABBITMQ,
        10,
        "the last termination",
        _pg_terminate,
        by_design=DATABASE_RETRY,
    ),
    Scenario(
        "rabbitmq-outage",
        "RabbitMQ stop_app, a pause, start_app",
        RABBITMQ,
        10,
        "the broker back",
        _rabbit_outage,
        by_design=BROKER_RECONNECT,
    ),
    Scenario(
        "duplicate-delivery",
        "one branch message of every job published twice (same task id)",
        RABBITMQ,
        10,
        "the duplicate",
        _duplicate,
    ),
    Scenario(
        "burst",
        "a burst of jobs submitted from 4 client threads",
        RABBITMQ,
        10,
        "the first submit",
        _burst,
        extra_timeout=lambda sizes: sizes.burst_jobs * 0.05,
    ),
    Scenario(
        "sigkill-io-redis",
        "SIGKILL of the whole io worker, restarted; Redis as broker at its default visibility timeout",
        REDIS,
        20,
        "the kill",
        _sigkill("io"),
    ),
    Scenario(
        "redis-restart",
        "Redis (the broker) restarted, its dataset saved and loaded again (a default-configured Redis)",
        REDIS,
        10,
        "Redis back",
        _redis_restart(save=True),
        by_design=BROKER_RECONNECT,
    ),
    Scenario(
        "redis-restart-empty",
        "Redis (the broker) restarted without persistence: every queued message is lost",
        REDIS,
        10,
        "Redis back",
        _redis_restart(save=False),
        by_design=BROKER_RECONNECT,
    ),
)
BY_NAME = {s.name: s for s in SCENARIOS}
