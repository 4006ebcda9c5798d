"""The `orchestrator` command: workers, jobs, the database and the demo."""

from __future__ import annotations

import json
import os
import shlex
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

from .display import console, print_job, styled, watch_job
from .errors import OrchestratorError
from .models import JobState
from .settings import Settings
from .views import JobView

err_console = Console(stderr=True)


def _fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


class _Group(click.Group):
    """Turns every OrchestratorError into a one-line error and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrchestratorError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def _orchestrator() -> Any:
    from .api import Orchestrator

    return Orchestrator()


def _parse_duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h or 7d") from None


@click.group(cls=_Group)
@click.version_option(package_name="celery-orchestrator")
def main() -> None:
    """Fan-out/fan-in jobs on Celery, tracked in SQL."""


# --- workers ---------------------------------------------------------------------------------------


@main.command()
@click.argument("kind", type=click.Choice(["io", "cpu", "fanin"]))
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool size (default from ORCH_*).")
def worker(kind: str, concurrency: int | None) -> None:
    """Start a worker pool: prints the exact celery command, then runs it."""
    from . import database
    from .embedded import celery_executable, worker_argv

    settings = Settings.from_env()
    if settings.is_sqlite:
        database.upgrade(settings.database_url)
    argv = worker_argv(kind, settings, concurrency)
    click.echo(shlex.join(argv), err=True)
    sys.stderr.flush()
    os.execv(celery_executable(), argv)


@main.command()
@click.option("--port", envvar="FLOWER_PORT", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", envvar="FLOWER_ADDRESS", default="0.0.0.0", show_default=True)
def flower(port: int, address: str) -> None:
    """Start Flower on the workers' broker; basic auth comes from FLOWER_BASIC_AUTH (user:password)."""
    from .embedded import celery_executable, flower_argv

    if not os.environ.get("FLOWER_BASIC_AUTH"):
        raise click.UsageError("set FLOWER_BASIC_AUTH=user:password: Flower can revoke and kill tasks")
    argv = flower_argv(port, address)
    click.echo(shlex.join(argv), err=True)
    sys.stderr.flush()
    os.execv(celery_executable(), argv)


# --- database --------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Schema migrations and retention."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply the Alembic migrations to ORCH_DATABASE_URL."""
    from sqlalchemy.engine import make_url

    from . import database

    settings = Settings.from_env()
    database.upgrade(settings.database_url, revision)
    url = make_url(settings.database_url).render_as_string(hide_password=True)
    click.echo(f"database {url} is at {revision}")


@db.command("prune")
@click.option("--older-than", "older_than", metavar="AGE", help="e.g. 12h or 7d (default ORCH_RETENTION).")
def db_prune(older_than: str | None) -> None:
    """Delete final jobs, task results and chord joins older than AGE."""
    from celery import Celery

    from .backend import SQLBackend
    from .store import Store

    settings = Settings.from_env()
    age = _parse_duration(older_than) if older_than else timedelta(seconds=settings.retention)
    jobs = Store(settings.database_url).prune(age)
    backend = Celery(backend=f"orchestrator.backend:SQLBackend+{settings.database_url}").backend
    assert isinstance(backend, SQLBackend)
    results = backend.prune(age)
    click.echo(f"pruned {jobs} jobs and {results} result rows older than {age}")


# --- jobs ------------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _branches_from_options(specs: tuple[tuple[str, ...], ...]) -> list[Any]:
    from .api import branch

    out = []
    for spec in specs:
        task, *pairs = spec
        kwargs: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.isidentifier():
                raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--branch")
            kwargs[key] = _parse_value(value)
        out.append(branch(task, **kwargs))
    return out


