"""The `orchestrator` command: workers, Flower, jobs, breakers, the database, metrics and the demo."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any, NoReturn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import click
from rich.table import Table
from sqlalchemy.exc import DBAPIError

from ..errors import OrchestratorError
from ..models import RETRY_STATES, BreakerState, JobState
from ..settings import Settings, parse_autoscale
from ..views import BreakerView, JobView
from .credentials import basic_auth_pairs
from .display import (
    clean,
    console,
    make_console,
    print_history,
    print_job,
    print_table,
    safe,
    styled,
    watch_job,
)

if TYPE_CHECKING:
    from ..api import Orchestrator

err_console = make_console(stderr=True)

# Exit codes of `submit --wait` and `watch`, so scripts can tell how a job ended without parsing output.
EXIT_SUCCEEDED = 0
EXIT_ERROR = 1  # a one-line `error:` on stderr: bad input, unknown job, unreachable database, --timeout
EXIT_USAGE = 2  # click's code for a malformed command line or job spec file
EXIT_PARTIAL = 3  # final, but some branches did not succeed
EXIT_FAILED = 4  # final and failed or cancelled

_EXIT_CODES = """
  0  the job succeeded
  1  error (bad input, unknown job, database unreachable, --timeout reached)
  2  usage error (bad option, malformed spec file)
  3  the job ended partial (some branches did not succeed)
  4  the job failed or was cancelled
"""
_WATCH_EPILOG = "\b\nExit codes:" + _EXIT_CODES
_SUBMIT_EPILOG = "\b\nExit codes with --wait (without it, 0 once the job is submitted):" + _EXIT_CODES


def _exit_code(state: str) -> int:
    """How a final job maps onto the documented exit codes."""
    if state == JobState.SUCCEEDED:
        return EXIT_SUCCEEDED
    return EXIT_PARTIAL if state == JobState.PARTIAL else EXIT_FAILED


def _fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    err_console.print(f"[red]error:[/red] {safe(message)}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _database_error(exc: DBAPIError) -> str:
    """One line about a database that cannot be used, from the driver's own words, password masked."""
    from ..database import redact

    detail = " ".join(str(exc.orig if exc.orig is not None else exc).split()) or type(exc).__name__
    try:
        url = Settings.from_env().database_url
    except OrchestratorError:
        return redact(f"database error: {detail}", "")
    return redact(f"cannot use the database {url}: {detail}", url)


class _Group(click.Group):
    """Turns every OrchestratorError, and a database that is down or refuses us, into a one-line error
    and a non-zero exit, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except OrchestratorError as exc:
            _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except DBAPIError as exc:
            _fail(_database_error(exc))


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on sys.path while catalog modules are imported, as celery does for
    its workers (celery.utils.imports.cwd_in_path): `ORCH_IMPORTS=myjobs` finds ./myjobs.py for the
    client exactly when it does for a worker started in the same directory."""
    try:
        cwd = os.getcwd()
    except OSError:  # the directory was removed under us: nothing to import from it
        yield
        return
    if cwd in sys.path:
        yield
        return
    sys.path.insert(0, cwd)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(cwd)


def _orchestrator() -> Orchestrator:
    """The API client. Only its submit imports the catalog (ORCH_IMPORTS), so reads, cancel and breakers
    keep working where a catalog module cannot be imported."""
    from ..api import Orchestrator

    return Orchestrator()


def _parse_duration(text: str) -> timedelta:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text[-1] in units:
            return timedelta(seconds=float(text[:-1]) * units[text[-1]])
        return timedelta(seconds=float(text))
    except (ValueError, IndexError):
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 30m, 12h or 7d") from None


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@click.group(cls=_Group)
@click.version_option(package_name="celery-orchestrator")
def main() -> None:
    """Fan-out/fan-in jobs on Celery, tracked in SQL."""


# --- workers ---------------------------------------------------------------------------------------


