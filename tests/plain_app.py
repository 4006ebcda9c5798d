"""A plain Celery app (no orchestrator jobs) whose result backend is the orchestrator's SQL backend.

It proves the backend is a real Celery chord backend, and injects one fault on demand: a task whose id
has a file `kill-<id>` in PLAIN_KILL_DIR is SIGKILLed right after counting its chord part, before the ack:
its pool child alone when the file says "child", the whole worker when it says "worker".
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from celery import Celery

from orchestrator.backend import ChordRecovery, SQLBackend, _Part


class KillAfterCountBackend(SQLBackend):
    def _count(self, group_id: str, task_id: str) -> _Part:
        counted = super()._count(group_id, task_id)
        marker = Path(os.environ.get("PLAIN_KILL_DIR", "")) / f"kill-{task_id}"
        if os.environ.get("PLAIN_KILL_DIR") and marker.exists():
            mode = marker.read_text().strip()
            marker.unlink()
            if mode == "worker":
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
        return counted


app = Celery(
    "plain",
    broker=os.environ.get("PLAIN_BROKER_URL", "memory://"),
    backend=f"tests.plain_app:KillAfterCountBackend+{os.environ.get('PLAIN_DATABASE_URL', 'sqlite://')}",
)
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    result_serializer="json",
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue="plain",
    chord_publish_lease=float(os.environ.get("PLAIN_LEASE", "30")),
)
app.steps["worker"].add(ChordRecovery)


@app.task(name="plain.add")
def add(x: int, y: int, seconds: float = 0.0) -> int:
    time.sleep(seconds)
    return x + y


@app.task(name="plain.tsum")
def tsum(values: list[int]) -> int:
    runs = os.environ.get("PLAIN_KILL_DIR")
    if runs:
        with open(Path(runs) / "body-runs", "a") as f:
            f.write(f"{values}\n")
    return sum(values)
