"""The web view: jobs, a job's branches and timeline, and the breakers, rendered on the server.

What Flower cannot show: jobs as the orchestrator records them (a job's branches and their outcomes,
the fan-in's result, the shared breakers), read from SQL, with live progress while a job runs. Starlette
serves it, Jinja2 renders it (autoescaped), and every asset ships in this package: no build step, no CDN.
SQL always runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlencode

import uvicorn
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..errors import (
    BreakerNotFound,
    InvalidArgument,
    JobAlreadyFinal,
    JobNotFinal,
    JobNotFound,
    NothingToRetry,
    OrchestratorError,
    Overloaded,
)
from ..models import RETRY_STATES, BranchState, JobState, utcnow
from ..store import parse_job_id
from . import timeline
from .live import Listeners, job_events, listen_conninfo
from .reads import Cursor, JobPageData, WebReads
from .security import CSRF_COOKIE, CSRF_FIELD, BasicAuth, Csrf, SecurityHeaders

if TYPE_CHECKING:
    from ..api import Orchestrator

#: Most bytes a form POST may carry: the forms here hold a token and a name.
FORM_MAX_BYTES = 16 * 1024


@dataclass(frozen=True)
class WebConfig:
    """How the web view runs. `credentials` None serves without auth: the CLI allows that on a loopback
    address only. `flower_url` links each branch to its task in Flower (`<flower>/task/<task id>`)."""

    credentials: Mapping[str, str] | None
    flower_url: str | None = None
    page_size: int = 50
    branch_page_size: int = 100
    live_interval: float = 0.5
    listeners: int = 32


# --- formatting for the templates ------------------------------------------------------------------


def _age(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "-"
    seconds = max((now - moment).total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else timeline.seconds_text(value)


def _between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


def _stamp(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _pretty_json(text: str) -> str:
    """JSON text indented for reading, when it is whole; a cut text is shown as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("orchestrator.web", "templates"),
        autoescape=select_autoescape(["html", "svg"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(seconds=_seconds, stamp=_stamp, pretty_json=_pretty_json)
    env.globals.update(age=_age, between=_between, job_states=list(JobState), branch_states=list(BranchState))
    return Jinja2Templates(env=env)


# --- the application -------------------------------------------------------------------------------


class WebView:
    """The pages and actions, over one Orchestrator (its database, and its Celery app for revokes)."""

    def __init__(self, orc: Orchestrator, config: WebConfig) -> None:
        self.orc = orc
        self.config = config
        self.reads = WebReads(orc.settings.database_url)
        self.csrf = Csrf()
        self.templates = _templates()
        self.listeners = Listeners(limit=config.listeners)
        self.conninfo = listen_conninfo(orc.settings.database_url)

    def render(self, request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
        """A page, with the CSRF token its forms carry; a browser without a valid token cookie gets one
        here, so any page it loaded can post its forms."""
        token, new = self.csrf.token_for(request)
        context = {
            "user": request.scope.get("state", {}).get("user"),
            "flower_url": self.config.flower_url,
            "csrf_field": CSRF_FIELD,
            "csrf_token": token,
            "now": utcnow(),
            **context,
        }
        response = self.templates.TemplateResponse(request, name, context, status_code=status)
        if new:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response

    # --- pages -------------------------------------------------------------------------------------

    async def jobs(self, request: Request) -> Response:
        """Jobs newest first; `?fragment=1` is the table alone, which the first page fetches to refresh."""
        q = request.query_params
        state = q.get("state") or None
        name = (q.get("name") or "").strip() or None
        before = Cursor.decode(q["before"]) if q.get("before") else None
        after = Cursor.decode(q["after"]) if q.get("after") else None
        given = _index_param(q.get("limit"))
        limit = self.config.page_size if given is None else given
        page = await run_in_threadpool(
            self.reads.jobs, state=state, name=name, before=before, after=after, limit=limit
        )
        keep = {k: v for k, v in (("state", state), ("name", name)) if v}
        if limit != self.config.page_size:
            keep["limit"] = str(limit)

        def link(**cursor: str) -> str:
            return "/jobs?" + urlencode({**keep, **cursor}) if (keep or cursor) else "/jobs"

        context = {
            "page": page,
            "state": state,
            "name": name or "",
            "limit": limit,
            "first_page": before is None and after is None,
            "newest_link": link(),
            "older_link": link(before=page.older.encode()) if page.older else None,
            "newer_link": link(after=page.newer.encode()) if page.newer else None,
            "fragment_url": link(**{k: v for k, v in q.items() if k in ("before", "after")}, fragment="1"),
        }
        template = "_jobs_table.html" if q.get("fragment") else "jobs.html"
        return self.render(request, template, context)

    async def job(self, request: Request) -> Response:
        """A job's page; `?fragment=1` is its live part alone, which the page fetches on each event."""
        job_id = request.path_params["job_id"]
        q = request.query_params
        branch_state = q.get("branch_state") or None
        after = _index_param(q.get("after"))
        before = _index_param(q.get("before"))
        data: JobPageData = await run_in_threadpool(
            self.reads.job_page,
            job_id,
            branch_state=branch_state,
            after=after,
            before=before,
            limit=self.config.branch_page_size,
        )
        job = data.job
        end = job.finished_at if job.finished_at is not None else data.read_at
        picture = timeline.layout(data.timeline, start=job.created_at, end=end, per_row=data.per_row)
        base = f"/jobs/{job.id}"
        keep = {"branch_state": branch_state} if branch_state else {}

        def link(**extra: str) -> str:
            params = {**keep, **extra}
            return f"{base}?{urlencode(params)}" if params else base

        context = {
            "data": data,
            "job": job,
            "timeline": picture,
            "branch_state": branch_state,
            "next_link": link(after=str(data.branches.after)) if data.branches.after is not None else None,
            "prev_link": link(before=str(data.branches.before)) if data.branches.before is not None else None,
            "first_link": link(),
            "fragment_url": link(**{k: v for k, v in q.items() if k in ("after", "before")}, fragment="1"),
            "events_url": None if job.final else f"{base}/events",
            # The redrive: a final job (not cancelled) with branches worth another run.
            "retryable": job.state in _REDRIVABLE and any(data.counts.get(s) for s in RETRY_STATES),
        }
        template = "_job_live.html" if q.get("fragment") else "job.html"
        return self.render(request, template, context)

    async def events(self, request: Request) -> Response:
        """The job's server-sent events (see `live`); an unknown job is a 404, not an empty stream."""
        job_id = parse_job_id(request.path_params["job_id"])
        await run_in_threadpool(self.reads.progress, job_id)  # 404 before the stream starts
        stream = job_events(
            self.reads,
            job_id,
            conninfo=self.conninfo,
            listeners=self.listeners,
            interval=self.config.live_interval,
        )
        return StreamingResponse(
            stream,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )

    async def breakers(self, request: Request) -> Response:
        views = await run_in_threadpool(self.orc.breakers)
        rows = [
            (b, None if b.probe_started_at is None else b.probe_started_at + timedelta(seconds=b.probe_lease))
            for b in views
        ]
        return self.render(request, "breakers.html", {"breakers": rows})

    # --- actions -----------------------------------------------------------------------------------

    async def _form(self, request: Request) -> dict[str, str]:
        """The POSTed form, once its CSRF token and origin are checked (403 otherwise)."""
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > FORM_MAX_BYTES:
                raise HTTPException(413, "the form is too large")
        form = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace")).items()}
        refusal = self.csrf.refusal(request, form.get(CSRF_FIELD))
        if refusal is not None:
            raise HTTPException(403, f"refused: {refusal}")
        return form

    async def cancel(self, request: Request) -> Response:
        """Orchestrator.cancel, then back to the job (303, so a reload does not post again)."""
        job_id = str(parse_job_id(request.path_params["job_id"]))
        await self._form(request)
        await run_in_threadpool(self.orc.cancel, job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    async def retry(self, request: Request) -> Response:
        """Orchestrator.retry (failed, timed-out and short-circuited branches), then back to the job."""
        job_id = str(parse_job_id(request.path_params["job_id"]))
        await self._form(request)
        await run_in_threadpool(self.orc.retry, job_id)
        return RedirectResponse(f"/jobs/{job_id}", status_code=303)

    async def reset_breaker(self, request: Request) -> Response:
        form = await self._form(request)
        name = form.get("name", "")
        await run_in_threadpool(self.orc.reset_breaker, name)
        return RedirectResponse("/breakers", status_code=303)

    # --- errors ------------------------------------------------------------------------------------

    def error_page(self, request: Request, status: int, title: str, message: str) -> Response:
        return self.render(request, "error.html", {"title": title, "message": message}, status=status)

    async def on_error(self, request: Request, exc: Exception) -> Response:
        """The orchestrator's errors and HTTP errors as pages with the right status, never a traceback."""
        if isinstance(exc, (JobNotFound, BreakerNotFound)):
            return self.error_page(request, 404, "Not found", str(exc))
        if isinstance(exc, JobAlreadyFinal):
            return self.error_page(request, 409, "Nothing to cancel", str(exc))
        if isinstance(exc, (JobNotFinal, NothingToRetry)):
            return self.error_page(request, 409, "Nothing to retry", str(exc))
        if isinstance(exc, Overloaded):
            return self.error_page(request, 503, "Overloaded", str(exc))
        if isinstance(exc, InvalidArgument):
            return self.error_page(request, 400, "Bad request", str(exc))
        if isinstance(exc, HTTPException):
            title = {404: "Not found", 403: "Forbidden", 405: "Method not allowed"}.get(
                exc.status_code, "Error"
            )
            return self.error_page(request, exc.status_code, title, str(exc.detail))
        return self.error_page(
            request, 500, "Error", str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        )


_REDRIVABLE = (JobState.SUCCEEDED, JobState.PARTIAL, JobState.FAILED)


def _index_param(raw: str | None) -> int | None:
    """A whole number from the query string (a branch index, a page size); None when absent."""
    if raw is None or raw == "":
        return None
    if not raw.isdigit() or len(raw) > 12:
        raise InvalidArgument(f"expected a whole number, got {raw[:40]!r}")
    return int(raw)


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(orc: Orchestrator, config: WebConfig) -> Starlette:
    """The ASGI application: basic auth around everything but /healthz when credentials are given."""
    view = WebView(orc, config)

    async def home(request: Request) -> Response:
        return RedirectResponse("/jobs", status_code=303)

    routes = [
        Route("/", home),
        Route("/healthz", _healthz),
        Route("/jobs", view.jobs),
        Route("/jobs/{job_id}", view.job),
        Route("/jobs/{job_id}/events", view.events),
        Route("/jobs/{job_id}/cancel", view.cancel, methods=["POST"]),
        Route("/jobs/{job_id}/retry", view.retry, methods=["POST"]),
        Route("/breakers", view.breakers),
        Route("/breakers/reset", view.reset_breaker, methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("orchestrator.web", "static")]), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if config.credentials is not None:
        middleware.append(Middleware(BasicAuth, credentials=config.credentials))
    handler: Callable[[Request, Exception], Awaitable[Response]] = view.on_error
    handlers: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
        OrchestratorError: handler,
        HTTPException: handler,
    }
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it does (port 0 picks a free one)."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self._announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            self._announce(f"serving the web view on http://{shown}:{port}/")


def serve(app: Starlette, address: str, port: int, *, announce: Callable[[str], None]) -> None:
    """Run `app` with uvicorn until SIGINT/SIGTERM; open event streams get 3 s to end on shutdown."""
    config = uvicorn.Config(
        app,
        host=address,
        port=port,
        log_level="warning",
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=3,
    )
    _Server(config, announce).run()