@main.command()
@click.argument("kind", type=click.Choice(["io", "cpu", "fanin"]))
@click.option("-c", "--concurrency", type=click.IntRange(min=1), help="Pool size (default from ORCH_*).")
@click.option(
    "-n",
    "--hostname",
    metavar="NAME@HOST",
    help="Celery node name; %h is the host name. Default KIND-PID@%h, unique per process, so several "
    "pools of one kind can run on one host.",
)
@click.option(
    "--autoscale",
    metavar="MAX,MIN",
    help="Let Celery's autoscaler size the pool by its queue (prefork, gevent); default "
    "ORCH_<KIND>_AUTOSCALE.",
)
def worker(kind: str, concurrency: int | None, hostname: str | None, autoscale: str | None) -> None:
    """Start a worker pool: prints the exact celery command, then runs it."""
    from .. import database
    from .processes import celery_executable, worker_argv, worker_environment

    if hostname is not None and not hostname.strip():
        raise click.BadParameter("must not be empty", param_hint="--hostname")
    settings = Settings.from_env()
    if settings.is_sqlite:
        database.upgrade(settings.database_url)
    scale = parse_autoscale("--autoscale", autoscale) if autoscale else settings.autoscale_for(kind)
    if scale is not None:
        concurrency = scale[0]  # the most the pool may grow to: its database connections are sized by it
    try:
        argv = worker_argv(kind, settings, concurrency, hostname, scale)
    except OrchestratorError as exc:
        raise click.UsageError(str(exc)) from None
    env, added = worker_environment(kind, settings, concurrency, os.environ)
    click.echo(shlex.join([f"{k}={v}" for k, v in added.items()] + argv), err=True)
    sys.stderr.flush()
    os.execve(celery_executable(), argv, env)


def _check_flower_auth(value: str | None) -> None:
    """Flower can revoke and kill tasks: refuse to start it without real credentials, including the
    .env.example placeholders, which would be public knowledge."""
    basic_auth_pairs("FLOWER_BASIC_AUTH", value, "Flower can revoke and kill tasks")


@main.command()
@click.option("--port", envvar="FLOWER_PORT", default=5555, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--address",
    envvar="FLOWER_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="Where to listen (env FLOWER_ADDRESS); 0.0.0.0 for every interface, e.g. in a container.",
)
def flower(port: int, address: str) -> None:
    """Start Flower on the workers' broker; basic auth comes from FLOWER_BASIC_AUTH (user:password)."""
    from .processes import celery_executable, flower_argv

    _check_flower_auth(os.environ.get("FLOWER_BASIC_AUTH"))
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

    from .. import database

    settings = Settings.from_env()
    database.upgrade(settings.database_url, revision)
    url = make_url(settings.database_url).render_as_string(hide_password=True)
    click.echo(f"database {url} is at {revision}")


@db.command("prune")
@click.option("--older-than", "older_than", metavar="AGE", help="e.g. 12h or 7d (default ORCH_RETENTION).")
def db_prune(older_than: str | None) -> None:
    """Delete final jobs, task results and chord joins older than AGE."""
    from ..app import sql_backend
    from ..store import Store

    settings = Settings.from_env()
    age = _parse_duration(older_than) if older_than else timedelta(seconds=settings.retention)
    jobs = Store(settings.database_url).prune(age)
    results = sql_backend(settings).prune(age)
    click.echo(f"pruned {jobs} jobs and {results} result rows older than {age}")


# --- jobs ------------------------------------------------------------------------------------------

# What a JSON job spec may hold: anything else (a typo such as "dedline") is refused, not ignored.
_SPEC_KEYS = ("branches", "fan_in", "name", "deadline", "min_success", "fan_in_timeout", "idempotency_key")
_BRANCH_KEYS = ("task", "args", "kwargs")


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _branches_from_options(specs: tuple[tuple[str, ...], ...]) -> list[Any]:
    from ..api import branch

    out = []
    for spec in specs:
        if not spec:
            raise click.BadParameter("a branch needs a task name", param_hint="--branch")
        task, *pairs = spec
        kwargs: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key.isidentifier():
                raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--branch")
            kwargs[key] = _parse_value(value)
        out.append(branch(task, **kwargs))
    return out


def _refuse_unknown_keys(where: str, given: Iterable[str], allowed: Sequence[str]) -> None:
    for key in given:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise click.BadParameter(
                f"{where}: unknown key {key!r}{hint}; expected {', '.join(allowed)}", param_hint="SPEC"
            )


