"""Settings come from ORCH_* environment variables only, so every process (client, worker, CLI) agrees.

With nothing set the embedded default applies: a SQLite file and a file-system broker under
``ORCH_HOME`` (``~/.orchestrator``), so a first run needs no server.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigurationError
from .hosts import DEFAULT_FETCH_ALLOWED_HOSTS, Hosts, parse_hosts


def _int(env: Mapping[str, str], key: str, default: int, minimum: int = 1) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{key} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigurationError(f"{key} must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], key: str, default: float, *, zero: bool = False) -> float:
    """A positive number; with zero=True, 0 is allowed too (for a number of seconds it means "always")."""
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{key} must be a number, got {raw!r}") from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        least = "a number of seconds >= 0" if zero else "positive"
        raise ConfigurationError(f"{key} must be {least}, got {raw!r}")
    return value


def _optional_int(env: Mapping[str, str], key: str, minimum: int) -> int | None:
    """None when unset: the caller derives a default (e.g. from a pool's concurrency)."""
    return _int(env, key, -1, minimum) if env.get(key) else None


def _psycopg_url(url: str) -> str:
    # psycopg 3 is the driver we ship; plain URLs would ask SQLAlchemy for psycopg2.
    if url.startswith(("postgres://", "postgresql://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def parse_autoscale(key: str, raw: str) -> tuple[int, int] | None:
    """`MAX,MIN` (MIN defaults to 1) as Celery's --autoscale takes it; empty: a fixed pool."""
    raw = raw.strip()
    if not raw:
        return None
    high, _, low = raw.partition(",")
    try:
        most, least = int(high), int(low) if low.strip() else 1
    except ValueError:
        raise ConfigurationError(f"{key} must be MAX,MIN (e.g. 8,2), got {raw!r}") from None
    if not 0 <= least <= most or most < 1:
        raise ConfigurationError(f"{key} needs 1 <= MAX and 0 <= MIN <= MAX, got {raw!r}")
    return most, least


def _autoscale(env: Mapping[str, str]) -> tuple[tuple[str, int, int], ...]:
    scales = []
    for kind in ("io", "cpu", "fanin"):
        key = f"ORCH_{kind.upper()}_AUTOSCALE"
        scale = parse_autoscale(key, env.get(key, ""))
        if scale is not None:
            scales.append((kind, *scale))
    return tuple(scales)


def _max_priority(env: Mapping[str, str]) -> int:
    value = _int(env, "ORCH_MAX_PRIORITY", 9, minimum=0)
    if value > 255:  # RabbitMQ's own limit (and the docs advise 10 or fewer levels)
        raise ConfigurationError(f"ORCH_MAX_PRIORITY must be <= 255, got {value}")
    return value


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    broker_url: str
    result_backend: str
    imports: tuple[str, ...] = ("jobs",)
    io_queue: str = "io"
    cpu_queue: str = "cpu"
    fanin_queue: str = "fanin"
    io_pool: str = "threads"
    io_concurrency: int = 64
    cpu_concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    fanin_concurrency: int = 2
    io_chunk_size: int = 50  # at most this many io branches of one job and task share a message (1: none)
    fan_in_timeout: float = 60.0
    visibility_timeout: int = 3600
    retention: float = 7 * 86400.0  # seconds that final jobs and task results are kept
    log_level: str = "INFO"
    breaker_failure_threshold: int = 5
    breaker_reset_timeout: float = 30.0
    breaker_probe_lease: float = 30.0  # a probe not reported within this is presumed dead
    breaker_cache_ttl: float = 0.2  # seconds a process may act on the breaker state it last read
    # A branch or fan-in whose worker died while running it runs again at most this many times.
    max_deliveries: int = 3
    # Seconds without a heartbeat after which running work is presumed lost and published again.
    stall_timeout: float = 30.0
    max_args_bytes: int = 1 << 20  # JSON of one branch's arguments
    max_result_bytes: int = 1 << 20  # JSON of one branch's result
    # Backpressure: admitted, unfinished branches across all clients (0: no bound), and how long a
    # submit waits for room before it raises Overloaded.
    max_active_branches: int = 100_000
    block_timeout: float = 10.0
    # Message priorities 0..max_priority (RabbitMQ queues are declared with x-max-priority); 0: off.
    max_priority: int = 9
    # Pools Celery's autoscaler sizes with their queue: (kind, max, min) for those set (a tuple: hashable).
    autoscale: tuple[tuple[str, int, int], ...] = ()
    # Connections of each process to the database (docs/scaling.md). None: the default, or what
    # `orchestrator worker` derives from the concurrency of the pool it starts.
    db_pool_size: int | None = None  # kept open once opened
    db_max_overflow: int | None = None  # opened beyond those for a burst, closed on return
    db_ping_after: float = 10.0  # seconds idle after which a pooled connection is pinged; 0: always
    db_pooler: str = "none"  # "transaction": database_url is PgBouncer in transaction pooling mode
    listen_database_url: str | None = None  # a direct URL where wait() LISTENs (behind a pooler)
    # hosts the bundled jobs.io fetch/probe branches may reach: (host, port or None for any port)
    fetch_allowed_hosts: Hosts = DEFAULT_FETCH_ALLOWED_HOSTS

    @property
    def embedded(self) -> bool:
        """True when the broker is the server-less file-system transport."""
        return self.broker_url.startswith("filesystem://")

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def autoscale_for(self, kind: str) -> tuple[int, int] | None:
        """(max, min) processes or threads of the `kind` pool when it autoscales (ORCH_<KIND>_AUTOSCALE)."""
        return next(((most, least) for k, most, least in self.autoscale if k == kind), None)

    def queue_for(self, kind: str) -> str:
        """io and cpu tasks go to their pools' queues; everything else (the fan-in) to fanin."""
        return {"io": self.io_queue, "cpu": self.cpu_queue}.get(kind, self.fanin_queue)

    @property
    def broker_folder(self) -> Path:
        return self.home / "broker"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        home = Path(env.get("ORCH_HOME") or Path.home() / ".orchestrator").expanduser()
        database_url = env.get("ORCH_DATABASE_URL") or f"sqlite:///{home / 'orchestrator.db'}"
        if database_url.startswith(("postgres://", "postgresql://")):
            # psycopg 3 is the driver we ship; plain URLs would ask SQLAlchemy for psycopg2.
            database_url = "postgresql+psycopg://" + database_url.split("://", 1)[1]
        broker_url = env.get("ORCH_BROKER_URL") or "filesystem://"
        result_backend = env.get("ORCH_RESULT_BACKEND") or "sql"
        if result_backend == "sql":
            result_backend = f"orchestrator.backend:SQLBackend+{database_url}"
        serializer = env.get("ORCH_SERIALIZER", "json")
        if serializer != "json":
            raise ConfigurationError(
                f"ORCH_SERIALIZER={serializer!r} is refused: JSON is the only accepted serializer"
            )
        extra = tuple(m.strip() for m in env.get("ORCH_IMPORTS", "").split(",") if m.strip())
        io_pool = env.get("ORCH_IO_POOL", "threads")
        if io_pool not in ("threads", "gevent", "eventlet"):
            raise ConfigurationError(f"ORCH_IO_POOL must be threads or gevent, got {io_pool!r}")
        db_pooler = env.get("ORCH_DB_POOLER") or "none"
        if db_pooler not in ("none", "transaction"):
            raise ConfigurationError(f"ORCH_DB_POOLER must be none or transaction, got {db_pooler!r}")
        listen_database_url = _psycopg_url(env.get("ORCH_LISTEN_DATABASE_URL") or "") or None
        if listen_database_url and not listen_database_url.startswith("postgresql"):
            raise ConfigurationError("ORCH_LISTEN_DATABASE_URL must be a postgresql:// URL")
        if (listen_database_url or db_pooler != "none") and database_url.startswith("sqlite"):
            raise ConfigurationError("ORCH_LISTEN_DATABASE_URL and ORCH_DB_POOLER need a PostgreSQL database")
        return cls(
            home=home,
            database_url=database_url,
            broker_url=broker_url,
            result_backend=result_backend,
            imports=tuple(dict.fromkeys(("jobs", *extra))),
            io_queue=env.get("ORCH_IO_QUEUE", "io"),
            cpu_queue=env.get("ORCH_CPU_QUEUE", "cpu"),
            fanin_queue=env.get("ORCH_FANIN_QUEUE", "fanin"),
            io_pool=io_pool,
            io_concurrency=_int(env, "ORCH_IO_CONCURRENCY", 64),
            cpu_concurrency=_int(env, "ORCH_CPU_CONCURRENCY", os.cpu_count() or 1),
            fanin_concurrency=_int(env, "ORCH_FANIN_CONCURRENCY", 2),
            io_chunk_size=_int(env, "ORCH_IO_CHUNK_SIZE", 50),
            db_pool_size=_optional_int(env, "ORCH_DB_POOL_SIZE", minimum=1),
            db_max_overflow=_optional_int(env, "ORCH_DB_MAX_OVERFLOW", minimum=0),
            db_ping_after=_float(env, "ORCH_DB_PING_AFTER", 10.0, zero=True),
            db_pooler=db_pooler,
            listen_database_url=listen_database_url,
            fan_in_timeout=_float(env, "ORCH_FAN_IN_TIMEOUT", 60.0),
            visibility_timeout=_int(env, "ORCH_VISIBILITY_TIMEOUT", 3600),
            retention=_float(env, "ORCH_RETENTION", 7 * 86400.0),
            log_level=env.get("ORCH_LOG_LEVEL", "INFO"),
            breaker_failure_threshold=_int(env, "ORCH_BREAKER_FAILURE_THRESHOLD", 5),
            breaker_reset_timeout=_float(env, "ORCH_BREAKER_RESET_TIMEOUT", 30.0),
            breaker_probe_lease=_float(env, "ORCH_BREAKER_PROBE_LEASE", 30.0),
            breaker_cache_ttl=_float(env, "ORCH_BREAKER_CACHE_TTL", 0.2),
            max_deliveries=_int(env, "ORCH_MAX_DELIVERIES", 3, minimum=0),
            stall_timeout=_float(env, "ORCH_STALL_TIMEOUT", 30.0),
            max_args_bytes=_int(env, "ORCH_MAX_ARGS_BYTES", 1 << 20),
            max_result_bytes=_int(env, "ORCH_MAX_RESULT_BYTES", 1 << 20),
            max_active_branches=_int(env, "ORCH_MAX_ACTIVE_BRANCHES", 100_000, minimum=0),
            block_timeout=_float(env, "ORCH_BLOCK_TIMEOUT", 10.0),
            max_priority=_max_priority(env),
            autoscale=_autoscale(env),
            fetch_allowed_hosts=parse_hosts(
                "ORCH_FETCH_ALLOWED_HOSTS", env.get("ORCH_FETCH_ALLOWED_HOSTS", "")
            ),
        )
