"""`orchestrator web`: jobs, a job's branches and timeline, and the breakers, in the browser.

- `app`: the Starlette application (pages, actions, errors) and `serve`, which runs it on uvicorn
- `reads`: the SQL reads behind the pages, bounded for a million jobs and 10,000-branch jobs
- `live`: server-sent events of a running job (progress read, final moves LISTENed for on PostgreSQL)
- `timeline`: a job's timeline as SVG geometry
- `security`: basic auth, CSRF tokens and origin checks, response headers

Templates and static files ship in the package (`templates/`, `static/`): no build step, no CDN.
"""

from .app import WebConfig, create_app, serve

__all__ = ["WebConfig", "create_app", "serve"]
