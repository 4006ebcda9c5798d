"""Sending planned jobs to the broker: the deadline watchdog first, then every branch message, each an
ordinary Celery task message named after its catalog task and carrying the chord body (the fan-in).

Celery's canvas (`chord(group(...), body).apply_async()`) clones, freezes and walks signatures on every
call and writes the chord join in a transaction of its own: about half of a submit's time. When the
result backend is the orchestrator's SQLBackend the publisher does neither: the join's counter row is
written in the same transaction as the job's rows (`record`), and the messages, built by Celery's own
`create_task_message`, go out through one producer. Any other result backend (Redis) keeps the canvas,
which is how that backend learns about its chords.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery import Celery, chord, group, signals
from sqlalchemy import Connection

from .backend import SQLBackend
from .errors import PublishError
from .plan import JobPlan
from .rescue import LostMessage
from .settings import Settings
from .store import AlsoInTransaction, AlsoWithJobs, NewJob
from .tasks import DEADLINE, FAN_IN

#: What Flower and the worker's log show of a message's arguments (Celery's own limit).
REPR_MAX = 1024


def _repr(args: tuple[Any, ...]) -> str:
    """The arguments as Flower shows them. Celery's saferepr walks every value in Python, which was a
    third of a wide job's submit; plain repr is C, cut to the same length."""
    text = repr(args)
    return text if len(text) <= REPR_MAX else text[: REPR_MAX - 3] + "..."


@dataclass(frozen=True)
class Outgoing:
    """One job's messages, ready to send: its plan, its chord's group id and body, its limits."""

    job_id: str
    plan: JobPlan
    group_id: str
    body: dict[str, Any]
    limits: dict[str, float]
    deadline_at: datetime | None
    priority: int = 0  # on the wire: the broker's own scale (see Publisher.wire_priority)