def _branches_from_file(path: Path) -> tuple[list[Any], dict[str, Any]]:
    """A job spec file, checked for shape: unknown keys and wrongly typed branch entries are usage
    errors (exit 2); the values themselves are checked by Orchestrator.submit like any other job."""
    from ..api import branch

    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read a JSON job spec from {path}: {exc}", param_hint="SPEC"
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("branches"), list):
        raise click.BadParameter(f"{path}: expected an object with a 'branches' list", param_hint="SPEC")
    _refuse_unknown_keys(str(path), spec, _SPEC_KEYS)
    out = []
    for i, b in enumerate(spec["branches"]):
        where = f"{path}: branch {i}"
        if not isinstance(b, dict) or "task" not in b:
            raise click.BadParameter(f"{where} needs a 'task'", param_hint="SPEC")
        _refuse_unknown_keys(where, b, _BRANCH_KEYS)
        args, kwargs = b.get("args", []), b.get("kwargs", {})
        if not isinstance(args, list):
            raise click.BadParameter(f"{where}: 'args' must be a list", param_hint="SPEC")
        if not isinstance(kwargs, dict):
            raise click.BadParameter(f"{where}: 'kwargs' must be an object", param_hint="SPEC")
        out.append(branch(b["task"], *args, **kwargs))
    return out, {k: v for k, v in spec.items() if k != "branches"}


@main.command(epilog=_SUBMIT_EPILOG)
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
@click.option(
    "--idempotency-key",
    metavar="KEY",
    help="Submit at most once per KEY: a repeat prints the id of the job the key already names.",
)
@click.option(
    "--priority",
    type=click.IntRange(min=0),
    help="0 (bulk, the default) to ORCH_MAX_PRIORITY (9, most urgent).",
)
@click.option("--wait/--no-wait", default=False, help="Watch the job until it is final (see exit codes).")
def submit(
    spec: Path | None,
    branch_opts: tuple[str, ...],
    fan_in: str | None,
    name: str | None,
    deadline: float | None,
    min_success: int | None,
    fan_in_timeout: float | None,
    idempotency_key: str | None,
    priority: int | None,
    wait: bool,
) -> None:
    """Submit a job from a JSON spec file or from -b options; prints its id.

    A spec file is {"branches": [{"task": ..., "args": [...], "kwargs": {...}}], "fan_in": ...,
    "name": ..., "deadline": ..., "min_success": ..., "fan_in_timeout": ..., "idempotency_key": ...,
    "priority": ...};
    options given on the command line win over the file's. Catalog modules (ORCH_IMPORTS) are imported
    from the current directory too, as the workers import them.
    """
    options: dict[str, Any] = {}
    if spec is not None and branch_opts:
        raise click.UsageError("give either a spec file or --branch options, not both")
    if spec is not None:
        branches, options = _branches_from_file(spec)
    else:
        branches = _branches_from_options(tuple(tuple(shlex.split(b)) for b in branch_opts))
    orc = _orchestrator()
    with _cwd_on_path():
        view = orc.submit(
            branches,
            fan_in=fan_in or options.get("fan_in", "jobs.aggregate.collect"),
            name=name or options.get("name"),
            deadline=deadline if deadline is not None else options.get("deadline"),
            min_success=min_success if min_success is not None else options.get("min_success"),
            fan_in_timeout=fan_in_timeout if fan_in_timeout is not None else options.get("fan_in_timeout"),
            idempotency_key=idempotency_key
            if idempotency_key is not None
            else options.get("idempotency_key"),
            priority=priority if priority is not None else options.get("priority", 0),
        )
    click.echo(view.id)
    if wait:
        final = watch_job(orc, view.id)
        print_job(final)
        sys.exit(_exit_code(final.state))


def _job_dict(view: JobView, *, branches: bool = True) -> dict[str, Any]:
    out = dataclasses.asdict(view)
    if not branches:  # listings do not read branches: an empty list would claim there are none
        del out["branches"]
    return out


