"""The io worker's batch engine: a batch message's branches run concurrently, their outcomes written as
they finish. No Celery here; `tasks` hands it a batch and the chord count to commit with the last write.

A fan-out is bound by messages and transactions, not by waiting: a batch is one message, one start
statement and a few outcome statements. Retries stay in the batch (its siblings are still running). A
finished outcome waits at most `flush_seconds` to be written with its siblings', so a straggler never
holds the others back; the last write also runs `also` (the batch's chord count) in its transaction.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from .deadline import Deadline
from .policy import Outcome, execute
from .registry import TaskSpec
from .store import AlsoInTransaction, Finished, SentAs, Store
from .threads import start_every_thread

logger = logging.getLogger(__name__)

#: How long a finished outcome may wait to be written with its siblings': the branches of a batch tend
#: to finish together, and one statement for all of them beats one for each.
FLUSH_SECONDS = 0.02


@dataclass(frozen=True)
class BatchDone:
    """What a batch message did: branches it ran, and those it skipped (already recorded)."""

    ran: int
    skipped: int


def log_outcome(job_id: str, index: int, spec: TaskSpec, outcome: Outcome) -> None:
    if outcome.state != "succeeded":
        logger.info("branch %s[%d] %s %s: %s", job_id, index, spec.name, outcome.state, outcome.error)


class BatchEngine:
    """One per io worker process: the threads every batch's branches run on, and `size` running slots.

    `size` is the worker's pool size (ORCH_IO_CONCURRENCY, or `-c`): how many io branches the worker runs
    at once whatever the batches, so a user can set it to protect a backend. A batch message holds a
    pool slot while its branches wait here for a running slot; one still waiting at its deadline ends
    timed_out without running.
    """

    def __init__(self, size: int, *, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.size = size
        self.flush_seconds = flush_seconds
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="branch")
        start_every_thread(self._executor, size)  # all at once, not one per burst larger than the last
        self._running = threading.BoundedSemaphore(size)

    def run(
        self,
        store: Store,
        spec: TaskSpec,
        job_id: str,
        sent: SentAs,
        branches: Sequence[Sequence[Any]],
        deadline_at: float | None,
        also: AlsoInTransaction[Any] | None = None,
        max_result_bytes: int | None = None,
    ) -> BatchDone:
        """Run a batch's `[index, args, kwargs]` branches; `also` runs in the transaction of the last
        outcome write (or not at all when every branch was already recorded: a redelivery). Branches
        whose worker died too often are recorded failed with the first write, without running."""
        jid = uuid.UUID(job_id)
        message = [int(b[0]) for b in branches]
        started = store.start_branches(jid, message, sent)
        attempts = started.attempts
        todo = [b for b in branches if b[0] in attempts]
        poisoned = list(started.poisoned)
        for finished in poisoned:
            logger.error("branch %s[%d] %s: %s", job_id, finished.index, spec.name, finished.error)
        if not todo:
            if poisoned:
                store.finish_branches(jid, sent, poisoned, also=also, message=message)
            return BatchDone(len(poisoned), len(branches) - len(poisoned))
        if poisoned:
            store.finish_branches(jid, sent, poisoned)
        budget = Deadline(deadline_at)

        def run(branch: Sequence[Any]) -> Finished:
            index, args, kwargs = branch
            attempt = attempts[index]
            while True:
                with self._running:  # not held across a retry's backoff
                    outcome = execute(spec, args, kwargs, budget, attempt, max_result_bytes)
                if outcome.retry_in is None:
                    log_outcome(job_id, index, spec, outcome)
                    return Finished(index, attempt, outcome.state, outcome.result, outcome.error)
                time.sleep(outcome.retry_in)
                attempt += 1

        if len(todo) == 1:  # no hand-over to another thread for a batch of one
            store.finish_branches(jid, sent, [run(todo[0])], also=also, message=message)
        else:
            futures = [self._executor.submit(run, b) for b in todo]
            self._run_many(store, jid, sent, message, futures, also)
        return BatchDone(len(todo) + len(poisoned), len(branches) - len(todo) - len(poisoned))

    def _run_many(
        self,
        store: Store,
        jid: uuid.UUID,
        sent: SentAs,
        message: Sequence[int],
        futures: list[Any],
        also: AlsoInTransaction[Any] | None,
    ) -> None:
        buffer: list[Finished] = []
        flush_by: float | None = None  # when the oldest buffered outcome has waited long enough
        pending = set(futures)
        while pending:
            timeout = None if flush_by is None else max(flush_by - time.monotonic(), 0.0)
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            buffer.extend(future.result() for future in done)
            if buffer and flush_by is None:
                flush_by = time.monotonic() + self.flush_seconds
            if buffer and (not pending or time.monotonic() >= (flush_by or 0.0)):
                store.finish_branches(jid, sent, buffer, also=None if pending else also, message=message)
                buffer, flush_by = [], None


class EngineSlot:
    """A process's BatchEngine, made on first use and forgotten in a forked child (threads do not
    survive a fork)."""

    def __init__(self, size: Callable[[], int]) -> None:
        self._size = size
        self._engine: BatchEngine | None = None
        self._lock = threading.Lock()

    def get(self) -> BatchEngine:
        with self._lock:
            if self._engine is None:
                self._engine = BatchEngine(self._size())
            return self._engine

    def forget(self) -> None:
        self._engine = None