class Publisher:
    """Publishes planned jobs on one app (see the module docstring for the two paths)."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    @property
    def joins_in_sql(self) -> bool:
        """True when the chord join is our SQL counter, so it is written with the job's rows."""
        return isinstance(self.app.backend, SQLBackend)

    def wire_priority(self, priority: int) -> int:
        """A job's priority (0 bulk .. ORCH_MAX_PRIORITY most urgent) on the broker's scale. RabbitMQ
        serves higher numbers first; kombu's Redis transport serves lower numbers first (0..9, in
        steps 0, 3, 6, 9); the file-system transport has no priorities."""
        top = self.settings.max_priority
        if not top or self.settings.embedded:
            return 0
        if self.settings.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
            return round((top - priority) * 9 / top)
        return priority

    def outgoing(
        self,
        job_id: str,
        plan: JobPlan,
        fan_in_timeout: float,
        deadline_at: datetime | None,
        priority: int = 0,
        group_id: str | None = None,
    ) -> Outgoing:
        limits = {"soft_time_limit": fan_in_timeout, "time_limit": fan_in_timeout + 10}
        wire = self.wire_priority(priority)
        body = self.app.signature(
            FAN_IN,
            args=(job_id,),
            queue=self.settings.fanin_queue,
            task_id=str(uuid.uuid4()),
            priority=wire,
            **limits,
        )
        # The chord's group id is the job's id (`rescue.chord_group`: and its run's number for a redrive):
        # the rescuer finds a job's join, and the body its messages carry, by the job alone.
        return Outgoing(job_id, plan, group_id or job_id, dict(body), limits, deadline_at, wire)

    def record(self, jobs: Mapping[uuid.UUID, Outgoing]) -> AlsoWithJobs | None:
        """What to write in the jobs' own insert transaction: the counter rows of the chords of those
        inserted (SQL joins only)."""
        backend = self.app.backend
        if not isinstance(backend, SQLBackend):
            return None

        def add_chords(conn: Connection, inserted: Sequence[NewJob]) -> None:
            chords = [(o.group_id, len(o.plan.messages), o.body) for o in (jobs[j.id] for j in inserted)]
            backend.add_chords(conn, chords)

        return add_chords

    def record_run(self, job: Outgoing) -> AlsoInTransaction[None] | None:
        """`record` for a job run again (a redrive): its new chord's counter row (SQL joins only)."""
        backend = self.app.backend
        if not isinstance(backend, SQLBackend):
            return None

        def add_chord(conn: Connection) -> None:
            backend.add_chords(conn, [(job.group_id, len(job.plan.messages), job.body)])

        return add_chord

    def send(self, jobs: Sequence[Outgoing]) -> None:
        """Send every job's messages; raises PublishError on the first job that could not be sent whole,
        saying how many jobs before it went out."""
        done = 0
        try:
            if self.joins_in_sql:
                declared: set[str] = set()
                with self.app.producer_or_acquire() as producer:
                    for job in jobs:
                        self._send(job, producer, declared)
                        done += 1
            else:
                for job in jobs:
                    self._send_canvas(job)
                    done += 1
        except Exception as exc:
            raise PublishError(str(exc), published=done) from exc

    def _deadline(self, job: Outgoing, producer: Any) -> None:
        """Before the branches: if this cannot be sent, nothing is. It survives worker restarts because
        an ETA message is only acked when it has run."""
        if job.deadline_at is not None:
            self.app.send_task(
                DEADLINE,
                args=(job.job_id,),
                queue=self.settings.fanin_queue,
                eta=job.deadline_at,
                producer=producer,
                ignore_result=True,
                add_to_parent=False,
                priority=job.priority,
                **job.limits,
            )

    def _cpu_limit(self, job: Outgoing) -> dict[str, float]:
        """prefork honours soft limits; a cpu branch also arms one at exactly the time left."""
        if job.deadline_at is None:
            return {}
        return {
            "soft_time_limit": max(
                (job.deadline_at - datetime.now(job.deadline_at.tzinfo)).total_seconds(), 0.001
            )
        }

    def _send(self, job: Outgoing, producer: Any, declared: set[str]) -> None:
        self._deadline(job, producer)
        at = None if job.deadline_at is None else job.deadline_at.timestamp()
        cpu_limit = self._cpu_limit(job)
        # Celery's send_task costs about 3x the publish itself (routing, options, its signals): build
        # the same message with Celery's own create_task_message and publish it as send_task_message
        # would, to the queue by name. Publish hooks (before/after_task_publish) keep send_task.
        lean = not (signals.before_task_publish.receivers or signals.after_task_publish.receivers)
        for index, m in enumerate(job.plan.messages):
            args = m.args(job.job_id, job.plan.by_index, at)
            options: dict[str, Any] = {
                "group_id": job.group_id,
                "group_index": index,
                "chord": job.body,
                **({} if m.batch else cpu_limit),
            }
            self._publish(
                producer,
                declared,
                m.task,
                m.queue,
                m.task_id,
                args,
                options,
                lean=lean,
                priority=job.priority,
            )

    def _publish(
        self,
        producer: Any,
        declared: set[str],
        task: str,
        queue_name: str,
        task_id: str,
        args: tuple[Any, ...],
        options: dict[str, Any],
        *,
        lean: bool,
        priority: int = 0,
    ) -> None:
        """One task message, published as send_task_message would, to the queue by name."""
        options = {"argsrepr": _repr(args), "kwargsrepr": "{}", "ignore_result": True, **options}
        if not lean:
            self.app.send_task(
                task,
                args=args,
                queue=queue_name,
                producer=producer,
                add_to_parent=False,
                task_id=task_id,
                priority=priority,
                **options,
            )
            return
        conf = self.app.conf
        message = self.app.amqp.create_task_message(task_id, task, args, {}, **options)
        queue = self.app.amqp.queues[queue_name]
        producer.publish(
            message.body,
            exchange="",
            routing_key=queue_name,
            serializer=conf.task_serializer,
            compression=conf.task_compression,
            retry=conf.task_publish_retry,
            retry_policy=dict(conf.task_publish_retry_policy or {}),
            delivery_mode=queue.exchange.delivery_mode or conf.task_default_delivery_mode,
            declare=[] if queue_name in declared else [queue],  # once per send: kombu caches it too
            headers=message.headers,
            priority=priority,
            **message.properties,
        )
        declared.add(queue_name)

    def republish(self, lost: Sequence[LostMessage]) -> None:
        """Publish branch messages again, as they were sent (same task id, chord and shape), for the
        branches still to run: the rescuer's way of handing back work whose run or message was lost."""
        declared: set[str] = set()
        with self.app.producer_or_acquire() as producer:
            for m in lost:
                at = None if m.deadline_at is None else m.deadline_at.timestamp()
                job_id = str(m.job_id)
                args: tuple[Any, ...]
                if m.queue == self.settings.io_queue:
                    args = (job_id, m.branches, at)
                else:
                    (index, branch_args, branch_kwargs) = m.branches[0]
                    args = (job_id, index, branch_args, branch_kwargs, at)
                options: dict[str, Any] = {}
                if m.chord is not None:
                    options = {"group_id": m.group_id, "chord": m.chord}
                wire = self.wire_priority(m.priority)
                self._publish(
                    producer, declared, m.task, m.queue, m.task_id, args, options, lean=True, priority=wire
                )

    def publish_fan_in(self, job_id: str, fan_in_timeout: float | None, priority: int = 0) -> None:
        """The fan-in of a job, on its own (its chord's body was lost, or its aggregation was)."""
        self._send_now(FAN_IN, ([], job_id), fan_in_timeout, priority)

    def publish_deadline(self, job_id: str, fan_in_timeout: float | None, priority: int = 0) -> None:
        """A job's deadline watchdog, to run now (its ETA message was lost)."""
        self._send_now(DEADLINE, (job_id,), fan_in_timeout, priority)

    def _send_now(
        self, task: str, args: tuple[Any, ...], fan_in_timeout: float | None, priority: int
    ) -> None:
        timeout = fan_in_timeout or self.settings.fan_in_timeout
        self.app.send_task(
            task,
            args=args,
            queue=self.settings.fanin_queue,
            ignore_result=True,
            add_to_parent=False,
            soft_time_limit=timeout,
            time_limit=timeout + 10,
            priority=self.wire_priority(priority),
        )

    def _send_canvas(self, job: Outgoing) -> None:
        with self.app.producer_or_acquire() as producer:
            self._deadline(job, producer)
        at = None if job.deadline_at is None else job.deadline_at.timestamp()
        cpu_limit = self._cpu_limit(job)
        header = group(
            self.app.signature(
                m.task,
                args=m.args(job.job_id, job.plan.by_index, at),
                queue=m.queue,
                task_id=m.task_id,
                priority=job.priority,
                **({} if m.batch else cpu_limit),
            )
            for m in job.plan.messages
        )
        chord(header, self.app.signature(job.body)).apply_async()
