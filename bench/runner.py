"""One benchmark run: fresh service namespaces, the systems started, the scenarios run, all stopped.

Everything started here is registered on one ExitStack as soon as it exists, so an error, Ctrl-C or
SIGTERM still stops every worker (by pid) and drops every database and vhost the run created.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import services
from .modes import Mode
from .scenarios import DB, GEVENT, IDEAL, ORCH, RABBIT, REDIS, Context, Scenario, ScenarioResult
from .systems import AsyncioIdeal, OrchestratorSystem, PlainCelerySystem, System

SYSTEM_KEYS = (ORCH, REDIS, RABBIT, GEVENT, DB, IDEAL)


@dataclass
class RunResult:
    mode: Mode
    started_at: datetime
    finished_at: datetime | None = None
    systems: dict[str, dict[str, Any]] = field(default_factory=dict)
    services: dict[str, str] = field(default_factory=dict)
    scenarios: list[ScenarioResult] = field(default_factory=list)
    skipped_systems: dict[str, str] = field(default_factory=dict)

    @property
    def errors(self) -> list[str]:
        return [f"{s.id}: {s.error.splitlines()[0]}" for s in self.scenarios if s.error]


def wanted_systems(
    scenarios: Sequence[Scenario], mode: Mode, only: Sequence[str] | None
) -> tuple[list[str], dict[str, str]]:
    """The systems the selected scenarios name (in a stable order), and why any of them is left out."""
    named = {k for s in scenarios for k in s.systems}
    keys = [k for k in SYSTEM_KEYS if k in named and (only is None or k in only)]
    skipped = {k: f"not run in {mode.name} mode" for k in keys if k in mode.skip_systems}
    keys = [k for k in keys if k not in skipped]
    if GEVENT in keys and importlib.util.find_spec("gevent") is None:
        keys.remove(GEVENT)
        skipped[GEVENT] = "gevent is not installed"
    return keys, skipped


def _service_versions(keys: Sequence[str]) -> dict[str, str]:
    probes: dict[str, Callable[[], str]] = {}
    if {ORCH, DB, RABBIT} & set(keys):
        probes["postgresql"] = services.postgres_version
        probes["rabbitmq"] = services.rabbitmq_version
    if {REDIS, GEVENT, RABBIT} & set(keys):
        probes["redis"] = services.redis_version
    versions: dict[str, str] = {}
    for name, probe in probes.items():
        try:
            versions[name] = probe()
        except Exception as exc:  # a version is nice to have, never a reason to stop
            versions[name] = f"unknown ({type(exc).__name__})"
    return versions


_REDIS_JOIN = "redis (atomic counter chord join)"


def _plain(
    key: str,
    label: str,
    broker_url: str,
    backend_url: str,
    broker: str,
    backend: str,
    log_dir: Path,
    *,
    pool: str = "threads",
    polling_join: bool = False,
) -> PlainCelerySystem:
    """A plain Celery chord system on its own queue: 64 threads, or 1000 greenlets under gevent."""
    return PlainCelerySystem(
        key=key,
        label=label,
        broker_url=broker_url,
        backend_url=backend_url,
        queue=f"bench-{key}",
        pool=pool,
        concurrency=1000 if pool == "gevent" else 64,
        log_dir=log_dir,
        broker=broker,
        backend=backend,
        polling_join=polling_join,
    )


def _build(keys: Sequence[str], stack: ExitStack, log_dir: Path) -> dict[str, System]:
    """Create each system's service namespaces (registered for removal) and the system itself."""
    built: dict[str, System] = {}
    vhost = stack.enter_context(services.rabbitmq_vhost()) if {ORCH, DB, RABBIT} & set(keys) else ""
    redis_url = stack.enter_context(services.redis_database()) if {REDIS, GEVENT, RABBIT} & set(keys) else ""
    for key in keys:
        if key == ORCH:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-orch-")))
            db = stack.enter_context(services.postgres_database("orch"))
            built[key] = OrchestratorSystem(db, vhost, home, log_dir)
        elif key == DB:
            db = stack.enter_context(services.postgres_database("celery"))
            label = "plain Celery chord (RabbitMQ, database backend, chord_unlock polling)"
            backend = "celery database backend (PostgreSQL, chord_unlock every 1 s)"
            built[key] = _plain(
                key, label, vhost, "db+" + db, "rabbitmq", backend, log_dir, polling_join=True
            )
        elif key in (REDIS, GEVENT):
            pool = "gevent" if key == GEVENT else "threads"
            label = f"plain Celery chord (Redis broker + backend, {pool})"
            built[key] = _plain(key, label, redis_url, redis_url, "redis", _REDIS_JOIN, log_dir, pool=pool)
        elif key == RABBIT:
            label = "plain Celery chord (RabbitMQ broker, Redis backend, threads)"
            built[key] = _plain(key, label, vhost, redis_url, "rabbitmq", _REDIS_JOIN, log_dir)
        elif key == IDEAL:
            built[key] = AsyncioIdeal()
    return built


def run(
    mode: Mode,
    scenarios: Sequence[Scenario],
    log_dir: Path,
    say: Callable[[str], None],
    only_systems: Sequence[str] | None = None,
) -> RunResult:
    result = RunResult(mode=mode, started_at=datetime.now(UTC))
    keys, result.skipped_systems = wanted_systems(scenarios, mode, only_systems)
    result.services = _service_versions(keys)
    with ExitStack() as stack:
        say(f"starting {', '.join(keys)}")
        systems = _build(keys, stack, log_dir)
        # Plain workers boot while the orchestrator migrates and starts its pools (which blocks).
        booting = sorted(systems.values(), key=lambda s: s.key == ORCH)
        for system in booting:
            stack.callback(system.stop)
            system.spawn()
        for system in reversed(booting):
            system.wait_ready()
        result.systems = {k: s.describe() for k, s in systems.items()}
        for sc in scenarios:
            out = ScenarioResult(sc.id, sc.title)
            ctx = Context(mode, {k: systems[k] for k in sc.systems if k in systems}, say, log_dir)
            started = time.perf_counter()
            try:
                sc.run(ctx, out)
            except Exception as exc:
                out.error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
                say(f"{sc.id} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            out.seconds = time.perf_counter() - started
            result.scenarios.append(out)
        say("stopping")
        for system in systems.values():
            system.terminate()  # all warm shutdowns at once; the stack then waits for each
    result.finished_at = datetime.now(UTC)
    return result
