"""The rescuer's Celery side: a worker bootstep that heartbeats what the worker's pool runs and sweeps
the database for work that was lost, publishing it again (see `rescue` for the SQL and why).

Every worker runs it, in its main process (a prefork pool's children are covered by their parent, whose
requests name the jobs they run). It ticks every quarter of the stall timeout: a live worker's rows are
never older than that, and lost work waits at most about one stall timeout and a tick.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state as worker_state

from .models import JobState
from .publisher import Publisher
from .rescue import DueJob, LostMessage, Rescue
from .tasks import Runtime, jobs_of

logger = logging.getLogger(__name__)


def tick_seconds(stall_timeout: float) -> float:
    return min(max(stall_timeout / 4, 0.25), 15.0)


class QueueDepths:
    """Messages ready in a queue, read from the broker at most once a sweep and only when asked: work
    whose queue still holds messages may simply be waiting its turn, so it is not published again."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._depths: dict[str, int | None] = {}

    def idle(self, queue: str) -> bool:
        if queue not in self._depths:
            self._depths[queue] = self._read(queue)
        return self._depths[queue] == 0

    def _read(self, queue: str) -> int | None:
        try:
            with self.app.connection_for_read() as conn:
                # Declared with the app's own arguments: idempotent, and a queue never declared is empty.
                declared = self.app.amqp.queues[queue].bind(conn.default_channel).queue_declare()
                return int(declared.message_count)
        except Exception as exc:  # the broker is away: nothing is published this sweep
            logger.warning("rescue: cannot read the depth of queue %s: %s", queue, exc)
            return None


class Lifeline:
    """One worker's heartbeat and sweep (the bootstep below runs `tick` on the worker's timer)."""

    def __init__(self, app: Celery, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.publisher = Publisher(app, runtime.settings)

    @property
    def rescue(self) -> Rescue:
        return Rescue(self.runtime.store.engine, self.runtime.settings.stall_timeout)

    def tick(self) -> None:
        for step in (self.beat, self.sweep):
            try:
                step()
            except Exception as exc:  # the database or broker restarting: the next tick tries again
                logger.warning("rescue: %s failed: %s", step.__name__, exc)

    def beat(self) -> None:
        """Renew the heartbeat of every branch and fan-in this worker's pool runs now."""
        runner = self.runtime.runner
        if runner is None:
            return
        branch_jobs, fan_in_jobs = [], []
        for request in list(worker_state.active_requests):
            branches_of, fan_in_of = jobs_of(request.task_name, request.args)
            if branches_of is not None:
                branch_jobs.append(uuid.UUID(branches_of))
            if fan_in_of is not None:
                fan_in_jobs.append(uuid.UUID(fan_in_of))
        self.rescue.beat(runner, branch_jobs, fan_in_jobs)

    def sweep(self) -> None:
        """Publish again what was lost: branches whose runner fell silent, fan-ins of jobs whose
        aggregation was lost or never came, deadlines that never fired, queued branches whose message
        is gone."""
        rescue = self.rescue
        silent = rescue.silent_branches()
        if silent:
            logger.warning("rescue: publishing %s again (their worker fell silent)", _describe(silent))
            self.publisher.republish(silent)
        settings = self.runtime.settings
        depths = QueueDepths(self.app)
        idle = [q for q in (settings.io_queue, settings.cpu_queue) if depths.idle(q)]
        due = rescue.due_jobs(idle_queues=idle)
        if not due:
            return
        fanin = settings.fanin_queue
        waiting: list[uuid.UUID] = []
        for job in due:
            action = self._act(job, depths, fanin)
            if action is None:
                waiting.append(job.id)
            elif action:
                logger.warning("rescue: job %s: %s", job.id, action)
        self._publish_queued(waiting, depths, "their messages were lost")

    def after_reconnect(self, lost_at: float) -> None:
        """Publish again the queued branches of jobs the broker connection lost at `lost_at` (monotonic)
        may have stranded, without waiting a stall timeout (`reconnect.Consumer` calls it once it is
        connected again)."""
        try:
            settings = self.runtime.settings
            depths = QueueDepths(self.app)
            idle = [q for q in (settings.io_queue, settings.cpu_queue) if depths.idle(q)]
            if idle:
                since = time.monotonic() - lost_at
                stranded = self.rescue.stranded_jobs(since, idle_queues=idle)
                self._publish_queued(stranded, depths, "the broker connection was lost with their messages")
        except Exception as exc:  # the broker or database away again: the regular sweep is still due
            logger.warning("rescue: the sweep after a reconnect failed: %s", exc)

    def _publish_queued(self, job_ids: list[uuid.UUID], depths: QueueDepths, why: str) -> None:
        lost = [m for m in self.rescue.queued_branches(job_ids) if depths.idle(m.queue)]
        if lost:
            logger.warning("rescue: publishing %s again (%s)", _describe(lost), why)
            self.publisher.republish(lost)

    def _act(self, job: DueJob, depths: QueueDepths, fanin: str) -> str | None:
        """What the sweep did for a due job ('' for nothing); None when its queued branches are to be
        checked."""
        jid = str(job.id)
        publish: Callable[[str, float | None, int], None]
        if job.state == JobState.AGGREGATING:
            publish, action = self.publisher.publish_fan_in, "its fan-in's worker fell silent: fan-in again"
        elif job.complete:
            if not depths.idle(fanin):
                return ""
            publish, action = self.publisher.publish_fan_in, "every branch ended but no fan-in ran: fan-in"
        elif job.deadline_at is not None and job.deadline_at < _ago(self.runtime.settings.stall_timeout):
            publish, action = self.publisher.publish_deadline, "its deadline passed unnoticed: deadline now"
        else:
            return None
        publish(jid, job.fan_in_timeout, job.priority)
        return action


def _ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def _describe(messages: list[LostMessage]) -> str:
    branches = sum(len(m.branches) for m in messages)
    jobs = len({m.job_id for m in messages})
    return f"{branches} branches of {jobs} jobs in {len(messages)} messages"


def lifeline_step(runtime: Runtime) -> type[bootsteps.StartStopStep]:
    """The worker bootstep for an app's runtime (`app.steps["worker"].add(...)`)."""

    class LifelineStep(bootsteps.StartStopStep):  # type: ignore[misc]
        requires = {"celery.worker.components:Timer"}

        def __init__(self, worker: Any, **kwargs: Any) -> None:
            super().__init__(worker, **kwargs)
            self.tref: Any = None

        def start(self, worker: Any) -> None:
            if getattr(worker, "autoscale", None) and worker.max_concurrency:
                # The io batch engine's running slots follow the pool: an autoscaled pool may grow to this.
                runtime.pool_size = int(worker.max_concurrency)
            lifeline = Lifeline(worker.app, runtime)
            consumer = getattr(worker, "consumer", None)
            if consumer is not None and hasattr(consumer, "on_reconnect"):  # `reconnect.Consumer`
                consumer.on_reconnect = lifeline.after_reconnect
            interval = tick_seconds(runtime.settings.stall_timeout)
            self.tref = worker.timer.call_repeatedly(interval, lifeline.tick, priority=10)

        def stop(self, worker: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

    return LifelineStep
