"""An io worker's threads, started whole: Celery's thread pool when the worker starts, the batch
engine's branch threads when it is made (at the first batch).

Both are ThreadPoolExecutors, which start a thread only when a task finds none idle and never retire
one: an io worker of 64 grew its threads (and its memory, ~0.1 MiB each) at each burst larger than any
before, hours into a run (the soak saw 29 threads at a steady 10 jobs/s, 48 after the backlog of a
paused pool, 54 later). Started whole, the worker's memory at full concurrency is known from the start
(a container limit is hit then, not at the first burst) and flat afterwards, so memory that grows is a
leak, not a pool filling up.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import bootsteps


def start_every_thread(executor: ThreadPoolExecutor, threads: int) -> None:
    """Start `threads` threads in `executor` through its public API: as many tasks as threads, each held
    until all have started, so none finds another idle and each gets a thread of its own."""
    barrier = threading.Barrier(threads + 1)
    futures = [executor.submit(barrier.wait, 30) for _ in range(threads)]
    barrier.wait(30)
    for future in futures:
        future.result()


class StartThreads(bootsteps.StartStopStep):  # type: ignore[misc]
    """Worker bootstep: a thread pool's threads, all started once the pool is (other pools: nothing)."""

    requires = {"celery.worker.components:Pool"}

    def start(self, worker: Any) -> None:
        executor = getattr(worker.pool, "executor", None)
        limit = getattr(worker.pool, "limit", None)
        if isinstance(executor, ThreadPoolExecutor) and isinstance(limit, int) and limit > 0:
            start_every_thread(executor, limit)
