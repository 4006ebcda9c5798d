"""The baseline: a plain Celery app with one `sleep` task and a no-op chord body, configured by env.

Workers run it as ``celery -A bench.plain_app worker ...`` with BENCH_BROKER_URL,
BENCH_RESULT_BACKEND, BENCH_QUEUE and BENCH_CONCURRENCY set; the harness builds client apps for the same
broker with `make_app`. It shares the orchestrator's reliability settings (JSON, late acks, prefetch 1),
so that a comparison measures what the orchestrator adds (SQL tracking, its join), not a difference in
delivery guarantees.
"""

# mypy: disallow-untyped-decorators=False, disallow-untyped-calls=False

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

SLEEP = "bench.sleep"
COLLECT = "bench.collect"


def make_app(
    broker: str, backend: str, queue: str, *, concurrency: int = 64, set_as_current: bool = True
) -> Celery:
    app = Celery("bench", broker=broker, backend=backend, set_as_current=set_as_current)
    # kombu's Redis transport allows 10 connections per channel pool; a gevent pool of 1000 acks from
    # many greenlets at once and fails with MaxConnectionsError (losing acks) unless this is raised.
    connections = concurrency + 16
    app.conf.update(
        broker_transport_options={"max_connections": connections},
        redis_max_connections=connections,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # Every task, celery.chord_unlock included, goes to the one queue the worker consumes.
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        timezone="UTC",
        enable_utc=True,
    )
    return app


app = make_app(
    os.environ.get("BENCH_BROKER_URL", "memory://"),
    os.environ.get("BENCH_RESULT_BACKEND", "cache+memory://"),
    os.environ.get("BENCH_QUEUE", "bench"),
    concurrency=int(os.environ.get("BENCH_CONCURRENCY", "64")),
)


@app.task(name=SLEEP)
def sleep(seconds: float) -> float:
    """Stands in for a shard query, exactly like jobs.io.sleep."""
    time.sleep(seconds)
    return seconds


@app.task(name=COLLECT)
def collect(results: list[Any]) -> int:
    """The chord body: does nothing but say how many results it was given (a sanity check)."""
    return len(results)
