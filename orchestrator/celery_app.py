"""The `celery -A orchestrator.celery_app` entry point: the app of the deployment the ORCH_* environment
describes, with its catalog (ORCH_IMPORTS) loaded and registered.

Start workers with ``celery -A orchestrator.celery_app worker -Q io -P threads -c 64`` (or
``orchestrator worker io``, which prints and runs exactly that).
"""

from __future__ import annotations

import logging
import warnings

from celery.exceptions import CPendingDeprecationWarning

from . import breaker, database, registry
from .app import app_for
from .reconnect import QuietReconnect, survive_redis_restarts
from .settings import Settings

logging.getLogger("celery.worker.request").addFilter(QuietReconnect())
survive_redis_restarts()
# Celery warns at every connection loss that it will default to cancelling running tasks in 6.0; the
# orchestrator sets worker_cancel_long_running_tasks_on_connection_loss=False on purpose (see app).
warnings.filterwarnings(
    "ignore", category=CPendingDeprecationWarning, message=r"\s*In Celery 5\.1 we introduced an optional"
)

settings = Settings.from_env()
breaker.configure(settings)  # the breakers of this worker share its database
database.configure(settings)  # its connections: the pool `orchestrator worker` sized, a pooler
registry.load(settings.imports)
app = app_for(settings)
app.set_current()
