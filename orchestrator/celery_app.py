"""The `celery -A orchestrator.celery_app` entry point: the app of the deployment the ORCH_* environment
describes, with its catalog (ORCH_IMPORTS) loaded and registered.

Start workers with ``celery -A orchestrator.celery_app worker -Q io -P threads -c 64`` (or
``orchestrator worker io``, which prints and runs exactly that).
"""

from __future__ import annotations

from . import breaker, registry
from .app import app_for
from .settings import Settings

settings = Settings.from_env()
breaker.configure(settings)  # the breakers of this worker share its database
registry.load(settings.imports)
app = app_for(settings)
app.set_current()
