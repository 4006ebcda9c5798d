"""What the CLI prints is what a script or a person can rely on: piped tables keep every id and state
whole, JSON is there for programs, a spec file's typos are refused, a database that is down is one line,
and user-controlled text is shown as written, never interpreted as Rich markup or terminal escapes."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from orchestrator import CircuitBreaker, Settings
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration


@pytest.fixture
def run(tmp_path: Path) -> Cli:
    return Cli.on(tmp_path)


# --- piped output and JSON -------------------------------------------------------------------------


def test_piped_tables_keep_ids_states_and_names_whole(run: Cli) -> None:
    long_name = "nightly-reconciliation-of-every-shard-in-every-region"
    ids = [
        run("submit", "-b", "jobs.io.sleep seconds=5", "--name", f"{long_name}-{i}").stdout.strip()
        for i in range(3)
    ]
    listed = run("list").stdout
    assert "…" not in listed
    rows = [line for line in listed.splitlines() if "running" in line]  # `orchestrator list | grep running`
    assert len(rows) == 3
    for job_id, row in zip(reversed(ids), rows, strict=True):
        assert job_id in row and long_name in row
    status = run("status", ids[0]).stdout
    assert f"job {ids[0]} {long_name}-0  running" in status
    assert "jobs.io.sleep" in status and "pending" in status


def test_list_and_breakers_speak_json(run: Cli, tmp_path: Path) -> None:
    first = run("submit", "-b", "jobs.io.sleep seconds=5", "--name", "a").stdout.strip()
    second = run("submit", "-b", "jobs.cpu.count_primes limit=10", "--name", "b").stdout.strip()
    jobs = json.loads(run("list", "--json").stdout)
    assert [(j["id"], j["name"], j["state"]) for j in jobs] == [
        (second, "b", "running"),
        (first, "a", "running"),
    ]
    assert "branches" not in jobs[0]  # listings do not read branches; `status --json` has them
    assert json.loads(run("list", "--json", "--state", "failed").stdout) == []

    url = Settings.from_env(run.env).database_url
    gate = CircuitBreaker("payments", failure_threshold=1, reset_timeout=60, database_url=url)
    gate.failure(gate.acquire())
    (payments,) = json.loads(run("breakers", "--json").stdout)
    assert (payments["name"], payments["state"], payments["failure_count"]) == ("payments", "open", 1)
    reset = json.loads(run("breakers", "--reset", "payments", "--json").stdout)
    assert (reset["name"], reset["state"]) == ("payments", "closed")


def test_an_idempotency_key_submits_once(run: Cli, tmp_path: Path) -> None:
    args = ("submit", "-b", "jobs.io.sleep seconds=5", "--idempotency-key", "order-42")
    job_id = run(*args).stdout.strip()
    assert run(*args).stdout.strip() == job_id
    spec = tmp_path / "job.json"
    spec.write_text(
        json.dumps({"idempotency_key": "order-42", "branches": [{"task": "jobs.io.sleep", "args": [5]}]})
    )
    assert run("submit", str(spec)).stdout.strip() == job_id  # the file's key counts too
    assert len(json.loads(run("list", "--json").stdout)) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"dedline": 2, "branches": [{"task": "jobs.io.sleep", "args": [1]}]},
            "unknown key 'dedline' (did you mean 'deadline'?)",
        ),
        (
            {"branches": [{"task": "jobs.io.sleep", "kwarg": {"seconds": 1}}]},
            "branch 0: unknown key 'kwarg' (did you mean 'kwargs'?)",
        ),
        ({"branches": [{"task": "jobs.io.sleep", "args": 1}]}, "branch 0: 'args' must be a list"),
        ({"branches": [{"task": "jobs.io.sleep", "kwargs": [1]}]}, "branch 0: 'kwargs' must be an object"),
        ({"branches": [{"args": [1]}]}, "branch 0 needs a 'task'"),
    ],
)
def test_a_malformed_spec_file_is_a_usage_error(
    run: Cli, tmp_path: Path, spec: dict[str, object], message: str
) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(spec))
    refused = run("submit", str(path), code=2)
    assert message in refused.stderr
    assert "Traceback" not in refused.stderr
    assert json.loads(run("list", "--json").stdout) == []  # nothing was submitted


# --- a database that is down -----------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens on it once closed


JOB = "00000000-0000-0000-0000-000000000001"


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "--json"),
        ("status", JOB),
        ("watch", JOB),
        ("cancel", JOB),
        ("breakers",),
        ("submit", "-b", "jobs.io.sleep seconds=1", "--wait"),
        ("db", "upgrade"),
        ("db", "prune"),
        ("metrics", "--port", "1"),
    ],
)
def test_a_database_that_is_down_is_one_line_without_its_password(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    url = f"postgresql://orch:s3cret@127.0.0.1:{_closed_port()}/orch"
    run = Cli.on(tmp_path, ORCH_DATABASE_URL=url)
    done = run(*args, code=1)
    assert done.stderr.startswith("error: cannot use the database postgresql+psycopg://orch:***@127.0.0.1:")
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "s3cret" not in done.stderr + done.stdout
    assert "Traceback" not in done.stderr


# --- user-controlled text --------------------------------------------------------------------------

ANSI_NAME = "red\x1b[31mname\x1b]0;owned\x07\r\x08!"


def test_names_are_shown_as_written_never_as_markup(run: Cli) -> None:
    markup = run("submit", "-b", "jobs.io.sleep seconds=5", "--name", "[/bold]").stdout.strip()
    ansi = run("submit", "-b", "jobs.io.sleep seconds=5", "--name", ANSI_NAME).stdout.strip()

    listed = run("list").stdout
    assert "[/bold]" in listed and "redname!" in listed
    assert f"job {markup} [/bold]  running" in run("status", markup).stdout
    status = run("status", ansi).stdout
    assert f"job {ansi} redname!  running" in status
    run("cancel", markup)
    watched = run("watch", markup, code=4).stdout  # the progress bar's description is the name too
    assert "[/bold]" in watched and "cancelled" in watched
    for out in (listed, status, watched):
        assert "\x1b" not in out and "\r" not in out and "\x07" not in out and "\x08" not in out
    # The JSON keeps the name exactly (escaped the JSON way), for programs.
    assert json.loads(run("status", ansi, "--json").stdout)["name"] == ANSI_NAME


def test_errors_and_breaker_names_are_shown_as_written(run: Cli) -> None:
    unknown = run("submit", "-b", "[/bold]\x1b[2J", code=1)
    assert unknown.stderr.startswith("error: unknown task '[/bold]")
    assert "Traceback" not in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1

    run("db", "upgrade")
    url = Settings.from_env(run.env).database_url
    for name in ("[/bold]", "[red]x\x1b[31my"):
        gate = CircuitBreaker(name, failure_threshold=1, reset_timeout=60, database_url=url)
        gate.failure(gate.acquire())
    table = run("breakers").stdout
    assert "[/bold]" in table and "[red]xy" in table and "\x1b" not in table
    assert run("breakers", "--reset", "[/bold]").stdout.strip() == "breaker [/bold] is closed"