@main.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--history", is_flag=True, help="Also the job's earlier runs (see retry).")
def status(job_id: str, as_json: bool, history: bool) -> None:
    """Show a job and its branches."""
    orc = _orchestrator()
    view = orc.get(job_id)
    past = orc.history(job_id) if history else None
    if as_json:
        out = _job_dict(view)
        if past is not None:
            out["history"] = dataclasses.asdict(past)
        _echo_json(out)
        return
    print_job(view)
    if past is not None:
        print_history(past)


@main.command("list")
@click.option(
    "--state",
    type=click.Choice([s.value for s in JobState]),
)
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (a JSON list).")
def list_jobs(state: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    views = _orchestrator().list(state=state, limit=limit)
    if as_json:
        _echo_json([_job_dict(v, branches=False) for v in views])
        return
    table = Table()
    # ids are copied and states grepped from here: never shortened. Names are cut in a terminal only.
    table.add_column("id", no_wrap=True, min_width=36)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=16 if console.is_terminal else None)
    table.add_column("state", no_wrap=True, min_width=max(len(s) for s in JobState))
    for header in ("branches", "created", "secs"):
        table.add_column(header, no_wrap=True)
    for v in views:
        seconds = f"{v.duration:.3f}" if v.duration is not None else "-"
        table.add_row(
            v.id,
            safe(v.name or ""),
            styled(v.state),
            f"{v.branch_done}/{v.branch_total}",
            v.created_at.strftime("%m-%d %H:%M:%S"),
            seconds,
        )
    print_table(table)


@main.command(epilog=_WATCH_EPILOG)
@click.argument("job_id")
@click.option("--timeout", type=float, help="Give up after this many seconds (exit 1).")
def watch(job_id: str, timeout: float | None) -> None:
    """Live progress of a job until it is final, then its outcome."""
    orc = _orchestrator()
    final = watch_job(orc, job_id, timeout)
    print_job(final)
    sys.exit(_exit_code(final.state))


@main.command()
@click.argument("job_id")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(sorted({*RETRY_STATES, "succeeded", "cancelled"})),
    help="Run again the branches in this state (repeatable; default: failed, timed_out, short_circuited).",
)
@click.option("--deadline", type=float, help="Seconds for the new run (default: no deadline).")
@click.option("--wait/--no-wait", default=False, help="Watch the job until it is final (see exit codes).")
def retry(job_id: str, states: tuple[str, ...], deadline: float | None, wait: bool) -> None:
    """Run a final job's failed branches again (the redrive): the others keep their outcomes, the fan-in
    runs again over all of them, and the earlier run is kept (status --history)."""
    orc = _orchestrator()
    before = orc.get(job_id)
    view = orc.retry(job_id, states or RETRY_STATES, deadline=deadline)
    again = sum(1 for b in view.branches if b.run == view.run)
    click.echo(f"job {view.id} run {view.run}: {again} of {before.branch_total} branches queued again")
    if wait:
        final = watch_job(orc, view.id)
        print_job(final)
        sys.exit(_exit_code(final.state))


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a pending or running job: its unfinished branches are revoked and the fan-in does not run."""
    view = _orchestrator().cancel(job_id)
    counts = "  ".join(f"{k}={n}" for k, n in sorted(view.counts().items()))
    click.echo(f"job {view.id} cancelled ({counts})")


def _print_breakers(views: list[BreakerView]) -> None:
    table = Table()
    # Names are what --reset takes: never shortened, like the states.
    table.add_column("name", no_wrap=True, min_width=max((len(clean(b.name)) for b in views), default=4))
    table.add_column("state", no_wrap=True, min_width=max(len(s) for s in BreakerState))
    for header in ("failures", "threshold", "reset after", "retry at", "updated"):
        table.add_column(header, no_wrap=True)
    for b in views:
        retry = b.retry_at.strftime("%H:%M:%S.%f")[:-3] if b.retry_at else "-"
        table.add_row(
            safe(b.name),
            styled(b.state),
            str(b.failure_count),
            str(b.failure_threshold),
            f"{b.reset_timeout:g}s",
            retry,
            b.updated_at.strftime("%H:%M:%S"),
        )
    print_table(table)


@main.command()
@click.option("--reset", "reset_name", metavar="NAME", help="Close the breaker NAME now.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def breakers(reset_name: str | None, as_json: bool) -> None:
    """Show the circuit breakers every worker shares (or reset one)."""
    orc = _orchestrator()
    if reset_name is not None:
        view = orc.reset_breaker(reset_name)
        if as_json:
            _echo_json(dataclasses.asdict(view))
        else:
            click.echo(f"breaker {clean(view.name)} is {view.state}")
        return
    views = orc.breakers()
    if as_json:
        _echo_json([dataclasses.asdict(b) for b in views])
    else:
        _print_breakers(views)


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """One thread per connection: a client that connects and sends nothing holds its own thread until
    the handler's timeout, never the scrapes of everyone else."""

    daemon_threads = True  # a hung connection never keeps the process from exiting

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
            return  # an idle or vanished client: nothing worth a traceback
        super().handle_error(request, client_address)


