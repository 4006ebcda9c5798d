"""The Celery app, built from a Settings object: queues, routes, serializer, the reliability settings
every worker shares, and the orchestrator's tasks with a runner for every loaded catalog task.

Nothing here reads the environment: `orchestrator.celery_app` (the `celery -A` entry point), the CLI and
`Orchestrator()` without arguments do, and pass their Settings in. Apps are kept one per Settings, so
two Orchestrators on different deployments live side by side in one process.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from . import tasks
from .backend import ChordRecovery, SQLBackend
from .lifeline import lifeline_step
from .settings import Settings
from .threads import StartThreads

_apps: dict[Settings, Celery] = {}
_lock = threading.Lock()


def broker_transport_options(s: Settings) -> dict[str, Any]:
    if s.embedded:
        folder = s.broker_folder
        for sub in ("queue", "control", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "control_folder": str(folder / "control"),
            "processed_folder": str(folder / "processed"),
            # The virtual transport polls; 1 s (kombu's default) would add up to a second per hop.
            "polling_interval": 0.02,
        }
    if s.broker_url.startswith(("redis://", "rediss://", "sentinel://")):
        # Redis redelivers an unacked message only after this long; it must exceed the longest branch.
        return {"visibility_timeout": s.visibility_timeout}
    return {}


def queue_arguments(s: Settings) -> dict[str, Any] | None:
    """RabbitMQ serves a queue's messages by priority only when the queue is declared with
    x-max-priority, and a queue's arguments cannot change once declared: an existing queue declared
    without them refuses this declaration (PRECONDITION_FAILED; see the README on upgrading). Redis
    (priority steps) and the file-system transport take no arguments."""
    redis = s.broker_url.startswith(("redis://", "rediss://", "sentinel://"))
    if not s.max_priority or s.embedded or redis:
        return None
    return {"x-max-priority": s.max_priority}


def build_app(s: Settings, *, set_as_current: bool = False) -> Celery:
    """A new app for `s`, with the orchestrator's tasks and a runner for every catalog task loaded now
    (load the catalog first: `registry.load(s.imports)`)."""
    app = Celery("orchestrator", broker=s.broker_url, backend=s.result_backend, set_as_current=set_as_current)
    exchange = Exchange("orchestrator", type="direct")
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_queues=[
            Queue(q, exchange, routing_key=q, queue_arguments=queue_arguments(s))
            for q in (s.io_queue, s.cpu_queue, s.fanin_queue)
        ],
        task_default_queue=s.fanin_queue,
        task_default_exchange="orchestrator",
        task_default_routing_key=s.fanin_queue,
        # A worker killed mid-task must not lose it: ack after the task, requeue when the child dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # On a broker connection loss a running task's message cannot be acked; the broker hands it out
        # again. Cancelling the task instead (True) cannot work on the io pool (threads and gevent cannot
        # kill a job: a NotImplementedError traceback per running task), and on the cpu and fanin
        # prefork pools it would throw away work that SQL makes safe to finish: the redelivered copy
        # finds the branch or fan-in held by a live runner and starts nothing, and the run that
        # finishes records the outcome once. So no pool cancels.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # After a reconnect Celery lowers the prefetch count and raises it again as tasks finish; on the
        # threads pool the raise (basic_qos) runs in the pool thread that finished a task while the
        # event loop sends its own basic_qos on the same channel, and py-amqp channels are not thread
        # safe: one thread takes the other's reply and the consumer waits for it until the broker's
        # heartbeat timeout closes the connection (3 minutes without consuming, found by the fault
        # suite's soak; py-spy showed both threads in Channel.basic_qos). Prefetch is one message per
        # pool slot already, so there is nothing to lower.
        worker_enable_prefetch_count_reduction=False,
        # Back within 2 s of the broker's return (Celery would wait up to 30 s between attempts).
        worker_consumer="orchestrator.reconnect:Consumer",
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(s),
        # celery beat's backend_cleanup prunes results older than this (orchestrator db prune does too).
        result_expires=s.retention,
        result_chord_join_timeout=30.0,
        # Read by SQLBackend: these chord bodies read their inputs from SQL, so no header join.
        chord_bodies_without_header_results=list(tasks.BODIES_WITHOUT_HEADER_RESULTS),
        task_track_started=False,
        # Workers send task events so Flower sees every task; the client's task-sent events would cost
        # one more message per branch at submit (3x slower wide submits) for little more information.
        task_send_sent_event=False,
        worker_send_task_events=True,
        imports=list(s.imports),
        timezone="UTC",
        enable_utc=True,
    )
    # Publishes chord bodies whose publisher died between its final count and the publish.
    app.steps["worker"].add(ChordRecovery)
    # A thread pool (io) starts all its threads at boot, not one at a time under load.
    app.steps["worker"].add(StartThreads)
    runtime = tasks.register(app, s)
    # Heartbeats what the worker runs; publishes again what a dead or paused worker, or a broker that
    # kept nothing, lost.
    app.steps["worker"].add(lifeline_step(runtime))
    return app


def sql_backend(s: Settings) -> SQLBackend:
    """The deployment's SQL result tables, whatever ORCH_RESULT_BACKEND says (for retention)."""
    app = Celery("orchestrator", backend=f"orchestrator.backend:SQLBackend+{s.database_url}")
    app.conf.chord_bodies_without_header_results = list(tasks.BODIES_WITHOUT_HEADER_RESULTS)
    backend = app.backend
    assert isinstance(backend, SQLBackend)
    return backend


def app_for(s: Settings) -> Celery:
    """The one app of this process for `s` (built on first use)."""
    with _lock:
        app = _apps.get(s)
        if app is None:
            app = _apps[s] = build_app(s)
        return app