def _branches_from_file(path: Path) -> tuple[list[Any], dict[str, Any]]:
    from .api import branch

    try:
        spec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise click.BadParameter(f"cannot read a JSON job spec from {path}: {exc}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("branches"), list):
        raise click.BadParameter(f"{path}: expected an object with a 'branches' list")
    out = []
    for i, b in enumerate(spec["branches"]):
        if not isinstance(b, dict) or "task" not in b:
            raise click.BadParameter(f"{path}: branch {i} needs a 'task'")
        out.append(branch(b["task"], *b.get("args", []), **b.get("kwargs", {})))
    options = {
        k: spec[k] for k in ("fan_in", "name", "deadline", "min_success", "fan_in_timeout") if k in spec
    }
    return out, options


@main.command()
@click.argument("spec", required=False, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-b",
    "--branch",
    "branch_opts",
    multiple=True,
    metavar="'TASK [key=value ...]'",
    help="A branch: the task name, then its keyword arguments (values parsed as JSON).",
)
@click.option("--fan-in", help="The aggregator (default jobs.aggregate.collect).")
@click.option("--name", help="A name shown in listings.")
@click.option("--deadline", type=float, help="Seconds: then the fan-in runs with what finished.")
@click.option("--min-success", type=int, help="Fail the job if fewer branches succeed.")
@click.option("--fan-in-timeout", type=float, help="Soft time limit of the fan-in, seconds.")
@click.option("--wait/--no-wait", default=False, help="Watch the job until it is final.")
def submit(
    spec: Path | None,
    branch_opts: tuple[str, ...],
    fan_in: str | None,
    name: str | None,
    deadline: float | None,
    min_success: int | None,
    fan_in_timeout: float | None,
    wait: bool,
) -> None:
    """Submit a job from a JSON spec file or from -b options."""
    options: dict[str, Any] = {}
    if spec is not None and branch_opts:
        raise click.UsageError("give either a spec file or --branch options, not both")
    if spec is not None:
        branches, options = _branches_from_file(spec)
    else:
        branches = _branches_from_options(tuple(tuple(shlex.split(b)) for b in branch_opts))
    orc = _orchestrator()
    view = orc.submit(
        branches,
        fan_in=fan_in or options.get("fan_in", "jobs.aggregate.collect"),
        name=name or options.get("name"),
        deadline=deadline if deadline is not None else options.get("deadline"),
        min_success=min_success if min_success is not None else options.get("min_success"),
        fan_in_timeout=fan_in_timeout if fan_in_timeout is not None else options.get("fan_in_timeout"),
    )
    click.echo(view.id)
    if wait:
        final = watch_job(orc, view.id)
        print_job(final)
        sys.exit(0 if final.state in ("succeeded", "partial") else 1)


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, as_json: bool) -> None:
    """Show a job and its branches."""
    view = _orchestrator().get(job_id)
    if as_json:
        click.echo(json.dumps(_view_dict(view), indent=2, default=str))
    else:
        print_job(view)


def _view_dict(view: JobView) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(view)


@main.command("list")
@click.option(
    "--state",
    type=click.Choice([s.value for s in JobState]),
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
def list_jobs(state: str | None, limit: int) -> None:
    """List jobs, newest first."""
    table = Table()
    table.add_column("id", no_wrap=True, min_width=36)  # ids are copied from here: never wrapped
    table.add_column("name", overflow="ellipsis", no_wrap=True, max_width=16)
    for header in ("state", "branches", "created", "secs"):
        table.add_column(header, no_wrap=True)
    for v in _orchestrator().list(state=state, limit=limit):
        seconds = f"{v.duration:.3f}" if v.duration is not None else "-"
        table.add_row(v.id, v.name or "", styled(v.state), f"{v.branch_done}/{v.branch_total}",
                      v.created_at.strftime("%m-%d %H:%M:%S"), seconds)  # fmt: skip
    console.print(table)


@main.command()
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 1).")
def watch(job_id: str, timeout: float | None) -> None:
    """Live progress of a job until it is final, then its outcome."""
    orc = _orchestrator()
    final = watch_job(orc, job_id, timeout)
    print_job(final)
    sys.exit(0 if final.state in ("succeeded", "partial") else 1)


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a pending or running job: its unfinished branches are revoked and the fan-in does not run."""
    view = _orchestrator().cancel(job_id)
    counts = "  ".join(f"{k}={n}" for k, n in sorted(view.counts().items()))
    click.echo(f"job {view.id} cancelled ({counts})")


@main.command()
@click.option("--reset", "reset_name", metavar="NAME", help="Close the breaker NAME now.")
def breakers(reset_name: str | None) -> None:
    """Show the circuit breakers every worker shares (or reset one)."""
    orc = _orchestrator()
    if reset_name is not None:
        view = orc.reset_breaker(reset_name)
        click.echo(f"breaker {view.name} is {view.state}")
        return
    table = Table("name", "state", "failures", "threshold", "reset after", "retry at", "updated")
    for b in orc.breakers():
        retry = b.retry_at.strftime("%H:%M:%S.%f")[:-3] if b.retry_at else "-"
        table.add_row(b.name, styled(b.state), str(b.failure_count), str(b.failure_threshold),
                      f"{b.reset_timeout:g}s", retry, b.updated_at.strftime("%H:%M:%S"))  # fmt: skip
    console.print(table)


@main.command()
@click.option("--port", default=9808, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default="0.0.0.0", show_default=True)
def metrics(port: int, address: str) -> None:
    """Serve Prometheus metrics read from SQL (jobs, branches, durations, breakers, queue depth)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    from .metrics import SQLCollector

    orc = _orchestrator()
    registry = CollectorRegistry()
    registry.register(SQLCollector(orc.settings, orc.app))

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = make_server(address, port, make_wsgi_app(registry), handler_class=Quiet)
    click.echo(f"serving metrics on http://{address}:{server.server_port}/metrics", err=True)
    server.serve_forever()


@main.command()
def demo() -> None:
    """Start the three pools, run a mixed io+cpu job with progress, print its outcome, stop the pools."""
    from .demo import run_demo

    sys.exit(run_demo(console))
