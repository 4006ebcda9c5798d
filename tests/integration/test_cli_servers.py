"""`orchestrator flower` and `orchestrator metrics` listen on this machine only unless told otherwise,
Flower never starts with a guessable password, and one idle client cannot stall every metrics scrape."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from orchestrator.cli.processes import WorkerProcess, orchestrator_executable, spawn
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _started(run: Cli, *args: str) -> Iterator[WorkerProcess]:
    """`orchestrator ARGS...` as a long-running child of its own session, stopped by its pid after."""
    process = spawn([*orchestrator_executable(), *args], name=args[0], log_dir=run.cwd / "logs", env=run.env)
    try:
        yield process
    finally:
        process.stop(timeout=5)


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("admin:", "each with a user and a non-empty password"),
        ("admin", "FLOWER_BASIC_AUTH must be user:password"),
        (":secret", "each with a user and a non-empty password"),
        ("ops:a-good-one,admin:", "each with a user and a non-empty password"),
        ("admin:change-me-flower-password", "the password of 'admin' is the .env.example placeholder"),
    ],
)
def test_flower_refuses_empty_and_placeholder_passwords(tmp_path: Path, auth: str, message: str) -> None:
    run = Cli.on(tmp_path, FLOWER_BASIC_AUTH=auth)
    refused = run("flower", code=2)
    assert message in refused.stderr
    assert "celery -A" not in refused.stderr  # it never got as far as starting Flower
    assert "change-me-flower-password" not in refused.stderr  # a refused password is not echoed


@pytest.mark.parametrize(("address", "expected"), [(None, "127.0.0.1"), ("localhost", "localhost")])
def test_flower_listens_on_localhost_unless_told(tmp_path: Path, address: str | None, expected: str) -> None:
    port = str(_free_port())
    run = Cli.on(tmp_path, FLOWER_BASIC_AUTH="admin:a-real-password", FLOWER_PORT=port)
    if address is not None:
        run.env["FLOWER_ADDRESS"] = address
    with _started(run, "flower") as flower:
        command = f"celery -A orchestrator.celery_app flower --port={port} --address={expected}"
        flower.wait_for_log(command, timeout=30)  # printed just before it execs exactly that


def test_metrics_answer_while_a_client_sits_idle(tmp_path: Path) -> None:
    run = Cli.on(tmp_path)
    port = _free_port()
    with _started(run, "metrics", "--port", str(port)) as server:
        server.wait_for_log(f"serving metrics on http://127.0.0.1:{port}/metrics", timeout=30)
        # Clients that connect and send nothing (a port scanner, a half-open load balancer probe).
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
        try:
            started = time.monotonic()
            response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
            assert response.status_code == 200
            assert "orchestrator_jobs{" in response.text
            assert time.monotonic() - started < 5
            server.check_alive()
        finally:
            for s in idle:
                s.close()