class _MetricsHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds a client may take to send its request before its connection is dropped

    def log_message(self, format: str, *args: Any) -> None:
        pass


@main.command()
@click.option("--port", default=9808, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Where to listen; 0.0.0.0 for every interface (Prometheus on another host, a container).",
)
def metrics(port: int, address: str) -> None:
    """Serve Prometheus metrics read from SQL (jobs, branches, durations, breakers, queue depth)."""
    from prometheus_client import CollectorRegistry, make_wsgi_app

    from .metrics import SQLCollector

    orc = _orchestrator()
    registry = CollectorRegistry()
    registry.register(SQLCollector(orc.settings, orc.app))
    server = make_server(
        address, port, make_wsgi_app(registry), server_class=_MetricsServer, handler_class=_MetricsHandler
    )
    click.echo(f"serving metrics on http://{address}:{server.server_port}/metrics", err=True)
    server.serve_forever()


def _flower_link(url: str | None) -> str | None:
    """Flower's base URL as the browser reaches it, checked: branches link to `<url>/task/<task id>`."""
    if not url:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise click.BadParameter(f"{url!r} is not an http(s) URL", param_hint="--flower-url/ORCH_FLOWER_URL")
    return url.rstrip("/")


def _loopback(address: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


@main.command()
@click.option(
    "--port",
    envvar="ORCH_WEB_PORT",
    default=8808,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Where to listen (env ORCH_WEB_PORT); 0 picks a free port.",
)
@click.option(
    "--address",
    envvar="ORCH_WEB_ADDRESS",
    default="127.0.0.1",
    show_default=True,
    help="Where to listen (env ORCH_WEB_ADDRESS); 0.0.0.0 for every interface, e.g. in a container.",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without credentials; only on a loopback address (127.0.0.1 or ::1).",
)
@click.option(
    "--flower-url",
    envvar="ORCH_FLOWER_URL",
    metavar="URL",
    help="Flower as the browser reaches it (env ORCH_FLOWER_URL): each branch links to its task there.",
)
def web(port: int, address: str, no_auth: bool, flower_url: str | None) -> None:
    """Serve jobs, branches, timelines and breakers in the browser, with live progress; cancel jobs and
    reset breakers. Basic auth comes from ORCH_WEB_BASIC_AUTH (user:password, comma-separate several)."""
    raw = os.environ.get("ORCH_WEB_BASIC_AUTH")
    credentials: dict[str, str] | None = None
    if no_auth:
        if raw:
            raise click.UsageError("--no-auth was given but ORCH_WEB_BASIC_AUTH is set: choose one")
        if not _loopback(address):
            raise click.UsageError(
                f"--no-auth is only allowed on a loopback address (127.0.0.1 or ::1), not {clean(address)!r}"
            )
    else:
        credentials = basic_auth_pairs(
            "ORCH_WEB_BASIC_AUTH",
            raw,
            "the web view can cancel jobs and reset breakers (or pass --no-auth on 127.0.0.1)",
        )
    link = _flower_link(flower_url)
    from ..web import WebConfig, create_app, serve

    orc = _orchestrator()
    app = create_app(orc, WebConfig(credentials=credentials, flower_url=link))
    serve(app, address, port, announce=lambda line: click.echo(line, err=True))


@main.command()
def demo() -> None:
    """Start the three pools, run a mixed io+cpu job with progress, print its outcome, stop the pools."""
    from .demo import run_demo

    sys.exit(run_demo(console))
