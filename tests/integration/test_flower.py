"""The compose services as local processes, and Flower watching them.

One stack for the module (tests.compose.local_stack): `orchestrator db upgrade`, the three worker pools
and Flower, each started from exactly its command and environment in docker-compose.yml, against a fresh
PostgreSQL database and RabbitMQ vhost. A job goes through it, the compose healthchecks pass against it,
and Flower (basic auth from FLOWER_BASIC_AUTH) shows its workers, their queues and a job's branches.
"""

from __future__ import annotations

import ast
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from orchestrator import Orchestrator, Settings, branch
from orchestrator.cli.processes import orchestrator_executable
from tests.compose import FLOWER_SERVICE, WORKER_SERVICES, LocalStack, local_stack
from tests.harness import poll
from tests.services import postgres_database, rabbitmq_vhost

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("compose")
    with (
        postgres_database() as db,
        rabbitmq_vhost() as broker,
        local_stack(database_url=db, broker_url=broker, home=home) as running,
    ):
        yield running


@pytest.fixture(scope="module")
def flower(stack: LocalStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.flower_url, auth=stack.flower_auth, timeout=10) as client:
        yield client


# --- the compose services run a job ---------------------------------------------------------------


def test_the_compose_services_run_a_job(stack: LocalStack) -> None:
    assert " is at head" in stack.migrate_output  # the compose `migrate` command ran first
    prefix = orchestrator_executable()
    for kind, name in WORKER_SERVICES.items():
        assert stack.services[name].command == ["orchestrator", "worker", kind, "--hostname", f"{kind}@%h"]
        assert stack.processes[name].argv == [*prefix, "worker", kind, "--hostname", f"{kind}@%h"]
    orc = Orchestrator(Settings.from_env(stack.env["worker-io"]), migrate=False)
    try:
        job = orc.submit(
            [branch("jobs.io.sleep", seconds=0.1) for _ in range(4)]
            + [branch("jobs.cpu.count_primes", limit=20_000)],
            fan_in="jobs.aggregate.collect",
            name="compose",
        )
        view = orc.wait(job.id, timeout=30)
        assert view.state == "succeeded", stack.logs()
        assert view.result == {"0": 0.1, "1": 0.1, "2": 0.1, "3": 0.1, "4": 2262}
        assert [b.queue for b in view.branches] == ["io"] * 4 + ["cpu"]
    finally:
        orc.app.close()


def test_the_compose_healthchecks_pass(stack: LocalStack) -> None:
    """Each worker's healthcheck, run as Docker runs it (sh -c, HOSTNAME set), reaches its worker."""
    checks = {}
    for name in WORKER_SERVICES.values():
        env = {**stack.env[name], "HOSTNAME": socket.gethostname()}
        argv = stack.services[name].healthcheck_argv()
        checks[name] = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 45
    for name, check in checks.items():
        out, _ = check.communicate(timeout=max(deadline - time.monotonic(), 1))
        assert check.returncode == 0, f"{name}: {out.decode(errors='replace')}"
        assert b"pong" in out, name
    # Flower's healthcheck page is the one page that needs no credentials.
    assert httpx.get(f"{stack.flower_url}/healthcheck", timeout=5).text == "OK"


# --- Flower ----------------------------------------------------------------------------------------


def test_workers_send_the_events_flower_needs(stack: LocalStack) -> None:
    for name in WORKER_SERVICES.values():  # task-received/started/succeeded, as the banner says
        assert "task events: ON" in stack.processes[name].log(), stack.processes[name].log()[-2000:]
    assert stack.env[FLOWER_SERVICE]["FLOWER_BASIC_AUTH"] == "user:secret"


def test_flower_wants_credentials(stack: LocalStack, flower: httpx.Client) -> None:
    assert httpx.get(f"{stack.flower_url}/api/workers", timeout=10).status_code == 401
    wrong = httpx.get(f"{stack.flower_url}/api/workers", auth=("user", "wrong"), timeout=10)
    assert wrong.status_code == 401
    assert httpx.get(f"{stack.flower_url}/api/tasks", timeout=10).status_code == 401
    assert flower.get("/api/workers").status_code == 200


def workers_by_pool(flower: httpx.Client) -> dict[str, tuple[str, dict[str, Any]]] | None:
    """{"io": ("io@host", info), ...} once Flower's inspect reached all three pools with their queues."""
    response = flower.get("/api/workers", params={"refresh": 1})
    response.raise_for_status()
    found: dict[str, tuple[str, dict[str, Any]]] = {}
    for name, info in response.json().items():
        pool = name.split("@", 1)[0]
        if pool in WORKER_SERVICES and isinstance(info, dict) and info.get("active_queues"):
            found[pool] = (name, info)
    return found if found.keys() == WORKER_SERVICES.keys() else None


