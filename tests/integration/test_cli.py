"""The real `orchestrator` command, run as a user would, on a fresh embedded home (no workers)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from orchestrator.cli.processes import orchestrator_executable
from tests.conftest import base_env

pytestmark = pytest.mark.integration


@dataclass
class Cli:
    """Runs `orchestrator ARGS...` in `cwd` with `env`, its output captured (so a pipe, not a terminal),
    and checks its exit code. The other test_cli_* modules use it too."""

    cwd: Path
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def on(cls, home: Path, **extra: str) -> Cli:
        env = base_env(home)
        # Rich would size tables to these; Flower's would leak the caller's settings into the tests.
        for key in ("COLUMNS", "LINES", "FORCE_TERMINAL", "TTY_COMPATIBLE"):
            env.pop(key, None)
        for key in [k for k in env if k.startswith("FLOWER_")]:
            del env[key]
        return cls(cwd=home, env={**env, **extra})

    def __call__(self, *args: str, code: int = 0, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [*orchestrator_executable(), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.cwd,
        )
        assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
        return done


@pytest.fixture
def run(tmp_path: Path) -> Cli:
    return Cli.on(tmp_path)


def test_submit_list_and_status(run: Cli) -> None:
    assert "is at head" in run("db", "upgrade").stdout
    job_id = run(
        "submit", "-b", "jobs.io.sleep seconds=0.1", "-b", "jobs.cpu.count_primes limit=100", "--name", "cli"
    ).stdout.strip()
    assert len(job_id) == 36
    assert job_id in run("list").stdout
    status = json.loads(run("status", job_id, "--json").stdout)
    assert status["state"] == "running" and status["name"] == "cli"
    assert [(b["task"], b["args"]) for b in status["branches"]] == [
        ("jobs.io.sleep", {"args": [], "kwargs": {"seconds": 0.1}}),
        ("jobs.cpu.count_primes", {"args": [], "kwargs": {"limit": 100}}),
    ]
    assert "jobs.cpu.count_primes" in run("status", job_id).stdout
    assert job_id not in run("list", "--state", "failed").stdout


def test_submit_from_a_spec_file(run: Cli, tmp_path: Path) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(
        json.dumps(
            {
                "name": "from-file",
                "fan_in": "jobs.aggregate.total",
                "branches": [{"task": "jobs.io.sleep", "args": [0.1]}],
            }
        )
    )
    job_id = run("submit", str(spec)).stdout.strip()
    status = json.loads(run("status", job_id, "--json").stdout)
    assert (status["name"], status["fan_in"]) == ("from-file", "jobs.aggregate.total")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("status", "00000000-0000-0000-0000-000000000000"), 1, "error: no job 00000000-0000"),
        (("status", "nope"), 1, "error: no job 'nope': not a job id"),
        (("watch", "nope"), 1, "error: no job 'nope'"),
        (("submit", "-b", "jobs.io.nope"), 1, "error: unknown task 'jobs.io.nope'"),
        (("submit", "-b", "jobs.io.sleep seconds"), 2, "'seconds' is not key=value"),
        (
            ("submit", "--fan-in", "jobs.io.sleep", "-b", "jobs.io.sleep seconds=1"),
            1,
            "error: task 'jobs.io.sleep' is declared as io, but aggregator is required",
        ),
        (("worker", "gpu"), 2, "'gpu' is not one of 'io', 'cpu', 'fanin'"),
        (("flower",), 2, "set FLOWER_BASIC_AUTH"),
        (("db", "prune", "--older-than", "soon"), 2, "is not a duration"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(run: Cli, args: tuple[str, ...], code: int, message: str) -> None:
    done = run(*args, code=code)
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    if code == 1:
        assert len(done.stderr.strip().splitlines()) == 1
    if args[0] == "submit":
        assert "running" not in run("list").stdout  # nothing was submitted


def test_prune_keeps_recent_jobs(run: Cli) -> None:
    run("submit", "-b", "jobs.io.sleep seconds=0.1")
    out = run("db", "prune", "--older-than", "1d").stdout
    assert out.startswith("pruned 0 jobs")


def test_cancel_and_watch(run: Cli) -> None:
    job_id = run("submit", "-b", "jobs.io.sleep seconds=5").stdout.strip()  # no worker will run it
    stuck = run("watch", job_id, "--timeout", "0.5", code=1)
    assert f"error: job {job_id} is still running after 0.5s" in stuck.stderr
    assert run("cancel", job_id).stdout.strip() == f"job {job_id} cancelled (cancelled=1)"
    again = run("cancel", job_id, code=1)
    assert f"error: job {job_id} is already cancelled; nothing was cancelled" in again.stderr
    watched = run("watch", job_id, code=4)  # final at once; 4: failed or cancelled (see --help)
    assert "cancelled" in watched.stdout
    assert "4  the job failed or was cancelled" in run("watch", "--help").stdout


def test_breakers_table_and_reset(run: Cli, tmp_path: Path) -> None:
    from orchestrator import CircuitBreaker, Settings

    url = Settings.from_env(base_env(tmp_path)).database_url
    run("db", "upgrade")
    payments = CircuitBreaker("payments", failure_threshold=1, reset_timeout=60, database_url=url)
    payments.failure(payments.acquire())
    table = run("breakers").stdout
    assert "payments" in table and "open" in table
    assert run("breakers", "--reset", "payments").stdout.strip() == "breaker payments is closed"
    assert "closed" in run("breakers").stdout
    missing = run("breakers", "--reset", "nope", code=1)
    assert "error: no circuit breaker 'nope'" in missing.stderr
