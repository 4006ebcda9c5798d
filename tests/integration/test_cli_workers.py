"""`orchestrator worker` and `submit --wait` on a real stack (PostgreSQL + RabbitMQ): two cpu pools on
one host, the exit codes of a job's outcome, and branch errors and results shown as written."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from orchestrator import Orchestrator, Settings
from orchestrator.cli.processes import WorkerProcess, start_worker, stop_all
from tests.conftest import stack_services
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration


@dataclass
class TwoCpuStack:
    cli: Cli
    orc: Orchestrator
    cpu: list[WorkerProcess]
    workers: list[WorkerProcess]

    def logs(self) -> str:
        return "\n".join(f"--- {w.kind} {w.pid}\n{w.log()[-3000:]}" for w in self.workers)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoCpuStack]:
    """io and fanin pools, and two `orchestrator worker cpu` started the same way on this one host."""
    home = tmp_path_factory.mktemp("two-cpu")
    with stack_services("postgres-rabbitmq", home) as env:
        orc = Orchestrator(Settings.from_env(env), migrate=True)
        logs = home / "logs"
        workers = [start_worker(kind, env=env, log_dir=logs, concurrency=2) for kind in ("io", "fanin")]
        cpu = [start_worker("cpu", env=env, log_dir=logs, concurrency=1) for _ in range(2)]
        workers += cpu
        try:
            for w in workers:
                w.wait_ready(60)
            cli = Cli.on(home, **{k: v for k, v in env.items() if k.startswith("ORCH_")})
            yield TwoCpuStack(cli, orc, cpu, workers)
        finally:
            stop_all(workers, timeout=20)  # each by its own pid (and its process group)
            orc.app.close()


def test_two_cpu_pools_run_side_by_side_on_one_host(stack: TwoCpuStack) -> None:
    names = []
    for w in stack.cpu:
        found = re.search(r"(cpu-\d+@\S+) ready\.", w.log())
        assert found, w.log()[-3000:]
        names.append(found[1])
        assert names[-1].startswith(f"cpu-{w.pid}@")  # the pid in the name is the worker's own
    assert names[0] != names[1]
    time.sleep(3)  # the second pidbox consumer is refused (ResourceLocked) only once it is declared
    for w in stack.cpu:
        w.check_alive()
        assert "ResourceLocked" not in w.log()
    replies = stack.orc.app.control.ping(destination=names, timeout=3)
    assert sorted(node for reply in replies for node in reply) == sorted(names)


def test_submit_wait_exit_codes_follow_the_outcome(stack: TwoCpuStack) -> None:
    run = stack.cli
    ok = run("submit", "-b", "jobs.io.sleep seconds=0.05", "-b", "tests.catalog.spin seconds=0.05", "--wait")
    assert "succeeded" in ok.stdout, stack.logs()
    partial = run("submit", "-b", "jobs.io.sleep seconds=0.05", "-b", "tests.catalog.boom", "--wait", code=3)
    job_id = partial.stdout.splitlines()[0]
    assert json.loads(run("status", job_id, "--json").stdout)["state"] == "partial"
    run("watch", job_id, code=3)  # watch agrees with submit --wait
    failed = run(
        "submit",
        "-b",
        "jobs.io.sleep seconds=0.05",
        "-b",
        "tests.catalog.boom",
        "--min-success",
        "2",
        "--wait",
        code=4,
    )
    assert "min_success is 2" in failed.stdout


def test_branch_errors_and_results_are_shown_as_written(stack: TwoCpuStack) -> None:
    done = stack.cli(
        "submit",
        "-b",
        "tests.catalog.boom message='[/bold] \x1b[31mred\x1b[0m [link=http://x]'",
        "-b",
        "tests.catalog.stubborn_sleep seconds=0 token='[/red]'",
        "--fan-in",
        "tests.catalog.outcomes",
        "--wait",
        code=3,
    )
    assert "[/bold] red [link=http://x]" in done.stdout  # the branch error, in the table
    assert '"token": "[/red]"' in done.stdout  # the result, and the fan-in's result below it
    assert "\x1b" not in done.stdout
