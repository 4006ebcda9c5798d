"""The Celery app: queues, routes, serializer and the reliability settings every worker shares.

Start workers with ``celery -A orchestrator.celery_app worker -Q io -P threads -c 64`` (or
``orchestrator worker io``, which prints and runs exactly that).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Exchange, Queue

from .backend import ChordRecovery
from .settings import Settings

settings = Settings.from_env()


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


def make_app(s: Settings, *, set_as_current: bool = True) -> Celery:
    app = Celery("orchestrator", broker=s.broker_url, backend=s.result_backend, set_as_current=set_as_current)
    exchange = Exchange("orchestrator", type="direct")
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_queues=[Queue(q, exchange, routing_key=q) for q in (s.io_queue, s.cpu_queue, s.fanin_queue)],
        task_default_queue=s.fanin_queue,
        task_default_exchange="orchestrator",
        task_default_routing_key=s.fanin_queue,
        # A worker killed mid-task must not lose it: ack after the task, requeue when the child dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options=broker_transport_options(s),
        # celery beat's backend_cleanup prunes results older than this (orchestrator db prune does too).
        result_expires=s.retention,
        result_chord_join_timeout=30.0,
        task_track_started=False,
        # Workers send task events so Flower sees every task; the client's task-sent events would cost
        # one more message per branch at submit (3x slower wide submits) for little more information.
        task_send_sent_event=False,
        worker_send_task_events=True,
        imports=list(s.imports),
        include=["orchestrator.tasks"],
        timezone="UTC",
        enable_utc=True,
    )
    # Publishes chord bodies whose publisher died between its final count and the publish.
    app.steps["worker"].add(ChordRecovery)
    return app


app = make_app(settings)