def test_flower_lists_the_three_pools_with_their_queues(stack: LocalStack, flower: httpx.Client) -> None:
    workers = poll(lambda: workers_by_pool(flower), 30, "the io, cpu and fanin workers", stack.logs)
    for pool, (name, info) in workers.items():
        assert name.startswith(f"{pool}@")
        assert [q["name"] for q in info["active_queues"]] == [pool], name
        assert "orchestrator.fan_in" in info["registered"], name
        assert "jobs.io.sleep" in info["registered"] and "jobs.cpu.count_primes" in info["registered"]
    assert workers["io"][1]["stats"]["pool"]["max-concurrency"] == 64  # ORCH_IO_CONCURRENCY's default


def test_flower_shows_a_jobs_branches_under_their_catalog_names(
    stack: LocalStack, flower: httpx.Client
) -> None:
    # Flower only sees events sent after it listens: make sure it already knows every pool.
    poll(lambda: workers_by_pool(flower), 30, "the io, cpu and fanin workers", stack.logs)
    orc = Orchestrator(Settings.from_env(stack.env["worker-io"]), migrate=False)
    try:
        job = orc.submit(
            [branch("jobs.io.sleep", seconds=0.1) for _ in range(3)]
            + [branch("jobs.cpu.count_primes", limit=10_000)],
            fan_in="jobs.aggregate.total",
            name="flower",
        )
        view = orc.wait(job.id, timeout=30)
        assert view.state == "succeeded", stack.logs()
    finally:
        orc.app.close()

    def branch_tasks() -> dict[str, list[dict[str, Any]]] | None:
        response = flower.get("/api/tasks", params={"limit": 1000})
        response.raise_for_status()
        mine: dict[str, list[dict[str, Any]]] = {}
        for task in response.json().values():
            if job.id in (task.get("args") or "") and task.get("state") == "SUCCESS":
                mine.setdefault(task["name"], []).append(task)
        counts = {name: len(tasks) for name, tasks in mine.items()}
        # The three io branches of one task travel as one batch message named after that task.
        expected = {"jobs.io.sleep": 1, "jobs.cpu.count_primes": 1, "orchestrator.fan_in": 1}
        return mine if counts == expected else None

    tasks = poll(branch_tasks, 20, f"the branches of job {job.id} in /api/tasks", stack.logs)
    assert {t["worker"].split("@")[0] for t in tasks["jobs.io.sleep"]} == {"io"}
    assert {t["worker"].split("@")[0] for t in tasks["jobs.cpu.count_primes"]} == {"cpu"}
    # The fan-in (the chord body, with the job id as its last argument) ran on the fanin pool.
    assert {t["worker"].split("@")[0] for t in tasks["orchestrator.fan_in"]} == {"fanin"}
    # Flower shows the arguments: an io batch is (job id, [[index, args, kwargs], ...], deadline) and a
    # cpu branch is (job id, index, args, kwargs, deadline), so every branch index is visible.
    (io_args,) = [ast.literal_eval(t["args"]) for t in tasks["jobs.io.sleep"]]
    assert io_args[0] == job.id and [b[0] for b in io_args[1]] == [0, 1, 2]
    (cpu_args,) = [ast.literal_eval(t["args"]) for t in tasks["jobs.cpu.count_primes"]]
    assert cpu_args[:3] == (job.id, 3, [])
    by_name = flower.get("/api/tasks", params={"taskname": "jobs.io.sleep", "limit": 1000}).json()
    assert {t["uuid"] for t in tasks["jobs.io.sleep"]} <= by_name.keys()
    # The README's way to find a job's tasks: Flower's search, by job id.
    found = flower.get("/api/tasks", params={"search": job.id, "limit": 1000}).json()
    mine = {t["uuid"] for ts in tasks.values() for t in ts}
    assert mine <= found.keys()
    assert {b.celery_task_id for b in view.branches} <= found.keys()  # the ids recorded in SQL


def test_flower_runs_from_the_compose_command(stack: LocalStack) -> None:
    """Exactly the compose command; the local port comes from FLOWER_PORT in its environment."""
    process = stack.processes[FLOWER_SERVICE]
    port = stack.flower_url.rsplit(":", 1)[1]
    assert stack.services[FLOWER_SERVICE].command == ["orchestrator", "flower"]
    assert process.argv == [*orchestrator_executable(), "flower"]
    # `orchestrator flower` prints the celery command it runs.
    assert f"celery -A orchestrator.celery_app flower --port={port} --address=127.0.0.1" in process.log()
